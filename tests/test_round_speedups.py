"""The client round's fast paths (issue 28) give exactly the losses of the plain per-row path:
noise for several rows per Philox pass (perturb.noise_rows, rows.ChunkedNoise), StepSelector's
cached views, no prefetch thread for chunked noise. A changed loss, noise value or row order fails
here: every check recomputes the losses the straightforward way (one ``perturb.noise`` /
``negative_signs`` call per k, ``QuantTable.perturb``, one ``evaluate`` per row)."""
import hashlib

import numpy as np
import pytest
from bundles import trained_lenet

from baffle_edge import perturb
from baffle_edge.client import Batch, cross_entropies, run_task
from baffle_edge.models import ModelConfig
from baffle_edge.params import flat_params
from baffle_edge.protocol import RoundTask
from baffle_edge.rows import ChunkedNoise, step_noise


@pytest.mark.parametrize("d", [0, 1, 31, 32, 33, 1000, 26730, perturb.GAUSSIAN_CHUNK + 3])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_noise_rows_are_the_one_k_streams(d, kind):
    ks = [0, 1, 7, 2**32 - 1]
    rows = perturb.noise_rows(11, 3, 5, ks, d, kind)
    assert rows.shape == (len(ks), d) and rows.dtype == np.float32
    for row, k in zip(rows, ks):
        assert row.tobytes() == perturb.noise(11, 3, 5, k, d, kind).tobytes()  # bit for bit, signed zeros too
    if kind == "rademacher":
        masks = perturb.noise_rows(11, 3, 5, ks, d, kind, signs=True)
        for mask, k in zip(masks, ks):
            np.testing.assert_array_equal(mask, perturb.negative_signs(11, 3, 5, k, d))


@pytest.mark.parametrize("bad, match", [(dict(ks=[-1]), "k must be"), (dict(ks=[2**32]), "k must be"),
                                        (dict(d=-1), "d must be"), (dict(kind="block"), "block noise"),
                                        (dict(kind="gaussian", signs=True), "sign masks"),
                                        (dict(seed=-1), "seed")])
def test_noise_rows_bad_input(bad, match):
    args = dict(seed=1, round_=0, client=0, ks=[0], d=10, kind="rademacher") | bad
    signs = args.pop("signs", False)
    with pytest.raises(ValueError, match=match):
        perturb.noise_rows(**args, signs=signs)


@pytest.mark.parametrize("noise, signs, dim", [("rademacher", True, 26730), ("rademacher", False, 5000),
                                               ("gaussian", False, 500), ("gaussian", False, 26730)])
def test_chunked_noise_hands_out_every_k_in_any_order(noise, signs, dim):
    task = RoundTask(round=4, client=2, seed=9, k=45, sigma=1e-4, noise=noise,
                     domain="int8-step" if signs else "float")
    got = step_noise(task, 1, dim, signs=signs)
    assert isinstance(got, ChunkedNoise)
    if noise == "rademacher" or dim <= 1000:
        assert got.rows > 1  # this case does take the chunked path
    order = list(range(task.k)) + [44, 0, 31, 32, 3]
    for k in order:
        ref = (perturb.negative_signs if signs else lambda *a: perturb.noise(*a, noise))(9, 4, 2, 45 + k, dim)
        np.testing.assert_array_equal(got(k), ref)
    with pytest.raises(ValueError, match="outside"):
        got(task.k)


def _plain_losses(session, batch, task):
    """step_losses the straightforward way: one noise call, one weight set, one forward per row."""
    sets = [session.weight_set(0, None, task)]
    for k in range(task.k):
        if task.domain.value == "int8-step":
            eps = perturb.negative_signs(task.seed, task.round, task.noise_client, k, session.dim)
            sets.append(session.table.perturb(session.q, np.where(eps, -1.0, 1.0).astype(np.float32), 1))
        else:
            eps = perturb.noise(task.seed, task.round, task.noise_client, k, session.dim, task.noise)
            sets.append(session.w0 + np.float32(task.sigma) * eps)
    x = session.prepare(batch.x)
    z = np.stack([np.array(session.evaluate(x, [s])[0]) for s in sets])
    session.restore()
    return cross_entropies(z, batch.y)


@pytest.fixture(scope="module")
def lenet(digits):
    return trained_lenet(digits, steps=30), Batch(digits.x_test[:32], digits.y_test[:32])


@pytest.mark.parametrize("p", [1, 4])
def test_torch_round_losses_unchanged(lenet, p):
    from baffle_edge.runtimes.torch_runtime import TorchSession
    model, batch = lenet
    session = TorchSession(model, perturbations_per_call=p)
    task = RoundTask(round=0, client=0, seed=3, k=37, sigma=1e-4)
    report = run_task(task, session, [batch], weights=flat_params(model).numpy())
    ref = _plain_losses(session, batch, task)
    np.testing.assert_allclose(np.concatenate([report.base_losses, report.losses]), ref, rtol=0, atol=1e-6)
    assert np.ptp(report.losses) > 0


@pytest.mark.slow
@pytest.mark.parametrize("p", [1, 5])
def test_ort_int8_round_losses_bit_identical(lenet, digits, tmp_path, p):
    from baffle_edge.export.bundle import ExportConfig, export_bundle
    from baffle_edge.runtimes import get_runtime
    model, batch = lenet
    export_bundle(model, ModelConfig(), digits, tmp_path / "b", ExportConfig(formats=("onnx-int8",)))
    session = get_runtime("onnxruntime-int8", perturbations_per_call=p).load(tmp_path / "b", threads=1)
    w = flat_params(model).numpy()
    task = RoundTask(round=1, client=2, seed=3, k=70, sigma=1e-4, noise="rademacher", domain="int8-step")
    report = run_task(task, session, [batch], weights=w)
    session.set_weights(w)
    ref = _plain_losses(session, batch, task)
    assert np.concatenate([report.base_losses, report.losses]).tobytes() == ref.tobytes()


def test_vectorised_box_muller_is_the_numpy_reference(monkeypatch):
    """With torch imported, box_muller takes torch's ln/cos/sin and recomputes with numpy's libm the
    values near a float32 rounding boundary: bit for bit numpy's values (the r = -0.0 pair included)."""
    pytest.importorskip("torch")
    edge = np.array([0xFFFFFFFF, 0x12345678, 0xFFFFFF00, 0, 0xFFFFFFFF, 0x40000000, 0, 0xFFFFFFFF] * 16, np.uint32)
    streams = [perturb.words(3, 1, 2, k, 1 << 15) for k in range(40)] + [edge]
    fast = [perturb.box_muller(w) for w in streams]
    assert perturb._vector_libm(np.ones(64), np.ones(64)) is not None  # the fast path did run
    monkeypatch.setattr(perturb, "_vector_libm", lambda u1, theta: None)
    for w, got in zip(streams, fast):
        assert got.tobytes() == perturb.box_muller(w).tobytes()


def test_float32_boundary_detection():
    one_ulp = np.float64(np.spacing(np.float32(1.0)))
    midpoint = 1.0 + one_ulp / 2  # exactly between two float32 values
    v = np.array([midpoint, midpoint * (1 + 2.0**-50), 1.0 + one_ulp / 4, 1.0, -midpoint, 0.0, -0.0])
    np.testing.assert_array_equal(perturb._near_float32_boundary(v), [True, True, False, False, True, False, False])


@pytest.mark.parametrize("reduce_range", [False, True])
def test_step_selector_is_quant_table_perturb(reduce_range):
    """StepSelector's arithmetic int8 select equals QuantTable.perturb bit for bit, with saturated
    weights (at +-127, or the 7-bit +-64) and int32 biases, for both signs."""
    from baffle_edge.quant import QuantTable, StepSelector, bias_tensor, weight_tensor
    w1 = weight_tensor("a.weight", "a", 0, (8, 3, 3, 3), 0, tuple([0.01] * 8), reduce_range=reduce_range)
    b1 = bias_tensor("a.bias", "ab", 216, (8,), tuple([0.001] * 8), w1)
    w2 = weight_tensor("b.weight", "b", 224, (5, 40000), 0, tuple([0.02] * 5), reduce_range=reduce_range)
    table = QuantTable((w1, b1, w2))
    rng = np.random.default_rng(1)
    qs = table.quantize(rng.standard_normal(table.dim).astype(np.float32) * 2.0)  # many at the bounds
    assert any((np.abs(q) == (64 if reduce_range else 127)).any() for q in qs[::2])
    select = StepSelector(table, qs)
    for k in range(6):
        negative = perturb.negative_signs(4, 0, 0, k, table.dim)
        for sign in (1, -1):
            want = table.perturb(qs, np.where(negative, -1.0, 1.0).astype(np.float32), sign)
            for got, ref in zip(select(negative, sign), want):
                assert got.dtype == ref.dtype and got.shape == ref.shape
                np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("central", [False, True])
def test_int8_block_decode_vectorised_is_block_by_block(central):
    """The server's int8 block decode (rows.step_gradient) in one vectorised pass gives the
    block-by-block result exactly."""
    from baffle_edge.quant import FlatSteps, QuantTable, bias_tensor, weight_tensor
    from baffle_edge.rows import step_blocks, step_gradient
    from baffle_edge.estimator import clip_inf, loss_differences
    w1 = weight_tensor("a.weight", "a", 0, (8, 3, 3, 3), 0, tuple([0.01] * 8))
    b1 = bias_tensor("a.bias", "ab", 216, (8,), tuple([0.001] * 8), w1)
    w2 = weight_tensor("b.weight", "b", 224, (5, 300), 0, tuple([0.02] * 5))
    table = QuantTable((w1, b1, w2))
    blocks = perturb.BlockTable([(t.name, t.shape, t.offset) for t in table.tensors])
    task = RoundTask(round=2, client=1, seed=5, k=40, sigma=1e-4, noise="block", domain="int8-step",
                     scheme="central" if central else "forward")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(table.dim) * 1.5).astype(np.float32)
    losses = rng.standard_normal(task.losses_per_step)
    base = None if central else 0.3
    got = step_gradient(task, 0, losses, base, table.dim, table=table, weights=w, blocks=blocks)
    drawn, values = step_blocks(task, 0, blocks)
    flat = FlatSteps(table, table.quantize(w))
    eff = [flat.effective(blocks.index[blocks.bounds[b]:blocks.bounds[b + 1]], v, central=central)
           * blocks.step_weight[b] for b, v in zip(drawn, values)]
    diffs = loss_differences(losses, base, task.scheme)
    want = clip_inf(blocks.accumulate(drawn, eff, diffs / diffs.size) / table.divisor(task.estimator), task.clip)
    assert got.tobytes() == want.tobytes() and np.abs(got).max() > 0


@pytest.mark.parametrize("steps", [False, True])
def test_flat_block_draw_is_the_per_perturbation_draw(steps):
    """``draw_flat`` (what client rows and the server's decode consume) holds ``draw`` / ``draw_steps``'s
    values k after k, ``indices`` their parameter indices, and ``accumulate_flat`` sums them as
    ``accumulate`` does, bit for bit; the float decode in one pass equals the per-block sum."""
    from baffle_edge.rows import step_blocks, step_gradient
    from baffle_edge.estimator import clip_inf, loss_differences
    table = perturb.BlockTable([("a.weight", (8, 3, 3, 3), 0), ("a.bias", (8,), 216), ("b.weight", (5, 33), 224),
                                ("b.bias", (5,), 389)]).capped(2 if steps else None)
    ks = np.arange(3, 700, 3)
    blocks, values = (table.draw_steps if steps else table.draw)(9, 4, 2, ks)
    b, flat = table.draw_flat(9, 4, 2, ks, steps=steps)
    assert np.array_equal(b, blocks) and flat.tobytes() == np.concatenate(values).tobytes()
    # the streams as the per-perturbation draw produced them before it was vectorised (and the TS port draws)
    digest = hashlib.sha256(b.astype("<i8").tobytes() + flat.tobytes()).hexdigest()[:16]
    assert digest == ("bf0edddf26b05f59" if steps else "86f109fe1402d738"), digest
    assert len(set(table.module[blocks].tolist())) == 2 and (np.abs(flat) == 2).any() == steps
    assert np.array_equal(table.indices(b), np.concatenate([table.index[table.bounds[i]:table.bounds[i + 1]] for i in b]))
    coef = np.random.default_rng(1).standard_normal(len(b))
    assert table.accumulate_flat(b, flat, coef).tobytes() == table.accumulate(blocks, values, coef).tobytes()
    assert np.array_equal(table.drawn_blocks(9, 4, 2, ks), blocks)
    empty_b, empty = table.draw_flat(9, 4, 2, [], steps=steps)
    assert empty_b.size == 0 and empty.size == 0 and table.indices(empty_b).size == 0
    if not steps:
        task = RoundTask(round=4, client=2, seed=9, k=50, sigma=1e-3, noise="block")
        losses = np.random.default_rng(0).standard_normal(task.losses_per_step)
        got = step_gradient(task, 0, losses, 0.2, table.dim, blocks=table)
        drawn, vals = step_blocks(task, 0, table)
        diffs = loss_differences(losses, 0.2, task.scheme)
        want = clip_inf(table.accumulate(drawn, vals, diffs / diffs.size) / task.sigma, task.clip)
        assert got.tobytes() == want.tobytes() and np.abs(got).max() > 0


@pytest.mark.parametrize("cap", [None, 2])
def test_block_rows_move_as_the_range_test_says(cap):
    """``FlatSteps.moved_rows`` / ``effective_rows`` (one unit per coordinate for the table's block steps)
    give ``moved`` / ``effective``'s integers and values, coordinates near the range frozen included."""
    from baffle_edge.quant import FlatSteps, QuantTable, bias_tensor, weight_tensor
    w1 = weight_tensor("a.weight", "a", 0, (8, 3, 3, 3), 0, tuple([0.01] * 8))
    b1 = bias_tensor("a.bias", "ab", 216, (8,), tuple([0.001] * 8), w1)
    w2 = weight_tensor("b.weight", "b", 224, (5, 300), 0, tuple([0.02] * 5))
    table = QuantTable((w1, b1, w2))
    blocks = perturb.BlockTable([(t.name, t.shape, t.offset) for t in table.tensors]).capped(cap)
    w = (np.random.default_rng(0).standard_normal(table.dim) * 1.5).astype(np.float32)
    flat = FlatSteps(table, table.quantize(w))
    b, v = blocks.draw_flat(3, 1, 2, np.arange(500), steps=True)
    idx = blocks.indices(b)
    assert (flat.moved(idx, v, 1) == flat.q[idx]).sum() > 1000  # many coordinates cannot move
    for sign in (1, -1):
        got, want = flat.moved_rows(blocks, idx, v, sign), flat.moved(idx, v, sign)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    for central in (False, True):
        got = flat.effective_rows(blocks, idx, v, central=central)
        assert got.tobytes() == flat.effective(idx, v, central=central).tobytes()
    other = blocks.capped(1)  # another step table: the units follow it
    b1_, v1 = other.draw_flat(3, 1, 2, np.arange(50), steps=True)
    i1 = other.indices(b1_)
    assert np.array_equal(flat.moved_rows(other, i1, v1), flat.moved(i1, v1))
