"""``baffle-edge verify``: arguments, presets and the exit code."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from ..protocol import Baseline, StepEstimator
from ..server import OptimConfig
from ..simulate import Method, TrainConfig
from .check import verify
from .config import CIFAR, FULL, QUICK, REFERENCE, Sweep, Thresholds, VerifyConfig, run_parts
from .report import summary_table
from .runs import default_runtimes


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
    from ..train_options import config_default as _d, enum_values as _values
    from ..data import DATASETS
    from ..config import MODEL_NAMES
    _T = TrainConfig()  # shared defaults are read from the training config, not restated
    g = p.add_argument_group("what to check")
    g.add_argument("--runtimes", default=None,
                   help="comma-separated runtimes to judge against fp32 BAFFLE (torch always runs as the "
                        "reference). Default: torch + registered, importable int8 runtimes. A runtime named "
                        "here that is unavailable fails the check; an unavailable default one does not. "
                        "onnxruntime-int8@qnn-htp: a runtime on an execution provider (docs/npu.md)")
    g.add_argument("--estimators", default="",
                   help="extra estimators judged on the reference runtime, comma-separated: block = block noise "
                        "with the incremental forward at the compute of K+1 full forwards (docs/noise.md "
                        "section 8; run name torch+block). Also accepted in --runtimes as <runtime>+block")
    g.add_argument("--quick", action="store_true",
                   help=f"smoke-test preset (a few minutes on 2 cores): {QUICK['clients']} clients, "
                        f"K={QUICK['k']}, {QUICK['rounds']} rounds, a small sweep. Default: the full preset "
                        f"({FULL['clients']} clients, K={FULL['k']}, {FULL['rounds']} rounds = 20 epochs "
                        "of digits, sweep K 10/50/100/500 and sigma 1e-6..1e-1 over 3 seeds)")
    g.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help="default: lenet (wrn-10-2 on CIFAR-10)")
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
    g.add_argument("--sigma", type=float, default=_T.sigma, help="perturbation scale (default: %(default)s)")
    g.add_argument("--refresh-every", type=int, default=None,
                   help="bundle runtimes: re-export and re-calibrate every N rounds (as in `train`; default: "
                        "the format's: 1)")
    g.add_argument("--baseline", default=None, choices=_values(Baseline),
                   help="what each perturbed loss is compared with, for the judged runtimes (as in `train`; "
                        "default: the runtime's, base for float and leave-one-out for int8; fp32 BAFFLE always "
                        "uses the reference base loss)")
    g.add_argument("--int8-estimator", default=_d(_T.int8_estimator), choices=_values(StepEstimator),
                   help="how int8 runtimes' +-1-step losses decode into a gradient (as in `train`; "
                        "docs/quantized-perturbation.md) (default: %(default)s)")
    g.add_argument("--clients", type=int, default=None, help="clients (full 10, quick 10)")
    g.add_argument("--batch-size", type=int, default=_T.batch_size, help="(default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=None, help=f"rounds between evaluations (default: {_T.eval_every})")
    g.add_argument("--seed", type=int, default=_T.seed, help="(default: %(default)s)")
    g.add_argument("--workers", type=int, default=_T.workers, help="threads simulating clients (default: %(default)s)")
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
    model = a.model or ("wrn-10-2" if cifar else "lenet")
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
                        batch_size=a.batch_size, method=Method.BAFFLE,
                        k=pick(a.k, "k"), sigma=a.sigma, rounds=pick(a.rounds, "rounds"),
                        optim=OptimConfig(), seed=a.seed, eval_every=pick(a.eval_every, "eval_every"),
                        checkpoint_every=10**9, runtime=REFERENCE, workers=a.workers,
                        int8_estimator=a.int8_estimator, refresh_every=a.refresh_every, baseline=a.baseline)
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
    extra = tuple(f"{REFERENCE}+{e.strip()}" for e in a.estimators.split(",") if e.strip())
    for name in runtimes + extra:
        run_parts(name)  # an unknown estimator is a usage error
    runtimes = tuple(dict.fromkeys(runtimes + extra))
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
