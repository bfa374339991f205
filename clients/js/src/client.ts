/**
 * The BAFFLE client round (baffle_edge/client.py + runtimes/onnxruntime_runtime.py) on ONNX
 * Runtime's JavaScript API. The runtime is injected: an `InferenceSession` and the `Tensor` class
 * of onnxruntime-node, onnxruntime-web or onnxruntime-react-native, so one code path serves all.
 *
 *     for each local step s:
 *         losses = [L(w)] + [L(w + delta_k) for k < K]        (central: L(w + d_k) ..., L(w - d_k) ...)
 *         if more steps follow (FedAvg): w -= local_lr * clip(stein estimate)   (same noise, k' = s*K + k)
 *     return ClientReport(losses, base losses, sample count, seconds)
 *
 * Float domain: feed w + float32(sigma) * eps in float32. int8-step domain: feed the integers of
 * docs/quantized-perturbation.md (StepSelector). Losses: mean softmax cross-entropy in float64,
 * bit for bit as docs/noise.md section 7 specifies (fdlibm exp/log, numpy's pairwise order).
 */
import type { InferenceSession, Tensor } from "onnxruntime-common";
import { blockStep } from "./block_round.js";
import { BlockError, BlockTable, checkBlockWeights } from "./blocks.js";
import type { Bundle, TrainFormat } from "./bundle.js";
import { clipInf, leaveOneOut, lossDifferences, pairwiseSum } from "./estimator.js";
import { exp, log } from "./libm.js";
import { negativeSigns, noise, words, type NoiseKind } from "./noise.js";
import { lossesPerStep, noiseClient, parseTask, ProtocolError, type ClientReport, type RoundTask } from "./protocol.js";
import { quantize, steps, StepSelector, type IntArray, type QTensor } from "./quant.js";
import { checkPlan, SegmentForward, segmentRoles } from "./segments.js";
import { sha256Hex } from "./sha256.js";

/** One local step's data: inputs (n x C x H x W, float32, normalised as baffle.json says) and labels. */
export interface Batch { x: Float32Array; y: ArrayLike<number> }

/** The Tensor constructor of the ORT package in use (its `Tensor` export). */
export type TensorConstructor = new (type: "float32" | "int8" | "int32" | "uint8",
                                     data: Float32Array | Int8Array | Int32Array | Uint8Array, dims: readonly number[]) => Tensor;

/** Opens an ORT session of a verified graph (the block-noise segments; RoundSession.open passes its own). */
export type SessionFactory = (model: Uint8Array) => Promise<InferenceSession>;

/** What `onnxruntime-node` / `-web` / `-react-native` export that the client needs. */
export interface OrtModule {
  InferenceSession: { create(model: Uint8Array, options?: InferenceSession.SessionOptions): Promise<InferenceSession> };
  Tensor: unknown;
}

export interface RunOptions {
  /** FedAvg local step size; default: the task's local_lr (protocol 2), else 0. */
  localLr?: number;
  /** inf-norm clip of each local estimate, null = off; default: the task's clip, else 0.3 (client.run_task). */
  clip?: number | null;
  /** Check that sha256(weights) starts with the task's model_version (default true; skipped if it is ""). */
  checkModelVersion?: boolean;
  /** Recorded in the report (default "onnxruntime-js" / "onnxruntime-int8-js"). */
  runtime?: string;
  /**
   * An int8-step session's integers of the task's weights, table order (a lean download, lean.ts,
   * already checked against the offer's sha256), in place of the float weights (pass `null`): only for
   * one local step, since later steps of FedAvg move float weights.
   */
  integers?: IntArray[];
}

/** The float32 weights as the server hashes them: sha256 of the little-endian bytes, 16 hex digits. */
export function modelVersion(weights: Float32Array): string {
  const bytes = new Uint8Array(weights.length * 4);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < weights.length; i++) view.setFloat32(4 * i, weights[i], true);
  return sha256Hex(bytes).slice(0, 16);
}

/**
 * Mean softmax cross-entropy of row-major logits (n x classes), in float64: the loss of
 * docs/noise.md section 7 (first maximum, fdlibm's exp/log from libm.ts, pairwise sums), the same
 * bits as the Python client's `client.cross_entropies` and in every JS engine.
 */
export function crossEntropy(logits: Float32Array, labels: ArrayLike<number>, classes: number): number {
  const n = labels.length;
  const picked = new Float64Array(n);
  const e = new Float64Array(classes);
  for (let b = 0; b < n; b++) {
    const row = b * classes;
    let m = -Infinity;
    for (let j = 0; j < classes; j++) if (logits[row + j] > m || Number.isNaN(logits[row + j])) m = logits[row + j];
    for (let j = 0; j < classes; j++) e[j] = exp(logits[row + j] - m);
    picked[b] = (logits[row + labels[b]] - m) - log(pairwiseSum(e));
  }
  return -(pairwiseSum(picked) / n);
}

/**
 * A bundle's train graph loaded in an ORT session, ready to evaluate perturbed losses.
 * `RoundSession.open(ort, bundle, "onnx-int8")` creates the session from the verified bytes.
 */
export class RoundSession {
  readonly dim: number;
  readonly domain: "float" | "int8-step";
  readonly table: QTensor[] | null;
  /** How block-noise rows run: "auto" (the bundle's segment graphs when it has them, else full forwards) or "dense". */
  blockRows: "auto" | "dense" = "auto";
  /** Why block rows run as full forwards (null: segments, or not decided yet). */
  blockRowsReason: string | null = null;
  private blocks: BlockTable | null = null;
  private segments: Promise<SegmentForward | null> | null = null;

  constructor(readonly session: InferenceSession, readonly Tensor: TensorConstructor, readonly bundle: Bundle,
              readonly format: TrainFormat, readonly createSession?: SessionFactory) {
    this.dim = bundle.dim;
    const domain = bundle.domain(format);
    if (domain !== "float" && domain !== "int8-step") throw new Error(`format ${format}: unknown domain ${domain}`);
    this.domain = domain;
    this.table = domain === "int8-step" ? bundle.quantTable(format) : null;
    const inputs = new Set(session.inputNames);
    const need = [bundle.inputName, ...(this.table ? this.table.map((t) => t.input) : bundle.parameters.map((p) => p.name))];
    const missing = need.filter((n) => !inputs.has(n));
    if (missing.length) throw new Error(`the ${format} session lacks inputs ${missing.join(", ")}: is it the bundle's train graph?`);
  }

  static async open(ort: OrtModule, bundle: Bundle, format: TrainFormat,
                    options: InferenceSession.SessionOptions = {}): Promise<RoundSession> {
    const session = await ort.InferenceSession.create(bundle.trainGraph(format), options);
    return new RoundSession(session, ort.Tensor as TensorConstructor, bundle, format,
                            (model) => ort.InferenceSession.create(model, options));
  }

  /** The block partition of the bundle's parameters (docs/noise.md section 8), built at the first block task. */
  blockTable(): BlockTable {
    this.blocks ??= BlockTable.fromParameters(this.bundle.parameters);
    return this.blocks;
  }

  /** The segment forward of the bundle's block graphs, opened at the first block task; null: rows run as full forwards. */
  segmentForward(): Promise<SegmentForward | null> {
    if (this.blockRows === "dense") {
      this.blockRowsReason = "blockRows = \"dense\"";
      return Promise.resolve(null);
    }
    this.segments ??= this.openSegments();
    return this.segments;
  }

  private async openSegments(): Promise<SegmentForward | null> {
    const entry = this.bundle.format(this.format) as Record<string, unknown>;
    if (!entry.blocks) {
      this.blockRowsReason = String(entry.blocks_unsupported ?? "the bundle has no block graphs (export it with this version of baffle-edge)");
      return null;
    }
    const kind = (entry.blocks as { kind?: unknown }).kind ?? "chain";
    if (kind !== "chain" && kind !== "graph") { // a plan of a later exporter: same losses, each row a whole forward
      this.blockRowsReason = `the bundle's block plan is of kind ${JSON.stringify(kind)}; this client runs chain and ` +
        "graph plans, so block rows run as full forwards (same losses, each row a whole forward)";
      return null;
    }
    if (!this.createSession) {
      throw new BlockError("block noise through the bundle's segment graphs needs a session factory: open the session with " +
        "RoundSession.open(ort, ...) or pass createSession to the constructor (or set blockRows = \"dense\")");
    }
    const inputs = new Map((this.table ?? []).map((t) => [t.name, t.input]));
    const plan = checkPlan(entry.blocks, this.blockTable(), (n) => inputs.get(n) ?? n);
    const files = entry.files as Record<string, string>;
    const graph = (role: string) => {
      if (!files[role]) throw new BlockError(`baffle.json: formats.${this.format} has a blocks plan but no ${role} file`);
      return this.bundle.file(files[role]);
    };
    const roles = segmentRoles(plan), open = this.createSession;
    const sessions = {
      cache: await open(graph("block_cache")),
      modules: await Promise.all(roles.modules.map((r) => open(graph(r)))),
      rests: await Promise.all(roles.rests.map((r) => (r === null ? null : open(graph(r))))),
    };
    return new SegmentForward(plan, sessions, this.blockTable(), this.Tensor as never);
  }

  get runtimeName(): string {
    return this.domain === "int8-step" ? "onnxruntime-int8-js" : "onnxruntime-js";
  }

  /** Logits (n x classes) at the given parameter feeds. */
  async forward(x: Tensor, feeds: Record<string, Tensor>): Promise<Float32Array> {
    const out = await this.session.run({ [this.bundle.inputName]: x, ...feeds }, [this.bundle.outputName]);
    return out[this.bundle.outputName].data as Float32Array;
  }
}

function checkIntegers(task: RoundTask, q: IntArray[], rs: RoundSession): void {
  const table = rs.table;
  if (!table) throw new ProtocolError("integers", `the ${rs.format} session runs float weights, not integers`);
  if (task.local_steps !== 1) throw new ProtocolError("integers", `integers answer one local step, the task has ${task.local_steps}`);
  if (q.length !== table.length) throw new ProtocolError("integers", `${q.length} tensors, the quantization table has ${table.length}`);
  table.forEach((t, j) => {
    const a = q[j];
    if (!(t.dtype === "int8" ? a instanceof Int8Array : a instanceof Int32Array) || a.length !== t.size) {
      throw new ProtocolError("integers", `${t.name}: expected ${t.size} ${t.dtype} values`);
    }
    for (let i = 0; i < a.length; i++) {
      if (a[i] > t.qmax || a[i] < -t.qmax) throw new ProtocolError("integers", `${t.name}: ${a[i]} at ${i} outside [-${t.qmax}, ${t.qmax}]`);
    }
  });
}

function checkInputs(task: RoundTask, weights: Float32Array | null, batches: Batch[], rs: RoundSession): void {
  if (task.domain !== rs.domain) {
    throw new ProtocolError("domain", `the ${rs.format} session perturbs in the ${rs.domain} domain; the task asks for ${task.domain}`);
  }
  if (rs.domain === "int8-step" && task.noise === "gaussian") {
    throw new ProtocolError("noise", `int8-step perturbations move integers by whole steps: they need noise "rademacher" or "block", task has ${task.noise}`);
  }
  if (task.noise === "block") {
    const table = rs.blockTable();
    if (task.block_weights) {
      try { checkBlockWeights(task.block_weights, table.modules); } catch (e) { throw new ProtocolError("block_weights", (e as Error).message.replace(/^block_weights: /, "")); }
      table.weighted(task.block_weights);  // a total draw weight this client cannot draw exactly is refused here
    }
  }
  if (weights) {
    if (weights.length !== rs.dim) throw new ProtocolError("weights", `expected ${rs.dim} values, got ${weights.length}`);
    for (let i = 0; i < weights.length; i++) {
      if (!Number.isFinite(weights[i])) throw new ProtocolError("weights", `non-finite value at index ${i}`);
    }
  }
  if (batches.length !== task.local_steps) {
    throw new ProtocolError("batches", `task has ${task.local_steps} local step(s) but ${batches.length} batch(es) were given`);
  }
  const per = rs.bundle.inputShape.reduce((a, b) => a * b, 1);
  batches.forEach((b, s) => {
    const n = b.y.length;
    if (n === 0 || b.x.length !== n * per) {
      throw new ProtocolError("batch", `step ${s}: ${b.x.length} input values for ${n} labels (expected ${n} x ${rs.bundle.inputShape.join(" x ")})`);
    }
    for (let i = 0; i < n; i++) {
      if (!Number.isInteger(b.y[i]) || b.y[i] < 0 || b.y[i] >= rs.bundle.numClasses) {
        throw new ProtocolError("batch", `step ${s}: label ${b.y[i]} at ${i} outside [0, ${rs.bundle.numClasses})`);
      }
    }
    for (let i = 0; i < b.x.length; i++) if (!Number.isFinite(b.x[i])) throw new ProtocolError("batch", `step ${s}: non-finite input at ${i}`);
  });
}

/** Per-step state: the feeds of the unperturbed and perturbed weights, rebuilt when w changes. */
interface Feeder {
  base(): Record<string, Tensor>;
  perturbed(k: number, sign: 1 | -1): Record<string, Tensor>;
  /** float64 Stein estimate of this step from its loss differences (client.step_gradient), clipped. */
  gradient(diffs: Float64Array, clip: number | null): Float64Array;
}

function floatFeeder(task: RoundTask, rs: RoundSession, w: Float32Array, step: number): Feeder {
  const bufs = rs.bundle.parameters.map((p) => new Float32Array(p.size));
  const tensors = Object.fromEntries(rs.bundle.parameters.map((p, j) => [p.name, new rs.Tensor("float32", bufs[j], p.shape)]));
  const sigma32 = Math.fround(task.sigma), c = noiseClient(task), k0 = step * task.k;
  let cachedK = -1, eps: Float32Array = new Float32Array(0);
  const epsOf = (k: number) => {
    if (k !== cachedK) { eps = noise(task.seed, task.round, c, k0 + k, rs.dim, task.noise as NoiseKind); cachedK = k; }
    return eps;
  };
  return {
    base() {
      rs.bundle.parameters.forEach((p, j) => bufs[j].set(w.subarray(p.offset, p.offset + p.size)));
      return tensors;
    },
    perturbed(k, sign) {
      const e = epsOf(k);
      rs.bundle.parameters.forEach((p, j) => {
        const b = bufs[j], o = p.offset;
        for (let i = 0; i < p.size; i++) b[i] = w[o + i] + sign * Math.fround(sigma32 * e[o + i]);
      });
      return tensors;
    },
    gradient(diffs, clip) {
      const g = new Float64Array(rs.dim);
      diffs.forEach((dl, k) => {
        if (dl === 0) return;
        const e = noise(task.seed, task.round, c, k0 + k, rs.dim, task.noise as NoiseKind);
        for (let i = 0; i < g.length; i++) g[i] += dl * e[i];
      });
      for (let i = 0; i < g.length; i++) g[i] = g[i] / diffs.length / task.sigma;
      return clipInf(g, clip);
    },
  };
}

function int8Feeder(task: RoundTask, rs: RoundSession, q: IntArray[], step: number): Feeder {
  const table = rs.table!;
  const sel = new StepSelector(table, q);
  const tensorsOf = (arrays: IntArray[]) =>
    Object.fromEntries(table.map((t, j) => [t.input, new rs.Tensor(t.dtype, arrays[j], t.shape)]));
  const baseTensors = tensorsOf(q), outTensors = tensorsOf(sel.out);
  const c = noiseClient(task), k0 = step * task.k;
  const mask = new Uint8Array(rs.dim);
  let cachedK = -1;
  const maskOf = (k: number) => {
    if (k !== cachedK) { negativeSigns(task.seed, task.round, c, k0 + k, rs.dim, mask); cachedK = k; }
    return mask;
  };
  const nWords = Math.ceil(rs.dim / 32), wbuf = new Uint32Array(nWords);
  let wordsK = -1;
  return {
    base: () => baseTensors,
    perturbed(k, sign) {
      if (k !== wordsK) { words(task.seed, task.round, c, k0 + k, nWords, 0, wbuf); wordsK = k; }
      sel.selectWords(wbuf, sign);
      return outTensors;
    },
    gradient(diffs, clip) {
      const g = new Float64Array(rs.dim), eff = new Float64Array(rs.dim);
      const central = task.scheme === "central";
      diffs.forEach((dl, k) => {
        if (dl === 0) return;
        sel.effectiveNoise(maskOf(k), central, eff);
        for (let i = 0; i < g.length; i++) g[i] += dl * eff[i];
      });
      const st = steps(table, rs.dim);
      if (task.estimator === "per-step") {
        for (let i = 0; i < g.length; i++) g[i] = g[i] / diffs.length / st[i];
      } else {
        for (let i = 0; i < st.length; i++) st[i] = st[i] * st[i];
        const rms = Math.sqrt(pairwiseSum(st) / st.length);
        for (let i = 0; i < g.length; i++) g[i] = g[i] / diffs.length / rms;
      }
      return clipInf(g, clip);
    },
  };
}

/**
 * Run `task` at `weights` on `batches` (one per local step) and return the report to upload.
 * Throws (and sends nothing) on a bad task, weights of another model version, a batch of the
 * wrong shape, or non-finite losses.
 */
export async function runTask(taskInput: RoundTask | string, weights: Float32Array | null, batches: Batch[],
                              rs: RoundSession, options: RunOptions = {}): Promise<ClientReport> {
  const start = performance.now();
  const task = parseTask(taskInput);
  if (!weights && !options.integers) throw new ProtocolError("weights", "runTask needs the weights or, for an int8 session, options.integers");
  if (options.integers) checkIntegers(task, options.integers, rs);
  checkInputs(task, weights, batches, rs);
  if (weights && !options.integers && (options.checkModelVersion ?? true) && task.model_version !== "") {
    const got = modelVersion(weights);
    if (got !== task.model_version) {
      throw new ProtocolError("model_version", `the weights hash to ${got}, the task is for model ${task.model_version}: ` +
        "refusing to compute losses at other weights");
    }
  }
  const localLr = options.localLr ?? task.local_lr ?? 0;
  const clip = options.clip !== undefined ? options.clip : task.clip !== undefined ? task.clip : 0.3;
  const central = task.scheme === "central";
  const classes = rs.bundle.numClasses, per = rs.bundle.inputShape;
  let w = weights ? Float32Array.from(weights) : new Float32Array(0);  // with integers: unread (one int8 step)
  const integersOf = (step: number) => (step === 0 && options.integers ? options.integers : rs.table!.map((t) => quantize(t, w)));
  const bases: number[] = [], losses: number[] = [];
  for (let s = 0; s < batches.length; s++) {
    const b = batches[s];
    const x = new rs.Tensor("float32", b.x, [b.y.length, ...per]);
    let base: number | null, pert: number[], feed: Pick<Feeder, "gradient">;
    if (task.noise === "block") {  // one output-channel block per row (docs/noise.md sections 8-11)
      const bs = await blockStep(task, rs, w, rs.table ? integersOf(s) : null, s, x, (z) => crossEntropy(z, b.y, classes));
      [base, pert, feed] = [bs.base, bs.losses, bs];
    } else {
      const f = rs.domain === "float" ? floatFeeder(task, rs, w, s) : int8Feeder(task, rs, integersOf(s), s);
      const loss = async (feeds: Record<string, Tensor>) => crossEntropy(await rs.forward(x, feeds), b.y, classes);
      base = central ? null : await loss(f.base());
      const plus: number[] = [], minus: number[] = [];
      for (let k = 0; k < task.k; k++) {
        plus.push(await loss(f.perturbed(k, 1)));
        if (central) minus.push(await loss(f.perturbed(k, -1)));
      }
      [pert, feed] = [plus.concat(minus), f];
    }
    const bad = [base ?? 0, ...pert].findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) throw new Error(`runtime ${rs.runtimeName} produced a non-finite loss in step ${s}`);
    if (base !== null) bases.push(base);
    losses.push(...pert);
    if (s + 1 < batches.length) {
      let diffs = lossDifferences(pert, base, central);
      if (task.baseline === "leave-one-out") diffs = leaveOneOut(diffs);
      const g = feed.gradient(diffs, clip);
      const lr = Math.fround(localLr);
      const next = new Float32Array(w.length);
      for (let i = 0; i < w.length; i++) next[i] = w[i] - Math.fround(lr * Math.fround(g[i]));
      w = next;
    }
  }
  return {
    version: task.version, round: task.round, client: task.client, losses, base_losses: bases,
    num_samples: batches.reduce((n, b) => n + b.y.length, 0), model_version: task.model_version,
    runtime: options.runtime ?? rs.runtimeName, seconds: (performance.now() - start) / 1000,
  };
}
