"""Seeded, portable perturbation noise: the one place ``eps_k`` is made.

Client and server call the same pure functions, so both regenerate the identical
``eps_k`` from ``(seed, round, client, k)`` without ever sending noise. The generator is
Philox4x32-10 (Salmon et al., SC'11) with the key/counter layout below; ``docs/noise.md``
is the normative spec with test vectors, precise enough for a Kotlin or C port.

    key     = (seed & 0xFFFFFFFF, seed >> 32)          seed: uint64
    counter = (block, k, client, round)                each uint32
    stream  = out(block 0)[0..3], out(block 1)[0..3], ...  (uint32 words)

Gaussian: words are consumed in pairs (a, b) by Box–Muller in float64,
    u1 = ((a >> 8) + 1) * 2**-24,  u2 = (b >> 8) * 2**-24,
    r = sqrt(-2 ln u1),  z[2i] = r cos(2 pi u2),  z[2i+1] = r sin(2 pi u2),
then rounded to float32. Rademacher: bit j (LSB first) of word i gives value 32 i + j,
0 -> +1, 1 -> -1 (32 values per word).

Block (``BlockTable``, docs/noise.md section 8): words 0 and 1 pick one block b with probability
d_b / d, r = (w[1] * 2**32 + w[0]) mod d, b = the block whose range [bounds[b], bounds[b+1]) holds r;
the block's d_b values are Gaussian from block 1 of the same stream on (Box-Muller as above),
times float32(sqrt(d / d_b)) in float32; every other entry of eps_k is 0.
"""
from __future__ import annotations

import copy
import enum
import sys

import numpy as np

PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
SHARED_CLIENT = 0xFFFFFFFF  # client word used when one noise stream is shared by all clients
NOISE_SPEC_VERSION = 1
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


class NoiseKind(str, enum.Enum):
    """Distribution of eps_k entries."""

    GAUSSIAN = "gaussian"  # N(0, 1) via Box–Muller (the paper's choice)
    RADEMACHER = "rademacher"  # +-1 with probability 1/2 (32 values per Philox word)
    BLOCK = "block"  # one output-channel block per perturbation (chosen ~ size, Gaussian, scaled sqrt(d/d_b))


def philox4x32(counter: tuple, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32-``rounds`` of a (broadcastable) counter under ``key``.

    ``counter`` holds four uint32 values or arrays (broadcast together); returns a uint32
    array of shape ``(4, *broadcast_shape)``.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(rounds):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1),
            p0 & _MASK32,
        )
        if r + 1 < rounds:
            k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
            k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def _check_word(name: str, value: int, bits: int = 32) -> int:
    value = int(value)
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be in [0, 2**{bits}), got {value}")
    return value


def words(seed: int, round_: int, client: int, k: int, n_words: int, first_block: int = 0) -> np.ndarray:
    """``n_words`` uint32 words of the stream keyed by (seed, round, client, k), starting at block
    ``first_block`` (4 words per block; 0 = the start of the stream).

    Same result as ``philox4x32((arange(blocks), k, client, round), key)`` read block by block,
    computed with in-place uint64 arithmetic (about 2x faster than the general function)."""
    seed = _check_word("seed", seed, 64)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    c1, c2, c3 = _check_word("k", k), _check_word("client", client), _check_word("round", round_)
    nb = -(-n_words // 4)
    if not 0 <= first_block <= 2**32 - nb:
        raise ValueError(f"blocks [{first_block}, {first_block + nb}) outside the 2**32-block stream")
    ctr = np.arange(first_block, first_block + nb, dtype=np.uint64)
    return _philox_blocks(ctr, np.uint64(c1), c2, c3, k0, k1).reshape(-1)[:n_words]


def _philox_blocks(c0: np.ndarray, c1, c2: int, c3: int, k0: int, k1: int) -> np.ndarray:
    """Philox4x32-10 of counters (c0[i], c1[i] or c1, c2, c3) as [n, 4] uint32, in place (uint64
    arithmetic); ``c1`` is a scalar or an array like ``c0``."""
    nb = c0.size
    # round 1: c2 and c3 are scalars
    p0 = PHILOX_M0 * c0
    p1 = int(PHILOX_M1) * c2
    x0 = (np.uint64(p1 >> 32) ^ np.asarray(c1, dtype=np.uint64) ^ np.uint64(k0)) & _MASK32
    x0 = np.array(np.broadcast_to(x0, (nb,)), dtype=np.uint64)
    x1 = np.full(nb, np.uint64(p1 & 0xFFFFFFFF))
    x2 = (p0 >> _SHIFT32) ^ np.uint64(c3 ^ k1)
    x3 = p0 & _MASK32
    t0, t1 = np.empty(nb, np.uint64), np.empty(nb, np.uint64)
    for _ in range(1, PHILOX_ROUNDS):
        k0, k1 = (k0 + PHILOX_W0) & 0xFFFFFFFF, (k1 + PHILOX_W1) & 0xFFFFFFFF
        np.multiply(x0, PHILOX_M0, out=t0)
        np.multiply(x2, PHILOX_M1, out=t1)
        np.right_shift(t1, _SHIFT32, out=x0)
        x0 ^= x1
        x0 ^= np.uint64(k0)
        np.bitwise_and(t1, _MASK32, out=x1)
        np.right_shift(t0, _SHIFT32, out=x2)
        x2 ^= x3
        x2 ^= np.uint64(k1)
        np.bitwise_and(t0, _MASK32, out=x3)
    out = np.empty((nb, 4), np.uint32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = x0, x1, x2, x3
    return out


def box_muller(w: np.ndarray) -> np.ndarray:
    """Map an even number of uint32 words to float32 standard normals (see module doc)."""
    s = w >> np.uint32(8)
    u1 = (s[0::2] + 1.0) * 2.0**-24  # (0, 1]: log never sees 0
    theta = s[1::2] * (2.0 * np.pi * 2.0**-24)  # == 2*pi*u2 exactly (power-of-two scaling)
    z = np.empty(w.shape[0], dtype=np.float32)
    fast = _vector_libm(u1, theta)
    if fast is None:
        r = np.sqrt(-2.0 * np.log(u1))
        z[0::2] = r * np.cos(theta)
        z[1::2] = r * np.sin(theta)
        return z
    r, cos, sin = fast
    for out, approx, exact in ((z[0::2], cos, np.cos), (z[1::2], sin, np.sin)):
        v = r * approx
        out[...] = v
        redo = _near_float32_boundary(v)  # where a few-ulp difference of the double could change the float32
        if redo.any():
            out[redo] = np.sqrt(-2.0 * np.log(u1[redo])) * exact(theta[redo])
    return z


# float64 ln/cos/sin of a vectorised libm (torch's SLEEF kernels, <= 1 ulp) differ from numpy's (the
# reference, <= 1 ulp) by <= 2 ulp: the products r * cos differ by < 2**-49 relative, and round to
# the same float32 unless they lie within that of a float32 rounding boundary (~1 value in 2**22):
# those are recomputed with numpy. So the fast path is bit-identical to the reference by construction.
_TRIG_MARGIN = 2.0**-46  # relative distance to a float32 rounding boundary that counts as ambiguous (8x the bound)


def _vector_libm(u1: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(r, cos, sin) = (sqrt(-2 ln u1), cos theta, sin theta) in float64 from torch's vectorised kernels
    when torch is already imported in this process (a server, the torch runtime); None otherwise
    (this never imports torch: numpy's libm calls are the device path). ~3x faster than numpy's
    scalar libm loops here (docs/benchmarks.md)."""
    torch = sys.modules.get("torch")
    if torch is None or theta.size < 64 or not hasattr(torch, "from_numpy"):
        return None
    t, u = torch.from_numpy(np.ascontiguousarray(theta)), torch.from_numpy(np.ascontiguousarray(u1))
    return torch.sqrt(torch.log(u).mul_(-2.0)).numpy(), torch.cos(t).numpy(), torch.sin(t).numpy()


def _near_float32_boundary(v: np.ndarray) -> np.ndarray:
    """Where the float64 ``v`` lies within ``_TRIG_MARGIN`` (relative) of a float32 rounding boundary:
    ``v * (1 - m)`` and ``v * (1 + m)`` round to different float32 values (rounding is monotonic).
    Zeros need no check: the sign of r * cos is exact."""
    lo = (v * (1.0 - _TRIG_MARGIN)).astype(np.float32)
    return lo != (v * (1.0 + _TRIG_MARGIN)).astype(np.float32)


GAUSSIAN_CHUNK = 1 << 16  # values per Philox + Box-Muller batch (a multiple of 4: chunks start on blocks)


def rademacher_negative(w: np.ndarray, n: int) -> np.ndarray:
    """Unpack uint32 words LSB-first into n booleans: True where the Rademacher value is -1."""
    return np.unpackbits(w.astype("<u4").view(np.uint8), bitorder="little")[:n].view(bool)


def rademacher_bits(w: np.ndarray, n: int) -> np.ndarray:
    """Unpack uint32 words LSB-first into n float32 values: bit 0 -> +1, bit 1 -> -1."""
    return np.where(rademacher_negative(w, n), np.float32(-1.0), np.float32(1.0))


def negative_signs(seed: int, round_: int, client: int, k: int, d: int) -> np.ndarray:
    """Rademacher eps_k as a boolean mask (True where eps = -1): the draw of ``noise(...,
    kind='rademacher')`` in a quarter of the memory, for clients that select instead of add."""
    if d < 0:
        raise ValueError(f"d must be >= 0, got {d}")
    return rademacher_negative(words(seed, round_, client, k, -(-d // 32)), d)


def noise(
    seed: int, round_: int, client: int, k: int, d: int, kind: NoiseKind | str = NoiseKind.GAUSSIAN
) -> np.ndarray:
    """eps_k: a float32 vector of length ``d`` for perturbation ``k`` (0-based)."""
    kind = NoiseKind(kind)
    if d < 0:
        raise ValueError(f"d must be >= 0, got {d}")
    if kind is NoiseKind.BLOCK:
        raise ValueError("block noise is drawn on the model's block partition: use BlockTable.draw")
    if kind is NoiseKind.GAUSSIAN:
        if d <= GAUSSIAN_CHUNK:
            return box_muller(words(seed, round_, client, k, d + (d & 1)))[:d]
        # chunk by chunk: the same values, with ~2 MB of float64/uint64 temporaries instead of ~36 bytes
        # per parameter (a client's peak memory: docs/benchmarks.md)
        z = np.empty(d, dtype=np.float32)
        for start in range(0, d, GAUSSIAN_CHUNK):
            n = min(GAUSSIAN_CHUNK, d - start)
            z[start:start + n] = box_muller(words(seed, round_, client, k, n + (n & 1), start // 4))[:n]
        return z
    return rademacher_bits(words(seed, round_, client, k, -(-d // 32)), d)


def noise_rows(seed: int, round_: int, client: int, ks, d: int, kind: NoiseKind | str = NoiseKind.GAUSSIAN,
               *, signs: bool = False) -> np.ndarray:
    """eps_k for several k at once, one row each: ``noise(seed, round_, client, k, d, kind)`` for every
    k of ``ks`` (``signs``: ``negative_signs`` instead, a bool mask), bit-identical to the one-k
    functions. The Philox counters of all rows go through one vectorised pass (``_philox_blocks`` with
    an array k word), which removes the per-k Python overhead of small models."""
    kind = NoiseKind(kind)
    ks = np.asarray(ks, dtype=np.int64).reshape(-1)
    if d < 0:
        raise ValueError(f"d must be >= 0, got {d}")
    if kind is NoiseKind.BLOCK:
        raise ValueError("block noise is drawn on the model's block partition: use BlockTable.draw")
    if signs and kind is not NoiseKind.RADEMACHER:
        raise ValueError(f"sign masks need Rademacher noise, got {kind.value!r}")
    seed = _check_word("seed", seed, 64)
    client, round_ = _check_word("client", client), _check_word("round", round_)
    if ks.size and (ks.min() < 0 or ks.max() >= 2**32):
        raise ValueError(f"k must be in [0, 2**32), got {ks.min()}..{ks.max()}")
    gauss = kind is NoiseKind.GAUSSIAN
    if gauss and d > GAUSSIAN_CHUNK:  # large vectors: per-k Python overhead is negligible, keep noise()'s chunks
        return np.stack([noise(seed, round_, client, int(k), d, kind) for k in ks]) if ks.size else np.empty((0, d), np.float32)
    n_words = d + (d & 1) if gauss else -(-d // 32)
    nb = -(-n_words // 4)
    ctr = np.tile(np.arange(nb, dtype=np.uint64), ks.size)
    w = _philox_blocks(ctr, np.repeat(ks.astype(np.uint64), nb), client, round_, seed & 0xFFFFFFFF, seed >> 32)
    w = w.reshape(ks.size, nb * 4)[:, :n_words]
    if gauss:  # n_words is even: Box-Muller pairs never straddle two rows
        return box_muller(np.ascontiguousarray(w).reshape(-1)).reshape(ks.size, n_words)[:, :d]
    bits = np.unpackbits(np.ascontiguousarray(w).astype("<u4").view(np.uint8).reshape(ks.size, -1), axis=1,
                         bitorder="little")[:, :d].view(bool)
    return bits if signs else np.where(bits, np.float32(-1.0), np.float32(1.0))


class BlockTable:
    """The partition of the flat parameter vector into perturbation blocks (docs/noise.md section 8).

    A *module* is a parameter name up to its last dot (``features.4`` for ``features.4.weight`` and
    ``features.4.bias``); all of a module's tensors share their first (output) dimension C. Block
    (module, c) is row c of each of the module's tensors, concatenated in parameter order: a conv
    filter and its bias, a row of a linear layer and its bias. Blocks are ordered by module (parameter
    order), then by c. ``index[bounds[b]:bounds[b+1]]`` are block b's flat parameter indices, so
    ``bounds`` are also the cumulative block sizes that ``draw`` samples from."""

    def __init__(self, params: list[tuple[str, tuple[int, ...], int]]):
        modules: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
        for name, shape, offset in params:
            modules.setdefault(name.rsplit(".", 1)[0], []).append((name, tuple(shape), int(offset)))
        index, bounds, module_of, row_of, names = [], [0], [], [], []
        for m, (mod, tensors) in enumerate(modules.items()):
            rows = {shape[0] if shape else 1 for _, shape, _ in tensors}
            if len(rows) != 1:
                raise ValueError(f"block noise: the tensors of module {mod!r} disagree on their output dimension "
                                 f"{sorted(rows)}")
            names.append(mod)
            for c in range(rows.pop()):
                idx = [off + c * int(np.prod(shape[1:], dtype=np.int64)) + np.arange(int(np.prod(shape[1:], dtype=np.int64)))
                       if shape else np.array([off]) for _, shape, off in tensors]
                index.append(np.concatenate(idx))
                bounds.append(bounds[-1] + index[-1].size)
                module_of.append(m)
                row_of.append(c)
        self.modules = tuple(names)
        self.index = np.concatenate(index).astype(np.int64)
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.module = np.asarray(module_of, dtype=np.int64)  # block -> module number
        self.row = np.asarray(row_of, dtype=np.int64)  # block -> output row c in its module
        self.sizes = np.diff(self.bounds)
        self.dim = int(self.bounds[-1])
        if np.unique(self.index).size != self.dim:
            raise ValueError("block noise: parameter tensors overlap")
        # int8-step blocks move m_b = round(sqrt(d / d_b)) whole steps (so |delta| matches isotropic
        # int8 noise); the decoder weighs each by (1 / p_b) / m_b^2 (docs/noise.md section 10)
        self.steps = np.maximum(1, np.floor(np.sqrt(self.dim / self.sizes) + 0.5)).astype(np.int64)
        self._set_draw(self.sizes)  # section 8: blocks drawn in proportion to their size

    def _set_draw(self, weight: np.ndarray) -> None:
        """Draw block b with probability p_b = weight[b] / sum(weight) (integers >= 1)."""
        self.draw_bounds = np.concatenate([[0], np.cumsum(weight)]).astype(np.int64)
        self.draw_total = int(self.draw_bounds[-1])
        self.probability = weight / float(self.draw_total)  # p_b (float64)
        self.inv_p = self.draw_total / weight.astype(np.float64)
        self.scale = np.sqrt(self.inv_p).astype(np.float32)  # float32(sqrt(1 / p_b)), in double first: sqrt(d / d_b)
        self.step_weight = self.inv_p / self.steps.astype(np.float64) ** 2

    def weighted(self, module_weights) -> "BlockTable":
        """This partition with blocks drawn in proportion to their module's weight (docs/noise.md
        section 11: RoundTask.block_weights); ``None``: self (in proportion to size)."""
        if module_weights is None:
            return self
        w = np.asarray(module_weights, dtype=np.int64)
        if w.shape != (len(self.modules),) or (w < 1).any():
            raise ValueError(f"block_weights: expected {len(self.modules)} positive integers (modules "
                             f"{list(self.modules)}), got {list(module_weights)}")
        out = copy.copy(self)
        out._set_draw(w[self.module])
        return out

    def capped(self, max_steps: int | None) -> "BlockTable":
        """This partition with every int8-step block moving at most ``max_steps`` whole steps:
        m_b = min(round(sqrt(d / d_b)), max_steps), the decoder weight (1 / p_b) / m_b^2 following
        (docs/noise.md section 10: RoundTask.max_block_steps); ``None``: self."""
        if max_steps is None:
            return self
        out = copy.copy(self)
        out.steps = np.minimum(self.steps, int(max_steps))
        out.step_weight = out.inv_p / out.steps.astype(np.float64) ** 2
        return out

    def for_task(self, task) -> "BlockTable":
        """The partition a task's rows are drawn from: its ``block_weights`` and ``max_block_steps``."""
        return self.weighted(task.block_weights).capped(task.max_block_steps)

    @classmethod
    def from_layout(cls, layout) -> "BlockTable":
        """From a ``params.ParamLayout`` (or baffle.json's parameter list: name, shape, offset)."""
        specs = layout.specs if hasattr(layout, "specs") else layout
        return cls([(s["name"], s["shape"], s["offset"]) if isinstance(s, dict) else (s.name, s.shape, s.offset)
                    for s in specs])

    def to_json(self) -> list[dict]:
        """One entry per module, in block order: what a device needs besides the parameter table."""
        return [{"module": m, "blocks": int((self.module == i).sum()),
                 "block_size": int(self.sizes[self.module == i][0])} for i, m in enumerate(self.modules)]

    DRAW_WORDS = 1 << 16  # Philox words per vectorised pass (Box-Muller or bit unpacking): cache-sized

    def draw(self, seed: int, round_: int, client: int, ks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The blocks and scaled Gaussian values of perturbations ``ks`` (counter words k'): block
        index per k and a float32 array of d_b values per k (vectorised over k)."""
        return self.split(*self.draw_flat(seed, round_, client, ks))

    def draw_steps(self, seed: int, round_: int, client: int, ks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """int8-step block noise (docs/noise.md section 10): the same blocks as ``draw``, each value
        ``m_b * u`` with u = +-1 (Rademacher bits from Philox block 1 on) and ``m_b = self.steps[b]``
        whole quantization steps; int64 arrays of d_b values per k."""
        return self.split(*self.draw_flat(seed, round_, client, ks, steps=True))

    def draw_flat(self, seed: int, round_: int, client: int, ks, *, steps: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``draw`` (or with ``steps`` ``draw_steps``) with the values of all k concatenated, k after k
        (block b's d_b = ``sizes[b]`` values each): what the clients' rows and the server's decode
        consume without one array per perturbation."""
        if steps:
            def values(blocks, n, w, starts):  # the first d_b bits of each k's words
                bits = np.unpackbits(w.astype("<u4").view(np.uint8), bitorder="little").view(bool)
                return np.where(self._pieces(bits, 32 * starts, n), -1, 1) * np.repeat(self.steps[blocks], n)
            return self._draw(seed, round_, client, ks, lambda n: -(-n // 32), values)

        def values(blocks, n, w, starts):  # Box-Muller pairs: each k's words start on a Philox block (even)
            return self._pieces(box_muller(w), starts, n) * np.repeat(self.scale[blocks], n)
        return self._draw(seed, round_, client, ks, lambda n: n + (n & 1), values)

    @staticmethod
    def _pieces(a: np.ndarray, starts: np.ndarray, n: np.ndarray) -> np.ndarray:
        """``a[starts[k]:starts[k] + n[k]]``, k after k, concatenated (slices: faster than a gather)."""
        if len(n) == 0:
            return a[:0]
        return np.concatenate([a[s:s + m] for s, m in zip(starts.tolist(), n.tolist())])

    def split(self, blocks: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """``draw_flat``'s values as one view per perturbation."""
        ends = np.cumsum(self.sizes[blocks]).tolist()
        return blocks, [flat[a:b] for a, b in zip([0, *ends], ends)]

    def indices(self, blocks: np.ndarray) -> np.ndarray:
        """The flat parameter indices of ``blocks``, concatenated in order (``draw_flat``'s layout)."""
        return self._pieces(self.index, self.bounds[blocks], self.sizes[blocks])

    def drawn_blocks(self, seed: int, round_: int, client: int, ks) -> np.ndarray:
        """The block of each perturbation ``ks`` (``draw``'s first output) without its values."""
        return self._blocks(seed, round_, client, self._counters(seed, round_, client, ks))

    @staticmethod
    def _counters(seed, round_, client, ks) -> np.ndarray:
        ks = np.asarray(ks, dtype=np.int64).reshape(-1)
        for name, v in (("seed", seed), ("round", round_), ("client", client)):
            _check_word(name, v, 64 if name == "seed" else 32)
        if ks.size and (ks.min() < 0 or ks.max() >= 2**32):
            raise ValueError("k must be in [0, 2**32)")
        return ks

    def _blocks(self, seed, round_, client, ks: np.ndarray) -> np.ndarray:
        """Each k's block from words 0-1 of its stream (Philox block 0)."""
        head = _philox_blocks(np.zeros(ks.size, np.uint64), ks.astype(np.uint64), client, round_,
                              seed & 0xFFFFFFFF, seed >> 32)
        r = ((head[:, 1].astype(np.uint64) << np.uint64(32)) | head[:, 0].astype(np.uint64)) % np.uint64(self.draw_total)
        return np.searchsorted(self.draw_bounds, r.astype(np.int64), side="right") - 1

    def _draw(self, seed, round_, client, ks, n_words, values) -> tuple[np.ndarray, np.ndarray]:
        """Pick each k's block from words 0-1 of its stream, then hand ``values`` the Philox blocks 1 ..
        ceil(n_words(d_b) / 4) of each k, concatenated over k (a k's last block may hold words it does
        not use), with the word at which each k's words start."""
        ks = self._counters(seed, round_, client, ks)
        k0, k1 = seed & 0xFFFFFFFF, seed >> 32
        blocks = self._blocks(seed, round_, client, ks)
        nb = -(-n_words(self.sizes[blocks]) // 4)  # Philox blocks of values per k
        # passes of about DRAW_WORDS words keep the temporaries in cache (~3x faster than one pass)
        cuts = [0, *(np.flatnonzero(np.diff(np.cumsum(nb) // (self.DRAW_WORDS // 4))) + 1).tolist(), ks.size]
        out = [self._values(client, round_, k0, k1, ks[a:b], blocks[a:b], nb[a:b], values)
               for a, b in zip(cuts[:-1], cuts[1:])]
        return blocks, (np.concatenate(out) if len(out) > 1 else out[0])

    def _values(self, client, round_, k0, k1, ks, blocks, nb, values) -> np.ndarray:
        """One pass of ``_draw``: the values of perturbations ``ks`` (their blocks ``blocks``, ``nb`` Philox blocks each)."""
        first = np.cumsum(nb) - nb
        ctr = np.arange(nb.sum()) - np.repeat(first, nb) + 1  # Philox block 1, 2, ... per k
        w = _philox_blocks(ctr.astype(np.uint64), np.repeat(ks, nb).astype(np.uint64), client, round_, k0, k1)
        return values(blocks, self.sizes[blocks], w.reshape(-1), 4 * first)

    def dense(self, block: int, values: np.ndarray) -> np.ndarray:
        """eps_k as a flat float32 vector (zero outside the block)."""
        eps = np.zeros(self.dim, dtype=np.float32)
        eps[self.index[self.bounds[block]:self.bounds[block + 1]]] = values
        return eps

    def accumulate(self, blocks: np.ndarray, values: list[np.ndarray], coef: np.ndarray) -> np.ndarray:
        """sum_k coef[k] * eps_k as a float64 vector, sparse: only the drawn blocks are touched."""
        if len(blocks) == 0:
            return np.zeros(self.dim)
        idx = np.concatenate([self.index[self.bounds[b]:self.bounds[b + 1]] for b in blocks])
        w = np.concatenate([v.astype(np.float64) * c for v, c in zip(values, coef)])
        return np.bincount(idx, weights=w, minlength=self.dim)

    def accumulate_flat(self, blocks: np.ndarray, flat: np.ndarray, coef: np.ndarray, *,
                        idx: np.ndarray | None = None) -> np.ndarray:
        """``accumulate`` of ``draw_flat``'s layout (the same sums, in the same order, so the same bits);
        ``idx``: ``indices(blocks)`` when the caller has them."""
        w = flat.astype(np.float64) * np.repeat(np.asarray(coef, dtype=np.float64), self.sizes[blocks])
        return np.bincount(self.indices(blocks) if idx is None else idx, weights=w, minlength=self.dim)
