/**
 * The compact report (`application/x-baffle-report`, docs/gateway.md "Compact reports"; the Python
 * side is baffle_edge/compact.py): each block's losses as 16-bit (or 8-bit) integers against one exact
 * float64 reference, `L_k = ref + q_k * scale`, |error| <= scale / 2. The same float64 arithmetic and
 * half-to-even rounding as numpy, so a report encodes to the same bytes here and in Python.
 */
import { ProtocolError, type ClientReport } from "./protocol.js";
import { rint } from "./quant.js";

export const COMPACT_MEDIA_TYPE = "application/x-baffle-report";
export const COMPACT_FORMAT_VERSION = 1;
const HEADER = 36;

/** The compact bytes of `r` (bits: 16, the default, or 8). */
export function encodeReport(r: ClientReport, bits: 16 | 8 = 16): Uint8Array<ArrayBuffer> {
  if (bits !== 16 && bits !== 8) throw new ProtocolError("bits", `expected 16 or 8, got ${bits}`);
  const hasBase = r.base_losses.length > 0;
  const steps = hasBase ? r.base_losses.length : 1;
  if (r.losses.length % steps !== 0) throw new ProtocolError("losses", `${r.losses.length} values do not split into ${steps} steps`);
  const n = r.losses.length / steps;
  const mv = new TextEncoder().encode(r.model_version);
  const rt = new TextEncoder().encode(r.runtime);
  if (mv.length > 255 || rt.length > 255) throw new ProtocolError("model_version", "model_version and runtime must be at most 255 bytes");
  const width = bits / 8;
  const out = new Uint8Array(HEADER + mv.length + rt.length + steps * (16 + n * width));
  const v = new DataView(out.buffer);
  out.set([0x42, 0x46, 0x4c, 0x52, COMPACT_FORMAT_VERSION, bits, r.version, hasBase ? 1 : 0]);
  v.setUint32(8, r.round, true);
  v.setUint32(12, r.client, true);
  v.setUint32(16, r.num_samples, true);
  v.setUint32(20, n, true);
  v.setUint16(24, steps, true);
  v.setUint8(26, mv.length);
  v.setUint8(27, rt.length);
  v.setFloat64(28, r.seconds, true);
  out.set(mv, HEADER);
  out.set(rt, HEADER + mv.length);
  const qmax = 2 ** (bits - 1) - 1;
  let pos = HEADER + mv.length + rt.length;
  for (let s = 0; s < steps; s++) {
    const block = r.losses.slice(s * n, (s + 1) * n);
    const ref = hasBase ? r.base_losses[s] : (n ? block[0] : 0);
    let m = 0;
    for (const x of block) m = Math.max(m, Math.abs(x - ref));
    if (!Number.isFinite(m) || !Number.isFinite(ref)) throw new ProtocolError("losses", `step ${s} has non-finite values`);
    const scale = m / qmax;
    v.setFloat64(pos, ref, true);
    v.setFloat64(pos + 8, scale, true);
    pos += 16;
    for (const x of block) {
      const q = m === 0 ? 0 : Math.min(qmax, Math.max(-qmax, rint((x - ref) / scale)));
      if (bits === 16) v.setInt16(pos, q, true);
      else v.setInt8(pos, q);
      pos += width;
    }
  }
  return out;
}

/** The report of compact bytes (losses dequantized); a ProtocolError naming what is malformed. */
export function decodeReport(data: Uint8Array): ClientReport {
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length < HEADER) throw new ProtocolError("compact report", `truncated: ${data.length} bytes`);
  if (data[0] !== 0x42 || data[1] !== 0x46 || data[2] !== 0x4c || data[3] !== 0x52) throw new ProtocolError("compact report", "bad magic");
  if (data[4] !== COMPACT_FORMAT_VERSION) throw new ProtocolError("compact report", `format version ${data[4]}`);
  const bits = data[5];
  if (bits !== 16 && bits !== 8) throw new ProtocolError("compact report", `bits ${bits}`);
  if (data[7] & ~1) throw new ProtocolError("compact report", `unknown flag bits ${data[7]}`);
  const n = v.getUint32(20, true), steps = v.getUint16(24, true), lmv = data[26], lrt = data[27];
  const width = bits / 8;
  const want = HEADER + lmv + lrt + steps * (16 + n * width);
  if (steps < 1 || data.length !== want) throw new ProtocolError("compact report", `${data.length} bytes, the header announces ${want}`);
  const dec = new TextDecoder();
  const qmax = 2 ** (bits - 1) - 1;
  const losses: number[] = [], base: number[] = [];
  let pos = HEADER + lmv + lrt;
  for (let s = 0; s < steps; s++) {
    const ref = v.getFloat64(pos, true), scale = v.getFloat64(pos + 8, true);
    if (!Number.isFinite(ref) || !Number.isFinite(scale) || scale < 0) throw new ProtocolError("compact report", `step ${s}: bad ref or scale`);
    pos += 16;
    for (let k = 0; k < n; k++, pos += width) {
      const q = bits === 16 ? v.getInt16(pos, true) : v.getInt8(pos);
      if (Math.abs(q) > qmax) throw new ProtocolError("compact report", `step ${s}: integer ${q} is reserved`);
      losses.push(ref + q * scale);
    }
    base.push(ref);
  }
  return { version: data[6], round: v.getUint32(8, true), client: v.getUint32(12, true), losses,
           base_losses: data[7] & 1 ? base : [], num_samples: v.getUint32(16, true),
           model_version: dec.decode(data.subarray(HEADER, HEADER + lmv)),
           runtime: dec.decode(data.subarray(HEADER + lmv, HEADER + lmv + lrt)), seconds: v.getFloat64(28, true) };
}
