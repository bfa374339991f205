"""The exact incremental forward of block noise (docs/noise.md section 8; the forward: section 9) for torch LeNet.

A block-noise perturbation moves one output channel of one layer: a conv filter and its bias, or
one row of the head. Until the next layer that mixes channels, only that channel's activations
change, so each perturbed row is evaluated from the activations of the unperturbed forward
(``cache``), rows of the same layer side by side in one call:

* conv2 channel c: ``conv2d(p1, W2'[c])`` (one output channel) -> act -> mean -> column c of the
  features replaced -> head. ≈ 1/C2 of conv2 + the head.
* conv1 channel c: ``conv2d(x, W1'[c])`` -> act -> maxpool -> delta against the cached channel ->
  conv2's input column c applied to the delta (``a2 + conv2d(delta, W2[:, c])``, a grouped conv
  with no bias) -> act -> mean -> head. ≈ 1/C1 of conv1 + 1/C1 of conv2 + the head.
* head row j: column j of the logits recomputed from the cached features.

Losses equal a full forward at the same perturbed weights up to float32 rounding (the sums are
regrouped: tests/test_blocks.py checks 1e-6 relative). Supported: ``models.LeNet`` without
normalisation (``norm='none'``, the reference's digits/MNIST recipe), and WideResNet (GroupNorm,
residual adds: runtimes/torch_residual.py, rows re-run from the perturbed module to the end). A LeNet
with GroupNorm, MobileNet and MLP have no incremental forward in torch: their block-noise rows run as
full forwards (``block_forward = None``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baffle_edge.models import MLP, LeNet, MobileNet
from baffle_edge.params import layout_of
from baffle_edge.perturb import BlockTable

from .torch_residual import WideResNetBlockForward, row_macs
from .torch_rows import CHUNK_ELEMENTS, module_rows
from .torch_residual import supported as residual_supported



def _lenet_layers(model: nn.Module):
    """(conv1, act1, pool, conv2, act2, avgpool, fc) of a norm-free LeNet, or None."""
    if not isinstance(model, LeNet):
        return None
    f = model.features
    if not (isinstance(f[1], nn.Identity) and isinstance(f[5], nn.Identity)):
        return None  # GroupNorm couples the channels of a group: not a channel-local change
    return f[0], f[2], f[3], f[4], f[6], f[7], model.fc


CHAIN_MODELS = (LeNet, MobileNet, MLP)  # Sequential chains of Conv/Linear modules joined by channel-wise ops


def _is_chain(model: nn.Module) -> bool:
    """Whether ``model`` is a chain of modules as export/blocks.chain_plan cuts it (no normalisation:
    GroupNorm couples a group's channels); the bundle's plan is what a runtime actually uses."""
    return isinstance(model, CHAIN_MODELS) and not any(isinstance(m, nn.GroupNorm) for m in model.modules())


def supports(model: nn.Module) -> bool:
    return _lenet_layers(model) is not None or residual_supported(model)


def block_forward_for(session, model: nn.Module, blocks: BlockTable):
    """The torch session's incremental block forward for ``model`` (LeNet without norm, WideResNet), or None."""
    if _lenet_layers(model) is not None:
        return LeNetBlockForward(session, model, blocks)
    if residual_supported(model):
        return WideResNetBlockForward(session, model, blocks)
    return None


class LeNetBlockForward:
    """``client.BlockForward`` for a ``TorchSession`` holding a norm-free LeNet."""

    def __init__(self, session, model: nn.Module, blocks: BlockTable):
        layers = _lenet_layers(model)
        if layers is None:
            raise ValueError("incremental block forward: only a LeNet without normalisation is supported")
        self.session, self.blocks = session, blocks
        self.conv1, self.act1, self.pool, self.conv2, self.act2, self.avg, self.fc = layers
        names = {m: n for n, m in model.named_modules()}
        self.kind = {blocks.modules.index(names[self.conv1]): self._conv1,
                     blocks.modules.index(names[self.conv2]): self._conv2,
                     blocks.modules.index(names[self.fc]): self._head}

    @torch.no_grad()
    def cache(self, x: torch.Tensor) -> np.ndarray:
        """Run the unperturbed forward at the session's weights, keep its activations, return its logits."""
        self.session.restore()
        self.x = x
        self.p1 = self.pool(self.act1(self.conv1(x)))
        self.a2 = self.conv2(self.p1)
        self.f = self.avg(self.act2(self.a2)).flatten(1)
        self.z = self.fc(self.f)
        return self.z.numpy()

    @torch.no_grad()
    def logits(self, blocks: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """Logits [n, B, classes] of the rows that replace block ``blocks[i]``'s values by ``values[i]``."""
        blocks = np.asarray(blocks)
        missing = set(np.unique(self.blocks.module[blocks]).tolist()) - set(self.kind)
        if missing:
            raise ValueError(f"incremental block forward: no rule for module {self.blocks.modules[min(missing)]!r}")
        return module_rows(self.blocks, blocks, values, self.z.shape, self._chunk,
                           lambda m, c, v: self.kind[m](c, v[:, :-1], v[:, -1]))

    def _chunk(self, m: int) -> int:
        b, c2, h, w = self.a2.shape
        per_row = b * c2 * h * w if self.kind[m] == self._conv1 else b * max(h * w, 1) * 4
        return max(1, CHUNK_ELEMENTS // per_row)

    def _features_with(self, c: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """The cached features with column c[i] replaced by col[:, i], per row i: [n, B, C2]."""
        f = self.f.unsqueeze(0).repeat(len(c), 1, 1)
        f[torch.arange(len(c)), :, c] = col.T
        return f

    def _conv2(self, c, w, b):
        conv = self.conv2
        a = F.conv2d(self.p1, w.reshape(len(c), *conv.weight.shape[1:]), b, conv.stride, conv.padding,
                     conv.dilation)
        col = self.avg(self.act2(a)).flatten(1)  # [B, n]
        return self.fc(self._features_with(c, col))

    def _conv1(self, c, w, b):
        c1, c2 = self.conv1, self.conv2
        a = F.conv2d(self.x, w.reshape(len(c), *c1.weight.shape[1:]), b, c1.stride, c1.padding, c1.dilation)
        delta = self.pool(self.act1(a)) - self.p1[:, c]  # [B, n, h, w]
        k = c2.weight[:, c].transpose(0, 1).reshape(len(c) * c2.out_channels, 1, *c2.weight.shape[2:])
        d = F.conv2d(delta, k, None, c2.stride, c2.padding, c2.dilation, groups=len(c))
        bsz, ch, h, w_ = self.a2.shape
        a2 = self.a2.unsqueeze(1) + d.reshape(bsz, len(c), ch, h, w_)
        f = self.act2(a2).mean(dim=(3, 4))  # [B, n, C2]: AdaptiveAvgPool2d(1) of each row
        return self.fc(f.transpose(0, 1))

    def _head(self, j, w, b):
        col = self.f @ w.T + b  # [B, n]
        z = self.z.unsqueeze(0).repeat(len(j), 1, 1)
        z[torch.arange(len(j)), :, j] = col.T
        return z


def _conv_macs(conv: nn.Conv2d, out_hw: int, out_channels: int | None = None, in_channels: int | None = None) -> int:
    o = conv.out_channels if out_channels is None else out_channels
    i = conv.in_channels // conv.groups if in_channels is None else in_channels
    return o * i * conv.kernel_size[0] * conv.kernel_size[1] * out_hw


def block_macs(model: nn.Module, image_size: int, in_channels: int = 1, *, rule: str = "delta") -> tuple[int, np.ndarray]:
    """Multiply-accumulates per image: (one full forward, one incremental row per block of
    ``BlockTable.from_layout(layout_of(model))``). Counted for conv and linear layers (activations,
    pooling: not MACs). ``rule``: how the runtime evaluates a row (runtimes.RuntimeInfo.block_forward):

    * ``"delta"`` (torch): LeNet's conv1 rows push their delta through 1/C1 of conv2 (this module);
      a WideResNet row costs 1/C of its module plus the layers re-run after it (torch_residual.row_macs);
    * ``"chain"`` (LiteRT segments, runtimes/tflite_incremental.py): a chain model's row of module i
      costs 1/C_i of module i plus every module after it in full;
    * ``"graph"`` (ONNX Runtime segments, runtimes/ort_incremental.py): any model of Conv/Linear modules
      (residual adds, parameter-free norms): 1/C of module m plus every module downstream of m in full
      (a WideResNet unit's conv1 row re-runs that unit's conv2, not its shortcut; a chain: as ``"chain"``);
    * ``"full"``, or a model without an incremental forward: every row costs a full forward."""
    if rule not in BLOCK_RULES:
        raise ValueError(f"unknown block forward rule {rule!r}; known: {', '.join(BLOCK_RULES)}")
    blocks = BlockTable.from_layout(layout_of(model))
    with torch.no_grad():
        x = torch.zeros(1, in_channels, image_size, image_size)
        shapes: dict[nn.Module, int] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o: shapes.__setitem__(mod, o[0, 0].numel()))
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
    macs = {m: _conv_macs(m, shapes[m]) if isinstance(m, nn.Conv2d) else m.in_features * m.out_features
            for m in shapes}
    full = sum(macs.values())
    names = {m: n for n, m in model.named_modules()}
    layers = _lenet_layers(model)
    if rule == "delta" and layers is not None:
        conv1, _, _, conv2, _, _, fc = layers
        head = fc.in_features * fc.out_features
        per_module = {names[conv1]: _conv_macs(conv1, shapes[conv1], 1) + _conv_macs(conv2, shapes[conv2],
                                                                                    in_channels=1) + head,
                      names[conv2]: _conv_macs(conv2, shapes[conv2], 1) + head,
                      names[fc]: fc.in_features}
    elif rule == "delta" and residual_supported(model):  # runtimes/torch_residual.py
        per_module = {names[m]: c for m, c in row_macs(model, macs).items()}
    elif (rule == "chain" and _is_chain(model)) or (rule == "graph" and _is_graph(model)):
        # 1/C of module m, then every module downstream of m in full (a chain: every later module)
        down = _downstream(model, x)
        per_module = {names[m]: macs[m] // (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
                      + sum(macs[n] for n in down[m]) for m in macs}
    else:
        return full, np.full(len(blocks.sizes), full, dtype=np.int64)
    return full, np.array([per_module[blocks.modules[m]] for m in blocks.module], dtype=np.int64)


BLOCK_RULES = ("delta", "chain", "graph", "full")


def _is_graph(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is a Conv/Linear module's (export/graph_blocks.py cuts such a graph)."""
    return all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False)))


def _downstream(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, set[nn.Module]]:
    """Conv/Linear module -> the Conv/Linear modules whose input depends on its output (the autograd
    graph of one forward on ``x``)."""
    outputs: dict[object, nn.Module] = {}  # grad_fn of a module's output -> the module
    reads: dict[nn.Module, object] = {}  # module -> grad_fn of its input
    def hook(mod, i, o):
        outputs[o.grad_fn] = mod
        reads[mod] = i[0].grad_fn
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    down: dict[nn.Module, set[nn.Module]] = {m: set() for m in reads}
    for n, fn in reads.items():
        seen, stack = set(), [fn]
        while stack:  # every module output the input of n is computed from
            f = stack.pop()
            if f is None or f in seen:
                continue
            seen.add(f)
            if f in outputs:
                down[outputs[f]].add(n)
            stack.extend(g for g, _ in f.next_functions)
    return down


def equal_compute_k(model: nn.Module, image_size: int, forwards: float, in_channels: int = 1, *,
                    rule: str = "delta") -> int:
    """The number of block perturbations whose expected MACs (blocks drawn with probability
    d_b / d) plus the unperturbed forward equal ``forwards`` full forwards, on a runtime that
    evaluates rows by ``rule`` (``block_macs``)."""
    sizes = BlockTable.from_layout(layout_of(model)).sizes
    full, per = block_macs(model, image_size, in_channels, rule=rule)
    expected = float((per * sizes).sum() / sizes.sum())
    return max(1, int((forwards - 1) * full / expected))
