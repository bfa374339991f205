"""The rows of a round, as both ends regenerate and decode them: the perturbation of each row
(``step_noise``, block noise sparse via ``step_blocks``), a step's output split into base and perturbed
losses, and the decoding of those losses into the step's clipped gradient estimate (``step_gradient``),
plus FedAvg's local step. The device (``client.run_task``) and the server's replay (``server.Server``,
``block_draw``) import these; numpy only.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import perturb
from .estimator import clip_inf, leave_one_out, loss_differences, stein_gradient
from .perturb import NoiseKind
from .protocol import Baseline, Domain, RoundTask, Scheme


def step_noise(task: RoundTask, step: int, dim: int, *, signs: bool = False,
               blocks: perturb.BlockTable | None = None) -> Callable[[int], np.ndarray]:
    """eps_k for local step ``step`` of ``task`` (counter word k' = step * K + k). ``signs``: the
    Rademacher eps_k as a boolean mask, True where eps = -1 (quant.StepSelector's input). Block
    noise needs the model's ``blocks`` and is returned dense here (``step_blocks`` keeps it sparse)."""
    c, base = task.noise_client, step * task.k
    if task.noise is NoiseKind.BLOCK:  # float: scaled Gaussians; int8-step: whole steps (float32 integers)
        table = require_blocks(blocks, dim)
        drawn_from = table.for_task(task)  # once, not per k
        return lambda k: table.dense(*(v[0] for v in draw_task_blocks(task, drawn_from, [base + k])))
    if signs and task.noise is not NoiseKind.RADEMACHER:
        raise ValueError(f"sign masks need Rademacher noise, task has {task.noise.value!r}")
    return ChunkedNoise(task, base, dim, signs=signs)


class ChunkedNoise:
    """``k -> eps_k`` of one step, generated ``rows`` perturbations at a time (``perturb.noise_rows``,
    bit-identical to one k at a time) and handed out as views of the chunk. Rows per chunk: as many
    as fit ``CHUNK_WORDS`` Philox words (Rademacher: 32 values a word, so small models take 32 rows
    per pass, ~10x cheaper per row) or ``CHUNK_GAUSSIANS`` values (Box-Muller's float64 temporaries
    must stay in cache: one row at a time above it, the per-element cost dominates there)."""

    CHUNK_WORDS = 1 << 16
    CHUNK_GAUSSIANS = 1 << 13
    MAX_ROWS = 32

    def __init__(self, task: RoundTask, base: int, dim: int, *, signs: bool = False):
        self.task, self.base, self.dim, self.signs = task, base, dim, signs
        per_row = -(-dim // 32) if task.noise is NoiseKind.RADEMACHER else dim
        budget = self.CHUNK_WORDS if task.noise is NoiseKind.RADEMACHER else self.CHUNK_GAUSSIANS
        self.rows = int(max(1, min(self.MAX_ROWS, task.k, budget // max(per_row, 1))))
        self.start, self.chunk = -1, None

    def __call__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.task.k:
            raise ValueError(f"perturbation index {k} outside [0, {self.task.k})")
        if self.rows == 1:
            t = self.task
            if self.signs:
                return perturb.negative_signs(t.seed, t.round, t.noise_client, self.base + k, self.dim)
            return perturb.noise(t.seed, t.round, t.noise_client, self.base + k, self.dim, t.noise)
        start = k - k % self.rows
        if start != self.start:
            t, n = self.task, min(self.rows, self.task.k - start)
            ks = self.base + start + np.arange(n)
            self.chunk = perturb.noise_rows(t.seed, t.round, t.noise_client, ks, self.dim, t.noise, signs=self.signs)
            self.start = start
        return self.chunk[k - start]


def require_blocks(blocks: perturb.BlockTable | None, dim: int) -> perturb.BlockTable:
    if blocks is None:
        raise ValueError("block noise needs the model's block table (perturb.BlockTable); this runtime has none")
    if blocks.dim != dim:
        raise ValueError(f"block table covers {blocks.dim} parameters, the model has {dim}")
    return blocks


def step_blocks(task: RoundTask, step: int, blocks: perturb.BlockTable) -> tuple[np.ndarray, list[np.ndarray]]:
    """All K block perturbations of one local step, sparse: (block index per k, its values per k)."""
    return draw_blocks(task, blocks, step_counters(task, step))


def step_counters(task: RoundTask, step: int) -> np.ndarray:
    """The noise counter words k' = step * K + k of one local step's K perturbations."""
    return step * task.k + np.arange(task.k)


def draw_blocks(task: RoundTask, blocks: perturb.BlockTable, ks) -> tuple[np.ndarray, list[np.ndarray]]:
    """Block perturbations ``ks`` in the task's domain: float32 values (float) or whole int8 steps,
    blocks drawn with the task's ``block_weights`` (docs/noise.md section 11) from the model's partition ``blocks``."""
    return draw_task_blocks(task, blocks.for_task(task), ks)


def draw_task_blocks(task: RoundTask, table: perturb.BlockTable, ks) -> tuple[np.ndarray, list[np.ndarray]]:
    """``draw_blocks`` from the task's own partition ``table`` (``BlockTable.for_task``: its block weights and
    int8 step cap already applied), for callers that also read the table's step weights."""
    draw = table.draw_steps if task.domain is Domain.INT8_STEP else table.draw
    return draw(task.seed, task.round, task.noise_client, ks)


def draw_task_flat(task: RoundTask, table: perturb.BlockTable, ks) -> tuple[np.ndarray, np.ndarray]:
    """``draw_task_blocks`` with the values of all k concatenated (``BlockTable.draw_flat``)."""
    return table.draw_flat(task.seed, task.round, task.noise_client, ks, steps=task.domain is Domain.INT8_STEP)


def split_step(task: RoundTask, out: np.ndarray) -> tuple[float | None, np.ndarray]:
    """Split a session's output for one step into (base loss, perturbed losses)."""
    if task.scheme is Scheme.FORWARD:
        return float(out[0]), out[1:]
    return None, out


def step_gradient(task: RoundTask, step: int, losses: np.ndarray, base: float | None, dim: int,
                  *, table=None, weights: np.ndarray | None = None,
                  blocks: perturb.BlockTable | None = None) -> np.ndarray:
    """The (clipped, ``task.clip``) gradient estimate of one local step, as client and server both
    compute it.

    Float domain: delta = sigma * eps. int8-step domain (``table``: the bundle's
    ``quant.QuantTable``, ``weights``: the float weights the integers were quantized from):
    delta = step * eps_eff, with the steps and the saturation-aware eps_eff of quant.py; the
    estimate divides by one RMS step or by each coordinate's step (``task.estimator``). With
    ``task.baseline`` leave-one-out each loss difference is taken against the other perturbations'
    mean instead of L(w) (estimator.leave_one_out)."""
    diffs = loss_differences(losses, base, task.scheme)
    if task.baseline is Baseline.LOO:
        diffs = leave_one_out(diffs)
    if task.noise is NoiseKind.BLOCK:  # sparse: only the drawn blocks are regenerated and touched
        blocks = require_blocks(blocks, dim).for_task(task)
        drawn, values = draw_task_flat(task, blocks, step_counters(task, step))  # all K blocks in one pass
        coef = np.asarray(diffs, dtype=np.float64) / len(diffs)
        if task.domain is Domain.FLOAT:
            return clip_inf(blocks.accumulate_flat(drawn, values, coef) / task.sigma, task.clip)
        if table is None or weights is None:
            raise ValueError("an int8-step report needs the bundle's quantization table to be decoded")
        from .quant import FlatSteps
        flat = FlatSteps(table, table.quantize(weights))  # eps_eff in steps, weighted (1 / p_b) / m_b^2
        idx = blocks.indices(drawn)
        every = flat.effective_rows(blocks, idx, values, central=task.central) * np.repeat(blocks.step_weight[drawn],
                                                                                         blocks.sizes[drawn])
        return clip_inf(blocks.accumulate_flat(drawn, every, coef, idx=idx) / table.divisor(task.estimator), task.clip)
    noise = step_noise(task, step, dim)
    if task.domain is Domain.FLOAT:
        return clip_inf(stein_gradient(diffs, task.sigma, noise, dim), task.clip)
    if table is None or weights is None:
        raise ValueError("an int8-step report needs the bundle's quantization table to be decoded")
    q = table.quantize(weights)
    eff = lambda k: table.effective_noise(q, noise(k), central=task.central)  # noqa: E731
    return clip_inf(stein_gradient(diffs, table.divisor(task.estimator), eff, dim), task.clip)


def local_step(task: RoundTask, w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """One FedAvg local SGD step in float32, as client and server replay both take it."""
    return (w - np.float32(task.local_lr) * g.astype(np.float32)).astype(np.float32)
