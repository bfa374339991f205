/**
 * The same client in a browser: headless Debian chromium (playwright-core, no browser download)
 * loads onnxruntime-web (WASM, one thread) and this package's ES modules from a loopback static
 * server, verifies the bundle, runs one int8 round of the kit and returns the losses; they must
 * equal the Node client's bit for bit. Skipped with a reason when /usr/bin/chromium is absent (CI installs it:
 * apt-get install -y chromium), except under CI=true, where that is a failure.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { extname, join, normalize } from "node:path";
import { after, before, test } from "node:test";
import * as ort from "onnxruntime-node";
import { chromium, type Browser } from "playwright-core";
import { kitSessions, readKit, runKitRound, type Kit } from "../src/kit.js";
import { kitDir, PACKAGE_DIR, relDiff } from "./helpers.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ROUND = "int8-forward-k100";
/** Block-noise rounds replayed in the browser too: rows through the segment graphs on onnxruntime-web. */
const BLOCK_ROUNDS = ["int8-block", "int8-block-weighted-w64", "int8-block-central-fedavg", "fp32-block", "fp32-block-fedavg"];
const haveBrowser = existsSync(CHROMIUM);
if (!haveBrowser && process.env.CI) throw new Error(`${CHROMIUM} is missing: CI must install it (apt-get install -y chromium)`);

const TYPES: Record<string, string> = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript",
  ".wasm": "application/wasm", ".json": "application/json", ".map": "application/json" };

const PAGE = `<!doctype html><meta charset="utf-8"><title>baffle-edge browser round</title>
<script type="module">
import * as ort from "/ort/ort.wasm.min.mjs";
import { loadBundle, RoundSession, runTask, parseJson, stringifyJson } from "/pkg/index.js";
ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.numThreads = 1;
const get = async (path) => { const r = await fetch(path); if (!r.ok) throw new Error(path + ": HTTP " + r.status); return new Uint8Array(await r.arrayBuffer()); };
try {
  const kit = parseJson(new TextDecoder().decode(await get("/kit/conformance.json")));
  const round = kit.rounds.find((r) => r.name === ${JSON.stringify(ROUND)});
  const bundle = await loadBundle((name) => get("/kit/" + kit.bundle + "/" + name), { formats: ["onnx-int8", "onnx"] });
  const rs = await RoundSession.open(ort, bundle, "onnx-int8", { executionProviders: ["wasm"] });
  const sessions = { "onnx-int8": rs, "onnx": await RoundSession.open(ort, bundle, "onnx", { executionProviders: ["wasm"] }) };
  const weights = new Float32Array((await get("/kit/" + round.weights)).buffer);
  const batches = await Promise.all(round.batches.map(async (b) => ({ x: new Float32Array((await get("/kit/" + b.x)).buffer), y: new Int32Array((await get("/kit/" + b.y)).buffer) })));
  await runTask(stringifyJson(round.task), weights, batches, rs, { runtime: "onnxruntime-web-wasm" });  // warm-up
  const reports = [];
  for (let i = 0; i < 5; i++) reports.push(await runTask(stringifyJson(round.task), weights, batches, rs, { runtime: "onnxruntime-web-wasm" }));
  const ms = reports.map((r) => r.seconds * 1e3).sort((a, b) => a - b);
  const blocks = {};
  for (const name of ${JSON.stringify(BLOCK_ROUNDS)}) {
    const r = kit.rounds.find((x) => x.name === name);
    const input = await Promise.all(r.batches.map(async (b) => ({ x: new Float32Array((await get("/kit/" + b.x)).buffer), y: new Int32Array((await get("/kit/" + b.y)).buffer) })));
    blocks[name] = await runTask(stringifyJson(r.task), weights, input, sessions[r.format], { runtime: "onnxruntime-web-wasm" });
    blocks[name].reason = sessions[r.format].blockRowsReason;
  }
  window.__result = { report: reports[0], ms, blocks, userAgent: navigator.userAgent };
} catch (e) { window.__result = { error: String(e && e.stack || e) }; }
</script>`;

let server: Server;
let base = "";
let browser: Browser | undefined;
let kit: Kit;

async function serve(url: string): Promise<[number, string, Uint8Array | string]> {
  const path = decodeURIComponent(new URL(url, "http://x").pathname);
  if (path === "/" || path === "/index.html") return [200, "text/html", PAGE];
  if (path === "/device") return [200, "text/html", new Uint8Array(await readFile(join(PACKAGE_DIR, "web", "index.html")))];
  const roots: [string, string][] = [["/ort/", join(PACKAGE_DIR, "node_modules", "onnxruntime-web", "dist")],
    ["/pkg/", join(PACKAGE_DIR, "dist", "src")], ["/kit/", kitDir()]];
  for (const [prefix, root] of roots) {
    if (!path.startsWith(prefix)) continue;
    const file = normalize(join(root, path.slice(prefix.length)));
    if (!file.startsWith(root)) return [403, "text/plain", "forbidden"];
    try {
      return [200, TYPES[extname(file)] ?? "application/octet-stream", new Uint8Array(await readFile(file))];
    } catch {
      return [404, "text/plain", "not found"];
    }
  }
  return [404, "text/plain", "not found"];
}

before(async () => {
  if (!haveBrowser) return;
  kit = await readKit(kitDir());
  server = createServer((req, res) => {
    serve(req.url ?? "/").then(([status, type, body]) => {
      res.writeHead(status, { "content-type": type, "cache-control": "no-store" });
      res.end(body);
    }, (e) => { res.writeHead(500); res.end(String(e)); });
  });
  await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run"],
  });
});

after(async () => {
  await browser?.close();
  if (server) await new Promise((ok) => server.close(ok));
});

test("headless chromium runs an int8 round on onnxruntime-web (WASM); losses equal the Node and Python clients'",
  { skip: haveBrowser ? false : `${CHROMIUM} not found (apt-get install -y chromium)`, timeout: 180_000 }, async () => {
    const page = await browser!.newPage();
    const logs: string[] = [];
    page.on("console", (m) => logs.push(m.text()));
    page.on("pageerror", (e) => logs.push(String(e)));
    await page.goto(`${base}/`);
    await page.waitForFunction("window.__result !== undefined", undefined, { timeout: 150_000 });
    const result = await page.evaluate("window.__result") as { report?: { losses: number[]; base_losses: number[]; seconds: number };
      ms: number[]; error?: string; blocks: Record<string, { losses: number[]; base_losses: number[]; seconds: number; reason: string | null }> };
    assert.equal(result.error, undefined, `${result.error}\n${logs.join("\n")}`);
    const round = kit.rounds.find((r) => r.name === ROUND)!;
    const sessions = await kitSessions(kit, ort, 1);
    const node = await runKitRound(kit, round, sessions["onnx-int8"]);
    const web = result.report!;
    const got = [...web.base_losses, ...web.losses], want = [...node.base_losses, ...node.losses];
    assert.equal(got.length, want.length);
    const worst = Math.max(...got.map((v, i) => relDiff(v, want[i])));
    // WASM int8 kernels give the x86 logits bit for bit and the loss uses fdlibm's exp/log: identical
    assert.deepEqual(got, want, `browser vs Node: max relative loss difference ${worst}`);
    assert.deepEqual(got, [...round.report.base_losses, ...round.report.losses], "browser vs the Python client (kit report)");
    console.log(`# browser int8 round (K=${String(round.task.k)}, WASM, 1 thread): median ${result.ms[2].toFixed(1)} ms of 5 ` +
      `(min ${result.ms[0].toFixed(1)}); ` +
      `Node ${(node.seconds * 1e3).toFixed(1)} ms; max relative loss difference ${worst.toExponential(2)}`);
    // block noise in the browser: int8 rounds bit for bit the Python client's, fp32 within the kit tolerance
    for (const name of BLOCK_ROUNDS) {
      const r = kit.rounds.find((x) => x.name === name)!, b = result.blocks[name];
      assert.equal(b.reason, null, `${name}: rows ran through the segment graphs`);
      const g = [...b.base_losses, ...b.losses], w = [...r.report.base_losses, ...r.report.losses];
      assert.equal(g.length, w.length, name);
      if (r.format === "onnx-int8") assert.deepEqual(g, w, `${name}: browser int8 block losses vs the Python client's`);
      else {
        const worstBlock = Math.max(...g.map((v, i) => relDiff(v, w[i])));
        assert.ok(worstBlock <= kit.index.tolerance.fp32_losses_relative, `${name}: ${worstBlock}`);
      }
      console.log(`# browser block round ${name} (K=${String(r.task.k)}, WASM, 1 thread): ${(b.seconds * 1e3).toFixed(1)} ms, ` +
        `max relative loss difference ${Math.max(...g.map((v, i) => relDiff(v, w[i]))).toExponential(2)}`);
    }
    await page.close();
  });

test("the device page says on the page when its modules were never built (node web/build.mjs)",
  { skip: haveBrowser ? false : `${CHROMIUM} not found (apt-get install -y chromium)`, timeout: 60_000 }, async () => {
    const page = await browser!.newPage();
    await page.goto(`${base}/device#token=bfl_x`);  // this server has no /web/dist/ (nor /run.js): as if unbuilt
    const box = page.locator("#error");
    await box.waitFor({ state: "visible", timeout: 30_000 });
    const text = (await box.textContent()) ?? "";
    assert.match(text, /modules did not load \(\/web\/dist\/ort\/ort\.wasm\.min\.mjs, \/web\/dist\/pkg\/gateway\.js\)/);
    assert.match(text, /built by: cd clients\/js && npm run build && node web\/build\.mjs/);
    assert.equal(await page.locator("#status").textContent(), "not started: the client's modules are missing");
    assert.equal(await page.locator("#run").isHidden(), true, "no run view without the server's /run.js");
    const color = await box.evaluate((e) => getComputedStyle(e).backgroundColor);
    assert.equal(color, "rgb(253, 232, 232)", "the error box is the red one");
    await page.close();
  });
