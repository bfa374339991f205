"""Compact reports and lean downloads at the gateway (in process, Starlette's TestClient): every byte a
device moves per round is counted, malformed compact uploads are refused by name (4xx, recorded, the
run goes on), and an int8 device that downloads only integers computes the same losses."""
import collections
import dataclasses
import struct
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")

from test_gateway import CFG, Live, device_on

from baffle_edge import compact
from baffle_edge.device import task_batches

BUDGET = 36 * 1024  # issue #23: bytes per client per round, both directions, default int8 block task


def refused(resp, status, kind):
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == kind and resp.json()["reason"]


def test_malformed_compact_uploads_are_refused_by_name_and_recorded(tmp_path):
    lv = Live(tmp_path)
    try:
        t = lv.open(0)
        good = {c: lv.report(c) for c in range(4)}
        body = compact.encode(good[1])
        step = 36 + len(good[1].model_version) + len(good[1].runtime)
        nan = bytearray(body)
        struct.pack_into("<d", nan, step + 8, float("nan"))
        media = compact.MEDIA_TYPE
        refused(lv.post(1, body=body[:-3], media=media), 400, "malformed")  # truncated
        refused(lv.post(1, body=body + b"\0", media=media), 400, "malformed")  # oversized
        refused(lv.post(1, body=bytes(nan), media=media), 400, "malformed")  # NaN scale
        refused(lv.post(1, body=b"", media=media), 400, "malformed")
        short = dataclasses.replace(good[1], losses=good[1].losses[:-1])  # well formed, one loss short
        r = lv.post(1, body=compact.encode(short), media=media)
        refused(r, 422, "invalid")
        assert "expected 4 values" in r.json()["reason"]
        rng = np.random.default_rng(0)  # random damage: always a 4xx with a reason, never a 5xx
        for _ in range(40):
            b = bytearray(body)
            for i in rng.integers(0, len(b), 3):
                b[i] = rng.integers(0, 256)
            r = lv.post(1, body=bytes(b), media=media)
            assert r.status_code in (202, 400, 409, 422) and "error" in r.json() or r.status_code == 202
            if r.status_code == 202:
                break
        for c in (0, 2, 3):
            assert lv.post(c, body=compact.encode(good[c]), media=media).status_code == 202
        t.join(20)
        row = lv.rows[0]
        assert row["clients_accepted"] >= 3 and row["applied"]
        if "1" in row["rejected"]:
            assert "HTTP 400 malformed" in row["rejected"]["1"] and "compact report" in row["rejected"]["1"]
        assert lv.board.summary()["rejected_by_kind"]["malformed"] >= 4
    finally:
        lv.close()


def test_python_device_uploads_compact_by_default_and_json_when_asked(tmp_path):
    lv = Live(tmp_path)
    try:
        t = lv.open(0)
        seen = []
        lv.http.event_hooks["request"].append(lambda req: seen.append(req.headers.get("content-type")))
        dev = device_on(lv, 0, max_tasks=1)
        assert dev.run().answered == 1
        dev = device_on(lv, 1, max_tasks=1, upload="json")
        assert dev.run().answered == 1
        assert [m for m in seen if m] == [compact.MEDIA_TYPE, "application/json"]
        exact = lv.board.current.reports[1]
        for c in (2, 3):
            assert lv.post(c, lv.report(c)).status_code == 202
        t.join(20)
        assert lv.rows[0]["clients_accepted"] == 4
        want = compact.roundtrip(exact)  # what client 0 sent equals the simulation's compact round trip
        assert lv.board.current.reports[0].losses.size == want.losses.size
    finally:
        lv.close()


class Meter:
    """Bytes of every request and response body through the app, per device (token), direction and endpoint."""

    def __init__(self, http):
        self.count = collections.Counter()
        http.event_hooks["response"].append(self.response)

    def response(self, r):
        r.read()
        part = r.request.url.path.split("/")
        who = r.request.headers.get("authorization", "")
        key = part[2] + ("/int8" if part[-1] == "int8" else "")
        self.count[who, "down " + key] += len(r.content)
        self.count[who, "up " + key] += len(r.request.content or b"")

    def take(self, dev) -> dict:
        who = f"Bearer {dev.dc.token}"
        return {k: v for (w, k), v in self.count.items() if w == who and v}


def act_as(lv, dev):
    """The devices share the in-process client: send the next requests with ``dev``'s token."""
    lv.http.headers["Authorization"] = f"Bearer {dev.dc.token}"


def one_round(lv, devices, round_: int, meter: Meter) -> list[dict]:
    """Every device answers the round once; the bytes each moved."""
    meter.count.clear()
    t = lv.open(round_)
    for dev in devices:
        act_as(lv, dev)
        offer = dev._check(dev.request("GET", "/v1/task"), "task").json()
        assert offer["status"] == "task"
        assert dev.post(dev.answer(offer)).status_code == 202
    t.join(60)
    return [meter.take(dev) for dev in devices]


def test_the_default_int8_block_task_moves_at_most_36_kb_per_client_per_round(tmp_path):
    """Issue #23's acceptance, measured at the gateway: every body up and down (offer, integers, bundle
    files, report; the device has its own data and fetched /v1/config once) of the default digits int8
    block task (K of the 101-forward budget), per client in a round after the device's first."""
    from baffle_edge import downloads
    cfg = dataclasses.replace(CFG, clients=2, runtime="onnxruntime-int8", noise="block", forward_budget=101,
                              perturbations_per_call=1, k=100, rounds=2, round_timeout=60.0)
    lv = Live(tmp_path, cfg)
    try:
        own = tmp_path / "own.npz"
        np.savez(own, x=lv.fed.data.x_train[:64], y=lv.fed.data.y_train[:64])
        lean = [device_on(lv, c, data=str(own)) for c in range(cfg.clients)]
        for dev in lean:
            act_as(lv, dev)
            dev.config = dev._check(dev.request("GET", "/v1/config"), "config").json()
        meter = Meter(lv.http)
        first = one_round(lv, lean, 0, meter)
        full = device_on(lv, 1, data=str(own), download="full")  # client 1 again, downloading as before
        full.config = lean[1].config
        second = one_round(lv, [lean[0], full], 1, meter)
        assert [r["clients_accepted"] for r in lv.rows] == [2, 2]
        assert lv.fed.k > 3000
        steady, heavy = second
        up = sum(v for k, v in steady.items() if k.startswith("up"))
        assert 6_000 < up < 7_000  # K 16-bit values + ~100 bytes of header and step record
        assert "down weights" not in steady and steady["down weights/int8"] < 24_000
        assert sum(steady.values()) <= BUDGET, steady  # steady state: deltas against what the device holds
        assert sum(first[0].values()) <= 48 * 1024, first[0]  # a device's first round: everything once (zlib)
        assert sum(heavy.values()) > 5 * sum(steady.values()), heavy  # float32 weights, every file as stored
        # the lean device ran exactly the integers the round's float weights quantize to
        weights = np.frombuffer(lv.board.current.weights, "<f4")
        assert lean[0].ints_cache == (lv.board.current.version,
                                      downloads.int_payload(lv.fed.server.quant_table, weights))
    finally:
        lv.close()
