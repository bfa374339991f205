/**
 * The incremental block-noise forward through a bundle's segment graphs (docs/noise.md section 10,
 * runtimes/ort_incremental.py): the same ONNX files the Python ONNX Runtime client runs, so the same
 * kernels, and the losses equal full forwards' bit for bit (int8 and fp32). Two kinds of plan:
 *
 * chain (export/blocks.py; LeNet, MobileNet):
 *     cache     x, parameters -> logits, B_1 .. B_{L-1}           (the unperturbed forward)
 *     seg i     B_i, module i's parameters -> B_{i+1}              (the last one -> logits)
 * graph (export/graph_blocks.py; residual adds, GroupNorm: WRN-10-2):
 *     cache     x, parameters -> logits, every module's input and output and the side tensors
 *     mod i     module i's input, its parameters -> its output
 *     rest i    module i's output, the cached side tensors, the rest's parameters -> logits (none for a head)
 *
 * Rows of module i run in passes: one call of module i's segment on its cached input with the module's
 * parameters in which channel c holds a row's values (one row per channel per pass); each row's output is
 * the cached one with channel c (axis 1) replaced. What follows runs on the rows stacked along the batch
 * axis: a chain's segments i+1 .. in chunks of ROWS_PER_CALL images, a graph's rest i in chunks of
 * REST_ELEMENTS values of its input (at least one batch), each side tensor repeated once per row of the
 * chunk: the Python client's chunks, so every call sees the same batch.
 */
import type { InferenceSession, Tensor } from "onnxruntime-common";
import { BlockError, type BlockTable } from "./blocks.js";

export const ROWS_PER_CALL = 4096; // images per call of the segments after a row's module (ort_incremental.py)
export const REST_ELEMENTS = 2 ** 23; // a graph plan's rest segment: at most this many values of its input per call

/** One module of a graph plan: its segment's input and output, what its rest segment also reads. */
export interface GraphSegment { input: string; output: string; sides: string[]; rest_params: string[] }

/** baffle.json `formats.<fmt>.blocks`: a chain plan (export/blocks.ChainPlan.to_json) or a graph plan
 * (export/graph_blocks.GraphPlan.to_json: `kind: "graph"`, per module a segment). */
export interface BlockPlan {
  kind?: "chain" | "graph"; modules: string[]; params: string[][]; channels: number[];
  boundaries?: string[]; // chain
  input?: string; output?: string; segments?: GraphSegment[]; // graph
}

type AnyTensor = new (type: any, data: any, dims: readonly number[]) => Tensor;
type Typed = Float32Array | Uint8Array | Int8Array | Int32Array;

/** The plan of baffle.json checked against the parameters' block table: a clear error when they disagree. */
export function checkPlan(raw: unknown, table: BlockTable, inputs: (param: string) => string): BlockPlan {
  const p = raw as BlockPlan;
  const kind = (p as { kind?: unknown } | null)?.kind ?? "chain";
  if (kind !== "chain" && kind !== "graph") {
    throw new BlockError(`baffle.json: a block plan of unknown kind ${JSON.stringify(kind)} (known: chain, graph)`);
  }
  const str = (x: unknown) => typeof x === "string";
  const ok = p && Array.isArray(p.modules) && Array.isArray(p.params) && p.params.length === p.modules.length && (kind === "chain"
    ? Array.isArray(p.boundaries) && p.boundaries.length === p.modules.length + 1
    : str(p.input) && str(p.output) && Array.isArray(p.segments) && p.segments.length === p.modules.length &&
      p.segments.every((g) => g && str(g.input) && str(g.output) && Array.isArray(g.sides) && Array.isArray(g.rest_params)));
  if (!ok) {
    throw new BlockError(`baffle.json: the format's ${kind} blocks plan is malformed (modules, params, ` +
      `${kind === "chain" ? "boundaries" : "input, output, segments"})`);
  }
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

/** The graphs a plan runs: the cache graph, per module its segment and (graph plans, but a head's) its rest. */
export interface SegmentSessions { cache: InferenceSession; modules: InferenceSession[]; rests: (InferenceSession | null)[] }

/** The bundle roles of a plan's graphs (baffle.json `files`), in SegmentSessions order. */
export function segmentRoles(plan: BlockPlan): { modules: string[]; rests: (string | null)[] } {
  const graph = plan.kind === "graph";
  return {
    modules: plan.modules.map((_, i) => (graph ? `block_mod${i}` : `block_seg${i}`)),
    rests: plan.modules.map((_, i) => (graph && plan.segments![i].output !== plan.output ? `block_rest${i}` : null)),
  };
}

export class SegmentForward {
  private t = new Map<string, Tensor>(); // the cached tensors by name (the data input included)
  private feeds: Record<string, Tensor> = {};
  private readonly chain: Map<number, number>; // table module -> plan position
  private readonly rowSizes: number[][]; // per plan module: values per channel of each of its tensors
  private readonly inputs: string[]; // per plan module: its segment's input and output
  private readonly outputs: string[];
  private readonly graph: boolean;

  constructor(readonly plan: BlockPlan, readonly sessions: SegmentSessions, readonly table: BlockTable,
              private readonly Tensor: AnyTensor) {
    const n = plan.modules.length;
    if (sessions.modules.length !== n) throw new BlockError(`bundle block plan has ${n} modules, ${sessions.modules.length} segment graphs`);
    this.graph = plan.kind === "graph";
    const bd = plan.boundaries ?? [];
    this.inputs = this.graph ? plan.segments!.map((g) => g.input) : bd.slice(0, -1);
    this.outputs = this.graph ? plan.segments!.map((g) => g.output) : bd.slice(1);
    segmentRoles(plan).rests.forEach((role, i) => {
      if ((role !== null) !== (sessions.rests[i] != null)) {
        throw new BlockError(`module ${plan.modules[i]}: ${role ?? "no"} rest segment expected`);
      }
    });
    this.chain = new Map(plan.modules.map((m, i) => [table.modules.indexOf(m), i]));
    this.rowSizes = plan.modules.map((m) => table.moduleTensors[table.modules.indexOf(m)].map((t) => t.shape.slice(1).reduce((a, c) => a * c, 1)));
  }

  private get input(): string { return this.graph ? this.plan.input! : this.plan.boundaries![0]; }
  private get output(): string { return this.graph ? this.plan.output! : this.plan.boundaries![this.plan.modules.length]; }

  /** Run the unperturbed forward (`feeds`: every parameter input), keep what the segments read; its logits. */
  async cache(x: Tensor, feeds: Record<string, Tensor>): Promise<Float32Array> {
    const names = this.graph ? [...this.sessions.cache.outputNames] : [this.output, ...this.outputs.slice(0, -1)];
    if (!names.includes(this.output)) throw new BlockError(`the block cache graph does not output the logits ${this.output}`);
    const out = await this.sessions.cache.run({ [this.input]: x, ...feeds }, names);
    this.feeds = feeds;
    this.t = new Map([[this.input, x], ...names.map((n) => [n, out[n]] as [string, Tensor])]);
    return out[this.output].data as Float32Array;
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
      const logits = this.graph ? await this.rest(i, next) : await this.finish(i + 1, next);
      rows.forEach((r, j) => { out[r] = logits[j]; });
    }
    return out;
  }

  /** Module i's output of each row: the cached one with the row's channel from a pass of its segment. */
  private async moduleRows(i: number, channels: number[], values: ArrayLike<number>[]): Promise<Typed[]> {
    const names = this.plan.params[i], sizes = this.rowSizes[i];
    const cached = this.t.get(this.outputs[i])!;
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
      const seg = this.sessions.modules[i];
      const y = (await seg.run({ [this.inputs[i]]: this.t.get(this.inputs[i])!, ...tensors }))[seg.outputNames[0]].data as Typed;
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

  /** Run a chain's segments start .. L-1 (unperturbed) on the rows' boundary tensors; logits per row. */
  private async finish(start: number, rows: Typed[]): Promise<Float32Array[]> {
    if (start >= this.sessions.modules.length) return rows as Float32Array[];
    const cached = this.t.get(this.inputs[start])!;
    return this.stacked(rows, cached, ROWS_PER_CALL, {}, (t) => this.runChain(start, t));
  }

  private async runChain(start: number, t: Tensor): Promise<Tensor> {
    for (let j = start; j < this.sessions.modules.length; j++) {
      const feeds: Record<string, Tensor> = { [this.inputs[j]]: t };
      for (const n of this.plan.params[j]) feeds[n] = this.feeds[n];
      const seg = this.sessions.modules[j];
      t = (await seg.run(feeds))[seg.outputNames[0]];
    }
    return t;
  }

  /** A graph plan's rest of module i on its rows' outputs (a head's outputs are the logits). */
  private async rest(i: number, rows: Typed[]): Promise<Float32Array[]> {
    const seg = this.sessions.rests[i];
    if (!seg) return rows as Float32Array[];
    const cached = this.t.get(this.outputs[i])!, g = this.plan.segments![i];
    const perImage = Math.max(1, cached.data.length / cached.dims[0]);
    const sides = Object.fromEntries(g.sides.map((s) => [s, this.t.get(s)!]));
    return this.stacked(rows, cached, Math.floor(REST_ELEMENTS / perImage), sides, async (t, tiled) => {
      const feeds: Record<string, Tensor> = { [this.outputs[i]]: t, ...tiled };
      for (const n of g.rest_params) feeds[n] = this.feeds[n];
      return (await seg.run(feeds))[seg.outputNames[0]];
    });
  }

  /** `run` on the rows stacked along the batch axis in chunks of whole batches (ort_incremental.py `_stacked`:
   * up to min(images, ROWS_PER_CALL) images, at least one batch), each side tensor repeated once per row of
   * the chunk; logits per row. */
  private async stacked(rows: Typed[], like: Tensor, images: number, sides: Record<string, Tensor>,
                        run: (t: Tensor, tiled: Record<string, Tensor>) => Promise<Tensor>): Promise<Float32Array[]> {
    const bsz = like.dims[0], per = rows.length ? rows[0].length : 0;
    const step = Math.max(1, Math.floor(Math.min(images, ROWS_PER_CALL) / bsz)); // rows per call
    const out: Float32Array[] = [];
    for (let s = 0; s < rows.length; s += step) {
      const chunk = rows.slice(s, s + step);
      const flat = new (rows[0].constructor as new (n: number) => Typed)(chunk.length * per);
      chunk.forEach((r, j) => flat.set(r as any, j * per));
      const tiled: Record<string, Tensor> = {};
      for (const [name, v] of Object.entries(sides)) {
        const d = v.data as Typed, rep = new (d.constructor as new (n: number) => Typed)(chunk.length * d.length);
        for (let j = 0; j < chunk.length; j++) rep.set(d as any, j * d.length);
        tiled[name] = new this.Tensor(v.type, rep, [chunk.length * v.dims[0], ...v.dims.slice(1)]);
      }
      const t = await run(new this.Tensor(like.type, flat, [chunk.length * bsz, ...like.dims.slice(1)]), tiled);
      const z = t.data as Float32Array, n = z.length / chunk.length;
      for (let j = 0; j < chunk.length; j++) out.push(z.subarray(j * n, (j + 1) * n));
    }
    return out;
  }
}
