/**
 * Lean downloads of the TypeScript device (src/lean.ts, src/inflate.ts; docs/gateway.md "Lean downloads"):
 *
 * - inflate.ts against node:zlib (the reference) with and without a preset dictionary; damaged,
 *   oversized, short and mis-keyed streams refused;
 * - the integer payload's layout and the delta / sha256 checks;
 * - against a real `baffle-edge serve` on loopback (default int8 block run, --forward-budget 101): a lean
 *   device's reports equal the full-download path's on the same offers (int8 losses bit for bit), the
 *   bytes it moves per round (bodies, both directions) stay <= 36 KB from round 2, and a device fed corrupt,
 *   oversized or mismatching downloads falls back to the full download and is still accepted.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { haveServe, python, PYTHON, serve } from "./server.js";
import { deflateSync } from "node:zlib";
import * as ort from "onnxruntime-node";
import { runTask, type OrtModule, type RoundSession } from "../src/client.js";
import { GatewayDevice, type GatewayEvent, type TaskOffer } from "../src/gateway.js";
import { inflate, InflateError } from "../src/inflate.js";
import { applyDelta, decodeIntegers, intPayload, splitPayload } from "../src/lean.js";
import type { ClientReport } from "../src/protocol.js";
import { qtensorFromJson, type QTensor } from "../src/quant.js";
import { sha256Hex } from "../src/sha256.js";

const BUDGET = 36 * 1024;  // issue #23: bytes per client per round, both directions

/** Seeded bytes (xorshift32) with runs, so that deflate finds matches. */
function bytesOf(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    out[i] = x % 7 === 0 && i > 40 ? out[i - 1 - (x % 40)] : x & 0x0f;
  }
  return out;
}

const z = (b: Uint8Array, options: { level?: number; dictionary?: Uint8Array } = {}) => new Uint8Array(deflateSync(b, options));

test("inflate equals node:zlib's input, with and without a preset dictionary, every level", () => {
  for (const [n, seed] of [[0, 1], [1, 2], [100, 3], [70_000, 4]] as const) {
    const data = bytesOf(n, seed);
    for (const level of [0, 1, 6, 9]) assert.deepEqual(inflate(z(data, { level }), { size: n }), data, `n ${n} level ${level}`);
    const dictionary = bytesOf(5000, seed + 10);
    const near = Uint8Array.from(data, (v, i) => (i % 97 === 0 ? v ^ 1 : dictionary[i % 5000]));
    assert.deepEqual(inflate(z(near, { level: 9, dictionary }), { size: n, dictionary }), near, `n ${n} with a dictionary`);
  }
  const big = bytesOf(300_000, 9);  // stored blocks (level 0) over 64 KB
  assert.deepEqual(inflate(z(big, { level: 0 }), { size: big.length }), big);
});

test("inflate refuses damaged, oversized, short, trailing and mis-keyed streams", () => {
  const data = bytesOf(20_000, 5), dictionary = bytesOf(3000, 6), s = z(data, { level: 9 });
  const refuses = (b: Uint8Array, options: { size: number; dictionary?: Uint8Array }, re: RegExp) =>
    assert.throws(() => inflate(b, options), (e: Error) => e instanceof InflateError && re.test(e.message));
  refuses(s, { size: data.length - 1 }, /more than 19999 bytes/);
  refuses(s, { size: data.length + 1 }, /holds 20000 bytes, 20001 expected/);
  refuses(s.subarray(0, s.length - 9), { size: data.length }, /truncated|no checksum/);
  refuses(Uint8Array.from([...s, 0]), { size: data.length }, /bytes after/);
  refuses(Uint8Array.from([0x78, 0x9c, 7, 0, 0, 0, 0, 1]), { size: 10 }, /bad block type/);
  refuses(Uint8Array.from([0x79, 0x9c, ...s.subarray(2)]), { size: data.length }, /bad header/);
  const flipped = Uint8Array.from(s);
  flipped[s.length - 1] ^= 1;
  refuses(flipped, { size: data.length }, /Adler-32/);
  const zd = z(data, { dictionary });
  refuses(zd, { size: data.length }, /needs a preset dictionary/);
  refuses(zd, { size: data.length, dictionary: bytesOf(3000, 7) }, /another dictionary/);
  refuses(s, { size: data.length, dictionary }, /no preset dictionary/);
  let caught = 0;  // random damage: an InflateError (or, rarely, the same bytes), never another exception
  for (let t = 0; t < 200; t++) {
    const b = Uint8Array.from(s);
    b[2 + ((t * 7919) % (b.length - 2))] ^= 1 << (t % 8);
    try { assert.deepEqual(inflate(b, { size: data.length }), data); } catch (e) { assert.ok(e instanceof InflateError, String(e)); caught++; }
  }
  assert.ok(caught >= 190, `${caught} of 200 damaged streams refused`);
});

const TABLE: QTensor[] = [
  qtensorFromJson({ name: "w", input: "w_q", offset: 0, shape: [2, 3], dtype: "int8", axis: 0, scale: [0.1, 0.2], multiplier: 1, qmax: 127 }),
  qtensorFromJson({ name: "b", input: "b_q", offset: 6, shape: [2], dtype: "int32", axis: 0, scale: [0.01, 0.02], multiplier: 100, qmax: 2 ** 31 - 1 }),
];

test("the integer payload: int8 then little-endian int32, table order; delta and sha256 checked", () => {
  const q = [Int8Array.from([-128, -1, 0, 1, 2, 127]), Int32Array.from([-70_000, 2 ** 31 - 1])];
  const p = intPayload(TABLE, q);
  assert.deepEqual(Array.from(p), [128, 255, 0, 1, 2, 127, 0x90, 0xee, 0xfe, 0xff, 0xff, 0xff, 0xff, 0x7f]);
  assert.deepEqual(splitPayload(TABLE, p), q);
  assert.throws(() => splitPayload(TABLE, p.subarray(1)), /13 bytes, the bundle's quantization table needs 14/);
  const base = intPayload(TABLE, [Int8Array.from([0, 0, 0, 0, 0, 0]), Int32Array.from([5, 6])]);
  const delta = Uint8Array.from(p, (v, i) => (v - base[i]) & 255);
  assert.deepEqual(applyDelta(delta, base), p);
  const spec = { url: "/x", sha256: sha256Hex(p), bytes: p.length };
  assert.deepEqual(decodeIntegers(z(delta), "v1", ["v1", base], spec, inflate), p);
  assert.deepEqual(decodeIntegers(z(p), "none", ["v1", base], spec, inflate), p);
  assert.throws(() => decodeIntegers(z(delta), "v0", ["v1", base], spec, inflate), /a delta against "v0", this device holds "v1"/);
  assert.throws(() => decodeIntegers(z(delta), "v1", null, spec, inflate), /holds nothing/);
  assert.throws(() => decodeIntegers(z(delta), "none", ["v1", base], spec, inflate), /hash to .*, the task offer names/);
  assert.throws(() => decodeIntegers(z(Uint8Array.from([...p, 0])), "none", null, spec, inflate), /more than 14 bytes/);
  assert.throws(() => decodeIntegers(z(p), "none", null, { ...spec, bytes: 0 }, inflate), /lacks a size/);
});

test("lean only for an int8-step session's one-step task with integers on offer, unless download is full", () => {
  const dev = (download?: "lean" | "full") => new GatewayDevice({ server: "", token: "", ort: {} as OrtModule, download });
  const offer = (steps: number, int8 = true) => ({ weights: { url: "/w", version: "v", dtype: "float32", count: 8,
    ...(int8 ? { int8: { url: "/w/int8", sha256: "0".repeat(64), bytes: 14 } } : {}) }, task: { local_steps: steps } }) as unknown as TaskOffer;
  const int8 = { table: TABLE, domain: "int8-step" } as unknown as RoundSession, float = { table: null, domain: "float" } as unknown as RoundSession;
  assert.equal(dev().leanTask(offer(1), int8), true);
  assert.equal(dev("lean").leanTask(offer(1), int8), true);
  assert.equal(dev("full").leanTask(offer(1), int8), false);
  assert.equal(dev().leanTask(offer(2), int8), false, "FedAvg: local steps move float weights");
  assert.equal(dev().leanTask(offer(1), float), false, "a float session");
  assert.equal(dev().leanTask(offer(1, false), int8), false, "a server that offers no integers");
  assert.throws(() => dev("fp32" as "full"), /download must be "lean" or "full", got "fp32"/);
});

// --- against a real server ---



/** Bytes of request and response bodies per round (the round of the last task offer), /v1/config and /v1/data left out. */
class Meter {
  round = -1;
  readonly rows: Map<number, Record<string, number>> = new Map();

  add(round: number, key: string, n: number): void {
    if (round < 0 || n === 0) return;
    const row = this.rows.get(round) ?? {};
    row[key] = (row[key] ?? 0) + n;
    this.rows.set(round, row);
  }

  total(round: number): number {
    return Object.values(this.rows.get(round) ?? {}).reduce((a, b) => a + b, 0);
  }
}

type Rewrite = (path: string, r: Response, offer: TaskOffer | null) => Promise<Response>;

/** A fetch that meters `meter`, may rewrite responses, and calls `onOffer` before a task offer reaches the device. */
function meteredFetch(meter: Meter, onOffer: (o: TaskOffer) => Promise<void>, rewrite?: Rewrite): typeof fetch {
  let offer: TaskOffer | null = null;
  return (async (input: string | URL | Request, init?: RequestInit) => {
    const url = new URL(String(input)), path = url.pathname;
    let r = await fetch(input, init);
    const kind = path.startsWith("/v1/weights/") ? (path.endsWith("/int8") ? "down integers" : "down weights")
      : path.startsWith("/v1/bundle/") ? "down bundle" : path.startsWith("/v1/task") ? "down task" : path === "/v1/report" ? "down answer" : "";
    const body = new Uint8Array(await r.arrayBuffer());
    if (path.startsWith("/v1/task")) {
      const o = JSON.parse(new TextDecoder().decode(body)) as TaskOffer | { status: string };
      if (o.status !== "task") return new Response(body, { status: r.status, headers: r.headers });
      offer = o as TaskOffer;
      meter.round = offer.round;
      await onOffer(offer);
    }
    if (kind) meter.add(meter.round, kind, body.length);
    if (init?.body) meter.add(meter.round, "up report", (init.body as Uint8Array | string).length);
    r = new Response(r.status === 304 ? null : body, { status: r.status, headers: r.headers });
    return rewrite ? rewrite(path + url.search, r, offer) : r;
  }) as typeof fetch;
}

const losses = (r: ClientReport) => ({ round: r.round, client: r.client, losses: r.losses, base: r.base_losses, n: r.num_samples, mv: r.model_version });

test("a lean TS int8 device: reports equal the full download's bit for bit, <= 36 KB a round; bad downloads fall back",
  { skip: haveServe ? false : `${PYTHON} lacks baffle_edge[serve]`, timeout: 600_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), "baffle-lean-"));
    python(["tokens", "issue", "--tokens", "tokens.json", "--clients", "3", "--out-dir", "toks"], dir);
    const rounds = 3;
    const [server, port] = await serve(dir, ["--no-progress", "--runtime", "onnxruntime-int8", "--noise", "block", "--forward-budget", "101",
                                             "--clients", "3", "--rounds", String(rounds), "--eval-every", "3"]);
    const base = { server: `http://127.0.0.1:${port}`, ort: ort as unknown as OrtModule, poll: 5, patience: 60,
                   sessionOptions: { intraOpNumThreads: 1, interOpNumThreads: 1 } };
    const token = (c: number) => readFileSync(join(dir, "toks", `client-${c}.token`), "utf8").trim();
    // client 0, lean; the same offers answered through the full download path (a shadow device, not metered)
    const shadow = new GatewayDevice({ ...base, token: token(0), download: "full" });
    const want: ClientReport[] = [];
    const meters = [new Meter(), new Meter(), new Meter()];
    const events: GatewayEvent[][] = [[], [], []];
    const got: ClientReport[] = [];
    const lean = new GatewayDevice({ ...base, token: token(0), onEvent: (e) => { events[0].push(e); if (e.type === "accepted") got.push(e.report); },
      fetch: meteredFetch(meters[0], async (o) => {
        const rs = await shadow.session(o);
        want.push(await runTask(JSON.stringify(o.task), await shadow.weights(o), await shadow.batches(o), rs));
      }) });
    // client 1: every round's lean download is damaged another way; it must fall back and be accepted
    const damage: Rewrite = async (path, r, offer) => {
      if (!offer || !path.includes("/int8")) {
        if (offer?.round === 0 && path.includes("model.int8.train.onnx?")) return new Response(Uint8Array.from([0x78, 0x9c, 1, 2, 3]), { headers: r.headers });
        return r;
      }
      const spec = offer.weights.int8!, body = new Uint8Array(await r.arrayBuffer());
      if (offer.round === 0) { body[body.length >> 1] ^= 0x40; return new Response(body, { headers: r.headers }); }
      if (offer.round === 1) return new Response(z(new Uint8Array(spec.bytes + 1000)), { headers: { "X-Baffle-Base": "none" } });
      return new Response(z(new Uint8Array(spec.bytes)), { headers: { "X-Baffle-Base": "none" } });  // right size, wrong sha256
    };
    const bad = new GatewayDevice({ ...base, token: token(1), onEvent: (e) => events[1].push(e), fetch: meteredFetch(meters[1], async () => {}, damage) });
    const full = new GatewayDevice({ ...base, token: token(2), download: "full", onEvent: (e) => events[2].push(e), fetch: meteredFetch(meters[2], async () => {}) });
    const summaries = await Promise.all([lean.run(), bad.run(), full.run()]);
    await new Promise((ok) => server.exitCode !== null ? ok(null) : server.on("exit", ok));
    assert.deepEqual(summaries.map((s) => [s.accepted, s.refused]), [[rounds, []], [rounds, []], [rounds, []]]);
    // lean == full path: the int8 losses bit for bit, on every round
    assert.equal(want.length, rounds);
    assert.deepEqual(got.map(losses), want.map(losses));
    const dl = (c: number, what: string) => events[c].filter((e) => e.type === "download" && e.what === what);
    assert.equal(dl(0, "weights").length, 0, "the lean device downloaded float32 weights");
    assert.deepEqual(dl(0, "integers").map((e) => (e as { encoding: string }).encoding.split(":")[0]), ["zlib", "delta", "delta"]);
    assert.ok(!events[0].some((e) => e.type === "fallback"), "the lean device fell back");
    assert.ok(!dl(0, "bundle:model.int8.onnx").length && !events[0].some((e) => e.type === "download" && e.what.endsWith(".md")),
              "the lean device fetched files its runtime does not load");
    // the damaged device: one fallback per round for the integers (+ the train graph's in round 1), weights instead
    const reasons = events[1].filter((e) => e.type === "fallback").map((e) => (e as { reason: string }).reason);
    assert.equal(reasons.length, rounds + 1, reasons.join(" | "));
    assert.match(reasons.join(" | "), /model\.int8\.train\.onnx: download: .*/);
    assert.match(reasons.join(" | "), /more than \d+ bytes/);
    assert.match(reasons.join(" | "), /hash to .*, the task offer names/);
    assert.equal(dl(1, "weights").length, rounds);
    const row = (m: Meter, r: number) => JSON.stringify(m.rows.get(r));
    for (let r = 0; r < rounds; r++) {
      console.log(`# bytes, round ${r + 1}: lean ${meters[0].total(r)} ${row(meters[0], r)}; full ${meters[2].total(r)} ${row(meters[2], r)}`);
    }
    for (let r = 1; r < rounds; r++) assert.ok(meters[0].total(r) <= BUDGET, `round ${r + 1}: ${meters[0].total(r)} B > ${BUDGET}`);
    assert.ok(meters[0].total(0) < meters[2].total(0) / 3, "the first lean round is not much smaller than a full one");
    assert.ok(meters[2].total(1) > 200_000, "the full download's round is not what it was");
  });
