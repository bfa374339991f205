"""What BAFFLE's Flower messages carry, and how the two ends build and read them:

    query (message_type "query", once per new node; deployments only)
          up: ConfigRecord "node": {"partition-id": int (-1: none), "samples": int}
    down  (message_type "train", one per client)
          ArrayRecord  "weights": {"weights": float32 global weights}
          ConfigRecord "task":    {"task": RoundTask JSON, "train-config": TrainConfig JSON,
                                   "client-data": "node" | "shard"}
          ConfigRecord "model":   {"model-config": ModelConfig JSON, "normalisation": JSON}
          ConfigRecord "bundle":  {file name: bytes}  (bundle runtimes: the round's baffle.json and
                                   the graph the runtime loads; the SuperNode verifies their sha256)
    up    ConfigRecord "report":  {"compact": the compact report's bytes (compact.py; the run's default
                                   ``report_encoding``)}
          or (``report_encoding = "json"``)
          ArrayRecord  "losses":  {"losses": K (x steps) float64, "base_losses": float64}
          ConfigRecord "report":  {"header": the ClientReport's other fields as JSON}

Never a gradient and never the noise: the client regenerates eps_k from the task's seed. The
reply is parsed with ``compact.decode`` or ``ClientReport.from_dict`` (validated) and then checked like
any report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import compact
from ..protocol import ClientReport, RoundTask

if TYPE_CHECKING:
    from ..simulate import TrainConfig

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
except ImportError as e:  # optional extra
    _FLWR_ERROR: ImportError | None = ImportError(
        f"the Flower integration needs flwr ({e}); install it with: pip install 'baffle-edge[flower]'")
else:
    _FLWR_ERROR = None


def require_flwr() -> None:
    if _FLWR_ERROR is not None:
        raise _FLWR_ERROR


MESSAGE_TYPE = "train"
QUERY_TYPE = "query"


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


def query_message(node: int) -> "Message":
    """The question a node is asked once: which partition it holds (``parse_node_info`` reads the answer)."""
    return Message(RecordDict({"query": ConfigRecord({"what": "partition"})}), dst_node_id=node,
                   message_type=QUERY_TYPE)


def report_content(report: ClientReport, encoding: compact.ReportEncoding | str = compact.ReportEncoding.JSON
                   ) -> "RecordDict":
    """The reply's records: the compact bytes, or float64 arrays and a JSON header."""
    if compact.ReportEncoding(encoding) is compact.ReportEncoding.COMPACT:
        return RecordDict({"report": ConfigRecord({"compact": compact.encode(report)})})
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
        if "compact" in content["report"]:
            data = content["report"]["compact"]
            if not isinstance(data, bytes):
                raise ValueError(f"compact report: expected bytes, got {type(data).__name__}")
            return compact.decode(data)
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
