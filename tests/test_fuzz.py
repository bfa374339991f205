"""Fuzz the protocol boundary with seeded mutations of valid reports and tasks.

Contract: parsing (``ClientReport.from_json/from_npz``, ``RoundTask.from_json``) and
``check_against`` raise nothing but ``ValueError``; a report that passes both must satisfy an
independent oracle (right round/client/model, 1-D float64 finite losses of the right length, a
positive sample count). Counts are printed (pytest -s) for docs/faults.md.
"""
import copy
import io
import json
import math
import random

import numpy as np
import pytest

from baffle_edge.protocol import ClientReport, RoundTask, Scheme

SEED = 20240608
N_JSON, N_NPZ, N_TASK = 5000, 3000, 3000  # >= 10,000 mutated inputs in total


def base_task(**kw) -> RoundTask:
    fields = {"round": 7, "client": 3, "seed": 11, "k": 5, "sigma": 1e-4, "model_version": "0123456789abcdef"}
    return RoundTask(**(fields | kw))


def base_report(task: RoundTask) -> ClientReport:
    return ClientReport(round=task.round, client=task.client, losses=np.linspace(2.0, 2.5, task.k),
                        base_losses=[2.2], num_samples=32, model_version=task.model_version, runtime="torch",
                        seconds=0.01)


WEIRD = [None, True, False, 0, -1, 1, 2**31, 2**64, 10**400, -(10**400), 1e308, -0.0, 0.5, "", "x" * 300, "1.5",
         "NaN", [], [1], [[1.0]], [True], ["1.0"], {}, {"a": 1}, [10**400], [1e308, -1e308], [None]]
NONFINITE_TEXT = ["NaN", "Infinity", "-Infinity"]


def oracle_ok(r: ClientReport, t: RoundTask) -> bool:
    """Independent statement of what an acceptable report is."""
    want = t.local_steps * t.losses_per_step
    want_base = t.local_steps if Scheme(t.scheme) is Scheme.FORWARD else (0, t.local_steps)
    return (type(r.round) is int and r.round == t.round and type(r.client) is int and r.client == t.client
            and r.model_version == t.model_version and isinstance(r.losses, np.ndarray)
            and r.losses.dtype == np.float64 and r.losses.ndim == 1 and r.losses.size == want
            and bool(np.all(np.isfinite(r.losses))) and r.base_losses.dtype == np.float64
            and r.base_losses.ndim == 1 and r.base_losses.size in np.atleast_1d(want_base)
            and bool(np.all(np.isfinite(r.base_losses))) and type(r.num_samples) is int and r.num_samples >= 1
            and isinstance(r.seconds, float) and math.isfinite(r.seconds) and r.seconds >= 0)


def mutate_obj(rng: random.Random, d: dict) -> dict:
    d = json.loads(json.dumps(d))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        key = rng.choice(sorted(d) + ["extra"])
        if op == 0:
            d.pop(key, None)
        elif op == 1:
            d[key] = copy.deepcopy(rng.choice(WEIRD))  # a shared WEIRD list must not end up inside itself
        elif op == 2 and isinstance(d.get(key), list) and d[key]:
            lst = d[key]
            i = rng.randrange(len(lst))
            lst[i] = copy.deepcopy(rng.choice(WEIRD + [float("nan"), float("inf"), -float("inf")]))
        elif op == 3 and isinstance(d.get(key), list):
            d[key] = d[key] + [1.0] if rng.random() < 0.5 else d[key][:-1]
        elif op == 4 and isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool):
            d[key] = d[key] + rng.choice([-1, 1, 2**32, -(2**32)])
        else:
            d[key] = rng.choice(["42", 4.2, [d.get(key)], {"v": d.get(key)}])
    return d


def mutate_text(rng: random.Random, text: str) -> bytes:
    b = bytearray(text.encode())
    op = rng.randrange(5)
    if op == 0 and b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:
        s = b.decode(errors="replace")
        for lit in ("2.0", "32", "7", "3"):
            s = s.replace(lit, rng.choice(NONFINITE_TEXT + ["1e999", "-0", "1" * 400, "[" * 5000]), 1)
        b = bytearray(s.encode())
    elif op == 3:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    else:
        b = bytearray(("[" * rng.randint(1000, 100_000)).encode())
    return bytes(b)


def npz_variant(rng: random.Random, r: ClientReport) -> bytes:
    header = {k: v for k, v in r.to_dict().items() if k not in ("losses", "base_losses")}
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), "losses": r.losses,
              "base_losses": r.base_losses}
    op = rng.randrange(6)
    name = rng.choice(["losses", "base_losses", "header"])
    if op == 0:
        arrays[name] = rng.choice([
            r.losses.astype(np.complex128) + 1j, r.losses.reshape(1, -1), r.losses.astype(str),
            r.losses.astype(bool), np.array(2.0), np.zeros((0,)), r.losses.astype(np.float16),
            np.array([np.nan] * r.losses.size), r.losses.astype(np.int64), np.zeros((2, 2, 2)),
            np.array([b"x"] * 3), np.array([(1.0, 2.0)], dtype=[("a", "f8"), ("b", "f8")])])
    elif op == 1:
        arrays.pop(name)
    elif op == 2:
        h = mutate_obj(rng, header)
        arrays["header"] = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)
    elif op == 3:
        arrays["header"] = np.frombuffer(mutate_text(rng, json.dumps(header)), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = bytearray(buf.getvalue())
    if op >= 4:  # corrupt the container itself
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if op == 5:
            data = data[: rng.randrange(len(data))]
    return bytes(data)


def judge(parse, payload, task, stats):
    try:
        r = parse(payload)
    except ValueError:
        stats["rejected_parse"] += 1
        return
    try:
        r.check_against(task)
    except ValueError:
        stats["rejected_check"] += 1
        return
    stats["accepted"] += 1
    assert oracle_ok(r, task), f"accepted an invalid report from {payload[:300]!r}: {r}"


def test_fuzz_reports_and_tasks(capsys):
    rng = random.Random(SEED)
    stats = {"rejected_parse": 0, "rejected_check": 0, "accepted": 0}
    tasks = [base_task(), base_task(scheme="central", k=3), base_task(local_steps=2, k=2)]
    for i in range(N_JSON):
        t = tasks[i % len(tasks)]
        good = ClientReport(round=t.round, client=t.client, losses=np.linspace(1, 2, t.local_steps * t.losses_per_step),
                            base_losses=[2.0] * (t.local_steps if Scheme(t.scheme) is Scheme.FORWARD else 0),
                            num_samples=32, model_version=t.model_version, seconds=0.5)
        d = good.to_dict()
        payload = (json.dumps(mutate_obj(rng, d)) if i % 2 else mutate_text(rng, good.to_json()))
        judge(ClientReport.from_json, payload, t, stats)
    for i in range(N_NPZ):
        t = tasks[0]
        judge(ClientReport.from_npz, npz_variant(rng, base_report(t)), t, stats)
    task_stats = {"rejected": 0, "accepted": 0}
    good_task = base_task().to_dict()
    for i in range(N_TASK):
        payload = json.dumps(mutate_obj(rng, good_task)) if i % 2 else mutate_text(rng, base_task().to_json())
        try:
            t = RoundTask.from_json(payload)
        except ValueError:
            task_stats["rejected"] += 1
            continue
        task_stats["accepted"] += 1
        assert t == RoundTask.from_json(t.to_json())  # what is accepted round-trips
        assert type(t.k) is int and 1 <= t.k and math.isfinite(t.sigma) and t.sigma > 0
    total = N_JSON + N_NPZ + N_TASK
    with capsys.disabled():
        print(f"\nfuzz: {total} mutated inputs; reports {stats}; tasks {task_stats}; 0 crashes")
    assert total >= 10_000
    # the mutations really exercise both sides of the boundary
    assert stats["rejected_parse"] > 1000 and stats["rejected_check"] > 100 and stats["accepted"] > 10
    assert task_stats["rejected"] > 1000 and task_stats["accepted"] > 10


@pytest.mark.parametrize("payload", [
    '{"losses": [1e999]}', "[" * 100_000, '{"sigma": ' + "9" * 400 + "}",
])
def test_pathological_json_is_a_value_error(payload):
    for parse in (ClientReport.from_json, RoundTask.from_json):
        with pytest.raises(ValueError):
            parse(payload)
