"""Block noise on LiteRT int8 (docs/noise.md section 10): the segment models cut out of the int8
.tflite, the incremental forward (bit-identical to full forwards), bad or missing segment files,
and a few training rounds. One export per module (about 15 s) serves the tests."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="LiteRT not installed: pip install 'baffle-edge[tflite]'")
pytest.importorskip("litert_torch", reason="litert-torch not installed: pip install 'baffle-edge[tflite]'")

from baffle_edge.bundle import sha256  # noqa: E402
from baffle_edge.client import Batch  # noqa: E402
from baffle_edge.export.bundle import ExportConfig, export_bundle  # noqa: E402
from baffle_edge.export.tflite_blocks import chain_plan, segment_models  # noqa: E402
from baffle_edge.models import ModelConfig  # noqa: E402
from baffle_edge.params import flat_params  # noqa: E402
from baffle_edge.perturb import NoiseKind  # noqa: E402
from baffle_edge.protocol import Domain, RoundTask, Scheme  # noqa: E402
from baffle_edge.runtimes import REGISTRY  # noqa: E402
from baffle_edge.runtimes.tflite_runtime import TFLiteSession  # noqa: E402

FMT = "tflite-int8"
LENET = ModelConfig("lenet", 1, 8, 10)


@pytest.fixture(scope="module")
def bundle(lenet_batch, digits, tmp_path_factory):
    model, _, _ = lenet_batch
    out = tmp_path_factory.mktemp("tflite-blocks") / "b"
    export_bundle(model, LENET, digits, out, ExportConfig(formats=(FMT,)))
    return out


def _task(k: int, scheme: str = "forward", weights=None) -> RoundTask:
    return RoundTask(round=2, client=5, seed=7, k=k, sigma=1.0, scheme=Scheme(scheme), noise=NoiseKind.BLOCK,
                     domain=Domain.INT8_STEP, block_weights=weights)


def _session(bundle, model, *, threads=1, incremental=True) -> TFLiteSession:
    s = TFLiteSession(bundle, threads=threads)
    s.set_weights(flat_params(model).numpy())
    if not incremental:
        s.block_forward = None  # every row a full forward of model.int8.tflite, its integers written in place
    return s


def test_bundle_lists_its_segment_models(bundle):
    from ai_edge_litert.interpreter import Interpreter
    meta = json.loads((bundle / "baffle.json").read_text())
    entry = meta["formats"][FMT]
    plan = entry["blocks"]
    assert plan["modules"] == ["features.0", "features.4", "fc"] and plan["channels"] == [16, 64, 10]
    assert plan["channel_axis"] == -1 and "blocks_unsupported" not in entry
    full = Interpreter(model_path=str(bundle / entry["files"]["inference"]))
    cut = {d["index"]: d for d in full.get_tensor_details()}
    for i, row in enumerate(plan["segments"]):
        name = entry["files"][f"block_seg{i}"]
        assert name == f"model.int8.block_seg{i}.tflite"
        assert meta["files"][name]["sha256"] == sha256(bundle / name)
        seg = Interpreter(model_path=str(bundle / name))
        inp, out = seg.get_input_details()[0], seg.get_output_details()[0]
        assert (inp["index"], out["index"]) == (row["input"], row["output"])
        # the segment's input is the full model's tensor at the cut: same dtype, scale and zero point
        want = cut[plan["boundaries"][i]]
        assert inp["dtype"] == want["dtype"] and inp["quantization"] == want["quantization"]
        assert list(inp["shape_signature"]) == [-1, *want["shape"][1:]]
        assert set(row["tensors"]) == set(plan["params"][i])
    assert [d["dtype"] for d in [cut[b] for b in plan["boundaries"][1:-1]]] == [np.int8, np.int8]


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("size", [32, 5])
def test_block_rows_equal_full_forwards_bit_for_bit(bundle, lenet_batch, scheme, size):
    """Rows from the segments (cached boundaries, passes, stacked finishing) vs the same rows as full
    forwards of model.int8.tflite: the same bits (batch 5 takes the float head's small-batch path)."""
    model, x, y = lenet_batch
    inc, full = _session(bundle, model), _session(bundle, model, incremental=False)
    assert inc.block_forward is not None
    batch, task = Batch(x[:size], y[:size]), _task(300, scheme)
    got = inc.losses(batch, task)
    assert got.shape == ((301,) if scheme == "forward" else (600,))
    assert np.array_equal(got, full.losses(batch, task))
    assert np.ptp(got) > 0  # the rows moved the loss


def test_weighted_rows_and_two_threads(bundle, lenet_batch):
    model, x, y = lenet_batch
    task = _task(200, weights=(1, 3, 50))  # mostly head rows
    inc, full = _session(bundle, model, threads=2), _session(bundle, model, incremental=False)
    assert np.array_equal(inc.losses(Batch(x, y), task), full.losses(Batch(x, y), task))


def test_chained_segments_reproduce_the_model(bundle, lenet_batch):
    model, x, _ = lenet_batch
    s = _session(bundle, model)
    assert np.array_equal(s.block_forward.cache(s.prepare(x)), s.logits(x))


def test_the_forward_budget_uses_the_chain_rule():
    assert REGISTRY[FMT].block_forward == "chain"  # K = 3,309 at 101 forward-equivalents, as ONNX Runtime


def test_corrupt_segment_file_is_refused(bundle, lenet_batch, tmp_path):
    model, _, _ = lenet_batch
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    (b / "model.int8.block_seg1.tflite").write_bytes(b"\0" * 64)
    s = _session(b, model)  # segments are opened at the first block task
    with pytest.raises(ValueError, match="block_seg1.tflite: sha256 does not match"):
        _ = s.block_forward


def test_missing_segment_file_is_rebuilt_and_must_match(bundle, lenet_batch, tmp_path):
    """Flower ships baffle.json and the model only: the client cuts the segments itself, and they must
    hash to the sha256 the bundle lists (the same bytes as the exporter's)."""
    model, x, y = lenet_batch
    b = tmp_path / "shipped"
    b.mkdir()
    for name in ("baffle.json", "model.int8.tflite"):
        shutil.copy(bundle / name, b / name)
    s = _session(b, model)
    task = _task(100)
    assert np.array_equal(s.losses(Batch(x, y), task), _session(bundle, model).losses(Batch(x, y), task))
    meta = json.loads((b / "baffle.json").read_text())
    meta["files"]["model.int8.block_seg2.tflite"]["sha256"] = "0" * 64
    (b / "baffle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing model.int8.block_seg2.tflite.*does not match its sha256"):
        _ = _session(b, model).block_forward


def test_bundle_without_segments_cuts_them_at_load(bundle, lenet_batch, tmp_path):
    """Bundles exported before TFLite block noise list no segments: cut at load (same losses)."""
    model, x, y = lenet_batch
    b = tmp_path / "old"
    shutil.copytree(bundle, b)
    meta = json.loads((b / "baffle.json").read_text())
    entry = meta["formats"][FMT]
    entry.pop("blocks")
    for role in [r for r in entry["files"] if r.startswith("block_")]:
        (b / entry["files"].pop(role)).unlink()
    meta["files"] = {k: v for k, v in meta["files"].items() if (b / k).exists()}
    (b / "baffle.json").write_text(json.dumps(meta))
    old = _session(b, model)
    assert old.block_forward is not None
    task = _task(100, "central")
    assert np.array_equal(old.losses(Batch(x, y), task), _session(bundle, model).losses(Batch(x, y), task))


def test_what_is_not_a_chain_says_why(bundle):
    meta = json.loads((bundle / "baffle.json").read_text())
    content, rows = (bundle / "model.int8.tflite").read_bytes(), meta["formats"][FMT]["tensors"]
    plan, segments, _ = segment_models(content, rows)
    assert len(segments) == 3 and plan.ops[-1][1] == len(meta["formats"][FMT]["ops"])
    swapped = [dict(r) for r in rows]
    swapped[2]["index"], swapped[3]["index"] = swapped[3]["index"], swapped[2]["index"]  # conv2 weight <-> bias
    with pytest.raises(ValueError, match="features.4.*does not feed exactly one"):
        chain_plan(content, swapped)


def test_training_rounds_with_block_noise_lower_the_loss(digits):
    """`train --runtime tflite-int8 --noise block --forward-budget 101`: K by the chain rule, rows through
    the segments, and a few rounds lower the loss on the training set (one export: refresh every 100)."""
    import torch

    from baffle_edge.simulate import Federation, TrainConfig
    fed = Federation(TrainConfig(runtime=FMT, noise="block", forward_budget=101, rounds=6, clients=2, workers=1,
                                 refresh_every=100), data=digits)
    assert fed.task(0, 0).k == 3309
    x, y = torch.from_numpy(digits.x_train[:1000]), torch.from_numpy(digits.y_train[:1000])

    def loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(fed.server.model(x), y))

    before = loss()
    for r in range(6):
        assert fed.step(r).applied
    assert fed.last_session.block_forward is not None
    assert loss() < before - 0.02, (before, loss())


@pytest.mark.slow
def test_tflite_int8_block_noise_reaches_94_percent(tmp_path):
    """Issue 23's acceptance through the LiteRT int8 client (default digits schedule, 150 rounds, 10
    clients, seed 0, K = 3,309 for 101 forward-equivalents, the bundle re-exported every round):
    >= 94% (measured 95.0%; 1,225 s of rounds + the exports, ~45 min on a loaded 2-vCPU machine)."""
    from baffle_edge.simulate import TrainConfig, train
    cfg = TrainConfig(runtime=FMT, noise="block", forward_budget=101, eval_every=10, checkpoint_every=1000)
    acc = train(cfg, tmp_path, progress=False)["final"]["test_accuracy"]
    print(f"\ndigits LeNet, 150 rounds, LiteRT int8: block noise K=3309 (101 forward-equivalents) {100 * acc:.1f}%")
    assert acc >= 0.94
