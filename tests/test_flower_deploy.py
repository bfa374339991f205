"""BAFFLE over Flower as real processes on 127.0.0.1: the simulation runtime (`flwr run` on a
simulation SuperLink) and a secured deployment (TLS, SuperNode authentication, each node's own
data) with a SuperNode killed mid-run and restarted, and intruders refused."""
import json
import subprocess
import time

import pytest

pytest.importorskip("flwr", reason="flwr not installed (pip install 'baffle-edge[flower]')")

from baffle_edge.flower import LocalFederation, simulate, write_app, write_shards  # noqa: E402
from baffle_edge.simulate import TrainConfig, train  # noqa: E402


def strip(rounds, *, drop=("seconds",)):
    return [{k: v for k, v in r.items() if k not in drop} for r in rounds]


def test_flower_simulation_runtime_matches_in_process_train(tmp_path):
    """~40 s: a loopback SuperLink in simulation mode, `flwr run`, 3 virtual SuperNodes (Ray)."""
    cfg = TrainConfig(clients=3, k=3, rounds=3, eval_every=1, checkpoint_every=3, workers=1)
    local = train(cfg, tmp_path / "local", progress=False)
    fl = simulate(cfg, tmp_path / "flower", timeout=300)
    assert [r["clients_accepted"] for r in fl["rounds"]] == [3, 3, 3]
    assert strip(fl["rounds"]) == strip(local["rounds"])  # loss, accuracy, bytes: identical per round
    assert fl["final"]["complete"]


def _rounds(path):
    try:
        return json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def _wait(predicate, timeout, what, run):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run.poll() is not None:
            raise AssertionError(f"the run ended while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_secure_deployment_survives_a_vanished_supernode_and_refuses_intruders(tmp_path):
    """~4-6 min on 2 cores: SuperLink + 3 SuperNodes as processes, TLS + SuperNode auth, int8 ORT clients on
    their own data files; SuperNode 1 is killed after round 2 (rounds go on with 2 of 3 = quorum),
    restarted (it rejoins), and SuperNodes with an unregistered key or no key are refused."""
    clients, rounds = 3, 14
    settings = {"clients": clients, "k": 5, "rounds": rounds, "runtime": "onnxruntime-int8", "eval_every": 1,
                "checkpoint_every": 1, "quorum": 0.6, "round_timeout": 20.0, "workers": 1}
    shards = write_shards(tmp_path / "data", clients=clients, seed=0)
    out = tmp_path / "run"
    app = write_app(tmp_path / "app", train_config=settings, client_data="node", out=str(out))
    # the in-process reference on the same seed and data (no faults)
    cfg = TrainConfig(**{k: v for k, v in settings.items()})
    local = train(cfg, tmp_path / "local", progress=False)

    fed = LocalFederation(tmp_path / "fed", [f'data="{p}" partition-id={c}' for c, p in enumerate(shards)])
    run = None
    try:
        fed.start(timeout=90)
        run = subprocess.Popen(["flwr", "run", str(app), "local", "--stream"], env=fed.env,
                               stdout=open(tmp_path / "flwr-run.log", "wb"), stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
        metrics = out / "metrics.json"
        _wait(lambda: len(_rounds(metrics)) >= 2, 240, "round 2", run)
        fed.kill_node(1)
        absent = _wait(lambda: [r for r in _rounds(metrics) if 1 in r["absent"] and not r["skipped"]], 120,
                       "a round without SuperNode 1", run)
        assert absent[0]["clients_accepted"] == 2  # quorum 0.6 of 3 met by the others
        fed.restart_node(1, timeout=180)  # refused until its heartbeat expires on the SuperLink, then rejoins
        _wait(lambda: any(r["round"] > absent[-1]["round"] and r["clients_accepted"] == 3
                          for r in _rounds(metrics)), 180, "SuperNode 1 to rejoin", run)

        # intruders: an unregistered key, and no key at all; both are refused and exit
        for key in ("intruder", None):
            code, log = fed.try_node(f"intruder-{key}", key=key, with_key=key is not None, timeout=90)
            assert code not in (0, None), log
            assert "Failed to initialize the connection to the SuperLink" in log
        assert fed.online_nodes() == clients  # the intruders never joined

        assert run.wait(300) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    finally:
        if run is not None and run.poll() is None:
            import os
            import signal
            os.killpg(run.pid, signal.SIGKILL)
        fed.stop()
    final = json.loads(metrics.read_text())
    got = final["rounds"]
    assert final["final"]["complete"] and len(got) == rounds
    # before the fault the deployment equals the in-process run exactly (same seed, same data)
    # ... but for bytes down (Flower sends float32 weights; an in-process int8 run counts lean devices' integers)
    assert strip(got[:2], drop=("seconds", "bytes_down")) == strip(local["rounds"][:2], drop=("seconds", "bytes_down"))
    assert all(r["rejected"] == {} for r in got)
    print("deployment rounds:", [(r["round"], r["clients_accepted"], r["absent"], round(r["seconds"], 1))
                                 for r in got], "start-up:", fed.timings)
