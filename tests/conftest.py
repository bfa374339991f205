import numpy as np
import pytest
import torch

from baffle_edge.data import load_digits
from baffle_edge.models import ModelConfig, build_model


@pytest.fixture(scope="session")
def digits():
    return load_digits(seed=0)


def adam_steps(model, data, steps: int, lr: float):
    """``model`` after ``steps`` Adam steps on consecutive batches of 32 of ``data``'s training set."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="session")
def lenet_batch(digits):
    """A trained-for-a-few-steps LeNet and one batch of 32: gradients there are informative."""
    model = adam_steps(build_model(ModelConfig("lenet", 1, 8, 10), seed=0), digits, 20, 1e-2)
    return model, digits.x_train[700:732], digits.y_train[700:732]


def exact_grad(model, x, y) -> np.ndarray:
    from baffle_edge.params import flat_grad
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(torch.from_numpy(x)).double(), torch.from_numpy(y)).backward()
    g = flat_grad(model).numpy().astype(np.float64)
    model.zero_grad(set_to_none=True)
    return g


@pytest.fixture(autouse=True)
def _auto_p_cache(tmp_path_factory, monkeypatch):
    """auto-P calibrations (runtimes/batching.py) go to a per-run temporary cache, never ~/.cache."""
    from baffle_edge.runtimes.batching import CACHE_ENV
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "auto-p-cache"))


def assert_rows_equal_full_forwards(session, table, x, y, chosen, *, moves: bool = False) -> None:
    """A torch session's incremental block rows (``session.block_forward``) for blocks ``chosen`` of ``table``,
    each moved by N(0, 0.3^2), equal full forwards at those weights: logits within 1e-5, losses within 1e-6
    relative; with ``moves`` each row must also move the logits (the row was not a no-op)."""
    from baffle_edge.client import cross_entropy
    fwd, w0 = session.block_forward, session.w0
    rng = np.random.default_rng(3)
    values = [w0[table.index[table.bounds[b]:table.bounds[b + 1]]]
              + rng.standard_normal(table.sizes[b]).astype(np.float32) * np.float32(0.3) for b in chosen]
    base = fwd.cache(session.prepare(x))
    got = fwd.logits(chosen, values)
    for i, b in enumerate(chosen):
        w = w0.copy()
        w[table.index[table.bounds[b]:table.bounds[b + 1]]] = values[i]
        want = session.evaluate(session.prepare(x), [w])[0]
        session.restore()
        module = table.modules[table.module[b]]
        if moves:
            assert not np.allclose(want, base, atol=1e-4), module  # the row did move the logits
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5, err_msg=module)
        assert abs(cross_entropy(got[i], y) / cross_entropy(want, y) - 1) < 1e-6, module
