"""The BAFFLE client: runs a RoundTask on any runtime Session and returns a ClientReport.

Depends on numpy only (no torch), so it is the code path a device port mirrors:

    for each local step s:                       # FedSGD: one step
        losses = session.losses(batch_s, task, step=s)    # K+1 (forward) or 2K (central) scalars
        if more steps follow (FedAvg):
            w -= local_lr * clip(stein_gradient(...))      # same noise, regenerated
            session.set_weights(w)
    return ClientReport(losses, base losses, sample count, timing)

The perturbation for step s and index k uses the noise counter word ``s * K + k``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Protocol

import numpy as np

from . import perturb
from .estimator import clip_inf, leave_one_out, loss_differences, stein_gradient
from .perturb import NoiseKind
from .protocol import Baseline, ClientReport, Domain, RoundTask, Scheme, StepEstimator


@dataclass(frozen=True)
class Batch:
    x: np.ndarray  # float32 (B, C, H, W), normalised as the dataset documents
    y: np.ndarray  # int64 (B,)

    def __post_init__(self):
        if len(self.x) != len(self.y) or len(self.y) == 0:
            raise ValueError(f"batch: {len(self.x)} inputs but {len(self.y)} labels")


class Session(Protocol):
    """A loaded model on some runtime that can evaluate perturbed losses."""

    def set_weights(self, flat: np.ndarray) -> None: ...
    def losses(self, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray: ...


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy, computed in float64 (every runtime's losses use this)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def step_noise(task: RoundTask, step: int, dim: int, *, signs: bool = False) -> Callable[[int], np.ndarray]:
    """eps_k for local step ``step`` of ``task`` (counter word k' = step * K + k). ``signs``: the
    Rademacher eps_k as a boolean mask, True where eps = -1 (quant.StepSelector's input)."""
    c, base = task.noise_client, step * task.k
    if signs:
        if NoiseKind(task.noise) is not NoiseKind.RADEMACHER:
            raise ValueError(f"sign masks need Rademacher noise, task has {NoiseKind(task.noise).value!r}")
        return lambda k: perturb.negative_signs(task.seed, task.round, c, base + k, dim)
    return lambda k: perturb.noise(task.seed, task.round, c, base + k, dim, task.noise)


def noise_stream(task: RoundTask, step: int, dim: int, *, prefetch: bool = True,
                 signs: bool = False) -> Iterator[np.ndarray]:
    """eps_0 .. eps_{K-1} of one step, in order (as ``step_noise``). With ``prefetch`` the next eps
    is generated in a helper thread while the caller runs the forward pass (numpy releases the GIL
    in the Philox and Box-Muller array ops), so noise generation overlaps inference on a multi-core
    device."""
    noise = step_noise(task, step, dim, signs=signs)
    if not prefetch or task.k == 1:
        yield from (noise(k) for k in range(task.k))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="noise") as pool:
        ahead = pool.submit(noise, 0)
        for k in range(task.k):
            eps = ahead.result()
            if k + 1 < task.k:
                ahead = pool.submit(noise, k + 1)
            yield eps


def split_step(task: RoundTask, out: np.ndarray) -> tuple[float | None, np.ndarray]:
    """Split a session's output for one step into (base loss, perturbed losses)."""
    if Scheme(task.scheme) is Scheme.FORWARD:
        return float(out[0]), out[1:]
    return None, out


def step_gradient(task: RoundTask, step: int, losses: np.ndarray, base: float | None, dim: int,
                  clip: float | None = None, *, table=None, weights: np.ndarray | None = None) -> np.ndarray:
    """The (clipped) gradient estimate of one local step, as client and server both compute it.

    Float domain: delta = sigma * eps. int8-step domain (``table``: the bundle's
    ``quant.QuantTable``, ``weights``: the float weights the integers were quantized from):
    delta = step * eps_eff, with the steps and the saturation-aware eps_eff of quant.py; the
    estimate divides by one RMS step or by each coordinate's step (``task.estimator``). With
    ``task.baseline`` leave-one-out each loss difference is taken against the other perturbations'
    mean instead of L(w) (estimator.leave_one_out)."""
    diffs = loss_differences(losses, base, task.scheme)
    if Baseline(task.baseline) is Baseline.LOO:
        diffs = leave_one_out(diffs)
    noise = step_noise(task, step, dim)
    if Domain(task.domain) is Domain.FLOAT:
        return clip_inf(stein_gradient(diffs, task.sigma, noise, dim), clip)
    if table is None or weights is None:
        raise ValueError("an int8-step report needs the bundle's quantization table to be decoded")
    q = table.quantize(weights)
    central = Scheme(task.scheme) is Scheme.CENTRAL
    eff = lambda k: table.effective_noise(q, noise(k), central=central)  # noqa: E731
    return clip_inf(stein_gradient(diffs, table.divisor(StepEstimator(task.estimator)), eff, dim), clip)


def run_task(task: RoundTask, session: Session, batches: list[Batch], *, weights: np.ndarray,
             runtime: str = "", local_lr: float = 0.0, clip: float | None = 0.3) -> ClientReport:
    """Evaluate ``task`` at ``weights`` on ``batches`` (one per local step) and report the losses."""
    if len(batches) != task.local_steps:
        raise ValueError(f"task has {task.local_steps} local step(s) but {len(batches)} batch(es) were given")
    start = time.perf_counter()
    w = np.array(weights, dtype=np.float32)
    session.set_weights(w)
    bases, losses = [], []
    for s, batch in enumerate(batches):
        out = np.asarray(session.losses(batch, task, step=s), dtype=np.float64)
        base, pert = split_step(task, out)
        if base is not None:
            bases.append(base)
        losses.append(pert)
        if s + 1 < len(batches):
            g = step_gradient(task, s, pert, base, w.size, clip=clip, table=getattr(session, "table", None),
                              weights=w)
            w = (w - np.float32(local_lr) * g.astype(np.float32)).astype(np.float32)
            session.set_weights(w)
    return ClientReport(round=task.round, client=task.client, losses=np.concatenate(losses),
                        base_losses=np.asarray(bases), num_samples=int(sum(len(b.y) for b in batches)),
                        model_version=task.model_version, runtime=runtime,
                        seconds=time.perf_counter() - start)
