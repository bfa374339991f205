import json

import numpy as np
import pytest

from baffle_edge.perturb import NoiseKind
from baffle_edge.protocol import PROTOCOL_VERSION, ClientReport, RoundTask, Scheme, wire_bytes


def task(**kw):
    return RoundTask(**({"round": 3, "client": 1, "seed": 9, "k": 4, "sigma": 1e-4, "model_version": "abc"} | kw))


def report(t=None, **kw):
    t = t or task()
    fields = {"round": t.round, "client": t.client, "losses": np.linspace(1, 2, t.k),
              "base_losses": [1.5], "num_samples": 32, "model_version": t.model_version}
    return ClientReport(**(fields | kw))


def test_task_json_roundtrip():
    t = task(scheme="central", noise="rademacher", noise_scope="shared")
    assert RoundTask.from_json(t.to_json()) == t
    assert t.noise_client == 0xFFFFFFFF and t.losses_per_step == 8


def test_report_json_and_npz_roundtrip_exact():
    r = report(losses=[0.1 + 1e-17, 1 / 3, 2.0, np.pi])
    for back in (ClientReport.from_json(r.to_json()), ClientReport.from_npz(r.to_npz())):
        assert np.array_equal(back.losses, r.losses) and np.array_equal(back.base_losses, r.base_losses)
        assert back.round == r.round and back.model_version == r.model_version
    back.check_against(task())
    assert wire_bytes(r) < 400


@pytest.mark.parametrize("mutate,field", [
    (dict(losses=[1.0, 2.0]), "losses"),
    (dict(losses=[1.0, float("nan"), 2.0, 3.0]), "losses"),
    (dict(losses=[1.0, float("inf"), 2.0, 3.0]), "losses"),
    (dict(base_losses=[]), "base_losses"),
    (dict(base_losses=[float("nan")]), "base_losses"),
    (dict(round=4), "round"),
    (dict(client=2), "client"),
    (dict(model_version="stale"), "model_version"),
])
def test_report_mismatches_name_the_field(mutate, field):
    with pytest.raises(ValueError, match=field):
        report(**mutate).check_against(task())


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(losses="1,2,3"), "losses"),
    (lambda d: d.update(losses=[1, "x"]), "losses"),
    (lambda d: d.update(num_samples=0), "num_samples"),
    (lambda d: d.update(num_samples=True), "num_samples"),
    (lambda d: d.update(round=-1), "round"),
    (lambda d: d.update(seconds=-3.0), "seconds"),
    (lambda d: d.update(extra=1), "unknown fields"),
    (lambda d: d.pop("client"), "client"),
])
def test_malformed_report_json_is_rejected(mutate, field):
    d = json.loads(report().to_json())
    mutate(d)
    with pytest.raises(ValueError, match=field):
        ClientReport.from_json(json.dumps(d))


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe", b"[]", b"null", b'"str"'])
def test_garbage_is_a_value_error(payload):
    with pytest.raises(ValueError):
        ClientReport.from_json(payload)
    with pytest.raises(ValueError):
        RoundTask.from_json(payload)


def test_corrupt_or_pickled_npz_is_rejected():
    good = report().to_npz()
    with pytest.raises(ValueError):
        ClientReport.from_npz(good[: len(good) // 2])
    import io
    buf = io.BytesIO()
    np.savez(buf, header=np.array([{"evil": 1}], dtype=object), losses=np.zeros(4), base_losses=np.zeros(1))
    with pytest.raises(ValueError):
        ClientReport.from_npz(buf.getvalue())


@pytest.mark.parametrize("bad", [dict(k=0), dict(sigma=0.0), dict(sigma=float("nan")), dict(scheme="backward"),
                                 dict(seed=-1), dict(client=2**32 - 1), dict(version=1), dict(version=3),
                                 dict(local_steps=0), dict(local_lr=-0.1), dict(clip=0.0), dict(clip=float("inf")),
                                 dict(k=1_000_000, local_steps=4295),  # k' = step*K + k would pass 2^32
                                 dict(domain="int8-step", noise="gaussian")])
def test_invalid_tasks(bad):
    with pytest.raises(ValueError):
        task(**bad)


def test_version_1_messages_are_refused_by_name():
    d = task().to_dict()
    d["version"] = 1
    with pytest.raises(ValueError, match="protocol version 1 is not supported .*speaks 2"):
        RoundTask.from_json(json.dumps(d))
    del d["local_lr"], d["clip"]  # what a version-1 server really sent
    with pytest.raises(ValueError, match="version"):
        RoundTask.from_json(json.dumps(d))


def test_task_fields_are_enums_and_round_trip():
    t = task(scheme="central", noise="rademacher", local_lr=0.05, clip=0.3, local_steps=3)
    assert t.scheme is Scheme.CENTRAL and t.noise is NoiseKind.RADEMACHER and t.central
    back = RoundTask.from_json(t.to_json())
    assert back == t and back.local_lr == 0.05 and back.clip == 0.3
    assert RoundTask.from_json(task(clip=None).to_json()).clip is None
    assert task(k=1_000_000, local_steps=4294).local_steps == 4294  # 4.294e9 counter words < 2^32: allowed


def test_protocol_version_constant():
    assert json.loads(task().to_json())["version"] == PROTOCOL_VERSION
