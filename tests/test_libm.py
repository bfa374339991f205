"""The loss's exp/log/sums (baffle_edge/libm.py) and the specified cross-entropy (docs/noise.md section 7).

fdlibm's exp/log are checked three ways: against a digest the TypeScript port (clients/js/src/libm.ts)
also asserts, bit for bit against that port itself on ~600,000 arguments (edge cases, thresholds,
every branch boundary) when node and the built client are present, and within 1 ulp of Python's
math.exp/log. pairwise_sum must equal numpy's own reduction.
"""
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from baffle_edge import libm
from baffle_edge.client import cross_entropies, cross_entropy

JS = Path(__file__).resolve().parents[1] / "clients" / "js"
NODE_SCRIPT = """
import { readFileSync, writeFileSync } from "node:fs";
const { exp, log } = await import(process.argv[2]);
const b = readFileSync(process.argv[3]);
const x = new Float64Array(b.buffer, b.byteOffset, b.length / 8);
const out = new Float64Array(2 * x.length);
for (let i = 0; i < x.length; i++) { out[i] = exp(x[i]); out[x.length + i] = log(x[i]); }
writeFileSync(process.argv[4], Buffer.from(out.buffer));
"""


def arguments(seed: int = 0) -> np.ndarray:
    """Random arguments over every scale plus the edge cases fdlibm branches on."""
    rng = np.random.default_rng(seed)
    bits = lambda n, sign=0: (rng.integers(0, 2**63, n, dtype=np.int64) | np.int64(sign)).view(np.float64)  # noqa: E731
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 5e-324, -5e-324, 2.2250738585072014e-308,
               2.225073858507201e-308, libm.O_THRESHOLD, np.nextafter(libm.O_THRESHOLD, np.inf), libm.U_THRESHOLD,
               np.nextafter(libm.U_THRESHOLD, -np.inf), -708.3964185322641, 1.0, 2.0, 0.5]
    edges = []  # high words around every branch boundary of exp and log, both signs, several low words
    for h in (0x40862E42, 0x7FF00000, 0x3FD62E42, 0x3FF0A2B2, 0x3E300000, 0x00100000, 0x3FF00000, 0x3FE6A09E):
        for d in range(-3, 4):
            for sign in (0, 1 << 31):
                edges += [(((h + d) | sign) << 32) | lo for lo in (0, 1, 0x7FFFFFFF, 0xFFFFFFFF)]
    for mant in (0x6147A, 0x6B851, 0x95F63, 0x95F64, 0x95F65, 0, 1, 2, 3, 0xFFFFD, 0xFFFFE, 0xFFFFF):
        for e in (0x001, 0x3C0, 0x3FE, 0x3FF, 0x400, 0x7FE):
            edges += [(((e << 20) | mant) << 32) | lo for lo in (0, 1, 12345, 0xFFFFFFFF)]
    x = np.concatenate([rng.standard_normal(100_000) * 10, rng.uniform(-750, 750, 100_000),
                        rng.uniform(-1.1, 1.1, 100_000), rng.uniform(-3e-8, 3e-8, 20_000),
                        np.exp(rng.uniform(-745, 709, 100_000)), bits(100_000), bits(50_000, -2**63),
                        np.array(special), np.array(edges, dtype=np.uint64).view(np.float64)])
    with np.errstate(all="ignore"):
        return np.concatenate([x, np.nextafter(x[-3000:], np.inf), np.nextafter(x[-3000:], -np.inf)])


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.int64) == b.view(np.int64)) | (np.isnan(a) & np.isnan(b))


def test_the_digest_the_typescript_port_asserts():
    # clients/js/test/units.test.ts hashes these 20,000 results of libm.ts: exp(i/100 - 80), log((i+1) * 0.0137)
    i = np.arange(10_000, dtype=np.float64)
    out = np.concatenate([libm.exp(i / 100 - 80), libm.log((i + 1) * 0.0137)])
    assert hashlib.sha256(out.astype("<f8").tobytes()).hexdigest() == \
        "a67ca3ef0863e1941c1bf7fe5cf4b68e630f476fe7cddc4de1df30617797cf15"


def test_special_values():
    inf, nan = np.inf, np.nan
    x = np.array([0.0, -0.0, inf, -inf, 710.0, -746.0, 709.782712893384, -745.1332191019411, 1e-300, -1e-300])
    assert libm.exp(x).tolist() == [1.0, 1.0, inf, 0.0, inf, 0.0, 1.7976931348622732e308, 5e-324, 1.0, 1.0]
    y = libm.log(np.array([1.0, 0.0, -0.0, -1.0, inf, -inf, 5e-324, 2.0, nan]))
    assert y[:3].tolist() == [0.0, -inf, -inf] and np.isnan(y[3]) and y[4] == inf and np.isnan(y[5])
    assert y[6] == -744.4400719213812 and y[7] == 0.6931471805599453 and np.isnan(y[8])
    assert np.isnan(libm.exp(np.array([nan]))[0])
    assert math.copysign(1, libm.log(np.array([1.0]))[0]) == 1  # +0.0
    assert libm.exp(np.zeros((2, 3))).shape == (2, 3) and libm.log(2.0).shape == ()


def test_within_one_ulp_of_python_math():
    x = arguments(1)
    x = x[np.isfinite(x)][::7]
    e, l = libm.exp(x), libm.log(x)
    want_e = np.array([math.exp(v) if v < 709.78 else math.inf for v in x])
    ok = np.isfinite(want_e) & (want_e > 2.2250738585072014e-308)  # normal results: count ulps in the bits
    assert np.abs(e[ok].view(np.int64) - want_e[ok].view(np.int64)).max() <= 1
    pos = x > 0
    want_l = np.array([math.log(v) for v in x[pos]])
    diff = np.abs(l[pos].view(np.int64) - want_l.view(np.int64))
    assert diff[np.sign(l[pos]) == np.sign(want_l)].max() <= 1 and np.all(np.isnan(l[x < 0]))
    assert 0.01 < np.mean(e[ok] != want_e[ok]) < 0.2  # not math's exp: fdlibm's, about 1 in 10 differs


def _node_ready() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (JS / "node_modules" / ".bin" / "tsc").exists():
        return "clients/js/node_modules is missing (cd clients/js && npm ci --ignore-scripts)"
    return None


def test_bit_identical_to_the_typescript_port(tmp_path):
    why = _node_ready()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the TypeScript libm: {why}")
        pytest.skip(why)
    libm_js = JS / "dist" / "src" / "libm.js"
    if not libm_js.exists() or libm_js.stat().st_mtime < (JS / "src" / "libm.ts").stat().st_mtime:
        build = subprocess.run([str(JS / "node_modules" / ".bin" / "tsc"), "-p", str(JS / "tsconfig.json")],
                               capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stdout + build.stderr
    x = arguments(0)
    x.astype("<f8").tofile(tmp_path / "x.f64")
    (tmp_path / "run.mjs").write_text(NODE_SCRIPT)
    run = subprocess.run(["node", str(tmp_path / "run.mjs"), libm_js.as_uri(), str(tmp_path / "x.f64"),
                          str(tmp_path / "y.f64")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    js = np.fromfile(tmp_path / "y.f64", "<f8")
    for name, got, want in (("exp", libm.exp(x), js[:x.size]), ("log", libm.log(x), js[x.size:])):
        bad = np.flatnonzero(~same_bits(got, want))
        assert bad.size == 0, f"{name}: {bad.size} of {x.size} differ, first at x = {x[bad[0]]!r}: " \
                              f"{got[bad[0]]!r} vs JS {want[bad[0]]!r}"


@pytest.mark.parametrize("n", [*range(1, 40), 63, 64, 65, 100, 127, 128, 129, 135, 136, 255, 256, 257, 300, 1000, 26_730])
def test_pairwise_sum_is_numpys_order(n):
    rng = np.random.default_rng(n)
    v = rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 12)
    assert libm.pairwise_sum(v).view(np.int64) == np.add.reduce(v).view(np.int64)
    rows = np.stack([v, v[::-1], -v])
    assert np.array_equal(libm.pairwise_sum(rows), [np.add.reduce(r) for r in rows])
    assert np.array_equal(libm.pairwise_sum(rows.T, axis=0), libm.pairwise_sum(rows))


def test_cross_entropy_is_the_specified_computation():
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((50, 32, 10)) * 4).astype(np.float32)
    y = rng.integers(0, 10, 32)
    got = cross_entropies(z, y)
    zz = z.astype(np.float64)  # the spec, written out row by row
    for i in range(0, 50, 7):
        logp = []
        for b in range(32):
            m = zz[i, b].max()
            s = libm.pairwise_sum(libm.exp(zz[i, b] - m))
            logp.append((zz[i, b, y[b]] - m) - libm.log(s))
        assert got[i] == -(libm.pairwise_sum(np.array(logp)) / 32) == cross_entropy(z[i], y)
    # the mean softmax cross-entropy: numpy's own libm agrees to an ulp or two
    ref = -(np.take_along_axis(zz - zz.max(2, keepdims=True), y[None, :, None].repeat(50, 0), 2)[..., 0]
            - np.log(np.exp(zz - zz.max(2, keepdims=True)).sum(2))).mean(1)
    assert np.allclose(got, ref, rtol=1e-15, atol=0)


def test_cross_entropy_edge_cases_and_errors():
    # all the other classes' exp underflows: log(1) = 0, logp = +0.0 and the loss -(0 / 1) = -0.0
    zero = cross_entropy(np.array([[800.0, 0.0, -5.0]], np.float32), np.array([0]))
    assert zero == 0.0 and math.copysign(1, zero) == -1
    assert cross_entropy(np.array([[1.0, 1.0]], np.float32), np.array([1])) == 0.6931471805599453
    with pytest.raises(ValueError, match="labels outside"):
        cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels outside"):
        cross_entropy(np.zeros((2, 3), np.float32), np.array([-1, 0]))
    with pytest.raises(ValueError, match="expected logits n x B x C and B labels"):
        cross_entropies(np.zeros((2, 3), np.float32), np.array([0, 1]))
    assert np.isnan(cross_entropy(np.array([[np.nan, 0.0]], np.float32), np.array([0])))
