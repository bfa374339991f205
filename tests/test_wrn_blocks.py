"""Block noise on WideResNet-10-2 (issue 29): exact incremental rows through GroupNorm and residual adds."""
from __future__ import annotations

import numpy as np
import pytest
from baffle_edge.runtimes.torch_incremental import block_macs, equal_compute_k
from baffle_edge.runtimes.torch_residual import WideResNetBlockForward
from baffle_edge.runtimes.torch_runtime import TorchSession
from conftest import assert_rows_equal_full_forwards

from baffle_edge.client import Batch
from baffle_edge.models import ModelConfig, Norm, build_model
from baffle_edge.params import layout_of
from baffle_edge.perturb import BlockTable, NoiseKind
from baffle_edge.protocol import RoundTask, Scheme

WRN = ModelConfig("wrn-10-2", 1, 8, 10, norm=Norm.GROUP)


@pytest.fixture(scope="module")
def wrn():
    model = build_model(WRN, seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    return model, x, rng.integers(0, 10, 8)


def test_every_module_has_a_rule(wrn):
    model, _, _ = wrn
    session = TorchSession(model)
    assert isinstance(session.block_forward, WideResNetBlockForward)
    kinds = sorted({k for k, _ in session.block_forward.rule.values()})
    assert kinds == ["conv1", "conv2", "head", "shortcut", "stem"]
    assert len(session.blocks.modules) == 11  # stem, 3 x (conv1, conv2, shortcut), fc


@pytest.mark.parametrize("norm", [Norm.GROUP, Norm.NONE])
def test_rows_of_every_module_equal_full_forwards(wrn, norm):
    """First, middle and last channel of every module (stem, convs in the units, shortcut convs, the
    head), large perturbations: logits and losses equal a full forward at the same weights."""
    model = wrn[0] if norm is Norm.GROUP else build_model(ModelConfig("wrn-10-2", 1, 8, 10, norm=norm), seed=0)
    _, x, y = wrn
    session = TorchSession(model)
    t = session.blocks
    per_module = [np.flatnonzero(t.module == m) for m in range(len(t.modules))]
    chosen = np.concatenate([[b[0], b[len(b) // 2], b[-1]] for b in per_module])  # first, middle, last channel
    assert_rows_equal_full_forwards(session, t, x, y, chosen, moves=True)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_a_round_equals_the_full_forward_loop(wrn, scheme):
    model, x, y = wrn
    session = TorchSession(model)
    task = RoundTask(round=1, client=2, seed=5, k=40, sigma=1e-3, scheme=Scheme(scheme), noise=NoiseKind.BLOCK)
    inc = session.losses(Batch(x, y), task)
    session.block_forward = None
    full = session.losses(Batch(x, y), task)
    np.testing.assert_allclose(inc, full, rtol=1e-6, atol=0)


def test_row_costs_count_the_layers_re_run(wrn):
    model = wrn[0]
    full, per = block_macs(model, 8)
    t = BlockTable.from_layout(layout_of(model))
    cost = {t.modules[m]: int(per[t.module == m][0]) for m in range(len(t.modules))}
    # 8x8 input: stem and unit 1 at 8x8 (64 px), unit 2 at 4x4 (16), unit 3 at 2x2 (4)
    u1 = 32 * 16 * 9 * 64 + 32 * 32 * 9 * 64 + 32 * 16 * 64
    u2 = 64 * 32 * 9 * 16 + 64 * 64 * 9 * 16 + 64 * 32 * 16
    u3 = 128 * 64 * 9 * 4 + 128 * 128 * 9 * 4 + 128 * 64 * 4
    head = 128 * 10
    assert full == 16 * 9 * 64 + u1 + u2 + u3 + head
    assert cost["features.0"] == 9 * 64 + u1 + u2 + u3 + head
    # conv1 rows: the GroupNorm group of 16 channels (of 32, 64, 128) through 16/C of conv2
    assert cost["features.1.conv1"] == 16 * 9 * 64 + 32 * 16 * 9 * 64 + u2 + u3 + head
    assert cost["features.3.conv1"] == 64 * 9 * 4 + 128 * 16 * 9 * 4 + head
    assert cost["features.2.conv2"] == 64 * 9 * 16 + u3 + head
    assert cost["features.3.shortcut"] == 64 * 4 + head
    assert cost["fc"] == 128
    k = equal_compute_k(model, 8, 101)
    sizes = t.sizes
    expected = (per * sizes).sum() / sizes.sum() / full
    assert 1 + k * expected <= 101 < 1 + (k + 1) * expected and k > 200  # rows far below a full forward


def test_graph_rule_costs_re_run_every_module_downstream(wrn):
    """ONNX Runtime's rows (rule "graph"): 1/C of the module + every module downstream of it in full; a unit's
    conv1 row re-runs that unit's conv2 but not its shortcut. Chain models cost what the chain rule says."""
    model = wrn[0]
    full, per = block_macs(model, 8, rule="graph")
    t = BlockTable.from_layout(layout_of(model))
    cost = {t.modules[m]: int(per[t.module == m][0]) for m in range(len(t.modules))}
    conv2 = [32 * 32 * 9 * 64, 64 * 64 * 9 * 16, 128 * 128 * 9 * 4]
    u2 = 64 * 32 * 9 * 16 + conv2[1] + 64 * 32 * 16
    u3 = 128 * 64 * 9 * 4 + conv2[2] + 128 * 64 * 4
    head = 128 * 10
    assert cost["features.0"] == full - 16 * 9 * 64 + 9 * 64
    assert cost["features.1.conv1"] == 16 * 9 * 64 + conv2[0] + u2 + u3 + head
    assert cost["features.1.shortcut"] == 16 * 64 + u2 + u3 + head
    assert cost["features.3.conv1"] == 64 * 9 * 4 + conv2[2] + head
    assert cost["features.3.conv2"] == 128 * 9 * 4 + head and cost["fc"] == 128
    assert equal_compute_k(model, 8, 101, rule="graph") == 604  # torch's delta rule: 921
    for name in ("lenet", "mobilenet", "mlp"):
        chain = build_model(ModelConfig(name, 1, 8, 10), seed=0)
        assert np.array_equal(block_macs(chain, 8, rule="graph")[1], block_macs(chain, 8, rule="chain")[1]), name


def test_affine_group_norm_falls_back_to_full_forwards():
    """A WideResNet whose GroupNorm has parameters has no rule for them: no incremental forward, full-forward costs."""
    import torch
    model = build_model(WRN, seed=0)
    model.features[1].post[0] = torch.nn.GroupNorm(2, 32, affine=True)
    session = TorchSession(model)
    assert session.block_forward is None
    for rule in ("delta", "graph"):  # ONNX Runtime's graph plan has no module for the norm's parameters either
        full, per = block_macs(model, 8, rule=rule)
        assert (per == full).all()


# --- ONNX Runtime: the graph plan's module and rest segments (export/graph_blocks.py) ---------------------------

def _ort_bundle(tmp_path_factory, size: int, data):
    from baffle_edge.export.bundle import ExportConfig, export_bundle
    cfg = ModelConfig("wrn-10-2", 1, size, 10, norm=Norm.GROUP)
    model = build_model(cfg, seed=0)
    out = tmp_path_factory.mktemp(f"wrn{size}") / "b"
    export_bundle(model, cfg, data, out, ExportConfig(formats=("onnx", "onnx-int8")))
    return model, out


@pytest.fixture(scope="module")
def ort_wrn8(tmp_path_factory, digits):
    return _ort_bundle(tmp_path_factory, 8, digits)


@pytest.fixture(scope="module")
def ort_wrn28(tmp_path_factory):
    from baffle_edge.data import load_dataset
    try:
        data = load_dataset("fashion-mnist")
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    model, out = _ort_bundle(tmp_path_factory, 28, data)
    return model, out, data.x_test[:6], data.y_test[:6]


def _ort_session(bundle, runtime, model):
    from baffle_edge.params import flat_params
    from baffle_edge.runtimes import get_runtime
    s = get_runtime(runtime).load(bundle, threads=1)
    s.set_weights(flat_params(model).numpy())
    return s


def assert_ort_rows_equal_full_forwards(s, x, sign: int) -> None:
    """Rows of the first, middle and last channel of every module (stem, conv1, conv2, shortcut, head) through
    the session's segments = full forwards of the train graph at the same weights, bit for bit (logits and
    losses); every row moves the logits. fp32: w0 + sign * 0.05 N(0, 1); int8: sign * 4 whole steps."""
    from baffle_edge.perturb import rademacher_negative
    t, fwd = s.blocks, s.block_forward
    assert fwd is not None and fwd.kind == "graph", s.block_forward_reason
    chosen = np.concatenate([[b[0], b[len(b) // 2], b[-1]] for b in (np.flatnonzero(t.module == m)
                                                                    for m in range(len(t.modules)))])
    rng = np.random.default_rng(4)
    idx = [t.index[t.bounds[b]:t.bounds[b + 1]] for b in chosen]
    if s.domain.value == "int8-step":
        # 4 whole steps, not m_b: the stem's m_b = 183 would freeze every one of its 9 integers
        steps = [np.where(rng.random(len(i)) < 0.5, -4, 4) for i in idx]
        values = [s.flat.moved(i, st, sign) for i, st in zip(idx, steps)]
    else:
        values = [s.w0[i] + np.float32(sign * 0.05) * rng.standard_normal(len(i)).astype(np.float32) for i in idx]
    x = s.prepare(x)
    base = fwd.cache(x)
    got = fwd.logits(chosen, values)
    for r, (i, v) in enumerate(zip(idx, values)):
        if s.domain.value == "int8-step":
            q = s.flat.moved(slice(None), np.zeros(s.dim, np.int64))
            q[i] = v
            w = s.flat.tensors(s.table, q)
        else:
            w = s.w0.copy()
            w[i] = v
        want = s.forward(x, w)
        module = t.modules[t.module[chosen[r]]]
        assert not np.array_equal(want, base), module  # the row moved the logits
        assert np.array_equal(got[r], want), (module, np.abs(got[r] - want).max())


@pytest.mark.parametrize("runtime", ["onnxruntime-int8", "onnxruntime"])
@pytest.mark.parametrize("sign", [1, -1])
def test_ort_rows_of_every_module_equal_full_forwards(ort_wrn8, wrn, runtime, sign):
    """ONNX Runtime, digits 8x8: every module kind's rows bit-identical to full forwards (fp32 and int8)."""
    model, bundle = ort_wrn8
    assert_ort_rows_equal_full_forwards(_ort_session(bundle, runtime, model), wrn[1], sign)


@pytest.mark.parametrize("runtime", ["onnxruntime-int8", "onnxruntime"])
def test_ort_rows_equal_full_forwards_at_28x28(ort_wrn28, runtime):
    """Fashion-MNIST 28x28 images (the size WRN-10-2 trains at): the same, both signs."""
    model, bundle, x, _ = ort_wrn28
    s = _ort_session(bundle, runtime, model)
    for sign in (1, -1):
        assert_ort_rows_equal_full_forwards(s, x, sign)


@pytest.mark.parametrize("runtime", ["onnxruntime-int8", "onnxruntime"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_ort_round_equals_the_full_forward_loop(ort_wrn8, wrn, runtime, scheme, monkeypatch):
    """A block round's losses through the segments = the dense loop's (every row a full forward), bit for bit;
    the rest segments run in chunks of 2 to 8 rows here (the last one partial), the side tensors repeated per row."""
    from baffle_edge.client import block_losses, weight_set_losses
    from baffle_edge.protocol import Domain
    from baffle_edge.runtimes import ort_incremental
    monkeypatch.setattr(ort_incremental, "REST_ELEMENTS", 1 << 15)  # 32,768 values: 16 images of unit 1's maps
    model, bundle = ort_wrn8
    _, x, y = wrn
    s = _ort_session(bundle, runtime, model)
    task = RoundTask(round=2, client=5, seed=7, k=120, sigma=1e-2, scheme=Scheme(scheme), noise=NoiseKind.BLOCK,
                     domain=Domain(s.domain))
    assert np.array_equal(block_losses(s, Batch(x, y), task), weight_set_losses(s, Batch(x, y), task, 0))


def test_ort_bundle_lists_its_graph_plan(ort_wrn8):
    """baffle.json: a plan of kind "graph" (the chain plan's JSON has no kind), its files listed and sealed; the
    int8 cut tensors are uint8 (a conv1 row's rest reads the unit's shortcut output, not its conv2's)."""
    import json

    import onnx
    from baffle_edge.bundle import plan_roles, sha256
    _, bundle = ort_wrn8
    meta = json.loads((bundle / "baffle.json").read_text())
    for fmt in ("onnx", "onnx-int8"):
        entry = meta["formats"][fmt]
        plan = entry["blocks"]
        assert plan["kind"] == "graph" and "blocks_unsupported" not in entry and "boundaries" not in plan
        assert plan["modules"][:4] == ["features.0", "features.1.conv1", "features.1.conv2", "features.1.shortcut"]
        assert plan["channels"][:4] == [16, 32, 32, 32]
        for role in plan_roles(plan):
            assert meta["files"][entry["files"][role]]["sha256"] == sha256(bundle / entry["files"][role])
        seg = plan["segments"]
        assert seg[-1]["output"] == plan["output"] and "block_rest10" not in entry["files"]  # the head ends the graph
        assert seg[1]["sides"] == [seg[3]["output"]] and seg[3]["sides"] == [seg[2]["output"]]
        assert len(seg[0]["rest_params"]) == sum(len(p) for p in plan["params"][1:])  # the stem's rest: all others
    rest = onnx.load(str(bundle / meta["formats"]["onnx-int8"]["files"]["block_rest1"]))
    assert {i.type.tensor_type.elem_type for i in rest.graph.input[:2]} == {onnx.TensorProto.UINT8}


def test_old_ort_bundle_is_cut_at_load_and_an_unknown_plan_runs_dense(ort_wrn8, wrn, tmp_path):
    """A WRN bundle exported before graph plans (``blocks_unsupported``, no segments) gets them cut at load, same
    losses; a plan of a kind this version does not know is not guessed at: full forwards, the reason says so."""
    import json
    import shutil

    from baffle_edge.protocol import Domain
    model, bundle = ort_wrn8
    _, x, y = wrn
    task = RoundTask(round=1, client=0, seed=3, k=60, sigma=1e-2, noise=NoiseKind.BLOCK, domain=Domain.INT8_STEP)
    new = _ort_session(bundle, "onnxruntime-int8", model).losses(Batch(x, y), task)
    for name, edit in (("old", lambda e: e.update(blocks_unsupported="not a chain")),
                       ("future", lambda e: e.update(blocks={"kind": "future-kind", "modules": []}))):
        b = tmp_path / name
        shutil.copytree(bundle, b)
        meta = json.loads((b / "baffle.json").read_text())
        entry = meta["formats"]["onnx-int8"]
        entry.pop("blocks")
        for role in [r for r in entry["files"] if r.startswith("block_")]:
            (b / entry["files"].pop(role)).unlink()
        edit(entry)
        meta["files"] = {k: v for k, v in meta["files"].items() if (b / k).exists()}
        (b / "baffle.json").write_text(json.dumps(meta))
        s = _ort_session(b, "onnxruntime-int8", model)
        assert np.array_equal(s.losses(Batch(x, y), task), new), name
        if name == "old":
            assert s.block_forward is not None and s.block_forward.kind == "graph"
        else:
            assert s.block_forward is None and "'future-kind'" in s.block_forward_reason


def test_a_dropped_ort_session_frees_its_segment_sessions_at_once(ort_wrn8):
    """The block forward refers to its session weakly: no reference cycle keeps a refreshed bundle's 22 segment
    sessions alive until the garbage collector runs (it did: +230 MB per round of WRN-10-2 int8 training)."""
    import gc
    import weakref
    model, bundle = ort_wrn8
    s = _ort_session(bundle, "onnxruntime-int8", model)
    assert s.block_forward is not None
    gc.collect()
    gc.disable()
    try:
        session, forward = weakref.ref(s), weakref.ref(s.block_forward)
        del s
        assert session() is None and forward() is None
    finally:
        gc.enable()
