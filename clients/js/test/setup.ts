/**
 * Runs before `node --test` (npm pretest): makes sure the conformance kits exist. With
 * BAFFLE_CONFORMANCE=DIR (and BAFFLE_CONFORMANCE_WRN=DIR) the tests read those kits; otherwise the Python
 * writer (`python -m baffle_edge.conformance`, ~6 s; `--model wrn-10-2`, ~10 s) regenerates `.conformance/`
 * and `.conformance-wrn/` so the JS tests always check against the current Python client. PYTHON selects
 * the interpreter (default: python).
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { kitDir, wrnKitDir } from "./helpers.js";

/** Make sure the kit in `dir` exists: `env` names a kit to read, else the Python writer regenerates it. */
function ensureKit(dir: string, env: string, args: string[]): void {
  if (process.env[env]) {
    if (!existsSync(`${dir}/conformance.json`)) {
      console.error(`${env}=${dir} has no conformance.json (write one with: baffle-edge conformance ${args.join(" ")} --out ${dir})`);
      process.exit(1);
    }
    return;
  }
  const python = process.env.PYTHON ?? "python";
  const r = spawnSync(python, ["-m", "baffle_edge.conformance", ...args, "--out", dir, "--force", "--quiet"], { stdio: "inherit" });
  if (r.status !== 0) {
    console.error(`could not write the conformance kit with '${python} -m baffle_edge.conformance ${args.join(" ")}' (exit ` +
      `${r.status}, ${r.error?.message ?? "see above"}); install the Python package (pip install -e .) or set ${env}=DIR`);
    process.exit(1);
  }
}

ensureKit(kitDir(), "BAFFLE_CONFORMANCE", []);
ensureKit(wrnKitDir(), "BAFFLE_CONFORMANCE_WRN", ["--model", "wrn-10-2"]); // a graph block plan (residual adds, GroupNorm)
