import assert from "node:assert/strict";
import { copyFile, mkdtemp, readdir, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { before, test } from "node:test";
import * as ort from "onnxruntime-node";
import { BundleError, crossEntropy, loadBundle, modelVersion, parseTask, reportToJson, RoundSession, runTask,
  stringifyJson, type TrainFormat } from "../src/index.js";
import { kitSessions, readKit, roundInputs, runKitRound, type Kit } from "../src/kit.js";
import { directorySource } from "../src/node.js";
import { f32hex, f64hex, kitDir, relDiff } from "./helpers.js";

let kit: Kit;
let sessions: Record<TrainFormat, RoundSession>;

before(async () => {
  kit = await readKit(kitDir());
  sessions = await kitSessions(kit, ort, 1);
});

test("the onnxruntime-node binding loads (installed with npm ci --ignore-scripts)", () => {
  assert.ok(ort.listSupportedBackends().some((b) => b.name === "cpu"));
});

test("base logits equal the Python client's bit for bit (fp32 and int8 graphs)", async () => {
  const { weights, batches } = await roundInputs(kit, kit.rounds[0]);
  for (const fmt of ["onnx", "onnx-int8"] as const) {
    const rs = sessions[fmt];
    const b = batches[0];
    const x = new ort.Tensor("float32", b.x, [b.y.length, ...kit.bundle.inputShape]);
    const feeds: Record<string, ort.Tensor> = {};
    if (fmt === "onnx") {
      for (const p of kit.bundle.parameters) feeds[p.name] = new ort.Tensor("float32", weights.slice(p.offset, p.offset + p.size), p.shape);
    } else {
      const { quantize } = await import("../src/quant.js");
      for (const t of rs.table!) feeds[t.input] = new ort.Tensor(t.dtype, quantize(t, weights), t.shape);
    }
    const logits = await rs.forward(x, feeds);
    assert.deepEqual(Array.from(logits, f32hex), kit.index.base_logits.formats[fmt], fmt);
  }
});

test("every kit round: int8 losses identical to the Python client's (float64 bits), fp32 within tolerance, reports the Python side accepts", async () => {
  const tol = kit.index.tolerance;
  assert.equal(tol.int8_losses_relative, 0);
  assert.ok(kit.rounds.length >= 7);
  for (const r of kit.rounds) {
    const report = await runKitRound(kit, r, sessions[r.format]);
    const want = r.report;
    assert.equal(report.losses.length, want.losses.length, r.name);
    assert.equal(report.base_losses.length, want.base_losses.length, r.name);
    const got = [...report.base_losses, ...report.losses], exp = [...want.base_losses, ...want.losses];
    if (r.format === "onnx-int8") {
      assert.deepEqual(got.map(f64hex), exp.map(f64hex), `${r.name}: int8 losses must be bit-identical`);
    } else {
      const worst = Math.max(...got.map((v, i) => relDiff(v, exp[i])));
      assert.ok(worst <= tol.fp32_losses_relative, `${r.name}: max relative loss difference ${worst} > ${tol.fp32_losses_relative}`);
    }
    assert.ok(new Set(report.losses.map((v) => v.toPrecision(12))).size > 2, `${r.name}: the perturbations change the loss`);
    for (const f of ["version", "round", "client", "num_samples", "model_version"] as const) assert.equal(report[f], want[f], `${r.name} ${f}`);
    const json = JSON.parse(reportToJson(report));
    assert.deepEqual(Object.keys(json), Object.keys(json).sort());
    assert.ok(json.seconds > 0);
  }
});

test("cross-entropy is the specified one: the kit's loss vectors bit for bit", () => {
  const vectors = kit.index.loss.cross_entropy as { what: string; shape: number[]; logits: string[]; labels: number[]; loss: string }[];
  assert.ok(vectors.length >= 4);
  for (const v of vectors) {
    const logits = new Float32Array(Uint32Array.from(v.logits, (h) => parseInt(h, 16)).buffer);
    assert.equal(f64hex(crossEntropy(logits, v.labels, v.shape[1])), v.loss, v.what);
  }
  // and it is the mean softmax cross-entropy (Math.exp/log: within an ulp or so)
  const logits = Float32Array.from([1, 2, 3, 0, -1, 5, 0.5, 0.25, 0.125, 100]);
  const l = crossEntropy(logits, [2, 0], 5);
  const ref = (row: number[], y: number) => { const m = Math.max(...row); const s = row.reduce((a, v) => a + Math.exp(v - m), 0); return -((row[y] - m) - Math.log(s)); };
  assert.ok(Math.abs(l - (ref([1, 2, 3, 0, -1], 2) + ref([5, 0.5, 0.25, 0.125, 100], 0)) / 2) < 1e-12);
});

async function firstRound(fmt: TrainFormat) {
  const r = kit.rounds.find((x) => x.format === fmt)!;
  return { r, ...(await roundInputs(kit, r)) };
}

test("bad input is a clear error and nothing is reported", async () => {
  const { r, weights, batches } = await firstRound("onnx-int8");
  const rs = sessions["onnx-int8"];
  const task = (over: Record<string, unknown>) => stringifyJson({ ...r.task, ...over });
  await assert.rejects(runTask(task({ k: 0 }), weights, batches, rs), /k: 0 outside \[1, 1000000\]/);
  await assert.rejects(runTask(task({ k: -3 }), weights, batches, rs), /k: -3 outside/);
  await assert.rejects(runTask(task({ seed: 2n ** 64n }), weights, batches, rs), /seed: 18446744073709551616 outside \[0, 2\^64 - 1\]/);
  await assert.rejects(runTask(task({ seed: -1 }), weights, batches, rs), /seed: -1 outside/);
  await assert.rejects(runTask(task({ seed: 1.5 }), weights, batches, rs), /seed: expected an unsigned 64-bit integer/);
  await assert.rejects(runTask(task({ model_version: "0123456789abcdef" }), weights, batches, rs),
    /model_version: the weights hash to [0-9a-f]{16}, the task is for model 0123456789abcdef/);
  const other = Float32Array.from(weights); other[5] += 1e-3;
  await assert.rejects(runTask(task({}), other, batches, rs), /model_version/);
  await assert.rejects(runTask(task({ version: 7 }), weights, batches, rs), /version: protocol version 7 is not supported/);
  await assert.rejects(runTask(task({ noise: "gaussian" }), weights, batches, rs), /noise: int8-step perturbations/);
  await assert.rejects(runTask(task({ domain: "float" }), weights, batches, rs), /domain: the onnx-int8 session perturbs in the int8-step domain/);
  await assert.rejects(runTask(task({ local_steps: 2 }), weights, batches, rs), /batches: task has 2 local step/);
  await assert.rejects(runTask(task({ k: 1_000_000, local_steps: 5000 }), weights, Array(5000).fill(batches[0]), rs),
    /local_steps \* k = 5000000000 exceeds 2\^32/);
  await assert.rejects(runTask(task({ extra: 1 }), weights, batches, rs), /unknown fields \["extra"\]/);
  await assert.rejects(runTask(task({ local_lr: -1 }), weights, batches, rs), /local_lr: must be >= 0/);
  await assert.rejects(runTask(task({ clip: 0 }), weights, batches, rs), /clip: must be > 0/);
  await assert.rejects(runTask("{not json", weights, batches, rs), /JSON/);
  const nan = Float32Array.from(weights); nan[0] = NaN;
  await assert.rejects(runTask(task({ model_version: "" }), nan, batches, rs), /weights: non-finite value at index 0/);
  await assert.rejects(runTask(task({}), weights.subarray(1), batches, rs), /weights: expected \d+ values/);
  const badLabels = [{ x: batches[0].x, y: Int32Array.from(batches[0].y, () => 10) }];
  await assert.rejects(runTask(task({}), weights, badLabels, rs), /label 10 at 0 outside \[0, 10\)/);
});

test("a task's JSON seed above 2^53 is kept exact", () => {
  const t = parseTask('{"version": 2, "local_lr": 0.0, "clip": null, "round": 0, "client": 0, "seed": 18446744073709551615, "k": 2, "sigma": 1.0, ' +
    '"scheme": "forward", "noise": "rademacher", "noise_scope": "client", "domain": "int8-step", "estimator": "rms-step", ' +
    '"baseline": "base", "local_steps": 1, "model_version": ""}');
  assert.equal(t.seed, 2n ** 64n - 1n);
  assert.match(stringifyJson(t), /"seed":18446744073709551615/);
});

test("a tampered or truncated bundle file is refused (sha256 / size against baffle.json)", async () => {
  const src = join(kitDir(), kit.index.bundle);
  const dir = await mkdtemp(join(tmpdir(), "baffle-js-bundle-"));
  for (const f of await readdir(src)) await copyFile(join(src, f), join(dir, f));
  const ok = await loadBundle(directorySource(dir));
  assert.equal(ok.dim, kit.index.weights.values);
  assert.equal(modelVersion((await roundInputs(kit, kit.rounds[0])).weights), kit.index.weights.model_version);
  const bytes = ok.file("model.int8.train.onnx");
  const tampered = Uint8Array.from(bytes); tampered[tampered.length - 10] ^= 1;
  await writeFile(join(dir, "model.int8.train.onnx"), tampered);
  await assert.rejects(loadBundle(directorySource(dir)), (e: Error) => e instanceof BundleError &&
    /model\.int8\.train\.onnx: sha256 does not match baffle\.json/.test(e.message));
  await writeFile(join(dir, "model.int8.train.onnx"), bytes.subarray(0, 100));
  await assert.rejects(loadBundle(directorySource(dir)), /model\.int8\.train\.onnx: 100 bytes, baffle.json says/);
  // a bundle loaded for the fp32 format only never reads (or trusts) the int8 files
  const fp32 = await loadBundle(directorySource(dir), { formats: ["onnx"] });
  assert.throws(() => fp32.trainGraph("onnx-int8"), /was not loaded/);
  await writeFile(join(dir, "baffle.json"), "{");
  await assert.rejects(loadBundle(directorySource(dir)), /baffle.json: not valid JSON/);
});
