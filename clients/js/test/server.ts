/**
 * The Python side of the gateway tests: `baffle-edge` commands and a `baffle-edge serve` on 127.0.0.1 whose
 * processes are killed when the test file ends. PYTHON (default: python) needs baffle_edge[serve].
 */
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { after } from "node:test";

export const PYTHON = process.env.PYTHON ?? "python";
export const haveServe = spawnSync(PYTHON, ["-c", "import baffle_edge.gateway.serve, fastapi, uvicorn"]).status === 0;
export const children: ChildProcess[] = [];
after(() => { for (const c of children) if (c.exitCode === null) c.kill("SIGKILL"); });

/** `baffle-edge ARGS` in `cwd`; its stdout (fails the test on a non-zero exit). */
export function python(args: string[], cwd: string): string {
  const r = spawnSync(PYTHON, ["-m", "baffle_edge", ...args], { cwd, encoding: "utf8", timeout: 300_000 });
  assert.equal(r.status, 0, `baffle-edge ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

/** `baffle-edge serve --port 0 ...` with the demo data; resolves with the process and the port of its first line. */
export function serve(dir: string, args: string[]): Promise<[ChildProcess, number]> {
  const p = spawn(PYTHON, ["-m", "baffle_edge", "serve", "--tokens", "tokens.json", "--port", "0", "--linger", "2",
                           "--demo-data", "--out", "run", ...args], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
  children.push(p);
  let err = "";
  p.stderr!.on("data", (d) => { err += d; });
  return new Promise((ok, fail) => {
    let out = "";
    const timer = setTimeout(() => fail(new Error(`serve did not start: ${err}`)), 120_000);
    p.stdout!.on("data", (d) => {
      out += d;
      const m = /listening on https?:\/\/127\.0\.0\.1:(\d+)/.exec(out);
      if (m) { clearTimeout(timer); ok([p, Number(m[1])]); }
    });
    p.on("exit", (code) => { clearTimeout(timer); fail(new Error(`serve exited (${code}): ${err}`)); });
  });
}
