/**
 * Graph block plans (export/graph_blocks.py; src/segments.ts): the WRN-10-2 kit (`baffle-edge conformance
 * --model wrn-10-2`: residual adds, GroupNorm) replayed through its module and rest segments. Every round
 * equals the Python ONNX Runtime client's report (int8 bit for bit, fp32 within the kit tolerance), the
 * block rows equal dense full forwards, and they really ran through the segments.
 */
import assert from "node:assert/strict";
import { before, test } from "node:test";
import * as ort from "onnxruntime-node";
import { RoundSession, type TrainFormat } from "../src/index.js";
import { kitSessions, readKit, runKitRound, type Kit } from "../src/kit.js";
import { f64hex, relDiff, wrnKitDir } from "./helpers.js";

let kit: Kit;
let sessions: Record<TrainFormat, RoundSession>;

before(async () => {
  kit = await readKit(wrnKitDir());
  sessions = await kitSessions(kit, ort, 1);
});

test("the WRN-10-2 kit's bundle has graph plans: module segments, and rest segments for all but the head", () => {
  for (const fmt of ["onnx", "onnx-int8"] as const) {
    const entry = kit.bundle.format(fmt) as { blocks: { kind: string; modules: string[] }; files: Record<string, string> };
    assert.equal(entry.blocks.kind, "graph", fmt);
    const n = entry.blocks.modules.length;
    assert.ok(n >= 10, `${fmt}: ${n} modules`);
    for (let i = 0; i < n; i++) assert.ok(entry.files[`block_mod${i}`], `${fmt} block_mod${i}`);
    assert.equal(Object.keys(entry.files).filter((r) => r.startsWith("block_rest")).length, n - 1, `${fmt}: the head has no rest`);
  }
});

test("WRN-10-2 kit rounds through the graph plan's segments equal the Python client's (int8 bit for bit) and dense full forwards", async () => {
  const tol = kit.index.tolerance;
  const blockRounds = kit.rounds.filter((r) => r.task.noise === "block");
  assert.ok(blockRounds.some((r) => r.format === "onnx") && blockRounds.some((r) => r.format === "onnx-int8"));
  for (const r of kit.rounds) {
    const report = await runKitRound(kit, r, sessions[r.format]);
    const got = [...report.base_losses, ...report.losses], exp = [...r.report.base_losses, ...r.report.losses];
    assert.equal(got.length, exp.length, r.name);
    if (r.format === "onnx-int8") assert.deepEqual(got.map(f64hex), exp.map(f64hex), `${r.name}: int8 losses must be bit-identical`);
    else {
      const worst = Math.max(...got.map((v, i) => relDiff(v, exp[i])));
      assert.ok(worst <= tol.fp32_losses_relative, `${r.name}: max relative loss difference ${worst}`);
    }
    assert.ok(new Set(report.losses.map((v) => v.toPrecision(12))).size > 2, `${r.name}: the perturbations change the loss`);
  }
  for (const fmt of ["onnx", "onnx-int8"] as const) {
    assert.equal(sessions[fmt].blockRowsReason, null, `${fmt}: rows ran through the segment graphs`);
    const dense = await RoundSession.open(ort, kit.bundle, fmt, { intraOpNumThreads: 1 });
    dense.blockRows = "dense";
    for (const r of blockRounds.filter((x) => x.format === fmt)) {
      const a = await runKitRound(kit, r, sessions[fmt]), b = await runKitRound(kit, r, dense);
      const ga = [...a.base_losses, ...a.losses], gb = [...b.base_losses, ...b.losses];
      if (fmt === "onnx-int8") assert.deepEqual(ga.map(f64hex), gb.map(f64hex), r.name);
      else assert.ok(ga.every((x, i) => relDiff(x, gb[i]) <= 1e-6), r.name);
    }
  }
});
