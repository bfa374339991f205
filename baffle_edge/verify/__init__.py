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

Modules: config (settings, presets), runs (measurements), judge (verdicts), report (report.md +
figures), check (the whole check), cli (``baffle-edge verify``).
"""
from .check import verify
from .cli import add_parser, cmd_verify, config_from_args
from .config import BASELINE, CIFAR, FULL, QUICK, REFERENCE, Sweep, Thresholds, VerifyConfig
from .judge import judge
from .runs import ExactGradient, GradientProbe, default_runtimes, run_one, runtime_status, sweep_runtime

__all__ = ["verify", "add_parser", "cmd_verify", "config_from_args", "BASELINE", "CIFAR", "FULL", "QUICK", "REFERENCE",
           "Sweep", "Thresholds", "VerifyConfig", "judge", "ExactGradient", "GradientProbe", "default_runtimes",
           "run_one", "runtime_status", "sweep_runtime"]
