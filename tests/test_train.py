import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from baffle_edge.cli import main
from baffle_edge.simulate import Federation, Method, TrainConfig, load_checkpoint, train

SMALL = TrainConfig(clients=3, k=6, rounds=6, eval_every=2, checkpoint_every=3, workers=2)


def strip(metrics):
    """Metrics without wall-clock fields, for exact comparison."""
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["rounds"]]
    final = {k: v for k, v in metrics["final"].items() if k != "seconds_total"}
    return rows, final


def test_run_folder_contents(tmp_path):
    m = train(SMALL, tmp_path / "run", progress=False)
    for f in ("metrics.json", "curves.png", "checkpoint.pt"):
        assert (tmp_path / "run" / f).stat().st_size > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"]["rounds_done"] == 6 and saved["parameters"] == 26_730
    row = saved["rounds"][-1]
    assert {"round", "test_accuracy", "train_loss", "bytes_up", "bytes_down", "seconds"} <= set(row)
    assert 0 < row["bytes_up"] < 3 * 400  # 3 clients, K=6 scalars each: a few hundred bytes
    assert row["bytes_down"] > 3 * 4 * 26_730  # the weights go down every round
    assert m["final"]["test_accuracy"] is not None


def test_same_seed_same_metrics_and_workers_do_not_matter(tmp_path):
    a = train(SMALL, tmp_path / "a", progress=False)
    b = train(dataclasses.replace(SMALL, workers=1), tmp_path / "b", progress=False)
    assert strip(a) == strip(b)
    c = train(dataclasses.replace(SMALL, seed=1), tmp_path / "c", progress=False)
    assert strip(a) != strip(c)


def test_interrupted_and_resumed_run_is_identical(tmp_path):
    full = train(SMALL, tmp_path / "full", progress=False)
    part = train(SMALL, tmp_path / "part", progress=False, stop_after=4)  # checkpoint at round 3 and 4
    assert part["final"]["rounds_done"] == 4 and not part["final"]["complete"]
    resumed = train(SMALL, tmp_path / "part", progress=False, resume=True)
    assert strip(full) == strip(resumed)
    sd_full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["server"]["model"]
    sd_res = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["server"]["model"]
    assert all(np.array_equal(sd_full[k].numpy(), sd_res[k].numpy()) for k in sd_full)


def test_resume_with_other_settings_or_missing_checkpoint_fails(tmp_path):
    train(dataclasses.replace(SMALL, rounds=2), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="k"):
        train(dataclasses.replace(SMALL, k=7), tmp_path / "r", progress=False, resume=True)
    with pytest.raises(FileNotFoundError):
        train(SMALL, tmp_path / "none", progress=False, resume=True)
    with pytest.raises(FileExistsError):
        train(SMALL, tmp_path / "r", progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(p)


def test_bad_reports_are_skipped_and_the_round_completes(tmp_path):
    fed_cfg = dataclasses.replace(SMALL, clients=5, rounds=1)  # one round: `honest` holds the initial weights
    honest = Federation(fed_cfg)

    def device(task, batches):
        good = honest.baffle_client(task, batches)
        c = task.client
        if c == 0:
            return dataclasses.replace(good, losses=good.losses[:-1])  # short
        if c == 1:
            return dataclasses.replace(good, losses=np.full_like(good.losses, np.nan))  # NaN
        if c == 2:
            raise ConnectionError("device vanished")
        if c == 3:
            return dataclasses.replace(good, round=task.round + 1)  # wrong round
        return good

    m = train(fed_cfg, tmp_path / "bad", progress=False, client_fn=device)
    rows = m["rounds"]
    assert all(r["clients_accepted"] == 1 and r["applied"] for r in rows)
    rej = rows[0]["rejected"]
    assert "losses" in rej["0"] and "non-finite" in rej["1"] and "vanished" in rej["2"] and "round" in rej["3"]
    assert m["final"]["rejected_reports"] == 4


def test_a_report_at_other_weights_is_refused_by_the_device(tmp_path):
    """device.answer checks the weights against the task's model_version: a simulated device handed
    other weights (a stale model) refuses the task instead of reporting losses at the wrong point."""
    fed = Federation(dataclasses.replace(SMALL, clients=1, rounds=1))
    task = fed.task(0, 0)
    stale = fed.server.flat().numpy() + np.float32(1e-3)
    with pytest.raises(ValueError, match="model_version"):
        fed.baffle_client(task, fed.batches(0, 0), weights=stale)


def test_all_clients_bad_leaves_model_unchanged(tmp_path):
    cfg = dataclasses.replace(SMALL, rounds=1)
    fed = Federation(cfg)
    before = fed.server.flat().clone()
    row = fed.step(0, client_fn=lambda t, b: (_ for _ in ()).throw(RuntimeError("down")))
    assert not row.applied and row.clients_accepted == 0
    assert np.array_equal(before.numpy(), fed.server.flat().numpy())


@pytest.mark.parametrize("variant", [dict(method=Method.BP), dict(strategy="fedavg", local_steps=2),
                                     dict(strategy="fedavg", local_steps=2, method=Method.BP),
                                     dict(scheme="central", noise="rademacher", noise_scope="shared"),
                                     dict(partition="dirichlet", alpha=0.3)])
def test_variants_run_and_learn_something(tmp_path, variant):
    cfg = dataclasses.replace(SMALL, rounds=4, **variant)
    m = train(cfg, tmp_path / "v", progress=False)
    assert m["final"]["rounds_done"] == 4 and m["final"]["rejected_reports"] == 0
    assert all(r["train_loss"] is not None and np.isfinite(r["train_loss"]) for r in m["rounds"])


@pytest.mark.parametrize("noise", ["gaussian", "block"])  # isotropic, and block (the default on torch)
def test_fedavg_server_replay_matches_the_client_trajectory(noise):
    """The server rebuilds a FedAvg client's local weights from its scalars alone."""
    from baffle_edge.runtimes.torch_runtime import TorchSession

    from baffle_edge.client import run_task
    from baffle_edge.models import build_model
    from baffle_edge.rows import step_gradient

    cfg = dataclasses.replace(SMALL, strategy="fedavg", local_steps=3, noise=noise)
    fed = Federation(cfg)
    assert fed.noise.value == noise
    task = fed.task(0, 1)
    session = TorchSession(build_model(fed.model_cfg))
    w_global = fed.server.flat().numpy()
    assert task.local_lr == cfg.optim.local_lr and task.clip == cfg.optim.clip  # the task carries them
    report = run_task(task, session, fed.batches(1, 0), weights=w_global)
    assert report.losses.size == 3 * cfg.k and report.base_losses.size == 3
    # the client applied 2 local steps (the last is left to the server); replay them from scalars
    w = w_global.copy()
    for s in range(2):
        g = step_gradient(task, s, report.losses[s * cfg.k:(s + 1) * cfg.k], report.base_losses[s], w.size,
                          blocks=fed.server.blocks)
        w = (w - np.float32(cfg.optim.local_lr) * g.astype(np.float32)).astype(np.float32)
    assert np.array_equal(w, session.w0)
    update = fed.server.decode(task, report)
    assert not np.array_equal(update.weights, w) and np.all(np.isfinite(update.weights))


def test_cli_train_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--rounds", "2", "--clients", "2", "--k", "3", "--out", str(out), "--no-progress",
                 "--compare-bp"]) == 0
    assert (out / "bp" / "metrics.json").exists() and (out / "curves.png").exists()
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and f"baffle-edge compare {out} {out / 'bp'}" in printed
    assert main(["compare", str(out), str(out / "bp")]) == 0  # the command it suggests works on the real run
    assert "| torch block | bp | torch block - bp |" in capsys.readouterr().out  # the resolved default noise
    assert main(["train", "--dataset", "mnist", "--out", str(tmp_path / "m")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["train", "--k", "0", "--out", str(tmp_path / "z")]) == 2
    assert main(["train", "--rounds", "2", "--out", str(out)]) == 2  # exists, no --resume
    assert "not empty" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "baffle_edge", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--sigma" in r.stdout and "default" in r.stdout


@pytest.mark.parametrize("strategy", ["fedsgd", "fedavg"])
@pytest.mark.parametrize("aggregate", ["mean", "median", "trimmed-mean"])
def test_backprop_runs_under_every_strategy_and_aggregation(strategy, aggregate):
    """The backprop baseline is a device like any other: robust aggregation and FedAvg work for it
    (it used to crash with 'fedsgd+median': the strategy was compared by name)."""
    cfg = dataclasses.replace(SMALL, method=Method.BP, strategy=strategy, local_steps=2, aggregate=aggregate)
    fed = Federation(cfg)
    before = fed.server.flat().clone()
    row = fed.step(0)
    assert row.applied and row.clients_accepted == cfg.clients and not row.rejected
    assert row.bytes_up == cfg.clients * 4 * fed.server.dim and np.isfinite(row.train_loss)
    assert not torch.equal(before, fed.server.flat())


def test_int8_runs_count_what_a_lean_device_downloads(tmp_path):
    from baffle_edge import downloads
    cfg = dataclasses.replace(SMALL, runtime="onnxruntime-int8", rounds=3, eval_every=3)
    rows = train(cfg, tmp_path / "int8", progress=False)["rounds"]
    per_client = [r["bytes_down"] / cfg.clients for r in rows]
    # the integers (1 byte a weight, zlib) and the graphs, never the float32 weights
    assert all(b < 4 * 26_730 for b in per_client), per_client
    assert per_client[1] < per_client[0]  # from round 2: a delta against the held integers and bundle files
    payload = bytes(range(256)) * 8
    ledger = downloads.LeanLedger()
    assert ledger.integers(payload) == len(downloads.deflate(payload))
    assert ledger.integers(payload) == len(downloads.deflate(bytes(len(payload))))  # unchanged: an all-zero delta
    assert ledger.bundle({"a": payload}) > 0 and ledger.bundle({"a": payload}) == 0  # held files: free
    assert downloads.LeanLedger(**ledger.state()).integers(payload) == ledger.integers(payload)  # a resumed run
    # FedAvg's local steps need the float weights: counted as float32
    fedavg = train(dataclasses.replace(cfg, rounds=1, local_steps=2, strategy="fedavg"), tmp_path / "fa", progress=False)
    assert fedavg["rounds"][0]["bytes_down"] > cfg.clients * 4 * 26_730


def test_evaluation_is_one_pass_per_weight_set_and_matches_the_definitions():
    """``Federation.evaluate``: accuracy and loss from one pass; the EMA's accuracy from a second pass only once
    the EMA differs from the raw weights; both equal their plain definitions."""
    from baffle_edge.server import evaluate_weights
    from baffle_edge.params import flat_params
    fed = Federation(dataclasses.replace(SMALL, rounds=1))
    x, y = fed.data.x_test, fed.data.y_test
    with torch.no_grad():
        logits = fed.model(torch.from_numpy(x))
    acc, loss = evaluate_weights(fed.model, flat_params(fed.model), x, y, batch=7)
    assert acc == pytest.approx(float((logits.argmax(1).numpy() == y).mean()))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))), rel=1e-5)
    m = fed.evaluate()
    assert m["test_accuracy"] == m["test_accuracy_raw"] == pytest.approx(acc) and m["test_loss"] == pytest.approx(loss)
    assert fed.server.ema is not None  # the default: after an EMA update at other weights, the shown accuracy is the EMA's
    fed.server.ema.update(torch.randn(fed.server.dim, generator=torch.Generator().manual_seed(0)))
    ema_acc = evaluate_weights(fed.model, fed.server.ema.shadow, x, y)[0]
    assert ema_acc != acc  # (other weights, other predictions: else the check below could not fail)
    assert fed.evaluate()["test_accuracy"] == pytest.approx(ema_acc)
