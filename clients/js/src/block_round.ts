/**
 * One local step of a block-noise task (baffle_edge/client.py `block_losses`, rows.py `step_gradient`):
 * the K drawn blocks of the step (k' = step * K + k), each row's block values
 *
 *     float:      float32(w[i] + sign * float32(float32(sigma) * eps_b[i]))
 *     int8-step:  the block's integers moved by sign * multiplier * m_b * u_i, frozen near the bounds (FlatSteps)
 *
 * evaluated through the bundle's segment graphs (SegmentForward) or, for a bundle without them, as
 * dense full forwards of the train graph (the same losses, each row a whole forward), then the
 * losses in the order base, plus..., minus... and the step's gradient estimate for FedAvg.
 */
import type { Tensor } from "onnxruntime-common";
import { BlockError, FlatSteps, type BlockTable } from "./blocks.js";
import type { RoundSession } from "./client.js";
import { clipInf, pairwiseSum } from "./estimator.js";
import { noiseClient, type RoundTask } from "./protocol.js";
import { steps as stepSizes, type IntArray } from "./quant.js";

export interface BlockStep {
  base: number | null; // L(w) (forward scheme)
  losses: number[]; // plus..., minus...
  gradient(diffs: Float64Array, clip: number | null): Float64Array;
}

type Loss = (logits: Float32Array) => number;

/** The drawn blocks and values of one step. */
function drawStep(task: RoundTask, table: BlockTable, step: number, int8: boolean) {
  const c = noiseClient(task), k0 = step * task.k;
  const blocks = new Int32Array(task.k);
  const values: (Float32Array | Int32Array)[] = new Array(task.k);
  for (let k = 0; k < task.k; k++) {
    const d = int8 ? table.drawSteps(task.seed, task.round, c, k0 + k) : table.draw(task.seed, task.round, c, k0 + k);
    blocks[k] = d.block;
    values[k] = d.values;
  }
  return { blocks, values };
}

/** One block step at float weights `w` (float session) or integers `q` (int8-step: `w` is not read). */
export async function blockStep(task: RoundTask, rs: RoundSession, w: Float32Array, q: IntArray[] | null, step: number,
                                x: Tensor, loss: Loss): Promise<BlockStep> {
  const table = rs.blockTable().forTask(task);
  const int8 = rs.domain === "int8-step";
  const central = task.scheme === "central";
  const { blocks, values } = drawStep(task, table, step, int8);
  if (int8 !== (q !== null)) throw new BlockError(`an ${rs.domain} block step needs ${int8 ? "integers" : "float weights"}`);
  const flat = q ? new FlatSteps(rs.table!, q) : null;
  const sigma32 = Math.fround(task.sigma);
  const moved = (sign: 1 | -1): Float64Array[] => values.map((v, k) => {
    const at = table.bounds[blocks[k]], out = new Float64Array(v.length);
    for (let i = 0; i < v.length; i++) {
      const p = table.index[at + i];
      out[i] = flat ? flat.moved(p, v[i], sign) : Math.fround(w[p] + sign * Math.fround(sigma32 * v[i]));
    }
    return out;
  });
  const baseFeeds = feedsOf(rs, w, q);
  const fwd = await rs.segmentForward();
  let base: number | null = null;
  const losses: number[] = [];
  if (fwd) {
    const z = await fwd.cache(x, baseFeeds);
    if (!central) base = loss(z);
    for (const sign of central ? [1, -1] as const : [1] as const) {
      for (const z of await fwd.logits(blocks, moved(sign))) losses.push(loss(z));
    }
  } else {  // no segment graphs: every row is a full forward at its dense weights (client.weight_set_losses)
    if (!central) base = loss(await rs.forward(x, baseFeeds));
    const plus: number[] = [], minus: number[] = [];
    const rows = central ? [moved(1), moved(-1)] : [moved(1)];
    for (let k = 0; k < task.k; k++) {
      plus.push(loss(await rs.forward(x, denseFeeds(rs, table, w, q, blocks[k], rows[0][k], sigma32, 1, values[k]))));
      if (central) minus.push(loss(await rs.forward(x, denseFeeds(rs, table, w, q, blocks[k], rows[1][k], sigma32, -1, values[k]))));
    }
    losses.push(...plus, ...minus);
  }
  return { base, losses, gradient: (diffs, clip) => gradient(task, rs, table, blocks, values, flat, diffs, clip) };
}

/** The train graph's (and the segments') parameter feeds at the unperturbed weights. */
function feedsOf(rs: RoundSession, w: Float32Array, q: IntArray[] | null): Record<string, Tensor> {
  if (q) return Object.fromEntries(rs.table!.map((t, j) => [t.input, new rs.Tensor(t.dtype, q[j], t.shape)]));
  return Object.fromEntries(rs.bundle.parameters.map((p) => [p.name, new rs.Tensor("float32", w.slice(p.offset, p.offset + p.size), p.shape)]));
}

/** A row's dense weights: float w + sign * float32(sigma) * eps over every parameter (eps 0 outside the block), or q moved. */
function denseFeeds(rs: RoundSession, table: BlockTable, w: Float32Array, q: IntArray[] | null, block: number,
                    moved: Float64Array, sigma32: number, sign: 1 | -1, eps: ArrayLike<number>): Record<string, Tensor> {
  const at = table.bounds[block];
  if (q) {
    const flat = new Float64Array(rs.dim);
    rs.table!.forEach((t, j) => flat.set(q[j], t.offset));
    for (let i = 0; i < moved.length; i++) flat[table.index[at + i]] = moved[i];
    return Object.fromEntries(rs.table!.map((t) => [t.input, new rs.Tensor(t.dtype,
      t.dtype === "int8" ? Int8Array.from(flat.subarray(t.offset, t.offset + t.size)) : Int32Array.from(flat.subarray(t.offset, t.offset + t.size)), t.shape)]));
  }
  const dense = new Float32Array(rs.dim);
  for (let i = 0; i < eps.length; i++) dense[table.index[at + i]] = eps[i];
  const out = new Float32Array(rs.dim);
  for (let i = 0; i < out.length; i++) out[i] = w[i] + sign * Math.fround(sigma32 * dense[i]);
  return Object.fromEntries(rs.bundle.parameters.map((p) => [p.name, new rs.Tensor("float32", out.slice(p.offset, p.offset + p.size), p.shape)]));
}

/** The step's clipped estimate (rows.step_gradient for block noise), sparse over the drawn blocks. */
function gradient(task: RoundTask, rs: RoundSession, table: BlockTable, blocks: Int32Array, values: (Float32Array | Int32Array)[],
                  flat: FlatSteps | null, diffs: Float64Array, clip: number | null): Float64Array {
  const g = new Float64Array(rs.dim), K = diffs.length, central = task.scheme === "central";
  for (let k = 0; k < K; k++) {
    const coef = diffs[k] / K, b = blocks[k], at = table.bounds[b], v = values[k], sw = table.stepWeight[b];
    for (let i = 0; i < v.length; i++) {
      const p = table.index[at + i];
      g[p] += (flat ? flat.effective(p, v[i], central) * sw : v[i]) * coef;
    }
  }
  if (!flat) {
    for (let i = 0; i < g.length; i++) g[i] /= task.sigma;
  } else {
    const st = stepSizes(rs.table!, rs.dim);
    if (task.estimator === "per-step") {
      for (let i = 0; i < g.length; i++) g[i] /= st[i];
    } else {
      for (let i = 0; i < st.length; i++) st[i] = st[i] * st[i];
      const rms = Math.sqrt(pairwiseSum(st) / st.length);
      for (let i = 0; i < g.length; i++) g[i] /= rms;
    }
  }
  return clipInf(g, clip);
}

export { BlockError };
