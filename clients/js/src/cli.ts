#!/usr/bin/env node
/**
 * `baffle-client conformance KIT [--out DIR] [--threads N]`: run every round of a conformance kit
 * (`baffle-edge conformance --out KIT`) with this client on onnxruntime-node, write each report to
 * DIR/NAME.json and compare its losses with the Python client's. Exit code 1 if any differs.
 * `baffle-client device --server URL --token FILE ...`: a device of a `baffle-edge serve` run (device_cli.ts).
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { kitSessions, readKit, roundTolerance, runKitRound } from "./kit.js";
import { reportToJson } from "./protocol.js";

function usage(): never {
  console.error("usage: baffle-client conformance KIT_DIR [--out DIR] [--threads N]\n" +
                "       baffle-client device --server URL --token FILE [--data FILE.npz] ... (device_cli.ts)");
  process.exit(2);
}

async function main(argv: string[]): Promise<number> {
  if (argv[0] === "device") return new Promise(() => (import("./device_cli.js").then((m) => m.runMain(argv.slice(1)))));
  if (argv[0] !== "conformance" || !argv[1]) usage();
  const opt = (name: string) => { const i = argv.indexOf(name); return i > 0 ? argv[i + 1] : undefined; };
  const out = opt("--out"), threads = Number(opt("--threads") ?? 1);
  const ort = await import("onnxruntime-node");
  const kit = await readKit(argv[1]);
  const sessions = await kitSessions(kit, ort, threads);
  if (out) await mkdir(out, { recursive: true });
  let failed = 0;
  for (const r of kit.rounds) {
    const report = await runKitRound(kit, r, sessions[r.format]);
    if (out) await writeFile(join(out, `${r.name}.json`), reportToJson(report));
    const got = [...report.base_losses, ...report.losses], want = [...r.report.base_losses, ...r.report.losses];
    let worst = 0;
    got.forEach((v, i) => { worst = Math.max(worst, Math.abs(v - want[i]) / Math.abs(want[i])); });
    const ok = got.length === want.length && worst <= roundTolerance(kit, r);
    if (!ok) failed++;
    console.log(`${ok ? "ok  " : "FAIL"} ${r.name.padEnd(26)} ${String(got.length).padStart(4)} losses, max relative ` +
      `difference ${worst.toExponential(2)}, ${(report.seconds * 1e3).toFixed(1)} ms (Python ${(r.report.seconds * 1e3).toFixed(1)} ms)`);
  }
  return failed ? 1 : 0;
}

main(process.argv.slice(2)).then((c) => process.exit(c), (e) => { console.error(`baffle-client: error: ${(e as Error).message}`); process.exit(2); });
