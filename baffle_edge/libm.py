"""The loss's exp, log and sums, specified to the bit (docs/noise.md section 7).

numpy's ``exp``/``log`` are whatever libm the machine has (Intel SVML on AVX-512 CPUs, glibc
elsewhere): two Python clients on different CPUs may differ in the last bit of a loss, and so do
numpy and a device. The loss therefore uses these instead:

- ``exp`` and ``log``: fdlibm 5.3's ``__ieee754_exp`` / ``__ieee754_log`` (Sun Microsystems; what
  Java's ``StrictMath`` is specified to return), vectorized operation by operation. Only IEEE
  double ``+ - * /`` (numpy ufuncs, one rounding each, never fused) and bit moves on the int64 view,
  so the result is the same on every machine and equals ``clients/js/src/libm.ts``;
- ``pairwise_sum``: numpy's pairwise summation order (blocks of <= 128 values summed with 8
  accumulators), written out explicitly along the last axis, so it does not depend on how a numpy
  version happens to iterate a reduction.
"""
from __future__ import annotations

import numpy as np

LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
INVLN2, HUGE, TWOM1000 = 1.44269504088896338700e+00, 1.0e+300, 9.33263618503218878990e-302
O_THRESHOLD, U_THRESHOLD = 7.09782712893383973096e+02, -7.45133219101941108420e+02
P1, P2, P3 = 1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05
P4, P5 = -1.65339022054652515390e-06, 4.13813679705723846039e-08
TWO54 = 1.80143985094819840000e+16
LG1, LG2, LG3 = 6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01
LG4, LG5, LG6 = 2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01
LG7 = 1.479819860511658591e-01

_LOW = np.int64(0xFFFFFFFF)


def _flat(x) -> tuple[np.ndarray, tuple]:
    a = np.asarray(x, dtype=np.float64)
    return np.ascontiguousarray(a).reshape(-1), a.shape


def _hi(x: np.ndarray) -> np.ndarray:
    """The signed high 32-bit word of each double, as int64."""
    return x.view(np.int64) >> 32


def _with_hi(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """x with its high word replaced by h (int64 holding an int32 value)."""
    return ((x.view(np.int64) & _LOW) | (h << 32)).view(np.float64)


def exp(x) -> np.ndarray:
    """fdlibm 5.3 ``__ieee754_exp``, elementwise (float64).

    Vectorized, fdlibm's branches become masks: x = k ln2 + r with k = 0 for |x| <= 0.5 ln2 and
    k = trunc(x / ln2 +- 0.5) above (fdlibm's separate k = +-1 branch for |x| < 1.5 ln2 computes the
    same k, hi and lo); for k = 0 fdlibm's ``1 - ((x c)/(c - 2) - x)`` equals the k != 0 formula
    ``1 - ((lo - (x c)/(2 - c)) - hi)`` with hi = x, lo = 0 bit for bit (IEEE negation is exact),
    so one formula serves both; |x| < 2^-28 returns 1 + x."""
    x0, shape = _flat(x)
    with np.errstate(all="ignore"):
        hx = _hi(x0)
        hx &= 0x7FFFFFFF
        big = hx >= 0x40862E42  # |x| >= 709.78..., inf, NaN: handled after the main path
        if big.any():
            naninf = hx >= 0x7FF00000
            over, under = big & ~naninf & (x0 > O_THRESHOLD), big & ~naninf & (x0 < U_THRESHOLD)
            x = np.where(naninf | over | under, 0.0, x0)
        else:
            x = x0
        half = hx > 0x3FD62E42  # |x| > 0.5 ln2: reduce x = k ln2 + r
        k = INVLN2 * x
        k += np.copysign(0.5, x)
        np.trunc(k, out=k)
        k = np.where(half, k, 0.0)
        hi = k * LN2_HI
        np.subtract(x, hi, out=hi)  # hi = x - k ln2_hi, exact here
        lo = k * LN2_LO
        r = hi - lo
        t = r * r
        c = t * P5
        for p in (P4, P3, P2, P1):
            c += p
            c *= t
        np.subtract(r, c, out=c)  # c = r - t (P1 + t (P2 + t (P3 + t (P4 + t P5))))
        y = r * c
        np.divide(y, np.subtract(2.0, c, out=c), out=y)
        np.subtract(lo, y, out=y)
        y -= hi
        np.subtract(1.0, y, out=y)  # y = 1 - ((lo - (r c)/(2 - c)) - hi)
        ki = k.astype(np.int64)
        if ki.min(initial=0) < -1021:  # y * 2^k: add k to the exponent field, or k + 1000 and scale by 2^-1000
            sub = ki < -1021
            ki[sub] += 1000
            out = (y.view(np.int64) + (ki << 52)).view(np.float64)
            out[sub] *= TWOM1000
        else:
            out = (y.view(np.int64) + (ki << 52)).view(np.float64)
        tiny = hx < 0x3E300000  # |x| < 2^-28
        out[tiny] = 1.0 + x[tiny]
        if big.any():
            out[over] = HUGE * HUGE
            out[under] = TWOM1000 * TWOM1000
            out[naninf] = np.where(np.isnan(x0[naninf]), x0[naninf] + x0[naninf],
                                   np.where(x0[naninf] < 0, 0.0, x0[naninf]))  # exp(+-inf) = {inf, 0}
    return out.reshape(shape)


def log(x) -> np.ndarray:
    """fdlibm 5.3 ``__ieee754_log``, elementwise (float64).

    Vectorized, fdlibm's branches become masks; its k = 0 formulas (``f - (hfsq - s (hfsq + R))``,
    ``f - s (f - R)``) equal the k != 0 ones with dk = 0 bit for bit away from |f| < 2^-20 (IEEE
    a - b = -(b - a) exactly), so one formula of each kind serves both."""
    x0, shape = _flat(x)
    with np.errstate(all="ignore"):
        hx = _hi(x0)
        special = (hx < 0x00100000) | (hx >= 0x7FF00000)  # <= 0, subnormal, negative, inf, NaN
        if special.any():
            lx = x0.view(np.int64) & _LOW
            zero = ((hx & 0x7FFFFFFF) | lx) == 0  # log(+-0) = -inf
            negative = (hx < 0) & ~zero  # log(x < 0) = NaN, also -inf and NaNs with the sign bit
            sub = (hx < 0x00100000) & ~zero & ~negative  # subnormal: scale by 2^54
            naninf = hx >= 0x7FF00000  # log(inf) = inf, log(NaN) = NaN: x + x
            x = np.where(sub, x0 * TWO54, x0)
            hx = np.where(sub, _hi(x), hx)
            odd = zero | negative | naninf
            x[odd] = 1.0
            hx[odd] = 0x3FF00000
            k = np.where(sub, -54 - 1023, -1023) + (hx >> 20)
        else:
            x, k = x0, (hx >> 20) - 1023
        hx &= 0x000FFFFF
        i = (hx + 0x95F64) & 0x100000
        x = _with_hi(x, hx | (i ^ 0x3FF00000))  # normalize x or x/2
        k += i >> 20
        f = x - 1.0
        dk = k.astype(np.float64)
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        t1 = w * (LG2 + w * (LG4 + w * LG6))
        r = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
        r += t1  # R = t2 + t1
        hfsq = 0.5 * f * f
        hi, lo = dk * LN2_HI, dk * LN2_LO
        wide = hi - ((hfsq - (s * (hfsq + r) + lo)) - f)
        narrow = hi - ((s * (f - r) - lo) - f)
        out = np.where(((hx - 0x6147A) | (0x6B851 - hx)) > 0, wide, narrow)
        near = (0x000FFFFF & (2 + hx)) < 3  # |f| < 2^-20
        if near.any():
            fn, dn, k0 = f[near], dk[near], k[near] == 0
            rn = fn * fn * (0.5 - 0.33333333333333333 * fn)
            at_one = np.where(k0, 0.0, dn * LN2_HI + dn * LN2_LO)
            out[near] = np.where(fn == 0, at_one, np.where(k0, fn - rn, dn * LN2_HI - ((rn - dn * LN2_LO) - fn)))
        if special.any():
            out[zero] = -np.inf
            out[negative] = np.nan
            out[naninf] = x0[naninf] + x0[naninf]
    return out.reshape(shape)


def pairwise_sum(a, axis: int = -1) -> np.ndarray:
    """Sums along ``axis`` in numpy's pairwise order (``np.add.reduce`` of a contiguous float64
    array): n < 8: one left-to-right sum starting from -0.0; n <= 128: 8 accumulators
    ``r[j] = a[j] + a[j+8] + a[j+16] + ...`` over the first n - n % 8 values, combined as
    ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``, then the remaining n % 8 values added
    in order; n > 128: split at n2 = n // 2 rounded down to a multiple of 8, sum both halves."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return _pairwise(a, 0, a.shape[-1])


def _pairwise(a: np.ndarray, start: int, n: int) -> np.ndarray:
    if n < 8:
        res = np.full(a.shape[:-1], -0.0)
        for i in range(start, start + n):
            res = res + a[..., i]
        return res
    if n <= 128:
        r = a[..., start:start + 8].copy()
        end = start + n - n % 8
        for i in range(start + 8, end, 8):
            r += a[..., i:i + 8]
        r = r[..., 0::2] + r[..., 1::2]  # (r0 + r1), (r2 + r3), (r4 + r5), (r6 + r7)
        r = r[..., 0::2] + r[..., 1::2]
        res = r[..., 0] + r[..., 1]
        for i in range(end, start + n):
            res = res + a[..., i]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise(a, start, n2) + _pairwise(a, start + n2, n - n2)
