"""How a BAFFLE Flower run is configured: ``FlowerConfig`` (how the ServerApp talks to SuperNodes)
and the app's run config (``[tool.flwr.app.config]``, docs/flower.md) read into a TrainConfig and
a FlowerConfig.

Where a client's data comes from (run config ``client-data``):

- ``node`` (deployments): the SuperNode's own file, ``--node-config 'data=PATH partition-id=C'``
  (formats: ``nodedata.load_node_data``). The server never holds or sends client data; it asks
  each new node for its ``partition-id`` and sends client C's task to that node (nodes without one
  take the remaining clients in node-id order). A client whose node is gone is absent.
- ``shard`` (simulation): shard ``task.client`` of the configured dataset, the split
  ``baffle-edge train`` uses, so a Flower run reproduces the in-process run exactly.

Either way the node draws its batch of round r from its samples exactly as ``data.batch_indices``
does in-process, so node files written by ``nodedata.write_shards`` reproduce the in-process run
too (tests/test_flower_deploy.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..simulate import TrainConfig


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


def config_from_run_config(run_config: dict) -> tuple[TrainConfig, FlowerConfig]:
    """Read the ``[tool.flwr.app.config]`` keys (docs/flower.md): ``train-config`` (a TrainConfig
    JSON, as in metrics.json ``config``; missing fields take defaults), ``client-data``, ``out``,
    ``min-nodes``, ``node-wait``, ``resume``."""
    from ..simulate import TrainConfig
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
    from ..simulate import TrainConfig
    try:
        return TrainConfig.from_json(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"train-config: {e}") from None
