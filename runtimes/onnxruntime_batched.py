"""ONNX Runtime, P perturbations per call (GitHub issue 9): sessions on ``model[.int8].p{P}.train.onnx``.

The batched graph (export/batched.py) takes every parameter input with a leading P axis and returns
logits ``[P, batch, classes]``. The session stacks P perturbed weight sets - built exactly as the
sequential session builds one (``_weights(sign, eps, task)``) - and runs them in one call. The
bundle's ``train_p{P}`` file is used when the bundle has one (``ExportConfig.perturbations_per_call``);
otherwise the graph is built from the bundle's train graph when the session loads (needs ``onnx``).

A step needs K+1 (forward) or 2K (central) evaluations; the last call of a step holds the remainder
r < P: it runs on the sequential train graph when r <= P/2 (r small calls are cheaper than one
padded P call), else as one batched call padded with the unperturbed weights (padding discarded).
The losses are returned in the sequential layout: [base,] plus_1..K [, minus_1..K].
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from baffle_edge.client import Batch, cross_entropy, step_noise
from baffle_edge.export.batched import batch_graph, check_p
from baffle_edge.protocol import RoundTask, Scheme

from .onnxruntime_runtime import OrtFloatSession, OrtInt8Session, make_session


def batched_graph_path(bundle, fmt: str, p: int) -> Path:
    """The bundle's ``train_p{P}`` graph of ``fmt``, or one built now into a temporary folder."""
    files = bundle.meta["formats"].get(fmt, {}).get("files", {})
    if f"train_p{p}" in files:
        return bundle.file(fmt, f"train_p{p}")
    import onnx
    proto = batch_graph(onnx.load(str(bundle.file(fmt, "train"))), p)
    out = Path(tempfile.mkdtemp(prefix="baffle-p")) / f"{fmt}.p{p}.train.onnx"
    out.write_bytes(proto.SerializeToString())
    return out


class _BatchedMixin:
    def _init_batched(self, p: int, provider: str, threads: int | None, profile: bool) -> None:
        self.p = check_p(p)
        self.batched = make_session(batched_graph_path(self.bundle, self.fmt, self.p), provider=provider,
                                    threads=threads, profile=profile)

    def forward_batched(self, x: np.ndarray, weights: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Logits [len(weights), B, classes]; ``weights`` holds at most P sets (padded to P here)."""
        n = len(weights)
        sets = weights + [weights[0]] * (self.p - n)
        feeds = {name: np.stack([w[name] for w in sets]) for name in weights[0]}
        return self.batched.run([self.output_name], {self.input_name: x, **feeds})[0][:n]

    def losses(self, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray:
        x = self._check(batch, task)
        noise = step_noise(task, step, self.dim, signs=self.signs)
        central = Scheme(task.scheme) is Scheme.CENTRAL
        rows = ([] if central else [(0, -1)]) + [(s, k) for k in range(task.k) for s in ((1, -1) if central else (1,))]
        out: list[float] = []
        for start in range(0, len(rows), self.p):
            chunk = rows[start:start + self.p]
            eps_k, eps = None, None
            sets = []
            for sign, k in chunk:
                if sign != 0 and k != eps_k:
                    eps, eps_k = noise(k), k
                sets.append(self._weights(sign, None if sign == 0 else eps, task))
            if len(chunk) <= self.p // 2:  # a small remainder: sequential calls are cheaper than padding
                out.extend(cross_entropy(self.forward(x, w), batch.y) for w in sets)
            else:
                out.extend(cross_entropy(z, batch.y) for z in self.forward_batched(x, sets))
        if central:
            out = out[0::2] + out[1::2]
        res = np.asarray(out, dtype=np.float64)
        if not np.all(np.isfinite(res)):
            raise ValueError(f"runtime {self.name!r} produced non-finite losses")
        return res

    def end_profiling(self) -> str:
        """End profiling of both sessions; returns the batched session's trace file."""
        self.session.end_profiling()
        return self.batched.end_profiling()


class OrtFloatBatchedSession(_BatchedMixin, OrtFloatSession):
    def __init__(self, bundle_dir, *, perturbations_per_call: int, provider: str = "cpu",
                 threads: int | None = None, profile: bool = False):
        super().__init__(bundle_dir, provider=provider, threads=threads, profile=profile)
        self._init_batched(perturbations_per_call, provider, threads, profile)


class OrtInt8BatchedSession(_BatchedMixin, OrtInt8Session):
    def __init__(self, bundle_dir, *, perturbations_per_call: int, provider: str = "cpu",
                 threads: int | None = None, profile: bool = False):
        super().__init__(bundle_dir, provider=provider, threads=threads, profile=profile)
        self._init_batched(perturbations_per_call, provider, threads, profile)
