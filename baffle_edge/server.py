"""The reference server: one round loop, variation in Strategy hooks (FedSGD, FedAvg).

A round: the strategy writes one RoundTask per client; client updates come back (BAFFLE:
reports of loss scalars, decoded here by regenerating the noise; BP baseline: exact gradients);
each report is validated and a bad one is recorded and skipped; the strategy folds the valid
updates into the global model. Epoch boundaries step the LR schedule and the EMA of the weights.

Aggregation is the ``Strategy.aggregate`` hook: the weighted mean by default, or a Byzantine-robust
coordinate-wise median / trimmed mean over the per-client estimates (``make_strategy(aggregate=)``).
A client's weight is the server's (``SampleCount``: the samples it scheduled, or equal weights),
never the ``num_samples`` a report claims; a report whose claim differs is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import Aggregate, OptimConfig, OptimizerName, coerce_enums  # noqa: F401 (the server's settings)
from .params import flat_params, layout_of, set_flat_params, trainable
from .perturb import BlockTable
from .compact import ReportEncoding, wire_size
from .protocol import ClientReport, RoundTask, model_version, wire_bytes
from .rows import local_step, step_gradient


@dataclass
class ClientUpdate:
    client: int
    weight: float  # aggregation weight: the server's SampleCount.weight, never a report's claim
    gradient: np.ndarray | None = None  # FedSGD
    weights: np.ndarray | None = None  # FedAvg: the client's final local weights
    loss: float | None = None  # the client's loss at the global weights on its first batch
    bytes_up: int = 0  # what the client uploaded for it (timing fields excluded: reproducible)

    @property
    def vector(self) -> np.ndarray:
        return self.gradient if self.gradient is not None else self.weights


@dataclass
class RoundLog:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # client -> reason


@dataclass(frozen=True)
class SampleCount:
    """What the server expects a report's ``num_samples`` to be, and the weight it gives the client.

    ``exact``: the server knows the client's data (its shard of the server's dataset: simulation,
    ``--demo-data``, Flower ``client-data = "shard"``) and scheduled ``expected`` samples, the only
    accepted claim. Otherwise the device brings its own data and ``expected`` is the most a task can
    use (batch size x local steps): any claim in [1, expected] is accepted and every such client
    weighs the same. Either way the weight is the server's number, not the report's."""

    expected: int
    exact: bool = True

    @property
    def weight(self) -> float:
        return float(self.expected)

    def check(self, report: ClientReport) -> None:
        """ValueError naming the claim and the bound unless ``report.num_samples`` is what the server expects."""
        n = report.num_samples
        if self.exact and n != self.expected:
            raise ValueError(f"num_samples: the report claims {n} samples, the server scheduled {self.expected}")
        if not self.exact and not 1 <= n <= self.expected:
            raise ValueError(f"num_samples: the report claims {n} samples, a task uses at most {self.expected} "
                             "(batch size x local steps)")


class Strategy:
    """Hooks of the round loop. Subclasses override ``local_update`` (how a client's per-step
    gradients become its update), ``apply`` (how the folded update changes the model) and
    ``aggregate`` (how the per-client vectors become one)."""

    name = "base"
    local_steps = 1
    field = "gradient"  # the ClientUpdate field this strategy aggregates

    def local_update(self, task: RoundTask, w0: np.ndarray, gradient_at) -> np.ndarray:
        """The client's update vector from ``gradient_at(step, weights)``, the (clipped) gradient of
        local step ``step`` at ``weights``: estimated from loss scalars (BAFFLE, on the client and
        again when the server decodes) or exact (the backprop baseline)."""
        raise NotImplementedError

    def apply(self, server: "Server", updates: list[ClientUpdate]) -> None:
        raise NotImplementedError

    def aggregate(self, updates: list[ClientUpdate], attr: str) -> np.ndarray:
        """Fold the clients' ``attr`` vectors (gradient or weights) into one: the weighted mean."""
        return self.weighted_mean(updates, attr)

    @staticmethod
    def weighted_mean(updates: list[ClientUpdate], attr: str) -> np.ndarray:
        total = sum(u.weight for u in updates)
        return sum((u.weight / total) * getattr(u, attr).astype(np.float64) for u in updates)


class FedSGD(Strategy):
    """Each client estimates the gradient on one batch; the server averages and steps."""

    name = "fedsgd"

    def local_update(self, task, w0, gradient_at):
        return gradient_at(0, w0)

    def apply(self, server, updates):
        g = torch.from_numpy(self.aggregate(updates, "gradient").astype(np.float32))
        offset = 0
        for p in server.params:
            p.grad = g[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        server.optimizer.step()
        server.optimizer.zero_grad(set_to_none=True)


class FedAvg(Strategy):
    """Each client runs ``local_steps`` SGD steps on estimated gradients; the server replays them
    from the uploaded scalars (regenerating the same noise) and averages the local weights."""

    name = "fedavg"
    field = "weights"

    def __init__(self, local_steps: int):
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        self.local_steps = local_steps

    def local_update(self, task, w0, gradient_at):
        w = np.array(w0, dtype=np.float32)
        for s in range(task.local_steps):
            w = local_step(task, w, gradient_at(s, w))
        return w

    def apply(self, server, updates):
        server.set_flat(self.aggregate(updates, "weights").astype(np.float32))


class CoordinateMedian(Strategy):
    """Aggregate hook: the coordinate-wise median of the client vectors (unweighted).
    Mixed in before FedSGD/FedAvg: ``class MedianFedSGD(CoordinateMedian, FedSGD)``."""

    def aggregate(self, updates, attr):
        return np.median(np.stack([getattr(u, attr).astype(np.float64) for u in updates]), axis=0)


class TrimmedMean(Strategy):
    """Aggregate hook: per coordinate, drop the ``floor(trim * n)`` lowest and highest client
    values and average the rest (unweighted). ``trim`` in [0, 0.5)."""

    trim = 0.1

    def aggregate(self, updates, attr):
        stack = np.sort(np.stack([getattr(u, attr).astype(np.float64) for u in updates]), axis=0)
        cut = min(math.floor(self.trim * len(updates)), (len(updates) - 1) // 2)
        return stack[cut: len(updates) - cut].mean(axis=0)


class MedianFedSGD(CoordinateMedian, FedSGD):
    name = "fedsgd+median"


class TrimmedMeanFedSGD(TrimmedMean, FedSGD):
    name = "fedsgd+trimmed-mean"


class MedianFedAvg(CoordinateMedian, FedAvg):
    name = "fedavg+median"


class TrimmedMeanFedAvg(TrimmedMean, FedAvg):
    name = "fedavg+trimmed-mean"


class ReplayGuard:
    """One round's memory of accepted reports. Refuses a second report for the same (round,
    client) and a report whose loss values are a byte-exact copy of one already accepted (a
    replayed or cloned upload). Reports of earlier rounds are refused before this by
    ``ClientReport.check_against`` (their round and model version differ)."""

    def __init__(self):
        self.clients: set[tuple[int, int]] = set()
        self.digests: dict[str, int] = {}  # content hash -> client that sent it first

    @staticmethod
    def digest(report: ClientReport) -> str:
        h = hashlib.sha256(report.losses.tobytes())
        h.update(b"|")
        h.update(report.base_losses.tobytes())
        return h.hexdigest()

    def admit(self, report: ClientReport) -> str | None:
        """Record ``report``; return why it must be rejected, or None if it is new."""
        key = (report.round, report.client)
        if key in self.clients:
            return f"duplicate: a report for round {report.round} from client {report.client} was already accepted"
        d = self.digest(report)
        if d in self.digests:
            return f"replay: losses are identical to client {self.digests[d]}'s report (sha256 {d[:12]})"
        self.clients.add(key)
        self.digests[d] = report.client
        return None


class EMA:
    """Exponential moving average of the weights (torch_ema semantics, as in the reference):
    decay_t = min(decay, (1 + t) / (10 + t)) for the t-th update."""

    def __init__(self, flat: torch.Tensor, decay: float):
        self.shadow = flat.clone()
        self.decay = decay
        self.updates = 0

    def update(self, flat: torch.Tensor) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        self.shadow.mul_(d).add_(flat, alpha=1 - d)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, s: dict) -> None:
        self.shadow, self.updates, self.decay = s["shadow"].clone(), int(s["updates"]), float(s["decay"])


class Server:
    def __init__(self, model: nn.Module, strategy: Strategy, config: OptimConfig = OptimConfig()):
        self.model = model
        self.strategy = strategy
        self.config = config
        self.params = trainable(model)
        self.dim = sum(p.numel() for p in self.params)
        opt = config.optimizer
        if opt is OptimizerName.ADAM:
            self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=config.betas,
                                              weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.milestones), gamma=config.gamma)
        self.ema = EMA(self.flat(), config.ema_decay) if config.ema_decay else None
        self.quant_table = None  # the current int8 bundle's quant.QuantTable (int8-step runtimes)
        self.blocks = BlockTable.from_layout(layout_of(model))  # block noise: the partition eps_k is drawn on
        self.report_encoding = ReportEncoding.COMPACT  # what ``bytes_up`` counts (Federation: the run's encoding)

    def flat(self) -> torch.Tensor:
        return flat_params(self.model)

    def set_flat(self, flat: np.ndarray) -> None:
        set_flat_params(self.model, torch.from_numpy(np.asarray(flat, dtype=np.float32)))

    def version(self) -> str:
        return model_version(flat_params(self.model).numpy())

    def make_task(self, round_: int, client: int, **task_fields) -> RoundTask:
        return RoundTask(round=round_, client=client, local_steps=self.strategy.local_steps,
                         local_lr=self.config.local_lr, clip=self.config.clip, model_version=self.version(),
                         **task_fields)

    def update(self, task: RoundTask, weight: float, gradient_at, *, w0: np.ndarray | None = None,
               loss: float | None = None, bytes_up: int = 0) -> ClientUpdate:
        """A client's update, as the strategy builds it from per-step gradients starting at ``w0``
        (default: the global weights, which the task was made for)."""
        vec = self.strategy.local_update(task, self.flat().numpy() if w0 is None else w0, gradient_at)
        return ClientUpdate(task.client, weight, loss=loss, bytes_up=bytes_up, **{self.strategy.field: vec})

    def decode(self, task: RoundTask, report: ClientReport | ClientUpdate | Exception,
               samples: SampleCount | None = None) -> ClientUpdate | str:
        """Validate and decode one client's answer: the update, or the reason it is rejected.
        Pure with respect to the server state, so clients can be decoded in parallel. A
        ``ClientUpdate`` is an in-process device's exact update (the backprop baseline).
        ``samples``: the server's expectation of the client's sample count, and its weight
        (None: equal weights, 1 each); the report's ``num_samples`` must match it."""
        weight = 1.0 if samples is None else samples.weight
        if isinstance(report, Exception):
            return f"client failed: {type(report).__name__}: {report}"
        if isinstance(report, ClientUpdate):
            update = dataclasses.replace(report, weight=weight)
        elif not isinstance(report, ClientReport):
            return f"not a ClientReport: {type(report).__name__}"
        else:
            try:
                report.check_against(task)
                if samples is not None:
                    samples.check(report)
                update = self.update(task, weight, self._estimate(task, report),
                                     loss=self._loss(task, report),
                                     bytes_up=self.report_bytes(report))
            except ValueError as e:
                return str(e)
        if not np.all(np.isfinite(update.vector)):
            return "decoded update is not finite"
        return update

    def report_bytes(self, report: ClientReport) -> int:
        """The upload of ``report`` in the run's encoding (compact: exact; JSON: without its timing field)."""
        if self.report_encoding is ReportEncoding.COMPACT:
            return wire_size(report)
        return wire_bytes(dataclasses.replace(report, seconds=0.0))

    def _estimate(self, task: RoundTask, report: ClientReport):
        """``gradient_at(step, weights)`` decoded from the report's scalars (same noise regenerated)."""
        per = task.losses_per_step

        def gradient_at(s: int, w: np.ndarray) -> np.ndarray:
            base = float(report.base_losses[s]) if report.base_losses.size else None
            return step_gradient(task, s, report.losses[s * per:(s + 1) * per], base, w.size,
                                 table=self.quant_table, weights=w, blocks=self.blocks)
        return gradient_at

    @staticmethod
    def _loss(task: RoundTask, report: ClientReport) -> float:
        """L(w): the base loss, or for the central scheme the mean of L(w+d), L(w-d) (= L(w) + O(sigma^2))."""
        return float(report.base_losses[0] if report.base_losses.size else report.losses[:2 * task.k].mean())

    def accept(self, task: RoundTask, answer: ClientReport | ClientUpdate | Exception, log: RoundLog, *,
               decoded: ClientUpdate | str | None = None, guard: ReplayGuard | None = None) -> ClientUpdate | None:
        """``decode`` the answer (or take its ``decoded`` form when decoding ran in parallel), refuse a
        replayed report (``guard``) and record the outcome in ``log``; a bad report is skipped, never raised."""
        out = self.decode(task, answer) if decoded is None else decoded
        reason = out if isinstance(out, str) else (
            guard.admit(answer) if guard is not None and isinstance(answer, ClientReport) else None)
        if reason is not None:
            log.rejected[task.client] = reason
            return None
        log.accepted.append(task.client)
        return out

    def apply(self, updates: list[ClientUpdate], log: RoundLog) -> bool:
        """Fold the valid updates into the model; a round with none leaves the model unchanged."""
        if not updates:
            return False
        self.strategy.apply(self, updates)
        return True

    def end_epoch(self) -> None:
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.flat())

    def eval_weights(self) -> torch.Tensor:
        """The weights evaluation uses: the EMA if enabled and updated at least once."""
        return self.ema.shadow if self.ema is not None and self.ema.updates else self.flat()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.ema is not None and s.get("ema") is not None:
            self.ema.load_state_dict(s["ema"])


_STRATEGIES: dict[tuple[str, Aggregate], type[Strategy]] = {
    ("fedsgd", Aggregate.MEAN): FedSGD, ("fedsgd", Aggregate.MEDIAN): MedianFedSGD,
    ("fedsgd", Aggregate.TRIMMED_MEAN): TrimmedMeanFedSGD,
    ("fedavg", Aggregate.MEAN): FedAvg, ("fedavg", Aggregate.MEDIAN): MedianFedAvg,
    ("fedavg", Aggregate.TRIMMED_MEAN): TrimmedMeanFedAvg,
}


def make_strategy(name: str, *, local_steps: int = 1, aggregate: Aggregate | str = Aggregate.MEAN,
                  trim: float = 0.1) -> Strategy:
    try:
        agg = Aggregate(aggregate)
    except ValueError:
        raise ValueError(f"unknown aggregate {aggregate!r}; known: {[a.value for a in Aggregate]}") from None
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    if (name, agg) not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: fedsgd, fedavg")
    cls = _STRATEGIES[(name, agg)]
    strategy = cls(local_steps) if issubclass(cls, FedAvg) else cls()
    if isinstance(strategy, TrimmedMean):
        strategy.trim = trim
    return strategy


def evaluate_weights(model: nn.Module, flat: torch.Tensor, x: np.ndarray, y: np.ndarray,
                     batch: int = 1024) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` with weights ``flat``, in one pass over ``x``
    (restores the model's own weights)."""
    keep = flat_params(model)
    set_flat_params(model, flat)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = model(torch.from_numpy(x[i:i + batch]))
            target = torch.from_numpy(y[i:i + batch])
            correct += int((logits.argmax(1) == target).sum())
            loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    set_flat_params(model, keep)
    n = max(1, len(y))
    return correct / n, loss / n


def accuracy(model: nn.Module, flat: torch.Tensor, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    """Top-1 accuracy of ``model`` with weights ``flat`` (restores the model's own weights)."""
    return evaluate_weights(model, flat, x, y, batch)[0]


__all__ = ["Server", "Strategy", "FedSGD", "FedAvg", "CoordinateMedian", "TrimmedMean", "Aggregate",
           "ReplayGuard", "OptimConfig", "ClientUpdate", "RoundLog", "make_strategy", "accuracy", "evaluate_weights",
           "model_version"]
