/**
 * The integer-domain perturbation of int8 graphs, exactly as baffle_edge/quant.py
 * (docs/quantized-perturbation.md):
 *
 *     per round:  q  = clip(rint(w / s_c), -qmax, qmax)         round half to even, in float64
 *     weights:    q' = clip(q + eps, lo, hi)                    int8, eps in {-1, +1}
 *     biases:     q' = clip(q + m * eps, lo, hi)                 int32, m = the tensor's multiplier
 *
 * `StepSelector` precomputes clip(q + m) and clip(q - m) once per set of weights and selects per
 * perturbation from a sign mask (bit-identical to the formula).
 */
export type IntArray = Int8Array | Int32Array;

export interface QTensor {
  name: string; // torch parameter name
  input: string; // graph input fed with the integers
  offset: number; // position in the flat parameter vector
  shape: number[];
  dtype: "int8" | "int32";
  axis: number; // channel axis of `scale`
  scale: number[]; // per channel (float32 values written as float64 in baffle.json)
  multiplier: number; // integer units per perturbation step
  qmax: number; // quantization clip of rounded float weights
  lo: number; // bounds of perturbed integers
  hi: number;
  size: number;
}

const INT_RANGE = { int8: [-128, 127], int32: [-(2 ** 31), 2 ** 31 - 1] } as const;

function bad(msg: string): never {
  throw new Error(`baffle.json quantization table: ${msg}`);
}

/** One row of `formats.<fmt>.quantization` in baffle.json, checked. */
export function qtensorFromJson(d: Record<string, unknown>): QTensor {
  const isInt = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v);
  const name = String(d.name);
  if (typeof d.input !== "string") bad(`${name}: input must be a string`);
  if (d.dtype !== "int8" && d.dtype !== "int32") bad(`${name}: dtype must be int8 or int32, got ${String(d.dtype)}`);
  const shape = d.shape as unknown[];
  if (!Array.isArray(shape) || !shape.every((s) => isInt(s) && s > 0)) bad(`${name}: bad shape`);
  const axis = d.axis, offset = d.offset, multiplier = d.multiplier, qmax = d.qmax;
  if (!isInt(axis) || axis < 0 || axis >= shape.length) bad(`${name}: bad axis ${String(axis)}`);
  const scale = d.scale as unknown[];
  if (!Array.isArray(scale) || scale.length !== (shape[axis] as number) ||
      !scale.every((s) => typeof s === "number" && Number.isFinite(s) && s > 0)) {
    bad(`${name}: scale must hold ${String(shape[axis])} positive numbers`);
  }
  if (!isInt(offset) || offset < 0 || !isInt(multiplier) || !isInt(qmax) || qmax < 1) bad(`${name}: bad offset/multiplier/qmax`);
  const [dlo, dhi] = INT_RANGE[d.dtype];
  const lo = d.lo ?? dlo, hi = d.hi ?? dhi;
  if (!isInt(lo) || !isInt(hi) || lo < dlo || hi > dhi || lo > hi) bad(`${name}: bad bounds [${String(lo)}, ${String(hi)}]`);
  return {
    name, input: d.input, offset, shape: shape as number[], dtype: d.dtype, axis, scale: scale as number[],
    multiplier, qmax, lo, hi, size: (shape as number[]).reduce((a, b) => a * b, 1),
  };
}

/** numpy.rint: round half to even. */
export function rint(x: number): number {
  const r = Math.round(x); // half toward +infinity
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The channel of flat element `i` of a row-major tensor: index along `axis`. */
function channelStride(t: QTensor): [number, number] {
  let inner = 1;
  for (let a = t.axis + 1; a < t.shape.length; a++) inner *= t.shape[a];
  return [inner, t.shape[t.axis]];
}

/** QTensor.quantize: q = clip(rint(float64(w) / float64(float32(scale))), -qmax, qmax). */
export function quantize(t: QTensor, w: Float32Array): IntArray {
  const q = t.dtype === "int8" ? new Int8Array(t.size) : new Int32Array(t.size);
  const [inner, channels] = channelStride(t);
  const s32 = t.scale.map((s) => Math.fround(s));
  for (let i = 0; i < t.size; i++) {
    const s = s32[Math.floor(i / inner) % channels];
    const v = rint(w[t.offset + i] / s);
    q[i] = v > t.qmax ? t.qmax : v < -t.qmax ? -t.qmax : v;
  }
  return q;
}

/** QTensor.perturb with eps = +1 everywhere: clip(q + sign * m, lo, hi). */
export function shifted(t: QTensor, q: IntArray, sign: 1 | -1): IntArray {
  const out = t.dtype === "int8" ? new Int8Array(t.size) : new Int32Array(t.size);
  const m = sign * t.multiplier;
  for (let i = 0; i < t.size; i++) {
    const v = q[i] + m;
    out[i] = v > t.hi ? t.hi : v < t.lo ? t.lo : v;
  }
  return out;
}

/** float64 step of one perturbation unit per parameter (QTensor.step): scale * multiplier. */
export function steps(table: QTensor[], dim: number): Float64Array {
  const out = new Float64Array(dim);
  for (const t of table) {
    const [inner, channels] = channelStride(t);
    for (let i = 0; i < t.size; i++) out[t.offset + i] = t.scale[Math.floor(i / inner) % channels] * t.multiplier;
  }
  return out;
}

/**
 * Picks the perturbed integers of every tensor from a sign mask: q' = negative ? clip(q - m) :
 * clip(q + m) (sign +1), mirrored for sign -1. Writes into buffers it owns (one per tensor), so a
 * perturbation costs one pass and no allocation.
 */
export class StepSelector {
  readonly up: IntArray[];
  readonly down: IntArray[];
  readonly out: IntArray[];

  constructor(readonly table: QTensor[], readonly q: IntArray[]) {
    this.up = table.map((t, i) => shifted(t, q[i], 1));
    this.down = table.map((t, i) => shifted(t, q[i], -1));
    this.out = table.map((t) => (t.dtype === "int8" ? new Int8Array(t.size) : new Int32Array(t.size)));
  }

  /** The perturbed integers for eps = negative ? -1 : +1, moved by `sign` * eps. */
  select(negative: Uint8Array, sign: 1 | -1 = 1): IntArray[] {
    for (let j = 0; j < this.table.length; j++) {
      const plus = sign > 0 ? this.up[j] : this.down[j], minus = sign > 0 ? this.down[j] : this.up[j];
      const o = this.out[j], off = this.table[j].offset;
      if (o instanceof Int8Array) selectMask8(o, plus as Int8Array, minus as Int8Array, negative, off);
      else selectMask32(o, plus as Int32Array, minus as Int32Array, negative, off);
    }
    return this.out;
  }

  /** `select` straight from the Rademacher words (bit i of the stream set = eps_i is -1): no mask pass. */
  selectWords(w: Uint32Array, sign: 1 | -1 = 1): IntArray[] {
    for (let j = 0; j < this.table.length; j++) {
      const plus = sign > 0 ? this.up[j] : this.down[j], minus = sign > 0 ? this.down[j] : this.up[j];
      const o = this.out[j], off = this.table[j].offset;
      if (o instanceof Int8Array) selectBits8(o, plus as Int8Array, minus as Int8Array, w, off);
      else selectBits32(o, plus as Int32Array, minus as Int32Array, w, off);
    }
    return this.out;
  }

  /**
   * The perturbation actually applied, in steps (QuantTable.effective_noise): (q'(+eps) - q)/m,
   * or (q'(+eps) - q'(-eps)) / (2m) for the central scheme. Equals eps except where a weight saturates.
   */
  effectiveNoise(negative: Uint8Array, central: boolean, out: Float64Array): Float64Array {
    this.table.forEach((t, j) => {
      const up = this.up[j], down = this.down[j], q = this.q[j], off = t.offset;
      const den = (central ? 2 : 1) * t.multiplier;
      for (let i = 0; i < t.size; i++) {
        const neg = negative[off + i];
        const plus = neg ? down[i] : up[i];
        const lo = central ? (neg ? up[i] : down[i]) : q[i];
        out[off + i] = (plus - lo) / den;
      }
    });
    return out;
  }
}

// One monomorphic loop per element type (a shared loop over Int8Array | Int32Array deoptimizes).
function selectMask8(o: Int8Array, plus: Int8Array, minus: Int8Array, neg: Uint8Array, off: number): void {
  for (let i = 0; i < o.length; i++) o[i] = neg[off + i] ? minus[i] : plus[i];
}
function selectMask32(o: Int32Array, plus: Int32Array, minus: Int32Array, neg: Uint8Array, off: number): void {
  for (let i = 0; i < o.length; i++) o[i] = neg[off + i] ? minus[i] : plus[i];
}
function selectBits8(o: Int8Array, plus: Int8Array, minus: Int8Array, w: Uint32Array, off: number): void {
  for (let i = 0, b = off; i < o.length; i++, b++) o[i] = (w[b >>> 5] >>> (b & 31)) & 1 ? minus[i] : plus[i];
}
function selectBits32(o: Int32Array, plus: Int32Array, minus: Int32Array, w: Uint32Array, off: number): void {
  for (let i = 0, b = off; i < o.length; i++, b++) o[i] = (w[b >>> 5] >>> (b & 31)) & 1 ? minus[i] : plus[i];
}
