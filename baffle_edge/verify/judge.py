"""The verdicts: each runtime against fp32 BAFFLE (accuracy margin, cosine fraction, rejected reports)."""
from __future__ import annotations

import math
from .config import BASELINE, REFERENCE, Thresholds


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
                reasons.append(f"final accuracy {format_pct(acc)} < {format_pct(need_acc)} "
                               f"(fp32 BAFFLE {format_pct(ref_acc)} - {th.acc_margin} points)")
        if not checks["cosine"]["ok"]:
            reasons.append(f"mean cosine {format_num(cos)} < {format_num(need)} ({checks['cosine']['rule']})")
        verdicts[name] = {"pass": all(c["ok"] for c in checks.values()), "status": "ok", "reasons": reasons,
                          "checks": checks}
    return verdicts


def format_pct(x) -> str:
    """A fraction as a percentage for reports and logs (``n/a`` for None)."""
    return "n/a" if x is None else f"{100 * x:.2f}%"


def format_num(x, nd: int = 3) -> str:
    """A number with ``nd`` decimals for reports and logs (``n/a`` for None or non-finite)."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"
