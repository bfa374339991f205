/**
 * Block noise (src/blocks.ts, src/segments.ts, src/block_round.ts) against the conformance kit: the
 * block draws (size, weighted, W > 2^32), the int8 steps and decoder weights, the block-table edge
 * cases and the int8 freeze rule bit for bit; block rounds through the segment graphs equal dense full
 * forwards; a block task this client cannot run is a clear error, never a wrong loss.
 */
import assert from "node:assert/strict";
import { before, test } from "node:test";
import * as ort from "onnxruntime-node";
import { BlockError, BlockTable, FlatSteps } from "../src/blocks.js";
import { Bundle, RoundSession, runTask, stringifyJson, type TrainFormat } from "../src/index.js";
import { kitSessions, readKit, roundInputs, runKitRound, type Kit } from "../src/kit.js";
import type { QTensor } from "../src/quant.js";
import { f32hex, f64hex, kitDir } from "./helpers.js";

let kit: Kit;
let sessions: Record<TrainFormat, RoundSession>;
// eslint-disable-next-line @typescript-eslint/no-explicit-any
let v: any;

before(async () => {
  kit = await readKit(kitDir());
  sessions = await kitSessions(kit, ort, 1);
  v = kit.index.noise.block;
});

function f32leHex(a: Float32Array): string[] {
  return Array.from(a, f32hex);
}

async function sha(a: Float32Array): Promise<string> {
  const { sha256Hex } = await import("../src/sha256.js");
  const b = new Uint8Array(a.length * 4), dv = new DataView(b.buffer);
  a.forEach((x, i) => dv.setFloat32(4 * i, x, true));
  return sha256Hex(b);
}

const signs = (a: Int32Array) => Array.from(a, (x) => (x < 0 ? "-" : "+")).join("");

test("block draws (docs/noise.md section 8): block, row, scale and values bit for bit", async () => {
  const table = BlockTable.fromParameters(v.parameters);
  assert.deepEqual(table.modules.map((m, i) => ({ module: m, blocks: table.module.filter((x) => x === i).length,
    block_size: table.sizes[table.module.indexOf(i)] })), v.modules);
  assert.ok(v.draws.length >= 13);
  for (const d of v.draws) {
    const { block, values } = table.draw(d.seed, d.round, d.client, d.k);
    const at = table.bounds[block];
    assert.deepEqual([block, table.modules[table.module[block]], table.row[block], values.length, table.index[at],
      table.index[at + values.length - 1], f32hex(table.scale[block])],
    [d.block, d.module, d.row, d.size, d.first_index, d.last_index, d.scale], d.what);
    assert.deepEqual(f32leHex(values.subarray(0, 4)), d.values_head, d.what);
    assert.equal(f32hex(values[values.length - 1]), d.values_last, d.what);
    assert.equal(await sha(values), d.sha256_f32le, d.what);
  }
});

test("int8-step block draws (section 10): m_b, w_b and every sign", () => {
  const table = BlockTable.fromParameters(v.parameters);
  for (const d of v.int8_step_draws) {
    const { block, values } = table.drawSteps(d.seed, d.round, d.client, d.k);
    assert.deepEqual([block, table.steps[block], table.stepWeight[block], signs(values)], [d.block, d.steps, d.step_weight, d.signs], d.what);
    assert.ok(values.every((x) => Math.abs(x) === d.steps));
  }
});

test("weighted draws (section 11), one set with total weight W > 2^32: r needs 64-bit arithmetic", async () => {
  const table = BlockTable.fromParameters(v.parameters);
  const big = v.weighted_draws.filter((d: { total_weight: number }) => d.total_weight > 2 ** 32);
  assert.ok(big.length >= 10, "the kit has draws with W > 2^32");
  let doublesWrong = 0;
  for (const d of v.weighted_draws) {
    const t = table.weighted(d.block_weights);
    assert.equal(Number(t.drawTotal), d.total_weight);
    const f = t.draw(d.seed, d.round, d.client, d.k), s = t.drawSteps(d.seed, d.round, d.client, d.k);
    assert.deepEqual([f.block, s.block, f32hex(t.scale[f.block]), t.steps[f.block], t.stepWeight[f.block], signs(s.values)],
      [d.block, d.block, d.scale, d.steps, d.step_weight, d.signs], `${d.what} ${d.block_weights}`);
    assert.deepEqual(f32leHex(f.values.subarray(0, 4)), d.values_head);
    assert.equal(await sha(f.values), d.sha256_f32le);
    const { words } = await import("../src/noise.js");
    const w = words(d.seed, d.round, d.client, d.k, 2);
    if ((w[1] * 2 ** 32 + w[0]) % d.total_weight !== d.r) doublesWrong++;  // the pitfall: r in doubles
  }
  assert.ok(doublesWrong > 0, "some vector catches r computed in doubles");
  assert.throws(() => table.weighted([1, 2]), /block_weights: expected 3 integers in \[1, 2\^32\) \(modules \["features.0","features.4","fc"\]\)/);
  assert.throws(() => table.weighted([1, 0, 1]), BlockError);
  assert.throws(() => table.weighted([1, 2 ** 32, 1]), BlockError);
});

test("block-table edge cases: a name without a dot, non-adjacent tensors of one module, disagreeing first dims", () => {
  for (const t of v.tables) {
    if (t.error) {
      assert.throws(() => BlockTable.fromParameters(t.parameters), new RegExp(t.error), t.what);
      continue;
    }
    const table = BlockTable.fromParameters(t.parameters);
    assert.deepEqual(table.modules, t.modules, t.what);
    const got = Array.from(table.sizes, (_, b) => ({ module: table.modules[table.module[b]], row: table.row[b],
      index: Array.from(table.index.subarray(table.bounds[b], table.bounds[b + 1])), steps: table.steps[b], scale: f32hex(table.scale[b]) }));
    assert.deepEqual(got, t.blocks, t.what);
  }
});

test("the int8 freeze rule: q', frozen coordinates and eps_eff (int32 biases without overflow)", () => {
  assert.ok(v.freeze.length >= 3);
  for (const c of v.freeze) {
    const t: QTensor = { name: "t", input: "t", offset: 0, shape: [c.q.length], dtype: c.dtype, axis: 0, scale: c.q.map(() => 1),
      multiplier: c.multiplier, qmax: c.hi, lo: c.lo, hi: c.hi, size: c.q.length };
    const q = c.dtype === "int8" ? Int8Array.from(c.q) : Int32Array.from(c.q);
    const f = new FlatSteps([t], [q]);
    const idx = c.q.map((_: number, i: number) => i);
    assert.deepEqual(idx.map((i: number) => f.moved(i, c.steps[i], 1)), c.moved_plus, c.what);
    assert.deepEqual(idx.map((i: number) => f.moved(i, c.steps[i], -1)), c.moved_minus, c.what);
    assert.deepEqual(idx.map((i: number) => f.moved(i, c.steps[i], 1) === c.q[i]), c.frozen, c.what);
    assert.deepEqual(idx.map((i: number) => f.effective(i, c.steps[i], false)), c.eps_eff_forward, c.what);
    assert.deepEqual(idx.map((i: number) => f.effective(i, c.steps[i], true)), c.eps_eff_central, c.what);
  }
  assert.ok(v.freeze.some((c: { frozen: boolean[] }) => c.frozen.some(Boolean)) && v.freeze.some((c: { dtype: string }) => c.dtype === "int32"));
});

test("block rounds through the segment graphs equal dense full forwards (int8 bit for bit, fp32 within the kit tolerance)", async () => {
  const blockRounds = kit.rounds.filter((r) => r.task.noise === "block");
  assert.ok(blockRounds.some((r) => r.format === "onnx") && blockRounds.some((r) => r.format === "onnx-int8"));
  for (const fmt of ["onnx", "onnx-int8"] as const) {
    const dense = await RoundSession.open(ort, kit.bundle, fmt, { intraOpNumThreads: 1 });
    dense.blockRows = "dense";
    for (const r of blockRounds.filter((x) => x.format === fmt && Number(x.task.k) <= 100)) {
      const a = await runKitRound(kit, r, sessions[fmt]), b = await runKitRound(kit, r, dense);
      assert.equal(sessions[fmt].blockRowsReason, null, "the kit bundle has segment graphs");
      const ga = [...a.base_losses, ...a.losses], gb = [...b.base_losses, ...b.losses];
      if (fmt === "onnx-int8") assert.deepEqual(ga.map(f64hex), gb.map(f64hex), r.name);
      else assert.ok(ga.every((x, i) => Math.abs(x - gb[i]) <= 1e-6 * Math.abs(gb[i])), r.name);
    }
    assert.match(dense.blockRowsReason ?? "", /dense/);
  }
});

test("a block task this client cannot run is a clear error, never a wrong loss", async () => {
  const r = kit.rounds.find((x) => x.name === "int8-block")!;
  const { weights, batches } = await roundInputs(kit, r);
  const rs = sessions["onnx-int8"];
  const task = (over: Record<string, unknown>) => stringifyJson({ ...r.task, ...over });
  await assert.rejects(runTask(task({ noise: "blocks" }), weights, batches, rs), /noise: "blocks" is not one of \["gaussian","rademacher","block"\]/);
  await assert.rejects(runTask(task({ block_weights: [1, 1] }), weights, batches, rs),
    /block_weights: expected 3 integers in \[1, 2\^32\) \(modules \["features.0","features.4","fc"\]\), got \[1,1\]/);
  await assert.rejects(runTask(task({ block_weights: [1, 0, 1] }), weights, batches, rs), /block_weights: every weight must be an integer in \[1, 2\^32\)/);
  await assert.rejects(runTask(task({ block_weights: [1, 1.5, 1] }), weights, batches, rs), /block_weights: every weight/);
  await assert.rejects(runTask(task({ block_weights: [1, 2 ** 32, 1] }), weights, batches, rs), /block_weights: every weight/);
  await assert.rejects(runTask(task({ block_weights: "1,1,1" }), weights, batches, rs), /block_weights: expected a list/);
  await assert.rejects(runTask(task({ block_weights: [] }), weights, batches, rs), /block_weights: expected a list/);
  await assert.rejects(runTask(task({ noise: "rademacher", block_weights: [1, 1, 1] }), weights, batches, rs), /block_weights: only block noise/);
  await assert.rejects(runTask(task({ max_block_steps: 0 }), weights, batches, rs), /max_block_steps: expected an integer in \[1, 127\], got 0/);
  await assert.rejects(runTask(task({ max_block_steps: 2.5 }), weights, batches, rs), /max_block_steps: expected an integer/);
  await assert.rejects(runTask(task({ max_block_steps: "4" }), weights, batches, rs), /max_block_steps: expected an integer/);
  await assert.rejects(runTask(task({ noise: "rademacher", max_block_steps: 4 }), weights, batches, rs), /max_block_steps: only int8-step block noise/);
  // a bundle whose block plan does not match its parameters
  const meta = JSON.parse(JSON.stringify(kit.bundle.meta, (_k, x) => (typeof x === "bigint" ? Number(x) : x)));
  meta.formats["onnx-int8"].blocks.modules = ["features.0", "fc", "nope"];
  const files = new Map(Object.keys(meta.files).map((n) => [n, kit.bundle.file(n)]));
  const broken = new Bundle(meta, files);
  const bad = new RoundSession(rs.session, ort.Tensor as never, broken, "onnx-int8", (m) => ort.InferenceSession.create(m));
  await assert.rejects(runTask(task({}), weights, batches, bad), /bundle block plan lists modules \["features.0","fc","nope"\]/);
  // a bundle without segment graphs (not a chain): the rows run as full forwards, with the same losses
  const plain = JSON.parse(JSON.stringify(kit.bundle.meta, (_k, x) => (typeof x === "bigint" ? Number(x) : x)));
  delete plain.formats["onnx-int8"].blocks;
  plain.formats["onnx-int8"].blocks_unsupported = "module 'features.4': ops ['GroupNormalization'] between its input and the next module's";
  const chainless = new RoundSession(rs.session, ort.Tensor as never, new Bundle(plain, files), "onnx-int8", (m) => ort.InferenceSession.create(m));
  const small = task({ k: 24 });
  const [viaSegments, viaDense] = [await runTask(small, weights, batches, rs), await runTask(small, weights, batches, chainless)];
  assert.deepEqual(viaDense.losses.map(f64hex), viaSegments.losses.map(f64hex));
  assert.match(chainless.blockRowsReason ?? "", /GroupNormalization/);
  // a plan of a kind this client does not know (a later exporter's) is never guessed at: full forwards, the reason says so
  const other = JSON.parse(JSON.stringify(kit.bundle.meta, (_k, x) => (typeof x === "bigint" ? Number(x) : x)));
  other.formats["onnx-int8"].blocks = { kind: "tree", modules: other.formats["onnx-int8"].blocks.modules };
  const otherPlan = new RoundSession(rs.session, ort.Tensor as never, new Bundle(other, files), "onnx-int8", (m) => ort.InferenceSession.create(m));
  assert.deepEqual((await runTask(small, weights, batches, otherPlan)).losses.map(f64hex), viaSegments.losses.map(f64hex));
  assert.match(otherPlan.blockRowsReason ?? "", /block plan is of kind "tree"; this client runs chain and graph plans/);
  // a malformed graph plan is a clear error (no segments for its modules), never a wrong loss
  const graph = JSON.parse(JSON.stringify(kit.bundle.meta, (_k, x) => (typeof x === "bigint" ? Number(x) : x)));
  graph.formats["onnx-int8"].blocks = { kind: "graph", modules: graph.formats["onnx-int8"].blocks.modules,
    params: graph.formats["onnx-int8"].blocks.params, segments: [] };
  const graphPlan = new RoundSession(rs.session, ort.Tensor as never, new Bundle(graph, files), "onnx-int8", (m) => ort.InferenceSession.create(m));
  await assert.rejects(runTask(small, weights, batches, graphPlan), /the format's graph blocks plan is malformed \(modules, params, input, output, segments\)/);
  // a session without a way to open the segment graphs says so (or runs dense when told)
  const noFactory = new RoundSession(rs.session, ort.Tensor as never, kit.bundle, "onnx-int8");
  await assert.rejects(runTask(task({}), weights, batches, noFactory), /needs a session factory/);
  noFactory.blockRows = "dense";
  const k = Number(r.task.k);
  const report = await runTask(task({ k: 12 }), weights, batches, noFactory);
  assert.equal(report.losses.length, 12);
  assert.ok(k > 12);
});

test("the block-noise modules (and everything index.ts exports) import no Node API: React Native and the browser run them", async () => {
  const { readFile } = await import("node:fs/promises");
  const { PACKAGE_DIR } = await import("./helpers.js");
  const seen = new Set<string>(), todo = ["index.js"];
  while (todo.length) {
    const f = todo.pop()!;
    if (seen.has(f)) continue;
    seen.add(f);
    const text = await readFile(`${PACKAGE_DIR}/dist/src/${f}`, "utf8");
    assert.doesNotMatch(text, /from "node:|require\(|import\("node:/, `${f} imports a Node API`);
    for (const m of text.matchAll(/from "\.\/([\w.]+\.js)"/g)) todo.push(m[1]);
  }
  for (const f of ["blocks.js", "segments.js", "block_round.js", "client.js", "inflate.js", "lean.js"]) assert.ok(seen.has(f), f);
});
