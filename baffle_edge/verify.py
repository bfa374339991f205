"""``baffle-edge verify``: the reference server checks that every runtime's gradients converge like
fp32 BAFFLE and the float backprop baseline (docs/verify.md).

One seed, one federation schedule, identical client batches. Runs, in this order, each with its
own ``Federation`` (own model, server, optimizer, sessions; nothing is shared between runs but
the read-only dataset arrays):

1. ``bp``     exact backprop on the clients' batches (the float baseline),
2. ``torch``  fp32 BAFFLE (the reference every other runtime is judged against),
3. one run per other requested runtime, built as ``TrainConfig(runtime=name)`` and nothing else:
   how the runtime perturbs and how its reports are decoded is the Federation's business.

During every run ``Federation.step(on_update=...)`` hands over each accepted client update with the
weights and batch it was computed at; the server computes the exact gradient there and records
the cosine (per client and of the aggregated update) and the norm ratio. A sweep of cosine vs K
and vs sigma on fixed weights/batches (several noise seeds) follows. Results: ``verify.json``,
``report.md`` and PNG figures; the exit code is 0 iff every runtime passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .client import Batch
from .data import Dataset, load_dataset
from .estimator import clip_inf, cosine, expected_cosine
from .models import build_model
from .params import flat_grad, set_flat_params
from .protocol import Baseline, Domain, StepEstimator
from .plots import save_figure
from .server import ClientUpdate, OptimConfig
from .simulate import Federation, Method, TrainConfig

REFERENCE = "torch"  # the fp32 BAFFLE runtime every other runtime is compared with
BASELINE = "bp"  # name of the backprop run
FORMAT = 1


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria (docs/verify.md). A runtime passes iff every check holds."""

    acc_margin: float = 2.0  # percentage points: final acc >= fp32 BAFFLE's final acc - margin
    cos_fraction: float = 0.8  # mean client cosine >= this x fp32 BAFFLE's mean client cosine
    ref_cos_fraction: float = 0.5  # fp32 BAFFLE itself: mean client cosine >= this x sqrt(K/(K+d))
    max_rejected: int = 0  # rejected client reports allowed per run (simulation: none expected)


@dataclass(frozen=True)
class Sweep:
    """Cosine vs K and vs sigma on fixed weights and batches, averaged over noise seeds."""

    ks: tuple[int, ...] = (10, 50, 100, 500)  # K values (at the run's sigma)
    sigmas: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # sigma values (at the run's K)
    seeds: int = 3  # noise seeds averaged per point
    clients: int = 2  # client batches per seed (clients 0..n-1 of the snapshot round)
    at_round: int | None = None  # weights = the bp run's weights before this round (None: rounds // 4)


@dataclass(frozen=True)
class VerifyConfig:
    train: TrainConfig  # the shared schedule; method and runtime are replaced per run
    runtimes: tuple[str, ...]  # runtimes to judge (the reference "torch" always runs)
    explicit: bool = False  # the user named the runtimes: an unavailable one then fails the check
    thresholds: Thresholds = Thresholds()
    sweep: Sweep | None = Sweep()  # None: no sweep
    train_subset: int | None = None  # use this many training samples (seeded subset); None = all
    test_subset: int | None = None
    preset: str = "full"
    torch_threads: int = 1  # torch intra-op threads during the check (clients run in parallel already)


FULL = dict(rounds=100, k=100, clients=10, eval_every=5, sweep=Sweep())  # digits: 100 rounds = 20 epochs
QUICK = dict(rounds=30, k=20, clients=10, eval_every=5,
             sweep=Sweep(ks=(10, 50, 200), sigmas=(1e-5, 1e-3, 1e-1), seeds=2, clients=1))
CIFAR = dict(train_subset=5000, test_subset=1000)  # WRN-10-2 on a CIFAR-10 subset (with --data-dir)


# ---------------------------------------------------------------------------------------------
# measurement


def batch_hash(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(np.ascontiguousarray(b.x).tobytes())
        h.update(np.ascontiguousarray(b.y).tobytes())
    return h.hexdigest()[:16]


class ExactGradient:
    """The server's own float model: exact gradient of one batch's loss at given weights."""

    def __init__(self, fed: Federation):
        self.model = build_model(fed.model_cfg, seed=fed.cfg.seed)

    def __call__(self, weights: np.ndarray, batch: Batch) -> np.ndarray:
        set_flat_params(self.model, torch.from_numpy(np.asarray(weights, dtype=np.float32)))
        self.model.zero_grad(set_to_none=True)
        logits = self.model(torch.from_numpy(batch.x)).double()
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.y)).backward()
        g = flat_grad(self.model).numpy().astype(np.float64)
        self.model.zero_grad(set_to_none=True)
        return g


class GradientProbe:
    """``on_update`` callback: compares each decoded client update with the exact gradient of the
    same client's batch at the same weights, and fingerprints the batches."""

    def __init__(self, fed: Federation):
        self.exact = ExactGradient(fed)
        self.clip = fed.cfg.optim.clip
        self.hashes: dict[tuple[int, int], str] = {}  # (round, client) -> batch hash
        self._reset()

    def _reset(self):
        self.cos, self.ratio, self.n = [], [], 0.0
        self.sum_est = self.sum_true = None

    def __call__(self, round_: int, client: int, weights: np.ndarray, batches: list[Batch],
                 update: ClientUpdate) -> None:
        self.hashes[(round_, client)] = batch_hash(batches)
        if update.gradient is None:
            raise ValueError("verify supports FedSGD updates (a gradient per client) only")
        est = np.asarray(update.gradient, dtype=np.float64)
        true = self.exact(weights, batches[0])
        self.cos.append(cosine(est, true))
        ref_norm = float(np.linalg.norm(clip_inf(true, self.clip)))
        self.ratio.append(float(np.linalg.norm(est)) / ref_norm if ref_norm > 0 else float("nan"))
        w = float(update.weight)
        self.sum_est = w * est if self.sum_est is None else self.sum_est + w * est
        self.sum_true = w * true if self.sum_true is None else self.sum_true + w * true
        self.n += w

    def finish_round(self, round_: int) -> dict:
        """The round's gradient metrics (None when no update was accepted)."""
        clients = sorted(c for (r, c) in self.hashes if r == round_)
        digest = hashlib.sha256("".join(f"{c}:{self.hashes[(round_, c)]};" for c in clients).encode())
        row = {"cos_clients_mean": _mean(self.cos), "cos_clients_min": min(self.cos) if self.cos else None,
               "cos_aggregate": cosine(self.sum_est, self.sum_true) if self.sum_est is not None else None,
               "norm_ratio_mean": _mean(self.ratio), "batch_hash": digest.hexdigest()[:16],
               "clients_hashed": len(clients)}
        self._reset()
        return row


def _val(x):
    return getattr(x, "value", x)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


# ---------------------------------------------------------------------------------------------
# runs


def _load_data(vc: VerifyConfig) -> Dataset:
    cfg = vc.train
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0x5EB5])
    changes = {}
    for split, n in (("train", vc.train_subset), ("test", vc.test_subset)):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if n is not None and n < len(y):
            idx = np.sort(rng.choice(len(y), n, replace=False))
            changes[f"x_{split}"], changes[f"y_{split}"] = x[idx], y[idx]
    return dataclasses.replace(data, **changes) if changes else data


def data_hash(data: Dataset) -> str:
    """Fingerprint of the dataset arrays; checked after every run (no run may alter the shared data)."""
    h = hashlib.sha256()
    for a in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def runtime_status(name: str) -> str | None:
    """None if ``name`` can be instantiated, else the reason. Unknown names raise ValueError."""
    from baffle_edge.runtimes import get_runtime
    try:
        get_runtime(name)
    except ImportError as e:
        return str(e)
    return None


def default_runtimes() -> tuple[str, ...]:
    """torch plus every registered int8 runtime that is importable here."""
    from baffle_edge.runtimes import REGISTRY
    out = [REFERENCE]
    for name, info in REGISTRY.items():
        if name != REFERENCE and ("int8" in name or getattr(info, "domain", "float") == "int8-step"):
            try:
                ok = runtime_status(name) is None
            except Exception:
                ok = False
            if ok:
                out.append(name)
    return tuple(out)


def _runtime_versions(name: str) -> dict:
    from baffle_edge.runtimes import REGISTRY
    info = REGISTRY.get(name)
    out = {}
    for mod in getattr(info, "requires", ()) or ():
        try:
            out[mod] = str(getattr(importlib.import_module(mod), "__version__", "?"))
        except Exception:
            out[mod] = None
    return out


def run_one(name: str, cfg: TrainConfig, data: Dataset, *, progress: bool = False,
            snapshot_round: int | None = None) -> dict:
    """Train one run with its own Federation; return its record (rows, summary, batch hashes)."""
    fed = Federation(cfg, data=data)
    probe = GradientProbe(fed)
    t0 = fed.task(0, 0)  # what the Federation made of this runtime: noise, domain (recorded, not chosen here)
    effective = {"noise": _val(t0.noise), "domain": _val(t0.domain), "scheme": _val(t0.scheme), "k": t0.k,
                 "sigma": t0.sigma, "baseline": _val(t0.baseline)}
    if t0.domain is Domain.INT8_STEP:
        effective["estimator"] = _val(t0.estimator)
    rows, snapshot = [], None
    start = time.perf_counter()
    it = range(cfg.rounds)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"verify {name}", unit="round", dynamic_ncols=True, file=sys.stderr)
    try:
        for r in it:
            if snapshot_round is not None and r == snapshot_round:
                snapshot = fed.server.flat().numpy().copy()
            row = fed.step(r, on_update=probe).to_json()
            row.update(probe.finish_round(r))
            if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
                row.update(fed.evaluate())
            rows.append(row)
        if snapshot_round is not None and snapshot is None:
            snapshot = fed.server.flat().numpy().copy()
    finally:
        fed.pool.shutdown(wait=True)
    evals = [r for r in rows if "test_accuracy" in r]
    rejected = [(r["round"], c, why) for r in rows for c, why in r["rejected"].items()]
    summary = {
        "final_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "final_accuracy_raw": evals[-1]["test_accuracy_raw"] if evals else None,
        "final_train_loss": next((r["train_loss"] for r in reversed(rows) if r["train_loss"] is not None), None),
        "mean_cos_clients": _mean(r["cos_clients_mean"] for r in rows),
        "mean_cos_aggregate": _mean(r["cos_aggregate"] for r in rows),
        "mean_norm_ratio": _mean(r["norm_ratio_mean"] for r in rows),
        "rejected_reports": len(rejected),
        "first_rejection": (f"round {rejected[0][0]} client {rejected[0][1]}: {rejected[0][2]}"
                            if rejected else None),
        "seconds": time.perf_counter() - start,
    }
    return {"name": name, "status": "ok", "method": cfg.method.value, "runtime": cfg.runtime,
            "config": cfg.to_json(), "effective": effective, "versions": _runtime_versions(cfg.runtime),
            "summary": summary,
            "rounds": rows, "_hashes": probe.hashes, "_snapshot": snapshot}


def compare_batches(runs: dict[str, dict]) -> dict:
    """Every run must have used the baseline's batch for every (round, client) it reports."""
    base = runs[BASELINE]["_hashes"]
    out = {"ok": True, "baseline_digest": _digest(base), "runs": {}}
    for name, run in runs.items():
        if run.get("status") != "ok":
            continue
        h = run["_hashes"]
        bad = sorted(key for key in h if base.get(key) != h[key])
        out["runs"][name] = {"digest": _digest(h), "pairs_checked": len(h), "mismatches": len(bad),
                             "first_mismatch": ({"round": bad[0][0], "client": bad[0][1]} if bad else None)}
        out["ok"] = out["ok"] and not bad
    return out


def _digest(h: dict) -> str:
    return hashlib.sha256("".join(f"{r}/{c}:{v};" for (r, c), v in sorted(h.items())).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# sweep


def sweep_runtime(name: str, base: TrainConfig, data: Dataset, weights: np.ndarray, sw: Sweep,
                  round_: int) -> dict:
    """Cosine of the decoded estimate to the exact gradient on fixed weights and batches, for each
    K (at base.sigma) and each sigma (at base.k), averaged over ``sw.seeds`` noise seeds x clients.
    Every point goes through the runtime's own Federation (session + server decode)."""
    def points(cfg: TrainConfig, ks: list[int]) -> dict[int, list[float]]:
        fed = Federation(dataclasses.replace(cfg, rounds=max(cfg.rounds, round_ + 1)), data=data)
        try:
            fed.server.set_flat(weights)
            if getattr(fed, "bundle_dir", None) is not None:  # exported runtimes: re-export at these weights
                fed.refresh_bundle(fed.server.flat())
            exact = ExactGradient(fed)
            clients = list(range(min(sw.clients, cfg.clients)))
            batches = {c: fed.batches(c, round_) for c in clients}
            true = {c: exact(weights, batches[c][0]) for c in clients}
            jobs = [(k, s, c) for k in ks for s in range(sw.seeds) for c in clients]

            def one(job):
                k, s, c = job
                task = dataclasses.replace(fed.task(round_, c), k=k, seed=cfg.seed + 1000 * (s + 1))
                try:
                    out = fed.server.decode(task, fed.baffle_client(task, batches[c]))
                except Exception as e:  # a failing runtime is a result
                    out = f"{type(e).__name__}: {e}"
                return k, (cosine(out.gradient, true[c]) if isinstance(out, ClientUpdate) else str(out))

            res: dict[int, list] = {k: [] for k in ks}
            for k, c in fed.pool.map(one, jobs):
                res[k].append(c)
            return res
        finally:
            fed.pool.shutdown(wait=True)

    def stat(k: int, xs: list) -> dict:
        ok = [x for x in xs if not isinstance(x, str)]
        errors = [x for x in xs if isinstance(x, str)]
        return {"cos_mean": float(np.mean(ok)) if ok else None, "cos_std": float(np.std(ok)) if ok else None,
                "n": len(ok), "failed": len(errors), "first_error": errors[0] if errors else None}

    base = dataclasses.replace(base, method=Method.BAFFLE, runtime=name)
    start = time.perf_counter()
    by_k = points(base, list(sw.ks))
    k_rows = [{"k": k, **stat(k, by_k[k])} for k in sw.ks]
    s_rows = []
    for sigma in sw.sigmas:
        res = points(dataclasses.replace(base, sigma=sigma), [base.k])[base.k]
        s_rows.append({"sigma": sigma, **stat(base.k, res)})
    return {"k": k_rows, "sigma": s_rows, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# verdicts


def judge(runs: dict[str, dict], batches: dict, th: Thresholds, theory: float, explicit: bool) -> dict:
    ref = runs[REFERENCE]["summary"]
    verdicts = {}
    for name, run in runs.items():
        if name == BASELINE:
            continue
        checks, reasons = {}, []
        if run["status"] == "error":
            verdicts[name] = {"pass": False, "status": "error", "reasons": [f"error: {run['reason']}"],
                              "checks": checks}
            continue
        if run["status"] != "ok":
            passed = not explicit
            reasons.append(f"unavailable: {run['reason']}" + ("" if explicit else " (not requested: ignored)"))
            verdicts[name] = {"pass": passed, "status": "unavailable", "reasons": reasons, "checks": checks}
            continue
        s = run["summary"]
        b = batches["runs"].get(name, {})
        checks["same_batches"] = {"ok": b.get("mismatches", 1) == 0, "pairs_checked": b.get("pairs_checked"),
                                  "mismatches": b.get("mismatches"), "first": b.get("first_mismatch")}
        if not checks["same_batches"]["ok"]:
            reasons.append(f"batches differ from the baseline's ({b.get('mismatches')} mismatches, first "
                           f"{b.get('first_mismatch')})")
        checks["rejected"] = {"ok": s["rejected_reports"] <= th.max_rejected, "value": s["rejected_reports"],
                              "max": th.max_rejected}
        if not checks["rejected"]["ok"]:
            reasons.append(f"{s['rejected_reports']} rejected reports (first: {s['first_rejection']})")
        cos = s["mean_cos_clients"]
        if name == REFERENCE:
            need = th.ref_cos_fraction * theory
            checks["cosine"] = {"ok": cos is not None and cos >= need, "value": cos, "min": need,
                                "rule": f"mean client cosine >= {th.ref_cos_fraction} x sqrt(K/(K+d))"}
        else:
            need = th.cos_fraction * ref["mean_cos_clients"] if ref["mean_cos_clients"] is not None else math.inf
            checks["cosine"] = {"ok": cos is not None and cos >= need, "value": cos, "min": need,
                                "rule": f"mean client cosine >= {th.cos_fraction} x fp32 BAFFLE's"}
            acc, ref_acc = s["final_accuracy"], ref["final_accuracy"]
            need_acc = None if ref_acc is None else ref_acc - th.acc_margin / 100
            checks["accuracy"] = {"ok": acc is not None and need_acc is not None and acc >= need_acc - 1e-12,
                                  "value": acc, "min": need_acc,
                                  "rule": f"final accuracy >= fp32 BAFFLE's - {th.acc_margin} points"}
            if not checks["accuracy"]["ok"]:
                reasons.append(f"final accuracy {_pct(acc)} < {_pct(need_acc)} (fp32 BAFFLE {_pct(ref_acc)} "
                               f"- {th.acc_margin} points)")
        if not checks["cosine"]["ok"]:
            reasons.append(f"mean cosine {_num(cos)} < {_num(need)} ({checks['cosine']['rule']})")
        verdicts[name] = {"pass": all(c["ok"] for c in checks.values()), "status": "ok", "reasons": reasons,
                          "checks": checks}
    return verdicts


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


# ---------------------------------------------------------------------------------------------
# figures and report


def plot_accuracy(runs: dict[str, dict], path: Path, title: str) -> Path:
    from .plots import _plt
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        if run["status"] != "ok":
            continue
        ev = [r for r in run["rounds"] if "test_accuracy" in r]
        ax.plot([r["round"] for r in ev], [100 * r["test_accuracy"] for r in ev], marker=".",
                label=_label(name), lw=2.2 if name in (BASELINE, REFERENCE) else 1.4)
    ax.set(xlabel="round", ylabel="test accuracy (%, EMA weights)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return path


def plot_cosine(runs: dict[str, dict], theory: float, path: Path) -> Path:
    from .plots import _plt
    plt = _plt()
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
        ax.set(xlabel="round", title=_label(name))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cosine to exact gradient")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
    return path


def plot_sweep(sweep: dict, dim: int, path: Path) -> Path:
    from .plots import _plt
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    ks = sorted({row["k"] for res in sweep["runtimes"].values() for row in res["k"]})
    for name, res in sweep["runtimes"].items():
        for ax, key, rows in ((a1, "k", res["k"]), (a2, "sigma", res["sigma"])):
            pts = [(r[key], r["cos_mean"], r["cos_std"]) for r in rows if r["cos_mean"] is not None]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=_label(name))
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


def _label(name: str) -> str:
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
        lines.append(f"| {_label(name)} | {pert} | {_pct(acc)} | {gap(ref_acc) if name != REFERENCE else '0 (reference)'} "
                     f"| {gap(bp_acc) if name != BASELINE else '–'} | {_num(s['mean_cos_clients'])} "
                     f"| {_num(s['mean_cos_aggregate'])} | {_num(s['mean_norm_ratio'], 2)} | {verdict} |")
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
        lines += ["| K | sqrt(K/(K+d)) | " + " | ".join(_label(n) for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for i, k in enumerate(sw["ks"]):
            cells = [_pm(sw["runtimes"][n]["k"][i]) for n in names]
            lines.append(f"| {k} | {expected_cosine(k, report['parameters']):.3f} | " + " | ".join(cells) + " |")
        lines += ["", "| sigma | " + " | ".join(_label(n) for n in names) + " |", "|---|" + "---|" * len(names)]
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


# ---------------------------------------------------------------------------------------------
# driver


def verify(vc: VerifyConfig, out_dir: str | Path, *, progress: bool = False, argv: list[str] | None = None,
           log=print) -> dict:
    """Run the whole check and write ``out_dir``; return the report dict (``report['passed']``)."""
    keep = torch.get_num_threads()
    torch.set_num_threads(vc.torch_threads)  # clients already run in parallel (workers); restored below
    try:
        return _verify(vc, out_dir, progress=progress, argv=argv, log=log)
    finally:
        torch.set_num_threads(keep)


def _verify(vc: VerifyConfig, out_dir: str | Path, *, progress: bool, argv: list[str] | None, log) -> dict:
    from .simulate import _versions
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose another --out")
    if vc.train.strategy != "fedsgd":
        raise ValueError("verify compares per-client gradients: it runs FedSGD only")
    start = time.perf_counter()
    data = _load_data(vc)
    base = dataclasses.replace(vc.train, runtime=REFERENCE, method=Method.BAFFLE, baseline=None)  # the reference

    def run_config(name: str) -> TrainConfig:
        """One run's settings: the reference keeps its own; judged runtimes get the user's options."""
        if name == BASELINE:
            return dataclasses.replace(base, method=Method.BP)
        return base if name == REFERENCE else dataclasses.replace(base, runtime=name, baseline=vc.train.baseline)
    judged = [REFERENCE] + [n for n in vc.runtimes if n != REFERENCE]
    unavailable = {}
    for name in judged:
        reason = runtime_status(name)  # ValueError for an unknown name: a usage error
        if reason is not None:
            unavailable[name] = reason
    sw = vc.sweep
    snap_round = None if sw is None else (sw.at_round if sw.at_round is not None else base.rounds // 4)
    if snap_round is not None and not 0 <= snap_round < base.rounds:
        raise ValueError(f"sweep round {snap_round} outside [0, {base.rounds})")
    if REFERENCE in unavailable:
        raise ImportError(f"the reference runtime {REFERENCE!r} is unavailable: {unavailable[REFERENCE]}")

    data_fp = data_hash(data)
    runs: dict[str, dict] = {}
    for name in [BASELINE] + judged:
        if name in unavailable:
            runs[name] = {"name": name, "status": "unavailable", "reason": unavailable[name], "runtime": name}
            log(f"verify: {name}: unavailable ({unavailable[name]})")
            continue
        try:
            run = run_one(name, run_config(name), data, progress=progress,
                          snapshot_round=snap_round if name == BASELINE else None)
        except Exception as e:  # a runtime that cannot even start is a failed check, not a crash
            if name in (BASELINE, REFERENCE):
                raise
            runs[name] = {"name": name, "status": "error", "reason": f"{type(e).__name__}: {e}", "runtime": name}
            log(f"verify: {name}: error ({runs[name]['reason']})")
            continue
        if data_hash(data) != data_fp:
            raise RuntimeError(f"run {name!r} modified the shared dataset arrays; verification is void")
        runs[name] = run
        s = run["summary"]
        log(f"verify: {_label(name)}: accuracy {_pct(s['final_accuracy'])}, mean cosine "
            f"{_num(s['mean_cos_clients'])}, {s['rejected_reports']} rejected, {s['seconds']:.0f} s")

    fed_dim = Federation(dataclasses.replace(base, workers=1), data=data)
    dim = fed_dim.server.dim
    fed_dim.pool.shutdown()
    theory = expected_cosine(base.k, dim)
    batches = compare_batches(runs)

    sweep = None
    if sw is not None:
        weights = runs[BASELINE]["_snapshot"]
        sweep = {"round": snap_round, "ks": list(sw.ks), "sigmas": list(sw.sigmas), "seeds": sw.seeds,
                 "clients": sw.clients, "k_at": base.k, "sigma_at": base.sigma, "runtimes": {}}
        for name in judged:
            if runs[name]["status"] == "ok":
                try:
                    sweep["runtimes"][name] = sweep_runtime(name, run_config(name), data, weights, sw, snap_round)
                except Exception as e:  # reported, and the run's own verdict already covers the runtime
                    sweep.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                    log(f"verify: sweep {name}: error ({sweep['errors'][name]})")
                    continue
                log(f"verify: sweep {name}: " + ", ".join(
                    f"K={r['k']}: {_num(r['cos_mean'])}" for r in sweep["runtimes"][name]["k"]))

    verdicts = judge(runs, batches, vc.thresholds, theory, vc.explicit)
    failing = [n for n, v in verdicts.items() if not v["pass"]]
    report = {
        "format": FORMAT, "command": argv, "preset": vc.preset, "config": base.to_json(),
        "torch_threads": vc.torch_threads, "workers": base.workers,
        "runtimes_requested": list(vc.runtimes), "runtimes_explicit": vc.explicit,
        "train_subset": vc.train_subset, "test_subset": vc.test_subset,
        "data_hash": data_fp, "train_samples": int(len(data.y_train)), "test_samples": int(len(data.y_test)),
        "parameters": dim, "theory_cosine": theory, "thresholds": dataclasses.asdict(vc.thresholds),
        "versions": {**_versions(), **{f"runtime:{n}": r.get("versions", {}) for n, r in runs.items()
                                       if r["status"] == "ok" and n != BASELINE}},
        "same_batches": batches, "sweep": sweep, "verdicts": verdicts, "passed": not failing,
        "failing": failing,
        "runs": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in runs.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    title = f"{base.model} on {base.dataset}: K={base.k}, sigma={base.sigma:g}, {base.clients} clients"
    figures = {"accuracy": plot_accuracy(runs, out / "accuracy.png", title).name,
               "cosine": plot_cosine(runs, theory, out / "cosine.png").name}
    if sweep and sweep["runtimes"]:
        figures["sweep"] = plot_sweep(sweep, dim, out / "sweep.png").name
    report["figures"] = figures
    report["seconds_total"] = time.perf_counter() - start
    (out / "verify.json").write_text(json.dumps(report, indent=1, allow_nan=False, default=_json_default))
    write_report_md(report, out, figures)
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# command line

HELP = """\
Runs, with one seed and identical client batches, the float backprop baseline, fp32 BAFFLE
(torch) and BAFFLE through each named runtime, all driven by the reference server; measures the
cosine of every decoded client estimate to the exact gradient of its batch; sweeps the cosine vs K
and vs sigma; writes OUT/verify.json, OUT/report.md and PNG figures. Exit code 0 iff every runtime
passes, 1 if one fails (named on stderr), 2 on a usage error. See docs/verify.md.

Runtimes: --runtimes defaults to torch plus every registered int8 runtime that is importable
here. A runtime that is unavailable (its dependency is not installed) is reported as
"unavailable: <reason>"; it fails the check only if you named it explicitly in --runtimes."""


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify", help="check that each runtime's BAFFLE gradients converge like fp32 "
                              "BAFFLE and the backprop baseline", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from .data import DATASETS
    from .models import MODEL_NAMES
    g = p.add_argument_group("what to check")
    g.add_argument("--runtimes", default=None,
                   help="comma-separated runtimes to judge against fp32 BAFFLE (torch always runs as the "
                        "reference). Default: torch + registered, importable int8 runtimes. A runtime named "
                        "here that is unavailable fails the check; an unavailable default one does not")
    g.add_argument("--quick", action="store_true",
                   help=f"smoke-test preset (a few minutes on 2 cores): {QUICK['clients']} clients, "
                        f"K={QUICK['k']}, {QUICK['rounds']} rounds, a small sweep. Default: the full preset "
                        f"({FULL['clients']} clients, K={FULL['k']}, {FULL['rounds']} rounds = 20 epochs "
                        "of digits, sweep K 10/50/100/500 and sigma 1e-6..1e-1 over 3 seeds)")
    g.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help="default: lenet (wrn-10-2 with --data-dir)")
    g.add_argument("--dataset", default=None, choices=DATASETS, help="default: digits (cifar10 with --data-dir)")
    g.add_argument("--data-dir", default=None,
                   help="local dataset files; switches the default to WRN-10-2 on a CIFAR-10 subset")
    g.add_argument("--train-subset", type=int, default=None,
                   help=f"seeded subset of training samples (default: all; CIFAR-10: {CIFAR['train_subset']})")
    g.add_argument("--test-subset", type=int, default=None,
                   help=f"seeded subset of test samples (default: all; CIFAR-10: {CIFAR['test_subset']})")
    g = p.add_argument_group("schedule (preset values unless given)")
    g.add_argument("--rounds", type=int, default=None, help="FedSGD rounds (full 100, quick 30)")
    g.add_argument("--k", type=int, default=None, help="perturbations per client (full 100, quick 20)")
    g.add_argument("--sigma", type=float, default=1e-4, help="perturbation scale (default: 1e-4)")
    g.add_argument("--refresh-every", type=int, default=None,
                   help="bundle runtimes: re-export and re-calibrate every N rounds (as in `train`; default: "
                        "the format's: 1)")
    g.add_argument("--baseline", default=None, choices=["base", "leave-one-out"],
                   help="what each perturbed loss is compared with, for the judged runtimes (as in `train`; "
                        "default: the runtime's, base for float and leave-one-out for int8; fp32 BAFFLE always "
                        "uses the reference base loss)")
    g.add_argument("--int8-estimator", default="rms-step", choices=["rms-step", "per-step"],
                   help="how int8 runtimes' +-1-step losses decode into a gradient (as in `train`; "
                        "docs/quantized-perturbation.md) (default: rms-step)")
    g.add_argument("--clients", type=int, default=None, help="clients (full 10, quick 10)")
    g.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    g.add_argument("--eval-every", type=int, default=None, help="rounds between evaluations (default: 5)")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")
    g.add_argument("--workers", type=int, default=2, help="threads simulating clients (default: 2)")
    g.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads per simulated client; 1 avoids oversubscribing the "
                        "cores the --workers already use (default: 1)")
    g = p.add_argument_group("thresholds")
    g.add_argument("--acc-margin", type=float, default=Thresholds.acc_margin,
                   help="percentage points a runtime's final accuracy may trail fp32 BAFFLE's "
                        f"(default: {Thresholds.acc_margin})")
    g.add_argument("--cos-fraction", type=float, default=Thresholds.cos_fraction,
                   help="a runtime's mean cosine must be >= this x fp32 BAFFLE's "
                        f"(default: {Thresholds.cos_fraction})")
    g.add_argument("--ref-cos-fraction", type=float, default=Thresholds.ref_cos_fraction,
                   help="fp32 BAFFLE's mean cosine must be >= this x sqrt(K/(K+d)) "
                        f"(default: {Thresholds.ref_cos_fraction})")
    g.add_argument("--max-rejected", type=int, default=Thresholds.max_rejected,
                   help=f"rejected client reports allowed per run (default: {Thresholds.max_rejected})")
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep-k", default=None, help="comma-separated K values (full 10,50,100,500; quick 10,50,200)")
    g.add_argument("--sweep-sigma", default=None,
                   help="comma-separated sigma values (full 1e-6,...,1e-1; quick 1e-5,1e-3,1e-1)")
    g.add_argument("--sweep-seeds", type=int, default=None, help="noise seeds per point (full 3, quick 2)")
    g.add_argument("--sweep-clients", type=int, default=None, help="client batches per seed (full 2, quick 1)")
    g.add_argument("--sweep-round", type=int, default=None,
                   help="sweep at the backprop run's weights before this 0-based round (default: rounds // 4)")
    g.add_argument("--no-sweep", action="store_true", help="skip the sweep")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="report folder (default: runs/verify-<time>); must be empty")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_verify)
    return p


def config_from_args(a: argparse.Namespace) -> VerifyConfig:
    preset = QUICK if a.quick else FULL
    pick = lambda v, key: preset[key] if v is None else v  # noqa: E731
    cifar = a.data_dir is not None and a.dataset in (None, "cifar10")
    dataset = a.dataset or ("cifar10" if a.data_dir else "digits")
    model = a.model or ("wrn-10-2" if a.data_dir else "lenet")
    for name in ("rounds", "k", "clients", "eval_every", "sweep_seeds", "sweep_clients", "train_subset",
                 "test_subset"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if a.refresh_every is not None and a.refresh_every < 1:
        raise ValueError(f"--refresh-every must be >= 1, got {a.refresh_every}")
    if a.batch_size < 1 or a.workers < 1 or a.torch_threads < 1 or a.sigma <= 0:
        raise ValueError("--batch-size, --workers and --torch-threads must be >= 1, --sigma > 0")
    if a.acc_margin < 0 or not 0 <= a.cos_fraction or a.ref_cos_fraction < 0 or a.max_rejected < 0:
        raise ValueError("thresholds must be >= 0")
    train = TrainConfig(model=model, dataset=dataset, data_dir=a.data_dir, clients=pick(a.clients, "clients"),
                        batch_size=a.batch_size, method=Method.BAFFLE, strategy="fedsgd",
                        k=pick(a.k, "k"), sigma=a.sigma, rounds=pick(a.rounds, "rounds"),
                        optim=OptimConfig(), seed=a.seed, eval_every=pick(a.eval_every, "eval_every"),
                        checkpoint_every=10**9, runtime=REFERENCE, workers=a.workers,
                        int8_estimator=StepEstimator(a.int8_estimator), refresh_every=a.refresh_every,
                        baseline=Baseline(a.baseline) if a.baseline else None)
    sweep = None
    if not a.no_sweep:
        ps: Sweep = preset["sweep"]
        sweep = Sweep(ks=_ints(a.sweep_k) if a.sweep_k else ps.ks,
                      sigmas=_floats(a.sweep_sigma) if a.sweep_sigma else ps.sigmas,
                      seeds=a.sweep_seeds or ps.seeds, clients=a.sweep_clients or ps.clients,
                      at_round=a.sweep_round)
        if not sweep.ks or not sweep.sigmas or min(sweep.ks) < 1 or min(sweep.sigmas) <= 0:
            raise ValueError("--sweep-k needs K >= 1 and --sweep-sigma sigma > 0")
    if a.runtimes:
        runtimes = tuple(dict.fromkeys(x.strip() for x in a.runtimes.split(",") if x.strip()))
        if not runtimes:
            raise ValueError("--runtimes: give at least one runtime name")
        explicit = True
    else:
        runtimes, explicit = default_runtimes(), False
    th = Thresholds(acc_margin=a.acc_margin, cos_fraction=a.cos_fraction, ref_cos_fraction=a.ref_cos_fraction,
                    max_rejected=a.max_rejected)
    return VerifyConfig(train=train, runtimes=runtimes, explicit=explicit, thresholds=th, sweep=sweep,
                        train_subset=a.train_subset or (CIFAR["train_subset"] if cifar else None),
                        test_subset=a.test_subset or (CIFAR["test_subset"] if cifar else None),
                        preset="quick" if a.quick else "full", torch_threads=a.torch_threads)


def cmd_verify(a: argparse.Namespace) -> int:
    vc = config_from_args(a)
    out = Path(a.out or f"runs/verify-{time.strftime('%Y%m%d-%H%M%S')}")
    report = verify(vc, out, progress=not a.no_progress, argv=sys.argv[1:],
                    log=lambda m: print(m, file=sys.stderr))
    print(summary_table(report))
    print(f"report: {out / 'report.md'}")
    if report["passed"]:
        print(f"verify: PASS ({', '.join(n for n in report['verdicts'])})")
        return 0
    for name in report["failing"]:
        print(f"verify: FAIL {name}: " + "; ".join(report["verdicts"][name]["reasons"]), file=sys.stderr)
    return 1
