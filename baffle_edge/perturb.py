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
"""
from __future__ import annotations

import enum

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
    # round 1: only the block word varies, the other three are scalars
    p0 = PHILOX_M0 * np.arange(first_block, first_block + nb, dtype=np.uint64)
    p1 = int(PHILOX_M1) * c2
    x0 = np.full(nb, np.uint64(((p1 >> 32) ^ c1 ^ k0) & 0xFFFFFFFF))
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
    return out.reshape(-1)[:n_words]


def box_muller(w: np.ndarray) -> np.ndarray:
    """Map an even number of uint32 words to float32 standard normals (see module doc)."""
    s = w >> np.uint32(8)
    u1 = (s[0::2] + 1.0) * 2.0**-24  # (0, 1]: log never sees 0
    theta = s[1::2] * (2.0 * np.pi * 2.0**-24)  # == 2*pi*u2 exactly (power-of-two scaling)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.empty(w.shape[0], dtype=np.float32)
    z[0::2] = r * np.cos(theta)
    z[1::2] = r * np.sin(theta)
    return z


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
