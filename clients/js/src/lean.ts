/**
 * Lean downloads of an int8 device (baffle_edge/downloads.py; docs/gateway.md, "Lean downloads"):
 * the round's integer payload — every tensor of the bundle's quantization table, quantized from the
 * global weights (quant.ts `quantize`), little-endian int8 (weights) / int32 (biases), table order —
 * and the bundle files the runtime loads, both as zlib streams against what the device holds:
 *
 *     integers:     GET url?base=V   zlib((payload - payload_V) mod 256), or zlib(payload) (X-Baffle-Base: none)
 *     bundle file:  GET url?base=G   zlib with generation G's same file as preset dictionary (or ?z=1: plain zlib)
 *
 * Pure (no I/O, no platform module): the gateway device (gateway.ts) fetches, this decodes and checks.
 */
import { type Inflate } from "./inflate.js";
import type { IntArray, QTensor } from "./quant.js";
import { sha256Hex } from "./sha256.js";

/** The bytes of the integer payload of `table`. */
export function payloadSize(table: QTensor[]): number {
  return table.reduce((n, t) => n + t.size * (t.dtype === "int8" ? 1 : 4), 0);
}

/** The integer payload of `q` (downloads.int_payload's layout). */
export function intPayload(table: QTensor[], q: IntArray[]): Uint8Array {
  const out = new Uint8Array(payloadSize(table));
  const view = new DataView(out.buffer);
  let pos = 0;
  table.forEach((t, j) => {
    const a = q[j];
    if (t.dtype === "int8") { out.set(new Uint8Array(a.buffer, a.byteOffset, a.length), pos); pos += a.length; return; }
    for (let i = 0; i < a.length; i++, pos += 4) view.setInt32(pos, a[i], true);
  });
  return out;
}

/** The integer tensors of `payload` (intPayload's layout); an Error if its size is not the table's. */
export function splitPayload(table: QTensor[], payload: Uint8Array): IntArray[] {
  if (payload.length !== payloadSize(table)) {
    throw new Error(`integers: ${payload.length} bytes, the bundle's quantization table needs ${payloadSize(table)}`);
  }
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  let pos = 0;
  return table.map((t) => {
    if (t.dtype === "int8") {
      const a = new Int8Array(payload.slice(pos, pos + t.size).buffer);
      pos += t.size;
      return a;
    }
    const a = new Int32Array(t.size);
    for (let i = 0; i < t.size; i++, pos += 4) a[i] = view.getInt32(pos, true);
    return a;
  });
}

/** `(base + delta) mod 256` byte by byte (downloads.apply_delta). */
export function applyDelta(delta: Uint8Array, base: Uint8Array): Uint8Array {
  if (delta.length !== base.length) throw new Error(`integers: a delta of ${delta.length} bytes against a base of ${base.length}`);
  const out = new Uint8Array(delta.length);
  for (let i = 0; i < out.length; i++) out[i] = (base[i] + delta[i]) & 255;
  return out;
}

/** The offer's `weights.int8`: where the integers are, their sha256 and size. */
export interface IntSpec { url: string; sha256: string; bytes: number }

/**
 * The payload a lean integers download holds: `body` inflated (at most `spec.bytes` bytes), the
 * `base` payload added back when the server sent a delta against it (`used` = X-Baffle-Base), checked
 * against the offer's sha256. Every failure is an Error naming what was wrong: never unverified integers.
 */
export function decodeIntegers(body: Uint8Array, used: string, base: [string, Uint8Array] | null,
                               spec: IntSpec, inflate: Inflate): Uint8Array {
  if (!Number.isSafeInteger(spec.bytes) || spec.bytes <= 0 || typeof spec.sha256 !== "string") {
    throw new Error(`integers: the offer's weights.int8 ${JSON.stringify(spec)} lacks a size or sha256`);
  }
  if (used !== "none" && (base === null || used !== base[0])) {
    throw new Error(`integers: the server sent a delta against ${JSON.stringify(used)}, this device holds ` +
                    `${base ? JSON.stringify(base[0]) : "nothing"}`);
  }
  const raw = inflate(body, { size: spec.bytes });
  const payload = used === "none" ? raw : applyDelta(raw, base![1]);
  const got = sha256Hex(payload);
  if (got !== spec.sha256) {
    throw new Error(`integers (${payload.length} bytes) hash to ${got.slice(0, 16)}, the task offer names ${spec.sha256.slice(0, 16)}`);
  }
  return payload;
}

/** The bundle files a runtime of format `fmt` loads (device.runtime_files): its graphs, without the
 * standalone `inference` model when a `train` graph exists (never the docs or other formats). */
export function runtimeFiles(meta: Record<string, unknown>, fmt: string): string[] {
  const formats = meta.formats as Record<string, { files?: Record<string, string> }> | undefined;
  const files = formats?.[fmt]?.files;
  if (!files || typeof files !== "object") throw new Error(`baffle.json: formats.${fmt}.files is missing`);
  return Object.entries(files).filter(([role]) => role !== "inference" || !("train" in files)).map(([, n]) => String(n));
}
