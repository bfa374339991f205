"""The device gateway under load, on loopback: ``baffle-edge serve`` in its own process and
simulated devices as asyncio tasks in this one (no model: they post well-formed, seeded loss
vectors of the task's size, so the measured cost is the gateway's and the server's decoding).

``test_gateway_load``: D concurrent devices for R rounds. Asserts no report is lost (every round
accepts all D) and records p50/p99 latency per endpoint, requests/s, rounds/minute and the server
process's peak resident memory (VmHWM) in ``extra_info``.
``test_rounds_per_minute_devices_vs_in_process``: the same small training run with real device
processes over HTTP and in process (``baffle-edge train``), side by side.

Plain test runs (``--benchmark-disable``, CI) use a small configuration; ``--benchmark-only``
measures 200 devices x 5 rounds and 10 device processes x 10 rounds.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")
httpx = pytest.importorskip("httpx")

from baffle_edge.gateway import tokens as tk
from baffle_edge.protocol import ClientReport, RoundTask

TIMEOUT = 600  # seconds: every process here is killed after this


def start_server(tmp: Path, args: list[str]) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-m", "baffle_edge", "serve", "--tokens", str(tmp / "tokens.json"),
                          "--port", "0", "--no-progress", "--out", str(tmp / "run"), *args],
                         stdout=subprocess.PIPE, stderr=open(tmp / "serve.log", "w"), text=True)  # noqa: SIM115 - lives as long as the process
    line = p.stdout.readline()
    if "listening on" not in line:
        p.kill()
        raise AssertionError(f"server did not start: {line}{(tmp / 'serve.log').read_text()[-2000:]}")
    return p, int(line.split("127.0.0.1:")[1].split()[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far."""
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def peak_rss(pid: int) -> int:
    """Peak resident set size of a running process (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def answer_offer(call, offer: dict):
    """Fetch the offer's weights (checked for size) and post seeded synthetic losses of the task's
    size as NPZ (num_samples: the task's batch, 32 x local steps); the POST's response."""
    task = RoundTask.from_dict(offer["task"])
    w = await call("weights", "GET", offer["weights"]["url"])
    assert w.status_code == 200 and len(w.content) == 4 * offer["weights"]["count"]
    rng = np.random.default_rng([task.round, task.client])
    report = ClientReport(round=task.round, client=task.client,
                          losses=2.3 + 1e-3 * rng.standard_normal(task.local_steps * task.losses_per_step),
                          base_losses=np.full(task.local_steps, 2.3), num_samples=32 * task.local_steps,
                          model_version=task.model_version, runtime="synthetic")
    return await call("report", "POST", "/v1/report", content=report.to_npz(),
                      headers={"Content-Type": "application/x-npz"})


async def simulated_device(base: str, token: str, lat: dict, stop: asyncio.Event) -> int:
    """Answer every task with seeded synthetic losses until the server says done."""
    posted = 0
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(60.0)) as http:
        async def call(name: str, method: str, url: str, **kw):
            t0 = time.perf_counter()
            r = await http.request(method, url, **kw)
            lat.setdefault(name, []).append(time.perf_counter() - t0)
            return r

        while not stop.is_set():
            offer = (await call("task_long_poll", "GET", "/v1/task", params={"wait": 20})).json()
            if offer["status"] == "done":
                return posted
            if offer["status"] != "task":
                continue
            again = (await call("task", "GET", "/v1/task")).json()  # the plain fetch, timed apart from the wait
            assert again["status"] == "task" and again["task"] == offer["task"]
            r = await answer_offer(call, offer)
            assert r.status_code == 202, r.text
            posted += 1
    return posted


async def run_devices(base: str, tokens: list[str]) -> tuple[list[int], dict, float]:
    lat: dict = {}
    stop = asyncio.Event()
    t0 = time.perf_counter()
    posted = await asyncio.wait_for(asyncio.gather(*(simulated_device(base, t, lat, stop) for t in tokens)), TIMEOUT)
    return posted, lat, time.perf_counter() - t0


def percentiles(lat: dict) -> dict:
    return {name: {"n": len(v), "p50_ms": round(1e3 * float(np.percentile(v, 50)), 2),
                   "p99_ms": round(1e3 * float(np.percentile(v, 99)), 2)} for name, v in sorted(lat.items())}


def issue_tokens(tmp: Path, n: int) -> list[str]:
    return [tk.issue(tmp / "tokens.json", c)[1] for c in range(n)]


def test_gateway_load(benchmark, tmp_path):
    measuring = not benchmark.disabled
    devices, rounds = (200, 5) if measuring else (20, 2)
    tokens = issue_tokens(tmp_path, devices)
    result = {}

    def load_run():
        server, port = start_server(tmp_path, [
            "--clients", str(devices), "--k", "10", "--rounds", str(rounds), "--eval-every", str(rounds),
            "--checkpoint-every", str(rounds), "--round-timeout", "120", "--linger", "3",
            "--rate-limit", "50"])
        try:
            server_cpu0, client_cpu0 = cpu_seconds(server.pid), time.process_time()
            posted, lat, wall = asyncio.run(run_devices(f"http://127.0.0.1:{port}", tokens))
            result.update(posted=posted, lat=lat, wall=wall, peak=peak_rss(server.pid),
                          server_cpu=cpu_seconds(server.pid) - server_cpu0, client_cpu=time.process_time() - client_cpu0)
            assert server.wait(TIMEOUT) == 0
        finally:
            if server.poll() is None:
                server.kill()
        return result

    benchmark.pedantic(load_run, rounds=1, iterations=1)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["clients_accepted"] for r in m["rounds"]] == [devices] * rounds  # no report lost
    assert sum(result["posted"]) == devices * rounds
    requests = sum(len(v) for v in result["lat"].values())
    round_seconds = sum(r["seconds"] for r in m["rounds"])
    benchmark.extra_info.update({
        "devices": devices, "rounds": rounds, "k": 10, "model": "lenet", "dataset": "digits",
        "requests": requests, "requests_per_s": round(requests / result["wall"], 1),
        "rounds_per_minute": round(60 * rounds / round_seconds, 2),
        "latency": percentiles(result["lat"]),  # task_long_poll includes waiting for the round to open
        "wall_seconds": round(result["wall"], 2), "server_cpu_seconds": round(result["server_cpu"], 2),
        "devices_cpu_seconds": round(result["client_cpu"], 2),
        "server_round_seconds": [round(r["seconds"], 2) for r in m["rounds"]], "server_peak_rss_mb": round(result["peak"] / 2**20, 1),
        "client": "httpx.AsyncClient, one process, asyncio", "server": "uvicorn, one process"})


def test_rounds_per_minute_devices_vs_in_process(benchmark, tmp_path):
    measuring = not benchmark.disabled
    clients, rounds = (10, 10) if measuring else (2, 2)
    tokens = issue_tokens(tmp_path, clients)
    for c, t in enumerate(tokens):
        (tmp_path / f"client-{c}.token").write_text(t)
    args = ["--clients", str(clients), "--k", "20", "--rounds", str(rounds), "--eval-every", str(rounds),
            "--checkpoint-every", str(rounds)]
    result = {}

    def both():
        from baffle_edge.cli import main
        assert main(["train", *args, "--out", str(tmp_path / "local"), "--no-progress"]) == 0
        server, port = start_server(tmp_path, [*args, "--demo-data", "--linger", "1"])
        devs = [subprocess.Popen([sys.executable, "-m", "baffle_edge", "device", "--server",
                                  f"http://127.0.0.1:{port}", "--token", str(tmp_path / f"client-{c}.token"),
                                  "--quiet", "--threads", "1"], stdout=subprocess.DEVNULL,
                                 stderr=open(tmp_path / f"device{c}.log", "w"),  # noqa: SIM115
                                 env={**os.environ})
                for c in range(clients)]
        try:
            assert server.wait(TIMEOUT) == 0 and all(d.wait(TIMEOUT) == 0 for d in devs)
        finally:
            for p in (server, *devs):
                if p.poll() is None:
                    p.kill()
        for name in ("local", "run"):
            m = json.loads((tmp_path / name / "metrics.json").read_text())
            result[name] = 60 * rounds / sum(r["seconds"] for r in m["rounds"])
        return result

    benchmark.pedantic(both, rounds=1, iterations=1)
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())["rounds"]
    served = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(served) == strip(local)  # the same run, only the transport differs
    benchmark.extra_info.update({
        "clients": clients, "rounds": rounds, "k": 20, "model": "lenet", "dataset": "digits",
        "rounds_per_minute_http_devices": round(result["run"], 1),
        "rounds_per_minute_in_process": round(result["local"], 1),
        "device_threads": 1, "in_process_workers": 2,
        "note": "round time = publish tasks -> last report decoded; device processes share the CPU with the server"})
