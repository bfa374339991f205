/**
 * A bundle folder (export/bundle.py) read through any byte source: every file is checked against
 * the sha256 and size that `baffle.json` lists before anything uses it, and the parameter table
 * and the int8 quantization tables are mapped and validated.
 */
import { parseJson, type Json } from "./json.js";
import { qtensorFromJson, type QTensor } from "./quant.js";
import { sha256Hex } from "./sha256.js";

export const SCHEMA_VERSION = 1;
/** Formats this client runs: float graph inputs ("onnx") and int8 integers as inputs ("onnx-int8"). */
export type TrainFormat = "onnx" | "onnx-int8";

/** Returns the bytes of a bundle file by name (Node: fs; web: fetch; React Native: assets). */
export type BundleSource = (name: string) => Promise<Uint8Array>;

export interface Parameter { name: string; shape: number[]; offset: number; size: number }

/** A bundle file that does not match baffle.json, or a baffle.json this client cannot use. */
export class BundleError extends Error {
  constructor(msg: string) {
    super(msg);
    this.name = "BundleError";
  }
}

type Obj = Record<string, Json>;

function obj(v: Json | undefined, what: string): Obj {
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new BundleError(`baffle.json: ${what} must be an object`);
  return v as Obj;
}

export class Bundle {
  readonly parameters: Parameter[];
  readonly dim: number;
  readonly inputName: string;
  readonly outputName: string;
  readonly inputShape: number[]; // (C, H, W) of one sample
  readonly numClasses: number;

  constructor(readonly meta: Obj, private readonly verified: Map<string, Uint8Array>) {
    const model = obj(meta.model, "model");
    const input = obj(meta.input, "input"), output = obj(meta.output, "output");
    this.inputName = String(input.name);
    this.outputName = String(output.name);
    this.inputShape = (input.shape as Json[]).slice(1).map(Number);
    this.numClasses = Number(model.num_classes);
    if (!Array.isArray(meta.parameters)) throw new BundleError("baffle.json: parameters must be a list");
    let offset = 0;
    this.parameters = (meta.parameters as Obj[]).map((p) => {
      const shape = (p.shape as number[]).map(Number);
      const size = shape.reduce((a, b) => a * b, 1);
      if (p.offset !== offset || p.size !== size) {
        throw new BundleError(`baffle.json: parameter ${String(p.name)} has offset ${String(p.offset)} / size ` +
          `${String(p.size)}, expected ${offset} / ${size} (parameters must tile the flat vector in order)`);
      }
      offset += size;
      return { name: String(p.name), shape, offset: offset - size, size };
    });
    this.dim = offset;
    if (model.parameters !== this.dim) {
      throw new BundleError(`baffle.json: model.parameters is ${String(model.parameters)}, the table sums to ${this.dim}`);
    }
  }

  get formats(): string[] {
    return Object.keys(obj(this.meta.formats, "formats"));
  }

  format(fmt: string): Obj {
    const formats = obj(this.meta.formats, "formats");
    if (!(fmt in formats)) {
      throw new BundleError(`bundle has no ${JSON.stringify(fmt)} format (has: ${this.formats.join(", ")})`);
    }
    return obj(formats[fmt], `formats.${fmt}`);
  }

  /** The perturbation domain a format's train graph is fed in ("float" or "int8-step"). */
  domain(fmt: string): string {
    return String(this.format(fmt).domain);
  }

  /** Verified bytes of a file listed in baffle.json. */
  file(name: string): Uint8Array {
    const b = this.verified.get(name);
    if (!b) throw new BundleError(`bundle file ${name} was not loaded (loadBundle's formats option)`);
    return b;
  }

  /** Verified bytes of a format's graph with trainable tensors as inputs. */
  trainGraph(fmt: TrainFormat): Uint8Array {
    const files = obj(this.format(fmt).files, `formats.${fmt}.files`);
    return this.file(String(files.train));
  }

  /** The int8 table of a format, in parameter order. */
  quantTable(fmt: TrainFormat = "onnx-int8"): QTensor[] {
    const rows = this.format(fmt).quantization;
    if (!Array.isArray(rows)) throw new BundleError(`baffle.json: formats.${fmt} has no quantization table`);
    const table = rows.map((r) => qtensorFromJson(obj(r, "quantization row")));
    let offset = 0;
    for (const t of table) {
      if (t.offset !== offset) throw new BundleError(`quantization table: ${t.name} at offset ${t.offset}, expected ${offset}`);
      offset += t.size;
    }
    if (offset !== this.dim) throw new BundleError(`quantization table covers ${offset} values, the model has ${this.dim}`);
    return table;
  }
}

/** Strict UTF-8 decoding; Hermes (React Native) has no TextDecoder, so decode by hand there. */
export function utf8(bytes: Uint8Array): string {
  if (typeof TextDecoder !== "undefined") return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  let out = "";
  for (let i = 0; i < bytes.length;) {
    const b = bytes[i];
    const n = b < 0x80 ? 0 : b >= 0xc2 && b < 0xe0 ? 1 : b >= 0xe0 && b < 0xf0 ? 2 : b >= 0xf0 && b < 0xf5 ? 3 : -1;
    if (n < 0) throw new TypeError(`invalid UTF-8 at byte ${i}`);
    let cp = n === 0 ? b : b & (0x3f >> n);
    for (let j = 1; j <= n; j++) {
      const c = bytes[i + j];
      if (c === undefined || (c & 0xc0) !== 0x80) throw new TypeError(`invalid UTF-8 at byte ${i + j}`);
      cp = (cp << 6) | (c & 0x3f);
    }
    if ((n === 2 && (cp < 0x800 || (cp >= 0xd800 && cp < 0xe000))) || (n === 3 && (cp < 0x10000 || cp > 0x10ffff))) {
      throw new TypeError(`invalid UTF-8 at byte ${i}`);
    }
    out += String.fromCodePoint(cp);
    i += n + 1;
  }
  return out;
}

function checkName(name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name)) throw new BundleError(`baffle.json lists a bad file name ${JSON.stringify(name)}`);
  return name;
}

/**
 * Read `baffle.json` and every file it lists (or only those of `formats` plus the spec texts, or
 * only the names `files(meta)` returns),
 * checking each one's sha256 and size. A mismatch is a BundleError naming the file: a tampered or
 * truncated bundle is never loaded.
 */
export async function loadBundle(source: BundleSource | Record<string, Uint8Array>,
                                 options: { formats?: TrainFormat[]; files?: (meta: Obj) => string[] } = {}): Promise<Bundle> {
  const read: BundleSource = typeof source === "function" ? source : async (name) => {
    const b = source[name];
    if (!b) throw new BundleError(`bundle is missing ${name}`);
    return b;
  };
  let meta: Json;
  try {
    meta = parseJson(utf8(await read("baffle.json")));
  } catch (e) {
    throw new BundleError(`baffle.json: not valid JSON (${(e as Error).message})`);
  }
  const m = obj(meta, "the document");
  if (m.schema_version !== SCHEMA_VERSION) {
    throw new BundleError(`baffle.json: schema_version ${JSON.stringify(m.schema_version)} is not supported (expected ${SCHEMA_VERSION})`);
  }
  const listed = obj(m.files, "files");
  let wanted = Object.keys(listed);
  if (options.formats) {
    const formats = obj(m.formats, "formats");
    const names = new Set<string>();
    for (const fmt of options.formats) {
      if (!(fmt in formats)) throw new BundleError(`bundle has no ${JSON.stringify(fmt)} format (has: ${Object.keys(formats).join(", ")})`);
      for (const f of Object.values(obj(obj(formats[fmt], fmt).files, `${fmt}.files`))) names.add(String(f));
    }
    wanted = wanted.filter((n) => names.has(n) || n.endsWith(".md"));
  }
  if (options.files) {  // only these (a lean device: the graphs its runtime loads, lean.ts runtimeFiles)
    const only = new Set(options.files(m));
    wanted = wanted.filter((n) => only.has(n));
  }
  const verified = new Map<string, Uint8Array>();
  for (const name of wanted) {
    const want = obj(listed[checkName(name)], `files.${name}`);
    const bytes = await read(name);
    if (typeof want.bytes === "number" && bytes.length !== want.bytes) {
      throw new BundleError(`${name}: ${bytes.length} bytes, baffle.json says ${want.bytes} (corrupt or modified file)`);
    }
    if (sha256Hex(bytes) !== want.sha256) {
      throw new BundleError(`${name}: sha256 does not match baffle.json (corrupt or modified file)`);
    }
    verified.set(name, bytes);
  }
  return new Bundle(m, verified);
}
