"""Issue 26: a device cannot outweigh the federation (F1), idle sockets cannot lock devices out (F2),
no input ends in a 5xx (F3 null/huge loss elements, F4 an NPZ's "version needed" byte, F5 an aborted
upload) and every refusal is answered and counted whatever the handler (F6). Servers listen on
127.0.0.1 only; the connection tests open at most 60 sockets and stop by themselves."""
import asyncio
import dataclasses
import json
import logging
import random
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")
httpx = pytest.importorskip("httpx")

from baffle_edge.gateway import device as gdev
from baffle_edge.gateway import tokens as tk
from baffle_edge.gateway.app import create_app
from baffle_edge.gateway.board import Board
from baffle_edge.gateway.serve import GatewayConfig, uvicorn_config
from baffle_edge.protocol import ClientReport
from baffle_edge.simulate import Federation, TrainConfig

CFG = TrainConfig(clients=4, k=4, rounds=3, eval_every=1, checkpoint_every=1, workers=1, round_timeout=20.0)
HUGE = 2**31  # the largest num_samples the protocol's field admits


def honest_reports(fed: Federation, round_: int = 0) -> dict[int, ClientReport]:
    w = fed.server.flat().numpy().copy()
    return {c: fed.baffle_client(fed.task(round_, c), fed.batches(c, round_), weights=w) for c in range(CFG.clients)}


class OwnData:
    """A gather whose devices bring their own data (the gateway without --demo-data, Flower "node")."""

    devices_own_data = True

    def __init__(self, answers):
        self.answers = answers

    def __call__(self, tasks, weights):
        return [(t, self.answers[t.client]) for t in tasks if t.client in self.answers]


@pytest.mark.parametrize("own_data", [False, True])
def test_a_device_claiming_2_31_samples_moves_the_mean_no_more_than_an_honest_one(own_data):
    """F1: the claim is refused (exact: the server scheduled the shard's batch; own data: above the
    bound batch size x local steps) and the model moves as if the device had stayed silent."""
    fed, ref = Federation(CFG), Federation(CFG)
    good = honest_reports(fed)
    liar = {**good, 2: dataclasses.replace(good[2], num_samples=HUGE)}
    row = fed.step(0, gather=OwnData(liar) if own_data else (lambda ts, w: [(t, liar[t.client]) for t in ts]))
    assert "num_samples" in row.rejected["2"] and str(HUGE) in row.rejected["2"] and row.clients_accepted == 3
    without = {c: r for c, r in good.items() if c != 2}
    ref.step(0, gather=OwnData(without) if own_data else (lambda ts, w: [(t, without[t.client]) for t in ts if
                                                                          t.client != 2]))
    assert np.array_equal(fed.server.flat().numpy(), ref.server.flat().numpy())


def test_the_server_weighs_clients_not_their_claims():
    """F1: within the own-data bound a smaller claim is accepted but weighs what every client weighs;
    with server-known data the weight is the scheduled count, and the BP baseline's update too."""
    fed = Federation(CFG)
    good = honest_reports(fed)
    task = fed.task(0, 1)
    bound = fed.samples(task, exact=False)
    assert bound.expected == CFG.batch_size * task.local_steps and not bound.exact
    small = fed.server.decode(task, dataclasses.replace(good[1], num_samples=1), samples=bound)
    honest = fed.server.decode(task, good[1], samples=bound)
    assert small.weight == honest.weight == bound.weight
    assert np.array_equal(small.gradient, honest.gradient)
    exact = fed.samples(task)
    assert exact.exact and exact.expected == good[1].num_samples
    assert "scheduled" in fed.server.decode(task, dataclasses.replace(good[1], num_samples=1), samples=exact)
    assert fed.server.decode(task, good[1]).weight == 1.0  # no expectation given: equal weights


def test_flower_nodes_with_their_own_partitions_get_equal_weights():
    from baffle_edge.flower.gather import FlowerGather
    from baffle_edge.flower.runconfig import FlowerConfig
    own = FlowerGather(None, CFG, dataclasses.replace(FlowerConfig(), client_data="node"))
    shard = FlowerGather(None, CFG, dataclasses.replace(FlowerConfig(), client_data="shard"))
    assert own.devices_own_data and not shard.devices_own_data


@pytest.fixture
def live(tmp_path):
    from test_gateway import Live
    lv = Live(tmp_path)
    yield lv
    lv.close()


def npz_version_needed(npz: bytes, byte: int) -> bytes:
    """``npz`` with the "version needed to extract" byte of every central directory entry set to ``byte``."""
    patched = bytearray(npz)
    at = patched.find(b"PK\x01\x02")
    while at >= 0:
        patched[at + 6] = byte
        at = patched.find(b"PK\x01\x02", at + 4)
    return bytes(patched)


def refused(resp, status, kind):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "reason"} and body["error"] == kind and body["reason"], body
    return body


def test_report_refusals_f1_f3_f4(live):
    live.open(0)
    good = live.report(1)
    kinds0 = dict(live.board.rejected_by_kind)
    body = refused(live.post(1, dataclasses.replace(good, num_samples=HUGE)), 422, "invalid")  # F1 at the gateway
    assert "num_samples" in body["reason"]
    for field in ("losses", "base_losses"):  # F3: every element type-checked before converting
        for bad in ([None, {}], [None, 2**1100], [1.0, None], [2**1100]):
            d = {**good.to_dict(), field: bad}
            text = json.dumps(d).encode()
            refused(live.post(1, body=text), 400, "malformed")
    npz = good.to_npz()
    for byte in (64, 255):  # F4: zipfile raises NotImplementedError for a "version needed" it cannot read
        refused(live.post(1, body=npz_version_needed(npz, byte), media="application/x-npz"), 400, "malformed")
    kinds = live.board.rejected_by_kind
    assert kinds["invalid"] - kinds0.get("invalid", 0) == 1
    assert kinds["malformed"] - kinds0.get("malformed", 0) == 8 + 2
    assert live.post(1, good).status_code == 202  # the server kept going


def test_every_refusal_is_answered_and_counted_f6(live, tmp_path):
    live.open(0)
    a = live.auth(1)
    before = sum(live.board.rejected_by_kind.values())
    refused(live.http.get("/v1/weights/0123456789abcdef", headers=a), 404, "unknown-version")
    refused(live.http.get("/v1/bundle/99/baffle.json", headers=a), 404, "unknown-bundle")
    refused(live.http.get("/v1/data/7", headers=a), 409, "stale")
    refused(live.http.get("/v1/task?wait=-1", headers=a), 422, "malformed")
    refused(live.http.get("/v1/bundle/-1/x", headers=a), 422, "malformed")
    refused(live.http.get("/v2/nothing/here"), 404, "unknown-route")
    refused(live.http.post("/v1/status"), 405, "method-not-allowed")
    kinds = live.board.rejected_by_kind
    assert sum(kinds.values()) - before == 7
    assert kinds["unknown-version"] == kinds["unknown-bundle"] == kinds["unknown-route"] == 1
    assert kinds["method-not-allowed"] == 1 and kinds["malformed"] == 2 and kinds["stale"] == 1
    assert live.board.requests["(unknown route)"] == 1  # random paths do not grow the request counts
    refused(live.post(2, live.report(1)), 403, "wrong-device")  # a refused report
    for c in range(4):
        assert live.post(c, live.report(c)).status_code == 202
    live.board.current and live.close_round_now()
    for _ in range(500):
        if live.rows:
            break
        time.sleep(0.01)
    row = live.rows[0]
    assert set(row["rejected"]) == {"2"}  # client 1's refused downloads are requests, not reports
    s = live.board.summary()
    assert s["refused_reports"] == 1 and s["refused_requests"] == 8 and s["accepted_reports"] == 4
    cfg = live.http.get("/v1/config", headers=a).json()["train_config"]
    assert "data_dir" not in cfg and "checkpoint_every" not in cfg
    from baffle_edge.device import DeviceSettings
    assert DeviceSettings.from_json(cfg) == DeviceSettings.from_config(CFG) and cfg["rounds"] == CFG.rounds


def test_an_aborted_upload_is_recorded_without_a_traceback_f5(live, caplog):
    """F5: the client disconnects mid-body; Starlette's ClientDisconnect becomes an 'aborted' refusal."""
    live.open(0)
    app = live.http.app
    token = live.tokens[1].encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/report", "raw_path": b"/v1/report", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"authorization", b"Bearer " + token), (b"content-type", b"application/json"),
                         (b"content-length", b"1000")]}
    incoming = [{"type": "http.request", "body": b'{"round": 0, ', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(app(scope, receive, send))
    assert live.board.rejected_by_kind["aborted"] == 1
    assert live.board.rejection_log[-1]["device"] == "client-1"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert sent[0]["status"] == 400


class Served:
    """The app behind the gateway's real uvicorn settings (serve.uvicorn_config), on 127.0.0.1."""

    def __init__(self, tmp_path, **limits):
        import uvicorn
        self.fed = Federation(CFG)
        self.board = Board(CFG, demo_data=True)
        self.board.bind(self.fed)
        self.token = tk.issue(tmp_path / "tokens.json", 0)[1]
        gw = GatewayConfig(tokens=str(tmp_path / "tokens.json"), port=0, **limits)
        config, self.guard = uvicorn_config(create_app(self.board, tk.TokenStore(tmp_path / "tokens.json")), gw)
        self.server = uvicorn.Server(config)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_idle_and_stalled_connections_are_closed_and_cannot_lock_devices_out_f2(tmp_path):
    srv = Served(tmp_path, idle_timeout=0.5, body_timeout=0.5, max_idle_connections=20)
    socks = []
    try:
        silent = srv.connect()
        assert closed_by_server(silent, 3.0)  # idle timeout: sent nothing
        assert srv.guard.closed["idle"] >= 1
        socks = [srv.connect() for _ in range(60)]  # 3x the idle cap
        time.sleep(0.2)
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=5) as http:
            assert http.get("/v1/status").status_code == 200
            r = http.get("/v1/config", headers={"Authorization": f"Bearer {srv.token}"})
            assert r.status_code == 200, r.text
        assert srv.guard.closed["evicted"] >= 40  # the oldest idle sockets made room
        stall = srv.connect()  # a Content-Length larger than the body, then nothing
        stall.sendall(b"POST /v1/report HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + srv.token.encode() +
                      b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"round\": 0")
        assert closed_by_server(stall, 3.0)
        for _ in range(100):
            if srv.board.rejected_by_kind["aborted"]:
                break
            time.sleep(0.02)
        assert srv.board.rejected_by_kind["aborted"] == 1 and srv.guard.closed["body"] == 1
    finally:
        for s in socks:
            s.close()
        srv.close()


def test_the_python_device_backs_off_503s_with_jitter_and_keeps_trying(monkeypatch):
    rng = random.Random(0)
    delays = [gdev.backoff(a, rng) for a in range(12)]
    assert all(d <= gdev.BACKOFF_CAP for d in delays) and delays[-1] >= gdev.BACKOFF_CAP / 2
    assert all(gdev.BACKOFF_BASE * 2**a / 2 <= delays[a] <= gdev.BACKOFF_BASE * 2**a for a in range(4))
    assert len({round(d, 6) for d in delays[-4:]}) == 4  # jittered: capped retries do not line up
    assert gdev.backoff(0, rng, retry_after=3.0) >= 1.5 and gdev.backoff(0, rng, retry_after=1e4) <= gdev.BACKOFF_CAP
    calls, slept = {"n": 0}, []

    def handler(request):
        calls["n"] += 1
        return httpx.Response(503, headers={"Retry-After": "1"}) if calls["n"] <= 25 else httpx.Response(200, json={})

    monkeypatch.setattr(gdev.time, "sleep", slept.append)
    dev = gdev.Device(gdev.DeviceConfig(server="http://127.0.0.1:9", token="t", patience=3600))
    dev.http = httpx.Client(base_url="http://127.0.0.1:9", transport=httpx.MockTransport(handler))
    try:
        assert dev.request("GET", "/v1/task").status_code == 200  # 25 busy answers in a row: still there
        assert calls["n"] == 26 and len(slept) == 25 and min(slept) >= 0.5 and max(slept) <= gdev.BACKOFF_CAP
        dev.dc = dataclasses.replace(dev.dc, patience=0.0)
        calls["n"] = 0
        with pytest.raises(gdev.DeviceError, match="HTTP 503"):
            dev.request("GET", "/v1/task")
    finally:
        dev.close()
