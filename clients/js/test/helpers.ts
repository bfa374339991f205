import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** clients/js (this file is compiled to clients/js/dist/test/). */
export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** The conformance kit the tests read: $BAFFLE_CONFORMANCE or clients/js/.conformance. */
export function kitDir(): string {
  return process.env.BAFFLE_CONFORMANCE ? resolve(process.env.BAFFLE_CONFORMANCE) : join(PACKAGE_DIR, ".conformance");
}

/** The WRN-10-2 kit (`--model wrn-10-2`: a graph block plan): $BAFFLE_CONFORMANCE_WRN or clients/js/.conformance-wrn. */
export function wrnKitDir(): string {
  return process.env.BAFFLE_CONFORMANCE_WRN ? resolve(process.env.BAFFLE_CONFORMANCE_WRN) : join(PACKAGE_DIR, ".conformance-wrn");
}

export function f32hex(v: number): string {
  const b = new DataView(new ArrayBuffer(4));
  b.setFloat32(0, v, true);
  return b.getUint32(0, true).toString(16).padStart(8, "0");
}

/** The float64 bit pattern of v, 16 hex digits (the kit's loss vectors). */
export function f64hex(v: number): string {
  const b = new DataView(new ArrayBuffer(8));
  b.setFloat64(0, v);
  return b.getBigUint64(0).toString(16).padStart(16, "0");
}

export function fromF64hex(h: string): number {
  const b = new DataView(new ArrayBuffer(8));
  b.setBigUint64(0, BigInt(`0x${h}`));
  return b.getFloat64(0);
}

export function hexWords(a: Uint32Array): string[] {
  return Array.from(a, (w) => w.toString(16).padStart(8, "0"));
}

/** Relative difference |a - b| / |b|, the loss tolerance's measure. */
export function relDiff(a: number, b: number): number {
  return a === b ? 0 : Math.abs(a - b) / Math.abs(b);
}
