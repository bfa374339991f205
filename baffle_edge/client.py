"""The BAFFLE client: runs a RoundTask on any runtime Session and returns a ClientReport.

Depends on numpy only (no torch), so it is the code path a device port mirrors:

    for each local step s:                                # FedSGD: one step
        losses = step_losses(session, batch_s, task, s)   # K+1 (forward) or 2K (central) scalars
        if more steps follow (FedAvg):
            w -= task.local_lr * clip(stein_gradient(...), task.clip)   # same noise, regenerated
            session.set_weights(w)
    return ClientReport(losses, base losses, sample count, timing)

``step_losses`` is the one loss loop of every runtime: it orders the perturbation rows
([base], +eps_k [, -eps_k]), builds each row's weights through the session's domain
(``FloatWeights``: ``w + float32(sigma) * eps``; ``StepWeights``: whole int8 steps), hands them to
the backend P at a time (``Session.evaluate``: "logits of these weight sets on this batch") and
checks domain, noise and finiteness once. The perturbation for step s and index k uses the noise
counter word ``s * K + k``.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from . import libm, perturb
from .perturb import NoiseKind
from .protocol import ClientReport, Domain, RoundTask, check_noise
from .rows import draw_task_flat, local_step, require_blocks, split_step, step_counters, step_gradient, step_noise


@dataclass(frozen=True)
class Batch:
    x: np.ndarray  # float32 (B, C, H, W), normalised as the dataset documents
    y: np.ndarray  # int64 (B,)

    def __post_init__(self):
        if len(self.x) != len(self.y) or len(self.y) == 0:
            raise ValueError(f"batch: {len(self.x)} inputs but {len(self.y)} labels")


class Session(Protocol):
    """A model loaded on some runtime: what ``step_losses`` and every caller may rely on."""

    name: str  # the runtime's registered name, e.g. "onnxruntime-int8"
    dim: int  # trainable parameters = length of eps_k
    domain: Domain  # where perturbations are applied
    table: Any  # int8-step sessions: the bundle's quant.QuantTable; float sessions: None
    perturbations_per_call: int  # P: weight sets per ``evaluate`` call

    def set_weights(self, flat: np.ndarray) -> None: ...
    def weight_set(self, sign: int, eps: np.ndarray | None, task: RoundTask | None) -> Any: ...
    def prepare(self, x: np.ndarray) -> Any: ...
    def evaluate(self, x: Any, sets: Sequence[Any]) -> Sequence[np.ndarray]: ...
    def logits(self, x: np.ndarray) -> np.ndarray: ...
    def losses(self, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray: ...


class BlockForward(Protocol):
    """A session capability (``session.block_forward``): the exact incremental forward of block-noise
    rows from the cached activations of the unperturbed weights (runtimes/torch_incremental.py)."""

    def cache(self, x: Any) -> np.ndarray: ...  # run the unperturbed forward, keep its activations; its logits
    def logits(self, blocks: np.ndarray, values: list[np.ndarray]) -> np.ndarray: ...  # [n, B, classes]


class BaseSession:
    """What every backend shares: the loss loop, plain logits, and the P of its calls. A backend
    adds a domain (``FloatWeights`` / ``StepWeights``), ``prepare`` and ``evaluate``."""

    name = ""
    dim = 0
    domain = Domain.FLOAT
    table = None
    perturbations_per_call = 1
    blocks: perturb.BlockTable | None = None  # block noise: the partition of the parameters (None: not supported)
    block_forward: BlockForward | None = None  # block noise evaluated incrementally (None: full forwards)

    def losses(self, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray:
        try:
            return step_losses(self, batch, task, step)
        finally:
            self.restore()

    def restore(self) -> None:
        """Backends that hold weights in place (a torch model, a TFLite buffer) put back the
        unperturbed ones here, exactly, after every step."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Plain forward at the current (unperturbed) weights."""
        return np.asarray(self.evaluate(self.prepare(x), [self.weight_set(0, None, None)])[0])


class FloatWeights:
    """Float domain: row weights are ``w + sign * (float32(sigma) * eps)`` in float32 (product
    first, then sum: the arithmetic every runtime and port uses, docs/noise.md)."""

    domain = Domain.FLOAT
    table = None

    def set_weights(self, flat: np.ndarray) -> None:
        flat = np.array(flat, dtype=np.float32).reshape(-1)
        if flat.size != self.dim:
            raise ValueError(f"weights: expected {self.dim} values, got {flat.size}")
        self.w0 = flat

    def weight_set(self, sign: int, eps: np.ndarray | None, task: RoundTask | None) -> np.ndarray:
        if sign == 0:
            return self.w0
        return self.w0 + np.float32(sign) * (np.float32(task.sigma) * eps)


class StepWeights:
    """int8-step domain: the session holds the integers ``q`` of the global weights (bundle scales)
    and row weights move every integer by +-1 step (``quant.StepSelector``; eps_k arrives as the
    Rademacher sign mask, True = -1). Sets are lists of integer arrays in the table's order."""

    domain = Domain.INT8_STEP

    def set_weights(self, flat: np.ndarray) -> None:
        self.set_integers(self.table.quantize(flat))

    def set_integers(self, qs: list[np.ndarray]) -> None:
        """Hold the integers ``qs`` (table order) directly: what a device that downloaded them runs."""
        from .quant import FlatSteps, StepSelector
        if len(qs) != len(self.table.tensors) or any(
                q.shape != t.shape or q.dtype != np.dtype(t.dtype) for q, t in zip(qs, self.table.tensors)):
            raise ValueError("integers: the tensors do not match the bundle's quantization table")
        self.q = list(qs)
        self.select = StepSelector(self.table, self.q)
        self.flat = FlatSteps(self.table, self.q)  # block noise moves a few coordinates: flat integers

    def weight_set(self, sign: int, eps: np.ndarray | None, task: RoundTask | None) -> list[np.ndarray]:
        """eps: the Rademacher sign mask (bool), or whole steps per coordinate (block noise, moved by
        ``quant.FlatSteps``: a coordinate that could leave the integer range stays still)."""
        if getattr(self, "q", None) is None:
            raise ValueError("call set_weights(global weights) before evaluating losses")
        if sign == 0:
            return self.q
        if eps.dtype == bool:
            return self.select(eps, sign)
        return self.flat.tensors(self.table, self.flat.moved(slice(None), eps, sign))  # block noise (dense)


LOSS_CHUNK_VALUES = 1 << 13  # logits values per exp pass of cross_entropies, per call in step_losses (cache-sized)


def cross_entropies(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The loss of each logits array ``logits[i]`` (n x B x C, labels (B,)): mean softmax
    cross-entropy in float64, computed exactly as docs/noise.md section 7 specifies (first maximum,
    fdlibm exp/log, pairwise sums), so every machine and every port gets the same bits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 3 or y.ndim != 1 or len(y) != z.shape[1]:
        raise ValueError(f"cross-entropy: expected logits n x B x C and B labels, got logits {z.shape}, labels {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[2]):
        raise ValueError(f"labels outside [0, {z.shape[2]})")
    # exp and its sums in chunks of LOSS_CHUNK_VALUES logits (libm's temporaries stay in cache), the log
    # once over all sums (it is called on B values per row: per-call overhead would dominate)
    step = max(1, LOSS_CHUNK_VALUES // max(1, z.shape[1] * z.shape[2]))
    sums, picked = np.empty(z.shape[:2]), np.empty(z.shape[:2])
    for i in range(0, len(z), step):
        c = z[i:i + step]
        m = np.take_along_axis(c, c.argmax(axis=2)[..., None], axis=2)  # the first largest logit of each row
        sums[i:i + step] = libm.pairwise_sum(libm.exp(c - m))
        picked[i:i + step] = c[:, np.arange(y.size), y] - m[..., 0]
    logp = picked - libm.log(sums)
    return -(libm.pairwise_sum(logp) / y.size)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The loss of one logits array (B x C): ``cross_entropies`` of one."""
    return float(cross_entropies(np.asarray(logits)[None], labels)[0])


def noise_stream(task: RoundTask, step: int, dim: int, *, prefetch: bool = True,
                 signs: bool = False, blocks: perturb.BlockTable | None = None) -> Iterator[np.ndarray]:
    """eps_0 .. eps_{K-1} of one step, in order (as ``step_noise``). With ``prefetch`` the next eps
    is generated in a helper thread while the caller runs the forward pass (numpy releases the GIL
    in the Philox and Box-Muller array ops), so noise generation overlaps inference on a multi-core
    device. Noise generated several rows per pass (``rows.ChunkedNoise``: Rademacher on small
    models) costs a few percent of a forward per row and is not worth a thread hand-off."""
    noise = step_noise(task, step, dim, signs=signs, blocks=blocks)
    if not prefetch or task.k == 1 or getattr(noise, "rows", 1) > 1:  # chunked noise is cheap: no helper thread
        yield from (noise(k) for k in range(task.k))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="noise") as pool:
        ahead = pool.submit(noise, 0)
        for k in range(task.k):
            eps = ahead.result()
            if k + 1 < task.k:
                ahead = pool.submit(noise, k + 1)
            yield eps


def check_task(session: Session, task: RoundTask) -> None:
    """The task must perturb in the session's domain, with noise that domain can apply."""
    if task.domain is not session.domain:
        raise ValueError(f"runtime {session.name!r} perturbs in the {session.domain.value!r} domain; task asks "
                         f"for {task.domain.value!r}")
    check_noise(task.domain, task.noise)


def step_losses(session: Session, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray:
    """The losses of one local step: ``[L(w)] + [L(w + d_k) for k] (+ [L(w - d_k) for k] central)``.

    Rows are evaluated in the order base, then per k ``+eps_k`` (and ``-eps_k``), ``P`` weight sets
    per ``session.evaluate`` call (the last call takes the remainder), so at most P + 1 sets and
    one prefetched eps are alive at once."""
    check_task(session, task)
    if task.noise is NoiseKind.BLOCK and session.block_forward is not None:
        res = block_losses(session, batch, task, step)
    else:
        res = weight_set_losses(session, batch, task, step)
    if not np.all(np.isfinite(res)):
        raise ValueError(f"runtime {session.name!r} produced non-finite losses")
    return res


def weight_set_losses(session: Session, batch: Batch, task: RoundTask, step: int) -> np.ndarray:
    """``step_losses`` through ``session.evaluate``: every row's weight set, P per call."""
    x = session.prepare(batch.x)
    p = session.perturbations_per_call
    signs = (1, -1) if task.central else (1,)
    pending = [] if task.central else [session.weight_set(0, None, task)]
    logits: list[np.ndarray] = []  # not yet turned into losses: up to LOSS_CHUNK_VALUES values
    out: list[np.ndarray] = []

    def losses() -> None:
        out.append(cross_entropies(np.stack(logits), batch.y))
        logits.clear()

    def run(sets: list) -> None:
        logits.extend(np.array(z) for z in session.evaluate(x, sets))  # copies: a backend may reuse its buffers
        if len(logits) * logits[0].size >= LOSS_CHUNK_VALUES:
            losses()

    for eps in noise_stream(task, step, session.dim, signs=session.domain is Domain.INT8_STEP,
                            blocks=session.blocks):
        pending.extend(session.weight_set(s, eps, task) for s in signs)
        while len(pending) >= p:
            run(pending[:p])
            del pending[:p]
    if pending:
        run(pending)
    if logits:
        losses()
    res = np.concatenate(out)
    if task.central:  # (+1, -1) pairs -> plus..., minus...
        res = np.concatenate([res[0::2], res[1::2]])
    return res


def block_losses(session: Session, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray:
    """``step_losses`` for block noise on a session with an incremental forward: the same rows, in the
    same order, but each perturbed row is evaluated from the cached unperturbed activations. The
    backend gets each row's block index and the block's perturbed values: ``w0[block] + sign *
    (float32(sigma) * eps)`` (FloatWeights' arithmetic) or, int8-step, the block's integers moved by
    ``sign`` times its steps (``quant.FlatSteps``, docs/noise.md section 10)."""
    table = require_blocks(session.blocks, session.dim)
    fwd = session.block_forward
    base = fwd.cache(session.prepare(batch.x))
    # all rows at once: the drawn blocks' indices and values concatenated, split back into one view per row
    drawn_from = table.for_task(task)
    blocks, eps = draw_task_flat(task, drawn_from, step_counters(task, step))
    idx = table.indices(blocks)
    ends = np.cumsum(table.sizes[blocks]).tolist()
    starts = [0, *ends[:-1]]
    if session.domain is Domain.INT8_STEP:
        moved = lambda sign: session.flat.moved_rows(drawn_from, idx, eps, sign)  # noqa: E731
    else:
        moved = lambda sign: session.w0[idx] + np.float32(sign) * (np.float32(task.sigma) * eps)  # noqa: E731
    rows = []
    for sign in ((1, -1) if task.central else (1,)):
        m = moved(sign)
        z = fwd.logits(blocks, [m[a:b] for a, b in zip(starts, ends)])
        rows.append(cross_entropies(z, batch.y))
    return np.concatenate(([] if task.central else [cross_entropy(base, batch.y)], *rows))


def run_task(task: RoundTask, session: Session, batches: list[Batch], *, weights: np.ndarray | None,
             runtime: str = "", integers: list[np.ndarray] | None = None) -> ClientReport:
    """Evaluate ``task`` at ``weights`` on ``batches`` (one per local step) and report the losses.
    ``integers`` (int8-step sessions, one local step): the quantized weights themselves, instead of ``weights``."""
    if len(batches) != task.local_steps:
        raise ValueError(f"task has {task.local_steps} local step(s) but {len(batches)} batch(es) were given")
    start = time.perf_counter()
    if integers is not None:
        if task.local_steps != 1 or session.domain is not Domain.INT8_STEP:
            raise ValueError("integers: only an int8-step session's single-step task runs on integers alone")
        w = None
        session.set_integers(integers)
    else:
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
            w = local_step(task, w, step_gradient(task, s, pert, base, w.size, table=session.table, weights=w,
                                                  blocks=session.blocks))
            session.set_weights(w)
    return ClientReport(round=task.round, client=task.client, losses=np.concatenate(losses),
                        base_losses=np.asarray(bases), num_samples=int(sum(len(b.y) for b in batches)),
                        model_version=task.model_version, runtime=runtime,
                        seconds=time.perf_counter() - start)
