"""The device side of the ClientApp: the ``train`` and ``query`` handlers, a Flower adapter over
``baffle_edge.device`` (settings from the task's train config, the session, the batch schedule and the
answer), plus what only Flower has: a node's own data or a dataset shard, and bundles shipped in messages.

The ClientApp runs in a fresh process per message in Flower 1.42 deployments, so this module
imports no torch (that alone would add ~4 s per message); torch loads only for ``--runtime torch``.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from ..attackers import byzantine_clients, garbage_report
from ..config import TrainConfig
from ..device import DeviceSettings, SessionCache, answer, model_artifact, open_session, task_batches
from ..protocol import RoundTask
from .nodedata import load_node_data, normalise
from .records import report_content
from .runconfig import CLIENT_DATA

if TYPE_CHECKING:
    from flwr.app import Context


@dataclass(frozen=True)
class DeviceData:
    """The samples one device trains on: normalised float32 inputs and int64 labels."""

    x: np.ndarray
    y: np.ndarray
    client: int | None  # the shard it is (shard mode), None for a node's own data


def train_config(text: str) -> TrainConfig:
    """The run's TrainConfig from the task's ``train-config`` JSON (torch-free: baffle_edge.config)."""
    try:
        return TrainConfig.from_json(json.loads(text))
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"task train-config: {type(e).__name__}: {e}") from None


class Device:
    """A SuperNode's side of a run: its data and its runtime session (per round bundle), cached as
    long as the ClientApp process lives."""

    _lock = threading.Lock()
    _data: dict[tuple, DeviceData] = {}
    sessions = SessionCache()

    @classmethod
    def shard(cls, cfg: TrainConfig, client: int) -> DeviceData:
        """Shard ``client`` of the configured dataset (simulation; same split as in-process)."""
        from ..data import load_dataset, partition
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
    def session(cls, settings: DeviceSettings, model: dict, bundle: dict):
        """A runtime session for the round: the shipped bundle (verified), or a torch model."""
        digest = hashlib.sha256(b"".join(bundle.get(n, b"") for n in sorted(bundle))).hexdigest()

        def make():
            if settings.info.artifact != "bundle":
                return open_session(settings, model_artifact(settings, json.loads(model["model-config"])))
            if "baffle.json" not in bundle:
                raise ValueError(f"runtime {settings.runtime!r} needs a bundle but the task carries none")
            return open_session(settings, _unpack_bundle(bundle, digest))
        return cls.sessions.get((settings, model["model-config"], digest), make)


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


def client_train(msg: "Message", context: "Context") -> "Message":
    """The ClientApp's ``train`` handler: run the task, reply with the loss scalars only."""
    rec = msg.content["task"]
    task = RoundTask.from_json(rec["task"])
    cfg = train_config(rec["train-config"])
    weights = msg.content["weights"]["weights"].numpy()
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
    settings = DeviceSettings.from_config(cfg, provider=str(provider) if provider else None)
    session = Device.session(settings, model, bundle)
    report = answer(task, session, task_batches(data.x, data.y, task, settings), weights=weights,
                    runtime=settings.runtime)
    if mode == "shard" and task.client in byzantine_clients(cfg.clients, cfg.byzantine, seed=cfg.seed):
        report = garbage_report(report, seed=cfg.seed)  # simulated attacker (TrainConfig.byzantine)
    return Message(report_content(report, cfg.report_encoding), reply_to=msg)


def client_query(msg: "Message", context: "Context") -> "Message":
    """The ClientApp's ``query`` handler: which partition this node holds and how many samples."""
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
