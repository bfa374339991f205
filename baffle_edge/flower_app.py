"""BAFFLE on Flower: a ``ServerApp`` driving the reference server and a ``ClientApp`` running
``baffle_edge.client.run_task`` on a runtime chosen by name.

The round loop is ``simulate.train`` / ``Federation.step`` (checkpoints, quorum, deadline, robust
aggregation, metrics); Flower only carries the messages, through the ``gather`` hook:

    query (message_type "query", once per new node; deployments only)
          up: ConfigRecord "node": {"partition-id": int (-1: none), "samples": int}
    down  (message_type "train", one per client)
          ArrayRecord  "weights": {"weights": float32 global weights}
          ConfigRecord "task":    {"task": RoundTask JSON, "train-config": TrainConfig JSON,
                                   "client-data": "node" | "shard"}
          ConfigRecord "model":   {"model-config": ModelConfig JSON, "normalisation": JSON}
          ConfigRecord "bundle":  {file name: bytes}  (bundle runtimes: the round's baffle.json and
                                   the graph the runtime loads; the SuperNode verifies their sha256)
    up    ArrayRecord  "losses":  {"losses": K (x steps) float64, "base_losses": float64}
          ConfigRecord "report":  {"header": the ClientReport's other fields as JSON}

Never a gradient and never the noise: the client regenerates eps_k from the task's seed. The
reply is parsed with ``ClientReport.from_dict`` (validated) and then checked like any report.

Where a client's data comes from (run config ``client-data``):

- ``node`` (deployments): the SuperNode's own file, ``--node-config 'data=PATH partition-id=C'``
  (formats: ``flower_deploy.load_node_data``). The server never holds or sends client data; it
  asks each new node for its ``partition-id`` and sends client C's task to that node (nodes
  without one take the remaining clients in node-id order). A client whose node is gone is absent.
- ``shard`` (simulation): shard ``task.client`` of the configured dataset, the split
  ``baffle-edge train`` uses, so a Flower run reproduces the in-process run exactly.

Either way the node draws its batch of round r from its samples exactly as ``data.batch_indices``
does in-process, so node files written by ``flower_deploy.write_shards`` reproduce the in-process
run too (tests/test_flower_deploy.py).

Entry points: ``baffle_edge.flower_app:server_app`` / ``:client_app`` (the app folder written by
``baffle-edge flower app``), ``baffle-edge flower simulate`` (Flower's simulation runtime).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .protocol import ClientReport, RoundTask

if TYPE_CHECKING:
    from .simulate import TrainConfig

# The ClientApp runs in a fresh process per message in Flower 1.42 deployments, so this module and
# the client path import no torch (that alone would add ~4 s per message); the server side imports
# simulate lazily.

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as e:  # optional extra
    _FLWR_ERROR: ImportError | None = ImportError(
        f"the Flower integration needs flwr ({e}); install it with: pip install 'baffle-edge[flower]'")
else:
    _FLWR_ERROR = None

log = logging.getLogger("baffle_edge.flower")


def require_flwr() -> None:
    if _FLWR_ERROR is not None:
        raise _FLWR_ERROR


MESSAGE_TYPE = "train"
QUERY_TYPE = "query"
LATE_QUERY_WAIT = 5.0  # seconds a round waits for the answers of nodes that joined mid-run
CLIENT_DATA = ("node", "shard")  # see the module docstring


@dataclass(frozen=True)
class FlowerConfig:
    """How the ServerApp talks to SuperNodes (the training itself is a TrainConfig)."""

    min_nodes: int = 1  # wait for this many connected nodes before the first round
    node_wait: float = 600.0  # seconds to wait for them, then fail with a clear error
    out: str = "runs/flower"  # run folder (metrics.json, checkpoint.pt, curves.png)
    resume: bool = False  # continue the run in `out` from its checkpoint
    client_data: str = "shard"  # "node": each SuperNode's own data; "shard": dataset shard (simulation)
    query_timeout: float = 60.0  # seconds a new node has to say which partition it holds
    poll: float = 0.2  # seconds between polls for replies (Flower's send_and_receive sleeps 3 s)

    def __post_init__(self):
        if self.min_nodes < 1 or not self.node_wait > 0 or not self.query_timeout > 0 or not self.poll > 0:
            raise ValueError(f"min-nodes must be >= 1, node-wait, query-timeout and poll > 0; got {self.min_nodes}, "
                             f"{self.node_wait}, {self.query_timeout}, {self.poll}")
        if self.client_data not in CLIENT_DATA:
            raise ValueError(f"client-data must be one of {', '.join(CLIENT_DATA)}; got {self.client_data!r}")


# ----------------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class RoundPayload:
    """What every task message of a round carries besides the task: the model description and,
    for bundle runtimes, the round's bundle files (the server re-exports them every
    ``refresh_every`` rounds)."""

    model: dict  # {"model-config": JSON, "normalisation": JSON}
    bundle: dict  # file name -> bytes (empty for the torch runtime)


def round_payload(fed) -> RoundPayload:
    """The payload for the federation's current model and bundle."""
    d = fed.data
    mc = fed.model_cfg
    model = {"model-config": json.dumps({"name": mc.name, "in_channels": mc.in_channels,
                                         "image_size": mc.image_size, "num_classes": mc.num_classes,
                                         "activation": getattr(mc.activation, "value", mc.activation),
                                         "norm": getattr(mc.norm, "value", mc.norm)}),
             "normalisation": json.dumps({"scale": d.scale, "mean": list(d.mean), "std": list(d.std)})}
    bundle: dict = {}
    if fed.bundle_dir is not None:
        meta_bytes = (fed.bundle_dir / "baffle.json").read_bytes()
        meta = json.loads(meta_bytes)
        files = meta["formats"][fed.runtime_info.format]["files"]
        name = files.get("train") or files["inference"]
        bundle = {"baffle.json": meta_bytes, name: (fed.bundle_dir / name).read_bytes()}
    return RoundPayload(model, bundle)


def task_message(task: RoundTask, weights: np.ndarray, cfg: TrainConfig, node: int, *,
                 payload: RoundPayload | None = None, client_data: str = "shard") -> "Message":
    content = RecordDict({
        "weights": ArrayRecord({"weights": Array(np.ascontiguousarray(weights, dtype=np.float32))}),
        "task": ConfigRecord({"task": task.to_json(), "train-config": json.dumps(cfg.to_json()),
                              "client-data": client_data}),
    })
    if payload is not None:
        content["model"] = ConfigRecord(dict(payload.model))
        if payload.bundle:
            content["bundle"] = ConfigRecord(dict(payload.bundle))
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


def parse_node_info(reply: "Message") -> int | None | Exception:
    """A query reply as the node's partition id (None: the node has none), or why it is not one."""
    if reply.has_error():
        return RuntimeError(f"client error {reply.error.code}: {reply.error.reason}")
    try:
        pid = int(reply.content["node"]["partition-id"])
    except Exception as e:
        return ValueError(f"malformed node description ({type(e).__name__}: {e})")
    return pid if pid >= 0 else None


# ----------------------------------------------------------------------------------- server

class FlowerGather:
    """``Federation.step``'s ``gather`` hook over a Flower Grid: one message per task, replies
    collected until all arrived or ``round_timeout`` passed.

    Which node runs client c: with ``client_data="shard"`` the c-th connected node (by node id,
    cyclically if there are fewer nodes than clients); with ``"node"`` the node holding partition c
    (asked once per node), else a node without a partition id, else nobody (client c is absent)."""

    def __init__(self, grid: "Grid", cfg: TrainConfig, flower: FlowerConfig):
        self.grid, self.cfg, self.flower = grid, cfg, flower
        self.fed = None
        self.partition_of: dict[int, int | None] = {}  # node id -> partition id it holds (None: any)
        self._payload_key: tuple | None = None
        self._payload: RoundPayload | None = None
        self._waited = False
        self._queries: dict[str, tuple[int, float]] = {}  # pending query message id -> (node, sent at)

    def bind(self, fed) -> None:
        """Called by ``simulate.train`` with the run's Federation (its model and bundle)."""
        self.fed = fed

    def payload(self) -> RoundPayload | None:
        if self.fed is None:
            return None
        key = (str(self.fed.bundle_dir), self.fed.bundle_generation)
        if key != self._payload_key:
            self._payload, self._payload_key = round_payload(self.fed), key
        return self._payload

    def nodes(self) -> list[int]:
        """The connected nodes; before the first round, wait until ``min_nodes`` are connected."""
        if self._waited:
            return sorted(self.grid.get_node_ids())
        deadline = time.monotonic() + self.flower.node_wait
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.flower.min_nodes:
                self._waited = True
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} Flower node(s) connected after {self.flower.node_wait:.0f} s; "
                                   f"need {self.flower.min_nodes}")
            time.sleep(0.2)

    def exchange(self, messages: list, timeout: float | None) -> list:
        """Push ``messages`` and pull their replies until all arrived or ``timeout`` passed
        (``Grid.send_and_receive`` does the same but polls every 3 s, a third of a short round)."""
        if not messages:
            return []
        pending = {i for i in self.grid.push_messages(messages) if i}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while pending:
            got = list(self.grid.pull_messages(list(pending)))
            replies.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.flower.poll)
        return replies

    def describe(self, nodes: list[int]) -> None:
        """Ask nodes not seen before which partition they hold (one query message each).

        Before the first round this waits up to ``query_timeout`` for the answers; later (a node
        that joins mid-run) at most ``LATE_QUERY_WAIT`` seconds, so a node that never answers does
        not stall the rounds: its query stays pending (re-sent after ``query_timeout``) and the node
        joins in the round after its answer arrives."""
        now = time.monotonic()
        self._queries = {m: (n, t) for m, (n, t) in self._queries.items() if now - t < self.flower.query_timeout}
        asked = {n for n, _ in self._queries.values()}
        new = [n for n in nodes if n not in self.partition_of and n not in asked]
        if new:
            content = lambda: RecordDict({"query": ConfigRecord({"what": "partition"})})  # noqa: E731
            ids = self.grid.push_messages([Message(content(), dst_node_id=n, message_type=QUERY_TYPE) for n in new])
            self._queries.update({m: (n, now) for m, n in zip(ids, new) if m})
        wait = self.flower.query_timeout if not self.partition_of else min(LATE_QUERY_WAIT, self.flower.query_timeout)
        deadline = now + wait
        while self._queries:
            for reply in self.grid.pull_messages(list(self._queries)):
                self._queries.pop(reply.metadata.reply_to_message_id, None)
                node, info = reply.metadata.src_node_id, parse_node_info(reply)
                if isinstance(info, Exception):
                    log.warning("node %s cannot train (asked again next round): %s", node, info)
                else:
                    self.partition_of[node] = info
                    log.info("node %s holds partition %s", node, "-" if info is None else info)
            if not self._queries or time.monotonic() >= deadline:
                break
            time.sleep(self.flower.poll)

    def assign(self, nodes: list[int]) -> dict[int, int]:
        """client -> node for this round."""
        clients = self.cfg.clients
        if self.flower.client_data == "shard":
            return {c: nodes[c % len(nodes)] for c in range(clients)} if nodes else {}
        self.describe(nodes)
        ready = [n for n in nodes if n in self.partition_of]
        node_of: dict[int, int] = {}
        for n in ready:
            pid = self.partition_of[n]
            if pid is not None and 0 <= pid < clients and pid not in node_of:
                node_of[pid] = n
        spare = [n for n in ready if n not in node_of.values() and self.partition_of[n] is None]
        free = [c for c in range(clients) if c not in node_of]
        node_of.update(zip(free, spare))
        return node_of

    def __call__(self, tasks: list[RoundTask], weights: np.ndarray) -> list[tuple]:
        start = time.monotonic()
        node_of = self.assign(self.nodes())
        payload = self.payload()
        sent = [t for t in tasks if t.client in node_of]
        by_node: dict[int, list[RoundTask]] = {}
        for t in sent:
            by_node.setdefault(node_of[t.client], []).append(t)
        messages = [task_message(t, weights, self.cfg, node_of[t.client], payload=payload,
                                 client_data=self.flower.client_data) for t in sent]
        replies = self.exchange(messages, self.cfg.round_timeout)
        answered = []
        for reply in replies:
            report = parse_reply(reply)
            # the task a reply answers: the one its report names, among those sent to that node
            mine = by_node.get(reply.metadata.src_node_id, [])
            claimed = report.client if isinstance(report, ClientReport) else None
            task = next((t for t in mine if t.client == claimed), mine[0] if len(mine) == 1 else None)
            if task is not None:
                answered.append((task, report))
        order = {t.client: i for i, t in enumerate(tasks)}
        heard = {t.client for t, _ in answered}
        log.info("round %d/%d: %d/%d replies in %.1f s%s", tasks[0].round + 1 if tasks else 0, self.cfg.rounds,
                 len(answered), len(tasks),
                 time.monotonic() - start, f"; absent: {sorted(set(order) - heard)}" if len(heard) < len(tasks) else "")
        return sorted(answered, key=lambda a: order[a[0].client])  # reproducible: client order


def run_server(grid: "Grid", cfg: TrainConfig, flower: FlowerConfig, *, progress: bool = False) -> dict:
    """The ServerApp's body: the reference training loop with Flower as the transport."""
    from .simulate import train
    return train(cfg, flower.out, resume=flower.resume, progress=progress, gather=FlowerGather(grid, cfg, flower))


def config_from_run_config(run_config: dict) -> tuple[TrainConfig, FlowerConfig]:
    """Read the ``[tool.flwr.app.config]`` keys (docs/flower.md): ``train-config`` (a TrainConfig
    JSON, as in metrics.json ``config``; missing fields take defaults), ``client-data``, ``out``,
    ``min-nodes``, ``node-wait``, ``resume``."""
    from .simulate import TrainConfig
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
    optim = given.get("optim", {})
    if not isinstance(optim, dict) or set(optim) - set(full["optim"]):
        raise ValueError(f"train-config: optim must be an object with fields among {sorted(full['optim'])}")
    full.update({k: v for k, v in given.items() if k != "optim"})
    full["optim"].update(optim)
    cfg = _typed_config(full)
    try:
        flower = FlowerConfig(min_nodes=int(run_config.get("min-nodes", cfg.clients)),
                              node_wait=float(run_config.get("node-wait", 600.0)),
                              out=str(run_config.get("out", "runs/flower")), resume=bool(run_config.get("resume", False)),
                              client_data=str(run_config.get("client-data", "shard")),
                              query_timeout=float(run_config.get("query-timeout", 60.0)),
                              poll=float(run_config.get("poll", 0.2)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"run config: {e}") from None
    return cfg, flower


def _typed_config(d: dict) -> TrainConfig:
    """TrainConfig from its JSON form (every enum restored by TrainConfig.from_json)."""
    from .simulate import TrainConfig
    try:
        return TrainConfig.from_json(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"train-config: {e}") from None


# ----------------------------------------------------------------------------------- client

@dataclass(frozen=True)
class ClientSettings:
    """The TrainConfig fields a device uses, read from the task's ``train-config`` JSON without
    importing the server (torch)."""

    runtime: str
    provider: str
    perturbations_per_call: int | str
    seed: int
    batch_size: int
    # shard mode (simulation) only: which shard, as Federation splits the dataset
    dataset: str
    data_dir: str | None
    clients: int
    partition: str
    alpha: float
    byzantine: float

    @classmethod
    def from_json(cls, text: str) -> "ClientSettings":
        try:
            d = json.loads(text)
            return cls(runtime=str(d["runtime"]), provider=str(d["provider"]),
                       perturbations_per_call=d["perturbations_per_call"], seed=int(d["seed"]),
                       batch_size=int(d["batch_size"]), dataset=str(d["dataset"]),
                       data_dir=d["data_dir"], clients=int(d["clients"]), partition=str(d["partition"]),
                       alpha=float(d["alpha"]), byzantine=float(d["byzantine"]))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"task train-config: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class DeviceData:
    """The samples one device trains on: normalised float32 inputs and int64 labels."""

    x: np.ndarray
    y: np.ndarray
    client: int | None  # the shard it is (shard mode), None for a node's own data

    def batches(self, task: RoundTask, cfg: ClientSettings):
        """The batches of ``task`` (one per local step), drawn as ``Federation.batches`` does."""
        from .client import Batch
        from .data import batch_indices
        out = []
        for step in range(task.local_steps):
            idx = batch_indices(np.arange(len(self.y)), task.round * task.local_steps + step, cfg.batch_size,
                                seed=cfg.seed, client=task.client)
            out.append(Batch(self.x[idx], self.y[idx]))
        return out


class Device:
    """A SuperNode's side of a run: its data, its runtime session (per round bundle), caches that
    live as long as the ClientApp process."""

    _lock = threading.Lock()
    _data: dict[tuple, DeviceData] = {}
    _sessions: dict[tuple, object] = {}

    @classmethod
    def shard(cls, cfg: ClientSettings, client: int) -> DeviceData:
        """Shard ``client`` of the configured dataset (simulation; same split as in-process)."""
        from .data import load_dataset, partition
        key = ("shard", cfg.dataset, cfg.data_dir, cfg.seed, cfg.clients, cfg.partition, cfg.alpha, client)
        with cls._lock:
            if key not in cls._data:
                data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
                parts = partition(data.y_train, cfg.clients, scheme=cfg.partition, alpha=cfg.alpha, seed=cfg.seed)
                if len(cls._data) > 64:
                    cls._data.clear()
                cls._data[key] = DeviceData(data.x_train[parts[client]], data.y_train[parts[client]], client)
            return cls._data[key]

    @classmethod
    def node(cls, node_config: dict, model: dict) -> DeviceData:
        """The node's own data (``--node-config data=PATH``), normalised as the server's model expects."""
        from .flower_deploy import load_node_data, normalise
        path = node_config.get("data")
        if not path:
            raise ValueError("this SuperNode has no data: start it with --node-config 'data=PATH' (an .npz with "
                             "x, y or a folder of IDX files; docs/flower.md)")
        key = ("node", str(path), model["normalisation"], model["model-config"])
        with cls._lock:
            if key not in cls._data:
                mc, norm = json.loads(model["model-config"]), json.loads(model["normalisation"])
                x_raw, y = load_node_data(path)
                x = normalise(x_raw, norm, channels=mc["in_channels"], size=mc["image_size"], where=str(path))
                if y.size and (y.min() < 0 or y.max() >= mc["num_classes"]):
                    raise ValueError(f"{path}: labels must be in [0, {mc['num_classes']}), found "
                                     f"{int(y.min())}..{int(y.max())}")
                cls._data.clear()
                cls._data[key] = DeviceData(x, y, None)
            return cls._data[key]

    @classmethod
    def session(cls, cfg: ClientSettings, model: dict, bundle: dict, *, provider: str | None = None):
        """A runtime session for the round: the shipped bundle (verified), or a torch model."""
        from baffle_edge.runtimes import REGISTRY, get_runtime
        from baffle_edge.runtimes.batching import BATCHED_RUNTIMES
        if cfg.runtime not in REGISTRY:
            raise ValueError(f"unknown runtime {cfg.runtime!r}; known: {', '.join(sorted(REGISTRY))}")
        info = REGISTRY[cfg.runtime]
        digest = hashlib.sha256(b"".join(bundle.get(n, b"") for n in sorted(bundle))).hexdigest()
        key = (cfg.runtime, provider or cfg.provider, str(cfg.perturbations_per_call), model["model-config"], digest)
        with cls._lock:
            if key in cls._sessions:
                return cls._sessions[key]
            options = {"provider": provider or cfg.provider} if cfg.runtime.startswith("onnxruntime") else {}
            if cfg.runtime in BATCHED_RUNTIMES:
                options["perturbations_per_call"] = cfg.perturbations_per_call
            rt = get_runtime(cfg.runtime, **options)
            if info.artifact == "bundle":
                if "baffle.json" not in bundle:
                    raise ValueError(f"runtime {cfg.runtime!r} needs a bundle but the task carries none")
                artifact = _unpack_bundle(bundle, digest)
            else:
                from .models import Activation, ModelConfig, Norm, build_model
                mc = json.loads(model["model-config"])
                mc["activation"], mc["norm"] = Activation(mc["activation"]), Norm(mc["norm"])
                artifact = build_model(ModelConfig(**mc), seed=cfg.seed)
            session = rt.load(artifact)
            cls._sessions.clear()  # one round's bundle at a time
            cls._sessions[key] = session
            return session


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")


_UNPACKED: dict[str, Path] = {}  # bundle digest -> this process's private copy


def _unpack_bundle(files: dict, digest: str) -> Path:
    """Write shipped bundle files into a private folder of this process, removed when it exits
    (names checked; contents verified by the runtime against baffle.json's sha256 when it loads
    them). Private, not shared: SuperNodes on one machine run ClientApp processes concurrently."""
    if digest in _UNPACKED and (_UNPACKED[digest] / "baffle.json").exists():
        return _UNPACKED[digest]
    import atexit
    import shutil
    d = Path(tempfile.mkdtemp(prefix="baffle-flower-bundle-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    for name, data in files.items():
        if not _SAFE_NAME.fullmatch(name) or not isinstance(data, bytes):
            raise ValueError(f"bundle file {name!r}: not a plain file name with bytes")
        (d / name).write_bytes(data)
    for old in _UNPACKED.values():  # one round's bundle at a time
        shutil.rmtree(old, ignore_errors=True)
    _UNPACKED.clear()
    _UNPACKED[digest] = d
    return d


def weights_version(weights: np.ndarray) -> str:
    """``server.model_version`` computed with numpy only (the device needs no torch)."""
    return hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float32).tobytes()).hexdigest()[:16]


def client_train(msg: "Message", context: "Context") -> "Message":
    """The ClientApp's ``train`` handler: run the task, reply with the loss scalars only."""
    from .client import run_task
    rec = msg.content["task"]
    task = RoundTask.from_json(rec["task"])
    cfg = ClientSettings.from_json(rec["train-config"])
    weights = np.asarray(msg.content["weights"]["weights"].numpy(), dtype=np.float32).reshape(-1)
    if weights_version(weights) != task.model_version:
        raise ValueError(f"weights do not hash to the task's model_version {task.model_version!r}")
    model = dict(msg.content["model"])
    bundle = dict(msg.content["bundle"]) if "bundle" in msg.content else {}
    node_config = dict(context.node_config)
    mode = rec.get("client-data", "shard")
    if mode == "node":
        data = Device.node(node_config, model)
    elif mode == "shard":
        data = Device.shard(cfg, task.client)
    else:
        raise ValueError(f"client-data must be one of {', '.join(CLIENT_DATA)}; got {mode!r}")
    provider = node_config.get("provider") if mode == "node" else None
    session = Device.session(cfg, model, bundle, provider=str(provider) if provider else None)
    report = run_task(task, session, data.batches(task, cfg), weights=weights, runtime=cfg.runtime)
    if mode == "shard" and cfg.byzantine > 0:
        from .simulate import byzantine_clients, garbage_report
        if task.client in byzantine_clients(cfg.clients, cfg.byzantine, seed=cfg.seed):
            report = garbage_report(report, seed=cfg.seed)  # simulated attacker (TrainConfig.byzantine)
    return Message(report_content(report), reply_to=msg)


def client_query(msg: "Message", context: "Context") -> "Message":
    """The ClientApp's ``query`` handler: which partition this node holds and how many samples."""
    from .flower_deploy import load_node_data
    node_config = dict(context.node_config)
    path = node_config.get("data")
    if not path:
        raise ValueError("this SuperNode has no data: start it with --node-config 'data=PATH' (docs/flower.md)")
    _, y = load_node_data(path)
    pid = node_config.get("partition-id", -1)
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        raise ValueError(f"--node-config partition-id must be an integer, got {pid!r}") from None
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "samples": int(y.size)})}), reply_to=msg)


if _FLWR_ERROR is None:
    client_app = ClientApp()
    client_app.train()(client_train)
    client_app.query()(client_query)

    server_app = ServerApp()

    @server_app.main()
    def _server_main(grid: Grid, context: Context) -> None:
        cfg, flower = config_from_run_config(dict(context.run_config))
        if not log.handlers:  # our progress lines only (the root logger at INFO would log every HTTP poll)
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s baffle-edge: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        log.info("BAFFLE run: %d clients, %d rounds, runtime %s, client data: %s -> %s", cfg.clients, cfg.rounds,
                 cfg.runtime, flower.client_data, flower.out)
        run_server(grid, cfg, flower, progress=False)


def add_parser(subparsers) -> None:
    """``baffle-edge flower ...`` (the commands live in flower_deploy.py)."""
    from .flower_deploy import add_parser as add
    add(subparsers)

