"""BAFFLE over Flower: the simulation engine reproduces the in-process run exactly."""
import dataclasses
import json

import numpy as np
import pytest

from baffle_edge.simulate import TrainConfig, train

flwr = pytest.importorskip("flwr", reason="flwr not installed (pip install 'baffle-edge[flower]')")

from baffle_edge import flower_app  # noqa: E402
from baffle_edge.protocol import ClientReport  # noqa: E402

CFG = TrainConfig(clients=10, k=3, rounds=3, eval_every=1, checkpoint_every=3, workers=2)


def strip(metrics):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["rounds"]]


def test_flower_simulation_matches_in_process_train(tmp_path):
    local = train(CFG, tmp_path / "local", progress=False)
    fl = flower_app.simulate(CFG, flower_app.FlowerConfig(out=str(tmp_path / "flower")))
    assert [r["clients_accepted"] for r in fl["rounds"]] == [10, 10, 10]
    assert strip(fl) == strip(local)  # train loss, test accuracy, bytes: identical per round
    assert json.loads((tmp_path / "flower" / "metrics.json").read_text())["final"]["complete"]


def test_reply_round_trip_and_malformed_replies():
    from flwr.app import ConfigRecord, RecordDict
    r = ClientReport(round=1, client=2, losses=[1.0, 2.0], base_losses=[1.5], num_samples=32, model_version="ab")
    content = flower_app.report_content(r)
    assert set(content) == {"losses", "report"}  # loss scalars and a header: never a gradient
    back = flower_app.parse_report_content(content)
    assert np.array_equal(back.losses, r.losses) and back.client == 2
    bad = RecordDict({"report": ConfigRecord({"header": "[1"})})
    assert isinstance(flower_app.parse_report_content(bad), ValueError)
    content["report"]["header"] = json.dumps({"round": 1})
    assert isinstance(flower_app.parse_report_content(content), ValueError)


def test_run_config_parsing():
    cfg, fl = flower_app.config_from_run_config({"train-config": json.dumps({"clients": 4, "k": 7,
                                                                             "optim": {"lr": 0.05}}),
                                                 "out": "x", "min-nodes": 2})
    assert (cfg.clients, cfg.k, cfg.optim.lr, fl.min_nodes, fl.out) == (4, 7, 0.05, 2, "x")
    assert cfg.aggregate.value == "mean" and dataclasses.replace(cfg) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        flower_app.config_from_run_config({"train-config": '{"kk": 1}'})
    with pytest.raises(ValueError, match="backward"):
        flower_app.config_from_run_config({"train-config": '{"scheme": "backward"}'})
