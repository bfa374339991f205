"""Compact reports (baffle_edge/compact.py): the round trip within the stated bound, the server's decode
of a real int8 block report against the float64 path, and every malformed case refused by name."""
import dataclasses
import struct

import numpy as np
import pytest

from baffle_edge import compact
from baffle_edge.protocol import ClientReport, RoundTask


def report(k=300, steps=1, base=True, seed=0, spread=1e-3) -> ClientReport:
    rng = np.random.default_rng(seed)
    bases = 2.3 + 0.01 * rng.standard_normal(steps)
    losses = np.concatenate([b + spread * rng.standard_normal(k) for b in bases])
    return ClientReport(round=7, client=3, losses=losses, base_losses=bases if base else [], num_samples=32 * steps,
                        model_version="0123456789abcdef", runtime="onnxruntime-int8", seconds=1.25)


@pytest.mark.parametrize("bits", compact.BITS)
@pytest.mark.parametrize("steps,base", [(1, True), (5, True), (1, False)])
def test_round_trip_is_within_the_stated_bound(bits, steps, base):
    r = report(steps=steps, base=base)
    data = compact.encode(r, bits=bits)
    assert len(data) == compact.wire_size(r, bits=bits) == 36 + 16 + 16 + (steps if base else 1) * 16 + r.losses.size * bits // 8
    back = compact.decode(data)
    for f in ("round", "client", "num_samples", "model_version", "runtime", "seconds", "version"):
        assert getattr(back, f) == getattr(r, f)
    assert np.array_equal(back.base_losses, r.base_losses)  # base losses travel exactly
    err = np.abs(back.losses - r.losses)
    assert np.all(err <= compact.bound(r, bits=bits)) and err.max() > 0  # quantized, never past scale / 2
    spread = np.abs(r.losses - np.repeat(r.base_losses, 300)).max() if base else np.ptp(r.losses)
    assert err.max() <= spread / (2 ** bits - 2) * 1.01
    assert compact.encode(back, bits=bits) == data  # decoding is the fixed point: re-encoding is identical


def test_constant_losses_and_the_extremes_are_exact():
    r = dataclasses.replace(report(k=4), losses=np.full(4, 2.0), base_losses=[2.0])
    assert np.array_equal(compact.roundtrip(r).losses, r.losses)
    r = dataclasses.replace(report(k=3), losses=np.array([1.0, 3.0, 2.0]), base_losses=[2.0])
    assert np.array_equal(compact.roundtrip(r).losses, r.losses)  # +-max and the reference itself are exact


def test_the_layout_is_the_documented_one():
    r = report(k=2)
    r = dataclasses.replace(r, losses=np.array([2.5, 2.0]), base_losses=[2.25])
    data = compact.encode(r)
    assert data[:4] == b"BFLR" and data[4:8] == bytes([1, 16, 2, 1])
    assert struct.unpack_from("<IIIIHBBd", data, 8) == (7, 3, 32, 2, 1, 16, 16, 1.25)
    assert data[36:52] == b"0123456789abcdef" and data[52:68] == b"onnxruntime-int8"
    ref, scale = struct.unpack_from("<dd", data, 68)
    assert ref == 2.25 and scale == 0.25 / 32767
    assert struct.unpack_from("<hh", data, 84) == (32767, -32767) and len(data) == 88


def corrupt(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_malformed_reports_are_refused_by_name():
    r = report(k=8)
    data = compact.encode(r)
    step = 36 + 32  # the first step record
    cases = {
        "truncated": [data[:10], data[:-1], data[:step + 8]],
        "oversized": [data + b"\0"],
        "bad magic": [b"XXXX" + data[4:]],
        "format version": [corrupt(data, 4, "<B", 9)],
        "protocol version": [corrupt(data, 6, "<B", 1)],
        "bits": [corrupt(data, 5, "<B", 12)],
        "flag": [corrupt(data, 7, "<B", 3)],
        "scale": [corrupt(data, step + 8, "<d", float("nan")), corrupt(data, step + 8, "<d", float("inf")),
                  corrupt(data, step + 8, "<d", -1e-3)],
        "reference": [corrupt(data, step, "<d", float("nan"))],
        "reserved": [corrupt(data, step + 16, "<h", -32768)],
        "seconds": [corrupt(data, 28, "<d", float("nan"))],
        "not text": [corrupt(data, 36, "<B", 0xFF)],
        "overflows": [corrupt(data, step + 8, "<d", 1e306)],
        "outside": [corrupt(data, 24, "<H", 0)],
    }
    for why, bodies in cases.items():
        for body in bodies:
            with pytest.raises(ValueError, match=why):
                compact.decode(body)
    with pytest.raises(ValueError, match="expected bytes"):
        compact.decode("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        compact.encode(r, bits=12)


def test_a_wrong_count_is_refused_against_the_task():
    task = RoundTask(round=7, client=3, seed=1, k=9, sigma=1e-4, model_version="0123456789abcdef")
    back = compact.decode(compact.encode(report(k=8)))
    with pytest.raises(ValueError, match="expected 9 values"):
        back.check_against(task)


@pytest.fixture(scope="module")
def int8_block_round():
    """One real int8 block report of the default digits task (K of the 101-forward budget) and its server."""
    from baffle_edge.simulate import Federation, TrainConfig
    cfg = TrainConfig(clients=2, rounds=2, workers=1, runtime="onnxruntime-int8", noise="block",
                      forward_budget=101, perturbations_per_call=1, report_encoding="json")
    fed = Federation(cfg)
    task = fed.task(0, 0)
    return fed, task, fed.baffle_client(task, fed.batches(0, 0))


@pytest.mark.parametrize("bits,max_rel", [(16, 5e-4), (8, 0.1)])  # measured: 1.5e-4, 3.9e-2
def test_server_decode_of_a_compact_int8_block_report_equals_the_float_path(int8_block_round, bits, max_rel):
    fed, task, float_report = int8_block_round
    assert task.k > 3000 and task.noise.value == "block"
    back = compact.roundtrip(float_report, bits=bits)
    assert np.all(np.abs(back.losses - float_report.losses) <= compact.bound(float_report, bits=bits))
    g_float = fed.server.decode(task, float_report, fed.samples(task)).gradient
    g_compact = fed.server.decode(task, back, fed.samples(task)).gradient
    rel = np.linalg.norm(g_compact - g_float) / np.linalg.norm(g_float)
    assert 0 < rel <= max_rel, rel  # the gradient moves by the quantization only, by at most this much
    assert compact.wire_size(back, bits=bits) == len(compact.encode(back, bits=bits)) < 0.12 * len(float_report.to_json())
