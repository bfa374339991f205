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


def test_affine_group_norm_falls_back_to_full_forwards():
    """A WideResNet whose GroupNorm has parameters has no rule for them: no incremental forward, full-forward costs."""
    import torch
    model = build_model(WRN, seed=0)
    model.features[1].post[0] = torch.nn.GroupNorm(2, 32, affine=True)
    session = TorchSession(model)
    assert session.block_forward is None
    full, per = block_macs(model, 8)
    assert (per == full).all()
