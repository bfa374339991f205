"""Batched-K evaluation (issue 9): P perturbations per runtime call give the sequential losses."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from baffle_edge.client import Batch, run_task
from baffle_edge.data import Dataset
from baffle_edge.models import ModelConfig, Norm, build_model
from baffle_edge.params import flat_params
from baffle_edge.perturb import NoiseKind
from baffle_edge.protocol import Domain, RoundTask, Scheme
from baffle_edge.runtimes import get_runtime

REL = 1e-5  # fp32: batched vs sequential (measured: bit-identical on this machine)
CONFIGS = {
    "lenet": ModelConfig("lenet", 1, 8, 10),
    "mlp": ModelConfig("mlp", 1, 8, 10),
    "wrn-10-2": ModelConfig("wrn-10-2", 3, 8, 10, norm=Norm.GROUP),
    "mobilenet": ModelConfig("mobilenet", 1, 8, 10),  # depthwise convs: groups = P * C on stacked copies
}


def _batch(cfg: ModelConfig, n: int = 8, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    return Batch(x, rng.integers(0, 10, n).astype(np.int64))


def _task(k: int, scheme: str, int8: bool = False) -> RoundTask:
    return RoundTask(round=3, client=1, seed=11, k=k, sigma=1.0 if int8 else 1e-3, scheme=Scheme(scheme),
                     noise=NoiseKind.RADEMACHER if int8 else NoiseKind.GAUSSIAN,
                     domain=Domain.INT8_STEP if int8 else Domain.FLOAT)


def _round(runtime: str, artifact, cfg: ModelConfig, task: RoundTask, p):
    session = get_runtime(runtime, perturbations_per_call=p).load(artifact, threads=1)
    w = flat_params(build_model(cfg, seed=0)).numpy()
    return run_task(task, session, [_batch(cfg)], weights=w), session


def _close(a, b, rel=REL):
    assert a.losses.shape == b.losses.shape and a.base_losses.shape == b.base_losses.shape
    np.testing.assert_allclose(a.losses, b.losses, rtol=rel, atol=0)
    np.testing.assert_allclose(a.base_losses, b.base_losses, rtol=rel, atol=0)
    assert np.ptp(a.losses) > 0  # the perturbation was applied


@pytest.mark.parametrize("model", list(CONFIGS))
@pytest.mark.parametrize("scheme,p", [("forward", 3), ("central", 4)])
def test_torch_batched_matches_sequential(model, scheme, p):
    cfg = CONFIGS[model]
    task = _task(7, scheme)
    seq, s1 = _round("torch", build_model(cfg, seed=0), cfg, task, 1)
    bat, sp = _round("torch", build_model(cfg, seed=0), cfg, task, p)
    assert sp.perturbations_per_call == p and sp.forward is not None
    assert s1.perturbations_per_call == 1 and s1.forward is None
    _close(bat, seq)


def test_torch_vmap_agrees_with_grouped_forward():
    import torch
    from torch.func import functional_call, vmap

    from baffle_edge.params import layout_of
    from baffle_edge.runtimes.torch_runtime import BatchedForward
    model = build_model(CONFIGS["wrn-10-2"], seed=0)
    x = torch.from_numpy(_batch(CONFIGS["wrn-10-2"]).x)
    w0 = flat_params(model)
    w = torch.stack([w0 + 0.01 * torch.randn_like(w0) for _ in range(3)])
    layout = layout_of(model)
    with torch.no_grad():
        params = {s.name: w[:, s.offset:s.offset + s.size].reshape(3, *s.shape) for s in layout.specs}
        ref = vmap(lambda d: functional_call(model, d, (x,)))(params)
        torch.testing.assert_close(BatchedForward(model)(x, w), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """LeNet, WRN-10-2 and MobileNet 8x8 bundles (float + int8); LeNet's and MobileNet's carry the p4 graphs."""
    from baffle_edge.export.bundle import ExportConfig, export_bundle
    out = {}
    for name, p in (("lenet", 4), ("wrn-10-2", 1), ("mobilenet", 4)):
        cfg = CONFIGS[name]
        x = _batch(cfg, 64, seed=5).x
        data = Dataset("synthetic", x, np.zeros(64, np.int64), x[:8], np.zeros(8, np.int64), 10,
                       (0.0,) * cfg.in_channels, (1.0,) * cfg.in_channels, 1.0)
        path = tmp_path_factory.mktemp("bundles") / name
        export_bundle(build_model(cfg, seed=0), cfg, data, path,
                      ExportConfig(formats=("onnx", "onnx-int8"), calibration_samples=64, perturbations_per_call=p))
        out[name] = path
    return out


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-int8"])
@pytest.mark.parametrize("model", ["lenet", "wrn-10-2", "mobilenet"])
@pytest.mark.parametrize("scheme,p", [("forward", 3), ("forward", 6), ("central", 4)])  # remainders: padded / seq
def test_ort_batched_matches_sequential(bundles, runtime, model, scheme, p):
    cfg = CONFIGS[model]
    task = _task(7, scheme, int8=runtime.endswith("int8"))
    seq, _ = _round(runtime, bundles[model], cfg, task, 1)
    bat, sp = _round(runtime, bundles[model], cfg, task, p)
    assert sp.perturbations_per_call == p and sp.batched is not None
    if runtime.endswith("int8"):  # same int8 kernels on the same integers: bit-identical
        np.testing.assert_array_equal(bat.losses, seq.losses)
        np.testing.assert_array_equal(bat.base_losses, seq.base_losses)
        assert np.ptp(bat.losses) > 0
    else:
        _close(bat, seq)


def test_bundle_records_batched_graph(bundles):
    from baffle_edge.bundle import read_bundle
    meta = read_bundle(bundles["lenet"]).meta
    for fmt, name in (("onnx", "model.p4.train.onnx"), ("onnx-int8", "model.int8.p4.train.onnx")):
        assert meta["formats"][fmt]["files"]["train_p4"] == name
        assert meta["formats"][fmt]["perturbations_per_call"] == 4
        assert name in meta["files"]
    assert "train_p4" not in json.dumps(read_bundle(bundles["wrn-10-2"]).meta["formats"])


def _kernels(session) -> Counter:
    path = Path(session.end_profiling())
    trace = json.loads(path.read_text())
    path.unlink()
    return Counter(e["args"]["op_name"] for e in trace if e.get("cat") == "Node" and e["name"].endswith("kernel_time"))


def test_int8_batched_runs_int8_kernels(bundles):
    cfg = CONFIGS["lenet"]
    task = _task(3, "forward", int8=True)
    rt = get_runtime("onnxruntime-int8", perturbations_per_call=4)
    session = rt.load(bundles["lenet"], profile=True)
    run_task(task, session, [_batch(cfg)], weights=flat_params(build_model(cfg, seed=0)).numpy())
    ops = _kernels(session)
    assert ops["QLinearConv"] >= 2 and ops["QGemm"] >= 4, ops  # 2 convs, one QGemm per copy
    assert ops["Conv"] == 0 and ops["Gemm"] == 0 and ops["MatMul"] == 0, f"float fallback: {ops}"


def test_int8_batched_wrn_kernels_match_sequential(bundles):
    """WRN's int8 graph already runs some convs in float (GroupNorm between them); batching adds none."""
    cfg = CONFIGS["wrn-10-2"]
    task = _task(1, "forward", int8=True)
    w = flat_params(build_model(cfg, seed=0)).numpy()
    seq = get_runtime("onnxruntime-int8").load(bundles["wrn-10-2"], profile=True)
    run_task(task, seq, [_batch(cfg)], weights=w)
    bat = get_runtime("onnxruntime-int8", perturbations_per_call=2).load(bundles["wrn-10-2"], profile=True)
    run_task(task, bat, [_batch(cfg)], weights=w)  # 2 rows: one batched call
    s, b = _kernels(seq), _kernels(bat)  # sequential: two forwards (base + 1); batched: one call
    assert s["QLinearConv"] > 0
    for op in ("QLinearConv", "Conv"):
        assert 2 * b[op] == s[op], (op, s, b)  # one grouped conv per conv layer, int8 where it was
    assert b["QGemm"] == s["QGemm"]  # one QGemm per copy


@pytest.mark.parametrize("bad", [0, -1, 2.5, "x", True, None])
def test_bad_p_raises(bad):
    from baffle_edge.bundle import check_p
    from baffle_edge.export.bundle import ExportConfig
    from baffle_edge.runtimes.batching import resolve
    with pytest.raises(ValueError):
        check_p(bad)
    if bad is not None:
        with pytest.raises(ValueError):
            resolve(bad, "torch")
        with pytest.raises(ValueError):
            get_runtime("torch", perturbations_per_call=bad)
        with pytest.raises(ValueError):
            get_runtime("onnxruntime-int8", perturbations_per_call=bad)
    with pytest.raises(ValueError):
        ExportConfig(perturbations_per_call=bad)


def test_auto_and_cli():
    from baffle_edge.cli import build_parser
    from baffle_edge.train_options import config_from_args
    from baffle_edge.runtimes.batching import resolve
    assert resolve("auto", "torch", "lenet") == "auto" and resolve("auto", "tflite-int8", "lenet") == 1
    assert resolve("7", "torch") == 7
    p = build_parser()
    assert config_from_args(p.parse_args(["train"])).perturbations_per_call == "auto"
    assert config_from_args(p.parse_args(["train", "--perturbations-per-call", "5"])).perturbations_per_call == 5
    with pytest.raises(ValueError):
        config_from_args(p.parse_args(["train", "--perturbations-per-call", "0"]))
