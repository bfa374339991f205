"""The mobile-class model (depthwise-separable MobileNet): it exports to int8 ONNX and TFLite with its
block table, and its block-noise rows evaluated from cached activations equal full forwards
(fp32 and int8 bit for bit), depthwise channels included."""
from __future__ import annotations

import json

import numpy as np
import pytest

from baffle_edge.client import Batch, block_losses, run_task, weight_set_losses
from baffle_edge.export.bundle import ExportConfig, export_bundle
from baffle_edge.models import ModelConfig, build_model
from baffle_edge.params import flat_params, layout_of
from baffle_edge.perturb import BlockTable, NoiseKind
from baffle_edge.protocol import Domain, RoundTask, Scheme
from baffle_edge.runtimes import get_runtime

from conftest import adam_steps

MOBILE = ModelConfig("mobilenet", 1, 8, 10)
DEPTHWISE = (1, 3, 5, 7)  # module indices of the depthwise convs (stem 0, then dw / pw pairs, head 9)


@pytest.fixture(scope="module")
def mobile(digits, tmp_path_factory):
    """A MobileNet moved by a few backprop steps (informative gradients), its bundle and one batch."""
    model = adam_steps(build_model(MOBILE, seed=0), digits, 10, 3e-3)
    out = tmp_path_factory.mktemp("mobile") / "b"
    export_bundle(model.eval(), MOBILE, digits, out, ExportConfig(formats=("onnx", "onnx-int8", "tflite-int8")))
    return model, out, Batch(digits.x_test[:32], digits.y_test[:32])


def _task(domain: Domain, k: int, scheme: str = "forward", weights=None) -> RoundTask:
    return RoundTask(round=1, client=3, seed=5, k=k, sigma=1e-3, scheme=Scheme(scheme), noise=NoiseKind.BLOCK,
                     domain=domain, block_weights=weights)


def test_depthwise_convs_are_blocks_of_their_own(mobile):
    model, _, _ = mobile
    table = BlockTable.from_layout(layout_of(model))
    names = [s.name for s in layout_of(model).specs]
    assert names[2] == "features.3.weight" and tuple(model.features[3].weight.shape) == (32, 1, 3, 3)
    # one block per output channel: a depthwise filter (9 weights) + its bias
    dw = np.flatnonzero(table.module == DEPTHWISE[0])
    assert len(dw) == 32 and set(table.sizes[dw].tolist()) == {10}


def test_bundle_records_the_chain_of_ten_modules(mobile):
    _, out, _ = mobile
    meta = json.loads((out / "baffle.json").read_text())
    for fmt in ("onnx", "onnx-int8"):
        plan = meta["formats"][fmt]["blocks"]
        assert len(plan["modules"]) == 10 and plan["channels"] == [32, 32, 64, 64, 128, 128, 256, 256, 256, 10]
        assert all(f"block_seg{i}" in meta["formats"][fmt]["files"] for i in range(10))
    plan = meta["formats"]["tflite-int8"]["blocks"]  # the .tflite cut at the same modules (NHWC: channels last)
    assert len(plan["modules"]) == 10 and plan["channels"][-1] == 10 and plan["channel_axis"] == -1
    assert all(f"block_seg{i}" in meta["formats"]["tflite-int8"]["files"] for i in range(10))


@pytest.mark.parametrize("runtime", ["onnxruntime-int8", "onnxruntime", "tflite-int8"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_incremental_rows_equal_full_forwards_bit_for_bit(mobile, runtime, scheme):
    model, out, batch = mobile
    s = get_runtime(runtime).load(out, threads=1)
    s.set_weights(flat_params(model).numpy())
    assert s.block_forward is not None, s.block_forward_reason
    # every block alike (block_weights 1 per module): the small depthwise modules are drawn too
    task = _task(Domain(s.domain), 240, scheme, weights=(1,) * len(s.blocks.modules))
    inc = block_losses(s, batch, task)
    full = weight_set_losses(s, batch, task, 0)  # every row a full forward of the train graph
    assert np.array_equal(inc, full)
    assert np.ptp(inc) > 0
    drawn = set(s.blocks.module[s.blocks.weighted(task.block_weights).draw(5, 1, 3, np.arange(240))[0]].tolist())
    assert set(DEPTHWISE) <= drawn and 9 in drawn


def test_every_runtime_runs_it(mobile):
    """torch (batched depthwise convs), ORT fp32 / int8 and LiteRT int8 run block tasks, the float
    runtimes agreeing on the losses (same weights, same rows)."""
    model, out, batch = mobile
    w = flat_params(model).numpy()
    losses = {}
    for runtime, artifact in (("torch", build_model(MOBILE, seed=0)), ("onnxruntime", out),
                              ("onnxruntime-int8", out), ("tflite-int8", out)):
        s = get_runtime(runtime).load(artifact, threads=1)
        task = _task(Domain(s.domain), 30)
        report = run_task(task, s, [batch], weights=w)
        assert report.losses.shape == (30,) and np.all(np.isfinite(report.losses)) and np.ptp(report.losses) > 0
        losses[runtime] = report.losses
    np.testing.assert_allclose(losses["onnxruntime"], losses["torch"], rtol=1e-5)


def test_block_costs_follow_the_chain():
    """The forward budget buys rows at their chain cost (a row of module i: 1/C_i of it + every later
    module in full) on runtimes that cut segments; torch runs MobileNet rows as full forwards, and
    GroupNorm (no chain) makes every row a full forward."""
    from baffle_edge.runtimes.torch_incremental import block_macs, equal_compute_k
    model = build_model(MOBILE)
    table = BlockTable.from_layout(layout_of(model))
    full, per = block_macs(model, 8, rule="chain")
    assert full == 195_200
    assert set(per[table.module == 9].tolist()) == {256}  # a head row: one logit of 256 inputs
    assert set(per[table.module == 8].tolist()) == {256 + 2560}  # a last pointwise channel (1x1 map) + the head
    assert per[table.module == 0].max() < full and per[table.module == 0].min() > 0.9 * full
    assert equal_compute_k(model, 8, 101, rule="chain") == 545
    assert equal_compute_k(model, 8, 101, rule="delta") == equal_compute_k(model, 8, 101, rule="full") == 100
    grouped = build_model(ModelConfig("mobilenet", 1, 8, 10, norm="group"))
    assert equal_compute_k(grouped, 8, 101, rule="chain") == 100
