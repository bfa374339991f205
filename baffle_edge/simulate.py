"""One-process federated training: the reference server plus C simulated clients.

``train(config, out_dir)`` runs the schedule, writes ``metrics.json``, ``curves.png`` and
``checkpoint.pt`` (atomically, every ``checkpoint_every`` rounds and at the end) and can resume
from that checkpoint bit-identically: every random choice is a pure function of the seed and
the round, and the checkpoint holds all optimizer/EMA/schedule state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import __version__
from . import compact, downloads
from .attackers import byzantine_clients, garbage_report  # noqa: F401 (simulation's attackers)
from .block_draw import BUDGET_K_CAP, BlockDraw, BlockDrawPolicy
from .client import Batch
from .config import Method, TrainConfig, rounds_per_epoch, run_choices
from .data import Dataset, load_dataset, partition
from .device import DeviceSettings, SessionCache, answer, batch_schedule, open_session
from .estimator import clip_inf
from .models import ModelConfig, build_model, default_norm
from .params import flat_grad, layout_of, set_flat_params
from .perturb import NoiseKind
from .protocol import ClientReport, Domain, RoundTask, Scheme, wire_bytes
from .server import ClientUpdate, ReplayGuard, RoundLog, SampleCount, Server, evaluate_weights, make_strategy


def model_config(cfg: TrainConfig, data: Dataset) -> ModelConfig:
    return ModelConfig(cfg.model, data.in_channels, data.image_size, data.num_classes, cfg.activation,
                       cfg.norm if cfg.norm is not None else default_norm(cfg.model))


@dataclass
class RoundMetrics:
    """One round's row of metrics.json (``evaluate`` adds the test figures on evaluation rounds)."""

    round: int  # 1-based: rounds done after this one
    train_loss: float | None  # mean loss of the accepted clients at the global weights (first batch)
    clients_accepted: int
    rejected: dict[str, str]  # client id -> reason
    absent: list[int]  # clients that did not answer before the deadline
    skipped: bool  # below quorum: the model was left unchanged
    applied: bool  # the server changed the model
    bytes_up: int  # accepted uploads (BAFFLE: report JSON without timing; backprop: dense float32)
    bytes_down: int  # tasks + float32 weights to every client; int8-step FedSGD: a lean device's download (LeanLedger)
    seconds: float  # wall time of the round

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Federation:
    """The fixed parts of a run: data, partition, model, server; rounds are run by ``step``."""

    def __init__(self, cfg: TrainConfig, *, data: Dataset | None = None):
        self.cfg = cfg
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        self.parts = partition(self.data.y_train, cfg.clients, scheme=cfg.partition, alpha=cfg.alpha,
                               seed=cfg.seed)
        self.model_cfg = model_config(cfg, self.data)
        self.model = build_model(self.model_cfg, seed=cfg.seed)
        self.layout = layout_of(self.model)
        self.server = Server(self.model, make_strategy(cfg.strategy, local_steps=cfg.local_steps,
                                                       aggregate=cfg.aggregate, trim=cfg.trim), cfg.optim)
        self.server.report_encoding = cfg.report_encoding
        self._local = threading.local()  # one simulated device (model or session) per worker thread
        self.pool = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="client")
        self.rpe = rounds_per_epoch(cfg, self.data)
        self.byzantine = byzantine_clients(cfg.clients, cfg.byzantine, seed=cfg.seed)
        self._setup_runtime()

    # --- the client runtime: a torch model, or a bundle exported (and refreshed) by the server ---
    def _setup_runtime(self) -> None:
        choices = run_choices(self.cfg)
        self.runtime_info, self.domain, self.noise = choices.runtime, choices.domain, choices.noise
        self.baseline, self.refresh_every = choices.baseline, choices.refresh_every
        self.device_settings = DeviceSettings.from_config(self.cfg)
        self.k, self.forward_budget = choices.k, choices.forward_budget  # the budget (if any) sets K below
        self.block_draw: BlockDraw | None = None
        if self.noise is NoiseKind.BLOCK:
            from baffle_edge.runtimes.torch_incremental import block_macs
            mc = self.model_cfg
            full, per = block_macs(self.model, mc.image_size, mc.in_channels, rule=self.runtime_info.block_forward)
            self.block_draw = BlockDraw(self.cfg.block_draw, self.server.blocks, per / full, self.domain)
        if self.forward_budget is not None:
            self._budget_k()
        self.bundle_dir: Path | None = None
        self.bundle_generation = 0
        self.lean = downloads.LeanLedger()  # bytes_down of lean int8 devices
        self.refresh_weights: torch.Tensor | None = None  # the weights the current bundle was exported from
        if self.runtime_info.artifact == "bundle" and self.cfg.method is Method.BAFFLE:
            import atexit
            import shutil
            import tempfile
            self._workdir = Path(tempfile.mkdtemp(prefix="baffle-bundle-"))
            atexit.register(shutil.rmtree, self._workdir, ignore_errors=True)
            self.refresh_bundle(self.server.flat())

    def refresh_bundle(self, weights: torch.Tensor) -> None:
        """Export the runtime's bundle from ``weights`` (deterministic: same weights, same bundle)."""
        from baffle_edge.export.bundle import ExportConfig, export_bundle
        fmt = self.runtime_info.format
        self.bundle_generation += 1
        path = self._workdir / f"bundle-{self.bundle_generation}"
        model = build_model(self.model_cfg, seed=self.cfg.seed)
        set_flat_params(model, weights)
        meta = export_bundle(model, self.model_cfg, self.data, path, ExportConfig(formats=(fmt,), seed=self.cfg.seed,
                                                                                  target=self.cfg.target),
                             source=f"train refresh {self.bundle_generation}")
        if self.bundle_dir is not None:
            import shutil
            shutil.rmtree(self.bundle_dir, ignore_errors=True)
        self.bundle_dir = path
        self.refresh_weights = weights.clone()
        if self.domain is Domain.INT8_STEP:
            from baffle_edge.quant import QuantTable
            self.server.quant_table = QuantTable.from_json(meta["formats"][fmt]["quantization"])

    def maybe_refresh(self, round_: int) -> None:
        if self.bundle_dir is not None and round_ > 0 and round_ % self.refresh_every == 0:
            self.refresh_bundle(self.server.flat())

    def batches(self, client: int, round_: int) -> list[Batch]:
        """Client ``client``'s batches of round ``round_`` (device.batch_schedule over its shard)."""
        idx = batch_schedule(self.parts[client], round_=round_, local_steps=self.server.strategy.local_steps,
                             client=client, batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        return [Batch(self.data.x_train[i], self.data.y_train[i]) for i in idx]

    def samples(self, task: RoundTask, *, exact: bool = True) -> SampleCount:
        """The samples the server scheduled for ``task`` (its client's shard, as ``batches`` walks it), or
        with ``exact=False`` (devices with their own data) the most a task can use: the client's weight."""
        b = self.cfg.batch_size
        per_step = min(b, len(self.parts[task.client])) if exact else b
        return SampleCount(task.local_steps * per_step, exact=exact)

    @property
    def k_bound(self) -> int:
        """The most perturbations a round of this run asks a client for (the gateway sizes its report limit
        by it): K, or with an adaptive draw under a forward budget the cap ``BlockDraw.k_for_budget`` keeps."""
        if self.forward_budget is None or self.block_draw.policy is not BlockDrawPolicy.ADAPTIVE:
            return self.k
        d = self.block_draw
        size_k = max(1, int((self.forward_budget - 1) / float(d.blocks.sizes @ d.cost / d.blocks.dim)))
        size_k = max(1, size_k // 2) if self.cfg.scheme is Scheme.CENTRAL else size_k
        return max(self.k, int(BUDGET_K_CAP * size_k))

    def _budget_k(self) -> None:
        """K of a forward budget under the current block draw (its expected row cost on this runtime)."""
        self.k = self.block_draw.k_for_budget(self.forward_budget, central=self.cfg.scheme is Scheme.CENTRAL)

    def task(self, round_: int, client: int) -> RoundTask:
        c = self.cfg
        return self.server.make_task(round_, client, seed=c.seed, k=self.k, sigma=c.sigma, scheme=c.scheme,
                                     noise=self.noise, noise_scope=c.noise_scope, domain=self.domain,
                                     estimator=c.int8_estimator, baseline=self.baseline,
                                     block_weights=self.block_draw.weights if self.block_draw else None,
                                     max_block_steps=c.int8_block_steps)

    def _session(self):
        """This worker thread's simulated device (reopened when the server refreshes the bundle)."""
        loc = self._local
        if getattr(loc, "sessions", None) is None:
            loc.sessions = SessionCache()

        def make():
            artifact = (self.bundle_dir if self.runtime_info.artifact == "bundle"
                        else build_model(self.model_cfg, seed=self.cfg.seed))
            return open_session(self.device_settings, artifact)
        self.last_session = loc.sessions.get(self.bundle_generation, make)
        return self.last_session

    def perturbations_per_call(self) -> dict | None:
        """What the simulated devices evaluate per runtime call: the P asked for, the P used, and
        auto-P's calibration (measured at the first batch or read from the cache; runtimes/batching.py)."""
        s = getattr(self, "last_session", None)
        if s is None:
            return None
        cal = getattr(s, "calibration", None)
        return {"requested": self.cfg.perturbations_per_call, "p": int(s.perturbations_per_call),
                "calibration": cal.to_json() if cal is not None else None}

    def baffle_client(self, task: RoundTask, batches: list[Batch], *, weights: np.ndarray | None = None):
        """What a device does: evaluate the task's perturbed losses at the global weights (or at
        the round's snapshot ``weights``, so a straggler never sees a later model)."""
        w = self.server.flat().numpy() if weights is None else weights
        report = answer(task, self._session(), batches, weights=w, runtime=self.cfg.runtime)
        # compact reports: the server sees what a compact device sends (train = serve with such devices)
        return compact.roundtrip(report) if self.cfg.report_encoding is compact.ReportEncoding.COMPACT else report

    def bp_client(self, task: RoundTask, batches: list[Batch], *, weights: np.ndarray) -> ClientUpdate:
        """The float baseline as a device: exact (clipped) backprop gradients on the same batches,
        folded into an update by the strategy exactly as decoded BAFFLE estimates are. Simulation
        only: it uploads a dense update (counted as such) and its loss at the global weights."""
        loc = self._local
        if getattr(loc, "bp_model", None) is None:
            loc.bp_model = build_model(self.model_cfg, seed=self.cfg.seed)
        m, losses = loc.bp_model, []

        def gradient_at(step: int, w: np.ndarray) -> np.ndarray:
            set_flat_params(m, torch.from_numpy(np.asarray(w, dtype=np.float32)))
            m.zero_grad(set_to_none=True)
            b = batches[step]
            loss = nn.functional.cross_entropy(m(torch.from_numpy(b.x)), torch.from_numpy(b.y))
            loss.backward()
            losses.append(float(loss.detach()))
            return clip_inf(flat_grad(m).numpy().astype(np.float64), task.clip)

        weight = sum(len(b.y) for b in batches)
        update = self.server.update(task, weight, gradient_at, w0=weights, bytes_up=4 * self.server.dim)
        update.loss = losses[0]
        return update

    def device(self, weights: np.ndarray) -> Callable:
        """The simulated device of this run's method for the round's global ``weights``."""
        client = self.bp_client if self.cfg.method is Method.BP else self.baffle_client
        return lambda task, batches: client(task, batches, weights=weights)

    def gather_local(self, tasks: list[RoundTask], device: Callable, round_: int) -> list[tuple]:
        """Run ``device(task, batches)`` for every task on the worker threads and close the round
        at ``round_timeout``. Returns ``(task, answer or exception)`` for the clients that answered
        in time, in client order; the simulated Byzantine clients' reports are replaced by garbage."""
        def one(task: RoundTask):
            try:
                report = device(task, self.batches(task.client, round_))
            except Exception as e:  # a failing device is data, not a crash
                report = e
            if task.client in self.byzantine and isinstance(report, ClientReport):
                report = garbage_report(report, seed=self.cfg.seed)
            return report

        futures = [self.pool.submit(one, t) for t in tasks]
        wait_futures(futures, timeout=self.cfg.round_timeout)
        answered = []
        for task, fut in zip(tasks, futures):
            if fut.done():
                answered.append((task, fut.result()))
            else:
                fut.cancel()  # not started: never runs; a running straggler's answer is dropped
        return answered

    def step(self, round_: int, *, client_fn: Callable | None = None,
             on_update: Callable | None = None,
             gather: Callable[[list[RoundTask], np.ndarray], Iterable[tuple]] | None = None) -> "RoundMetrics":
        """Run one round; return its metrics (without evaluation).

        ``client_fn(task, batches)`` replaces the simulated device; ``gather(tasks, weights)``
        replaces the whole collection (e.g. Flower messaging: send the tasks and the global float32
        weights to the devices) and returns ``(task, report or exception)`` pairs
        for the answers that arrived before the deadline (duplicates possible; absent clients are
        missing). The round is applied only if at least ``quorum * clients`` reports are valid.
        Each client weighs what ``samples`` says (the server's count, never the report's); a gather
        whose ``devices_own_data`` is true (devices bring their own data) gets equal weights.

        ``on_update(round_, client, weights, batches, update)`` (optional) sees every accepted
        client update before the server applies the round: the global float32 weights it was
        computed at, the client's batches and the decoded ``ClientUpdate`` (verification uses it
        to compare estimates with exact gradients)."""
        self.maybe_refresh(round_)
        start = time.perf_counter()
        weights = self.server.flat().numpy().copy()
        if self.block_draw is not None and self.forward_budget is not None:
            self._budget_k()  # an adaptive draw changes the expected cost of a row
        tasks = [self.task(round_, c) for c in range(self.cfg.clients)]
        if gather is None:
            answered = self.gather_local(tasks, client_fn or self.device(weights), round_)
        else:
            answered = list(gather(tasks, weights))
        exact = not getattr(gather, "devices_own_data", False)  # the transport says whose data the devices use
        decoded = self.pool.map(lambda pair: self.server.decode(*pair, samples=self.samples(pair[0], exact=exact)),
                                answered)
        log, updates, guard = RoundLog(), [], ReplayGuard()
        for (task, reply), out in zip(answered, decoded):
            update = self.server.accept(task, reply, log, decoded=out, guard=guard)
            if update is None:
                continue
            if self.block_draw is not None and isinstance(reply, ClientReport):
                self.block_draw.observe(task, reply)
            if on_update is not None:
                on_update(round_, task.client, weights, self.batches(task.client, round_), update)
            updates.append(update)
        heard = {t.client for t, _ in answered}
        quorum_met = len(updates) >= max(1, math.ceil(self.cfg.quorum * self.cfg.clients))
        applied = self.server.apply(updates, log) if quorum_met else False
        if self.block_draw is not None:
            self.block_draw.end_round()
        if (round_ + 1) % self.rpe == 0:
            self.server.end_epoch()
        losses = [u.loss for u in updates]
        return RoundMetrics(
            round=round_ + 1, train_loss=float(np.mean(losses)) if losses else None,
            clients_accepted=len(log.accepted), rejected={str(k): v for k, v in log.rejected.items()},
            absent=[t.client for t in tasks if t.client not in heard], skipped=not quorum_met, applied=applied,
            bytes_up=sum(u.bytes_up for u in updates), bytes_down=self.bytes_down(tasks, weights,
                                                                     lean=getattr(gather, "lean_downloads", gather is None)),
            seconds=time.perf_counter() - start)

    def client_compute(self) -> dict:
        """Model compute of one client round (per local step), counted in MACs of conv and linear
        layers: full forwards, or for block noise the incremental rows as the runtime evaluates them
        (runtimes/torch_incremental.block_macs). Backprop: one forward + a backward (about 2 forwards)."""
        from baffle_edge.runtimes.torch_incremental import block_macs
        mc = self.model_cfg
        full, _ = block_macs(self.model, mc.image_size, mc.in_channels)
        if self.cfg.method is Method.BP:
            fe = 3.0
        else:
            rows = self.k * (2 if self.cfg.scheme is Scheme.CENTRAL else 1)
            if self.noise is NoiseKind.BLOCK:
                fe = 1.0 + rows * self.block_draw.expected_cost()
            else:
                fe = float(rows + (0 if self.cfg.scheme is Scheme.CENTRAL else 1))
        return {"forward_equivalents": fe, "macs": fe * full * self.cfg.batch_size, "full_forward_macs": full}

    def bytes_down(self, tasks: list[RoundTask], weights: np.ndarray, *, lean: bool) -> int:
        """What the round's clients download: BAFFLE's task messages and the float32 weights, or, where the transport
        has lean downloads (in-process and the gateway; not Flower), for an int8-step FedSGD run what a lean device
        downloads (downloads.LeanLedger: the integers' zlib delta, and the bundle's runtime files, zlib'd against
        the last generation, when the bundle was re-exported)."""
        if self.cfg.method is not Method.BAFFLE:
            return 4 * self.server.dim * len(tasks)
        table = self.server.quant_table
        if not lean or table is None or self.server.strategy.local_steps != 1 or self.bundle_dir is None:
            return sum(4 * self.server.dim + wire_bytes(t) for t in tasks)
        lean = self.lean.integers(downloads.int_payload(table, weights)) + self.lean.bundle(
            downloads.read_runtime_files(self.bundle_dir, self.runtime_info.format))
        return sum(lean + wire_bytes(t) for t in tasks)

    def evaluate(self) -> dict:
        d, s = self.data, self.server
        raw = s.flat()
        acc, loss = evaluate_weights(self.model, raw, d.x_test, d.y_test)
        shown = s.eval_weights()  # the EMA once it has been updated, else the raw weights themselves
        acc_eval = acc if torch.equal(shown, raw) else \
            evaluate_weights(self.model, shown, d.x_test, d.y_test)[0]
        return {"test_accuracy": acc_eval, "test_accuracy_raw": acc, "test_loss": loss}


def run_versions() -> dict:
    import onnx  # noqa: F401  (core dependency; version recorded for reproducibility)
    return {"baffle_edge": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _resolved(cfg: TrainConfig, *, before_block_default: bool = False) -> TrainConfig:
    """``cfg`` with its open noise and K filled in as they run (so a resume compares what ran). A checkpoint
    written before block noise became the default (no "estimator" mark) ran its domain's isotropic noise."""
    if before_block_default and cfg.noise is None:
        from .config import isotropic_noise
        cfg = dataclasses.replace(cfg, noise=isotropic_noise(cfg.runtime))
    ch = run_choices(cfg)
    return dataclasses.replace(cfg, noise=ch.noise, k=None if ch.forward_budget is not None else ch.k,
                               forward_budget=ch.forward_budget)


def save_checkpoint(path: Path, fed: Federation, next_round: int, history: list[dict]) -> None:
    state = {"format": 1, "next_round": next_round, "config": json.dumps(fed.cfg.to_json()),
             "server": fed.server.state_dict(), "history": json.dumps(history),
             "refresh_weights": fed.refresh_weights,
             "block_draw": json.dumps(fed.block_draw.state()) if fed.block_draw is not None else None,
             "estimator": 1,  # the config's open noise / k resolve by config.run_choices (block default)
             "lean": fed.lean.state()}  # what lean devices hold (bytes_down of the next round)
    _atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path) -> dict:
    """Load a run checkpoint safely (``weights_only=True``: no arbitrary unpickling)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable baffle-edge checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != 1 or "server" not in state:
        raise ValueError(f"{path}: not a baffle-edge run checkpoint (missing format/server fields)")
    return state


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, client_fn: Callable | None = None,
          gather: Callable | None = None, on_round: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a federated training run and write its folder. Returns the metrics dict.

    ``stop_after`` ends the process-level loop after that many rounds of this call (tests use it to
    simulate an interrupted run); ``client_fn(task, batches)`` replaces the simulated device and
    ``gather(tasks, weights)`` the whole collection of reports (``Federation.step``; Flower and the HTTP
    gateway use it). A gather with a ``bind(federation)`` method is handed the run's Federation once,
    before the first round (Flower ships the round's bundle with each task; the gateway serves its
    bundle files and demo data). ``on_round(row)`` sees every finished round's metrics row, evaluation
    included (on ``resume`` first the restored rows): the gateway's live status uses it."""
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    history: list[dict] = []
    start_round = 0
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        state = load_checkpoint(ckpt)
        saved = _resolved(TrainConfig.from_json(json.loads(state["config"])), before_block_default="estimator" not in state)
        free = ("rounds", "eval_every")  # neither changes the trajectory (evaluation draws no randomness)
        now = _resolved(cfg)
        if dataclasses.replace(saved, **{n: getattr(now, n) for n in free}) != now:
            diff = [f.name for f in dataclasses.fields(cfg) if getattr(saved, f.name) != getattr(now, f.name)
                    and f.name not in free]
            raise ValueError(f"--resume: the run in {out} used different settings ({', '.join(diff)}: it ran "
                             f"{saved.noise.value} noise, {'K = %d' % saved.k if saved.k else 'a forward budget'})")
        fed = Federation(cfg)
        fed.server.load_state_dict(state["server"])
        if fed.bundle_dir is not None and state.get("refresh_weights") is not None:
            fed.refresh_bundle(state["refresh_weights"])  # the bundle the interrupted run was using
        if state.get("lean") is not None:
            fed.lean = downloads.LeanLedger(**state["lean"])
        if fed.block_draw is not None and state.get("block_draw"):
            fed.block_draw.load_state(json.loads(state["block_draw"]))
        start_round, history = int(state["next_round"]), json.loads(state["history"])
    else:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue it "
                                  "or choose another --out")
        fed = Federation(cfg)
    if gather is not None and hasattr(gather, "bind"):
        gather.bind(fed)  # the transport may need the run's model and bundle (Flower ships them with each task)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"config": cfg.to_json(), "versions": run_versions(), "parameters": fed.server.dim,
               "rounds_per_epoch": fed.rpe, "rounds": history,
               # what the config's open choices resolved to (config.run_choices: the default is block noise)
               "estimator": {"noise": fed.noise.value, "k": fed.k, "forward_budget": fed.forward_budget,
                             "baseline": fed.baseline.value}}
    end = cfg.rounds if stop_after is None else min(cfg.rounds, start_round + stop_after)
    bar = _progress(range(start_round, end), progress, cfg)
    for row in history if on_round is not None else ():
        on_round(row)
    for r in bar:
        row = fed.step(r, client_fn=client_fn, gather=gather).to_json()
        if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
            row.update(fed.evaluate())
        history.append(row)
        if on_round is not None:
            on_round(row)
        if hasattr(bar, "set_postfix"):
            last = next((h for h in reversed(history) if "test_accuracy" in h), {})
            bar.set_postfix(loss=f"{row['train_loss'] or float('nan'):.3f}",
                            acc=f"{last.get('test_accuracy', float('nan')):.3f}")
        metrics["perturbations_per_call"] = fed.perturbations_per_call()
        if (placed := getattr(getattr(fed, "last_session", None), "placement", None)) is not None:
            metrics["placement"] = placed.to_json()  # a plugin EP: where the train graph ran, by MACs (docs/npu.md)
        if (r + 1) % cfg.checkpoint_every == 0 or r + 1 == end:
            save_checkpoint(ckpt, fed, r + 1, history)
            _write_metrics(out, metrics)
    metrics["final"] = _final(history, cfg)
    _write_metrics(out, metrics)
    if history:
        from .plots import plot_curves
        plot_curves({cfg.method.value: history}, out / "curves.png", title=f"{cfg.model} on {cfg.dataset}")
    return metrics


def _final(history: list[dict], cfg: TrainConfig) -> dict:
    evals = [h for h in history if "test_accuracy" in h]
    last = evals[-1] if evals else {}
    return {"rounds_done": len(history), "complete": len(history) >= cfg.rounds,
            "test_accuracy": last.get("test_accuracy"), "test_accuracy_raw": last.get("test_accuracy_raw"),
            "bytes_up_total": sum(h["bytes_up"] for h in history),
            "bytes_down_total": sum(h["bytes_down"] for h in history),
            "seconds_total": sum(h["seconds"] for h in history),
            "rejected_reports": sum(len(h["rejected"]) for h in history),
            "absent_reports": sum(len(h.get("absent", ())) for h in history),
            "skipped_rounds": sum(bool(h.get("skipped")) for h in history)}


def _write_metrics(out: Path, metrics: dict) -> None:
    _atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=1)))


def _progress(it, enabled: bool, cfg: TrainConfig):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=f"{cfg.method.value} {cfg.model}/{cfg.dataset}", unit="round", initial=it[0] if len(it) else 0,
                total=it[-1] + 1 if len(it) else 0, dynamic_ncols=True)
