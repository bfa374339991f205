"""The whole check: the runs in order, the sweep, the verdicts, verify.json and the report."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..config import isotropic_noise
from ..estimator import expected_cosine
from ..simulate import Federation, Method, TrainConfig
from .config import BASELINE, FORMAT, REFERENCE, VerifyConfig, run_parts, run_provider
from .judge import format_num, format_pct, judge
from .report import plot_accuracy, plot_cosine, plot_sweep, run_label, write_report_md
from .runs import compare_batches, data_hash, load_data, run_one, runtime_status, sweep_runtime


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
    from ..simulate import run_versions
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose another --out")
    if vc.train.strategy != "fedsgd":
        raise ValueError("verify compares per-client gradients: it runs FedSGD only")
    start = time.perf_counter()
    data = load_data(vc)
    # the reference: isotropic noise (the estimator the theory below describes), whatever train's default
    base = dataclasses.replace(vc.train, runtime=REFERENCE, method=Method.BAFFLE, baseline=None,
                               noise=isotropic_noise(REFERENCE))

    def run_config(name: str) -> TrainConfig:
        """One run's settings: the reference keeps its own; judged runtimes get the user's options."""
        if name == BASELINE:
            return dataclasses.replace(base, method=Method.BP)
        if name == REFERENCE:
            return base
        runtime, estimator = run_parts(name)
        cfg = dataclasses.replace(base, runtime=runtime, baseline=vc.train.baseline, noise=isotropic_noise(runtime))
        if (provider := run_provider(name)) is not None:  # a plugin EP's bundles are exported for its target
            cfg = dataclasses.replace(cfg, provider=provider, target=plugin_target(provider) or cfg.target)
        if estimator == "block":  # the compute of the reference's K+1 full forwards, spent on block noise
            cfg = dataclasses.replace(cfg, noise="block", forward_budget=float(base.k + 1), baseline=None)
        return cfg
    judged = [REFERENCE] + [n for n in vc.runtimes if n != REFERENCE]
    unavailable = {}
    for name in judged:
        reason = runtime_status(run_parts(name)[0])  # ValueError for an unknown name: a usage error
        if reason is not None:
            unavailable[name] = reason
    sw = vc.sweep
    snap_round = None if sw is None else (sw.at_round if sw.at_round is not None else base.rounds // 4)
    if snap_round is not None and not 0 <= snap_round < base.rounds:
        raise ValueError(f"sweep round {snap_round} outside [0, {base.rounds})")
    if REFERENCE in unavailable:
        raise ImportError(f"the reference runtime {REFERENCE!r} is unavailable: {unavailable[REFERENCE]}")

    data_fp = data_hash(data)
    runs = _run_all([BASELINE] + judged, run_config, data, unavailable, snap_round, progress=progress, log=log)
    fed_dim = Federation(dataclasses.replace(base, workers=1), data=data)
    dim = fed_dim.server.dim
    fed_dim.pool.shutdown()
    theory = expected_cosine(base.k, dim)
    batches = compare_batches(runs)

    sweep = None if sw is None else _sweep_all(judged, runs, run_config, data, sw, snap_round, base, log)
    verdicts = judge(runs, batches, vc.thresholds, theory, vc.explicit)
    failing = [n for n, v in verdicts.items() if not v["pass"]]
    report = {
        "format": FORMAT, "command": argv, "preset": vc.preset, "config": base.to_json(),
        "torch_threads": vc.torch_threads, "workers": base.workers,
        "runtimes_requested": list(vc.runtimes), "runtimes_explicit": vc.explicit,
        "train_subset": vc.train_subset, "test_subset": vc.test_subset,
        "data_hash": data_fp, "train_samples": int(len(data.y_train)), "test_samples": int(len(data.y_test)),
        "parameters": dim, "theory_cosine": theory, "thresholds": dataclasses.asdict(vc.thresholds),
        "versions": {**run_versions(), **{f"runtime:{n}": r.get("versions", {}) for n, r in runs.items()
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


def plugin_target(provider: str) -> str | None:
    from ..runtimes.plugin_eps import PLUGINS
    return PLUGINS[provider].target if provider in PLUGINS else None


def _run_all(names: list[str], run_config, data, unavailable: dict, snap_round: int | None, *, progress: bool,
             log) -> dict[str, dict]:
    """Every run in order; an unavailable or failing judged runtime is recorded, not raised."""
    data_fp, runs = data_hash(data), {}
    for name in names:
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
        log(f"verify: {run_label(name)}: accuracy {format_pct(s['final_accuracy'])}, mean cosine "
            f"{format_num(s['mean_cos_clients'])}, {s['rejected_reports']} rejected, {s['seconds']:.0f} s")
    return runs


def _sweep_all(judged: list[str], runs: dict, run_config, data, sw, snap_round: int, base: TrainConfig,
               log) -> dict:
    """Cosine vs K and sigma for every runtime whose run succeeded, at the backprop run's snapshot."""
    weights = runs[BASELINE]["_snapshot"]
    sweep = {"round": snap_round, "ks": list(sw.ks), "sigmas": list(sw.sigmas), "seeds": sw.seeds,
             "clients": sw.clients, "k_at": base.k, "sigma_at": base.sigma, "runtimes": {}}
    for name in judged:
        if runs[name]["status"] != "ok":
            continue
        try:
            sweep["runtimes"][name] = sweep_runtime(name, run_config(name), data, weights, sw, snap_round)
        except Exception as e:  # reported, and the run's own verdict already covers the runtime
            sweep.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            log(f"verify: sweep {name}: error ({sweep['errors'][name]})")
            continue
        log(f"verify: sweep {name}: " + ", ".join(
            f"K={r['k']}: {format_num(r['cos_mean'])}" for r in sweep["runtimes"][name]["k"]))
    return sweep


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
