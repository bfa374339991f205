"""Shared test fixtures' builders: a briefly trained LeNet and its exported bundle."""
from __future__ import annotations

import numpy as np

from baffle_edge import conformance


def trained_lenet(digits, steps: int = 150, seed: int = 0):
    """A LeNet after ``steps`` Adam steps on ``digits`` (the conformance kit builds its bundles from the same)."""
    return conformance.trained_lenet(digits, steps, seed)


def accuracy_of(logits_fn, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    preds = np.concatenate([np.asarray(logits_fn(x[i:i + batch])).argmax(1) for i in range(0, len(y), batch)])
    return float((preds == y).mean())
