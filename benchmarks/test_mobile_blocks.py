"""Block noise vs isotropic noise at equal client compute on the mobile-class model (issue 29): the
depthwise-separable MobileNet on Fashion-MNIST (28x28, Debian's ``dataset-fashion-mnist``; skipped when it
is not installed), on ONNX Runtime fp32 and int8, whose rows run through the bundle's segment graphs (the
``chain`` rule: 1/C of the row's module plus every module after it; ONNX Runtime's ``graph`` rule prices a
chain the same).

The model: MobileNet after 40 Adam steps (batch 32, lr 3e-3); one batch of 32 held out. Side by side on
the same weights and batch, interleaved by seed:
* isotropic: K = 100 perturbations of the domain's noise (Gaussian fp32, Rademacher int8), 101 forwards;
* block: K' = ``equal_compute_k(model, 101, "chain")`` block perturbations (the same MACs), size draw;
* adaptive: the adaptive draw (docs/noise.md section 11) after one observed size-draw round, K from
  ``BlockDraw.k_for_budget(101)`` (the same expected MACs).
Each is judged by the cosine of the decoded estimate to the exact gradient of the batch. Target (issue
29): block cosine >= 3x isotropic at equal MACs, met by the adaptive draw (measured 2026-12-03, 5 seeds, 1
thread: fp32 9.3x at 45 forward-equivalents, int8 7.0x at 52, K = 2,068, the 4x cap); the size draw alone
reaches 2.2x / 2.3x (asserted > 1.2x over the 5 seeds of a measuring run).
"""
from __future__ import annotations

import statistics

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="MobileNet block noise: needs torch (pip install torch==2.13.0)")
from baffle_edge.runtimes import REGISTRY, get_runtime
from baffle_edge.runtimes.torch_incremental import block_macs, equal_compute_k

from baffle_edge.block_draw import BlockDraw
from baffle_edge.client import run_task
from baffle_edge.estimator import cosine
from baffle_edge.export.bundle import ExportConfig, export_bundle
from baffle_edge.models import ModelConfig
from baffle_edge.params import flat_params
from baffle_edge.perturb import NoiseKind
from baffle_edge.protocol import Domain, RoundTask

from .cases import FULL
from .test_blocks import _round
from .test_wrn_blocks import _data, trained

TARGET = 3.0  # block cosine / isotropic cosine at equal MACs (issue 29)
K_ISO = 100
STEPS = 40


def trained_mobilenet(data, steps: int = STEPS):
    """MobileNet after ``steps`` Adam steps on Fashion-MNIST, a held-out batch and its exact gradient."""
    return trained(ModelConfig("mobilenet", data.in_channels, data.image_size, 10), data, steps, 3e-3)


@pytest.mark.parametrize("runtime", [pytest.param("onnxruntime", marks=[FULL]), "onnxruntime-int8"])
def test_mobilenet_block_vs_isotropic_at_equal_macs(benchmark, bench_threads, measuring, runtime, tmp_path):
    data = _data()
    model, cfg, batch, exact = trained_mobilenet(data)
    export_bundle(model, cfg, data, tmp_path / "b", ExportConfig(formats=(REGISTRY[runtime].format,)))
    session = get_runtime(runtime).load(tmp_path / "b", threads=bench_threads or 1)
    assert session.block_forward is not None, session.block_forward_reason
    w = flat_params(model).numpy()
    rule = REGISTRY[runtime].block_forward
    full, per = block_macs(model, cfg.image_size, cfg.in_channels, rule=rule)
    k_block = equal_compute_k(model, cfg.image_size, K_ISO + 1, cfg.in_channels, rule=rule)
    domain = Domain(REGISTRY[runtime].domain)
    isotropic = "gaussian" if domain is Domain.FLOAT else "rademacher"

    def task(noise, k, seed, weights=None):
        return RoundTask.for_domain(domain, round=0, client=0, seed=seed, k=k, sigma=1e-4,
                                    noise=NoiseKind(noise), block_weights=weights)

    draw = BlockDraw("adaptive", session.blocks, per / full, domain)
    warm = task("block", k_block, 0)
    draw.observe(warm, run_task(warm, session, [batch], weights=w))
    draw.end_round()
    k_adaptive = draw.k_for_budget(K_ISO + 1)
    runs = {"isotropic": (isotropic, K_ISO, None), "block": ("block", k_block, None),
            "adaptive": ("block", k_adaptive, draw.weights)}

    def measure():
        out = {n: [] for n in runs}
        for seed in range(1, (5 if measuring else 1) + 1):  # interleaved: the runs share the machine's load
            for n, (noise, k, weights) in runs.items():
                out[n].append(_round(session, task(noise, k, seed, weights), batch, w))
        return {n: (statistics.median(t for t, _ in r), [cosine(g, exact) for _, g in r]) for n, r in out.items()}

    res = benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    (t_iso, cos_iso), (t_block, cos_block), (t_ad, cos_ad) = res["isotropic"], res["block"], res["adaptive"]
    sizes = session.blocks.sizes
    fe_block = 1 + k_block * float((per * sizes).sum() / sizes.sum()) / full
    fe_ad = 1 + k_adaptive * draw.expected_cost()
    ratio, ratio_ad = float(np.mean(cos_block) / np.mean(cos_iso)), float(np.mean(cos_ad) / np.mean(cos_iso))
    name = f"mobilenet-{cfg.image_size}"
    benchmark.group = f"block noise {name} {runtime}"
    benchmark.extra_info.update(
        model=name, runtime=runtime, block_rule=rule, isotropic_noise=isotropic, batch=len(batch.y),
        threads=bench_threads or 1, seeds=len(cos_iso), k_isotropic=K_ISO, k_block_equal_macs=k_block,
        forward_equivalents_block=fe_block, k_adaptive=k_adaptive, forward_equivalents_adaptive=fe_ad,
        seconds_isotropic=t_iso, seconds_block=t_block, seconds_adaptive=t_ad,
        cos_isotropic=float(np.mean(cos_iso)), cos_block=float(np.mean(cos_block)), cos_adaptive=float(np.mean(cos_ad)),
        cos_ratio_equal_macs=ratio, cos_ratio_adaptive=ratio_ad, target_ratio=TARGET)
    print(f"\n{name} {runtime}: isotropic ({isotropic}) K={K_ISO}: cos {np.mean(cos_iso):.3f} "
          f"{np.round(cos_iso, 3).tolist()}, {t_iso:.2f} s | block K'={k_block} ({fe_block:.1f} forwards): cos "
          f"{np.mean(cos_block):.3f} {np.round(cos_block, 3).tolist()}, {t_block:.2f} s, {ratio:.1f}x | adaptive "
          f"K={k_adaptive} ({fe_ad:.1f} forwards): cos {np.mean(cos_ad):.3f} {np.round(cos_ad, 3).tolist()}, "
          f"{t_ad:.2f} s, {ratio_ad:.1f}x")
    assert fe_block <= K_ISO + 1 and fe_ad <= K_ISO + 1
    assert ratio_ad >= TARGET  # one seed already clears it (4.6x at seed 1, the plain run's)
    if measuring:  # the size draw's gain needs the seeds: seed 1 alone is 1.1x (int8)
        assert ratio > 1.2
