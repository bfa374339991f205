/**
 * Block noise (docs/noise.md sections 8, 10 and 11), exactly as baffle_edge/perturb.py `BlockTable`
 * and baffle_edge/quant.py `FlatSteps`: the partition of the parameters into output-channel blocks,
 * the draw of one block per perturbation (by size or by `block_weights`), its float32 values (float
 * domain) or whole int8 steps (int8-step domain), and the int8 freeze rule. No Node APIs (React Native).
 *
 *     r  = (w[1] * 2^32 + w[0]) mod W          unsigned 64-bit: BigInt (a double loses the low bits)
 *     b  = the block with D[b] <= r < D[b+1]    D: cumulative draw weights (block sizes by default)
 *     float: eps_b[i] = float32(z[i] * float32(sqrt(W / W_b)))     z: Box-Muller of w[4 ..]
 *     int8:  steps_i  = m_b * (bit i of w[4 ..] ? -1 : +1),  m_b = max(1, floor(sqrt(d / d_b) + 0.5))
 */
import type { IntArray, QTensor } from "./quant.js";
import { boxMuller, words, type Seed } from "./noise.js";

/** The largest cumulative draw weight this client handles exactly (doubles hold integers below 2^53). */
export const MAX_DRAW_TOTAL = 2 ** 53;
export const MAX_BLOCK_MODULES = 4096;

export interface ParameterSpec { name: string; shape: readonly number[]; offset: number }

/** A block-noise task or table this client cannot run: the message says what and why. */
export class BlockError extends Error {
  constructor(msg: string) {
    super(msg);
    this.name = "BlockError";
  }
}

/** The module of a parameter: its name up to the last dot (the whole name if it has none). */
export function moduleOf(name: string): string {
  const i = name.lastIndexOf(".");
  return i < 0 ? name : name.slice(0, i);
}

interface Draw {
  bounds: Float64Array; // D[0 .. nBlocks]: cumulative draw weights
  total: bigint; // W = D[nBlocks]
  scale: Float32Array; // float32(sqrt(W / weight_b))
  stepWeight: Float64Array; // (W / weight_b) / m_b^2: the int8 decoder weight w_b
  weight: ArrayLike<number>; // weight_b
}

interface TableParts {
  modules: string[]; moduleTensors: ParameterSpec[][]; index: Int32Array; bounds: Float64Array; module: Int32Array;
  row: Int32Array; sizes: Int32Array; steps: Int32Array; dim: number;
}

export class BlockTable {
  /** Module names in block order (first appearance in parameter order). */
  readonly modules: string[];
  /** Per module: its tensors (parameter order). */
  readonly moduleTensors: ParameterSpec[][];
  /** Flat parameter indices of every block, block after block: block b is index[bounds[b] .. bounds[b+1]). */
  readonly index: Int32Array;
  readonly bounds: Float64Array;
  readonly module: Int32Array; // block -> module number
  readonly row: Int32Array; // block -> output row c in its module
  readonly sizes: Int32Array; // d_b
  readonly steps: Int32Array; // m_b (weights never change it; RoundTask.max_block_steps caps it)
  readonly dim: number;
  private readonly draw_: Draw;

  private constructor(src: TableParts, draw: Draw | null) {
    this.modules = src.modules; this.moduleTensors = src.moduleTensors; this.index = src.index; this.bounds = src.bounds;
    this.module = src.module; this.row = src.row; this.sizes = src.sizes; this.steps = src.steps; this.dim = src.dim;
    this.draw_ = draw ?? drawOf(this.sizes, this.steps);
  }

  /** The partition of a parameter table (baffle.json `parameters`: name, shape, offset). */
  static fromParameters(params: readonly ParameterSpec[]): BlockTable {
    const groups = new Map<string, ParameterSpec[]>();
    for (const p of params) {
      const m = moduleOf(p.name);
      if (!groups.has(m)) groups.set(m, []);
      groups.get(m)!.push(p);
    }
    const index: number[] = [], bounds = [0], module: number[] = [], row: number[] = [];
    const modules = [...groups.keys()];
    modules.forEach((m, mi) => {
      const tensors = groups.get(m)!;
      const rows = new Set(tensors.map((t) => (t.shape.length ? t.shape[0] : 1)));
      if (rows.size !== 1) {
        throw new BlockError(`block noise: the tensors of module ${JSON.stringify(m)} disagree on their output dimension ` +
          `[${[...rows].sort((a, b) => a - b).join(", ")}]`);
      }
      const c = [...rows][0];
      for (let r = 0; r < c; r++) {
        for (const t of tensors) {
          const inner = t.shape.slice(1).reduce((a, b) => a * b, 1);
          for (let i = 0; i < inner; i++) index.push(t.offset + r * inner + i);
        }
        bounds.push(index.length);
        module.push(mi);
        row.push(r);
      }
    });
    const dim = index.length;
    const seen = new Uint8Array(dim);
    for (const i of index) {
      if (i < 0 || i >= dim || seen[i]) throw new BlockError("block noise: parameter tensors overlap (or leave gaps in the flat vector)");
      seen[i] = 1;
    }
    const b = Float64Array.from(bounds);
    const sizes = new Int32Array(module.length), steps = new Int32Array(module.length);
    for (let k = 0; k < sizes.length; k++) {
      sizes[k] = b[k + 1] - b[k];
      steps[k] = Math.max(1, Math.floor(Math.sqrt(dim / sizes[k]) + 0.5)); // d / d_b: a double division
    }
    return new BlockTable({
      modules, moduleTensors: modules.map((m) => groups.get(m)!), index: Int32Array.from(index), bounds: b,
      module: Int32Array.from(module), row: Int32Array.from(row), sizes, steps, dim,
    }, null);
  }

  /** This partition drawn with one weight per module (RoundTask.block_weights; docs/noise.md section 11). */
  weighted(moduleWeights: readonly number[] | null | undefined): BlockTable {
    if (moduleWeights === null || moduleWeights === undefined) return this;
    checkBlockWeights(moduleWeights, this.modules);
    const w = new Float64Array(this.module.length);
    for (let b = 0; b < w.length; b++) w[b] = moduleWeights[this.module[b]];
    return new BlockTable(this, drawOf(w, this.steps));
  }

  /** This partition with every int8-step block moving at most `maxSteps` whole steps (RoundTask.max_block_steps;
   * docs/noise.md section 10): m_b = min(round(sqrt(d / d_b)), maxSteps), the decoder weight following. */
  capped(maxSteps: number | null | undefined): BlockTable {
    if (maxSteps === null || maxSteps === undefined) return this;
    const steps = this.steps.map((m) => Math.min(m, maxSteps));
    return new BlockTable({ ...this, steps }, drawOf(this.draw_.weight, steps));
  }

  /** The partition a task's rows are drawn from: its block_weights and max_block_steps. */
  forTask(task: { block_weights?: readonly number[] | null; max_block_steps?: number | null }): BlockTable {
    return this.weighted(task.block_weights).capped(task.max_block_steps);
  }

  get drawBounds(): Float64Array { return this.draw_.bounds; }
  get drawTotal(): bigint { return this.draw_.total; }
  get scale(): Float32Array { return this.draw_.scale; }
  get stepWeight(): Float64Array { return this.draw_.stepWeight; }

  /** The block of perturbation k' (words 0 and 1 of its stream). */
  pick(seed: Seed, round: number, client: number, k: number): number {
    const w = words(seed, round, client, k, 2);
    const r = Number(((BigInt(w[1]) << 32n) | BigInt(w[0])) % this.draw_.total); // < W < 2^53: exact
    const d = this.draw_.bounds;
    let lo = 0, hi = d.length - 2; // the last b with d[b] <= r
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (d[mid] <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  /** Float block noise of k': the block and its d_b float32 values (Box-Muller from Philox block 1, times its scale). */
  draw(seed: Seed, round: number, client: number, k: number): { block: number; values: Float32Array } {
    const block = this.pick(seed, round, client, k);
    const n = this.sizes[block];
    const w = words(seed, round, client, k, n + (n & 1), 1);
    const z = new Float32Array(n);
    boxMuller(w, z, 0, n);
    const s = this.draw_.scale[block];
    for (let i = 0; i < n; i++) z[i] = Math.fround(z[i] * s);
    return { block, values: z };
  }

  /** int8-step block noise of k': the same block, each value +-m_b whole steps (bit i of the words from Philox block 1). */
  drawSteps(seed: Seed, round: number, client: number, k: number): { block: number; values: Int32Array } {
    const block = this.pick(seed, round, client, k);
    const n = this.sizes[block], m = this.steps[block];
    const w = words(seed, round, client, k, Math.ceil(n / 32), 1);
    const v = new Int32Array(n);
    for (let i = 0; i < n; i++) v[i] = (w[i >>> 5] >>> (i & 31)) & 1 ? -m : m;
    return { block, values: v };
  }
}

function drawOf(weight: ArrayLike<number>, steps: Int32Array): Draw {
  const bounds = new Float64Array(weight.length + 1);
  for (let b = 0; b < weight.length; b++) bounds[b + 1] = bounds[b] + weight[b];
  const total = bounds[weight.length];
  if (!(total < MAX_DRAW_TOTAL)) {
    throw new BlockError(`block_weights: the total draw weight ${total} reaches 2^53, beyond what this client draws exactly`);
  }
  const scale = new Float32Array(weight.length), stepWeight = new Float64Array(weight.length);
  for (let b = 0; b < weight.length; b++) {
    const inv = total / weight[b]; // 1 / p_b in double
    scale[b] = Math.sqrt(inv); // rounded to float32 once, by the store
    stepWeight[b] = inv / (steps[b] * steps[b]);
  }
  return { bounds, total: BigInt(total), scale, stepWeight, weight };
}

/** RoundTask.block_weights checked against a table's modules (the protocol checks the values, this the count). */
export function checkBlockWeights(v: readonly number[], modules: readonly string[]): void {
  if (!Array.isArray(v) || v.length !== modules.length ||
      !v.every((x) => typeof x === "number" && Number.isInteger(x) && x >= 1 && x < 2 ** 32)) {
    throw new BlockError(`block_weights: expected ${modules.length} integers in [1, 2^32) (modules ` +
      `${JSON.stringify(modules)}), got ${JSON.stringify(v)?.slice(0, 200)}`);
  }
}

/**
 * The integers of one set of weights as flat per-parameter arrays (quant.FlatSteps): the moves of
 * int8 block noise and their effective noise. The freeze rule (docs/noise.md section 10): with
 * delta = sign * multiplier * steps, q' = q + delta if q - |delta| >= lo and q + |delta| <= hi,
 * else q' = q (frozen for this perturbation, both signs). Computed in doubles: q +- |delta| of an
 * int32 bias can leave the int32 range, which Int32 arithmetic would wrap.
 */
export class FlatSteps {
  readonly q: Float64Array;
  readonly lo: Float64Array;
  readonly hi: Float64Array;
  readonly mult: Float64Array;

  constructor(table: readonly QTensor[], qs: readonly IntArray[]) {
    const dim = table.reduce((n, t) => n + t.size, 0);
    this.q = new Float64Array(dim); this.lo = new Float64Array(dim); this.hi = new Float64Array(dim); this.mult = new Float64Array(dim);
    table.forEach((t, j) => {
      this.q.set(qs[j], t.offset);
      this.lo.fill(t.lo, t.offset, t.offset + t.size);
      this.hi.fill(t.hi, t.offset, t.offset + t.size);
      this.mult.fill(t.multiplier, t.offset, t.offset + t.size);
    });
  }

  /** q' at flat index i for `steps` whole steps moved by `sign`. */
  moved(i: number, steps: number, sign: 1 | -1): number {
    const q = this.q[i], delta = sign * this.mult[i] * steps, reach = Math.abs(delta);
    return q - reach >= this.lo[i] && q + reach <= this.hi[i] ? q + delta : q;
  }

  /** The steps actually applied at flat index i: (q'(+) - q) / m, central (q'(+) - q'(-)) / (2 m). */
  effective(i: number, steps: number, central: boolean): number {
    const lo = central ? this.moved(i, steps, -1) : this.q[i];
    return (this.moved(i, steps, 1) - lo) / ((central ? 2 : 1) * this.mult[i]);
  }
}
