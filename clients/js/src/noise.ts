/**
 * Seeded, portable perturbation noise (docs/noise.md, noise spec version 1): Philox4x32-10,
 * Box–Muller in float64 -> float32, Rademacher signs. Bit-identical with baffle_edge/perturb.py.
 *
 *     key     = (seed & 0xFFFFFFFF, seed >> 32)          seed: unsigned 64-bit
 *     counter = (block, k', client, round)               each unsigned 32-bit, k' = step*K + k
 *
 * All arithmetic on words is uint32 (`Math.imul`, `>>> 0`, 16-bit halves for the high product):
 * no BigInt in the loops. The seed is the only 64-bit value; it is split once into two words.
 */
export const NOISE_SPEC_VERSION = 1;
export const SHARED_CLIENT = 0xffffffff;
export const GAUSSIAN_CHUNK = 1 << 16; // values per Box–Muller batch (a multiple of 4: chunks start on blocks)
export type NoiseKind = "gaussian" | "rademacher";
/** A 64-bit seed: a bigint, a safe non-negative integer, or its decimal text. */
export type Seed = bigint | number | string;

const M0 = 0xd2511f53, M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9, W1 = 0xbb67ae85;
const M0_LO = M0 & 0xffff, M0_HI = M0 >>> 16, M1_LO = M1 & 0xffff, M1_HI = M1 >>> 16;
const TWO_PI_2M24 = 2 * Math.PI * 2 ** -24; // (2*pi) * 2^-24, the double Python computes
const MAX_U64 = (1n << 64n) - 1n;

/** The two key words of a 64-bit seed; a clear RangeError if it is not an integer in [0, 2^64). */
export function seedWords(seed: Seed): [number, number] {
  let s: bigint;
  if (typeof seed === "bigint") s = seed;
  else if (typeof seed === "number") {
    if (!Number.isSafeInteger(seed)) {
      throw new RangeError(`seed must be an integer in [0, 2^64) (pass a bigint or decimal string above 2^53), got ${seed}`);
    }
    s = BigInt(seed);
  } else if (typeof seed === "string" && /^[0-9]{1,20}$/.test(seed)) s = BigInt(seed);
  else throw new RangeError(`seed must be an integer in [0, 2^64), got ${String(seed)}`);
  if (s < 0n || s > MAX_U64) throw new RangeError(`seed must be in [0, 2^64), got ${s}`);
  return [Number(s & 0xffffffffn), Number(s >> 32n)];
}

function checkWord(name: string, v: number): number {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw new RangeError(`${name} must be an integer in [0, 2^32), got ${v}`);
  }
  return v;
}

/** One Philox4x32-10 block: four uint32 words of counter `c` under key `key`. */
export function philox4x32(c: ArrayLike<number>, key: ArrayLike<number>, rounds = 10): Uint32Array {
  let c0 = c[0] >>> 0, c1 = c[1] >>> 0, c2 = c[2] >>> 0, c3 = c[3] >>> 0;
  let k0 = key[0] >>> 0, k1 = key[1] >>> 0;
  for (let r = 0; r < rounds; r++) {
    const lo0 = Math.imul(M0, c0) >>> 0, hi0 = mulhi(M0_LO, M0_HI, c0);
    const lo1 = Math.imul(M1, c2) >>> 0, hi1 = mulhi(M1_LO, M1_HI, c2);
    c0 = (hi1 ^ c1 ^ k0) >>> 0; c1 = lo1; c2 = (hi0 ^ c3 ^ k1) >>> 0; c3 = lo0;
    if (r + 1 < rounds) { k0 = (k0 + W0) >>> 0; k1 = (k1 + W1) >>> 0; }
  }
  return Uint32Array.of(c0, c1, c2, c3);
}

/** High 32 bits of the 64-bit product a * b (a given as 16-bit halves), in exact double arithmetic. */
function mulhi(aLo: number, aHi: number, b: number): number {
  const bLo = b & 0xffff, bHi = b >>> 16;
  const ll = aLo * bLo, hl = aHi * bLo, lh = aLo * bHi;
  const cross = (ll >>> 16) + (hl & 0xffff) + lh; // < 2^32
  return (aHi * bHi + (hl >>> 16) + (cross >>> 16)) >>> 0;
}

/**
 * `nWords` uint32 words of the stream keyed by (seed, round, client, k'), starting at block
 * `firstBlock` (4 words per block; 0 = the start of the stream).
 */
export function words(seed: Seed, round: number, client: number, k: number, nWords: number, firstBlock = 0,
                      out?: Uint32Array): Uint32Array {
  const [key0, key1] = seedWords(seed);
  checkWord("round", round); checkWord("client", client); checkWord("k", k);
  if (!Number.isInteger(nWords) || nWords < 0) throw new RangeError(`nWords must be an integer >= 0, got ${nWords}`);
  const nb = Math.ceil(nWords / 4);
  if (!Number.isInteger(firstBlock) || firstBlock < 0 || firstBlock + nb > 2 ** 32) {
    throw new RangeError(`blocks [${firstBlock}, ${firstBlock + nb}) outside the 2^32-block stream`);
  }
  const res = out ?? new Uint32Array(nWords);
  if (res.length < nWords) throw new RangeError(`out holds ${res.length} words, need ${nWords}`);
  // round 1 of every block shares the three counter words that do not vary: hoist them
  const lo1 = Math.imul(M1, client) >>> 0, hi1 = mulhi(M1_LO, M1_HI, client);
  const x0first = (hi1 ^ k ^ key0) >>> 0;
  let ks0 = key0, ks1 = key1;
  const keys0 = new Uint32Array(9), keys1 = new Uint32Array(9);
  for (let r = 0; r < 9; r++) { ks0 = (ks0 + W0) >>> 0; ks1 = (ks1 + W1) >>> 0; keys0[r] = ks0; keys1[r] = ks1; }
  for (let b = 0; b < nb; b++) {
    const block = (firstBlock + b) >>> 0;
    let c0 = x0first, c1 = lo1;
    let c2 = (mulhi(M0_LO, M0_HI, block) ^ round ^ key1) >>> 0, c3 = Math.imul(M0, block) >>> 0;
    for (let r = 0; r < 9; r++) {
      const lo0 = Math.imul(M0, c0) >>> 0, hi0 = mulhi(M0_LO, M0_HI, c0);
      const l1 = Math.imul(M1, c2) >>> 0, h1 = mulhi(M1_LO, M1_HI, c2);
      c0 = (h1 ^ c1 ^ keys0[r]) >>> 0; c1 = l1; c2 = (hi0 ^ c3 ^ keys1[r]) >>> 0; c3 = lo0;
    }
    const o = 4 * b;
    if (o + 3 < nWords) { res[o] = c0; res[o + 1] = c1; res[o + 2] = c2; res[o + 3] = c3; } else {
      const tail = [c0, c1, c2, c3];
      for (let j = 0; o + j < nWords; j++) res[o + j] = tail[j];
    }
  }
  return res;
}

/**
 * Box–Muller of an even number of words into float32 standard normals, written to `out` from
 * `offset` (at most `n` values: for an odd count the last pair's second value is dropped).
 * Strict IEEE double throughout (JavaScript has no fused multiply-add and no extended precision).
 */
export function boxMuller(w: Uint32Array, out: Float32Array, offset = 0, n = w.length): void {
  for (let i = 0, j = offset; i < n; i += 2, j += 2) {
    const u1 = ((w[i] >>> 8) + 1) * 2 ** -24; // (0, 1]: ln never sees 0
    const t = (w[i + 1] >>> 8) * TWO_PI_2M24;
    const r = Math.sqrt(-2 * Math.log(u1)); // u1 = 1: sqrt(-0) = -0, part of the bit pattern
    out[j] = r * Math.cos(t);
    if (i + 1 < n) out[j + 1] = r * Math.sin(t);
  }
}

function checkDim(d: number): void {
  if (!Number.isInteger(d) || d < 0) throw new RangeError(`d must be an integer >= 0, got ${d}`);
}

/** eps_k: `d` float32 values of perturbation k' = `k` (docs/noise.md section 2). */
export function noise(seed: Seed, round: number, client: number, k: number, d: number,
                      kind: NoiseKind = "gaussian"): Float32Array {
  checkDim(d);
  const z = new Float32Array(d);
  if (kind === "gaussian") {
    const buf = new Uint32Array(Math.min(GAUSSIAN_CHUNK, d + (d & 1)));
    for (let start = 0; start < d; start += GAUSSIAN_CHUNK) {
      const n = Math.min(GAUSSIAN_CHUNK, d - start);
      const nw = n + (n & 1);
      words(seed, round, client, k, nw, start / 4, buf);
      boxMuller(buf, z, start, n);
    }
    return z;
  }
  if (kind !== "rademacher") throw new RangeError(`noise kind must be "gaussian" or "rademacher", got ${String(kind)}`);
  const w = words(seed, round, client, k, Math.ceil(d / 32));
  for (let i = 0; i < d; i++) z[i] = (w[i >>> 5] >>> (i & 31)) & 1 ? -1 : 1;
  return z;
}

/**
 * Rademacher eps_k as a sign mask: 1 where eps = -1, 0 where +1 (one byte per value). The
 * unused high bits of the last word are dropped.
 */
export function negativeSigns(seed: Seed, round: number, client: number, k: number, d: number,
                              out?: Uint8Array): Uint8Array {
  checkDim(d);
  const w = words(seed, round, client, k, Math.ceil(d / 32));
  const res = out ?? new Uint8Array(d);
  for (let i = 0; i < d; i++) res[i] = (w[i >>> 5] >>> (i & 31)) & 1;
  return res;
}
