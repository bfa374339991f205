"""The flat parameter vector that the noise generator indexes.

Order = ``model.named_parameters()`` order (registration order) of the trainable tensors,
each flattened row-major (C order). ``eps_k[offset : offset + size]`` perturbs one tensor.
The export metadata (``baffle.json``) publishes this same table for device clients.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    name: str  # torch parameter name, e.g. "features.0.weight"
    shape: tuple[int, ...]
    offset: int  # first index in the flat vector
    size: int  # number of elements


@dataclass(frozen=True)
class ParamLayout:
    specs: tuple[ParamSpec, ...]

    @property
    def dim(self) -> int:
        return sum(s.size for s in self.specs)

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "size": s.size,
                 "dtype": "float32"} for s in self.specs]


def layout_of(model: nn.Module) -> ParamLayout:
    specs, offset = [], 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            specs.append(ParamSpec(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
    return ParamLayout(tuple(specs))


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_params(model: nn.Module) -> torch.Tensor:
    """A detached float32 copy of the trainable parameters as one flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)]).float()


def set_flat_params(model: nn.Module, flat: torch.Tensor | np.ndarray) -> None:
    flat = torch.as_tensor(flat)
    offset = 0
    with torch.no_grad():
        for p in trainable(model):
            p.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, model has {offset} parameters")


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in trainable(model)])
