"""BAFFLE on Flower: a ``ServerApp`` driving the reference server and a ``ClientApp`` running
``baffle_edge.client.run_task`` on a runtime chosen by name.

The round loop is ``simulate.train`` / ``Federation.step`` (checkpoints, quorum, deadline, robust
aggregation, metrics); Flower only carries the messages, through the ``gather`` hook:

    down  (message_type "train", one per client)
          ArrayRecord  "weights": {"weights": float32 global weights}
          ConfigRecord "task":    {"task": RoundTask JSON, "train-config": TrainConfig JSON}
    up    ArrayRecord  "losses":  {"losses": K (x steps) float64, "base_losses": float64}
          ConfigRecord "report":  {"header": the ClientReport's other fields as JSON}

Never a gradient and never the noise: the client regenerates eps_k from the task's seed. The
reply is parsed with ``ClientReport.from_dict`` (validated) and then checked like any report.

Data: a client evaluates on shard ``task.client`` of the configured dataset (the same split as
``baffle-edge train``), which is what makes a Flower run reproduce the in-process run. A real
deployment would replace ``FlowerDevice.batches`` with the device's own data.

Entry points: ``baffle_edge.flower_app:server_app`` / ``:client_app`` for ``flwr run`` and
SuperLink/SuperNode deployments (docs/flower.md), ``baffle-edge flower simulate`` for Flower's
simulation engine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .protocol import ClientReport, RoundTask
from .simulate import Federation, TrainConfig, garbage_report, train

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as e:  # optional extra
    _FLWR_ERROR: ImportError | None = ImportError(
        f"the Flower integration needs flwr ({e}); install it with: pip install 'baffle-edge[flower]'")
else:
    _FLWR_ERROR = None


def require_flwr() -> None:
    if _FLWR_ERROR is not None:
        raise _FLWR_ERROR


MESSAGE_TYPE = "train"


@dataclass(frozen=True)
class FlowerConfig:
    """How the ServerApp talks to SuperNodes (the training itself is a TrainConfig)."""

    min_nodes: int = 1  # wait for this many connected nodes before the first round
    node_wait: float = 600.0  # seconds to wait for them, then fail with a clear error
    out: str = "runs/flower"  # run folder (metrics.json, checkpoint.pt, curves.png)
    resume: bool = False  # continue the run in `out` from its checkpoint

    def __post_init__(self):
        if self.min_nodes < 1 or not self.node_wait > 0:
            raise ValueError(f"min_nodes must be >= 1 and node_wait > 0, got {self.min_nodes}, {self.node_wait}")


# ----------------------------------------------------------------------------------- messages

def task_message(task: RoundTask, weights: np.ndarray, cfg: TrainConfig, node: int) -> "Message":
    content = RecordDict({
        "weights": ArrayRecord({"weights": Array(np.ascontiguousarray(weights, dtype=np.float32))}),
        "task": ConfigRecord({"task": task.to_json(), "train-config": json.dumps(cfg.to_json())}),
    })
    return Message(content, dst_node_id=node, message_type=MESSAGE_TYPE)


def report_content(report: ClientReport) -> "RecordDict":
    header = {k: v for k, v in report.to_dict().items() if k not in ("losses", "base_losses")}
    return RecordDict({
        "losses": ArrayRecord({"losses": Array(report.losses), "base_losses": Array(report.base_losses)}),
        "report": ConfigRecord({"header": json.dumps(header)}),
    })


def parse_reply(reply: "Message") -> ClientReport | Exception:
    """A reply as a validated ClientReport, or the exception saying why it is not one."""
    if reply.has_error():
        return RuntimeError(f"client error {reply.error.code}: {reply.error.reason}")
    return parse_report_content(reply.content)


def parse_report_content(content: "RecordDict") -> ClientReport | Exception:
    try:
        header = json.loads(content["report"]["header"])
        if not isinstance(header, dict):
            raise ValueError("report header: expected a JSON object")
        arrays = content["losses"]
        header["losses"], header["base_losses"] = arrays["losses"].numpy(), arrays["base_losses"].numpy()
        return ClientReport.from_dict(header)
    except ValueError as e:
        return e
    except Exception as e:  # missing records, wrong types, undecodable arrays: a malformed reply
        return ValueError(f"malformed reply ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------------- server

class FlowerGather:
    """``Federation.step``'s ``gather`` hook over a Flower Grid: one message per task, replies
    collected until all arrived or ``round_timeout`` passed. Client c goes to the c-th node (by
    node id, cyclically if there are fewer nodes than clients)."""

    def __init__(self, grid: "Grid", cfg: TrainConfig, flower: FlowerConfig):
        self.grid, self.cfg, self.flower = grid, cfg, flower

    def nodes(self) -> list[int]:
        deadline = time.monotonic() + self.flower.node_wait
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.flower.min_nodes:
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} Flower node(s) connected after {self.flower.node_wait:.0f} s; "
                                   f"need {self.flower.min_nodes}")
            time.sleep(0.2)

    def __call__(self, tasks: list[RoundTask], weights: np.ndarray) -> list[tuple]:
        nodes = self.nodes()
        node_of = {t.client: nodes[i % len(nodes)] for i, t in enumerate(tasks)}
        by_node: dict[int, list[RoundTask]] = {}
        for t in tasks:
            by_node.setdefault(node_of[t.client], []).append(t)
        messages = [task_message(t, weights, self.cfg, node_of[t.client]) for t in tasks]
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
        answered = []
        for reply in replies:
            report = parse_reply(reply)
            # the task a reply answers: the one its report names, among those sent to that node
            sent = by_node.get(reply.metadata.src_node_id, [])
            claimed = report.client if isinstance(report, ClientReport) else None
            task = next((t for t in sent if t.client == claimed), sent[0] if len(sent) == 1 else None)
            if task is not None:
                answered.append((task, report))
        order = {t.client: i for i, t in enumerate(tasks)}
        return sorted(answered, key=lambda a: order[a[0].client])  # reproducible: client order


def run_server(grid: "Grid", cfg: TrainConfig, flower: FlowerConfig, *, progress: bool = False) -> dict:
    """The ServerApp's body: the reference training loop with Flower as the transport."""
    return train(cfg, flower.out, resume=flower.resume, progress=progress, gather=FlowerGather(grid, cfg, flower))


def make_server_app(cfg: TrainConfig, flower: FlowerConfig, *, result: dict | None = None) -> "ServerApp":
    """A ServerApp bound to ``cfg`` (simulation); ``result['metrics']`` receives the metrics."""
    require_flwr()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        metrics = run_server(grid, cfg, flower)
        if result is not None:
            result["metrics"] = metrics

    return app


def config_from_run_config(run_config: dict) -> tuple[TrainConfig, FlowerConfig]:
    """Read the ``[tool.flwr.app.config]`` keys (docs/flower.md): ``train-config`` (a TrainConfig
    JSON, as in metrics.json ``config``; missing fields take defaults), ``out``, ``min-nodes``,
    ``node-wait``, ``resume``."""
    raw = run_config.get("train-config", "{}")
    try:
        given = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"train-config: not valid JSON ({e})") from None
    if not isinstance(given, dict):
        raise ValueError(f"train-config: expected a JSON object, got {type(given).__name__}")
    full = TrainConfig().to_json()
    unknown = set(given) - set(full)
    if unknown:
        raise ValueError(f"train-config: unknown fields {sorted(unknown)}")
    full.update({k: v for k, v in given.items() if k != "optim"})
    full["optim"].update(given.get("optim", {}))
    cfg = _typed_config(full)
    flower = FlowerConfig(min_nodes=int(run_config.get("min-nodes", cfg.clients)),
                          node_wait=float(run_config.get("node-wait", 600.0)),
                          out=str(run_config.get("out", "runs/flower")), resume=bool(run_config.get("resume", False)))
    return cfg, flower


def _typed_config(d: dict) -> TrainConfig:
    """TrainConfig from its JSON form (every enum restored by TrainConfig.from_json)."""
    try:
        return TrainConfig.from_json(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"train-config: {e}") from None


# ----------------------------------------------------------------------------------- client

class FlowerDevice:
    """One simulated device per (process, training config): its data shard and runtime session
    (``Federation`` supplies both, so batches match ``baffle-edge train`` exactly)."""

    _cache: dict[str, "FlowerDevice"] = {}
    _lock = threading.Lock()

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.fed = Federation(dataclasses.replace(cfg, workers=1))

    @classmethod
    def for_config(cls, text: str) -> "FlowerDevice":
        with cls._lock:
            if text not in cls._cache:
                cls._cache.clear()  # one run at a time per process
                cls._cache[text] = cls(_typed_config(json.loads(text)))
            return cls._cache[text]

    def run(self, task: RoundTask, weights: np.ndarray) -> ClientReport:
        from .server import model_version
        if weights.size != self.fed.server.dim:
            raise ValueError(f"weights: expected {self.fed.server.dim} values, got {weights.size}")
        self.fed.server.set_flat(weights)  # the device's copy of the global model
        if model_version(self.fed.model) != task.model_version:
            raise ValueError(f"weights do not hash to the task's model_version {task.model_version!r}")
        batches = self.fed.batches(task.client, task.round)
        report = self.fed.baffle_client(task, batches, weights=weights)
        if task.client in self.fed.byzantine:  # simulated attacker (TrainConfig.byzantine)
            report = garbage_report(report, seed=self.cfg.seed)
        return report


def client_train(msg: "Message", context: "Context") -> "Message":
    """The ClientApp's ``train`` handler: run the task, reply with the loss scalars only."""
    cfg_record = msg.content["task"]
    task = RoundTask.from_json(cfg_record["task"])
    weights = np.asarray(msg.content["weights"]["weights"].numpy(), dtype=np.float32).reshape(-1)
    report = FlowerDevice.for_config(cfg_record["train-config"]).run(task, weights)
    return Message(report_content(report), reply_to=msg)


if _FLWR_ERROR is None:
    client_app = ClientApp()
    client_app.train()(client_train)

    server_app = ServerApp()

    @server_app.main()
    def _server_main(grid: Grid, context: Context) -> None:
        cfg, flower = config_from_run_config(dict(context.run_config))
        run_server(grid, cfg, flower, progress=True)


# ----------------------------------------------------------------------------------- simulation

def simulate(cfg: TrainConfig, flower: FlowerConfig, *, cpus_per_client: float = 1.0,
             total_cpus: int | None = None, verbose: bool = False) -> dict:
    """Run ``cfg`` on Flower's simulation engine with ``cfg.clients`` virtual SuperNodes."""
    require_flwr()
    from flwr.simulation import run_simulation
    import os
    result: dict = {}
    flower = dataclasses.replace(flower, min_nodes=cfg.clients)
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": total_cpus or os.cpu_count() or 1, "log_to_driver": verbose}}
    run_simulation(make_server_app(cfg, flower, result=result), client_app, num_supernodes=cfg.clients,
                   backend_config=backend, verbose_logging=verbose)
    if "metrics" not in result:
        raise RuntimeError("the Flower simulation ended without metrics (see the log above)")
    return result["metrics"]


def cmd_flower_simulate(a: argparse.Namespace) -> int:
    from .cli import config_from_args
    require_flwr()
    cfg = config_from_args(a)
    out = Path(a.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-flower-{cfg.model}-{cfg.dataset}")
    start = time.perf_counter()
    m = simulate(cfg, FlowerConfig(out=str(out), resume=a.resume), cpus_per_client=a.cpus_per_client,
                 verbose=a.verbose)
    wall = time.perf_counter() - start
    f = m["final"]
    print(f"flower: {cfg.clients} clients, {f['rounds_done']} rounds in {wall:.0f} s "
          f"({60 * f['rounds_done'] / wall:.1f} rounds/min incl. start-up; "
          f"{60 * f['rounds_done'] / max(f['seconds_total'], 1e-9):.1f} rounds/min in rounds); "
          f"test accuracy {100 * f['test_accuracy']:.2f}%; {f['rejected_reports']} rejected, "
          f"{f['absent_reports']} absent, {f['skipped_rounds']} skipped rounds -> {out}")
    return 0


def add_parser(subparsers) -> None:
    from .cli import _add_train_args
    p = subparsers.add_parser("flower", help="run BAFFLE on the Flower framework (pip install 'baffle-edge[flower]')",
                              description="Federated BAFFLE over Flower messages; see docs/flower.md for "
                                          "SuperLink/SuperNode deployments.")
    sub = p.add_subparsers(dest="flower_command", metavar="FLOWER_COMMAND", required=True)
    s = sub.add_parser("simulate", help="Flower simulation engine with --clients virtual SuperNodes",
                       description="Train with Flower's simulation engine (Ray): one virtual SuperNode per "
                                   "client. Writes the same OUT/metrics.json as `baffle-edge train`.")
    _add_train_args(s)
    g = s.add_argument_group("flower")
    g.add_argument("--cpus-per-client", type=float, default=1.0,
                   help="Ray CPUs per ClientApp instance; concurrency = cores / this (default: 1)")
    g.add_argument("--verbose", action="store_true", help="Flower and Ray debug logs")
    s.set_defaults(func=cmd_flower_simulate, command="flower simulate")
