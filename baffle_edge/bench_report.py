"""``baffle-edge bench-report``: a saved pytest-benchmark JSON -> Markdown tables + PNG charts.

    pytest benchmarks/ --benchmark-only --benchmark-json=/tmp/bench.json
    baffle-edge bench-report /tmp/bench.json --out /tmp/bench-report

Writes ``OUT/benchmarks.md`` (machine, one table per suite, the project's targets with PASS /
FAIL / not measured) and the charts ``latency.png`` (forward latency per runtime),
``memory.png`` (step peak memory: backprop vs BAFFLE vs inference) and ``bytes.png`` (bytes per
client per round), each only when the JSON holds that suite. Rows come from each benchmark's
``extra_info`` (``stage`` names the suite) and its timing ``stats``.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .plots import save_figure

MB = 1024 * 1024
# The project's targets (issue 7); reported, never hidden.
MEMORY_VS_INFERENCE = 1.2  # BAFFLE step peak <= 1.2 x inference, WRN-10-2 batch 128
MEMORY_VS_ADAM = 3.0  # backprop + Adam step peak >= 3 x BAFFLE, WRN-10-2 batch 128
INT8_SPEEDUP = 2.0  # int8 forward >= 2 x faster than torch fp32, WRN-10-2 batch 32
K_RATIO = 1.15  # client round <= 1.15 x (K+1) forwards


@dataclass(frozen=True)
class Report:
    markdown: str
    files: tuple[Path, ...]  # every file written, the Markdown first
    targets: dict[str, str]  # target name -> "PASS ..." | "FAIL ..." | "not measured ..."


def load_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list); "
                         "save one with pytest --benchmark-only --benchmark-json=FILE")
    return data


def _median(b: dict) -> float | None:
    s = b.get("stats") or {}
    return s.get("median")


def _stage(data: dict, stage: str) -> list[dict]:
    return [b for b in data["benchmarks"] if (b.get("extra_info") or {}).get("stage") == stage]


def _ms(x: float | None) -> str:
    return "—" if x is None else (f"{1e3 * x:.3f}" if x < 0.01 else f"{1e3 * x:.1f}")


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x / MB:.1f}"


def _kb(x: float | None) -> str:
    return "—" if x is None else (f"{x / 1024:.2f}" if x < 10 * 1024 else f"{x / 1024:.0f}")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(path: Path, groups: list[str], series: dict[str, list[float | None]], *, ylabel: str, title: str,
          log: bool = False) -> Path:
    """Grouped bar chart: one group per x label, one bar per series (None = missing)."""
    plt = _plt()
    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, n / 2) + 2), 4.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------------- sections
def _kernels(m: dict) -> str:
    """The arm64 int8 kernel paths the run's process saw (MLAS for ONNX Runtime, XNNPACK for LiteRT)."""
    paths = m.get("kernel_paths") or ({"mlas": m["kernel_path"]} if m.get("kernel_path") else None)
    if not paths:
        return ""
    named = ", ".join(f"{'MLAS' if k == 'mlas' else 'XNNPACK'} {v}" for k, v in paths.items())
    cpu = f"; qemu CPU model {m['arm64_cpu_model']}" if m.get("arm64_cpu_model") else ""
    return f" (arm64 int8 kernels: {named}{cpu})"


def _machine(data: dict) -> str:
    m = data.get("machine_info") or {}
    env = m.get("baffle_edge") or {}
    rows = [["CPU", m.get("cpu_model") or m.get("cpu", {}).get("brand_raw", "?")],
            ["int8 ISA / target", f"{', '.join(m.get('cpu_isa') or []) or '-'} / {m.get('cpu_target', '?')}"
             + _kernels(m)],
            ["cores (logical / physical)", f"{m.get('cores_logical', '?')} / {m.get('cores_physical', '?')}"],
            ["python", m.get("python_version", "?")],
            ["torch / threads", f"{env.get('torch', '?')} / {env.get('torch_threads', '?')}"],
            ["onnxruntime / providers", f"{env.get('onnxruntime')} / {', '.join(env.get('onnxruntime_providers') or [])}"],
            ["ai-edge-litert", env.get("ai_edge_litert")],
            ["runtimes", "; ".join(f"{k}: {v}" for k, v in (env.get("runtimes") or {}).items())],
            ["full set (--bench-full)", m.get("bench_full")], ["date", data.get("datetime", "?")]]
    warn = (f"**Emulated CPU ({m['emulated']}): every time below is an emulation time, not the speed of a "
            "device with this CPU.** Read them for function and relative order only.\n\n" if m.get("emulated") else "")
    return "## Machine\n\n" + warn + _table(["", ""], rows)


def _forward(data: dict, out: Path, files: list[Path]) -> tuple[str, dict]:
    rows, by_key = [], {}
    for b in _stage(data, "forward"):
        e = b["extra_info"]
        med = _median(b)
        key = (e.get("case", e.get("model")), e.get("batch"))
        label = f"{e.get('runtime')} ({e.get('provider')}, {e.get('dtype')})"
        by_key.setdefault(key, {})[label] = med
        rows.append([e.get("case", e.get("model")), e.get("input", ""), e.get("batch"), e.get("runtime"),
                     e.get("dtype"), e.get("provider"), _ms(med),
                     "—" if not med else f"{1 / med:.0f}"])
    if not rows:
        return "", by_key
    rows.sort(key=lambda r: (str(r[0]), r[2] or 0, str(r[3])))
    text = "## Forward latency (one forward + loss)\n\n" + _table(
        ["model", "input", "batch", "runtime", "dtype", "provider", "median ms", "forwards/s"], rows)
    groups = [f"{c} b{bs}" for c, bs in sorted(by_key, key=lambda k: (str(k[0]), k[1] or 0))]
    labels = sorted({lab for v in by_key.values() for lab in v})
    series = {lab: [by_key[k].get(lab) and 1e3 * by_key[k][lab] for k in sorted(by_key, key=lambda k: (str(k[0]), k[1] or 0))]
              for lab in labels}
    files.append(_bars(out / "latency.png", groups, series, ylabel="median ms per forward (log)",
                       title="Forward latency per runtime", log=True))
    return text + "\n\n![latency](latency.png)", by_key


def _k_estimation(data: dict) -> tuple[str, list[dict]]:
    rows, found = [], []
    for b in _stage(data, "k_estimation"):
        e = b["extra_info"]
        found.append(e)
        ratio = e.get("ratio_to_forwards")
        rows.append([e.get("runtime"), e.get("case", e.get("model")), e.get("scheme"), e.get("K"),
                     e.get("forwards"), _s(_median(b) or e.get("round_s")), _s(e.get("forwards_s")),
                     "—" if ratio is None else f"{ratio:.2f}",
                     "—" if ratio is None else ("yes" if ratio <= K_RATIO else "**no**")])
    if not rows:
        return "", found
    rows.sort(key=lambda r: (str(r[0]), str(r[1]), str(r[2]), r[3] or 0))
    return ("## K-estimation: one client round vs the same number of plain forwards\n\n" + _table(
        ["runtime", "model", "scheme", "K", "forwards", "round s (median)", "forwards s", "ratio",
         f"<= {K_RATIO}"], rows)), found


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _batched(data: dict) -> str:
    """Batched-K rounds (P sets per runtime call) and auto-P, each next to P = 1 of the same run."""
    text, rows = [], []
    for b in _stage(data, "batched_k"):
        e = b["extra_info"]
        rows.append([e.get("runtime"), e.get("case"), e.get("K"), e.get("perturbations_per_call"),
                     _s(e.get("round_s")), _s(e.get("sequential_round_s")), _x(e.get("speedup_vs_sequential")),
                     _x(e.get("speedup_vs_torch_fp32_sequential"))])
    if rows:
        rows.sort(key=lambda r: (str(r[0]), r[3] or 0))
        text.append("## Batched K: P perturbations per runtime call vs P = 1 (losses asserted equal)\n\n" + _table(
            ["runtime", "model", "K", "P", "round s", "P = 1 round s", "vs P = 1", "vs torch fp32 P = 1"], rows))
    auto = []
    for b in _stage(data, "auto_p"):
        e = b["extra_info"]
        auto.append([e.get("runtime"), e.get("case"), e.get("threads"), e.get("auto_p"), _s(e.get("auto_round_s")),
                     _s(e.get("p1_round_s")), _x(e.get("speedup_auto_vs_p1"))])
    if auto:
        auto.sort(key=lambda r: (str(r[0]), str(r[1]), r[2] or 0))
        text.append("### auto-P (measured on this CPU) vs P = 1\n\n" + _table(
            ["runtime", "model", "threads", "auto P", "auto round s", "P = 1 round s", "auto vs P = 1"], auto))
    return "\n\n".join(text)


def _tflite_paths(data: dict) -> str:
    """LiteRT's kernel paths on one perturbed forward: built-in (what tflite-int8 runs) vs XNNPACK."""
    rows = []
    for b in _stage(data, "tflite_paths"):
        e = b["extra_info"]
        for name, sec in (e.get("seconds_per_set") or {}).items():
            diff = (e.get("max_logit_diff_vs_builtin") or {}).get(name)
            rows.append([e.get("case"), name, _ms(sec), _x((e.get("speedup_vs_builtin") or {}).get(name)),
                         "—" if diff is None else ("exact" if diff == 0 else f"{diff:.3g}")])
    if not rows:
        return ""
    return ("## LiteRT kernel paths: one perturbed int8 forward (builtin = the tflite-int8 runtime's path)\n\n"
            + _table(["model", "path", "ms per set", "vs builtin", "max logit diff vs builtin"], rows))


def _server(data: dict) -> str:
    rows = []
    for b in _stage(data, "server"):
        e, med = b["extra_info"], _median(b)
        c = e.get("clients") or 1
        rows.append([e.get("case", e.get("model")), e.get("params"), e.get("K"), c, _s(med),
                     _ms(None if med is None else med / c)])
    steps = []
    for b in _stage(data, "server-step"):
        e = b["extra_info"]
        steps.append([e.get("case", e.get("model")), e.get("params"), e.get("optimizer"), _ms(_median(b))])
    text = []
    if rows:
        rows.sort(key=lambda r: (str(r[0]), r[2] or 0, r[3]))
        text.append("## Server: decode C reports (K scalars each) + one Adam step\n\n" + _table(
            ["model", "params", "K", "clients C", "round s (median)", "ms per report"], rows))
    if steps:
        steps.sort(key=lambda r: (str(r[0]), str(r[2])))
        text.append("### One server optimizer step\n\n" + _table(["model", "params", "optimizer", "median ms"], steps))
    return "\n\n".join(text)


def _memory(data: dict, out: Path, files: list[Path]) -> tuple[str, dict]:
    by_shape: dict = defaultdict(dict)
    for b in _stage(data, "memory"):
        e = b["extra_info"]
        by_shape[(e.get("case", e.get("model")), e.get("batch"))][e.get("mode")] = e
    if not by_shape:
        return "", by_shape
    rows = []
    order = ["inference", "baffle", "bp-sgd", "bp-adam"]
    for shape in sorted(by_shape, key=lambda k: (str(k[0]), k[1] or 0)):
        modes = by_shape[shape]
        inf = modes.get("inference", {}).get("step_peak_bytes")
        for mode in sorted(modes, key=lambda m: (order.index(m) if m in order else len(order), m)):
            e = modes[mode]
            sp = e.get("step_peak_bytes")
            rows.append([shape[0], shape[1], mode, _mb(sp), _mb(e.get("peak_rss_bytes")),
                         _mb(e.get("optimizer_state_bytes")), _mb(e.get("tracemalloc_peak_bytes")),
                         "—" if not inf or sp is None else f"{sp / inf:.2f}", e.get("method", "")])
    text = "## Memory: one training step (fresh process each)\n\n" + _table(
        ["model", "batch", "mode", "step peak MB", "process peak RSS MB", "optimizer state MB",
         "tracemalloc MB", "x inference", "method"], rows)
    text += ("\n\n`step peak` = resident memory the step added on top of the loaded model, batch and "
             "libraries (RSS high-water mark reset before the step); `x inference` compares step peaks.")
    groups = [f"{c} b{bs}" for c, bs in sorted(by_shape, key=lambda k: (str(k[0]), k[1] or 0))]
    modes = [m for m in order if any(m in v for v in by_shape.values())]
    modes += sorted({m for v in by_shape.values() for m in v} - set(modes))
    series = {m: [(by_shape[s].get(m) or {}).get("step_peak_bytes", None) and
                  by_shape[s][m]["step_peak_bytes"] / MB for s in sorted(by_shape, key=lambda k: (str(k[0]), k[1] or 0))]
              for m in modes}
    files.append(_bars(out / "memory.png", groups, series, ylabel="step peak memory (MB)",
                       title="Peak memory of one step: backprop vs BAFFLE vs inference"))
    return text + "\n\n![memory](memory.png)", by_shape


def _bytes(data: dict, out: Path, files: list[Path]) -> str:
    rows, entries = [], []
    for b in _stage(data, "bytes"):
        e = b["extra_info"]
        up, down = e.get("upload_bytes") or {}, e.get("download_bytes") or {}
        entries.append(e)
        rows.append([e.get("case", e.get("model")), e.get("params"), e.get("K"), _kb(up.get("baffle_json")),
                     _kb(up.get("baffle_npz")), _kb(up.get("baffle_float32")), _kb(up.get("fedsgd")),
                     _kb(down.get("baffle")), _kb(down.get("fedsgd")),
                     "—" if not up.get("baffle_npz") else f"{up['fedsgd'] / up['baffle_npz']:.0f}x"])
    if not rows:
        return ""
    rows.sort(key=lambda r: (str(r[0]), r[2] or 0))
    text = "## Bytes per client per round (KiB)\n\n" + _table(
        ["model", "params", "K", "BAFFLE up JSON", "BAFFLE up NPZ", "BAFFLE up float32", "FedSGD/FedAvg up",
         "BAFFLE down", "FedSGD/FedAvg down", "upload saving (NPZ)"], rows)
    entries.sort(key=lambda e: (str(e.get("case")), e.get("K") or 0))
    groups = [f"{e.get('case')} K{e.get('K')}" for e in entries]
    series = {name: [(e.get("upload_bytes") or {}).get(key) for e in entries]
              for name, key in (("BAFFLE upload (JSON)", "baffle_json"), ("BAFFLE upload (NPZ)", "baffle_npz"),
                                ("dense upload (FedSGD/FedAvg)", "fedsgd"))}
    series["download (all schemes: weights)"] = [(e.get("download_bytes") or {}).get("fedsgd") for e in entries]
    files.append(_bars(out / "bytes.png", groups, series, ylabel="bytes per client per round (log)",
                       title="Bytes per round: BAFFLE vs dense updates", log=True))
    return text + "\n\n![bytes](bytes.png)"


def _targets(fwd: dict, kest: list[dict], mem: dict) -> dict[str, str]:
    t = {}
    wrn = mem.get(("wrn-10-2", 128), {})
    inf, baf, adam = (wrn.get(m, {}).get("step_peak_bytes") for m in ("inference", "baffle", "bp-adam"))
    name = f"memory: BAFFLE <= {MEMORY_VS_INFERENCE} x inference (WRN-10-2, batch 128)"
    if inf and baf is not None:
        r = baf / inf
        t[name] = f"{'PASS' if r <= MEMORY_VS_INFERENCE else 'FAIL'}: {r:.2f} x ({_mb(baf)} vs {_mb(inf)} MB)"
    else:
        t[name] = "not measured (run the memory suite with --bench-full)"
    name = f"memory: backprop+Adam >= {MEMORY_VS_ADAM} x BAFFLE (WRN-10-2, batch 128)"
    if adam and baf:
        r = adam / baf
        t[name] = f"{'PASS' if r >= MEMORY_VS_ADAM else 'FAIL'}: {r:.2f} x ({_mb(adam)} vs {_mb(baf)} MB)"
    else:
        t[name] = "not measured (run the memory suite with --bench-full)"
    name = f"latency: int8 forward >= {INT8_SPEEDUP} x faster than torch fp32 (WRN-10-2, batch 32)"
    row = fwd.get(("wrn-10-2", 32), {})
    fp32 = next((v for k, v in row.items() if k.startswith("torch ") and v), None)
    int8 = {k: v for k, v in row.items() if "int8" in k and v}
    if fp32 and int8:
        best = min(int8, key=int8.get)
        r = fp32 / int8[best]
        t[name] = f"{'PASS' if r >= INT8_SPEEDUP else 'FAIL'}: {r:.2f} x ({best}: {_ms(int8[best])} ms vs torch {_ms(fp32)} ms)"
    else:
        t[name] = "not measured (needs torch and an int8 runtime on wrn-10-2 b32)"
    name = f"K-estimation: client round <= {K_RATIO} x (K+1) forwards"
    ratios = [(e.get("ratio_to_forwards"), e) for e in kest if e.get("ratio_to_forwards") is not None]
    if ratios:
        bad = [(r, e) for r, e in ratios if r > K_RATIO]
        worst, we = max(ratios, key=lambda x: x[0])
        t[name] = (f"{'PASS' if not bad else 'FAIL'}: {len(ratios) - len(bad)}/{len(ratios)} rows hold; worst "
                   f"{worst:.2f} x ({we.get('runtime')}, {we.get('case')}, {we.get('scheme')}, K={we.get('K')})")
    else:
        t[name] = "not measured"
    return t


def build_report(results: str | Path | dict, out: str | Path) -> Report:
    """Write ``benchmarks.md`` and the PNG charts for ``results`` into ``out``."""
    data = results if isinstance(results, dict) else load_results(results)
    if not isinstance(data.get("benchmarks"), list):
        raise ValueError("results: not a pytest-benchmark JSON (no 'benchmarks' list)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    fwd_text, fwd = _forward(data, out, files)
    k_text, kest = _k_estimation(data)
    mem_text, mem = _memory(data, out, files)
    targets = _targets(fwd, kest, mem)
    if (data.get("machine_info") or {}).get("emulated"):  # emulation times judge no speed target
        targets = {k: (f"not judged (emulated CPU; measured {v})" if v.startswith(("PASS", "FAIL")) else v)
                   for k, v in targets.items()}
    sections = ["# baffle-edge benchmarks", _machine(data),
                "## Targets\n\n" + _table(["target", "result"], [[k, v] for k, v in targets.items()]),
                fwd_text, k_text, _batched(data), _tflite_paths(data), _server(data), mem_text,
                _bytes(data, out, files)]
    if not any(b.get("extra_info", {}).get("stage") for b in data["benchmarks"]):
        sections.append("_No baffle-edge benchmark entries (extra_info.stage) in this file._")
    md = "\n\n".join(s for s in sections if s) + "\n"
    path = out / "benchmarks.md"
    path.write_text(md)
    return Report(md, (path, *files), targets)


def cmd_bench_report(a: argparse.Namespace) -> int:
    r = build_report(a.results, a.out)
    for f in r.files:
        print(f)
    for k, v in r.targets.items():
        print(f"{k}: {v}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-report", help="turn a pytest-benchmark JSON into Markdown tables and PNG charts",
        description="Read RESULTS.json (pytest benchmarks/ --benchmark-only --benchmark-json=RESULTS.json) and "
                    "write OUT/benchmarks.md plus latency.png, memory.png and bytes.png (see docs/benchmarks.md).")
    p.add_argument("results", help="the JSON written by --benchmark-json")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.set_defaults(func=cmd_bench_report)
