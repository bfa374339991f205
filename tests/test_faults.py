"""The server keeps going and loses nothing: quorum, deadline, replays, Byzantine clients, kill -9."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from baffle_edge.server import Aggregate, ClientUpdate, ReplayGuard, make_strategy
from baffle_edge.attackers import byzantine_clients, garbage_report
from baffle_edge.simulate import Federation, TrainConfig

SMALL = TrainConfig(clients=6, k=4, rounds=2, eval_every=2, checkpoint_every=2, workers=2)


def test_quorum_not_met_skips_the_round_and_keeps_the_model():
    fed = Federation(dataclasses.replace(SMALL, quorum=0.5))
    before = fed.server.flat().clone()

    def flaky(task, batches):  # 4 of 6 devices fail: 2 valid < 3 needed
        if task.client >= 2:
            raise ConnectionError("dropped")
        return fed.baffle_client(task, batches)

    row = fed.step(0, client_fn=flaky)
    assert row.skipped and not row.applied and row.clients_accepted == 2
    assert np.array_equal(before.numpy(), fed.server.flat().numpy())
    row = fed.step(1, client_fn=lambda t, b: flaky(dataclasses.replace(t, client=0), b) if t.client >= 3
                   else fed.baffle_client(t, b))  # 3 valid: quorum met
    assert not row.skipped and row.applied and row.clients_accepted == 3


def test_deadline_records_stragglers_as_absent():
    fed = Federation(dataclasses.replace(SMALL, round_timeout=3.0, workers=6))

    def slow(task, batches):
        if task.client in (1, 4):
            time.sleep(8)
        return fed.baffle_client(task, batches)

    start = time.perf_counter()
    row = fed.step(0, client_fn=slow)
    assert time.perf_counter() - start < 7.5  # the round closed at the deadline
    assert row.absent == [1, 4] and row.clients_accepted == 4 and row.applied


def test_duplicate_and_replayed_reports_are_rejected():
    fed = Federation(SMALL)
    w = fed.server.flat().numpy().copy()
    tasks = [fed.task(0, c) for c in range(3)]
    reports = [fed.baffle_client(t, fed.batches(t.client, 0), weights=w) for t in tasks]
    clone = dataclasses.replace(reports[0], client=2)  # client 2 copies client 0's losses

    def gather(ts, weights):
        return [(ts[0], reports[0]), (ts[0], reports[0]), (ts[1], reports[1]), (ts[2], clone)]

    row = fed.step(0, gather=gather)
    assert row.clients_accepted == 2 and row.absent == [3, 4, 5]
    assert row.rejected["0"].startswith("duplicate") and row.rejected["2"].startswith("replay")
    # a report of the previous round sent again next round: refused by round/model version
    row = fed.step(1, gather=lambda ts, weights: [(ts[1], reports[1])])
    assert "round" in row.rejected["1"] and row.skipped
    guard = ReplayGuard()
    assert guard.admit(reports[1]) is None and "duplicate" in guard.admit(reports[1])


def updates(vectors):
    return [ClientUpdate(i, 32, gradient=np.asarray(v, dtype=np.float64)) for i, v in enumerate(vectors)]


def test_robust_aggregates_ignore_outliers():
    honest = [[1.0, -1.0], [1.2, -0.8], [0.8, -1.2], [1.1, -0.9], [0.9, -1.1]]
    attack = [[1e6, 1e6], [1e6, 1e6]]
    mean = make_strategy("fedsgd").aggregate(updates(honest + attack), "gradient")
    med = make_strategy("fedsgd", aggregate="median").aggregate(updates(honest + attack), "gradient")
    trim = make_strategy("fedsgd", aggregate="trimmed-mean", trim=0.3).aggregate(updates(honest + attack), "gradient")
    assert abs(mean[0] - 1.0) > 1e4
    assert np.allclose(med, [1.1, -0.9]) and np.allclose(trim, [1.1, -0.9])  # the attackers only shift the rank
    assert make_strategy("fedavg", local_steps=2, aggregate=Aggregate.MEDIAN).name == "fedavg+median"
    with pytest.raises(ValueError, match="trim"):
        make_strategy("fedsgd", aggregate="trimmed-mean", trim=0.5)
    with pytest.raises(ValueError, match="geomedian"):
        make_strategy("fedsgd", aggregate="geomedian")


def test_byzantine_clients_are_seeded_and_upload_wellformed_garbage():
    assert byzantine_clients(10, 0.3, seed=0) == byzantine_clients(10, 0.3, seed=0)
    assert len(byzantine_clients(10, 0.3, seed=0)) == 3 and byzantine_clients(10, 0.0, seed=0) == frozenset()
    fed = Federation(dataclasses.replace(SMALL, byzantine=0.5, rounds=1))
    row = fed.step(0)
    assert row.clients_accepted == 6 and not row.rejected  # garbage passes validation...
    t = fed.task(0, 0)
    bad = garbage_report(fed.baffle_client(t, fed.batches(0, 0)), seed=0)
    assert bad.losses.max() > 10 and np.all(np.isfinite(bad.losses))  # ...but is garbage
    with pytest.raises(ValueError, match="byzantine"):
        Federation(dataclasses.replace(SMALL, byzantine=1.5))


def strip(metrics):
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["rounds"]]
    final = {k: v for k, v in metrics["final"].items() if k != "seconds_total"}
    return rows, final


ARGS = ["train", "--clients", "3", "--k", "4", "--rounds", "5", "--eval-every", "2", "--checkpoint-every", "1",
        "--no-progress", "--workers", "1"]


# The child process SIGKILLs itself at an exact point of its 3rd checkpoint, whatever the machine's speed:
# "torn" = half of the temporary checkpoint file written; "between" = checkpoint replaced, metrics.json not yet.
KILLER = """
import os, signal, sys
from baffle_edge import cli, simulate
stage, real, seen = sys.argv[1], simulate._atomic_write, [0]
def dying(path, write):
    if path.name == "checkpoint.pt":
        seen[0] += 1
        if seen[0] == 3 and stage == "torn":
            tmp = path.with_name("." + path.name + ".tmp")
            write(tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    elif seen[0] == 3 and stage == "between":
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, write)
simulate._atomic_write = dying
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("stage", ["torn", "between"])
def test_kill_dash_9_then_resume_is_identical(tmp_path, stage):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "baffle_edge"] + ARGS
    full = subprocess.run(cmd + ["--out", str(tmp_path / "full")], env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLER, stage] + ARGS + ["--out", str(run)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = json.loads((run / "metrics.json").read_text())["rounds"]
    assert len(done) == 2  # metrics.json of the 2nd checkpoint: the 3rd never got that far
    resumed = subprocess.run(cmd + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert strip(a) == strip(b)
