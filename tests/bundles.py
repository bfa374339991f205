"""Shared test fixtures' builders: a briefly trained LeNet and its exported bundle."""
from __future__ import annotations

import numpy as np
import torch

from baffle_edge.models import ModelConfig, build_model


def trained_lenet(digits, steps: int = 150, seed: int = 0):
    model = build_model(ModelConfig(), seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    for i in range(steps):
        j = (i * 32) % (len(y) - 32)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[j:j + 32]), y[j:j + 32]).backward()
        opt.step()
    return model.eval()


def accuracy_of(logits_fn, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    preds = np.concatenate([np.asarray(logits_fn(x[i:i + batch])).argmax(1) for i in range(0, len(y), batch)])
    return float((preds == y).mean())
