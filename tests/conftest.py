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
