"""A full client round (``client.run_task``) per runtime, K and scheme, next to the same number of
plain forwards on the same session: the ratio is BAFFLE's overhead (noise generation, writing
perturbed weights) on top of the forwards it cannot avoid. Target: ratio <= 1.15.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from baffle_edge.client import run_task
from baffle_edge.bench_report import K_RATIO
from baffle_edge.protocol import Scheme

from baffle_edge.runtimes import REGISTRY

from .cases import DEVICE, FULL, MODELS, dtype_of, plugin_params, runtime_names
from .conftest import forward_loss_fn, forward_losses_fn, plugin_info, task_for

BATCH = 32  # reference client batch
TARGET_RATIO = K_RATIO  # defined once, with the other targets, in baffle_edge/bench_report.py
QUICK = {("lenet-8", 10, "forward"), ("lenet-8", 10, "central"), ("lenet-8", 100, "forward")}  # the default set; everything else needs --bench-full
DEVICE_CASE = ("lenet-8", 10, "forward")  # the device subset (--bench-device)
CASES = [pytest.param(m, k, s, id=f"{m}-K{k}-{s}", marks=([] if (m, k, s) in QUICK else [FULL])
                      + ([DEVICE] if (m, k, s) == DEVICE_CASE else []))
         for m in ("lenet-8", "lenet-28", "wrn-10-2", "mobilenet-28") for k in (10, 100, 500)
         for s in ("forward", "central")]


def runtimes() -> list:
    """Every runtime on its default provider (id: the runtime), and the ONNX Runtime runtimes on the plugin EPs asked
    for with BAFFLE_BENCH_PLUGINS (docs/npu.md; id: runtime-provider)."""
    plain = [pytest.param((r, None), id=r) for r in runtime_names()]
    return plain + [pytest.param((r, p), id=f"{r}-{p}") for r in runtime_names()
                    if r in REGISTRY and REGISTRY[r].engine == "onnxruntime" for p in plugin_params(REGISTRY[r].domain)]


@pytest.mark.parametrize("case_id,k,scheme", CASES)
@pytest.mark.parametrize("runtime_provider", runtimes())
def test_client_round(benchmark, sessions, measuring, runtime_provider, case_id, k, scheme):
    runtime, provider = runtime_provider
    case = MODELS[case_id]
    session = sessions.get(runtime, case, provider)
    batch = case.batch(BATCH)
    weights = case.weights()
    task = task_for(runtime, k=k, scheme=scheme)
    forwards_n = k + 1 if Scheme(scheme) is Scheme.FORWARD else 2 * k
    rounds = 1 if (k >= 500 or case_id.startswith("wrn")) else 5
    round_seconds: list[float] = []
    # side by side: the same number of plain forwards on the same session, same batch, their
    # losses gathered and computed as the round computes them, timed right before each round (in
    # pedantic's untimed setup), so a load change on a shared machine hits both alike
    one_forward, plain_forwards = forward_loss_fn(session, batch), forward_losses_fn(session, batch)
    forward_seconds: list[float] = []
    base_losses: list[float] = []

    def forwards():
        t0 = time.perf_counter()
        base_losses.append(float(plain_forwards(forwards_n)[-1]))
        forward_seconds.append(time.perf_counter() - t0)

    def client_round():
        report = run_task(task, session, [batch], weights=weights, runtime=runtime)
        round_seconds.append(report.seconds)
        return report

    benchmark.group = f"k_estimation {case_id} {scheme}"
    report = benchmark.pedantic(client_round, setup=forwards, rounds=rounds if measuring else 1, warmup_rounds=0)
    base = base_losses[-1]
    pairs = sorted(r / f for r, f in zip(round_seconds, forward_seconds))
    t_round, t_fwd = statistics.median(round_seconds), statistics.median(forward_seconds)
    ratio = statistics.median(pairs)
    benchmark.extra_info.update(case.info(), runtime=runtime, dtype=dtype_of(runtime), batch=BATCH, K=k,
                                scheme=scheme, forwards=forwards_n, round_s=t_round, forwards_s=t_fwd,
                                ratio_to_forwards=ratio, ratio_pairs=pairs, target_ratio=TARGET_RATIO,
                                meets_target=bool(ratio <= TARGET_RATIO), stage="k_estimation",
                                provider=provider or "default", **plugin_info(session, provider))

    report.check_against(task)  # K (or 2K) finite losses for this task
    pert = report.losses
    assert pert.size == task.losses_per_step and np.all(np.isfinite(pert))
    if Scheme(scheme) is Scheme.FORWARD:  # the unperturbed loss is exactly a plain forward's
        assert report.base_losses[0] == pytest.approx(base, rel=1e-6, abs=1e-7)
        ref = report.base_losses[0]
    else:
        ref = base
    assert np.all(np.abs(pert - ref) < 0.5), "perturbed losses far from L(w): perturbation too large"
    assert np.ptp(pert) > 0, "every perturbed loss is identical: the perturbation was not applied"
    assert one_forward() == pytest.approx(base, rel=1e-6), "session weights were not restored after the round"
