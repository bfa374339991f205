"""The Flower app folder ``flwr run`` submits: a ``pyproject.toml`` naming BAFFLE's ServerApp and
ClientApp and holding the run config (``baffle-edge flower app``; docs/flower.md step 8).
"""
from __future__ import annotations

import json
from pathlib import Path

from .runconfig import FlowerConfig, config_from_run_config

APP_NAME = "baffle-flower"

PYPROJECT = """\
# A Flower app running BAFFLE (written by `baffle-edge flower app`; docs/flower.md).
# Needs baffle-edge[flower] installed wherever the ServerApp and the ClientApps run.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "BAFFLE (backpropagation-free federated learning) on Flower"
license = "Apache-2.0"
dependencies = ["baffle-edge[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "baffle-edge"

[tool.flwr.app.components]
serverapp = "baffle_edge.flower.app:server_app"
clientapp = "baffle_edge.flower.app:client_app"

[tool.flwr.app.config]
# The training run, as a TrainConfig in JSON (the fields of metrics.json "config"; missing fields
# take their defaults; `baffle-edge train --help` documents each one).
train-config = '{train_config}'
# Where each client's data comes from: "node" = the SuperNode's own file, given when it starts
# (--node-config 'data="PATH" partition-id=C'); "shard" = shard C of the dataset above (simulation).
client-data = "{client_data}"
# Run folder on the machine running the ServerApp (the SuperLink's): metrics.json, checkpoint.pt.
# A relative path is relative to the folder the SuperLink was started in.
out = {out}
# Wait for this many SuperNodes before round 1, at most node-wait seconds.
min-nodes = {min_nodes}
node-wait = {node_wait}
# Continue the run in `out` from its checkpoint.
resume = false
"""


def write_app(directory: str | Path, *, train_config: dict | None = None, client_data: str = "node",
              out: str = "runs/flower", min_nodes: int | None = None, node_wait: float = 600.0,
              force: bool = False) -> Path:
    """Write a Flower app folder (``pyproject.toml`` + a README) and return its path.

    ``train_config`` is a (partial) TrainConfig JSON; it is validated here so a typo fails now,
    not on the SuperLink."""
    d = Path(directory)
    if (d / "pyproject.toml").exists() and not force:
        raise FileExistsError(f"{d / 'pyproject.toml'} exists; pass --force to replace it")
    if client_data not in ("node", "shard"):
        raise ValueError(f"client-data must be 'node' or 'shard', got {client_data!r}")
    given = json.dumps(train_config or {}, separators=(",", ":"))
    if "'" in given:
        raise ValueError("train-config must not contain single quotes (it is written as a TOML literal string)")
    cfg, _ = config_from_run_config({"train-config": given})  # ValueError on unknown fields / bad values
    min_nodes = cfg.clients if min_nodes is None else min_nodes
    FlowerConfig(min_nodes=min_nodes, node_wait=node_wait)  # validates
    d.mkdir(parents=True, exist_ok=True)
    text = PYPROJECT.format(name=APP_NAME, train_config=given, client_data=client_data,
                            out=json.dumps(Path(out).as_posix()), min_nodes=min_nodes, node_wait=node_wait)
    (d / "pyproject.toml").write_text(text)
    (d / "README.md").write_text(
        "# BAFFLE on Flower\n\nWritten by `baffle-edge flower app`. Run it with `flwr run . CONNECTION`\n"
        "against a SuperLink (docs/flower.md in baffle-edge). Edit `[tool.flwr.app.config]` in\n"
        "pyproject.toml, or override at submit time: `flwr run . CONN --run-config 'out=\"runs/x\"'`.\n")
    return d
