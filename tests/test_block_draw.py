"""Weighted block draws (docs/noise.md section 11): RoundTask.block_weights, BlockTable.weighted, the
server's size / uniform / adaptive policies, and resuming an adaptive run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from baffle_edge.runtimes.torch_runtime import TorchSession

from baffle_edge.block_draw import BlockDraw, BlockDrawPolicy
from baffle_edge.client import Batch, run_task
from baffle_edge.models import ModelConfig, build_model
from baffle_edge.params import flat_params, layout_of
from baffle_edge.perturb import BlockTable, NoiseKind
from baffle_edge.protocol import ClientReport, Domain, RoundTask
from baffle_edge.rows import step_gradient

LENET = ModelConfig("lenet", 1, 8, 10)


@pytest.fixture(scope="module")
def table():
    return BlockTable.from_layout(layout_of(build_model(LENET)))


def _task(k: int, weights=None, **kw) -> RoundTask:
    return RoundTask(round=1, client=3, seed=11, k=k, sigma=1e-3, noise=NoiseKind.BLOCK, block_weights=weights, **kw)


def test_block_weights_in_the_task_json():
    t = _task(10, (1, 2, 3))
    d = json.loads(t.to_json())
    assert d["block_weights"] == [1, 2, 3] and RoundTask.from_json(t.to_json()) == t
    assert "block_weights" not in json.loads(_task(10).to_json())  # size-drawn tasks read as before
    for bad, msg in (([0, 1, 1], "integer in"), ([1.5], "integer in"), ([], "1..4096"), ("abc", "list")):
        with pytest.raises(ValueError, match="block_weights"):
            _task(10, bad)
    with pytest.raises(ValueError, match="only block noise"):
        RoundTask(round=0, client=0, seed=1, k=4, sigma=1e-3, block_weights=(1, 1, 1))


def test_size_weights_reproduce_the_default_draw(table):
    """Module weights equal to the block sizes are section 8's draw, bit for bit."""
    same = table.weighted([26, 401, 65])
    b0, v0 = table.draw(5, 1, 2, np.arange(300))
    b1, v1 = same.draw(5, 1, 2, np.arange(300))
    assert np.array_equal(b0, b1) and all(np.array_equal(a, b) for a, b in zip(v0, v1))
    assert table.weighted(None) is table
    with pytest.raises(ValueError, match="expected 3 positive integers"):
        table.weighted([1, 1])


def test_weighted_draw_frequencies_and_isotropy(table):
    """Uniform weights: every block alike, and E[eps eps^T] = I still holds coordinate-wise."""
    uni = table.weighted([1, 1, 1])
    blocks, values = uni.draw(9, 0, 0, np.arange(45000))
    share = np.bincount(table.module[blocks], minlength=3) / blocks.size
    np.testing.assert_allclose(share, [16 / 90, 64 / 90, 10 / 90], atol=0.01)
    second = uni.accumulate(blocks, [v * v for v in values], np.full(blocks.size, 1 / blocks.size))
    for m in range(3):  # mean of eps_i^2 per module ~ 1
        idx = np.concatenate([table.index[table.bounds[b]:table.bounds[b + 1]] for b in np.flatnonzero(table.module == m)])
        assert abs(second[idx].mean() - 1) < 0.1, m


def test_weighted_rows_run_incrementally(lenet_batch):
    model, x, y = lenet_batch
    session = TorchSession(model)
    task = _task(40, (50, 1, 400))
    inc = session.losses(Batch(x, y), task)
    session.block_forward = None
    np.testing.assert_allclose(inc, session.losses(Batch(x, y), task), rtol=1e-6)


def test_adaptive_policy_moves_draws_to_the_energetic_module(table):
    """A module whose rows show large loss differences gets more of the draw; the decoded estimate
    stays unbiased because the task carries the weights."""
    cost = np.where(table.module == 1, 0.016, np.where(table.module == 0, 0.064, 0.0002))
    draw = BlockDraw(BlockDrawPolicy.ADAPTIVE, table, cost, Domain.FLOAT)
    assert draw.weights is None  # starts in proportion to size
    task = _task(2000)
    from baffle_edge.rows import step_blocks
    drawn, _ = step_blocks(task, 0, table)
    diffs = np.where(table.module[drawn] == 0, 1.0, 0.01)  # conv1 rows move the loss most
    report = ClientReport(round=1, client=3, losses=2.0 + diffs, base_losses=np.array([2.0]), num_samples=32)
    draw.observe(task, report)
    draw.end_round()
    w = np.array(draw.weights, dtype=float)
    before = table.sizes[[0, 16, 80]] / table.dim  # per-block probability under size
    after = w / (w[table.module]).sum()
    assert after[0] > 10 * before[0] and after[1] < before[1]
    state = draw.state()
    again = BlockDraw(BlockDrawPolicy.ADAPTIVE, table, cost, Domain.FLOAT)
    again.load_state(json.loads(json.dumps(state)))
    assert again.weights == draw.weights and np.allclose(again.energy, draw.energy)
    assert draw.k_for_budget(101) > 0


def test_policy_needs_block_noise(digits):
    from baffle_edge.simulate import Federation, TrainConfig
    with pytest.raises(ValueError, match="--noise block"):
        Federation(TrainConfig(noise="gaussian", block_draw="uniform", rounds=1, workers=1), data=digits)
    fed = Federation(TrainConfig(noise="block", block_draw="uniform", forward_budget=101, rounds=1, workers=1),
                     data=digits)
    assert fed.task(0, 0).block_weights == (1, 1, 1)
    assert fed.client_compute()["forward_equivalents"] == pytest.approx(101, rel=0.01)


def test_adaptive_run_resumes_exactly(tmp_path):
    """The adaptive draw state travels in the checkpoint: a resumed run equals an uninterrupted one."""
    from baffle_edge.simulate import TrainConfig, load_checkpoint, train
    cfg = TrainConfig(noise="block", block_draw="adaptive", k=300, rounds=4, clients=3, workers=1, eval_every=2,
                      checkpoint_every=1)
    full = train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "part", progress=False, stop_after=2)
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    strip = lambda m: [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]]
    assert strip(full) == strip(resumed)
    state = json.loads(load_checkpoint(tmp_path / "part" / "checkpoint.pt")["block_draw"])
    assert state["policy"] == "adaptive" and len(state["weights"]) == 3


def test_weights_reach_the_client(lenet_batch, table):
    """A client evaluates exactly the blocks the weighted task names (server and client agree)."""
    model, x, y = lenet_batch
    w = flat_params(model).numpy()
    task = _task(100, (1000, 1, 1))  # almost only conv1 blocks
    report = run_task(task, TorchSession(model), [Batch(x, y)], weights=w)
    g = step_gradient(task, 0, report.losses, report.base_losses[0], w.size, blocks=table)
    assert np.abs(g[:416]).sum() > 0 and (np.count_nonzero(g[416:]) < np.count_nonzero(g[:416]) * 5)


def test_conformance_kit_carries_weighted_draws(table):
    from baffle_edge.conformance import block_vectors
    rows = block_vectors()["weighted_draws"]
    assert {tuple(r["block_weights"]) for r in rows} == {(1, 1, 1), (3, 1, 1000), (2**32 - 1, 1, 2**31 + 7)}
    assert max(r["total_weight"] for r in rows) > 2**32  # r must be reduced in 64-bit arithmetic
    r = rows[0]
    (b,), (v,) = table.weighted(r["block_weights"]).draw(r["seed"], r["round"], r["client"], [r["k"]])
    assert b == r["block"] and [f"{x:08x}" for x in v[:4].view(np.uint32)] == r["values_head"]
