"""fp32 PyTorch reference runtime: in-place perturbation of one model, MeZO-style.

For each k the trainable tensors are set to ``w0 + float32(sigma) * eps_k`` (computed in
float32, the same arithmetic as every other runtime), the loss is evaluated under
``torch.no_grad``, and ``w0`` is restored exactly from its single saved copy.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from baffle_edge.client import Batch, cross_entropy, noise_stream
from baffle_edge.params import flat_params, trainable
from baffle_edge.protocol import Domain, RoundTask, Scheme


class TorchSession:
    def __init__(self, model: nn.Module, *, name: str = "torch"):
        self.model = model.eval()
        self.name = name
        self.params = trainable(model)
        self.w0 = flat_params(model)
        self.dim = self.w0.numel()

    def set_weights(self, flat: np.ndarray) -> None:
        flat = torch.as_tensor(np.asarray(flat, dtype=np.float32))
        if flat.numel() != self.dim:
            raise ValueError(f"weights: expected {self.dim} values, got {flat.numel()}")
        self.w0 = flat.clone()
        self._load(self.w0)

    def _load(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()

    def _loss(self, x: torch.Tensor, y: np.ndarray) -> float:
        return cross_entropy(self.model(x).numpy(), y)

    def losses(self, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray:
        if Domain(task.domain) is not Domain.FLOAT:
            raise ValueError(f"runtime {self.name!r} perturbs float weights; task asks for domain {task.domain!r}")
        x = torch.from_numpy(np.ascontiguousarray(batch.x, dtype=np.float32))
        sigma = np.float32(task.sigma)
        central = Scheme(task.scheme) is Scheme.CENTRAL
        plus, minus = [], []
        with torch.no_grad():
            base = [] if central else [self._loss(x, batch.y)]
            for eps in noise_stream(task, step, self.dim):
                delta = torch.from_numpy(sigma * eps)
                self._load(self.w0 + delta)
                plus.append(self._loss(x, batch.y))
                if central:
                    self._load(self.w0 - delta)
                    minus.append(self._loss(x, batch.y))
            self._load(self.w0)
        return np.asarray(base + plus + minus, dtype=np.float64)


class TorchRuntime:
    name = "torch"

    def __init__(self, perturbations_per_call: int | str = 1):
        from .batching import resolve
        resolve(perturbations_per_call, self.name)  # a bad value fails here, not at load
        self.perturbations_per_call = perturbations_per_call  # 1: this module; > 1 / "auto": torch_batched.py

    def load(self, model: nn.Module, *, threads: int | None = None) -> TorchSession:
        if threads:
            torch.set_num_threads(threads)
        from .batching import model_name, resolve
        p = resolve(self.perturbations_per_call, self.name, model_name(model))
        if p > 1:
            from .torch_batched import TorchBatchedSession
            return TorchBatchedSession(model, perturbations_per_call=p)
        return TorchSession(model)
