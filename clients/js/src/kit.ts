/**
 * Node helpers for the conformance kit that `baffle-edge conformance --out DIR` writes
 * (baffle_edge/conformance.py): read its index and run its rounds with this client.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { Bundle, TrainFormat } from "./bundle.js";
import { RoundSession, runTask, type Batch, type OrtModule, type RunOptions } from "./client.js";
import { parseJson, stringifyJson } from "./json.js";
import type { ClientReport } from "./protocol.js";
import { readBundleDir, readF32, readI32 } from "./node.js";

export interface KitRound {
  name: string;
  format: TrainFormat;
  task: Record<string, unknown>;
  client_options: { local_lr?: number; clip?: number | null };
  weights: string;
  batches: { x: string; y: string; shape: number[] }[];
  report: ClientReport;
}

export interface Kit {
  dir: string;
  index: Record<string, any>; // conformance.json as parsed (64-bit seeds as bigint)
  rounds: KitRound[];
  bundle: Bundle;
}

/** Read a kit folder: its index (parsed keeping 64-bit seeds exact) and its verified bundle. */
export async function readKit(dir: string): Promise<Kit> {
  const index = parseJson(await readFile(join(dir, "conformance.json"), "utf-8")) as Record<string, any>;
  if (index.kit_version !== 2) throw new Error(`${dir}: conformance kit version ${String(index.kit_version)} is not supported (expected 2)`);
  const bundle = await readBundleDir(join(dir, String(index.bundle)));
  return { dir, index, rounds: index.rounds as KitRound[], bundle };
}

/**
 * The kit's loss tolerance for one round (baffle_edge/kit.py round_tolerance): int8 exact; fp32 single-step
 * `fp32_losses_relative`, several local steps `fp32_multistep_losses_relative` (later steps start from weights the
 * earlier steps' float losses moved, so another CPU's float kernels compound through 1/sigma).
 */
export function roundTolerance(kit: Kit, r: KitRound): number {
  const tol = kit.index.tolerance;
  if (r.format === "onnx-int8") return Number(tol.int8_losses_relative);
  const steps = Number(r.task.local_steps ?? 1);
  return Number(steps > 1 ? (tol.fp32_multistep_losses_relative ?? tol.fp32_losses_relative) : tol.fp32_losses_relative);
}

/** The weights and batches of a kit round. */
export async function roundInputs(kit: Kit, r: KitRound): Promise<{ weights: Float32Array; batches: Batch[] }> {
  const weights = await readF32(join(kit.dir, r.weights));
  const batches = await Promise.all(r.batches.map(async (b) => ({ x: await readF32(join(kit.dir, b.x)), y: await readI32(join(kit.dir, b.y)) })));
  return { weights, batches };
}

/** Run one kit round with this client (the task's JSON text goes through parseTask like a real upload). */
export async function runKitRound(kit: Kit, r: KitRound, rs: RoundSession, options: RunOptions = {}): Promise<ClientReport> {
  const { weights, batches } = await roundInputs(kit, r);
  return runTask(stringifyJson(r.task), weights, batches, rs, {
    localLr: r.client_options.local_lr, clip: r.client_options.clip, ...options,
  });
}

/** One session per format of the kit's bundle. */
export async function kitSessions(kit: Kit, ort: OrtModule, threads = 1): Promise<Record<TrainFormat, RoundSession>> {
  const opts = { intraOpNumThreads: threads, interOpNumThreads: 1, executionMode: "sequential" as const };
  return {
    "onnx": await RoundSession.open(ort, kit.bundle, "onnx", opts),
    "onnx-int8": await RoundSession.open(ort, kit.bundle, "onnx-int8", opts),
  };
}
