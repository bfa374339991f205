/**
 * Runs before `node --test` (npm pretest): makes sure a conformance kit exists. With
 * BAFFLE_CONFORMANCE=DIR the tests read that kit; otherwise the Python writer
 * (`python -m baffle_edge.conformance`, ~6 s) regenerates `.conformance/` so the JS tests always
 * check against the current Python client. PYTHON selects the interpreter (default: python).
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { kitDir } from "./helpers.js";

const dir = kitDir();
if (process.env.BAFFLE_CONFORMANCE) {
  if (!existsSync(`${dir}/conformance.json`)) {
    console.error(`BAFFLE_CONFORMANCE=${dir} has no conformance.json (write one with: baffle-edge conformance --out ${dir})`);
    process.exit(1);
  }
} else {
  const python = process.env.PYTHON ?? "python";
  const r = spawnSync(python, ["-m", "baffle_edge.conformance", "--out", dir, "--force", "--quiet"], { stdio: "inherit" });
  if (r.status !== 0) {
    console.error(`could not write the conformance kit with '${python} -m baffle_edge.conformance' (exit ${r.status}, ` +
      `${r.error?.message ?? "see above"}); install the Python package (pip install -e .) or set BAFFLE_CONFORMANCE=DIR`);
    process.exit(1);
  }
}
