/**
 * The Node device command's mistakes (issue 27): each ends in one `baffle-client device: error:` line
 * that says what to do, exit code 2. The device processes talk to a stub server on 127.0.0.1 (every
 * request answered at once, the Authorization headers recorded); `--data` reads an .npz numpy wrote.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, test } from "node:test";
import { didYouMean, ownBatches, parseNpz } from "../src/device_cli.js";
import { PACKAGE_DIR } from "./helpers.js";

const PYTHON = process.env.PYTHON ?? "python";
const GATEWAY = join(PACKAGE_DIR, "dist", "src", "gateway.js");
const dir = mkdtempSync(join(tmpdir(), "baffle-device-cli-"));
const seen: (string | undefined)[] = [];
let stub: Server, url = "", answer: [number, object] = [401, {}];

before(async () => {
  stub = createServer((req, res) => {
    seen.push(req.headers.authorization);
    res.writeHead(answer[0], { "Content-Type": "application/json" }).end(JSON.stringify(answer[1]));
  });
  await new Promise<void>((ok) => stub.listen(0, "127.0.0.1", ok));
  url = `http://127.0.0.1:${(stub.address() as { port: number }).port}`;
});
after(() => stub.close());

/** Exit code and stderr lines of the device command (killed after 20 s). */
function device(args: string[], cwd = dir): Promise<[number, string[]]> {
  return new Promise((ok, fail) => {
    const p = spawn(process.execPath, [GATEWAY, ...args], { cwd, stdio: ["ignore", "pipe", "pipe"] });
    let err = "";
    p.stderr!.on("data", (d) => { err += d; });
    const timer = setTimeout(() => { p.kill("SIGKILL"); fail(new Error(`device still running: ${err}`)); }, 20_000);
    p.on("exit", (code) => { clearTimeout(timer); ok([code ?? -1, err.split("\n").filter((l) => l.trim())]); });
  });
}

async function oneError(args: string[], cwd = dir): Promise<string> {
  const [code, lines] = await device(args, cwd);
  assert.equal(code, 2, lines.join("\n"));
  assert.equal(lines.length, 1, lines.join("\n"));
  assert.match(lines[0], /^baffle-client device: error: /);
  return lines[0];
}

function file(name: string, text: string): string {
  writeFileSync(join(dir, name), text);
  return join(dir, name);
}

const GOOD = "bfl_" + "A".repeat(43);

test("an unknown flag is refused with the closest known one", async () => {
  const line = await oneError(["--server", url, "--token", file("a.token", GOOD), "--max-task", "1"]);
  assert.match(line, /unknown argument --max-task \(did you mean --max-tasks\?\); usage: /);
  assert.match(await oneError(["--server", url]), /--token is required/);
  assert.equal(didYouMean("--dta", ["--data", "--server"]), " (did you mean --data?)");
  assert.equal(didYouMean("--zzzzzz", ["--data"]), "");
});

test("--download takes lean or full; another value is refused before any request", async () => {
  const before = seen.length;
  assert.match(await oneError(["--server", url, "--token", file("d.token", GOOD), "--download", "fp32"]),
               /--download must be lean or full, got "fp32"/);
  assert.equal(seen.length, before);
  answer = [401, { error: "unauthorized", reason: "unknown token" }];  // accepted: the device gets as far as the server
  assert.match(await oneError(["--server", url, "--token", file("d.token", GOOD), "--download", "full"]), /HTTP 401/);
});

test("token files that cannot be a device token are named before any request", async () => {
  answer = [401, {}];
  const before = seen.length;
  const store = file("tokens.json", JSON.stringify({ version: 1, devices: { "client-0": { client: 0, sha256: "0".repeat(64) } } }));
  assert.match(await oneError(["--server", url, "--token", store]),
               /is the server's tokens\.json \(token hashes\), not a device token: .*device-tokens\/client-N\.token/);
  assert.match(await oneError(["--server", url, "--token", file("b.token", "bfl_a b\n")]), /which an HTTP header cannot carry/);
  assert.match(await oneError(["--server", url, "--token", file("c.token", "garbage\n")]), /does not hold a baffle-edge device token/);
  assert.equal(seen.length, before);
});

test("a missing token file is named by its resolved path", async () => {
  const line = await oneError(["--server", url, "--token", "device-tokens/client-3.token"]);
  assert.ok(line.includes(`token file ${resolve(dir, "device-tokens/client-3.token")} does not exist`), line);
  assert.match(line, /run from the repo root, or give an absolute path/);
});

test("401 and 403 are one line saying what to do; no data names --data", async () => {
  const token = file("d.token", GOOD);
  answer = [401, { error: "unauthenticated", reason: "missing, unknown or revoked bearer token" }];
  assert.match(await oneError(["--server", url, "--token", token]),
               /config: HTTP 401 unauthenticated: .*tokens issue --tokens tokens\.json --client N --replace/);
  answer = [403, { error: "no-slot", reason: "not part of this run" }];
  assert.match(await oneError(["--server", url, "--token", token]), /HTTP 403 no-slot: .*below the server's --clients/);
  answer = [200, { client: 0, demo_data: false, train_config: { rounds: 1, batch_size: 4 } }];
  assert.match(await oneError(["--server", url, "--token", token]),
               /not a --demo-data server\): .*the Node command: --data FILE\.npz/);
  assert.match(await oneError(["--server", url, "--token", token, "--data", "nope.npz"]), /data file .*nope\.npz does not exist/);
});

test("--data reads numpy's savez and savez_compressed files and walks them in file order", { skip: spawnSync(PYTHON, ["-c", "import numpy"]).status !== 0 }, () => {
  const r = spawnSync(PYTHON, ["-c", `
import numpy as np, sys
x = np.arange(5 * 1 * 2 * 2, dtype=np.float32).reshape(5, 1, 2, 2) / 7
np.savez(sys.argv[1], x=x, y=np.arange(5, dtype=np.int64))
np.savez_compressed(sys.argv[2], x=x.astype(np.float64), y=np.arange(5, dtype=np.int32))`, join(dir, "s.npz"), join(dir, "z.npz")]);
  assert.equal(r.status, 0, String(r.stderr));
  for (const name of ["s.npz", "z.npz"]) {
    const own = parseNpz(new Uint8Array(readFileSync(join(dir, name))), name);
    assert.deepEqual(own.shape, [5, 1, 2, 2]);
    assert.deepEqual(Array.from(own.y), [0, 1, 2, 3, 4]);
    assert.equal(own.x[19], Math.fround(19 / 7));
    const [b0, b1] = ownBatches(own, { round: 1, local_steps: 2 }, 3);  // positions 6..8 and 9..11 of 0..4 repeated
    assert.deepEqual([Array.from(b0.y), Array.from(b1.y)], [[1, 2, 3], [4, 0, 1]]);
    assert.deepEqual(Array.from(b0.x.subarray(0, 4)), Array.from(own.x.subarray(4, 8)));
  }
  assert.throws(() => parseNpz(new Uint8Array([1, 2, 3]), "bad.npz"), /not an \.npz file/);
});
