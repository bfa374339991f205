import assert from "node:assert/strict";
import { test } from "node:test";
import { decodeReport, encodeReport, ProtocolError, type ClientReport } from "../src/index.js";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const REPORT: ClientReport = {
  version: 2, round: 5, client: 2, num_samples: 64, model_version: "0123456789abcdef", runtime: "onnxruntime-int8-js",
  seconds: 0.5, base_losses: [2.302585092994046, 2.3],
  losses: [2.302585092994046, 2.3031, 2.3019999, 2.30258509299, 2.31, 2.3025, 2.2999, 2.3000001],
};
// baffle_edge.compact.encode of the same report (16 and 8 bits): the bytes the Python client sends
const PY16 = "42464c52011002010500000002000000400000000400000002001013000000000000e03f303132333435363738396162636465666f6e6e" +
  "7872756e74696d652d696e74382d6a731655b5bbb16b0240dd99eebc1a2d533e00009f700180000066666666666602408590c23d0a7b943eff7f0020b8fe0000";
const PY8 = "42464c52010802010500000002000000400000000400000002001013000000000000e03f303132333435363738396162636465666f6e6e" +
  "7872756e74696d652d696e74382d6a731655b5bbb16b0240f4f9ec999b53d33e007081006666666666660240b9dce39a29a4143f7f20ff00";

test("a compact report is byte-identical to the Python encoder's and decodes within scale / 2", () => {
  assert.equal(hex(encodeReport(REPORT)), PY16);
  assert.equal(hex(encodeReport(REPORT, 8)), PY8);
  const back = decodeReport(encodeReport(REPORT));
  assert.deepEqual(back.base_losses, REPORT.base_losses);  // exact
  for (let s = 0; s < 2; s++) {
    const block = REPORT.losses.slice(4 * s, 4 * s + 4), ref = REPORT.base_losses[s];
    const scale = Math.max(...block.map((x) => Math.abs(x - ref))) / 32767;
    block.forEach((x, k) => assert.ok(Math.abs(back.losses[4 * s + k] - x) <= scale / 2 * (1 + 1e-12)));
  }
  assert.equal(hex(encodeReport(back)), PY16);  // decoding is the encoder's fixed point
  const { losses, base_losses, ...rest } = back;
  const { losses: l0, base_losses: b0, ...want } = REPORT;
  assert.deepEqual(rest, want);
  assert.equal(losses.length, l0.length);
  assert.equal(base_losses.length, b0.length);
});

test("malformed compact bytes are refused", () => {
  const good = encodeReport(REPORT);
  for (const bad of [good.subarray(0, 10), good.subarray(0, good.length - 1), new Uint8Array([...good, 0])]) {
    assert.throws(() => decodeReport(bad), ProtocolError);
  }
  const nan = good.slice();
  new DataView(nan.buffer).setFloat64(36 + 16 + 19 + 8, Number.NaN, true);
  assert.throws(() => decodeReport(nan), /bad ref or scale/);
  assert.throws(() => encodeReport({ ...REPORT, losses: [...REPORT.losses.slice(0, 7), Number.NaN] }), /non-finite/);
});
