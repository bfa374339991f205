"""What the device-side suites take from torch, kept in a folder: ``--bench-bundles DIR``.

A device (an arm64 board, ``scripts/arm64-root bench``) installs the client without torch (numpy and the
runtimes), but the suites start from torch: each model case's initial weights, the exported bundles, the fp32
reference losses. With ``--bench-bundles DIR`` a run on a machine with torch writes all three into DIR as it
goes; a run where torch is missing reads them back, so the same suites measure the same bundles there.

    DIR/cases/<case>.npy            the case's initial weights (flat float32, ``params.flat_params`` order)
    DIR/cases/reference.json        fp32 reference losses, keyed by case and a digest of the batch
    DIR/<runtime>/<case>-<format>/  the bundle ``conftest.build_artifact`` exports for that runtime (ONNX ones with
                                    their ``train_p{P}`` graphs for ``BATCHED_PS``: a device has no onnx to build them)

Without ``--bench-bundles`` nothing is kept (bundles go to pytest's temporary folder) and torch is required.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from baffle_edge.runtimes.batching import CANDIDATES

HOW = ("run the suites once with torch installed and --bench-bundles DIR (scripts/arm64-root bench does), "
       "then here with the same DIR")


def have_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a finder that refuses torch (tests/lean_device.py)
        return False


class Store:
    """The folder of one ``--bench-bundles`` run; ``root=None``: nothing kept, torch computes everything."""

    def __init__(self, root: Path | None):
        self.root = root
        self.torch = have_torch()
        self._weights: dict[str, np.ndarray] = {}

    @property
    def cases(self) -> Path:
        assert self.root is not None
        return self.root / "cases"

    def weights(self, case) -> np.ndarray:
        """The case's initial weights (flat float32), computed with torch or read from the folder."""
        if case.id in self._weights:
            return self._weights[case.id]
        path = self.cases / f"{case.id}.npy" if self.root else None
        if path is not None and path.is_file():
            w = np.load(path, allow_pickle=False)
        elif self.torch:
            from baffle_edge.params import flat_params
            w = flat_params(case.build()).numpy()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, w, allow_pickle=False)
        else:
            pytest.skip(self.missing(f"the initial weights of {case.id}"))
        self._weights[case.id] = w
        return w

    def reference_loss(self, case, batch, compute) -> float:
        """``compute()`` (the torch fp32 reference loss on ``batch``), or its value kept in the folder."""
        key = f"{case.id}:{len(batch.y)}:{digest(batch)}"
        path = self.cases / "reference.json" if self.root else None
        kept = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        if key in kept:
            return float(kept[key])
        if not self.torch:
            pytest.skip(self.missing(f"the torch reference loss of {case.id} at batch {len(batch.y)}"))
        value = float(compute())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**kept, key: value}, indent=1, sort_keys=True))
        return value

    def bundle(self, runtime: str, case, fmt: str, workdir: Path) -> Path:
        """Where ``runtime``'s bundle of ``case`` lives: in the folder when there is one, else in ``workdir``."""
        return (self.root / runtime if self.root else workdir) / f"{case.id}-{fmt}"

    def missing(self, what: str) -> str:
        if self.root is None:
            return f"{what} needs torch (pip install torch==2.13.0), or --bench-bundles DIR: {HOW}"
        return f"{what} is not in --bench-bundles {self.root} and torch is not installed here: {HOW}"


def digest(batch) -> str:
    h = hashlib.sha256(np.ascontiguousarray(batch.x).tobytes())
    h.update(np.ascontiguousarray(batch.y).tobytes())
    return h.hexdigest()[:16]


# the P-perturbations-per-call graphs a kept ONNX bundle carries: auto-P's candidates (test_batched's P among them)
BATCHED_PS = tuple(p for p in CANDIDATES if p > 1)

current = Store(None)  # conftest.pytest_configure replaces it with --bench-bundles' folder


def use(root: Path | None) -> Store:
    global current
    current = Store(root)
    return current
