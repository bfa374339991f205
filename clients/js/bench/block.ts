/**
 * Block noise against isotropic noise at an equal forward budget, side by side on onnxruntime-node:
 * `node dist/bench/block.js [KIT] [--format onnx-int8|onnx] [--block-k K] [--rounds N] [--threads T]`.
 * Alternates one isotropic round (the kit's K = 100 round of the format: 101 forwards) and one block
 * round (the kit's block round of the format with K = --block-k; default 3309, what
 * `--forward-budget 101` gives the ONNX Runtime chain rule on digits LeNet), N of each after a warm-up,
 * on the same batch and weights, and prints both medians and their ratio.
 */
import * as ort from "onnxruntime-node";
import { stringifyJson } from "../src/json.js";
import { kitSessions, readKit, roundInputs } from "../src/kit.js";
import { runTask } from "../src/client.js";
import { kitDir } from "../test/helpers.js";

const argv = process.argv.slice(2);
const opt = (name: string, d: string) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : d; };
const dir = argv[0] && !argv[0].startsWith("--") ? argv[0] : kitDir();
const fmt = opt("--format", "onnx-int8") as "onnx" | "onnx-int8";
const blockK = Number(opt("--block-k", "3309")), n = Number(opt("--rounds", "5")), threads = Number(opt("--threads", "1"));
const kit = await readKit(dir);
const iso = kit.rounds.find((r) => r.format === fmt && r.task.noise !== "block" && Number(r.task.local_steps) === 1 &&
  r.task.scheme === "forward")!;
const blk = kit.rounds.find((r) => r.format === fmt && r.task.noise === "block" && Number(r.task.local_steps) === 1 &&
  r.task.scheme === "forward")!;
const rs = (await kitSessions(kit, ort, threads))[fmt];
const { weights, batches } = await roundInputs(kit, iso);
const isoTask = stringifyJson({ ...iso.task, k: fmt === "onnx-int8" ? iso.task.k : 100 });
const blkTask = stringifyJson({ ...blk.task, k: blockK });
const once = async (task: string) => (await runTask(task, weights, batches, rs)).seconds * 1e3;
await once(isoTask); await once(blkTask);
const a: number[] = [], b: number[] = [];
for (let i = 0; i < n; i++) { a.push(await once(isoTask)); b.push(await once(blkTask)); }
const med = (x: number[]) => x.sort((p, q) => p - q)[x.length >> 1];
const [ma, mb] = [med(a), med(b)];
console.log(`js ${fmt}, ${threads} intra-op thread(s), ${n} rounds each, interleaved: isotropic K=100 ${ma.toFixed(0)} ms, ` +
  `block K=${blockK} ${mb.toFixed(0)} ms (rows ${rs.blockRowsReason ?? "through the segment graphs"}); block / isotropic ${(mb / ma).toFixed(2)}`);
