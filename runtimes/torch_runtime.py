"""fp32 PyTorch reference runtime: MeZO-style perturbation of one model, P weight sets per call.

Each row's weights are ``w0 + float32(sigma) * eps_k`` (client.FloatWeights: the same float32
arithmetic as every other runtime); ``w0`` is kept as one float32 copy and reloaded exactly.

With ``P = 1`` every set is copied into the model's parameters and the model runs as is. With
``P > 1`` (``--perturbations-per-call``, docs/batched-k.md) the P weight vectors are stacked to
``[P, dim]`` and evaluated in one call by ``BatchedForward``, a functional forward that keeps the P
copies side by side in the channel axis (``[B, P*C, H, W]``):

* ``Conv2d``: weights ``[P*O, I, kh, kw]``, ``groups = P * groups`` (depthwise convs too; on the shared
  image input: ``groups`` unchanged, P*O output channels - the input batch is never repeated);
* ``Linear``: ``einsum('bpf,pof->bpo')`` (a batched matmul) + bias;
* ``GroupNorm(G, affine=False)``: ``group_norm(x, P*G)`` (each group lies inside one copy, so the
  statistics are the per-copy ones);
* activations, pooling, ``Flatten``, identity: unchanged (element- or channel-wise).

Models are walked module by module (``Sequential``) with a forward rule for each container of
``baffle_edge.models`` (LeNet, WideResNet + its blocks, MobileNet, MLP); an unknown module raises ValueError.
``torch.func.vmap`` over ``functional_call`` was measured against this and is slower (docs/batched-k.md).
No ONNX dependency: this module imports torch and numpy only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baffle_edge.client import BaseSession, FloatWeights
from baffle_edge.models import MLP, LeNet, MobileNet, WideResNet, WideBlock
from baffle_edge.params import flat_params, layout_of, trainable
from baffle_edge.perturb import BlockTable

from .batching import AutoP, model_name, resolve

_ELEMENTWISE = (nn.Hardswish, nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.SELU,
                nn.Hardsigmoid, nn.Sigmoid, nn.Tanh)


class _X:
    """An activation: ``t`` is [B, P*C, ...] when ``stacked`` (copy-major channels), else shared by all copies."""

    __slots__ = ("t", "stacked")

    def __init__(self, t: torch.Tensor, stacked: bool):
        self.t, self.stacked = t, stacked


class BatchedForward:
    """``forward(x, weights)``: logits [P, B, classes] of ``model`` at P weight vectors ``weights [P, dim]``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layout = layout_of(model)
        self.dim = self.layout.dim
        self._check(model)

    def _check(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Sequential, LeNet, WideResNet, MobileNet, MLP, WideBlock)):
            for c in m.children():
                self._check(c)
        elif isinstance(m, nn.GroupNorm):
            if m.affine:
                raise ValueError("batched torch forward: GroupNorm with affine=True is not supported")
        elif not isinstance(m, (nn.Conv2d, nn.Linear, nn.Flatten) + _ELEMENTWISE):
            raise ValueError(f"batched torch forward: module {type(m).__name__} is not supported "
                             "(runtimes/torch_runtime.py)")

    def __call__(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        p = weights.shape[0]
        self.p = p
        self.w = {s.name: weights[:, s.offset:s.offset + s.size].reshape(p, *s.shape) for s in self.layout.specs}
        out = self._run(self.model, "", _X(x, False))
        b = x.shape[0]
        t = out.t if out.stacked else out.t.repeat(1, p)
        return t.reshape(b, p, -1).transpose(0, 1)

    def _run(self, m: nn.Module, name: str, x: _X) -> _X:
        pre = f"{name}." if name else ""
        sub = lambda child, v: self._run(getattr(m, child), pre + child, v)  # noqa: E731
        if isinstance(m, nn.Sequential):
            for i, c in enumerate(m):
                x = self._run(c, f"{pre}{i}", x)
            return x
        if isinstance(m, (LeNet, WideResNet, MobileNet)):
            return sub("fc", sub("features", x))
        if isinstance(m, MLP):
            return sub("net", x)
        if isinstance(m, WideBlock):
            o = sub("pre", x)
            y = sub("conv2", sub("post", sub("conv1", o)))
            s = x if isinstance(m.shortcut, nn.Identity) else sub("shortcut", o)
            return self._add(y, s)
        if isinstance(m, nn.Conv2d):
            return self._conv(m, pre, x)
        if isinstance(m, nn.Linear):
            return self._linear(m, pre, x)
        if isinstance(m, nn.GroupNorm):
            return _X(F.group_norm(x.t, m.num_groups * (self.p if x.stacked else 1), eps=m.eps), x.stacked)
        if isinstance(m, nn.Flatten):
            return _X(torch.flatten(x.t, m.start_dim, m.end_dim), x.stacked)
        return _X(m(x.t), x.stacked)  # element- / channel-wise

    def _conv(self, m: nn.Conv2d, pre: str, x: _X) -> _X:
        p = self.p
        w = self.w[pre + "weight"]
        w = w.reshape(p * w.shape[1], *w.shape[2:])
        b = self.w[pre + "bias"].reshape(-1) if m.bias is not None else None
        if not x.stacked and m.groups != 1:
            raise ValueError("batched torch forward: a grouped conv on the shared input is not supported")
        groups = m.groups * (p if x.stacked else 1)
        if m.padding_mode != "zeros":
            raise ValueError(f"batched torch forward: padding_mode {m.padding_mode!r} is not supported")
        return _X(F.conv2d(x.t, w, b, m.stride, m.padding, m.dilation, groups), True)

    def _linear(self, m: nn.Linear, pre: str, x: _X) -> _X:
        w = self.w[pre + "weight"]  # [P, O, F]
        b = self.w[pre + "bias"] if m.bias is not None else None  # [P, O]
        bsz = x.t.shape[0]
        if x.stacked:
            y = torch.einsum("bpf,pof->bpo", x.t.reshape(bsz, self.p, -1), w)
        else:
            y = torch.einsum("bf,pof->bpo", x.t, w)
        if b is not None:
            y = y + b
        return _X(y.reshape(bsz, -1), True)

    def _add(self, a: _X, b: _X) -> _X:
        if a.stacked != b.stacked:
            a, b = (a, _X(b.t.repeat(1, self.p, *([1] * (b.t.dim() - 2))), True)) if a.stacked else \
                   (_X(a.t.repeat(1, self.p, *([1] * (a.t.dim() - 2))), True), b)
        return _X(a.t + b.t, a.stacked or b.stacked)


class TorchSession(AutoP, FloatWeights, BaseSession):
    """A torch module as a ``client.Session`` (float domain). ``perturbations_per_call="auto"``
    measures P at the first batch (runtimes/batching.py)."""

    def __init__(self, model: nn.Module, *, perturbations_per_call: int | str = 1, name: str = "torch"):
        self.model = model.eval()
        self.name = name
        self.params = trainable(model)
        self._auto_key_model = f"{model_name(model)}[{sum(p.numel() for p in self.params)}]"
        self._auto_threads = torch.get_num_threads()
        self._init_p(perturbations_per_call)
        self.blocks = BlockTable.from_layout(layout_of(model))
        from .torch_incremental import block_forward_for
        self.block_forward = block_forward_for(self, model, self.blocks)
        self.set_weights(flat_params(model).numpy())

    def use_p(self, p: int) -> None:
        self.perturbations_per_call = p
        self.forward = BatchedForward(self.model) if p > 1 else None

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def set_weights(self, flat: np.ndarray) -> None:
        super().set_weights(flat)
        self._load(self.w0)

    def _load(self, flat: np.ndarray) -> None:
        """Copy one weight set into the model's parameters (skipped when it is already there)."""
        if flat is getattr(self, "_loaded", None):
            return
        t, offset = torch.from_numpy(flat), 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(t[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        self._loaded = flat

    def restore(self) -> None:
        self._load(self.w0)

    def prepare(self, x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self._calibrate_once(x)
        return x

    def evaluate(self, x: torch.Tensor, sets) -> list[np.ndarray]:
        if self.forward is None:
            return self.evaluate_sequential(x, sets)
        with torch.no_grad():
            return list(self.forward(x, torch.from_numpy(np.stack(sets))).numpy())

    def evaluate_sequential(self, x: torch.Tensor, sets) -> list[np.ndarray]:
        out = []
        with torch.no_grad():
            for w in sets:
                self._load(w)
                out.append(self.model(x).numpy())
        return out


class TorchRuntime:
    name = "torch"

    def __init__(self, perturbations_per_call: int | str = 1):
        resolve(perturbations_per_call, self.name)  # a bad value fails here, not at load
        self.perturbations_per_call = perturbations_per_call

    def load(self, model: nn.Module, *, threads: int | None = None) -> TorchSession:
        if threads:
            torch.set_num_threads(threads)
        return TorchSession(model, perturbations_per_call=self.perturbations_per_call)
