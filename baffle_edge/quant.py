"""The integer-domain perturbation of int8 graphs (numpy only; a device client mirrors it).

An int8 bundle stores every trainable tensor as integers with fixed per-channel scales:
weights as int8 (symmetric, zero point 0, scale ``s_c`` per output channel), biases as int32
(scale ``s_in * s_c``). For one round the client quantizes the global float weights with the
bundle's scales and evaluates K perturbations that move each integer by whole steps:

    weights:  q' = clip(q + eps, lo, hi)                       eps in {-1, +1} (Rademacher)
    biases:   q' = q + m * eps,   m = max(1, round(1 / s_in))   (about one weight step in float)

so ``delta = step * eps_eff`` with ``step = s_c`` (weights) or ``m * s_in * s_c`` (biases) and
``eps_eff = (q' - q) / m`` (equal to eps except where a weight saturates at a bound). The server
regenerates eps, recomputes q from the same weights and bundle, and estimates

    g = (1/K) sum_k dL_k * eps_eff_k / rms(step)      ("rms-step", default: the gradient with
                                                        respect to the integers, one float scale)
    g = (1/K) sum_k dL_k * eps_eff_k / step            ("per-step": unbiased, noisier)

(``QuantTable.divisor``, estimator.stein_gradient). See docs/quantized-perturbation.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .protocol import StepEstimator

INT_RANGE = {"int8": (-128, 127), "int32": (-(2**31), 2**31 - 1)}


@dataclass(frozen=True)
class QTensor:
    name: str  # torch parameter name (the float model's layout)
    input: str  # where the integers go: ONNX graph input name / TFLite tensor name
    offset: int  # position in the flat parameter vector (docs/noise.md section 3)
    shape: tuple[int, ...]
    dtype: str  # "int8" (weights) or "int32" (biases)
    axis: int  # channel axis of ``scale``
    scale: tuple[float, ...]  # float scale per channel (dequantized value = q * scale)
    multiplier: int = 1  # integer units per perturbation step
    qmax: int = 127  # quantization clip when rounding float weights (symmetric int8: 127; 7-bit: 64)
    lo: int | None = None  # bounds of perturbed integers (default: the dtype's range)
    hi: int | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        dlo, dhi = INT_RANGE[self.dtype]
        return (dlo if self.lo is None else self.lo), (dhi if self.hi is None else self.hi)

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # (np.prod costs ~20 us a call: this is on the per-row path)

    def broadcast(self, v: np.ndarray) -> np.ndarray:
        shape = [1] * len(self.shape)
        shape[self.axis] = -1
        return np.asarray(v, dtype=np.float64).reshape(shape)

    def quantize(self, w: np.ndarray) -> np.ndarray:
        s = self.broadcast(np.asarray(self.scale, dtype=np.float32))
        q = np.rint(np.asarray(w, dtype=np.float32).reshape(self.shape) / s)
        return np.clip(q, -self.qmax, self.qmax).astype(self.dtype)

    def step(self) -> np.ndarray:
        return np.broadcast_to(self.broadcast(self.scale) * self.multiplier, self.shape).reshape(-1)

    def perturb(self, q: np.ndarray, eps: np.ndarray, sign: int = 1) -> np.ndarray:
        lo, hi = self.bounds
        if self.dtype == "int8" and abs(self.multiplier) < 128:  # int16 is exact here and 4x less traffic
            step = np.int16(sign * self.multiplier)
            moved16 = q.astype(np.int16) + step * eps.reshape(self.shape).astype(np.int16)
            return np.clip(moved16, lo, hi).astype(np.int8)
        moved = q.astype(np.int64) + sign * self.multiplier * eps.reshape(self.shape).astype(np.int64)
        return np.clip(moved, lo, hi).astype(self.dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "input": self.input, "offset": self.offset, "shape": list(self.shape),
                "dtype": self.dtype, "axis": self.axis, "scale": [float(s) for s in self.scale],
                "multiplier": self.multiplier, "qmax": self.qmax, "lo": self.bounds[0], "hi": self.bounds[1]}

    @classmethod
    def from_json(cls, d: dict) -> "QTensor":
        return cls(d["name"], d["input"], int(d["offset"]), tuple(int(x) for x in d["shape"]), d["dtype"],
                   int(d["axis"]), tuple(float(s) for s in d["scale"]), int(d["multiplier"]), int(d["qmax"]),
                   d.get("lo"), d.get("hi"))


def weight_tensor(name: str, input: str, offset: int, shape: tuple[int, ...], axis: int,
                  scale: tuple[float, ...], *, reduce_range: bool = False) -> QTensor:
    """An int8 weight tensor (symmetric, zero point 0): rounded into [-127, 127], or with
    ``reduce_range`` (7-bit weights, export/onnx_export.py) into [-64, 64]; its perturbed integers stay
    in the same symmetric range (baffle.json's ``target.int8_weight_range``), so a +-1 step never
    saturates ONNX Runtime's int16 sums (7-bit) and the bounds of the freeze rule (docs/noise.md section
    10) treat both signs alike. (Bundles exported before this rule carry lo = -128 in their table and keep it.)"""
    qmax = 64 if reduce_range else 127
    return QTensor(name, input, offset, shape, "int8", axis, scale, qmax=qmax, lo=-qmax, hi=qmax)


def bias_tensor(name: str, input: str, offset: int, shape: tuple[int, ...], scale: tuple[float, ...],
                weight: QTensor) -> QTensor:
    """An int32 bias of scale ``s_in * s_w`` (per output channel). One perturbation step moves it by
    ``m = max(1, round(1 / s_in))`` integers: about one step of its layer's weights in float
    (``s_in`` = the median ratio of the bias scale to the weight scale)."""
    s_in = float(np.median(np.asarray(scale) / np.asarray(weight.scale)))
    return QTensor(name, input, offset, shape, "int32", 0, tuple(scale), max(1, int(round(1.0 / s_in))),
                   qmax=2**31 - 1)


@dataclass(frozen=True)
class QuantTable:
    """All trainable tensors of an int8 graph, in parameter order."""

    tensors: tuple[QTensor, ...]

    @property
    def dim(self) -> int:
        return sum(t.size for t in self.tensors)

    def quantize(self, flat_w: np.ndarray) -> list[np.ndarray]:
        flat_w = np.asarray(flat_w, dtype=np.float32)
        if flat_w.size != self.dim:
            raise ValueError(f"weights: expected {self.dim} values, got {flat_w.size}")
        return [t.quantize(flat_w[t.offset:t.offset + t.size]) for t in self.tensors]

    def step(self) -> np.ndarray:
        """Per-parameter float step of one perturbation unit (float64, length dim)."""
        return np.concatenate([t.step() for t in self.tensors])

    def divisor(self, estimator: StepEstimator | str = StepEstimator.RMS) -> float | np.ndarray:
        """What the Stein sum mean_k(dL_k * eps_eff_k) is divided by: one RMS step (the gradient with
        respect to the integers, in float units) or every coordinate's own step (unbiased)."""
        step = self.step()
        if StepEstimator(estimator) is StepEstimator.PER_STEP:
            return step
        return float(np.sqrt(np.mean(step * step)))

    def perturb(self, qs: list[np.ndarray], eps: np.ndarray, sign: int = 1) -> list[np.ndarray]:
        return [t.perturb(q, eps[t.offset:t.offset + t.size], sign) for t, q in zip(self.tensors, qs)]

    def effective_noise(self, qs: list[np.ndarray], eps: np.ndarray, *, central: bool = False) -> np.ndarray:
        """The perturbation actually applied, in steps: (q' - q) / m, or for the central scheme
        (q'(+eps) - q'(-eps)) / (2 m). Equals eps except where an int8 weight saturates."""
        out = np.empty(self.dim, dtype=np.float64)
        for t, q in zip(self.tensors, qs):
            e = eps[t.offset:t.offset + t.size]
            lo = t.perturb(q, e, -1) if central else q
            diff = t.perturb(q, e, 1).astype(np.int64) - lo.astype(np.int64)
            out[t.offset:t.offset + t.size] = diff.reshape(-1) / ((2 if central else 1) * t.multiplier)
        return out

    def dequantize(self, qs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([(q.astype(np.float64) * t.broadcast(t.scale)).reshape(-1)
                               for t, q in zip(self.tensors, qs)])

    def to_json(self) -> list[dict]:
        return [t.to_json() for t in self.tensors]

    @classmethod
    def from_json(cls, rows: list[dict]) -> "QuantTable":
        return cls(tuple(QTensor.from_json(r) for r in rows))


class StepSelector:
    """``QuantTable.perturb`` for Rademacher eps as one select per tensor, bit-identical to it:
    q' = where(eps < 0, clip(q - m), clip(q + m)) with both candidates computed once per set of
    weights. A client evaluating K perturbations at the same weights saves the add/clip/cast per k
    and takes eps as a boolean mask (perturb.negative_signs: 1 byte per parameter, not 4)."""

    def __init__(self, table: QuantTable, qs: list[np.ndarray]):
        ones = np.ones(table.dim, dtype=np.float32)
        self.tensors = table.tensors
        self.up, self.down = table.perturb(qs, ones, 1), table.perturb(qs, ones, -1)
        self._views = [(slice(t.offset, t.offset + t.size), t.shape) for t in table.tensors]  # sizes computed once
        # int8 tensors select by arithmetic, up + negative * (down - up) in int8 (exact: |down - up| <= 2m
        # fits int8), ~15x faster than np.where on a 25k-value int8 tensor here; others use np.where
        self._gap = [(d - u).astype(np.int8) if u.dtype == np.int8 and np.abs(d.astype(np.int16) - u).max(initial=0) <= 127
                     else None for u, d in zip(self.up, self.down)]

    def __call__(self, negative: np.ndarray, sign: int = 1) -> list[np.ndarray]:
        """The perturbed integers for eps = where(negative, -1, +1), moved by ``sign`` * eps."""
        plus, minus = (self.up, self.down) if sign > 0 else (self.down, self.up)
        out = []
        for (sl, shape), p, m, gap in zip(self._views, plus, minus, self._gap):
            mask = negative[sl].reshape(shape)
            if gap is None:
                out.append(np.where(mask, m, p))
            else:  # plus + mask * (minus - plus); the gap's sign follows the direction
                step = mask.view(np.int8) * gap
                out.append(np.add(p, step if sign > 0 else np.negative(step, out=step), out=step))
        return out


class FlatSteps:
    """The integers of one set of weights as flat per-parameter arrays (parameter order), for
    perturbations that touch a few coordinates (int8 block noise, docs/noise.md section 10): the
    moved integers and the effective noise at chosen flat indices.

    A coordinate whose move could leave [lo, hi] in either direction (``q +- delta`` outside) is
    **not moved** (eps_eff = 0 for both signs), where ``QTensor.perturb`` clips +-1 steps. With
    block steps of up to 32 integers, clipping made the applied noise of weights near a bound
    one-sided (E[eps_eff] != 0), so the loss's curvature offset (always positive, ~m_b^2) leaked
    into their estimates and pushed each channel's largest weight outward round after round
    (measured: accuracy peaked at 86% and fell; reflecting the move has the same flaw: both signs
    then move the weight the same way). Frozen coordinates keep E[eps_eff] = 0; they get no
    estimate from that perturbation (a bias towards 0 for the channel's extreme weights only)."""

    def __init__(self, table: QuantTable, qs: list[np.ndarray]):
        self.q = np.empty(table.dim, np.int64)
        self.lo, self.hi, self.mult = (np.empty(table.dim, np.int64) for _ in range(3))
        for t, q in zip(table.tensors, qs):
            sl = slice(t.offset, t.offset + t.size)
            self.q[sl] = q.reshape(-1)
            self.lo[sl], self.hi[sl] = t.bounds
            self.mult[sl] = t.multiplier
        self.room = np.minimum(self.q - self.lo, self.hi - self.q)  # the largest |delta| that stays in range
        self._units: tuple[bytes, np.ndarray] | None = None  # (block steps, units): block rows' moves

    def moved(self, idx: np.ndarray, steps: np.ndarray, sign: int = 1) -> np.ndarray:
        """q + delta at flat indices ``idx``, delta = sign * multiplier * steps, or q where q + delta
        or q - delta leaves [lo, hi] (|delta| > ``room``); int64."""
        q = self.q[idx]
        delta = self.mult[idx] * np.asarray(steps, np.int64)
        if sign < 0:
            np.negative(delta, out=delta)
        return np.where(np.abs(delta) <= self.room[idx], q + delta, q)

    def block_units(self, blocks) -> np.ndarray:
        """Per coordinate, the integers one step of its block moves it (``multiplier``), or 0 where the block's
        m_b steps (``blocks.steps``, a ``perturb.BlockTable``) could leave [lo, hi]: then ``moved(idx, v, sign)``
        of values v = +-m_b drawn by ``blocks`` is q + sign * units * v at idx, with a gather and a product
        instead of a range test per row (|delta| = |multiplier| m_b does not depend on the signs)."""
        key = blocks.steps.tobytes()
        if self._units is None or self._units[0] != key:
            m = np.empty(self.q.size, np.int64)
            m[blocks.index] = np.repeat(blocks.steps, blocks.sizes)
            self._units = key, np.where(np.abs(self.mult) * m <= self.room, self.mult, 0)
        return self._units[1]

    def moved_rows(self, blocks, idx: np.ndarray, values: np.ndarray, sign: int = 1) -> np.ndarray:
        """``moved(idx, values, sign)`` of block rows drawn by ``blocks`` (``draw_flat`` steps), the same integers."""
        d = self.block_units(blocks)[idx] * values
        q = self.q[idx]
        return np.subtract(q, d, out=d) if sign < 0 else np.add(q, d, out=d)

    def effective_rows(self, blocks, idx: np.ndarray, values: np.ndarray, *, central: bool = False) -> np.ndarray:
        """``effective(idx, values, central=...)`` of block rows drawn by ``blocks``: the same float64 values
        (the moved integers minus the reference ones are units * values, or twice that central)."""
        c = 2 if central else 1
        return (self.block_units(blocks)[idx] * (c * values)) / (c * self.mult[idx])

    def tensors(self, table: QuantTable, flat: np.ndarray) -> list[np.ndarray]:
        """A flat integer vector back into the table's tensors (their shapes and dtypes)."""
        return [flat[t.offset:t.offset + t.size].reshape(t.shape).astype(t.dtype) for t in table.tensors]

    def effective(self, idx: np.ndarray, steps: np.ndarray, *, central: bool = False) -> np.ndarray:
        """``QuantTable.effective_noise`` at ``idx``: the steps actually applied (float64)."""
        lo = self.moved(idx, steps, -1) if central else self.q[idx]
        return (self.moved(idx, steps, 1) - lo) / ((2 if central else 1) * self.mult[idx])
