"""report.md and its figures (accuracy and cosine per round, cosine vs K and sigma)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..estimator import expected_cosine
from ..plots import save_figure
from .config import BASELINE, REFERENCE
from .judge import format_num, format_pct


def plot_accuracy(runs: dict[str, dict], path: Path, title: str) -> Path:
    from ..plots import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        if run["status"] != "ok":
            continue
        ev = [r for r in run["rounds"] if "test_accuracy" in r]
        ax.plot([r["round"] for r in ev], [100 * r["test_accuracy"] for r in ev], marker=".",
                label=run_label(name), lw=2.2 if name in (BASELINE, REFERENCE) else 1.4)
    ax.set(xlabel="round", ylabel="test accuracy (%, EMA weights)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return path


def plot_cosine(runs: dict[str, dict], theory: float, path: Path) -> Path:
    from ..plots import pyplot
    plt = pyplot()
    names = [n for n, r in runs.items() if n != BASELINE and r["status"] == "ok"]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.6 * max(1, len(names)), 3.8), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], names):
        rows = runs[name]["rounds"]
        for key, lab in (("cos_clients_mean", "mean over clients"), ("cos_aggregate", "aggregated update")):
            pts = [(r["round"], r[key]) for r in rows if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), label=lab, alpha=0.85)
        ax.axhline(theory, color="k", ls="--", lw=1, label="sqrt(K/(K+d))")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set(xlabel="round", title=run_label(name))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cosine to exact gradient")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
    return path


def plot_sweep(sweep: dict, dim: int, path: Path) -> Path:
    from ..plots import pyplot
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    ks = sorted({row["k"] for res in sweep["runtimes"].values() for row in res["k"]})
    for name, res in sweep["runtimes"].items():
        for ax, key, rows in ((a1, "k", res["k"]), (a2, "sigma", res["sigma"])):
            pts = [(r[key], r["cos_mean"], r["cos_std"]) for r in rows if r["cos_mean"] is not None]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=run_label(name))
    if ks:
        grid = np.geomspace(min(ks), max(ks), 50)
        a1.plot(grid, [expected_cosine(int(k), dim) for k in grid], "k--", lw=1, label="sqrt(K/(K+d))")
        a2.axhline(expected_cosine(sweep["k_at"], dim), color="k", ls="--", lw=1,
                   label=f"sqrt(K/(K+d)), K={sweep['k_at']}")
    a1.set(xscale="log", xlabel="K (perturbations)", ylabel="cosine to exact gradient",
           title=f"cosine vs K (sigma={sweep['sigma_at']:g})")
    a2.set(xscale="log", xlabel="sigma (float domain; int8-step runtimes move whole steps)",
           title=f"cosine vs sigma (K={sweep['k_at']})")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def run_label(name: str) -> str:
    """How reports, logs and figures name a run (the baseline and the reference in words)."""
    return {BASELINE: "backprop (float baseline)", REFERENCE: "fp32 BAFFLE (torch)"}.get(name, name)


def summary_table(report: dict) -> str:
    runs, verdicts = report["runs"], report["verdicts"]
    bp_acc = runs[BASELINE]["summary"]["final_accuracy"]
    ref_acc = runs[REFERENCE]["summary"]["final_accuracy"]
    lines = ["| run | perturbation | final accuracy | gap to fp32 BAFFLE | gap to backprop | mean cosine (clients) "
             "| mean cosine (aggregate) | norm ratio | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if run["status"] != "ok":
            v = verdicts[name]
            what = "unavailable" if v["pass"] else f"FAIL: {run['status']}"  # unavailable or error
            lines.append(f"| {name} | – | – | – | – | – | – | – | {what}: {_md(run['reason'])} |")
            continue
        eff = run.get("effective", {})
        decoding = [eff[k] for k in ("estimator", "baseline") if eff.get(k) and eff[k] != "base"]
        pert = ("exact gradient" if name == BASELINE else
                ", ".join([eff["noise"], eff["domain"]] + decoding) if eff.get("noise") else "–")
        s = run["summary"]
        acc = s["final_accuracy"]
        gap = lambda ref: "–" if acc is None or ref is None else f"{100 * (acc - ref):+.2f}"  # noqa: E731
        if name == BASELINE:
            verdict = "baseline"
        else:
            v = verdicts[name]
            verdict = ("PASS" if v["pass"] else "FAIL: " + "; ".join(_md(x) for x in v["reasons"]))
            verdict += " (reference)" if name == REFERENCE else ""
        lines.append(f"| {run_label(name)} | {pert} | {format_pct(acc)} "
                     f"| {gap(ref_acc) if name != REFERENCE else '0 (reference)'} "
                     f"| {gap(bp_acc) if name != BASELINE else '–'} | {format_num(s['mean_cos_clients'])} "
                     f"| {format_num(s['mean_cos_aggregate'])} | {format_num(s['mean_norm_ratio'], 2)} | {verdict} |")
    return "\n".join(lines)


def compute_table(report: dict) -> str:
    """Per run: client compute per round, the cosine it buys per forward pass and per GMAC, the upload,
    accuracy along the rounds and the gap to backprop."""
    runs = report["runs"]
    bp_acc = runs[BASELINE]["summary"]["final_accuracy"]
    ok = {n: r for n, r in runs.items() if r["status"] == "ok" and "forward_equivalents" in r["summary"]}
    if not ok:
        return ""
    marks = list(next(iter(ok.values()))["summary"]["accuracy_at"])
    lines = ["| run | K | forward-equivalents per client round | GMAC per client round | cosine per forward "
             "| cosine per GMAC | bytes per report | " + " | ".join(f"accuracy @{m}" for m in marks)
             + " | gap to backprop |", "|---|" + "---|" * (7 + len(marks))]
    for name, run in ok.items():
        s, eff = run["summary"], run.get("effective", {})
        acc = s["final_accuracy"]
        gap = "–" if name == BASELINE or acc is None or bp_acc is None else f"{100 * (acc - bp_acc):+.2f}"
        up = s.get("bytes_up_per_report")
        lines.append(f"| {run_label(name)} | {eff.get('k', '–') if name != BASELINE else '–'} "
                     f"| {s['forward_equivalents']:.1f} | {s['macs_per_round'] / 1e9:.3f} "
                     f"| {format_num(s['cos_per_forward'], 5)} | {format_num(s['cos_per_gmac'], 3)} "
                     f"| {'–' if up is None else f'{up:,.0f}'} | "
                     + " | ".join(format_pct(s["accuracy_at"].get(m)) for m in marks) + f" | {gap} |")
    return "\n".join(lines)


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_report_md(report: dict, out: Path, figures: dict[str, str]) -> Path:
    cfg, th = report["config"], report["thresholds"]
    lines = [f"# BAFFLE verification: {cfg['model']} on {cfg['dataset']}", "",
             f"**Result: {'PASS' if report['passed'] else 'FAIL'}**"
             + ("" if report["passed"] else f" — failing: {', '.join(report['failing'])}"), "",
             f"Preset `{report['preset']}`; {cfg['clients']} clients, batch {cfg['batch_size']}, "
             f"{cfg['rounds']} rounds (FedSGD), K = {cfg['k']}, sigma = {cfg['sigma']:g}, seed {cfg['seed']}; "
             f"d = {report['parameters']:,} parameters, so sqrt(K/(K+d)) = {report['theory_cosine']:.3f}. "
             f"Every run saw the same batches: **{'yes' if report['same_batches']['ok'] else 'NO'}** "
             f"(digest `{report['same_batches']['baseline_digest']}`).", "",
             summary_table(report), "",
             "Thresholds: a runtime passes iff its final test accuracy is at least fp32 BAFFLE's minus "
             f"**{th['acc_margin']} points**, its mean client cosine is at least **{th['cos_fraction']}x** "
             f"fp32 BAFFLE's, at most {th['max_rejected']} of its reports were rejected, and it used the "
             f"baseline's batches. fp32 BAFFLE itself must reach a mean client cosine of "
             f"**{th['ref_cos_fraction']} x sqrt(K/(K+d))**. Cosine = cos(decoded client estimate, exact "
             "gradient of that client's batch at the same weights), averaged over clients and rounds; "
             "aggregate = cos(server's weighted mean update, exact gradient of the union of the batches); "
             "norm ratio = |estimate after clipping| / |exact gradient after the same clipping|.", ""]
    table = compute_table(report)
    if table:
        lines += ["## Compute and what it buys", "",
                  "Per client round (one local step): model compute in full-forward equivalents and MACs "
                  "(conv and linear layers; block noise on torch counts the incremental rows, "
                  "docs/noise.md section 9), the mean client cosine divided by it, the upload, and test "
                  "accuracy along the rounds.", "", table, ""]
    if figures.get("accuracy"):
        lines += ["## Accuracy", "", f"![accuracy vs round]({figures['accuracy']})", ""]
    if figures.get("cosine"):
        lines += ["## Gradient cosine during training", "", f"![cosine vs round]({figures['cosine']})", ""]
    sw = report.get("sweep")
    if sw:
        lines += ["## Cosine vs K and sigma (fixed weights and batches)", "",
                  f"Weights: the backprop run's before round {sw['round'] + 1}; {sw['clients']} client "
                  f"batch(es) x {sw['seeds']} noise seeds per point (mean ± std).", ""]
        if figures.get("sweep"):
            lines += [f"![cosine sweep]({figures['sweep']})", ""]
        names = list(sw["runtimes"])
        lines += ["| K | sqrt(K/(K+d)) | " + " | ".join(run_label(n) for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for i, k in enumerate(sw["ks"]):
            cells = [_pm(sw["runtimes"][n]["k"][i]) for n in names]
            lines.append(f"| {k} | {expected_cosine(k, report['parameters']):.3f} | " + " | ".join(cells) + " |")
        lines += ["", "| sigma | " + " | ".join(run_label(n) for n in names) + " |", "|---|" + "---|" * len(names)]
        for i, s in enumerate(sw["sigmas"]):
            lines.append(f"| {s:g} | " + " | ".join(_pm(sw["runtimes"][n]["sigma"][i]) for n in names) + " |")
        lines.append("")
    lines += ["## Versions", "", "```", json.dumps(report["versions"], indent=1), "```", "",
              f"Wall time: {report['seconds_total']:.0f} s. Full data: `verify.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _pm(row: dict) -> str:
    if row["cos_mean"] is None:
        return f"failed ({row['failed']})"
    return f"{row['cos_mean']:.3f} ± {row['cos_std']:.3f}"
