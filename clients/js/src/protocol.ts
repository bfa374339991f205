/**
 * The wire protocol (baffle_edge/protocol.py): a RoundTask in, a ClientReport out, both JSON.
 * The task is validated as strictly as the Python server does, plus the device-side bound
 * `local_steps * k <= 2^32` (the noise counter word k' = step*K + k is 32-bit).
 */
import { parseJson, stringifyJson, type Json } from "./json.js";
import type { NoiseKind } from "./noise.js";

/** Protocol versions this client answers (a report carries its task's version). */
export const PROTOCOL_VERSIONS = [1, 2] as const;
export const MAX_K = 1_000_000;

export type Scheme = "forward" | "central";
export type NoiseScope = "client" | "shared";
export type Domain = "float" | "int8-step";
export type StepEstimator = "rms-step" | "per-step";
export type Baseline = "base" | "leave-one-out";
/** The task's noise: isotropic (every parameter) or one output-channel block per perturbation (docs/noise.md 8-11). */
export type TaskNoise = NoiseKind | "block";
export const MAX_BLOCK_MODULES = 4096;
const MAX_BLOCK_STEPS = 127; // an int8 weight's whole range (protocol.py)

export interface RoundTask {
  version: number;
  round: number;
  client: number;
  seed: bigint; // unsigned 64-bit: parse with parseTask, never JSON.parse (it rounds above 2^53)
  k: number;
  sigma: number;
  scheme: Scheme;
  noise: TaskNoise;
  noise_scope: NoiseScope;
  domain: Domain;
  estimator: StepEstimator;
  baseline: Baseline;
  local_steps: number;
  model_version: string;
  local_lr?: number; // protocol 2: FedAvg local step size (>= 0)
  clip?: number | null; // protocol 2: inf-norm clip of each local estimate (null = off)
  block_weights?: number[]; // block noise: draw weight per module, block-table order (absent: by block size)
  max_block_steps?: number; // int8-step block noise: at most this many whole steps per block (absent: no cap)
}

export interface ClientReport {
  version: number;
  round: number;
  client: number;
  losses: number[]; // float64: local_steps x (K forward | 2K central), see protocol.py
  base_losses: number[]; // float64: L(w) per local step (forward scheme)
  num_samples: number;
  model_version: string;
  runtime: string;
  seconds: number;
}

/** A bad task, report or input: the message names the field and what was expected. */
export class ProtocolError extends Error {
  constructor(field: string, msg: string) {
    super(`${field}: ${msg}`);
    this.name = "ProtocolError";
  }
}

const FIELDS = ["version", "round", "client", "seed", "k", "sigma", "scheme", "noise", "noise_scope", "domain",
  "estimator", "baseline", "local_steps", "model_version", "local_lr", "clip", "block_weights", "max_block_steps"];

function req(cond: boolean, field: string, msg: string): asserts cond {
  if (!cond) throw new ProtocolError(field, msg);
}

function show(v: unknown): string {
  return typeof v === "bigint" ? v.toString() : JSON.stringify(v) ?? String(v);
}

function int(d: Record<string, unknown>, name: string, lo: number, hi: number): number {
  const v = d[name];
  req(typeof v === "number" && Number.isInteger(v), name, `expected an integer, got ${show(v)}`);
  req(v >= lo && v <= hi, name, `${v} outside [${lo}, ${hi}]`);
  return v;
}

function num(d: Record<string, unknown>, name: string, positive = false): number {
  const v = d[name];
  req(typeof v === "number" && Number.isFinite(v), name, `expected a finite number, got ${show(v)}`);
  if (positive) req(v > 0, name, `must be > 0, got ${v}`);
  return v;
}

function oneOf<T extends string>(d: Record<string, unknown>, name: string, values: readonly T[]): T {
  const v = d[name];
  req(typeof v === "string" && (values as readonly string[]).includes(v), name,
    `${show(v)} is not one of ${JSON.stringify(values)}`);
  return v as T;
}

/** Parse and validate a RoundTask from its JSON text (or an object already parsed by parseJson). */
export function parseTask(input: string | Json | RoundTask): RoundTask {
  const d = (typeof input === "string" ? parseJson(input) : input) as Record<string, unknown>;
  req(d !== null && typeof d === "object" && !Array.isArray(d), "task", "expected a JSON object");
  const version = d.version;
  req((PROTOCOL_VERSIONS as readonly unknown[]).includes(version), "version",
    `protocol version ${show(version)} is not supported (this client speaks ${PROTOCOL_VERSIONS.join(", ")})`);
  const unknown = Object.keys(d).filter((f) => !FIELDS.includes(f));
  req(unknown.length === 0, "task", `unknown fields ${JSON.stringify(unknown.sort())}`);
  const seed = d.seed;
  req((typeof seed === "bigint" || (typeof seed === "number" && Number.isSafeInteger(seed))), "seed",
    `expected an unsigned 64-bit integer, got ${show(seed)}`);
  const s = BigInt(seed as bigint | number);
  req(s >= 0n && s < 1n << 64n, "seed", `${s} outside [0, 2^64 - 1]`);
  const task: RoundTask = {
    version: version as number,
    round: int(d, "round", 0, 2 ** 32 - 1),
    client: int(d, "client", 0, 2 ** 32 - 2),
    seed: s,
    k: int(d, "k", 1, MAX_K),
    sigma: num(d, "sigma", true),
    scheme: oneOf(d, "scheme", ["forward", "central"] as const),
    noise: oneOf(d, "noise", ["gaussian", "rademacher", "block"] as const),
    noise_scope: oneOf(d, "noise_scope", ["client", "shared"] as const),
    domain: oneOf(d, "domain", ["float", "int8-step"] as const),
    estimator: oneOf(d, "estimator", ["rms-step", "per-step"] as const),
    baseline: oneOf(d, "baseline", ["base", "leave-one-out"] as const),
    local_steps: int(d, "local_steps", 1, 10_000),
    model_version: "",
  };
  const mv = d.model_version;
  req(typeof mv === "string" && mv.length <= 256, "model_version", `expected a string of <= 256 chars, got ${show(mv)}`);
  task.model_version = mv;
  req(task.baseline !== "leave-one-out" || task.k >= 2, "baseline", "leave-one-out needs k >= 2 perturbations");
  req(task.local_steps * task.k <= 2 ** 32, "k", `local_steps * k = ${task.local_steps * task.k} exceeds 2^32: the ` +
    "noise counter word k' = step*K + k would wrap");
  if (task.version >= 2) {  // protocol 2 always carries both (clip may be null)
    req(d.local_lr !== undefined, "local_lr", "missing (protocol 2 tasks carry the FedAvg local step size)");
    req(d.clip !== undefined, "clip", "missing (protocol 2 tasks carry the clip, null = off)");
  }
  if (d.local_lr !== undefined) {
    task.local_lr = num(d, "local_lr");
    req(task.local_lr >= 0, "local_lr", `must be >= 0, got ${task.local_lr}`);
  }
  if (d.clip !== undefined && d.clip !== null) task.clip = num(d, "clip", true);
  else if (d.clip === null) task.clip = null;
  if (d.block_weights !== undefined && d.block_weights !== null) {
    const v = d.block_weights;
    req(task.noise === "block", "block_weights", "only block noise draws blocks");
    req(Array.isArray(v) && v.length > 0 && v.length <= MAX_BLOCK_MODULES, "block_weights",
      `expected a list of 1..${MAX_BLOCK_MODULES} integers, got ${show(v).slice(0, 200)}`);
    req(v.every((x) => typeof x === "number" && Number.isInteger(x) && x >= 1 && x < 2 ** 32), "block_weights",
      "every weight must be an integer in [1, 2^32)");
    task.block_weights = v.slice() as number[];
  }
  if (d.max_block_steps !== undefined && d.max_block_steps !== null) {
    const v = d.max_block_steps;
    req(task.noise === "block" && task.domain === "int8-step", "max_block_steps", "only int8-step block noise moves blocks by whole steps");
    req(typeof v === "number" && Number.isInteger(v) && v >= 1 && v <= MAX_BLOCK_STEPS, "max_block_steps",
      `expected an integer in [1, ${MAX_BLOCK_STEPS}], got ${show(v).slice(0, 100)}`);
    task.max_block_steps = v;
  }
  return task;
}

/** The noise counter's client word (docs/noise.md): the reserved 0xFFFFFFFF for shared noise. */
export function noiseClient(task: RoundTask): number {
  return task.noise_scope === "shared" ? 0xffffffff : task.client;
}

export function lossesPerStep(task: RoundTask): number {
  return task.k * (task.scheme === "central" ? 2 : 1);
}

/** A task as JSON text (the seed as a JSON integer). */
export function taskToJson(task: RoundTask): string {
  return stringifyJson(task);
}

/** A report as the JSON text `ClientReport.from_json` reads (keys sorted as Python writes them). */
export function reportToJson(r: ClientReport): string {
  const keys = Object.keys(r).sort() as (keyof ClientReport)[];
  return JSON.stringify(Object.fromEntries(keys.map((k) => [k, r[k]])));
}
