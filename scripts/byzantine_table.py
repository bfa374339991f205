"""Accuracy under Byzantine clients, with and without robust aggregation (docs/faults.md).

    python scripts/byzantine_table.py --out runs/byzantine [--rounds 80 --clients 10 --k 20]

Every run is ``baffle_edge.simulate.train`` with the same seed; the Byzantine clients (a seeded
fraction) upload well-formed, finite, random large losses. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from baffle_edge.server import Aggregate
from baffle_edge.simulate import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/byzantine")
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--trim", type=float, default=0.3)
    p.add_argument("--fractions", default="0,0.1,0.2,0.3")
    a = p.parse_args()
    base = TrainConfig(clients=a.clients, k=a.k, noise="gaussian", rounds=a.rounds, eval_every=a.rounds,  # as measured
                       checkpoint_every=a.rounds,
                       trim=a.trim, seed=0)
    rows = []
    for frac in (float(f) for f in a.fractions.split(",")):
        for agg in Aggregate:
            cfg = dataclasses.replace(base, byzantine=frac, aggregate=agg)
            run = Path(a.out) / f"byz{frac:g}-{agg.value}"
            m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else None
            if m is None or not m.get("final", {}).get("complete"):
                m = train(cfg, run, progress=False, resume=(run / "checkpoint.pt").exists())
            rows.append((frac, agg.value, m["final"]["test_accuracy"], m["rounds"][-1]["train_loss"]))
            print(f"byzantine {frac:.0%} {agg.value:13s} acc {100 * rows[-1][2]:.2f}%", flush=True)
    print(f"\n| Byzantine clients | {' | '.join(g.value for g in Aggregate)} |")
    print("|---|" + "---|" * len(Aggregate))
    for frac in sorted({r[0] for r in rows}):
        accs = [f"{100 * r[2]:.1f}%" for r in rows if r[0] == frac]
        print(f"| {frac:.0%} ({round(frac * a.clients)} of {a.clients}) | {' | '.join(accs)} |")


if __name__ == "__main__":
    main()
