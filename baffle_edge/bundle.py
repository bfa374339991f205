"""A bundle folder as both ends read it: the shared reader of ``baffle.json`` and its files.

The exporter (export/bundle.py) writes a bundle; device-side runtimes (runtimes/) and the server
read it with ``read_bundle``, which checks the schema version, and ``Bundle.file`` verifies the
sha256 of every file a runtime is about to load. What else both ends agree on lives here too:
how a float batch becomes a model's quantized input and its quantized output becomes floats
(the ``input`` / ``output`` rows of a format entry), and what a valid perturbations-per-call
count is (the P of a bundle's ``train_p{P}`` graphs).

numpy only: no torch, no onnx, so a device without them can read a bundle.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baffle_edge.quant import QuantTable

SCHEMA_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_p(p) -> int:
    """A valid perturbations-per-call count (int >= 1); anything else is a ValueError."""
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or int(p) < 1:
        raise ValueError(f"perturbations per call must be an integer >= 1, got {p!r}")
    return int(p)


def quantize_input(x: np.ndarray, inp: dict) -> np.ndarray:
    """Float batch -> the model's input dtype (int8: ``clip(rint(x / scale) + zero_point)``)."""
    if inp["dtype"] == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = np.iinfo(inp["dtype"]).min, np.iinfo(inp["dtype"]).max
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(inp["scale"])) + inp["zero_point"]
    return np.clip(q, lo, hi).astype(inp["dtype"])


def dequantize_output(y: np.ndarray, out: dict) -> np.ndarray:
    if out["dtype"] == "float32":
        return np.asarray(y, dtype=np.float32)
    return ((y.astype(np.float64) - out["zero_point"]) * out["scale"]).astype(np.float32)


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: dict

    def file(self, fmt: str, role: str = "train") -> Path:
        if fmt not in self.meta["formats"]:
            raise ValueError(f"bundle {self.path} has no {fmt!r} format (has: {', '.join(self.meta['formats'])}); "
                             f"export it with --formats {fmt}")
        files = self.meta["formats"][fmt]["files"]
        name = files.get(role) or files["inference"]
        path = self.path / name
        want = self.meta["files"].get(name, {}).get("sha256")
        if not path.exists():
            raise FileNotFoundError(f"bundle {self.path} is missing {name}")
        if want is None or sha256(path) != want:
            raise ValueError(f"{path}: sha256 does not match baffle.json (corrupt or modified file)")
        return path

    def quant_table(self, fmt: str) -> QuantTable:
        return QuantTable.from_json(self.meta["formats"][fmt]["quantization"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["input"]["shape"][1:])

    def check_batch(self, x: np.ndarray) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input shape {tuple(x.shape)} does not match baffle.json's "
                             f"(batch, {', '.join(map(str, self.input_shape))})")


def read_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    meta_path = path / "baffle.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a bundle (no baffle.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{meta_path}: schema_version {meta.get('schema_version') if isinstance(meta, dict) else None!r}"
                         f" is not supported (expected {SCHEMA_VERSION})")
    return Bundle(path, meta)


PLAN_KINDS = ("chain", "graph")  # baffle.json formats.<fmt>.blocks "kind" (absent: chain): export/blocks.py,
# export/graph_blocks.py; the TypeScript client runs chains only (clients/js/src/segments.ts)


def plan_roles(plan: dict) -> list[str]:
    """The bundle file roles a block plan's graphs have (export/blocks.ChainPlan, export/graph_blocks.GraphPlan)."""
    if plan.get("kind", "chain") == "chain":
        return ["block_cache", *(f"block_seg{i}" for i in range(len(plan["modules"])))]
    roles = ["block_cache"]
    for i, s in enumerate(plan["segments"]):
        roles += [f"block_mod{i}"] + ([f"block_rest{i}"] if s["output"] != plan["output"] else [])  # a head: no rest
    return roles
