/**
 * The client-side parts of baffle_edge/estimator.py that FedAvg local steps need, in float64 with
 * numpy's summation order (pairwise, 8 accumulators), so a JS client's local weights equal the
 * ones the server replays from its losses.
 */

/** numpy's pairwise sum of a[start .. start+n) (np.add.reduce on a contiguous float64 array). */
export function pairwiseSum(a: ArrayLike<number>, start = 0, n = a.length - start): number {
  if (n < 8) {
    let res = -0; // numpy starts from -0.0 so that a sum of -0.0 stays -0.0
    for (let i = 0; i < n; i++) res += a[start + i];
    return res;
  }
  if (n <= 128) {
    const r = [a[start], a[start + 1], a[start + 2], a[start + 3], a[start + 4], a[start + 5], a[start + 6], a[start + 7]];
    let i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (let j = 0; j < 8; j++) r[j] += a[start + i + j];
    }
    let res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[start + i];
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2);
}

export function mean(a: ArrayLike<number>): number {
  return pairwiseSum(a) / a.length;
}

/** dL_k of one step: L(w + d_k) - L(w) (forward) or (L(w + d_k) - L(w - d_k)) / 2 (central). */
export function lossDifferences(losses: ArrayLike<number>, base: number | null, central: boolean): Float64Array {
  if (!central) {
    if (base === null) throw new Error("forward scheme needs the base loss L(w)");
    return Float64Array.from(losses, (l) => l - base);
  }
  const k = losses.length / 2;
  if (!Number.isInteger(k)) throw new Error(`central scheme needs 2K losses, got ${losses.length}`);
  const out = new Float64Array(k);
  for (let i = 0; i < k; i++) out[i] = (losses[i] - losses[k + i]) / 2;
  return out;
}

/** d_k - mean_{j != k} d_j = K/(K-1) (d_k - mean d) (estimator.leave_one_out). */
export function leaveOneOut(diffs: Float64Array): Float64Array {
  if (diffs.length < 2) throw new Error("leave-one-out baseline needs at least 2 loss differences");
  const m = mean(diffs), f = diffs.length / (diffs.length - 1);
  return diffs.map((d) => (d - m) * f);
}

/** Scale g so that max |g_i| <= maxNorm (estimator.clip_inf); null = no clipping. In place. */
export function clipInf(g: Float64Array, maxNorm: number | null): Float64Array {
  if (maxNorm === null) return g;
  let norm = 0;
  for (let i = 0; i < g.length; i++) {
    const a = Math.abs(g[i]);
    if (a > norm || Number.isNaN(a)) norm = a;
  }
  const coef = maxNorm / (norm + 1e-6);
  if (coef < 1) for (let i = 0; i < g.length; i++) g[i] *= coef;
  return g;
}
