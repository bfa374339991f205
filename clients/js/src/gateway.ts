/**
 * The device loop against `baffle-edge serve` (docs/gateway.md) with the platform's built-in
 * `fetch`: the same code in Node 20+ and in a browser tab.
 *
 *     loop:
 *         GET  /v1/task?wait=25             task | wait | done        (long poll)
 *         GET  /v1/weights/{version}        float32, checked: sha256 prefix = task.model_version
 *           or, lean (int8-step bundle, one local step; docs/gateway.md "Lean downloads"):
 *         GET  weights.int8.url?base=V      the integers, zlib delta against the payload held, checked
 *                                           against the offer's sha256 (lean.ts)
 *         GET  /v1/bundle/{gen}/{file}      when the generation changes; sha256 checked twice:
 *                                           against the task's list and against baffle.json; lean: only
 *                                           the files the runtime loads, zlib against the generation held
 *         batches: options.data(task), or GET /v1/data/{round} from a --demo-data server
 *         runTask(...) -> POST /v1/report   (compact, compact.ts, when the run's report_encoding is
 *                                           "compact"; else JSON; options.upload forces one)
 *
 * An unreachable or busy server (restarting with --resume; 503 or any 5xx) is retried for
 * `patience` seconds with capped exponential backoff and jitter (`backoff`, as the Python device:
 * a 503's Retry-After is honoured up to the cap); 429 waits for Retry-After; 401/403 end the loop
 * with a GatewayError.
 *
 * Node: `node dist/src/gateway.js --server URL --token FILE [--data FILE.npz] [--threads N] [--max-tasks N]`
 * (device_cli.ts).
 */
import type { InferenceSession } from "onnxruntime-common";
import { loadBundle, type Bundle, type TrainFormat } from "./bundle.js";
import { modelVersion, RoundSession, runTask, type Batch, type OrtModule } from "./client.js";
import { parseJson, stringifyJson, type Json } from "./json.js";
import { COMPACT_MEDIA_TYPE, encodeReport } from "./compact.js";
import { inflate as inflateTs, type Inflate } from "./inflate.js";
import { decodeIntegers, runtimeFiles, splitPayload, type IntSpec } from "./lean.js";
import { reportToJson, type ClientReport } from "./protocol.js";
import type { IntArray } from "./quant.js";
import { sha256Hex } from "./sha256.js";

export const BACKOFF_BASE = 0.2; // s: the first retry's delay
export const BACKOFF_CAP = 5; // s: the longest delay between two retries

/** Seconds before retry `attempt` (0-based): exponential from BACKOFF_BASE, capped at BACKOFF_CAP,
 * uniform in [d/2, d] (devices that retry together do not return together); Retry-After raises the floor. */
export function backoff(attempt: number, retryAfter: number | null = null, random: () => number = Math.random): number {
  let d = Math.min(BACKOFF_CAP, BACKOFF_BASE * 2 ** Math.min(attempt, 30));
  if (retryAfter !== null && Number.isFinite(retryAfter) && retryAfter >= 0) d = Math.min(BACKOFF_CAP, Math.max(d, retryAfter));
  return d / 2 + random() * (d / 2);
}

/** The device has no data and the server hands out none. */
export const NO_DATA = "the server hands out no data (not a --demo-data server): give the device its own data " +
  "(the Node command: --data FILE.npz with x (N, C, H, W) float32 and y (N,); runDevice: options.data), " +
  "or start the server with --demo-data";

/** Node's TLS verification failures (undici's error cause codes): a client-side trust problem, not an unreachable server. */
const TLS_UNTRUSTED = new Set(["SELF_SIGNED_CERT_IN_CHAIN", "DEPTH_ZERO_SELF_SIGNED_CERT", "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "CERT_HAS_EXPIRED", "CERT_NOT_YET_VALID", "ERR_TLS_CERT_ALTNAME_INVALID"]);

export class GatewayError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GatewayError";
  }
}

/** What `GET /v1/task` answers when a task is ready (other statuses: "wait", "done"). */
export interface TaskOffer {
  status: "task";
  round: number;
  rounds: number;
  task: Json;
  weights: { url: string; version: string; dtype: "float32"; count: number; int8?: IntSpec };
  bundle: null | { generation: number; format: TrainFormat; manifest: string;
                   files: Record<string, { url: string; sha256: string; bytes?: number }> };
  data: string | null;
  deadline_in: number | null;
  runtime: string;
}

export type GatewayEvent =
  | { type: "config"; client: number; rounds: number; batchSize: number }
  | { type: "task"; round: number; rounds: number }
  | { type: "accepted"; round: number; seconds: number; report: ClientReport }
  | { type: "refused"; round: number; status: number; reason: string }
  | { type: "retry"; reason: string; delay: number }
  | { type: "fallback"; round: number; reason: string }
  /** A download's body as it came (`what`: "weights" float32, "integers" lean, "bundle:NAME"; `encoding`: identity, zlib, zlib-dict:G, delta:V). */
  | { type: "download"; what: string; bytes: number; encoding: string }
  | { type: "done" };

export interface DeviceOptions {
  /** Base URL of the server, e.g. "https://gateway.example:8443" ("" = same origin in a browser). */
  server: string;
  /** This device's bearer token. */
  token: string;
  /** onnxruntime-node / -web / -react-native. */
  ort: OrtModule;
  sessionOptions?: InferenceSession.SessionOptions;
  /** The device's own batches for a task (one per local step); default: the server's demo data. */
  data?: (task: Json, offer: TaskOffer) => Promise<Batch[]>;
  /** Long-poll seconds of GET /v1/task (default 25). */
  poll?: number;
  /** Seconds the server may stay unreachable before the device gives up (default 120). */
  patience?: number;
  /** Stop after this many accepted reports (default: until the run is done). */
  maxTasks?: number;
  /** Runtime name recorded in reports (default: the client's, "onnxruntime-int8-js" / "onnxruntime-js"). */
  runtime?: string;
  onEvent?: (e: GatewayEvent) => void;
  /** Report encoding: "auto" (default: the run's train_config.report_encoding, compact or JSON), "compact", "json". */
  upload?: "auto" | "compact" | "json";
  /**
   * "lean" (default): an int8-step bundle's FedSGD task downloads the integers and only the bundle files
   * the runtime loads, zlib against what the device holds (docs/gateway.md, "Lean downloads"); a lean
   * download that fails its checks falls back to the full one (a "fallback" event). "full": float32
   * weights and every bundle file, plain.
   */
  download?: "lean" | "full";
  /** zlib inflate with a preset dictionary and a size cap (default: inflate.ts, plain TypeScript). */
  inflate?: Inflate;
  /** Injected fetch (default: globalThis.fetch). */
  fetch?: typeof fetch;
}

export interface DeviceSummary {
  accepted: number;
  refused: string[];
  /** Seconds from receiving each task to its report being accepted. */
  roundSeconds: number[];
}

const sleep = (s: number) => new Promise((ok) => setTimeout(ok, s * 1000));

function base64ToBytes(b64: string): Uint8Array {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Little-endian float32 bytes as a Float32Array (copied: aligned, independent of the buffer). */
export function f32(bytes: Uint8Array): Float32Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength >> 2);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}

async function reason(r: Response): Promise<string> {
  const text = await r.text();
  try {
    const d = JSON.parse(text) as { error?: string; reason?: string };
    return `${d.error}: ${d.reason}`;
  } catch {
    return text.slice(0, 200);
  }
}

/** A 401 / 403's reason and what to do about it (docs/gateway.md, "Refusals"). */
async function refusal(r: Response): Promise<string> {
  const why = await reason(r);
  if (r.status === 401) {
    return `${why}: this server does not know the token (unknown or revoked): pass the device-tokens/client-N.token ` +
      "that `baffle-edge tokens issue` wrote next to the server's --tokens file, or issue a new one with " +
      "`baffle-edge tokens issue --tokens tokens.json --client N --replace --out FILE`";
  }
  return why.startsWith("no-slot")
    ? `${why}: the token's client slot is not part of this run: use a token for a client below the server's --clients`
    : `${why}: this token may answer only its own client slot's task: use the token issued for that slot`;
}

export class GatewayDevice {
  private readonly fetch: typeof fetch;
  private weightsCache: [string, Float32Array] | null = null;
  private sessionCache: [number, RoundSession] | null = null;
  /** (model version, integer payload) of the last lean download: the base of the next delta. */
  private intsCache: [string, Uint8Array] | null = null;
  /** The bundle generation held and its files' bytes: the dictionaries of the next lean bundle download. */
  private bundleBytes: [number, Map<string, Uint8Array>] | null = null;
  private readonly inflate: Inflate;

  constructor(readonly options: DeviceOptions) {
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.inflate = options.inflate ?? inflateTs;
    const d = options.download ?? "lean";
    if (d !== "lean" && d !== "full") throw new GatewayError(`download must be "lean" or "full", got ${JSON.stringify(d)}`);
  }

  private get lean(): boolean {
    return (this.options.download ?? "lean") === "lean";
  }

  private url(path: string): string {
    return this.options.server.replace(/\/$/, "") + path;
  }

  /** One request, retried while the server is unreachable, restarting (5xx) or rate-limiting. */
  async request(path: string, init: RequestInit = {}): Promise<Response> {
    const giveUp = Date.now() + 1000 * (this.options.patience ?? 120);
    for (let attempt = 0; ; attempt++) {
      let why: string;
      let retryAfter: number | null = null;
      try {
        const r = await this.fetch(this.url(path), {
          ...init, headers: { ...(init.headers as Record<string, string> | undefined), Authorization: `Bearer ${this.options.token}` },
        });
        if (r.status === 429) {
          await r.arrayBuffer();
          await sleep(Math.min(10, Number(r.headers.get("retry-after") ?? "1") || 1));
          continue;
        }
        if (r.status < 500) return r;
        why = `HTTP ${r.status}`;
        const ra = r.headers.get("retry-after");
        retryAfter = ra === null || ra === "" ? null : Number(ra);
        await r.arrayBuffer();
      } catch (e) {
        if (e instanceof TypeError && !e.cause && /header/i.test(e.message)) {  // never sent: not the server's fault
          throw new GatewayError(`cannot send a request to ${this.options.server} (${e.message.slice(0, 120)}): a ` +
                                 "client-side mistake, not the server; check the server URL and the token");
        }
        const code = String(((e as Error).cause as { code?: string } | undefined)?.code ?? "");
        if (TLS_UNTRUSTED.has(code)) {  // the server answered, with a certificate this device does not trust
          throw new GatewayError(`the server's TLS certificate is not trusted (${code}): in Node start the device ` +
                                 "with NODE_EXTRA_CA_CERTS=cert.pem (the server's certificate or its CA); in a " +
                                 "browser open the server's URL once and trust it");
        }
        why = String((e as Error).cause ?? (e as Error).message ?? e);
      }
      const remaining = (giveUp - Date.now()) / 1000;
      if (remaining <= 0) throw new GatewayError(`server ${this.options.server} unreachable (${why})`);
      const delay = Math.min(remaining, backoff(attempt, retryAfter));
      this.options.onEvent?.({ type: "retry", reason: why, delay });
      await sleep(delay);
    }
  }

  private async response(path: string, what: string): Promise<Response> {
    const r = await this.request(path);
    if (r.status === 401 || r.status === 403) throw new GatewayError(`${what}: HTTP ${r.status} ${await refusal(r)}`);
    if (!r.ok) throw new Error(`${what}: HTTP ${r.status} ${await reason(r)}`);
    return r;
  }

  private async get(path: string, what: string): Promise<Uint8Array> {
    return new Uint8Array(await (await this.response(path, what)).arrayBuffer());
  }

  private async getJson(path: string, what: string): Promise<Json> {
    return parseJson(new TextDecoder().decode(await this.get(path, what)));
  }

  async weights(offer: TaskOffer): Promise<Float32Array> {
    const w = offer.weights;
    if (this.weightsCache && this.weightsCache[0] === w.version) return this.weightsCache[1];
    const body = await this.get(w.url, "weights");
    this.options.onEvent?.({ type: "download", what: "weights", bytes: body.length, encoding: "identity" });
    const arr = f32(body);
    const got = modelVersion(arr);
    if (arr.length !== w.count || got !== w.version) {
      throw new Error(`weights: ${arr.length} values hashing to ${got}; the task names ${w.count} / ${w.version}`);
    }
    this.weightsCache = [w.version, arr];
    return arr;
  }

  /**
   * A lean download's integers (docs/gateway.md, "Lean downloads"): a zlib delta against the payload
   * of the version held (or the whole payload), inflated to at most the offer's `bytes`, checked against
   * its sha256, split by the session's quantization table. An Error (never unverified integers) otherwise.
   */
  async integers(offer: TaskOffer, rs: RoundSession): Promise<IntArray[]> {
    const spec = offer.weights.int8;
    if (!spec || !rs.table) throw new Error("integers: the offer has no weights.int8 or the session runs float weights");
    if (this.intsCache && this.intsCache[0] === offer.weights.version) return splitPayload(rs.table, this.intsCache[1]);
    const base = this.intsCache;
    const sep = spec.url.includes("?") ? "&" : "?";
    const r = await this.response(base ? `${spec.url}${sep}base=${encodeURIComponent(base[0])}` : spec.url, "integers");
    const body = new Uint8Array(await r.arrayBuffer()), used = r.headers.get("x-baffle-base") ?? "none";
    this.options.onEvent?.({ type: "download", what: "integers", bytes: body.length, encoding: used === "none" ? "zlib" : `delta:${used}` });
    const payload = decodeIntegers(body, used, base, spec, this.inflate);
    const q = splitPayload(rs.table, payload);
    this.intsCache = [offer.weights.version, payload];
    return q;
  }

  /** A bundle file: lean, zlib against the held generation's file (or plain zlib); else (or if that fails its check) plain. */
  private async bundleFile(offer: TaskOffer, name: string): Promise<Uint8Array> {
    const b = offer.bundle!, f = b.files[name];
    if (!f) throw new Error(`bundle generation ${b.generation} has no file ${name}`);
    if (this.lean && typeof f.bytes === "number") {
      const held = this.bundleBytes?.[1].get(name);
      const gen = this.bundleBytes?.[0];
      try {
        const r = await this.response(held ? `${f.url}?base=${gen}` : `${f.url}?z=1`, `bundle file ${name}`);
        const enc = r.headers.get("x-baffle-encoding") ?? "identity", body = new Uint8Array(await r.arrayBuffer());
        this.options.onEvent?.({ type: "download", what: `bundle:${name}`, bytes: body.length, encoding: enc });
        if (enc !== "identity" && enc !== "zlib" && enc !== `zlib-dict:${gen}`) throw new Error(`unexpected encoding ${enc}`);
        const bytes = enc === "identity" ? body
          : this.inflate(body, { size: f.bytes, ...(enc === "zlib" ? {} : { dictionary: held }) });
        if (sha256Hex(bytes) !== f.sha256) throw new Error("sha256 differs from the task's");
        return bytes;
      } catch (e) {
        if (e instanceof GatewayError) throw e;
        this.options.onEvent?.({ type: "fallback", round: offer.round, reason: `bundle file ${name}: ${(e as Error).message}` });
      }
    }
    const bytes = await this.get(f.url, `bundle file ${name}`);
    this.options.onEvent?.({ type: "download", what: `bundle:${name}`, bytes: bytes.length, encoding: "identity" });
    if (sha256Hex(bytes) !== f.sha256) throw new Error(`bundle file ${name}: sha256 differs from the task's`);
    return bytes;
  }

  async session(offer: TaskOffer): Promise<RoundSession> {
    const b = offer.bundle;
    if (!b) throw new GatewayError("the run's runtime exports no bundle: this client needs an onnx or onnx-int8 run");
    if (this.sessionCache && this.sessionCache[0] === b.generation) return this.sessionCache[1];
    const got = new Map<string, Uint8Array>();
    const bundle: Bundle = await loadBundle(async (name) => {
      const bytes = await this.bundleFile(offer, name);
      got.set(name, bytes);
      return bytes;
    }, { formats: [b.format], ...(this.lean ? { files: (meta: Record<string, Json>) => runtimeFiles(meta, b.format) } : {}) });
    const rs = await RoundSession.open(this.options.ort, bundle, b.format, this.options.sessionOptions ?? {});
    this.sessionCache = [b.generation, rs];
    this.bundleBytes = [b.generation, got];
    return rs;
  }

  /** Lean for this task: the "lean" option, an int8-step session, one local step, a server offering integers. */
  leanTask(offer: TaskOffer, rs: RoundSession): boolean {
    const steps = (offer.task as { local_steps?: number }).local_steps;
    return this.lean && offer.weights.int8 !== undefined && rs.table !== null && rs.domain === "int8-step" && steps === 1;
  }

  /** The report of one task: lean when it can be (a failed lean download falls back to the float weights). */
  private async answer(offer: TaskOffer): Promise<ClientReport> {
    const rs = await this.session(offer);
    const batches = await this.batches(offer);
    const runtime = this.options.runtime ? { runtime: this.options.runtime } : {};
    if (this.leanTask(offer, rs)) {
      let integers: IntArray[] | null = null;
      try {
        integers = await this.integers(offer, rs);
      } catch (e) {
        if (e instanceof GatewayError) throw e;
        this.intsCache = null;  // the next delta starts afresh
        this.options.onEvent?.({ type: "fallback", round: offer.round, reason: (e as Error).message });
      }
      if (integers) return runTask(stringifyJson(offer.task), null, batches, rs, { ...runtime, integers });
    }
    return runTask(stringifyJson(offer.task), await this.weights(offer), batches, rs, runtime);
  }

  async batches(offer: TaskOffer): Promise<Batch[]> {
    if (this.options.data) return this.options.data(offer.task, offer);
    if (!offer.data) throw new GatewayError(NO_DATA);
    const d = JSON.parse(new TextDecoder().decode(await this.get(offer.data, "data"))) as
      { batches: { shape: number[]; x: string; y: number[] }[] };
    return d.batches.map((b) => ({ x: f32(base64ToBytes(b.x)), y: Int32Array.from(b.y) }));
  }

  /** Answer tasks until the server says done (or maxTasks reports were accepted). */
  async run(): Promise<DeviceSummary> {
    const ev = this.options.onEvent ?? (() => {});
    const summary: DeviceSummary = { accepted: 0, refused: [], roundSeconds: [] };
    const config = await this.getJson("/v1/config", "config") as
      { client: number; demo_data?: boolean; train_config: { rounds: number; batch_size: number; report_encoding?: string } };
    const upload = this.options.upload ?? "auto";
    const compact = upload === "compact" || (upload === "auto" && config.train_config.report_encoding === "compact");
    if (!this.options.data && config.demo_data === false) throw new GatewayError(NO_DATA);
    ev({ type: "config", client: config.client, rounds: config.train_config.rounds, batchSize: config.train_config.batch_size });
    const poll = this.options.poll ?? 25;
    while (this.options.maxTasks === undefined || summary.accepted < this.options.maxTasks) {
      const offer = await this.getJson(`/v1/task?wait=${poll}`, "task") as unknown as TaskOffer | { status: "wait" | "done" };
      if (offer.status === "done") break;
      if (offer.status !== "task") continue;
      const start = performance.now();
      ev({ type: "task", round: offer.round, rounds: offer.rounds });
      let report: ClientReport;
      try {
        report = await this.answer(offer);
      } catch (e) {
        if (e instanceof GatewayError) throw e;
        summary.refused.push(`round ${offer.round + 1}: ${(e as Error).message}`);  // a failed check: skip the round
        ev({ type: "refused", round: offer.round, status: 0, reason: (e as Error).message });
        continue;
      }
      const r = await this.request("/v1/report", compact
        ? { method: "POST", body: encodeReport(report), headers: { "Content-Type": COMPACT_MEDIA_TYPE } }
        : { method: "POST", body: reportToJson(report), headers: { "Content-Type": "application/json" } });
      if (r.status === 202) {
        await r.arrayBuffer();
        const seconds = (performance.now() - start) / 1000;
        summary.accepted++;
        summary.roundSeconds.push(seconds);
        ev({ type: "accepted", round: offer.round, seconds, report });
      } else {
        if (r.status === 401 || r.status === 403) throw new GatewayError(`report: HTTP ${r.status} ${await refusal(r)}`);
        const why = await reason(r);
        summary.refused.push(`round ${offer.round + 1}: HTTP ${r.status} ${why}`);
        ev({ type: "refused", round: offer.round, status: r.status, reason: why });
      }
    }
    ev({ type: "done" });
    return summary;
  }
}

/** Run a device until the server's run is done. */
export function runDevice(options: DeviceOptions): Promise<DeviceSummary> {
  return new GatewayDevice(options).run();
}

const isMain = typeof process !== "undefined" && Array.isArray(process.argv) && process.argv[1] !== undefined &&
  import.meta.url === (await import("node:url")).pathToFileURL(process.argv[1]).href;
if (isMain) void import("./device_cli.js").then((m) => m.runMain(process.argv.slice(2)));  // the Node command: device_cli.ts
