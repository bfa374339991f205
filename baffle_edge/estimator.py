"""Stein / finite-difference gradient reconstruction from loss scalars. Pure functions.

Perturbation ``delta_k = s * eps_k`` where ``s`` is the scalar sigma (float domain) or a
per-parameter step vector (int8-step domain: the quantization scale of each weight's channel).
With ``dL_k = L(w + delta_k) - L(w)`` (forward) or ``(L(w + delta_k) - L(w - delta_k)) / 2``
(central), the estimate is

    g = (1/K) * sum_k dL_k * eps_k / s

which for scalar ``s = sigma`` is the paper's ``(1/K) sum_k (dL_k / sigma) eps_k``. The sum is
streamed: ``noise_at(k)`` regenerates one ``eps_k`` at a time, so K noise vectors are never held.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .protocol import Scheme


def loss_differences(losses: np.ndarray, base_loss: float | None, scheme: Scheme | str) -> np.ndarray:
    """dL_k for each k from one step's losses (layout in protocol.py)."""
    losses = np.asarray(losses, dtype=np.float64)
    if Scheme(scheme) is Scheme.FORWARD:
        if base_loss is None:
            raise ValueError("forward scheme needs base_loss = L(w)")
        return losses - float(base_loss)
    if losses.size % 2:
        raise ValueError(f"central scheme needs 2K losses, got {losses.size}")
    k = losses.size // 2
    return (losses[:k] - losses[k:]) / 2.0


def stein_gradient(diffs: np.ndarray, step: float | np.ndarray, noise_at: Callable[[int], np.ndarray],
                   dim: int) -> np.ndarray:
    """g = (1/K) sum_k diffs[k] * noise_at(k) / step, accumulated one k at a time (float64)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size == 0:
        raise ValueError("need at least one loss difference")
    g = np.zeros(dim, dtype=np.float64)
    for k, dl in enumerate(diffs):
        if dl != 0.0:
            g += dl * noise_at(k)
    g /= diffs.size
    return g / step


def leave_one_out(diffs: np.ndarray) -> np.ndarray:
    """d_k - mean_{j != k} d_j = K/(K-1) (d_k - mean d): an unbiased baseline (eps_k is independent
    of the other perturbations' losses) that removes any part of the differences common to all k,
    such as the curvature term 1/2 sum_i H_ii delta_i^2 of +-1-step perturbations. Needs K >= 2."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size < 2:
        raise ValueError("leave-one-out baseline needs at least 2 loss differences")
    return (diffs - diffs.mean()) * (diffs.size / (diffs.size - 1))


def clip_inf(g: np.ndarray, max_norm: float | None) -> np.ndarray:
    """Reference clipping: scale g so that max|g_i| <= max_norm (torch clip_grad_norm_, inf norm)."""
    if max_norm is None:
        return g
    norm = float(np.max(np.abs(g))) if g.size else 0.0
    coef = max_norm / (norm + 1e-6)
    return g * coef if coef < 1.0 else g


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else 0.0


def expected_cosine(k: int, d: int) -> float:
    """The rough cosine of a K-sample Gaussian estimate to the true gradient: sqrt(K / (K + d))."""
    return float(np.sqrt(k / (k + d)))
