"""Honest devices beside an idle-connection flood (issue 26, F2), on loopback.

``baffle-edge serve`` runs in its own process with its default connection limits (idle timeout 10 s,
at most 1,024 connections waiting for a request head, the longest-waiting closed first). The same
small run is made twice, side by side: once alone and once while this process holds FLOOD idle TCP
sockets to the server (unauthenticated, sending nothing) and reopens every one the server closes,
once a second, as an attacker keeping the flood up would. Simulated devices (asyncio + httpx,
seeded synthetic losses as in test_gateway.py) retry a dropped connection as ``baffle-edge device``
does. Asserts 0 devices lost: every round accepts every device's report, in both runs; records the
honest requests' p50/p99 latency with and without the flood, their ratio, the sockets opened and the
server's connection closures in ``extra_info``.

FLOOD: ``BAFFLE_GATEWAY_FLOOD`` sockets if set, else 4,000 with ``--benchmark-only`` and 200 in plain
test runs (``--benchmark-disable``). The soft file-descriptor limit is raised to the hard limit; if
that is still too low the flood is scaled down to fit, and ``extra_info`` says so.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import threading
import time

from .test_gateway import (
    TIMEOUT,
    answer_offer,
    httpx,
    issue_tokens,
    percentiles,
    start_server,
)

HONEST = ("task", "weights", "report")  # request kinds whose latency is compared (the long poll waits by design)


def flood_size(measuring: bool) -> tuple[int, str]:
    want = int(os.environ.get("BAFFLE_GATEWAY_FLOOD") or (4000 if measuring else 200))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server process inherits it
        soft = hard
    room = want if soft == resource.RLIM_INFINITY else max(0, min(want, soft - 256))
    note = "" if room == want else f"scaled down from {want}: file-descriptor limit {soft}"
    return room, note


class Flood:
    """``n`` idle sockets to 127.0.0.1:``port``, reopened once a second when the server closes them,
    until ``stop()`` (or ``TIMEOUT``): everything is closed at the end."""

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.socks: list[socket.socket] = []
        self.opened = self.refused = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def connect(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            self.refused += 1
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def start(self) -> None:
        self.socks = [s for s in (self.connect() for _ in range(self.n)) if s is not None]
        self.thread.start()

    def run(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.done.wait(1.0) and time.monotonic() < deadline:
            alive = []
            for s in self.socks:
                try:
                    closed = s.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    s.close()
                else:
                    alive.append(s)
            fresh = [s for s in (self.connect() for _ in range(self.n - len(alive))) if s is not None]
            self.socks = alive + fresh

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(10)
        for s in self.socks:
            s.close()


async def retrying_device(base: str, token: str, lat: dict, patience: float = 120.0) -> dict:
    """The load test's synthetic device, retrying dropped connections for ``patience`` s (as ``baffle-edge
    device`` does); a report re-sent after a drop that the server had already accepted answers 409 duplicate."""
    out = {"posted": 0, "retries": 0}
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(60.0)) as http:
        async def call(name: str, method: str, url: str, **kw):
            give_up = time.monotonic() + patience
            while True:
                t0 = time.perf_counter()
                try:
                    r = await http.request(method, url, **kw)
                except httpx.TransportError:
                    if time.monotonic() > give_up:
                        raise
                    out["retries"] += 1
                    await asyncio.sleep(0.2)
                    continue
                lat.setdefault(name, []).append(time.perf_counter() - t0)
                return r

        while True:
            offer = (await call("task_long_poll", "GET", "/v1/task", params={"wait": 20})).json()
            if offer["status"] == "done":
                return out
            if offer["status"] != "task":
                continue
            assert (await call("task", "GET", "/v1/task")).json()["status"] in ("task", "wait")
            r = await answer_offer(call, offer)
            assert r.status_code == 202 or (r.status_code == 409 and out["retries"]), r.text
            out["posted"] += 1


def one_run(tmp, tokens: list[str], rounds: int, flood_n: int) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("tokens.json",):
        (tmp / name).write_bytes((tmp.parent / name).read_bytes())
    server, port = start_server(tmp, ["--clients", str(len(tokens)), "--k", "10", "--rounds", str(rounds),
                                      "--eval-every", str(rounds), "--checkpoint-every", str(rounds),
                                      "--round-timeout", "120", "--linger", "3", "--rate-limit", "50"])
    flood = Flood(port, flood_n)
    try:
        if flood_n:
            flood.start()
        lat: dict = {}
        t0 = time.perf_counter()

        async def devices():
            return await asyncio.wait_for(asyncio.gather(*(retrying_device(f"http://127.0.0.1:{port}", t, lat)
                                                           for t in tokens)), TIMEOUT)
        outs = asyncio.run(devices())
        wall = time.perf_counter() - t0
        flood.stop()
        assert server.wait(TIMEOUT) == 0
    finally:
        flood.stop()
        if server.poll() is None:
            server.kill()
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    return {"metrics": m, "lat": lat, "wall": wall, "retries": sum(o["retries"] for o in outs),
            "posted": sum(o["posted"] for o in outs), "opened": flood.opened, "refused": flood.refused}


def test_honest_devices_beside_an_idle_connection_flood(benchmark, tmp_path):
    measuring = not benchmark.disabled
    devices, rounds = (20, 3) if measuring else (4, 2)
    flood_n, note = flood_size(measuring)
    tokens = issue_tokens(tmp_path, devices)
    runs = {}

    def side_by_side():
        runs["alone"] = one_run(tmp_path / "alone", tokens, rounds, 0)
        runs["flood"] = one_run(tmp_path / "flood", tokens, rounds, flood_n)
        return runs

    benchmark.pedantic(side_by_side, rounds=1, iterations=1)
    for name, run in runs.items():  # 0 devices lost: every round accepted every device, with and without the flood
        assert [r["clients_accepted"] for r in run["metrics"]["rounds"]] == [devices] * rounds, name
        assert run["posted"] == devices * rounds, name
    assert runs["flood"]["opened"] >= flood_n
    honest = {name: percentiles({"honest": [x for k in HONEST for x in run["lat"].get(k, [])]})["honest"]
              for name, run in runs.items()}
    closed = runs["flood"]["metrics"]["gateway"].get("connections_closed", {})
    benchmark.extra_info.update({
        "devices": devices, "rounds": rounds, "k": 10, "model": "lenet", "dataset": "digits",
        "flood_sockets": flood_n, "flood_note": note, "flood_sockets_opened": runs["flood"]["opened"],
        "flood_connects_refused": runs["flood"]["refused"], "server_connections_closed": closed,
        "honest_latency_alone": honest["alone"], "honest_latency_flood": honest["flood"],
        "p50_ratio_flood_vs_alone": round(honest["flood"]["p50_ms"] / max(honest["alone"]["p50_ms"], 1e-3), 2),
        "p99_ratio_flood_vs_alone": round(honest["flood"]["p99_ms"] / max(honest["alone"]["p99_ms"], 1e-3), 2),
        "device_retries": {name: run["retries"] for name, run in runs.items()},
        "wall_seconds": {name: round(run["wall"], 2) for name, run in runs.items()},
        "server": "uvicorn, one process, default --idle-timeout 10 --max-idle-connections 1024",
        "client": "httpx.AsyncClient devices and the flood's sockets in this process"})
