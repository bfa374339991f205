"""The device gateway: tokens, the HTTP API's refusals (recorded, model unchanged), the round
board as ``Federation.step``'s gather hook. In process (Starlette's TestClient); the
multi-process runs are in tests/test_gateway_e2e.py."""
import dataclasses
import io
import json
import os
import shutil
import threading
import time
import zipfile

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")

from fastapi.testclient import TestClient

from baffle_edge.gateway import tokens as tk
from baffle_edge.gateway.app import check_npz, create_app, report_limit
from baffle_edge.gateway.board import Board, GatewayStopped
from baffle_edge.protocol import ClientReport
from baffle_edge.simulate import Federation, TrainConfig

CFG = TrainConfig(clients=4, k=4, rounds=3, eval_every=1, checkpoint_every=1, workers=1, round_timeout=20.0)


def test_tokens_are_stored_hashed_one_per_slot_and_revocable(tmp_path):
    path = tmp_path / "tokens.json"
    name, token = tk.issue(path, 3)
    assert name == "client-3" and token.startswith("bfl_") and len(token) > 40
    text = path.read_text()
    assert token not in text and tk.token_hash(token) in text  # only the hash is on disk
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    store = tk.TokenStore(path, reload_every=0.0)
    assert store.authenticate(token) == tk.Device("client-3", 3)
    for bad in (None, "", "bfl_wrong", token + "x", "Bearer " + token, "x" * 10_000):
        assert store.authenticate(bad) is None
    with pytest.raises(ValueError, match="already has a live token"):
        tk.issue(path, 3, name="other")
    _, token2 = tk.issue(path, 3, name="phone", replace=True)  # the old token is revoked
    time.sleep(0.01)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # make sure the mtime moved
    assert store.authenticate(token) is None and store.authenticate(token2) == tk.Device("phone", 3)
    tk.revoke(path, "phone")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert store.authenticate(token2) is None  # a running server sees the revocation
    assert [(r["name"], r["revoked"]) for r in tk.listing(path)] == [("client-3", True), ("phone", True)]
    with pytest.raises(ValueError, match="no device named"):
        tk.revoke(path, "nobody")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tk.TokenStore(path)


class Live:
    """A Federation whose rounds are gathered by a Board behind the HTTP app."""

    def __init__(self, tmp_path, cfg=CFG, **app_options):
        self.cfg = cfg
        self.fed = Federation(cfg)
        self.board = Board(cfg, out_dir=tmp_path / "run", demo_data=True)
        self.board.bind(self.fed)
        path = tmp_path / "tokens.json"
        self.tokens = {c: tk.issue(path, c)[1] for c in range(cfg.clients)}
        self.tokens["outsider"] = tk.issue(path, cfg.clients + 5)[1]
        self.http = TestClient(create_app(self.board, tk.TokenStore(path), **app_options))
        self.http.__enter__()  # lifespan: long polls wake on board changes
        self.rows: list[dict] = []
        self.devices: list = []  # device_on's clients: their bundle caches go with the test

    def open(self, round_: int) -> threading.Thread:
        def run():
            try:
                self.rows.append(self.fed.step(round_, gather=self.board).to_json())
            except GatewayStopped:  # the test ended with the round open
                pass

        t = threading.Thread(target=run)
        t.start()
        for _ in range(200):
            if self.board.current is not None and self.board.current.round == round_:
                return t
            time.sleep(0.01)
        raise AssertionError("round did not open")

    def close_round_now(self):
        with self.board.cond:
            self.board.current.deadline = time.monotonic()
            self.board.cond.notify_all()

    def auth(self, c):
        return {"Authorization": f"Bearer {self.tokens[c]}"}

    def offer(self, c):
        r = self.http.get("/v1/task", headers=self.auth(c))
        assert r.status_code == 200, r.text
        return r.json()

    def report(self, c) -> ClientReport:
        """What device c computes for the open round, fetched over the API like a device."""
        from baffle_edge.client import Batch
        from baffle_edge.protocol import RoundTask
        o = self.offer(c)
        assert o["status"] == "task"
        w = np.frombuffer(self.http.get(o["weights"]["url"], headers=self.auth(c)).content, dtype="<f4")
        d = self.http.get(o["data"], headers=self.auth(c)).json()
        import base64
        batches = [Batch(np.frombuffer(base64.b64decode(b["x"]), "<f4").reshape(b["shape"]).copy(),
                         np.asarray(b["y"], dtype=np.int64)) for b in d["batches"]]
        return self.fed.baffle_client(RoundTask.from_dict(o["task"]), batches, weights=w.copy())

    def post(self, c, report=None, *, body=None, media="application/json", headers=None):
        if body is None:
            body = report.to_json().encode() if media == "application/json" else report.to_npz()
        h = {**(self.auth(c) if c is not None else {}), "Content-Type": media, **(headers or {})}
        return self.http.post("/v1/report", content=body, headers=h)

    def close(self):
        self.board.stop("test over")
        self.http.__exit__(None, None, None)
        for dev in self.devices:  # not dev.close(): its http is ours, already closed
            shutil.rmtree(dev.cache_dir, ignore_errors=True)


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.close()


def test_task_weights_data_and_a_valid_report(live):
    assert live.offer(0)["status"] == "wait"  # no round open yet
    t = live.open(0)
    o = live.offer(1)
    assert o["status"] == "task" and o["task"]["client"] == 1 and o["round"] == 0 and o["bundle"] is None
    w = live.http.get(o["weights"]["url"], headers=live.auth(1))
    assert w.headers["etag"] == f'"{o["weights"]["version"]}"' and len(w.content) == 4 * o["weights"]["count"]
    assert np.array_equal(np.frombuffer(w.content, "<f4"), live.fed.server.flat().numpy())
    again = live.http.get(o["weights"]["url"], headers={**live.auth(1), "If-None-Match": w.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    r = live.post(1, live.report(1), media="application/x-npz")
    assert r.status_code == 202 and r.json()["accepted"]
    assert live.offer(1)["status"] == "wait"  # answered: nothing more this round
    for c in (0, 2, 3):
        assert live.post(c, live.report(c)).status_code == 202
    t.join(10)
    row = live.rows[0]
    assert row["clients_accepted"] == 4 and row["applied"] and not row["rejected"] and not row["absent"]
    status = live.http.get("/v1/status").json()  # public: no token needed
    assert status["accepted_total"] == 4 and status["state"] == "closed" and status["round"] == 1


def test_bad_requests_are_refused_with_a_reason_recorded_and_do_not_change_the_model(live, tmp_path):
    t = live.open(0)
    good = {c: live.report(c) for c in range(4)}
    before = live.fed.server.flat().clone()

    def refused(resp, status, kind):
        assert resp.status_code == status, resp.text
        assert resp.json()["error"] == kind and resp.json()["reason"]

    refused(live.post(None, good[2]), 401, "unauthenticated")  # no token
    refused(live.post(None, good[2], headers={"Authorization": "Bearer bfl_forged"}), 401, "unauthenticated")
    refused(live.http.get("/v1/task"), 401, "unauthenticated")
    refused(live.post(2, good[0]), 403, "wrong-device")  # client 2 posts client 0's report
    refused(live.http.get("/v1/task", headers=live.auth("outsider")), 403, "no-slot")
    limit = report_limit(CFG)
    refused(live.post(2, body=b"[" + b"1," * limit + b"1]"), 413, "too-large")
    refused(live.post(2, body=b"{not json"), 400, "malformed")
    refused(live.post(2, body=json.dumps({**good[2].to_dict(), "losses": "nan"}).encode()), 400, "malformed")
    refused(live.post(2, body=b"PK\x03\x04garbage", media="application/x-npz"), 400, "malformed")
    refused(live.post(2, body=b"x", media="text/plain"), 415, "unsupported-media-type")
    short = dataclasses.replace(good[2], losses=good[2].losses[:-1])
    refused(live.post(2, short), 422, "invalid")
    nan = dataclasses.replace(good[2], losses=np.full_like(good[2].losses, np.nan))
    refused(live.post(2, nan, media="application/x-npz"), 422, "invalid")
    refused(live.post(2, dataclasses.replace(good[2], round=7)), 409, "stale")
    refused(live.post(2, dataclasses.replace(good[2], model_version="0" * 16)), 409, "stale")
    assert live.post(0, good[0]).status_code == 202
    refused(live.post(0, good[0]), 409, "duplicate")
    replay = dataclasses.replace(good[0], client=2)  # client 2 uploads client 0's losses as its own
    refused(live.post(2, replay), 409, "replay")
    assert live.post(1, good[1]).status_code == 202
    assert live.post(3, good[3]).status_code == 202  # client 2 never gets a valid report in
    live.close_round_now()  # the deadline passes
    t.join(10)
    row = live.rows[0]
    assert row["clients_accepted"] == 3 and row["absent"] == [] and row["applied"]
    assert set(row["rejected"]) == {"0", "2"}  # the offenders, with the first reason and a count
    assert "HTTP 403 wrong-device" in row["rejected"]["2"] and "refused uploads" in row["rejected"]["2"]
    assert "HTTP 409 duplicate" in row["rejected"]["0"]
    # the model moved exactly as if only the three valid reports had arrived
    ref = Federation(CFG)
    assert np.array_equal(ref.server.flat().numpy(), before.numpy())
    ref.step(0, gather=lambda ts, w: [(ts[c], good[c]) for c in (0, 1, 3)])
    assert np.array_equal(ref.server.flat().numpy(), live.fed.server.flat().numpy())
    log = json.loads((tmp_path / "run" / "gateway.json").read_text())
    kinds = log["rejected_by_kind"]
    assert kinds["unauthenticated"] == 3 and kinds["too-large"] == 1 and kinds["replay"] == 1
    assert sum(kinds.values()) == len(log["rejections"]) == 16
    # next round: the round-0 report sent again is stale; a report after the deadline is late
    t = live.open(1)
    refused(live.post(0, good[0]), 409, "stale")
    now = {c: live.report(c) for c in range(4)}
    for c in (0, 2, 3):
        assert live.post(c, now[c]).status_code == 202
    live.close_round_now()
    t.join(10)
    refused(live.post(1, now[1]), 409, "late")
    row = live.rows[1]
    assert "stale" in row["rejected"]["0"] and row["clients_accepted"] == 3 and row["absent"] == [1]


def test_rate_limit_per_device(tmp_path):
    lv = Live(tmp_path, rate=1.0, burst=3)
    try:
        codes = [lv.http.get("/v1/config", headers=lv.auth(0)).status_code for _ in range(5)]
        assert codes[:3] == [200] * 3 and codes[3] == 429
        r = lv.http.get("/v1/config", headers=lv.auth(0))
        assert r.status_code == 429 and float(r.headers["retry-after"]) > 0
        assert lv.http.get("/v1/config", headers=lv.auth(1)).status_code == 200  # other devices unaffected
    finally:
        lv.close()


def test_long_poll_wakes_when_the_round_opens(live):
    result = {}

    def poll():
        start = time.perf_counter()
        result["offer"] = live.http.get("/v1/task", params={"wait": 10}, headers=live.auth(2)).json()
        result["seconds"] = time.perf_counter() - start

    p = threading.Thread(target=poll)
    p.start()
    time.sleep(0.5)
    live.open(0)
    p.join(10)
    assert result["offer"]["status"] == "task" and result["seconds"] < 5


def test_npz_uploads_must_be_stored_uncompressed():
    r = ClientReport(round=0, client=0, losses=np.ones(4), base_losses=np.ones(1), num_samples=8, model_version="a")
    check_npz(r.to_npz())  # what ClientReport.to_npz writes is fine
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:  # a zip bomb in waiting
        z.writestr("losses.npy", b"\0" * 100_000)
    with pytest.raises(ValueError, match="uncompressed"):
        check_npz(buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("evil.npy", b"")
    with pytest.raises(ValueError, match="members"):
        check_npz(buf.getvalue())


def test_bundle_files_are_served_with_their_sha256(tmp_path):
    cfg = dataclasses.replace(CFG, clients=2, runtime="onnxruntime-int8")
    lv = Live(tmp_path, cfg)
    try:
        lv.open(0)
        o = lv.offer(0)
        b = o["bundle"]
        assert b["format"] == "onnx-int8" and "baffle.json" in b["files"]
        meta = json.loads(lv.http.get(b["manifest"], headers=lv.auth(0)).content)
        for name, entry in meta["files"].items():
            r = lv.http.get(b["files"][name]["url"], headers=lv.auth(0))
            import hashlib
            assert hashlib.sha256(r.content).hexdigest() == entry["sha256"] == r.headers["x-sha256"]
        assert lv.http.get(f"/v1/bundle/{b['generation']}/../checkpoint.pt", headers=lv.auth(0)).status_code == 404
        assert lv.http.get(f"/v1/bundle/{b['generation'] + 9}/baffle.json", headers=lv.auth(0)).status_code == 404
    finally:
        lv.close()


def device_on(live, client: int, **options):
    """The Python device client talking to the in-process app (TestClient is an httpx.Client)."""
    from baffle_edge.gateway.device import Device, DeviceConfig
    dev = Device(DeviceConfig(server="http://testserver", token=live.tokens[client], poll=0.0, patience=5, **options))
    dev.http.close()
    dev.http = live.http
    dev.http.headers["Authorization"] = f"Bearer {live.tokens[client]}"
    live.devices.append(dev)
    return dev


def test_python_device_with_its_own_data(live, tmp_path):
    rng = np.random.default_rng(0)
    own = tmp_path / "own.npz"
    np.savez(own, x=rng.standard_normal((50, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 50))
    t = live.open(0)
    dev = device_on(live, 0, data=str(own), max_tasks=1, upload="json")
    summary = dev.run()
    assert summary.answered == 1 and summary.rounds == [0] and not summary.refused
    report = live.board.current.reports[0]
    assert report.num_samples == CFG.batch_size and report.runtime == "torch"
    for c in (1, 2, 3):
        assert live.post(c, live.report(c)).status_code == 202
    t.join(10)
    assert live.rows[0]["clients_accepted"] == 4
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 8, 8), np.float32), y=np.zeros(3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        device_on(live, 1, data=str(bad))


def test_python_device_refuses_a_tampered_bundle(tmp_path):
    cfg = dataclasses.replace(CFG, clients=2, runtime="onnxruntime-int8")
    lv = Live(tmp_path, cfg)
    try:
        lv.open(0)
        snap = lv.board.current.bundle
        name = next(n for n in snap.files if n.endswith(".train.onnx"))
        snap.files[name] = snap.files[name][:-1] + b"\0"  # the bytes served no longer match the sha256
        dev = device_on(lv, 0)

        def one_round():  # the first offer only (run() would go on to wait for the next round)
            dev.config = dev._check(dev.request("GET", "/v1/config"), "config").json()
            offer = dev._check(dev.request("GET", "/v1/task"), "task").json()
            return dev.answer(offer)

        with pytest.raises(ValueError, match="sha256"):
            one_round()
        assert lv.board.current.reports == {}  # nothing was computed or sent from the bad file
    finally:
        lv.close()
