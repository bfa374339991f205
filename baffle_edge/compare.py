"""``baffle-edge compare``: several training runs side by side — accuracy at equal rounds, the gap to a
reference run (backprop by default), and one figure of their curves.

Reads each run folder's ``metrics.json`` (written by ``baffle-edge train``, ``serve`` or ``flower``; a
run still in progress has the rounds of its last checkpoint). Pure JSON reading: no torch.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

LAST_EVALS = 5  # "late" = the mean of this many last evaluations (one evaluation is noisy)


@dataclass(frozen=True)
class Run:
    label: str
    path: Path
    config: dict
    rounds_per_epoch: int | None
    evals: dict[int, float]  # round -> test accuracy (fraction)
    rows: list[dict]  # metrics.json "rounds"

    @property
    def last_round(self) -> int:
        return max(self.evals)

    def late(self, upto: int) -> float:
        """Mean accuracy of the last LAST_EVALS evaluations at or before round ``upto``."""
        rounds = sorted(r for r in self.evals if r <= upto)[-LAST_EVALS:]
        return sum(self.evals[r] for r in rounds) / len(rounds)


def default_label(config: dict, estimator: dict | None = None) -> str:
    """"bp", or "<runtime> <noise>" (plus the block draw when not the default and the int8 step cap
    ``--int8-block-steps``) for a BAFFLE run; the noise
    a run resolved (metrics.json ``estimator``) when its config left it to the default."""
    if config.get("method") == "bp":
        return "bp"
    noise = config.get("noise") or (estimator or {}).get("noise") or "default noise"
    draw = f" {config['block_draw']}" if noise == "block" and config.get("block_draw") not in (None, "size") else ""
    cap = f" <={config['int8_block_steps']} steps" if config.get("int8_block_steps") else ""
    return f"{config.get('runtime', 'torch')} {noise}{draw}{cap}"


def load_run(path: str | Path, label: str | None = None) -> Run:
    """A run folder (or its metrics.json); ValueError / FileNotFoundError naming what is wrong."""
    p = Path(path)
    file = p if p.is_file() else p / "metrics.json"
    if not file.exists():
        raise FileNotFoundError(f"{p}: no metrics.json (a `baffle-edge train` run folder, or its metrics.json)")
    try:
        m = json.loads(file.read_text())
        config, rows = m["config"], m["rounds"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: not a run's metrics.json ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list) or not isinstance(config, dict):
        raise ValueError(f"{file}: 'rounds' must be a list and 'config' an object")
    evals = {int(r["round"]): float(r["test_accuracy"]) for r in rows
             if isinstance(r, dict) and r.get("test_accuracy") is not None}
    if not evals:
        raise ValueError(f"{file}: no evaluated round yet (test accuracy is recorded every --eval-every rounds)")
    estimator = m.get("estimator") if isinstance(m.get("estimator"), dict) else None
    return Run(label or default_label(config, estimator), file.parent, config, m.get("rounds_per_epoch"), evals, rows)


def pick_rounds(runs: list[Run], asked: list[int] | None, points: int = 6) -> list[int]:
    """The rounds of the table: ``asked``, else ``points`` rounds evaluated in every run, evenly spread up to
    the last one they share."""
    common = sorted(set.intersection(*(set(r.evals) for r in runs)))
    if asked:
        missing = {r.label: [a for a in asked if a not in r.evals] for r in runs}
        missing = {k: v for k, v in missing.items() if v}
        if missing:
            raise ValueError(f"round(s) not evaluated in every run: {missing}; evaluated in all: "
                             f"{common[:3]}...{common[-3:]}" if common else "no round is evaluated in every run")
        return sorted(asked)
    if not common:
        raise ValueError("no round is evaluated in every run (different --eval-every?); pass --rounds")
    n = len(common)
    return common if n <= points else [common[(i + 1) * n // points - 1] for i in range(points)]


def table(runs: list[Run], rounds: list[int], reference: Run | None) -> list[dict]:
    """One row per round: each run's accuracy and, with a reference, its gap to it (points)."""
    def row(first: dict, acc) -> dict:  # every run's accuracy, then every gap to the reference
        out = {**first, **{r.label: 100 * acc(r) for r in runs}}
        if reference is not None:
            out.update({f"{r.label} - {reference.label}": 100 * (acc(r) - acc(reference))
                        for r in runs if r is not reference})
        return out

    rpe = runs[0].rounds_per_epoch
    rows = [row({"round": n, **({"epochs": round(n / rpe, 2)} if rpe else {})}, lambda r, n=n: r.evals[n])
            for n in rounds]
    last = rounds[-1]
    return rows + [row({"round": f"mean of last {LAST_EVALS} evals to {last}"}, lambda r: r.late(last))]


def markdown(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def compare(paths: list[str], *, labels: list[str] | None = None, rounds: list[int] | None = None,
            reference: str | None = None, figure: Path | None = None, title: str = "") -> dict:
    """Load the runs, build the table (and the figure); {"runs", "reference", "table", "markdown", "figure"}."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"--label given {len(labels)} times for {len(paths)} runs (one per run, in order)")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for i, r in enumerate(runs):  # two runs with one default label: number them
        if r.label in seen:
            runs[i] = Run(f"{r.label} ({i + 1})", r.path, r.config, r.rounds_per_epoch, r.evals, r.rows)
        seen[r.label] = i
    datasets = {r.config.get("dataset") for r in runs}
    if len(datasets) > 1:
        raise ValueError(f"the runs train on different datasets ({', '.join(sorted(map(str, datasets)))}): "
                         "accuracies are not comparable")
    ref = None
    if reference is not None:
        ref = next((r for r in runs if reference == r.label or Path(reference).resolve() == r.path.resolve()), None)
        if ref is None:
            raise ValueError(f"--reference {reference!r} is none of the runs ({', '.join(r.label for r in runs)})")
    else:
        ref = next((r for r in runs if r.config.get("method") == "bp"), None)
    rows = table(runs, pick_rounds(runs, rounds), ref)
    out = {"runs": {r.label: str(r.path) for r in runs}, "reference": ref.label if ref else None, "table": rows,
           "markdown": markdown(rows), "figure": None}
    if figure is not None:
        from .plots import plot_curves
        out["figure"] = str(plot_curves({r.label: r.rows for r in runs}, Path(figure),
                                        title=title or f"{runs[0].config.get('model')} on {datasets.pop()}"))
    return out


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated round numbers, got {text!r}") from None


def cmd_compare(a: argparse.Namespace) -> int:
    res = compare(a.runs, labels=a.label, rounds=a.rounds, reference=a.reference,
                  figure=Path(a.out) if a.out else None, title=a.title)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(res["markdown"])
    if res["reference"]:
        print(f"\n(gaps in accuracy points to {res['reference']!r}; negative = below it)")
    if res["figure"]:
        print(f"figure: {res['figure']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="training runs side by side: accuracy at equal rounds, gap to backprop, one figure",
                       description="Compare `baffle-edge train` runs (folders with metrics.json): test accuracy at "
                                   "rounds every run evaluated, each run's gap to a reference (the backprop run "
                                   "among them by default, e.g. RUN/bp from --compare-bp), the mean of the last "
                                   f"{LAST_EVALS} evaluations, and a figure of all curves.")
    p.add_argument("runs", nargs="+", help="run folders (or their metrics.json)")
    p.add_argument("--label", action="append", help="a name per run, in order (default: method, runtime, noise)")
    p.add_argument("--rounds", type=_ints, help="comma-separated rounds for the table (default: ~6 shared "
                                                "evaluated rounds up to the last one every run reached)")
    p.add_argument("--reference", help="label or folder of the run the gaps are taken to (default: the bp run)")
    p.add_argument("--out", help="write the curves figure here (PNG)")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_compare)
