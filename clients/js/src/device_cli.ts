/**
 * The Node device command (Node only: file system): `node dist/src/gateway.js --server URL --token FILE
 * [--data FILE.npz] [--threads N] [--max-tasks N] [--patience S] [--upload auto|compact|json]
 * [--download lean|full] [--quiet]` (also `baffle-client device ...`). `--download lean` (the default): an int8
 * run's FedSGD tasks download integers and only the bundle files the runtime loads (docs/gateway.md, "Lean
 * downloads"); `full`: float32 weights and every bundle file.
 *
 * Every mistake ends in one `baffle-client device: error: ...` line saying what to do, exit code 2: an
 * unknown flag (with the closest known one), a token file that is missing (its resolved path), the
 * server's tokens.json, or not a device token (checked before any request, as the Python device does),
 * a server refusing the token (401/403), no data from a server without --demo-data.
 *
 * `--data FILE.npz` is the file the Python device reads (`np.savez(FILE, x=..., y=...)`: x (N, C, H, W)
 * float32 or float64, y (N,) integers; stored or deflated members). Its batches walk the samples in file
 * order: local step s of round r takes positions [(r * L + s) * B, ...) modulo N (B = the run's batch
 * size, L = its local steps) — not the Python device's seeded permutation, so shuffle the file once.
 */
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import { inflateRawSync } from "node:zlib";
import type { Batch, OrtModule } from "./client.js";
import type { Json } from "./json.js";
import { GatewayError, runDevice } from "./gateway.js";

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

const FLAGS: Record<string, "value" | "switch"> = {
  "--server": "value", "--token": "value", "--data": "value", "--threads": "value", "--max-tasks": "value",
  "--patience": "value", "--upload": "value", "--download": "value", "--quiet": "switch",
};
export const USAGE = "usage: node dist/src/gateway.js --server URL --token FILE [--data FILE.npz] [--threads N] " +
  "[--max-tasks N] [--patience S] [--upload auto|compact|json] [--download lean|full] [--quiet]";
const TOKEN_PREFIX = "bfl_", MAX_TOKEN_CHARS = 256;
const TOKEN_HINT = "use a device token file (device-tokens/client-N.token from `baffle-edge tokens issue --clients N " +
  "--out-dir device-tokens`)";

function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) row.push(Math.min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1)));
    prev = row;
  }
  return prev[b.length];
}

/** " (did you mean X?)" for the closest of `choices` (at most a third of the word's letters differ), or "". */
export function didYouMean(word: string, choices: string[]): string {
  const best = choices.map((c) => [distance(word, c), c] as const).sort((p, q) => p[0] - q[0])[0];
  return best && best[0] <= Math.max(1, Math.floor(word.length / 3)) ? ` (did you mean ${best[1]}?)` : "";
}

/** The flags of `argv` (`--flag value`, `--flag=value`, switches); an unknown or incomplete one is a UsageError. */
export function parseFlags(argv: string[]): Record<string, string | true> {
  const out: Record<string, string | true> = {};
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].startsWith("--") && argv[i].includes("=") ? argv[i].split(/=(.*)/s, 2) : [argv[i], undefined];
    const kind = FLAGS[flag];
    if (!kind) throw new UsageError(`unknown argument ${flag}${didYouMean(flag, Object.keys(FLAGS))}; ${USAGE}`);
    if (kind === "switch") { out[flag] = true; continue; }
    const value = inline ?? argv[++i];
    if (value === undefined || (inline === undefined && value.startsWith("--"))) throw new UsageError(`${flag} needs a value; ${USAGE}`);
    out[flag] = value;
  }
  for (const need of ["--server", "--token"]) if (!(need in out)) throw new UsageError(`${need} is required; ${USAGE}`);
  return out;
}

/** The bearer token in a device token file's text, refused before any request if it cannot be one. */
export function parseDeviceToken(text: string, source: string): string {
  const token = text.trim();
  if (!token) throw new UsageError(`token file ${source} is empty; ${TOKEN_HINT}`);
  if (token.startsWith("{")) {
    let store = false;
    try { store = typeof (JSON.parse(token) as { devices?: unknown }).devices === "object"; } catch { /* not JSON */ }
    if (store) throw new UsageError(`${source} is the server's tokens.json (token hashes), not a device token: ${TOKEN_HINT}`);
  }
  const bad = [...token].find((c) => c.charCodeAt(0) < 0x21 || c.charCodeAt(0) > 0x7e);
  if (bad !== undefined) {
    throw new UsageError(`token file ${source} holds ${JSON.stringify(bad)}, which an HTTP header cannot carry: a device ` +
      `token is one line of letters, digits, '-' and '_'; ${TOKEN_HINT}`);
  }
  if (!token.startsWith(TOKEN_PREFIX) || token.length > MAX_TOKEN_CHARS) {
    throw new UsageError(`token file ${source} does not hold a baffle-edge device token (one line starting ` +
      `'${TOKEN_PREFIX}', at most ${MAX_TOKEN_CHARS} characters); ${TOKEN_HINT}`);
  }
  return token;
}

/** A file the command was given, read; a missing one is a UsageError naming its resolved path. */
async function readGiven(path: string, what: string, todo: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new UsageError(`${what} ${resolve(path)} does not exist (relative paths start at ${process.cwd()}): ${todo}`);
    if (code === "EISDIR") throw new UsageError(`${what} ${resolve(path)} is a folder: ${todo}`);
    throw e;
  }
}

export interface OwnData { x: Float32Array; shape: number[]; y: Int32Array }

/** The arrays x and y of an .npz file (numpy's savez / savez_compressed). */
export function parseNpz(bytes: Uint8Array, source: string): OwnData {
  const members = zipMembers(bytes, source);
  const x = members.get("x.npy"), y = members.get("y.npy");
  if (!x || !y) throw new UsageError(`${source}: expected arrays 'x' (N, C, H, W) and 'y' (N,), found ${[...members.keys()].join(", ") || "none"}`);
  const [xs, xv] = npy(x, source), [ys, yv] = npy(y, source);
  if (xs.length !== 4 || ys.length !== 1 || xs[0] !== ys[0] || ys[0] === 0) {
    throw new UsageError(`${source}: x must be (N, C, H, W) and y (N,), got (${xs}) and (${ys})`);
  }
  return { x: Float32Array.from(xv), shape: xs, y: Int32Array.from(yv) };
}

function zipMembers(b: Uint8Array, source: string): Map<string, Uint8Array> {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let eocd = -1;
  for (let i = b.length - 22; i >= Math.max(0, b.length - 65_557); i--) if (v.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  if (eocd < 0) throw new UsageError(`${source} is not an .npz file (no zip directory): save it with np.savez(FILE, x=x, y=y)`);
  const out = new Map<string, Uint8Array>();
  let p = v.getUint32(eocd + 16, true);
  for (let n = v.getUint16(eocd + 10, true); n > 0; n--) {
    const method = v.getUint16(p + 10, true), size = v.getUint32(p + 20, true), nameLen = v.getUint16(p + 28, true);
    const name = new TextDecoder().decode(b.subarray(p + 46, p + 46 + nameLen)), local = v.getUint32(p + 42, true);
    const start = local + 30 + v.getUint16(local + 26, true) + v.getUint16(local + 28, true);
    const raw = b.subarray(start, start + size);
    if (method !== 0 && method !== 8) throw new UsageError(`${source}: member ${name} uses zip method ${method} (np.savez writes 0 or 8)`);
    out.set(name, method === 8 ? new Uint8Array(inflateRawSync(raw)) : raw);
    p += 46 + nameLen + v.getUint16(p + 30, true) + v.getUint16(p + 32, true);
  }
  return out;
}

/** shape and values of a little-endian, C-order .npy array of float32/64 or (u)int8..64. */
function npy(b: Uint8Array, source: string): [number[], ArrayLike<number>] {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (b[0] !== 0x93 || new TextDecoder().decode(b.subarray(1, 6)) !== "NUMPY") throw new UsageError(`${source}: a member is not an .npy array`);
  const [hlen, hstart] = b[6] === 1 ? [v.getUint16(8, true), 10] : [v.getUint32(8, true), 12];
  const header = new TextDecoder().decode(b.subarray(hstart, hstart + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1], shape = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (/'fortran_order':\s*True/.test(header) || !descr || shape === undefined) throw new UsageError(`${source}: unsupported .npy header ${header.trim()}`);
  const dims = shape.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = dims.reduce((a, d) => a * d, 1), at = hstart + hlen, buf = b.slice(at, at + count * Number(descr.slice(2))).buffer;
  const types: Record<string, (buf: ArrayBuffer) => ArrayLike<number>> = {
    "<f4": (x) => new Float32Array(x), "<f8": (x) => new Float64Array(x), "|u1": (x) => new Uint8Array(x), "|i1": (x) => new Int8Array(x),
    "<i4": (x) => new Int32Array(x), "<i8": (x) => Array.from(new BigInt64Array(x), Number), "<u8": (x) => Array.from(new BigUint64Array(x), Number),
  };
  if (!types[descr]) throw new UsageError(`${source}: arrays of ${descr} are not supported (x float32, y integers)`);
  return [dims, types[descr](buf)];
}

/** The batches of a task from the device's own data: local step s of round r takes positions
 * [(r * L + s) * B, ...) of the file's samples, wrapping around (B = min(batch size, N)). */
export function ownBatches(own: OwnData, task: { round: number; local_steps: number }, batchSize: number): Batch[] {
  const n = own.y.length, b = Math.min(batchSize, n), per = own.x.length / n;
  return Array.from({ length: task.local_steps }, (_, s) => {
    const x = new Float32Array(b * per), y = new Int32Array(b);
    for (let i = 0; i < b; i++) {
      const j = ((task.round * task.local_steps + s) * b + i) % n;
      x.set(own.x.subarray(j * per, (j + 1) * per), i * per);
      y[i] = own.y[j];
    }
    return { x, y };
  });
}

/** The command; resolves with the exit code. */
export async function main(argv: string[]): Promise<number> {
  const f = parseFlags(argv);
  const tokenFile = f["--token"] as string, dataFile = f["--data"] as string | undefined;
  const todo = "pass the file `baffle-edge tokens issue --out-dir DIR` wrote (DIR/client-N.token; run from the repo root, " +
    "or give an absolute path)";
  const token = parseDeviceToken((await readGiven(tokenFile, "token file", todo)).toString("utf8"), tokenFile);
  const own = dataFile ? parseNpz(new Uint8Array(await readGiven(dataFile, "data file", "pass an .npz with x and y")), dataFile) : undefined;
  const number = (flag: string) => {
    if (!(flag in f)) return undefined;
    const n = Number(f[flag]);
    if (!Number.isFinite(n) || n < 0) throw new UsageError(`${flag} needs a number >= 0, got ${JSON.stringify(f[flag])}`);
    return n;
  };
  const threads = number("--threads") ?? 1, maxTasks = number("--max-tasks"), patience = number("--patience");
  const upload = (f["--upload"] ?? "auto") as "auto" | "compact" | "json";
  if (!["auto", "compact", "json"].includes(upload)) throw new UsageError(`--upload must be auto, compact or json, got ${JSON.stringify(upload)}`);
  const download = (f["--download"] ?? "lean") as "lean" | "full";
  if (!["lean", "full"].includes(download)) throw new UsageError(`--download must be lean or full, got ${JSON.stringify(download)}`);
  const ort = await import("onnxruntime-node");
  let batchSize = 0;
  const summary = await runDevice({
    server: f["--server"] as string, token, ort: ort as unknown as OrtModule,
    sessionOptions: { intraOpNumThreads: threads, interOpNumThreads: 1 }, maxTasks, patience, upload, download,
    data: own ? async (task: Json) => ownBatches(own, task as unknown as { round: number; local_steps: number }, batchSize) : undefined,
    onEvent: (e) => {
      if (e.type === "config") batchSize = e.batchSize;
      if (f["--quiet"]) return;
      if (e.type === "accepted") console.error(`device: round ${e.round + 1}: report accepted (${(e.seconds * 1e3).toFixed(0)} ms)`);
      else if (e.type === "refused") console.error(`device: round ${e.round + 1}: refused: ${e.reason}`);
      else if (e.type === "fallback") console.error(`device: lean download refused (${e.reason}); downloading in full`);
      else if (e.type === "retry") console.error(`device: server unreachable (${e.reason}); retrying in ${e.delay.toFixed(1)} s`);
      else if (e.type === "config") console.error(`device: client ${e.client}, ${e.rounds} rounds`);
    },
  });
  console.log(JSON.stringify(summary));
  return 0;
}

/** `main` as a process: its exit code, or one error line (exit code 2 for a mistake or a refusal, 1 otherwise). */
export function runMain(argv: string[]): void {
  main(argv).then((c) => process.exit(c), (e) => {
    console.error(`baffle-client device: error: ${(e as Error).message}`);
    process.exit(e instanceof UsageError || e instanceof GatewayError ? 2 : 1);
  });
}
