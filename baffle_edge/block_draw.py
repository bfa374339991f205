"""How the server draws blocks for block noise: ``RoundTask.block_weights`` (docs/noise.md section 11).

Any draw probability p_b > 0 keeps the estimate unbiased (the values are scaled by sqrt(1 / p_b)),
so the server may put the perturbations where the gradient is, per unit of client compute:

* ``size``: p_b ∝ d_b (section 8; the default, no field in the task);
* ``uniform``: every block equally likely (small blocks, conv1 filters and head rows, gain);
* ``adaptive``: p_b ∝ sqrt(G_m d_b / c_b), the allocation that minimises the estimate's variance
  E|g_hat|^2 ∝ sum_b |g_b|^2 d_b / p_b at a fixed expected cost sum_b p_b c_b, with c_b the cost of
  a row of block b on the client's runtime (``torch_incremental.block_macs``) and G_m the gradient
  energy per block of module m, measured from the reports themselves: a row that drew block b has
  E[dL^2] = |g_b|^2 / p_b (float, times sigma^2) or m_b^2 |g_b|^2 (int8 steps), so
  G_m = mean(dL^2 | m) * p_b (float) or / m_b^2 (int8), smoothed over rounds (EMA). A tenth of the
  mass stays on ``size`` so no module starves when its measured energy is noisy. With a forward
  budget the server re-derives K each round from the expected row cost of the current draw (cheap
  rows, such as head rows, buy more perturbations), capped at 4x the size draw's K because the
  upload is K scalars (``BUDGET_K_CAP``).

Only module-level statistics of the loss differences are used: no data, no gradient leaves a client
beyond what its report already holds.
"""
from __future__ import annotations

import enum

import numpy as np

from .estimator import leave_one_out, loss_differences
from .perturb import BlockTable
from .protocol import Baseline, ClientReport, Domain, RoundTask
from .rows import step_counters

SCALE = 1 << 24  # integer weights: per-block probability x SCALE (>= 1)
SIZE_SHARE = 0.1  # adaptive: fraction of the draw kept in proportion to size
EMA = 0.3  # adaptive: weight of the newest round's energies
BUDGET_K_CAP = 4  # with a forward budget: K at most this many times the size draw's K


class BlockDrawPolicy(str, enum.Enum):
    SIZE = "size"
    UNIFORM = "uniform"
    ADAPTIVE = "adaptive"


class BlockDraw:
    """The server's block-draw policy: the weights of the next tasks and what they cost."""

    def __init__(self, policy: BlockDrawPolicy | str, blocks: BlockTable, row_cost: np.ndarray, domain: Domain):
        """``row_cost``: cost of one row per block in full forwards (``block_macs`` per / full)."""
        self.policy = BlockDrawPolicy(policy)
        self.blocks, self.cost, self.domain = blocks, np.asarray(row_cost, dtype=np.float64), Domain(domain)
        n = len(blocks.modules)
        self.energy: np.ndarray | None = None  # G_m per module (adaptive), None until a round was observed
        self._sum, self._count = np.zeros(n), np.zeros(n)
        # uniform: one weight for all; adaptive starts in proportion to size and learns from round 0
        self.weights = tuple([1] * n) if self.policy is BlockDrawPolicy.UNIFORM else None

    def table(self) -> BlockTable:
        return self.blocks.weighted(self.weights)

    def expected_cost(self) -> float:
        """Expected cost of one perturbation (full forwards) under the current weights."""
        return float(self.table().probability @ self.cost)

    def k_for_budget(self, forwards: float, *, central: bool = False, cap: float = BUDGET_K_CAP) -> int:
        """K whose expected rows plus the cached forward cost ``forwards`` full forwards, at most
        ``cap`` x the K of the size draw (the upload is K scalars: cheap rows must not inflate it
        without bound)."""
        def k_at(cost: float) -> int:
            k = max(1, int((forwards - 1) / cost))
            return max(1, k // 2) if central else k
        size_cost = float(self.blocks.sizes @ self.cost / self.blocks.dim)
        return min(k_at(self.expected_cost()), int(cap * k_at(size_cost)))

    def observe(self, task: RoundTask, report: ClientReport) -> None:
        """Add an accepted report's squared loss differences to its modules' energy sums."""
        if self.policy is not BlockDrawPolicy.ADAPTIVE:
            return
        t = self.blocks.for_task(task)
        per = task.losses_per_step
        for s in range(task.local_steps):
            base = float(report.base_losses[s]) if report.base_losses.size else None
            diffs = loss_differences(report.losses[s * per:(s + 1) * per], base, task.scheme)
            if task.baseline is Baseline.LOO:
                diffs = leave_one_out(diffs)
            drawn = t.drawn_blocks(task.seed, task.round, task.noise_client, step_counters(task, s))
            scale = t.probability[drawn] if self.domain is Domain.FLOAT else 1.0 / t.steps[drawn].astype(np.float64) ** 2
            m = t.module[drawn]
            np.add.at(self._sum, m, np.asarray(diffs, np.float64) ** 2 * scale)
            np.add.at(self._count, m, 1)

    def end_round(self) -> None:
        """Turn the round's sums into the next weights (adaptive); other policies keep theirs."""
        if self.policy is not BlockDrawPolicy.ADAPTIVE or not self._count.any():
            return
        seen = self._count > 0
        new = np.where(seen, self._sum / np.maximum(self._count, 1), 0.0)
        if self.energy is None:
            self.energy = np.where(seen, new, new[seen].mean())
        else:
            self.energy = np.where(seen, (1 - EMA) * self.energy + EMA * new, self.energy)
        self._sum[:], self._count[:] = 0, 0
        self.weights = self._weights_from_energy()

    def _weights_from_energy(self) -> tuple[int, ...]:
        b = self.blocks
        g = np.maximum(self.energy[b.module], 1e-300)
        p_adapt = np.sqrt(g * b.sizes / np.maximum(self.cost, 1e-12))
        p = (1 - SIZE_SHARE) * p_adapt / p_adapt.sum() + SIZE_SHARE * b.sizes / b.dim
        # one weight per module (its blocks share G_m, d_b and c_b): the mean per-block probability
        per_module = np.array([p[b.module == m].mean() for m in range(len(b.modules))])
        return tuple(int(max(1, round(x * SCALE))) for x in per_module)

    def state(self) -> dict:
        return {"policy": self.policy.value, "weights": None if self.weights is None else list(self.weights),
                "energy": None if self.energy is None else self.energy.tolist()}

    def load_state(self, d: dict) -> None:
        self.weights = None if d.get("weights") is None else tuple(int(x) for x in d["weights"])
        self.energy = None if d.get("energy") is None else np.asarray(d["energy"], dtype=np.float64)
