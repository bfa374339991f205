/**
 * The device loop (src/gateway.ts) against a real `baffle-edge serve` on loopback:
 * - Node device processes answering an int8 run give the same per-round metrics as
 *   `baffle-edge train` with the same seed (losses within the client's documented 1 ulp, see
 *   docs/device-clients.md; bytes_up differs by the runtime name the report carries);
 * - headless Debian chromium tabs (playwright-core) open the page the server serves
 *   (`--web clients/js/web`), run the int8 bundle on onnxruntime-web and complete every round;
 *   the test accuracy rises; the operator's live page (/run) and each tab's progress and run view
 *   update during the run (element text; screenshots in $BAFFLE_SCREENSHOTS or the run's folder).
 * Needs the Python package with its [serve] extra (PYTHON, default: python). Every process is
 * killed at the end; every wait is bounded.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { children, haveServe, python, PYTHON, serve } from "./server.js";
import { chromium, type Page } from "playwright-core";
import { PACKAGE_DIR } from "./helpers.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
if (!haveServe && process.env.CI) throw new Error(`${PYTHON} cannot import baffle_edge.gateway.serve: CI must pip install '.[serve]'`);
const haveBrowser = existsSync(CHROMIUM);
const RUN = ["--eval-every", "1", "--checkpoint-every", "1", "--no-progress"];



function tokens(dir: string, clients: number): void {
  python(["tokens", "issue", "--tokens", "tokens.json", "--clients", String(clients), "--out-dir", "toks"], dir);
}

function exited(p: ChildProcess, seconds: number, what: string): Promise<number> {
  return new Promise((ok, fail) => {
    if (p.exitCode !== null) return ok(p.exitCode);
    const timer = setTimeout(() => { p.kill("SIGKILL"); fail(new Error(`${what} still running after ${seconds} s`)); }, seconds * 1000);
    p.on("exit", (code) => { clearTimeout(timer); ok(code ?? -1); });
  });
}


interface Row { round: number; train_loss: number | null; clients_accepted: number; rejected: object; absent: number[];
  skipped: boolean; applied: boolean; bytes_up: number; bytes_down: number; test_accuracy?: number; test_loss?: number }

interface Seen { progress: string[]; accuracy: string[]; devices: string; tab: string; tabProgress: number }

/** Poll the live page's text (and one device tab's) until the server exits; screenshot both once
 * the accuracy has been drawn twice. */
async function watchPage(run: Page, server: ChildProcess, tab: Page, shots: string): Promise<Seen> {
  const seen: Seen = { progress: [], accuracy: [], devices: "", tab: "", tabProgress: 0 };
  const text = async (p: Page, sel: string) => (await p.locator(sel).textContent({ timeout: 5_000 }))?.trim() ?? "";
  let shot = false;
  const until = Date.now() + 480_000;
  while (server.exitCode === null && Date.now() < until) {
    seen.progress.push(await text(run, "#run-progress"));
    seen.accuracy.push(await text(run, "#run-accuracy"));
    seen.devices = await text(run, "#run-devices");
    if (!shot && new Set(seen.accuracy.filter((t) => t.startsWith("test accuracy "))).size >= 2) {
      seen.tab = await text(tab, "#run-progress");
      seen.tabProgress = Number(await tab.locator("#progress").getAttribute("value"));
      await run.screenshot({ path: join(shots, "run-page.png"), fullPage: true });
      await tab.screenshot({ path: join(shots, "device-tab.png"), fullPage: true });
      console.log(`# screenshots: ${join(shots, "run-page.png")}, ${join(shots, "device-tab.png")}`);
      shot = true;
    }
    await new Promise((ok) => setTimeout(ok, 300));
  }
  return seen;
}

function rows(dir: string): Row[] {
  return (JSON.parse(readFileSync(join(dir, "metrics.json"), "utf8")) as { rounds: Row[] }).rounds;
}

/** Node device processes answering a serve run give `baffle-edge train`'s metrics and final weights. */
async function nodeDevicesReproduceTrain(runtime: string, extra: string[]): Promise<void> {
    const dir = mkdtempSync(join(tmpdir(), "baffle-gw-node-"));
    const args = [...RUN, "--runtime", runtime, "--clients", "3", "--k", "4", "--rounds", "3", ...extra];
    tokens(dir, 3);
    const [server, port] = await serve(dir, args);
    const devices = [0, 1, 2].map((c) => {
      const p = spawn(process.execPath, [join(PACKAGE_DIR, "dist", "src", "gateway.js"), "--server", `http://127.0.0.1:${port}`,
                                         "--token", join(dir, "toks", `client-${c}.token`), "--quiet"], { stdio: "ignore" });
      children.push(p);
      return p;
    });
    assert.equal(await exited(server, 240, "serve"), 0);
    for (const d of devices) assert.equal(await exited(d, 30, "device"), 0);
    python(["train", ...args, "--out", "ref"], dir);
    const got = rows(join(dir, "run")), want = rows(join(dir, "ref"));
    assert.equal(got.length, 3);
    for (const [g, w] of got.map((g, i) => [g, want[i]] as const)) {
      assert.equal(g.clients_accepted, 3);
      assert.deepEqual([g.round, g.rejected, g.absent, g.skipped, g.applied, g.bytes_down],
                       [w.round, w.rejected, w.absent, w.skipped, w.applied, w.bytes_down]);
      // the loss is specified (docs/noise.md section 7), so the Node devices' losses are the Python client's bits
      assert.equal(g.train_loss, w.train_loss, `round ${g.round}: train loss`);
      assert.equal(g.test_accuracy, w.test_accuracy, `round ${g.round}: test accuracy`);
      assert.equal(g.test_loss, w.test_loss, `round ${g.round}: test loss`);
    }
    const check = spawnSync(PYTHON, ["-c", `
import torch
a = torch.load("run/checkpoint.pt", weights_only=True)["server"]["model"]
b = torch.load("ref/checkpoint.pt", weights_only=True)["server"]["model"]
print(max(float((a[k] - b[k]).abs().max()) for k in a))`], { cwd: dir, encoding: "utf8" });
    const maxDiff = Number(check.stdout.trim());
    assert.equal(maxDiff, 0, `final weights differ by up to ${maxDiff}`);
    console.log(`# Node devices vs in-process (${runtime} ${extra.join(" ")}): train loss ` +
      `${got.map((r) => r.train_loss?.toFixed(6)).join(" -> ")}, test accuracy ` +
      `${got.map((r) => r.test_accuracy === undefined ? "-" : (100 * r.test_accuracy).toFixed(2)).join(" -> ")} %; ` +
      `final weights max |difference| ${maxDiff.toExponential(2)}`);
}

test("Node device processes over HTTP reproduce `baffle-edge train` (int8 bundle)",
  { skip: haveServe ? false : `${PYTHON} lacks baffle_edge[serve]`, timeout: 300_000 },
  () => nodeDevicesReproduceTrain("onnxruntime-int8", []));

test("Node devices with block noise (int8, adaptive draws: weighted block_weights) reproduce `baffle-edge train`",
  { skip: haveServe ? false : `${PYTHON} lacks baffle_edge[serve]`, timeout: 300_000 },
  () => nodeDevicesReproduceTrain("onnxruntime-int8", ["--noise", "block", "--k", "300", "--block-draw", "adaptive"]));

test("Node devices with block noise (fp32, size draws, central) reproduce `baffle-edge train`",
  { skip: haveServe ? false : `${PYTHON} lacks baffle_edge[serve]`, timeout: 300_000 },
  () => nodeDevicesReproduceTrain("onnxruntime", ["--noise", "block", "--k", "200", "--scheme", "central"]));

/** Chromium tabs train a serve run (int8 bundle, WASM); with `reproduce` its metrics must equal `baffle-edge train`'s. */
async function tabsTrain(label: string, noise: string[], reproduce: boolean): Promise<void> {
    const stage = spawnSync(process.execPath, [join(PACKAGE_DIR, "web", "build.mjs")], { encoding: "utf8" });
    assert.equal(stage.status, 0, stage.stderr);
    const dir = mkdtempSync(join(tmpdir(), "baffle-gw-web-"));
    const clients = 3;
    tokens(dir, clients);
    const [server, port] = await serve(dir, [...RUN, "--runtime", "onnxruntime-int8", "--clients", String(clients), ...noise, "--rounds", "9",
                                             "--eval-every", "3", "--web", join(PACKAGE_DIR, "web")]);
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"],
    });
    try {
      const pages = await Promise.all(Array.from({ length: clients }, async (_, c) => {
        const page = await browser.newPage();
        const token = readFileSync(join(dir, "toks", `client-${c}.token`), "utf8").trim();
        await page.goto(`http://127.0.0.1:${port}/#token=${token}`);
        return page;
      }));
      const run = await browser.newPage({ viewport: { width: 900, height: 900 } });
      await run.goto(`http://127.0.0.1:${port}/run`);
      const seen = await watchPage(run, server, pages[0], process.env.BAFFLE_SCREENSHOTS ?? dir);
      assert.equal(await exited(server, 480, "serve"), 0);
      const rounds = new Set(seen.progress.map((t) => /^round (\d+) of 9/.exec(t)?.[1]).filter((r) => r !== undefined));
      assert.ok(rounds.size >= 2, `the live page's progress did not move: ${[...new Set(seen.progress)].join(" | ")}`);
      assert.ok(seen.progress.includes("done: 9 of 9 rounds"), `no "done" on the live page: ${seen.progress.slice(-3).join(" | ")}`);
      const accuracies = new Set(seen.accuracy.filter((t) => /^test accuracy \d+\.\d% after round \d+ /.test(t)));
      assert.ok(accuracies.size >= 2, `the live page's accuracy did not update: ${[...new Set(seen.accuracy)].join(" | ")}`);
      assert.match(seen.devices, /devices seen 3 of 3 slots/);
      assert.match(seen.tab, /^round \d+ of 9/, "the device tab's run view");
      assert.ok(seen.tabProgress > 0, "the device tab's progress bar");
      const states = await Promise.all(pages.map(async (p) => {
        await p.waitForFunction("window.__gateway && window.__gateway.done", undefined, { timeout: 60_000 });
        return await p.evaluate("window.__gateway") as { error: string | null; roundSeconds: number[]; summary: { accepted: number };
          events: string[]; downloads: [string, number, string][] };
      }));
      for (const s of states) assert.equal(s.error, null, s.error ?? "");
      for (const s of states) {  // the page downloads lean (docs/gateway.md "Lean downloads"): integers, never float32 weights
        const what = s.downloads.map((d) => d[0]);
        assert.ok(!what.includes("weights") && !s.events.includes("fallback"), `a tab downloaded float32 weights: ${what.join(", ")}`);
        assert.equal(what.filter((w) => w === "integers").length, 9);
        assert.ok(s.downloads.filter((d) => d[0] === "integers").slice(1).every((d) => d[2].startsWith("delta:")), "integers as deltas");
        assert.ok(s.downloads.filter((d) => d[0].startsWith("bundle:")).slice(6).every((d) => d[2].startsWith("zlib-dict:")),
                  "bundle files zlib against the held generation");
      }
      const got = rows(join(dir, "run"));
      assert.deepEqual(got.map((r) => r.clients_accepted), Array(9).fill(clients));
      const acc = got.filter((r) => r.test_accuracy !== undefined).map((r) => r.test_accuracy!);
      assert.ok(acc[acc.length - 1] > acc[0], `test accuracy did not rise: ${acc.join(", ")}`);
      const seconds = states.flatMap((s) => s.roundSeconds).sort((a, b) => a - b);
      const median = seconds[seconds.length >> 1];
      console.log(`# browser tabs (int8 LeNet, ${label}, WASM 1 thread, ${clients} tabs): test accuracy ` +
        `${acc.map((a) => (100 * a).toFixed(1)).join(" -> ")} %; task -> report accepted: median ` +
        `${(1e3 * median).toFixed(0)} ms, max ${(1e3 * seconds[seconds.length - 1]).toFixed(0)} ms`);
      if (reproduce) {  // WASM int8 kernels give this machine's logits and the loss is specified: train's metrics exactly
        python(["train", ...RUN, "--runtime", "onnxruntime-int8", "--clients", String(clients), ...noise, "--rounds", "9",
                "--eval-every", "3", "--out", "ref"], dir);
        const want = rows(join(dir, "ref"));
        assert.deepEqual(got.map((r) => [r.round, r.train_loss, r.test_accuracy]), want.map((r) => [r.round, r.train_loss, r.test_accuracy]),
          "browser tabs vs baffle-edge train");
      }
    } finally {
      await browser.close();
    }
}

test("headless chromium tabs join a serve run with the int8 bundle; accuracy rises",
  { skip: !haveServe ? `${PYTHON} lacks baffle_edge[serve]` : !haveBrowser ? `${CHROMIUM} not found` : false, timeout: 600_000 },
  () => tabsTrain("isotropic K=20", ["--noise", "rademacher", "--k", "20"], false));  // --k alone is block noise now

test("headless chromium tabs train with block noise (int8, size draws) through serve: train's metrics, accuracy rises",
  { skip: !haveServe ? `${PYTHON} lacks baffle_edge[serve]` : !haveBrowser ? `${CHROMIUM} not found` : false, timeout: 600_000 },
  () => tabsTrain("block noise K=600", ["--noise", "block", "--k", "600"], true));
