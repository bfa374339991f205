// The live view of a `baffle-edge serve` run, drawn from GET /v1/status (public, no token): round
// progress, test accuracy and loss curves (inline SVG), the devices of the open round, the likely
// causes of absent ones, bytes per round. Used by /run (the operator's page) and by the browser
// client's page (clients/js/web/index.html). No third-party code.

const SVG = "http://www.w3.org/2000/svg";
// measured: `baffle-edge train` (LeNet on digits, 10 clients, K = 100, seed 0), README "Results"
export const EXPECTED = "What a run should show: BAFFLE learns slowly at first. LeNet on digits with the " +
  "defaults (10 clients, K = 100, seed 0) measured 13% test accuracy after 10 rounds (between 10% and 24% " +
  "on the way, the loss still near 2.3 = chance), 78% after 50 and 91% after 150. The accuracy is the " +
  "EMA of the weights, updated once per epoch (5 rounds on digits), so it moves in steps; fewer " +
  "perturbations (smaller K) learn slower. A 10-round run is a smoke test, not a result.";

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function kib(bytes) {
  return bytes >= 1 << 20 ? `${(bytes / (1 << 20)).toFixed(2)} MiB` : `${(bytes / 1024).toFixed(1)} KiB`;
}

function seconds(s) {
  const r = Math.round(s);
  return r >= 90 ? `${Math.floor(r / 60)} min ${r % 60} s` : `${r} s`;
}

/** A line chart of `series` ([{name, color, points: [[x, y]]}]) over rounds 1..rounds. */
function chart(svg, series, { rounds, yMax, label }) {
  svg.replaceChildren();
  const W = 320, H = 140, L = 40, B = 20, T = 8, R = 8;
  const x = (v) => L + (W - L - R) * (rounds > 1 ? (v - 1) / (rounds - 1) : 0.5);
  const y = (v) => T + (H - T - B) * (1 - Math.min(v, yMax) / yMax);
  const add = (tag, attrs, text) => { const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text; svg.appendChild(e); return e; };
  for (const f of [0, 0.5, 1]) {
    add("line", { x1: L, x2: W - R, y1: y(f * yMax), y2: y(f * yMax), stroke: "#ddd" });
    add("text", { x: L - 4, y: y(f * yMax) + 4, "text-anchor": "end", "font-size": 10 }, label(f * yMax));
  }
  add("text", { x: L, y: H - 4, "font-size": 10 }, "round 1");
  add("text", { x: W - R, y: H - 4, "font-size": 10, "text-anchor": "end" }, `round ${rounds}`);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const pts = s.points.map(([a, b]) => `${x(a).toFixed(1)},${y(b).toFixed(1)}`).join(" ");
    add("polyline", { points: pts, fill: "none", stroke: s.color, "stroke-width": 2 });
    if (s.points.length < 20) for (const [a, b] of s.points) add("circle", { cx: x(a), cy: y(b), r: 2.5, fill: s.color });
    add("text", { x: W - R - 4, y: T + 12 + 12 * i, "text-anchor": "end", "font-size": 11, fill: s.color }, s.name);
  });
}

function layout(root) {
  root.replaceChildren();
  const part = (tag, id, attrs = {}) => root.appendChild(el(tag, { id, ...attrs }));
  part("p", "run-progress", { class: "run-big" }).textContent = "connecting to the server…";
  part("progress", "run-bar", { max: "1", value: "0" });
  part("p", "run-accuracy").textContent = "test accuracy: not evaluated yet";
  const charts = part("div", "run-charts", { class: "run-charts" });
  const acc = charts.appendChild(document.createElementNS(SVG, "svg"));
  const loss = charts.appendChild(document.createElementNS(SVG, "svg"));
  for (const [s, id, name] of [[acc, "run-acc-chart", "test accuracy"], [loss, "run-loss-chart", "loss"]]) {
    s.setAttribute("id", id); s.setAttribute("viewBox", "0 0 320 140"); s.setAttribute("role", "img");
    s.setAttribute("aria-label", `${name} by round`);
  }
  part("p", "run-devices").textContent = "devices: none seen yet";
  part("p", "run-bytes").textContent = "bytes per round: no round finished yet";
  part("ul", "run-notices", { class: "run-notices" });
  part("p", "run-expected", { class: "run-note" }).textContent = EXPECTED;
  return { acc, loss };
}

function render(root, charts, s, history) {
  const $ = (id) => root.querySelector(`#${id}`);
  const done = history.length;
  const bar = $("run-bar");
  bar.max = s.rounds; bar.value = s.state === "done" ? s.rounds : done;
  let line;
  if (s.state === "done") line = `done: ${done} of ${s.rounds} rounds`;
  else if (s.state === "waiting") line = `waiting for round 1 of ${s.rounds}`;
  else {
    line = `round ${s.round} of ${s.rounds}`;
    if (s.state === "open") {
      line += `: open ${seconds(s.round_seconds ?? 0)}, ${s.reports} of ${s.tasks} reports`;
      if (s.deadline_in !== null) line += ` (closes in ${seconds(s.deadline_in)})`;
    } else line += ": closed, the server is aggregating";
  }
  $("run-progress").textContent = line;
  const evals = history.filter((h) => h.test_accuracy !== null && h.test_accuracy !== undefined);
  const last = evals[evals.length - 1];
  $("run-accuracy").textContent = last
    ? `test accuracy ${(100 * last.test_accuracy).toFixed(1)}% after round ${last.round} (test loss ` +
      `${last.test_loss.toFixed(3)}; evaluated every ${s.eval_every} round${s.eval_every > 1 ? "s" : ""} and the last)`
    : `test accuracy: not evaluated yet (every ${s.eval_every} round${s.eval_every > 1 ? "s" : ""} and the last)`;
  const rounds = Math.max(s.rounds, 2);
  chart(charts.acc, [{ name: "test accuracy", color: "#1565c0", points: evals.map((h) => [h.round, h.test_accuracy]) }],
    { rounds, yMax: 1, label: (v) => `${Math.round(100 * v)}%` });
  const train = history.filter((h) => h.train_loss !== null).map((h) => [h.round, h.train_loss]);
  const test = evals.map((h) => [h.round, h.test_loss]);
  const yMax = Math.max(0.5, ...train.map((p) => p[1]), ...test.map((p) => p[1]));
  chart(charts.loss, [{ name: "train loss", color: "#ef6c00", points: train }, { name: "test loss", color: "#6a1b9a", points: test }],
    { rounds, yMax: Math.ceil(yMax * 2) / 2, label: (v) => v.toFixed(1) });
  const kinds = Object.entries(s.rejected_by_kind).map(([k, n]) => `${k} ${n}`).join(", ");
  $("run-devices").textContent = `devices seen ${s.devices_seen} of ${s.clients} slots; this round: ` +
    `${s.slots.reported} reported, ${s.slots.working} working, ${s.slots.not_fetched} not fetched; ` +
    `refused requests ${s.rejected_total}${kinds ? ` (${kinds})` : ""}`;
  const h = history[history.length - 1];
  $("run-bytes").textContent = h
    ? `round ${h.round}: ${kib(h.bytes_up)} up, ${kib(h.bytes_down)} down, ${h.clients_accepted} clients accepted, ` +
      `${h.absent} absent, ${h.rejected} rejected, ${h.seconds.toFixed(1)} s; all rounds: ` +
      `${kib(history.reduce((a, r) => a + r.bytes_up, 0))} up, ${kib(history.reduce((a, r) => a + r.bytes_down, 0))} down`
    : "bytes per round: no round finished yet";
  $("run-notices").replaceChildren(...s.notices.slice(-8).reverse().map((n) =>
    el("li", { "data-cause": n.cause }, `round ${n.round}: ${n.message}`)));
}

/** Draw the run into `root` and keep it current (every `interval` ms) until the run is done. */
export function watchRun(root, { interval = 1000 } = {}) {
  const charts = layout(root);
  const history = [];
  const view = { status: null, history, error: null, updates: 0 };
  const tick = async () => {
    try {
      const since = history.length ? history[history.length - 1].round : 0;
      const r = await fetch(`/v1/status?since=${since}`, { cache: "no-store" });
      if (!r.ok) throw new Error(`GET /v1/status: HTTP ${r.status}`);
      const s = await r.json();
      for (const row of s.history) if (!history.length || row.round > history[history.length - 1].round) history.push(row);
      view.status = s; view.error = null; view.updates++;
      render(root, charts, s, history);
      if (s.state === "done") return;
    } catch (e) {
      view.error = String(e.message || e);
      root.querySelector("#run-progress").textContent = `the server does not answer (${view.error}); retrying`;
    }
    setTimeout(tick, interval);
  };
  tick();
  return view;
}

// a page with <section id="run" data-watch> is drawn as soon as this module loads
const auto = document.querySelector("[data-watch]");
if (auto) window.__run = watchRun(auto);
