"""Batched-K evaluation (issue 9): a client round with P perturbations per runtime call, next to the
sequential round (P = 1) of the same runtime in the same run; LeNet at 28x28, batch 32.

Targets (docs/batched-k.md): batched >= 2x faster than sequential (torch fp32, ORT int8); ORT int8
batched >= 5x faster than torch fp32 sequential (in-place). Quick default K=24 (25 forwards, fits
P=25 exactly); --bench-full: K=100. Every benchmark asserts the batched losses equal the sequential
ones (fp32: 1e-5 relative; int8: bit-identical).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from baffle_edge.client import run_task
from baffle_edge.runtimes import get_runtime

from . import store
from .cases import DEVICE, MODELS, dtype_of
from .conftest import build_artifact, task_for

BATCH = 32
CASE = "lenet-28"
PS = (1, 5, 10, 25)
RUNTIMES = ("torch", "onnxruntime-int8")
TARGET_VS_SEQUENTIAL = 2.0
TARGET_INT8_VS_TORCH = 5.0
_cache: dict = {}


def _session(runtime: str, p: int, workdir, threads):
    case = MODELS[CASE]
    key = ("artifact", runtime)
    if runtime == "torch":  # a fresh module per session (a session writes its weights into it)
        artifact = case.build()
    else:
        artifact = _cache[key] = _cache.get(key) or build_artifact(runtime, case, workdir / runtime)
    session = get_runtime(runtime, perturbations_per_call=p).load(artifact, threads=threads)
    session.set_weights(case.weights())
    return session


def _timed_round(runtime, session, k, rounds):
    case = MODELS[CASE]
    task, batch, w = task_for(runtime, k=k), case.batch(BATCH), case.weights()
    times, report = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        report = run_task(task, session, [batch], weights=w, runtime=runtime)
        times.append(time.perf_counter() - t0)
    return report, statistics.median(times)


def _sequential(runtime, k, rounds, workdir, threads):
    """The P=1 round of ``runtime`` (cached for the run: every P is compared with the same one)."""
    key = ("seq", runtime, k)
    if key not in _cache:
        _cache[key] = _timed_round(runtime, _session(runtime, 1, workdir, threads), k, rounds)
    return _cache[key]


def _runtimes():  # ORT int8 is in the device subset (--bench-device); torch is not on a device
    return [pytest.param(r, marks=[DEVICE] if r == "onnxruntime-int8" else []) for r in RUNTIMES]


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("runtime", _runtimes())
def test_batched_round(benchmark, tmp_path_factory, bench_full, bench_threads, measuring, runtime, p):
    k = 100 if bench_full else 24
    rounds = 3 if measuring else 1
    workdir = _cache.setdefault("workdir", tmp_path_factory.mktemp("batched"))
    seq_report, seq_s = _sequential(runtime, k, rounds, workdir, bench_threads)
    # the torch fp32 round beside it where torch is installed (a device without torch: --bench-bundles)
    torch_s = _sequential("torch", k, rounds, workdir, bench_threads)[1] if store.have_torch() else None
    session = _session(runtime, p, workdir, bench_threads)
    times: list[float] = []

    def client_round():
        report, t = _timed_round(runtime, session, k, 1)
        times.append(t)
        return report

    benchmark.group = "batched_k"
    report = benchmark.pedantic(client_round, rounds=rounds, warmup_rounds=0)
    t = statistics.median(times)
    vs_seq, vs_torch = seq_s / t, (torch_s / t if torch_s else None)
    case = MODELS[CASE]
    benchmark.extra_info.update(
        case.info(), runtime=runtime, dtype=dtype_of(runtime), batch=BATCH, K=k, perturbations_per_call=p,
        round_s=t, sequential_round_s=seq_s, torch_fp32_sequential_round_s=torch_s,
        speedup_vs_sequential=vs_seq, speedup_vs_torch_fp32_sequential=vs_torch,
        target_vs_sequential=TARGET_VS_SEQUENTIAL,
        meets_target_vs_sequential=bool(p == 1 or vs_seq >= TARGET_VS_SEQUENTIAL),
        target_vs_torch=TARGET_INT8_VS_TORCH if "int8" in runtime else None,
        meets_target_vs_torch=bool(vs_torch >= TARGET_INT8_VS_TORCH) if "int8" in runtime and vs_torch else None,
        stage="batched_k")

    assert report.losses.shape == seq_report.losses.shape
    if "int8" in runtime:
        np.testing.assert_array_equal(report.losses, seq_report.losses)
        np.testing.assert_array_equal(report.base_losses, seq_report.base_losses)
    else:
        np.testing.assert_allclose(report.losses, seq_report.losses, rtol=1e-5, atol=0)
        np.testing.assert_allclose(report.base_losses, seq_report.base_losses, rtol=1e-5, atol=0)
    assert np.ptp(report.losses) > 0


# ------------------------------------------------------------------ auto-P (measured on the device)
AUTO_CASES = ("lenet-8", "lenet-28", "mlp", "wrn-10-2")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case_id", [pytest.param(c, marks=[DEVICE] if c == "lenet-8" else []) for c in AUTO_CASES])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_auto_p_round(benchmark, tmp_path_factory, bench_full, measuring, runtime, case_id, threads, monkeypatch):
    """A round with ``perturbations_per_call="auto"`` next to the P = 1 round of the same runtime,
    timed alternately in the same run (so machine load hits both alike); the calibration (fresh:
    a temporary cache) goes to extra_info. auto must never be much slower than P = 1."""
    from baffle_edge.runtimes import batching
    if case_id == "wrn-10-2" and not bench_full:
        pytest.skip("WRN-10-2 auto-P: run with --bench-full")
    if not measuring and (case_id, threads) != ("lenet-28", 1):
        pytest.skip("auto-P grid: measured with --benchmark-only (a plain run checks one case)")
    monkeypatch.setenv(batching.CACHE_ENV, str(tmp_path_factory.mktemp("auto-p")))
    case = MODELS[case_id]
    k = 100 if bench_full else 24
    workdir = _cache.setdefault(("auto-workdir", case_id), tmp_path_factory.mktemp(f"auto-{case_id}"))
    artifact = build_artifact(runtime, case, workdir / runtime)
    w = case.weights()
    task, batch = task_for(runtime, k=k), case.batch(BATCH)

    def load(p):
        s = get_runtime(runtime, perturbations_per_call=p).load(case.build() if runtime == "torch" else artifact,
                                                                threads=threads)
        s.set_weights(w)
        return s

    auto, seq = load("auto"), load(1)
    auto.prepare(batch.x)  # the calibration: at the first batch
    cal = auto.calibration
    t_auto, t_seq = [], []

    order = [((seq, t_seq), (auto, t_auto)), ((auto, t_auto), (seq, t_seq))]  # ABBA: neither always runs first

    def both():
        for s, times in order[len(t_seq) % 2]:
            t0 = time.perf_counter()
            report = run_task(task, s, [batch], weights=w, runtime=runtime)
            times.append(time.perf_counter() - t0)
        return report

    benchmark.group = f"auto_p-{case_id}"
    report = benchmark.pedantic(both, rounds=6 if measuring else 1, warmup_rounds=0)
    ratio = statistics.median(t_seq) / statistics.median(t_auto)
    pair_ratios = sorted(a / b for a, b in zip(t_seq, t_auto))  # round by round: the spread of the ratio
    benchmark.extra_info.update(
        case.info(), runtime=runtime, dtype=dtype_of(runtime), batch=BATCH, K=k, threads=threads,
        auto_p=cal.p, calibration=cal.to_json(), auto_round_s=statistics.median(t_auto),
        p1_round_s=statistics.median(t_seq), speedup_auto_vs_p1=ratio, speedup_pairs=pair_ratios,
        target_auto_vs_p1=0.97, stage="auto_p")
    fell_back = "now P=1" in (cal.stopped or "")  # a re-check found P no faster than P = 1 (runtimes/batching.py)
    assert auto.perturbations_per_call == (1 if fell_back else cal.p) and not cal.cached
    assert report.losses.shape == (k,) and np.ptp(report.losses) > 0
