"""The exact incremental forward of block noise for torch WideResNet (residual adds, GroupNorm).

A block-noise row moves one output channel of one module. GroupNorm couples the channels of a
group (mean and variance) and a residual add carries a change through the skip *and* the branch,
so a row's change is not channel-local past its module; it is still *unit-local before* it. The
unperturbed forward (``cache``) keeps, per residual block (unit) i, the pre-activated
input ``o = act(norm(x))``, conv1's output ``h`` and its post-activation ``p``, conv2's output
``y`` and the skip ``s`` (the shortcut conv's output, or the input itself). A row of module m then
costs 1/C of m (its one output channel, computed from m's cached input) plus the layers after m,
re-run from the cached tensors:

* stem channel c: the stem's cached output with channel c replaced -> every unit -> head;
* unit i conv1 channel c: the GroupNorm after conv1 couples only c's group (G channels; 1 without
  a norm), so that group is re-normalised from the cached ``h_i`` with channel c replaced (its mean
  and variance exact), activated, and its change pushed through G/C of conv2 (``y_i +
  conv2(delta)``, a grouped conv with no bias) -> + cached ``s_i`` -> units after i -> head;
* unit i conv2 channel c: ``y_i`` with channel c replaced -> + cached ``s_i`` -> units after i -> head;
* unit i shortcut channel c: ``s_i`` with channel c replaced -> cached ``y_i`` + it -> units after i -> head;
* head row j: column j of the logits recomputed from the cached features.

Rows of one module run side by side as one batch of n x B images (GroupNorm normalises per image,
so stacking rows does not mix them). Losses equal a full forward at the same perturbed weights up
to float32 rounding (tests/test_wrn_blocks.py: 1e-6 relative). ``row_macs`` is the cost model of
these rows (torch_incremental.block_macs, rule ``"delta"``). GroupNorm here has no affine
parameters (``models._norm``: ``affine=False``, as in the reference), so no block is a norm's; a
WideResNet with affine norms is not ``supported`` (its rows run as full forwards).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baffle_edge.models import WideBlock, WideResNet
from baffle_edge.perturb import BlockTable

from .torch_rows import CHUNK_ELEMENTS, module_rows


def supported(model: nn.Module) -> bool:
    """Whether ``model`` is a WideResNet whose norms have no parameters (GroupNorm affine=False, or none)."""
    return isinstance(model, WideResNet) and not any(
        isinstance(m, nn.GroupNorm) and m.affine for m in model.modules())


def _units(model: WideResNet) -> list[WideBlock]:
    return [m for m in model.features if isinstance(m, WideBlock)]


def _has_shortcut(u: WideBlock) -> bool:
    return isinstance(u.shortcut, nn.Conv2d)


def _group_size(u: WideBlock) -> int:
    """Channels of conv1's output that one channel's change moves through the post-norm: its GroupNorm group."""
    norm = u.post[0]
    if isinstance(norm, nn.GroupNorm):
        if norm.affine:
            raise ValueError("incremental block forward: GroupNorm with affine parameters has no rule here")
        return norm.num_channels // norm.num_groups
    if not isinstance(norm, nn.Identity):
        raise ValueError(f"incremental block forward: no rule for a {type(norm).__name__} after conv1")
    return 1


def row_macs(model: WideResNet, macs: dict[nn.Module, int]) -> dict[nn.Module, int]:
    """MACs per image of one incremental row, per Conv/Linear module (``macs``: a full forward's
    MACs per module): 1/C of the module plus the modules re-run after it (the rules above)."""
    units = _units(model)
    later = [sum(macs[m] for m in (u.conv1, u.conv2, u.shortcut) if m in macs) for u in units]
    after = [sum(later[i + 1:]) + macs[model.fc] for i in range(len(units))]  # units after i, then the head
    out = {model.features[0]: macs[model.features[0]] // model.features[0].out_channels + after[0] + later[0],
           model.fc: model.fc.in_features}
    for i, u in enumerate(units):
        group = macs[u.conv2] * _group_size(u) // u.conv2.in_channels  # G/C of conv2
        out[u.conv1] = macs[u.conv1] // u.conv1.out_channels + group + after[i]
        out[u.conv2] = macs[u.conv2] // u.conv2.out_channels + after[i]
        if _has_shortcut(u):
            out[u.shortcut] = macs[u.shortcut] // u.shortcut.out_channels + after[i]
    return out


def _replaced(cached: torch.Tensor, c: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """n copies of ``cached`` [B, C, ...] with channel c[i] of copy i replaced by new[:, i]: [n * B, C, ...]."""
    t = cached.unsqueeze(0).repeat(len(c), *([1] * cached.dim()))
    t[torch.arange(len(c)), :, c] = new.transpose(0, 1)
    return t.reshape(-1, *cached.shape[1:])


def _plus(rows: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """rows [n * B, ...] + the cached tensor [B, ...] of every row."""
    return (rows.reshape(-1, *cached.shape) + cached.unsqueeze(0)).reshape(rows.shape)


class WideResNetBlockForward:
    """``client.BlockForward`` for a ``TorchSession`` holding a ``models.WideResNet``."""

    def __init__(self, session, model: nn.Module, blocks: BlockTable):
        if not supported(model):
            raise ValueError("incremental block forward: WideResNetBlockForward needs a models.WideResNet "
                             "without affine norm parameters")
        self.session, self.blocks = session, blocks
        self.stem, self.units, self.fc = model.features[0], _units(model), model.fc
        self.tail = model.features[1 + len(self.units):]  # norm -> act -> avgpool -> flatten
        self.group = [_group_size(u) for u in self.units]
        names = {m: n for n, m in model.named_modules()}
        index = lambda m: blocks.modules.index(names[m])  # noqa: E731
        self.rule: dict[int, tuple[str, int]] = {index(self.stem): ("stem", -1), index(self.fc): ("head", -1)}
        for i, u in enumerate(self.units):
            self.rule[index(u.conv1)] = ("conv1", i)
            self.rule[index(u.conv2)] = ("conv2", i)
            if _has_shortcut(u):
                self.rule[index(u.shortcut)] = ("shortcut", i)
        if set(self.rule) != set(range(len(blocks.modules))):
            missing = [blocks.modules[m] for m in range(len(blocks.modules)) if m not in self.rule]
            raise ValueError(f"incremental block forward: no rule for module(s) {missing}")

    @torch.no_grad()
    def cache(self, x: torch.Tensor) -> np.ndarray:
        """Run the unperturbed forward at the session's weights, keep its activations, return its logits."""
        self.session.restore()
        self.x, self.a0 = x, self.stem(x)
        self.o, self.h, self.p, self.y, self.s = [], [], [], [], []
        a = self.a0
        for u in self.units:
            o = u.pre(a)
            h = u.conv1(o)
            p = u.post(h)
            y = u.conv2(p)
            s = u.shortcut(o) if _has_shortcut(u) else a
            for store, t in ((self.o, o), (self.h, h), (self.p, p), (self.y, y), (self.s, s)):
                store.append(t)
            a = y + s
        self.f = self.tail(a)
        self.z = self.fc(self.f)
        return self.z.numpy()

    @torch.no_grad()
    def logits(self, blocks: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """Logits [n, B, classes] of the rows that replace block ``blocks[i]``'s values by ``values[i]``."""
        blocks = np.asarray(blocks)
        def run(m: int, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kind, i = self.rule[m]
            return self._head(c, v[:, :-1], v[:, -1]) if kind == "head" else self._row(kind, i, c, v)
        return module_rows(self.blocks, blocks, values, self.z.shape,
                           lambda m: CHUNK_ELEMENTS // self._row_elements(*self.rule[m]), run)

    def _row_elements(self, kind: str, i: int) -> int:
        if kind == "head":
            return self.f.numel()
        t = self.a0 if kind == "stem" else self.h[i]
        # the replaced copy, its norm, the unit's conv outputs (conv1 rows: + each row's conv2 output)
        return 4 * t.numel() + (self.y[i].numel() if kind == "conv1" else 0)

    def _channel(self, conv: nn.Conv2d, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Output channels of ``conv`` on ``x`` at the rows' filters ``v`` (and bias): [B, n, H, W]."""
        n = len(v)
        w, b = (v[:, :-1], v[:, -1]) if conv.bias is not None else (v, None)
        return F.conv2d(x, w.reshape(n, *conv.weight.shape[1:]), b, conv.stride, conv.padding, conv.dilation)

    def _row(self, kind: str, i: int, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = len(c)
        if kind == "stem":
            a, start = _replaced(self.a0, c, self._channel(self.stem, self.x, v)), 0
        else:
            u = self.units[i]
            if kind == "conv1":
                a = _plus(self._conv1_group(u, i, c, v), self.s[i])
            elif kind == "conv2":
                a = _plus(_replaced(self.y[i], c, self._channel(u.conv2, self.p[i], v)), self.s[i])
            else:  # shortcut
                a = _plus(_replaced(self.s[i], c, self._channel(u.shortcut, self.o[i], v)), self.y[i])
            start = i + 1
        for u in self.units[start:]:
            a = u(a)
        return self.fc(self.tail(a)).reshape(n, *self.z.shape)

    def _conv1_group(self, u: WideBlock, i: int, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """conv2's output [n * B, C2, H, W] of the rows that move channel c[r] of unit i's conv1: c's
        group re-normalised and activated, its change pushed through the group's columns of conv2."""
        n, gs, conv = len(c), self.group[i], u.conv2
        g0 = (c // gs) * gs
        chans = g0[:, None] + torch.arange(gs)  # [n, G]: the channels of each row's group
        hg = self.h[i][:, chans]  # [B, n, G, H, W]
        hg[:, torch.arange(n), c - g0] = self._channel(u.conv1, self.o[i], v)
        bsz, _, _, hh, ww = hg.shape
        hg = hg.reshape(bsz * n, gs, hh, ww)
        norm = u.post[0]
        if isinstance(norm, nn.GroupNorm):  # one group of G channels: the same statistics as in the layer
            hg = F.group_norm(hg, 1, None, None, norm.eps)
        delta = u.post[1](hg).reshape(bsz, n * gs, hh, ww) - self.p[i][:, chans].reshape(bsz, n * gs, hh, ww)
        k = conv.weight[:, chans].transpose(0, 1).reshape(n * conv.out_channels, gs, *conv.weight.shape[2:])
        d = F.conv2d(delta, k, None, conv.stride, conv.padding, conv.dilation, groups=n)
        y = self.y[i].unsqueeze(1) + d.reshape(bsz, n, *self.y[i].shape[1:])
        return y.transpose(0, 1).reshape(-1, *self.y[i].shape[1:])

    def _head(self, j: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        col = self.f @ w.T + b  # [B, n]
        z = self.z.unsqueeze(0).repeat(len(j), 1, 1)
        z[torch.arange(len(j)), :, j] = col.T
        return z
