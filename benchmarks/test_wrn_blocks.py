"""Block noise vs isotropic noise at equal client compute on WideResNet-10-2 (issue 29): GroupNorm and
residual adds, torch's incremental rows (runtimes/torch_residual.py, the ``delta`` rule) and ONNX Runtime's.

Fashion-MNIST (28x28, Debian's ``dataset-fashion-mnist``; skipped when it is not installed). The
model: WRN-10-2 with GroupNorm after 40 Adam steps (batch 32, lr 1e-2); one batch of 32 held out.
Side by side on the same weights and batch, interleaved by seed:
* isotropic: K = 100 Gaussian perturbations, K+1 = 101 full forwards;
* block: K' = ``equal_compute_k(model, 101)`` block perturbations (the same MACs), size draw;
* adaptive: the adaptive draw (docs/noise.md section 11) after one observed size-draw round, K from
  ``BlockDraw.k_for_budget(101)`` (the same expected MACs).
Each is judged by the cosine of the decoded estimate to the exact gradient of the batch. Target
(issue 29's acceptance): block cosine >= 3x isotropic at equal MACs, met by the adaptive draw (4.9x
at 66 forward-equivalents, 5 seeds, 2026-12-03); the size draw alone reaches 2.4x (asserted > 1.5x).

The same comparison on ONNX Runtime fp32 and int8 (``-k onnxruntime``; a bundle exported from the same
model, rows through its graph plan's module and rest segments, export/graph_blocks.py, the ``graph``
rule: K' = 605; int8: Rademacher +-1 steps vs whole-step blocks, leave-one-out baseline). Measured
2026-12-03 (3 seeds, 1 thread): fp32 2.6x (adaptive 3.5x), int8 1.7x (adaptive 0.6x).

int8 also runs both draws with every block capped at ``STEPS_CAP`` whole steps (``max_block_steps``,
docs/noise.md section 10): uncapped, WRN's blocks move up to m_b = 183 steps (the stem) and the adaptive
draw, which weighs modules by the energies it observed, learns from those curvature-swamped rows and
starves the head. Measured 2026-12-04 (AMD EPYC, AVX2, 3 seeds, 1 thread, another training run beside it;
adaptive K = 2,420 at 57 forward-equivalents): adaptive 0.3x uncapped, 2.3x at 8 steps, 2.8x at 4, **3.7x
at 2** (the target); the size draw 1.6x / 1.4x / 1.2x (uncapped 1.7x): the cap helps only the draw that
learns from it.
"""
from __future__ import annotations

import statistics

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="WRN block noise: needs torch (pip install torch==2.13.0)")
from baffle_edge.runtimes.torch_incremental import block_macs, equal_compute_k
from baffle_edge.runtimes.torch_runtime import TorchSession

from baffle_edge.block_draw import BlockDraw
from baffle_edge.client import Batch, run_task
from baffle_edge.data import load_dataset
from baffle_edge.estimator import cosine
from baffle_edge.models import ModelConfig, Norm, build_model
from baffle_edge.params import flat_grad, flat_params
from baffle_edge.perturb import NoiseKind
from baffle_edge.protocol import Domain, RoundTask
from baffle_edge.rows import split_step, step_gradient

TARGET = 3.0  # block cosine / isotropic cosine at equal MACs (issue 29)
K_ISO = 100
STEPS_CAP = 2  # the int8 arms' step cap (train --int8-block-steps; 2 measured best of 2 / 4 / 8)


def _data():
    try:
        return load_dataset("fashion-mnist", seed=0)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): {e}")


def trained_wrn(steps: int = 40):
    """WRN-10-2 after ``steps`` Adam steps, a held-out batch and its exact gradient (float64 loss)."""
    data = _data()
    return trained(ModelConfig("wrn-10-2", data.in_channels, data.image_size, 10, norm=Norm.GROUP), data, steps, 1e-2)


def trained(cfg: ModelConfig, data, steps: int, lr: float):
    """``cfg``'s model after ``steps`` Adam steps of batch 32 on ``data``, a held-out batch of 32 and its exact
    gradient (float64 loss): (model, cfg, batch, gradient)."""
    x, y = torch.from_numpy(data.x_train[:steps * 32 + 32]), torch.from_numpy(data.y_train[:steps * 32 + 32])
    model = build_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]).backward()
        opt.step()
    model.eval().zero_grad(set_to_none=True)
    batch = Batch(x[-32:].numpy(), y[-32:].numpy())
    torch.nn.functional.cross_entropy(model(x[-32:]).double(), y[-32:]).backward()
    g = flat_grad(model).numpy().astype(np.float64)
    model.zero_grad(set_to_none=True)
    return model, cfg, batch, g


def _round(session, task, batch, w):
    report = run_task(task, session, [batch], weights=w)
    base, pert = split_step(task, np.concatenate([report.base_losses, report.losses]))
    return report.seconds, step_gradient(task, 0, pert, base, w.size, blocks=session.blocks, table=session.table,
                                         weights=w)


def _session(runtime: str, model, cfg, tmp_path, threads: int):
    """The runtime's client session on ``model``: torch directly, ONNX Runtime through an exported bundle
    (calibrated on Fashion-MNIST; its graph plan's module and rest segments: export/graph_blocks.py)."""
    if runtime == "torch":
        return TorchSession(model)
    from baffle_edge.export.bundle import ExportConfig, export_bundle
    from baffle_edge.runtimes import REGISTRY, get_runtime
    export_bundle(model, cfg, _data(), tmp_path / "b", ExportConfig(formats=(REGISTRY[runtime].format,)))
    return get_runtime(runtime).load(tmp_path / "b", threads=threads)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "onnxruntime-int8"])
def test_wrn_block_vs_isotropic_at_equal_macs(benchmark, bench_threads, measuring, runtime, tmp_path):
    keep = torch.get_num_threads()
    torch.set_num_threads(bench_threads or 1)
    try:
        seeds = (5 if runtime == "torch" else 3) if measuring else 1
        _compare(benchmark, seeds, runtime, tmp_path, bench_threads or 1)
    finally:
        torch.set_num_threads(keep)


def _compare(benchmark, seeds: int, runtime: str, tmp_path, threads: int):
    from baffle_edge.runtimes import REGISTRY
    model, cfg, batch, exact = trained_wrn()
    session = _session(runtime, model, cfg, tmp_path, threads)
    assert session.block_forward is not None, getattr(session, "block_forward_reason", None)
    w = flat_params(model).numpy()
    rule, domain = REGISTRY[runtime].block_forward, Domain(REGISTRY[runtime].domain)
    isotropic = "gaussian" if domain is Domain.FLOAT else "rademacher"
    full, per = block_macs(model, cfg.image_size, cfg.in_channels, rule=rule)
    k_block = equal_compute_k(model, cfg.image_size, K_ISO + 1, cfg.in_channels, rule=rule)

    def task(noise, k, seed, weights=None, steps=None):
        return RoundTask.for_domain(domain, round=0, client=0, seed=seed, k=k, sigma=1e-4, noise=NoiseKind(noise),
                                    block_weights=weights, max_block_steps=steps)

    def adaptive(steps=None):
        """The adaptive draw (docs/noise.md section 11) after one observed size-draw round (seed 0)."""
        draw = BlockDraw("adaptive", session.blocks, per / full, domain)
        warm = task("block", k_block, 0, steps=steps)
        draw.observe(warm, run_task(warm, session, [batch], weights=w))
        draw.end_round()
        return draw

    draw = adaptive()
    k_adaptive = draw.k_for_budget(K_ISO + 1)
    runs = {isotropic: (isotropic, K_ISO, None, None),
            "block": ("block", k_block, None, None), "adaptive": ("block", k_adaptive, draw.weights, None)}
    if domain is Domain.INT8_STEP:  # whole-step blocks capped at STEPS_CAP steps (--int8-block-steps, noise.md 10)
        capped = adaptive(STEPS_CAP)
        runs[f"block<={STEPS_CAP}"] = ("block", k_block, None, STEPS_CAP)
        runs[f"adaptive<={STEPS_CAP}"] = ("block", capped.k_for_budget(K_ISO + 1), capped.weights, STEPS_CAP)

    def measure():
        out = {n: [] for n in runs}
        for seed in range(1, seeds + 1):  # interleaved: the runs share the machine's load alike
            for n, (noise, k, weights, steps) in runs.items():
                out[n].append(_round(session, task(noise, k, seed, weights, steps), batch, w))
        return {n: (statistics.median(t for t, _ in r), [cosine(g, exact) for _, g in r]) for n, r in out.items()}

    res = benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    (t_iso, cos_iso), (t_block, cos_block), (t_ad, cos_ad) = res[isotropic], res["block"], res["adaptive"]
    fe_ad = 1 + k_adaptive * draw.expected_cost()
    sizes = session.blocks.sizes
    fe_block = 1 + k_block * float((per * sizes).sum() / sizes.sum()) / full
    ratio = float(np.mean(cos_block) / np.mean(cos_iso))
    name = f"wrn-10-2-{cfg.image_size}"
    benchmark.group = f"block noise {name} {runtime}"
    benchmark.extra_info.update(
        model=name, runtime=runtime, block_rule=rule, isotropic_noise=isotropic, batch=len(batch.y),
        threads=torch.get_num_threads() if runtime == "torch" else threads,
        seeds=seeds, k_isotropic=K_ISO, k_block_equal_macs=k_block, forward_equivalents_block=fe_block,
        seconds_isotropic=t_iso, seconds_block=t_block, cos_isotropic=float(np.mean(cos_iso)),
        cos_block=float(np.mean(cos_block)), cos_ratio_equal_macs=ratio, target_ratio=TARGET,
        k_adaptive=k_adaptive, forward_equivalents_adaptive=fe_ad, seconds_adaptive=t_ad,
        cos_adaptive=float(np.mean(cos_ad)), cos_ratio_adaptive=float(np.mean(cos_ad) / np.mean(cos_iso)))
    print(f"\n{name} {runtime}: isotropic ({isotropic}) K={K_ISO}: cos {np.mean(cos_iso):.3f} "
          f"{np.round(cos_iso, 3).tolist()}, {t_iso:.2f} s | block K'={k_block} ({fe_block:.1f} forwards): cos "
          f"{np.mean(cos_block):.3f} {np.round(cos_block, 3).tolist()}, {t_block:.2f} s | ratio {ratio:.1f}x | "
          f"adaptive K={k_adaptive} ({fe_ad:.1f} forwards): cos {np.mean(cos_ad):.3f} {np.round(cos_ad, 3).tolist()}, "
          f"{t_ad:.2f} s, {np.mean(cos_ad) / np.mean(cos_iso):.1f}x")
    for n in list(runs)[3:]:  # the int8 step-capped arms, in the order they ran
        t, cos = res[n]
        key = n.replace("<=", "_max_steps_")
        benchmark.extra_info.update({f"k_{key}": runs[n][1], f"seconds_{key}": t, f"cos_{key}": float(np.mean(cos)),
                                     f"cos_ratio_{key}": float(np.mean(cos) / np.mean(cos_iso))})
        print(f"  {n} K={runs[n][1]}: cos {np.mean(cos):.3f} {np.round(cos, 3).tolist()}, {t:.2f} s, "
              f"{np.mean(cos) / np.mean(cos_iso):.1f}x")
    assert fe_block <= K_ISO + 1 and fe_ad <= K_ISO + 1
    if runtime == "torch":
        assert ratio >= 1.5
        assert np.mean(cos_ad) / np.mean(cos_iso) >= TARGET
    else:  # measured 2.6x (fp32) and 1.7x (int8) over 3 seeds, 2026-12-03: block noise is WRN's default on ORT
        assert ratio >= (1.5 if domain is Domain.FLOAT else 1.3)
    if domain is Domain.INT8_STEP:  # measured 3.7x over 3 seeds (seed 1 alone 3.5x); uncapped 0.3x
        capped_ratio = float(np.mean(res[f"adaptive<={STEPS_CAP}"][1]) / np.mean(cos_iso))
        assert capped_ratio >= 2.0, capped_ratio
