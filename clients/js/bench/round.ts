/**
 * Per-round time of this client on onnxruntime-node: `node dist/bench/round.js [KIT] [--round NAME]
 * [--rounds N] [--threads T]` runs one kit round (default int8-forward-k100: LeNet on digits, K = 100,
 * 101 int8 forwards of a 32-sample batch) N times after one warm-up and prints min/median/max ms.
 * KIT defaults to clients/js/.conformance (written by `npm test`, or `baffle-edge conformance --out DIR`).
 */
import * as ort from "onnxruntime-node";
import { kitSessions, readKit, runKitRound } from "../src/kit.js";
import { kitDir } from "../test/helpers.js";

const argv = process.argv.slice(2);
const opt = (name: string, d: string) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : d; };
const dir = argv[0] && !argv[0].startsWith("--") ? argv[0] : kitDir();
const name = opt("--round", "int8-forward-k100"), n = Number(opt("--rounds", "20")), threads = Number(opt("--threads", "1"));
const kit = await readKit(dir);
const round = kit.rounds.find((r) => r.name === name);
if (!round) throw new Error(`kit has no round ${name} (has: ${kit.rounds.map((r) => r.name).join(", ")})`);
const sessions = await kitSessions(kit, ort, threads);
await runKitRound(kit, round, sessions[round.format]);
const ms: number[] = [];
for (let i = 0; i < n; i++) ms.push((await runKitRound(kit, round, sessions[round.format])).seconds * 1e3);
ms.sort((a, b) => a - b);
console.log(`js ${name} (${round.format}, K=${String(round.task.k)}, ${threads} thread(s)): median ${ms[n >> 1].toFixed(1)} ms ` +
  `per round (min ${ms[0].toFixed(1)}, max ${ms[n - 1].toFixed(1)}, ${n} rounds)`);
