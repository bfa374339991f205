/**
 * The incremental block-noise forward through a bundle's segment graphs (docs/noise.md section 10,
 * runtimes/ort_incremental.py): the same ONNX files the Python ONNX Runtime client runs, so the same
 * kernels, and the losses equal full forwards' bit for bit (int8 and fp32).
 *
 *     cache     x, parameters -> logits, B_1 .. B_{L-1}           (the unperturbed forward)
 *     seg i     B_i, module i's parameters -> B_{i+1}              (the last one -> logits)
 *
 * Rows of module i run in passes: one call of seg i on the cached B_i with the module's parameters in
 * which channel c holds a row's values (one row per channel per pass); each row's B_{i+1} is the cached
 * one with channel c (axis 1) replaced, and seg i+1 .. finish the rows stacked along the batch axis,
 * ROWS_PER_CALL images per call (the Python client's chunks, so every call sees the same batch).
 */
import type { InferenceSession, Tensor } from "onnxruntime-common";
import { BlockError, type BlockTable } from "./blocks.js";

export const ROWS_PER_CALL = 4096; // images per call of the segments after a row's module (ort_incremental.py)

/** baffle.json `formats.<fmt>.blocks` (export/blocks.ChainPlan.to_json). */
export interface BlockPlan { kind?: "chain"; modules: string[]; params: string[][]; boundaries: string[]; channels: number[] }

type AnyTensor = new (type: any, data: any, dims: readonly number[]) => Tensor;
type Typed = Float32Array | Uint8Array | Int8Array | Int32Array;

/** The plan of baffle.json checked against the parameters' block table: a clear error when they disagree. */
export function checkPlan(raw: unknown, table: BlockTable, inputs: (param: string) => string): BlockPlan {
  const p = raw as BlockPlan;
  const kind = (p as { kind?: unknown } | null)?.kind;
  if (kind !== undefined && kind !== "chain") {
    throw new BlockError(`baffle.json: a block plan of kind ${JSON.stringify(kind)} is not a chain plan (this client runs chains only)`);
  }
  const ok = p && Array.isArray(p.modules) && Array.isArray(p.params) && Array.isArray(p.boundaries) &&
    p.boundaries.length === p.modules.length + 1 && p.params.length === p.modules.length;
  if (!ok) throw new BlockError("baffle.json: the format's blocks plan is malformed (modules, params, boundaries)");
  const same = p.modules.length === table.modules.length && p.modules.every((m) => table.modules.includes(m));
  if (!same) {
    throw new BlockError(`bundle block plan lists modules ${JSON.stringify(p.modules)}, the parameters have ` +
      `${JSON.stringify(table.modules)}`);
  }
  p.modules.forEach((m, i) => {
    const want = table.moduleTensors[table.modules.indexOf(m)].map((t) => inputs(t.name));
    if (JSON.stringify(want) !== JSON.stringify(p.params[i])) {
      throw new BlockError(`bundle block plan: module ${m} reads ${JSON.stringify(p.params[i])}, its parameters are ${JSON.stringify(want)}`);
    }
  });
  return p;
}

export class SegmentForward {
  private b: Tensor[] = [];
  private z: Tensor | null = null;
  private feeds: Record<string, Tensor> = {};
  private readonly chain: Map<number, number>; // table module -> chain position
  private readonly rowSizes: number[][]; // per chain module: values per channel of each of its tensors

  constructor(readonly plan: BlockPlan, readonly cacheSession: InferenceSession, readonly segments: InferenceSession[],
              readonly table: BlockTable, private readonly Tensor: AnyTensor) {
    if (segments.length !== plan.modules.length) throw new BlockError(`bundle block plan has ${plan.modules.length} modules, ${segments.length} segment graphs`);
    this.chain = new Map(plan.modules.map((m, i) => [table.modules.indexOf(m), i]));
    this.rowSizes = plan.modules.map((m) => table.moduleTensors[table.modules.indexOf(m)].map((t) => t.shape.slice(1).reduce((a, c) => a * c, 1)));
  }

  /** Run the unperturbed forward (`feeds`: every parameter input), keep B_1 .. B_{L-1}; its logits. */
  async cache(x: Tensor, feeds: Record<string, Tensor>): Promise<Float32Array> {
    const bd = this.plan.boundaries, last = bd[bd.length - 1];
    const out = await this.cacheSession.run({ [bd[0]]: x, ...feeds }, [last, ...bd.slice(1, -1)]);
    this.feeds = feeds;
    this.b = [x, ...bd.slice(1, -1).map((n) => out[n])];
    this.z = out[last];
    return this.z.data as Float32Array;
  }

  /** Logits (B x classes) of every row: block `blocks[r]` holding `values[r]` (in the feeds' element type). */
  async logits(blocks: ArrayLike<number>, values: ArrayLike<number>[]): Promise<Float32Array[]> {
    const out: Float32Array[] = new Array(blocks.length);
    const byModule = new Map<number, number[]>();
    for (let r = 0; r < blocks.length; r++) {
      const m = this.table.module[blocks[r]];
      if (!byModule.has(m)) byModule.set(m, []);
      byModule.get(m)!.push(r);
    }
    for (const m of [...byModule.keys()].sort((a, c) => a - c)) {
      const rows = byModule.get(m)!, i = this.chain.get(m)!;
      const next = await this.moduleRows(i, rows.map((r) => this.table.row[blocks[r]]), rows.map((r) => values[r]));
      const logits = await this.finish(i + 1, next);
      rows.forEach((r, j) => { out[r] = logits[j]; });
    }
    return out;
  }

  /** B_{i+1} of each row: the cached one with the row's channel from a pass of seg i. */
  private async moduleRows(i: number, channels: number[], values: ArrayLike<number>[]): Promise<Typed[]> {
    const names = this.plan.params[i], sizes = this.rowSizes[i];
    const cached = (i + 1 < this.b.length ? this.b[i + 1] : this.z)!;
    const cdata = cached.data as Typed, dims = cached.dims, bsz = dims[0], C = dims[1];
    const inner = cdata.length / (bsz * C);
    const rank = new Array<number>(channels.length), seen = new Map<number, number>();
    channels.forEach((c, j) => { rank[j] = seen.get(c) ?? 0; seen.set(c, rank[j] + 1); });
    const next = channels.map(() => cdata.slice());
    const passes = channels.length ? Math.max(...rank) + 1 : 0;
    for (let p = 0; p < passes; p++) {
      const sel = channels.map((_, j) => j).filter((j) => rank[j] === p);
      const tensors: Record<string, Tensor> = {};
      names.forEach((n, t) => {
        const base = this.feeds[n], data = (base.data as Typed).slice();
        let col = 0;
        for (let u = 0; u < t; u++) col += sizes[u];
        for (const j of sel) {
          const v = values[j], at = channels[j] * sizes[t];
          for (let e = 0; e < sizes[t]; e++) data[at + e] = v[col + e];
        }
        tensors[n] = new this.Tensor(base.type, data, base.dims);
      });
      const seg = this.segments[i];
      const y = (await seg.run({ [this.plan.boundaries[i]]: this.b[i], ...tensors }))[seg.outputNames[0]].data as Typed;
      for (const j of sel) {
        const c = channels[j], dst = next[j];
        for (let b = 0; b < bsz; b++) {
          const o = (b * C + c) * inner;
          dst.set(y.subarray(o, o + inner), o);
        }
      }
    }
    return next;
  }

  /** Run segments start .. L-1 (unperturbed) on the rows' boundary tensors; logits per row. */
  private async finish(start: number, rows: Typed[]): Promise<Float32Array[]> {
    if (start >= this.segments.length) return rows as Float32Array[];
    const cached = this.b[start], bsz = cached.dims[0], per = rows.length ? rows[0].length : 0;
    const step = Math.max(1, Math.floor(ROWS_PER_CALL / bsz)); // rows per call: ROWS_PER_CALL // B * B images
    const out: Float32Array[] = [];
    for (let s = 0; s < rows.length; s += step) {
      const chunk = rows.slice(s, s + step);
      const flat = new (rows[0].constructor as new (n: number) => Typed)(chunk.length * per);
      chunk.forEach((r, j) => flat.set(r as any, j * per));
      let t: Tensor = new this.Tensor(cached.type, flat, [chunk.length * bsz, ...cached.dims.slice(1)]);
      for (let j = start; j < this.segments.length; j++) {
        const feeds: Record<string, Tensor> = { [this.plan.boundaries[j]]: t };
        for (const n of this.plan.params[j]) feeds[n] = this.feeds[n];
        const seg = this.segments[j];
        t = (await seg.run(feeds))[seg.outputNames[0]];
      }
      const z = t.data as Float32Array, n = z.length / chunk.length;
      for (let j = 0; j < chunk.length; j++) out.push(z.subarray(j * n, (j + 1) * n));
    }
    return out;
  }
}
