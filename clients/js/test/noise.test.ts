import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { negativeSigns, noise, parseJson, philox4x32, seedWords, sha256Hex, words } from "../src/index.js";
import { f32hex, hexWords, kitDir } from "./helpers.js";

// eslint-disable-next-line @typescript-eslint/no-explicit-any
const kit = parseJson(readFileSync(join(kitDir(), "conformance.json"), "utf-8")) as any;
const vectors = kit.noise;
const hex = (s: string) => parseInt(s, 16);

function f32leSha(v: Float32Array): string {
  const b = new Uint8Array(v.length * 4);
  const dv = new DataView(b.buffer);
  v.forEach((x, i) => dv.setFloat32(4 * i, x, true));
  return sha256Hex(b);
}

test("philox4x32-10 reproduces the Random123 known-answer tests", () => {
  assert.equal(vectors.philox_kat.length, 3);
  for (const v of vectors.philox_kat) {
    assert.deepEqual(hexWords(philox4x32(v.counter.map(hex), v.key.map(hex))), v.output);
  }
});

test("short streams: words, Gaussian bits and Rademacher signs are bit-identical", () => {
  assert.ok(vectors.short.length >= 10);
  for (const v of vectors.short) {
    const what = `${v.what} (seed ${v.seed})`;
    assert.deepEqual(hexWords(words(v.seed, v.round, v.client, v.k, v.words.length)), v.words, what);
    assert.deepEqual(Array.from(noise(v.seed, v.round, v.client, v.k, v.d, "gaussian"), f32hex), v.gauss, what);
    const rad = noise(v.seed, v.round, v.client, v.k, v.d, "rademacher");
    assert.equal(Array.from(rad, (x) => (x < 0 ? "-" : "+")).join(""), v.rad, what);
    const neg = negativeSigns(v.seed, v.round, v.client, v.k, v.d);
    assert.deepEqual(Array.from(neg), Array.from(rad, (x) => (x < 0 ? 1 : 0)), what);
  }
});

test("seeds above 2^53 and 2^63 keep every bit through JSON parsing", () => {
  const seeds = vectors.short.map((v: { seed: unknown }) => v.seed);
  assert.ok(seeds.includes(2n ** 63n + 1n) && seeds.includes(2n ** 64n - 1n) && seeds.includes(2n ** 53n + 1n));
  assert.deepEqual(seedWords(2n ** 64n - 1n), [0xffffffff, 0xffffffff]);
  assert.deepEqual(seedWords("9223372036854775809"), [1, 0x80000000]);
});

test("long streams: SHA-256 of the float32 bytes and the values around the chunk boundary", () => {
  assert.equal(vectors.long.length, 4);
  for (const v of vectors.long) {
    const z = noise(v.seed, v.round, v.client, v.k, v.d, v.kind);
    for (const [i, bits] of Object.entries(v.values)) assert.equal(f32hex(z[Number(i)]), bits, `${v.kind} d=${v.d} value ${i}`);
    assert.equal(f32leSha(z), v.sha256_f32le, `${v.kind} d=${v.d}`);
  }
});

test("u1 = 1 gives r = sqrt(-0.0) = -0.0: the zero's sign is part of the bit pattern", () => {
  const u = vectors.u1_one;
  const w = words(u.seed, u.round, u.client, u.k, u.d);
  assert.equal(w[u.index] >>> 8, 0xffffff);
  const z = noise(u.seed, u.round, u.client, u.k, u.d);
  assert.deepEqual([f32hex(z[u.index]), f32hex(z[u.index + 1])], u.gauss);
  assert.ok(z[u.index] === 0 && z[u.index + 1] === 0);
  assert.equal(f32leSha(z), u.sha256_f32le);
});

test("out-of-range seeds, counters and dimensions are clear errors", () => {
  assert.throws(() => noise(2n ** 64n, 0, 0, 0, 4), /seed must be in \[0, 2\^64\)/);
  assert.throws(() => noise(-1, 0, 0, 0, 4), /seed must be in/);
  assert.throws(() => noise(2 ** 60, 0, 0, 0, 4), /bigint or decimal string/);
  assert.throws(() => noise(0, 2 ** 32, 0, 0, 4), /round must be an integer in \[0, 2\^32\)/);
  assert.throws(() => noise(0, 0, 0, -1, 4), /k must be/);
  assert.throws(() => noise(0, 0, 0, 0, 1.5), /d must be an integer/);
  assert.throws(() => words(0, 0, 0, 0, 8, 2 ** 32 - 1), /outside the 2\^32-block stream/);
});
