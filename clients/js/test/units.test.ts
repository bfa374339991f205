import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { clipInf, exp, leaveOneOut, log, pairwiseSum, parseJson, rint, sha256Hex, stringifyJson, utf8 } from "../src/index.js";
import { f64hex, fromF64hex, kitDir } from "./helpers.js";

test("sha256Hex equals node:crypto on every padding length and a large input", () => {
  for (const n of [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 1 << 20]) {
    const b = new Uint8Array(randomBytes(n));
    assert.equal(sha256Hex(b), createHash("sha256").update(b).digest("hex"), `n=${n}`);
  }
});

test("parseJson keeps integers above 2^53 exact and rejects bad text", () => {
  const v = parseJson('{"a": 18446744073709551615, "b": [9007199254740993, 1.5e3, -0.0, "x\\u00e9"], "c": 12}') as
    { a: bigint; b: unknown[]; c: number };
  assert.equal(v.a, 18446744073709551615n);
  assert.deepEqual(v.b, [9007199254740993n, 1500, -0, "xé"]);
  assert.equal(v.c, 12);
  assert.equal(stringifyJson(v), '{"a":18446744073709551615,"b":[9007199254740993,1500,0,"xé"],"c":12}');
  for (const bad of ["{", "[1,]", "01", "NaN", '{"a" 1}', "1 2", '"\u0001"', "[".repeat(100) + "]".repeat(100)]) {
    assert.throws(() => parseJson(bad), SyntaxError, bad.slice(0, 20));
  }
  const proto = parseJson('{"__proto__": {"polluted": 1}}') as Record<string, unknown>;
  assert.equal(({} as Record<string, unknown>).polluted, undefined);
  assert.deepEqual(Object.keys(proto), ["__proto__"]);
});

test("utf8 decodes like TextDecoder and, without one (Hermes), by hand", () => {
  const text = 'baffle.json: {"é": "日本", "emoji": "😀"}';
  const bytes = new TextEncoder().encode(text);
  const saved = globalThis.TextDecoder;
  try {
    // @ts-expect-error simulating React Native's Hermes, which has no TextDecoder
    delete globalThis.TextDecoder;
    assert.equal(utf8(bytes), text);
    assert.throws(() => utf8(Uint8Array.of(0x61, 0xc3)), /invalid UTF-8/);
    assert.throws(() => utf8(Uint8Array.of(0xed, 0xa0, 0x80)), /invalid UTF-8/); // a surrogate
  } finally {
    globalThis.TextDecoder = saved;
  }
  assert.equal(utf8(bytes), text);
});

test("rint rounds half to even like numpy", () => {
  assert.deepEqual([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999999999999996, 3.7, -3.7].map(rint), [0, 2, 2, -0, -2, -2, 2, 4, -4]);
});

test("pairwiseSum and mean reproduce numpy's sums bit for bit (the kit's summation vectors)", () => {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const kit = parseJson(readFileSync(join(kitDir(), "conformance.json"), "utf-8")) as any;
  assert.ok(kit.summation.length >= 8);
  let orderMatters = 0;
  for (const v of kit.summation as { values: number[]; sum: number; mean: number }[]) {
    assert.equal(pairwiseSum(v.values), v.sum, `n=${v.values.length}`);
    assert.equal(pairwiseSum(v.values) / v.values.length, v.mean, `n=${v.values.length}`);
    if (v.values.reduce((a, b) => a + b, 0) !== v.sum) orderMatters++;
  }
  assert.ok(orderMatters >= 3, "the vectors must tell summation orders apart");
});

test("leave-one-out and inf-norm clipping as estimator.py", () => {
  assert.deepEqual(Array.from(leaveOneOut(Float64Array.of(1, 2, 3))), [-1.5, 0, 1.5]);
  assert.throws(() => leaveOneOut(Float64Array.of(1)), /at least 2/);
  const g = clipInf(Float64Array.of(3, -6), 0.3);
  assert.ok(Math.abs(Math.max(...g.map(Math.abs)) - 0.3) < 1e-6);
  assert.deepEqual(Array.from(clipInf(Float64Array.of(0.1, -0.2), 0.3)), [0.1, -0.2]);
  assert.deepEqual(Array.from(clipInf(Float64Array.of(5), null)), [5]);
});

test("exp/log are fdlibm's, the same bits on every JS engine", () => {
  const o = new Float64Array(20000);
  for (let i = 0; i < 10000; i++) { o[i] = exp(i / 100 - 80); o[10000 + i] = log((i + 1) * 0.0137); }
  // digest of these 20,000 results, fixed when the port was checked equal to Node 20's V8 (fdlibm) on 2e6 random arguments
  assert.equal(sha256Hex(new Uint8Array(o.buffer)), "a67ca3ef0863e1941c1bf7fe5cf4b68e630f476fe7cddc4de1df30617797cf15");
  assert.deepEqual([exp(0), exp(-Infinity), exp(Infinity), exp(710), exp(-746), log(1), log(0), log(-1), log(Infinity)],
    [1, 0, Infinity, Infinity, 0, 0, -Infinity, NaN, Infinity]);
  assert.ok(Number.isNaN(exp(NaN)) && Number.isNaN(log(NaN)));
  assert.equal(log(5e-324), -744.4400719213812);
});

test("exp/log reproduce the kit's fdlibm vectors bit for bit (edge cases, thresholds, branch boundaries)", () => {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const v = (parseJson(readFileSync(join(kitDir(), "conformance.json"), "utf-8")) as any).loss.libm as { x: string[]; exp: string[]; log: string[] };
  assert.ok(v.x.length >= 30);
  const x = v.x.map(fromF64hex);
  const same = (a: number, h: string) => f64hex(a) === h || (Number.isNaN(a) && Number.isNaN(fromF64hex(h)));
  x.forEach((xi, i) => {
    assert.ok(same(exp(xi), v.exp[i]), `exp(${xi}) = ${f64hex(exp(xi))}, kit ${v.exp[i]}`);
    assert.ok(same(log(xi), v.log[i]), `log(${xi}) = ${f64hex(log(xi))}, kit ${v.log[i]}`);
  });
});

test("the gateway device backs off 503s exponentially with jitter, capped, and keeps retrying", async () => {
  const { backoff, BACKOFF_CAP, GatewayDevice } = await import("../src/gateway.js");
  const lo = [0, 1, 2, 3, 10, 40].map((a) => backoff(a, null, () => 0));
  const hi = [0, 1, 2, 3, 10, 40].map((a) => backoff(a, null, () => 1));
  assert.deepEqual(hi, [0.2, 0.4, 0.8, 1.6, BACKOFF_CAP, BACKOFF_CAP]);
  assert.deepEqual(lo, hi.map((d) => d / 2)); // jitter: uniform in [d/2, d]
  assert.equal(backoff(0, 3, () => 1), 3); // Retry-After raises the floor ...
  assert.equal(backoff(0, 600, () => 1), BACKOFF_CAP); // ... never past the cap
  let calls = 0;
  const retries: number[] = [];
  const fetch = (async () => (++calls <= 3 ? new Response("busy", { status: 503 }) : new Response("{}", { status: 200 }))) as typeof globalThis.fetch;
  const dev = new GatewayDevice({ server: "http://127.0.0.1:1", token: "t", ort: {} as never, fetch, patience: 60,
                                  onEvent: (e) => { if (e.type === "retry") retries.push(e.delay); } });
  const r = await dev.request("/v1/status");
  assert.equal(r.status, 200);
  assert.equal(calls, 4);
  assert.equal(retries.length, 3);
  retries.forEach((d, i) => assert.ok(d >= 0.1 * 2 ** i && d <= 0.2 * 2 ** i, `retry ${i}: ${d}`));
});

test("an untrusted TLS certificate is one error naming NODE_EXTRA_CA_CERTS, not retried as an unreachable server", async () => {
  const { GatewayDevice, GatewayError } = await import("../src/gateway.js");
  let calls = 0;
  const fetch = (async () => {
    calls++;
    throw new TypeError("fetch failed", { cause: Object.assign(new Error("self-signed certificate"), { code: "DEPTH_ZERO_SELF_SIGNED_CERT" }) });
  }) as typeof globalThis.fetch;
  const dev = new GatewayDevice({ server: "https://127.0.0.1:1", token: "t", ort: {} as never, fetch, patience: 60 });
  await assert.rejects(dev.request("/v1/status"), (e: unknown) =>
    e instanceof GatewayError && /not trusted \(DEPTH_ZERO_SELF_SIGNED_CERT\)/.test(e.message) && /NODE_EXTRA_CA_CERTS/.test(e.message));
  assert.equal(calls, 1);
});
