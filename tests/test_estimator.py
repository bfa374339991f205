import numpy as np
import pytest
import torch
from baffle_edge.runtimes.torch_runtime import TorchSession
from conftest import exact_grad

from baffle_edge.client import Batch
from baffle_edge.estimator import clip_inf, cosine, expected_cosine, loss_differences, stein_gradient
from baffle_edge.params import flat_params
from baffle_edge.protocol import RoundTask
from baffle_edge.rows import split_step, step_gradient


def estimate(model, x, y, k, *, seed=0, scheme="forward", noise="gaussian", sigma=1e-4):
    session = TorchSession(model)
    task = RoundTask(round=0, client=seed, seed=123, k=k, sigma=sigma, scheme=scheme, noise=noise)
    out = session.losses(Batch(x, y), task)
    base, losses = split_step(task, out)
    return step_gradient(task, 0, losses, base, session.dim)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_cosine_to_backprop_in_expected_band_and_rising_with_k(lenet_batch, scheme):
    model, x, y = lenet_batch
    g_true = exact_grad(model, x, y)
    d = g_true.size
    means = {}
    for k in (10, 100, 400):
        cos = [cosine(estimate(model, x, y, k, seed=s, scheme=scheme), g_true) for s in range(3)]
        means[k] = float(np.mean(cos))
        expect = expected_cosine(k, d)
        assert 0.5 * expect < means[k] < 2.0 * expect, (k, means[k], expect)
    assert means[10] < means[100] < means[400]


def test_rademacher_estimates_the_gradient_too(lenet_batch):
    model, x, y = lenet_batch
    g_true = exact_grad(model, x, y)
    cos = cosine(estimate(model, x, y, 400, noise="rademacher"), g_true)
    assert cos > 0.5 * expected_cosine(400, g_true.size)


def test_session_restores_weights_exactly(lenet_batch):
    model, x, y = lenet_batch
    before = flat_params(model).clone()
    estimate(model, x, y, 5, scheme="central")
    assert torch.equal(before, flat_params(model))


def test_stein_gradient_is_streaming_and_linear():
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((4, 7))
    diffs = np.array([0.5, -1.0, 0.0, 2.0])
    g = stein_gradient(diffs, 0.1, lambda k: eps[k], 7)
    assert np.allclose(g, (diffs[:, None] * eps).mean(0) / 0.1)
    step = np.linspace(0.1, 0.7, 7)  # per-parameter step sizes (int8-step domain)
    assert np.allclose(stein_gradient(diffs, step, lambda k: eps[k], 7), (diffs[:, None] * eps).mean(0) / step)


def test_loss_differences_layouts():
    assert np.allclose(loss_differences([3.0, 1.0], 2.0, "forward"), [1.0, -1.0])
    assert np.allclose(loss_differences([3.0, 5.0, 1.0, 1.0], None, "central"), [1.0, 2.0])
    with pytest.raises(ValueError):
        loss_differences([1.0], None, "forward")
    with pytest.raises(ValueError):
        loss_differences([1.0, 2.0, 3.0], None, "central")


def test_clip_inf_matches_torch():
    g = np.array([0.1, -2.0, 0.5])
    t = torch.tensor(g.copy(), requires_grad=True)
    t.grad = torch.tensor(g.copy())
    torch.nn.utils.clip_grad_norm_([t], max_norm=0.3, norm_type="inf")
    assert np.allclose(clip_inf(g, 0.3), t.grad.numpy())
    assert np.max(np.abs(clip_inf(g, 0.3))) <= 0.3 + 1e-9
    assert np.array_equal(clip_inf(g, None), g)
    small = np.array([0.01, -0.02])
    assert np.array_equal(clip_inf(small, 0.3), small)



def linear_int8_estimates(k, estimator, seeds):
    """int8-step estimates of a linear loss g.w over two tensors whose steps differ 4x (as in LeNet)."""
    from baffle_edge.quant import QTensor, QuantTable
    from baffle_edge.rows import step_noise
    table = QuantTable((QTensor("a", "a", 0, (20, 5), "int8", 0, (0.004,) * 20),
                        QTensor("b", "b", 100, (4, 50), "int8", 0, (0.001,) * 4)))
    rng = np.random.default_rng(1)
    w = rng.uniform(-0.05, 0.05, 300).astype(np.float32)
    g = rng.standard_normal(300)
    q = table.quantize(w)
    out = []
    for seed in seeds:
        task = RoundTask(round=0, client=0, seed=seed, k=k, sigma=1.0, noise="rademacher", domain="int8-step",
                         estimator=estimator)
        noise = step_noise(task, 0, 300)
        losses = np.array([g @ table.dequantize(table.perturb(q, noise(j))) for j in range(k)])
        out.append(step_gradient(task, 0, losses, g @ table.dequantize(q), 300, table=table, weights=w))
    return g, table.step(), out


def projection(v, direction):
    return float(v @ direction / (direction @ direction))


def test_int8_estimators_expectation_and_variance():
    # averaged over rounds: per-step is unbiased (-> g), rms-step is the integer gradient s*g / rms(s)
    g, s, per = linear_int8_estimates(200, "per-step", range(30))
    _, _, rms = linear_int8_estimates(200, "rms-step", range(30))
    integer = s * g / np.sqrt(np.mean(s * s))
    assert abs(projection(np.mean(per, axis=0), g) - 1) < 0.1
    assert abs(projection(np.mean(rms, axis=0), integer) - 1) < 0.05
    assert cosine(np.mean(rms, axis=0), integer) > 0.95 > cosine(integer, g)
    # one round with K << d: per-step drowns the large-step tensor in the small-step tensor's 1/s noise
    g, s, per = linear_int8_estimates(10, "per-step", range(30))
    _, _, rms = linear_int8_estimates(10, "rms-step", range(30))
    assert np.mean([cosine(e, g) for e in rms]) > 1.3 * np.mean([cosine(e, g) for e in per])
    with pytest.raises(ValueError, match="estimator"):
        RoundTask(round=0, client=0, seed=0, k=1, sigma=1.0, estimator="exact")


def test_step_selector_is_bit_identical_to_perturb():
    from baffle_edge import perturb
    from baffle_edge.quant import QTensor, QuantTable, StepSelector
    table = QuantTable((QTensor("w", "w", 0, (3, 40), "int8", 0, (0.01, 0.02, 0.03), qmax=64, lo=-64, hi=64),
                        QTensor("b", "b", 120, (3,), "int32", 0, (1e-4, 2e-4, 3e-4), multiplier=96)))
    w = np.random.default_rng(0).uniform(-1, 1, 123).astype(np.float32)  # many weights saturate at +-64
    qs = table.quantize(w)
    assert (np.abs(qs[0]) == 64).sum() > 10
    select = StepSelector(table, qs)
    for k in range(4):
        eps = perturb.noise(1, 2, 3, k, 123, "rademacher")
        neg = perturb.negative_signs(1, 2, 3, k, 123)
        assert neg.dtype == bool and np.array_equal(neg, eps < 0)
        for sign in (1, -1):
            for a, b in zip(select(neg, sign), table.perturb(qs, eps, sign)):
                assert a.dtype == b.dtype and np.array_equal(a, b)


def test_leave_one_out_baseline_cancels_a_common_offset_and_is_unbiased():
    from baffle_edge.estimator import leave_one_out
    d = np.array([0.3, -0.1, 0.5, 0.2])
    loo = leave_one_out(d)
    assert np.allclose(loo, [d[k] - np.delete(d, k).mean() for k in range(4)])
    assert np.allclose(leave_one_out(d + 7.0), loo)  # an offset common to all k (curvature) is gone
    with pytest.raises(ValueError, match="2"):
        leave_one_out([1.0])
    # int8-step round: losses = linear part + the constant curvature term; LOO decodes as if it were absent
    from baffle_edge.quant import QTensor, QuantTable
    table = QuantTable((QTensor("a", "a", 0, (4, 25), "int8", 0, (0.01, 0.02, 0.01, 0.03)),))
    w = np.random.default_rng(2).uniform(-0.5, 0.5, 100).astype(np.float32)
    g = np.random.default_rng(3).standard_normal(100)
    q = table.quantize(w)

    def estimate(baseline, offset):
        task = RoundTask(round=0, client=0, seed=1, k=30, sigma=1.0, noise="rademacher", domain="int8-step",
                         baseline=baseline)
        from baffle_edge.rows import step_noise
        noise = step_noise(task, 0, 100)
        losses = np.array([g @ table.dequantize(table.perturb(q, noise(j))) + offset for j in range(30)])
        return step_gradient(task, 0, losses, g @ table.dequantize(q), 100, table=table, weights=w)

    assert np.allclose(estimate("leave-one-out", 5.0), estimate("leave-one-out", 0.0))
    assert not np.allclose(estimate("base", 5.0), estimate("base", 0.0))
    assert cosine(estimate("leave-one-out", 5.0), g) > 2 * cosine(estimate("base", 5.0), g)
    with pytest.raises(ValueError, match="baseline"):
        RoundTask(round=0, client=0, seed=0, k=1, sigma=1.0, baseline="leave-one-out")
