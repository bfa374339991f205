"""The ``train`` options: one argparse group per concern, every default and choice read from the configs
(``config.TrainConfig`` / ``OptimConfig`` and the enums), and ``config_from_args`` turning them into a
``TrainConfig``. Shared by ``train``, ``serve``, ``verify`` and ``flower``; imports no torch."""
from __future__ import annotations

import argparse
import dataclasses

from .block_draw import BlockDrawPolicy
from .compact import ReportEncoding
from .config import (DEFAULT_FORWARD_BUDGET, ISOTROPIC_K, MODEL_NAMES, Activation, Aggregate, Method, Norm, OptimConfig,
                     OptimizerName, TrainConfig,
                     rounds_per_epoch)
from .data import DATASETS
from .perturb import NoiseKind
from .protocol import Baseline, NoiseScope, Scheme, StepEstimator
from .targets import CHOICES

_T, _O = TrainConfig(), OptimConfig()  # every default and choice below is read from the configs
SHORT_RUN = 20  # rounds: a run this short is evaluated every round by default (--eval-every)


def config_default(v):
    """An argparse default from a config dataclass's default (enums by value): one source of truth."""
    return v.value if hasattr(v, "value") else v


def enum_values(kind) -> list[str]:
    return [e.value for e in kind]


_d, _values = config_default, enum_values

def _model_and_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=_d(_T.model), choices=MODEL_NAMES, help="model architecture (default: %(default)s)")
    g.add_argument("--activation", default=_d(_T.activation), choices=_values(Activation),
                   help="activation (default: %(default)s)")
    g.add_argument("--norm", default=None, choices=_values(Norm),
                   help="normalisation (default: none for lenet/mlp, group for wrn-10-2; BatchNorm is refused)")
    g.add_argument("--dataset", default=_d(_T.dataset), choices=DATASETS,
                   help="digits is embedded (scikit-learn); fashion-mnist reads Debian's dataset-fashion-mnist "
                   "(/usr/share/datasets/fashion-mnist); mnist/cifar10 read --data-dir (default: %(default)s)")
    g.add_argument("--data-dir", default=_d(_T.data_dir),
                   help="folder with MNIST-format IDX files (mnist, fashion-mnist) or CIFAR-10 batches")

def _federation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("federation")
    g.add_argument("--clients", type=int, default=_d(_T.clients), help="number of clients (default: %(default)s)")
    g.add_argument("--partition", default=_d(_T.partition), choices=["iid", "dirichlet"], help="client data split (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=_d(_T.alpha), help="Dirichlet concentration for --partition dirichlet (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=_d(_T.batch_size), help="samples per client batch (default: %(default)s)")
    g.add_argument("--strategy", default=_d(_T.strategy), choices=["fedsgd", "fedavg"],
                   help="fedsgd: one estimated gradient per client per round; fedavg: local steps, server "
                        "replays them from the scalars (default: %(default)s)")
    g.add_argument("--local-steps", type=int, default=_d(_T.local_steps), help="fedavg local steps per round (default: %(default)s)")
    g.add_argument("--local-lr", type=float, default=_d(_O.local_lr), help="fedavg local SGD step size (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=None, help=f"total rounds (default: {_T.rounds}, or from --epochs)")
    g.add_argument("--epochs", type=float, default=None,
                   help="total epochs; an epoch = ceil(train samples / (clients x batch)) rounds")

def _estimator(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BAFFLE estimator")
    g.add_argument("--method", default=_d(_T.method), choices=_values(Method),
                   help="baffle: forward passes + K loss scalars; bp: exact backprop baseline (default: %(default)s)")
    g.add_argument("--k", type=int, default=_d(_T.k),
                   help=f"perturbations K per client per round, whatever the noise (default: block noise takes the K "
                        f"of --forward-budget {DEFAULT_FORWARD_BUDGET:g}, isotropic noise K = {ISOTROPIC_K})")
    g.add_argument("--sigma", type=float, default=_d(_T.sigma), help="perturbation scale sigma (default: %(default)s)")
    g.add_argument("--scheme", default=_d(_T.scheme), choices=_values(Scheme),
                   help="forward: K+1 forwards; central: 2K forwards (default: %(default)s)")
    g.add_argument("--noise", default=None, choices=_values(NoiseKind),
                   help="distribution of eps_k, see docs/noise.md (default: block, one output-channel block per "
                        "perturbation at the compute of an isotropic K = 100 round, where the runtime has block rows "
                        "(torch: LeNet without normalisation, WRN-10-2; onnxruntime, onnxruntime-int8, "
                        "tflite-int8: LeNet, MLP, MobileNet without normalisation); "
                        "measured 96.4%% torch / 95.3%% ORT int8 vs 91.4%% / 90.3%% isotropic on digits at 150 "
                        "rounds. Elsewhere (torch-int8, WRN on ONNX Runtime, ...) the domain's isotropic noise: gaussian for float "
                        "runtimes, rademacher for int8 ones; pass --noise gaussian / rademacher for isotropic)")
    g.add_argument("--forward-budget", type=float, default=_d(_T.forward_budget),
                   help="block noise: choose K so that a client round costs this many full forwards in MACs, "
                        "rows evaluated incrementally where the runtime can (e.g. 101 = the compute of an "
                        f"isotropic K = 100 round; docs/noise.md section 8). Default: --k if given, else "
                        f"{DEFAULT_FORWARD_BUDGET:g} for block noise")
    g.add_argument("--block-draw", default=_d(_T.block_draw), choices=_values(BlockDrawPolicy),
                   help="block noise: how blocks are drawn (every choice unbiased; docs/noise.md section 11). "
                        "size: in proportion to their size; uniform: every block alike; adaptive: where the "
                        "gradient energy per unit of client compute is, measured by the server from the reports' "
                        "loss differences (default: %(default)s)")
    g.add_argument("--noise-scope", default=_d(_T.noise_scope), choices=_values(NoiseScope),
                   help="one noise stream per client, or one per round shared by all (default: %(default)s)")
    g.add_argument("--int8-estimator", default=_d(_T.int8_estimator), choices=_values(StepEstimator),
                   help="int8 runtimes: how the server turns +-1-step losses into a gradient. rms-step: the "
                        "gradient w.r.t. the integers over one RMS step (lower variance); per-step: divide "
                        "each coordinate by its own step (unbiased, noisier). docs/quantized-perturbation.md "
                        "(default: %(default)s)")
    g.add_argument("--int8-block-steps", type=int, default=_d(_T.int8_block_steps), metavar="M",
                   help="int8 runtimes with block noise: move a block's weights by at most M whole quantization "
                        "steps (m_b = min(round(sqrt(d / d_b)), M); the decoder reweighs by 1 / m_b^2, so the "
                        "estimate stays unbiased). Large moves (LeNet's head: 20 steps) reach the loss's curvature "
                        "as the model trains: on Fashion-MNIST M = 4 doubled the int8 block cosine to the exact "
                        "gradient after one epoch; with --block-draw adaptive, M = 2 took WRN-10-2's int8 cosine from 0.3x to 3.7x "
                        "isotropic's (docs/noise.md section 10). Default: no cap")
    g.add_argument("--baseline", default=None, choices=_values(Baseline),
                   help="what each perturbed loss is compared with: L(w) (the reference), or the mean of the "
                        "other K-1 perturbed losses (unbiased; cancels the curvature offset of whole-step "
                        "perturbations). Default: base for float runtimes, leave-one-out for int8 ones")

def _runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("client runtime")
    g.add_argument("--runtime", default=_d(_T.runtime), help="client runtime (default: %(default)s); see `baffle-edge runtimes`")
    g.add_argument("--provider", default=_d(_T.provider),
                   help="onnxruntime execution provider: cpu, xnnpack, nnapi, qnn, coreml, ...; NPU plugin EPs "
                   "qnn-htp (with --target qnn-htp), openvino: docs/npu.md (default: %(default)s)")
    g.add_argument("--target", default=_d(_T.target), choices=CHOICES,
                   help="bundle runtimes: CPU the server exports the int8 bundles for (arm64, x86-vnni, x86-avx2; "
                        "decides the int8 weight range, see `baffle-edge export -h`) (default: %(default)s = this machine)")
    g.add_argument("--refresh-every", type=int, default=None,
                   help="bundle runtimes: re-export and re-calibrate the bundle every N rounds (default: 1 for "
                        "every format: stale int8 scales cost accuracy; TFLite conversion takes ~5 s per refresh)")
    g.add_argument("--report-encoding", default=_d(_T.report_encoding), choices=_values(ReportEncoding),
                   help="how reports travel: compact = 16-bit loss differences against the exact base loss "
                        "(docs/gateway.md, 'Compact reports'), json = float64 losses (default: %(default)s)")
    g.add_argument("--perturbations-per-call", default=_d(_T.perturbations_per_call), metavar="P",
                   help="perturbations evaluated per runtime call (torch, onnxruntime[-int8]); 'auto' measures P "
                        "on this device at the first batch and caches it (docs/batched-k.md) (default: %(default)s)")

def _server_optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server optimizer")
    g.add_argument("--optimizer", default=_d(_O.optimizer), choices=_values(OptimizerName), help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=_d(_O.lr), help="server learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=_d(_O.weight_decay), help="(default: %(default)s)")
    g.add_argument("--milestones", default="", help="comma-separated epochs where lr *= 0.2 (default: none)")
    g.add_argument("--clip", type=float, default=_d(_O.clip),
                   help="inf-norm clip of each client's gradient, 0 = off (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=_d(_O.ema_decay),
                   help="EMA decay of the weights, updated per epoch, 0 = off (default: %(default)s)")

def _run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=_d(_T.seed), help="seed of every random choice (default: %(default)s)")
    g.add_argument("--out", default=None, help="run folder (default: runs/<time>-<model>-<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--compare-bp", action="store_true",
                   help="also train the backprop baseline on the same schedule (OUT/bp) and plot both")
    g.add_argument("--eval-every", type=int, default=None,
                   help=f"rounds between test evaluations (default: 1 for runs of up to {SHORT_RUN} rounds, so a "
                        f"short run draws a curve, else {_T.eval_every}; the last round is always evaluated)")
    g.add_argument("--checkpoint-every", type=int, default=_d(_T.checkpoint_every), help="rounds between checkpoints (default: %(default)s)")
    g.add_argument("--workers", type=int, default=_d(_T.workers), help="threads simulating clients (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

def _faults(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faults (docs/faults.md)")
    g.add_argument("--quorum", type=float, default=_d(_T.quorum),
                   help="fraction of clients whose valid reports a round needs; below it the model is "
                        "unchanged and the round is recorded as skipped (default: %(default)s = at least one)")
    g.add_argument("--round-timeout", type=float, default=_d(_T.round_timeout),
                   help="seconds a round waits for reports; late clients are recorded as absent (default: %(default)s)")
    g.add_argument("--aggregate", default=_d(_T.aggregate), choices=_values(Aggregate),
                   help="how per-client estimates are combined; median and trimmed-mean resist "
                        "Byzantine clients (default: %(default)s)")
    g.add_argument("--trim", type=float, default=_d(_T.trim),
                   help="--aggregate trimmed-mean: fraction dropped at each end (default: %(default)s)")
    g.add_argument("--byzantine", type=float, default=_d(_T.byzantine),
                   help="simulation: seeded fraction of clients that upload random large losses (default: %(default)s)")

def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every ``train`` option, grouped as ``--help`` shows them."""
    for group in (_model_and_data, _federation, _estimator, _runtime, _server_optimizer, _run, _faults):
        group(p)


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed ``train`` options describe (``--epochs`` counted in rounds)."""
    from .data import load_dataset
    milestones = tuple(int(m) for m in a.milestones.split(",") if m.strip())
    from baffle_edge.runtimes.batching import AUTO_KEY, resolve
    ppc = getattr(a, "perturbations_per_call", AUTO_KEY)
    ppc = AUTO_KEY if str(ppc).strip().lower() == AUTO_KEY else resolve(ppc, a.runtime)  # ValueError if bad
    same = ("model", "dataset", "data_dir", "activation", "norm", "clients", "partition", "alpha", "batch_size",
            "method", "strategy", "local_steps", "k", "sigma", "scheme", "noise", "noise_scope", "block_draw", "forward_budget", "int8_estimator", "int8_block_steps",
            "baseline", "seed", "checkpoint_every", "runtime", "provider", "target", "refresh_every", "workers",
            "report_encoding",
            "quorum", "round_timeout", "aggregate", "trim", "byzantine")  # option = TrainConfig field (enums from strings)
    cfg = TrainConfig(**{n: getattr(a, n) for n in same}, perturbations_per_call=ppc, eval_every=a.eval_every or 1,
                      optim=OptimConfig(optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
                                        milestones=milestones, clip=a.clip or None, ema_decay=a.ema_decay or None,
                                        local_lr=a.local_lr))
    if a.rounds is not None and a.epochs is not None:
        raise ValueError("give --rounds or --epochs, not both")
    rounds = a.rounds if a.rounds is not None else TrainConfig.rounds
    if a.epochs is not None:
        data = load_dataset(a.dataset, a.data_dir, seed=a.seed)
        rounds = max(1, round(a.epochs * rounds_per_epoch(cfg, data)))
    eval_every = a.eval_every if a.eval_every is not None else 1 if rounds <= SHORT_RUN else TrainConfig.eval_every
    return dataclasses.replace(cfg, rounds=rounds, eval_every=eval_every)  # TrainConfig checks rounds >= 1
