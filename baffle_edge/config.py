"""Run configuration, torch-free: what a run is (``TrainConfig``), how the server optimises
(``OptimConfig``) and which model it trains (``ModelConfig``).

Devices read the fields they need from here (``baffle_edge.device.DeviceSettings``) without importing
the server; the server side (``simulate``, ``server``, ``models``) imports the same classes. Enum fields
given as strings (CLI, JSON) are coerced once, in ``__post_init__`` (``coerce_enums``).
"""
from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass

from .block_draw import BlockDrawPolicy
from .compact import ReportEncoding
from .perturb import NoiseKind
from .protocol import DOMAIN_DEFAULTS, MAX_BLOCK_STEPS, Baseline, Domain, NoiseScope, Scheme, StepEstimator, check_noise
from .runtimes import RuntimeInfo, runtime_info


class Activation(str, enum.Enum):
    HARDSWISH = "hardswish"  # reference default
    RELU = "relu"


class Norm(str, enum.Enum):
    NONE = "none"  # reference choice for LeNet on MNIST ("NoNorm")
    GROUP = "group"  # GroupNorm(affine=False), reference default otherwise


MODEL_NAMES = ("lenet", "wrn-10-2", "mlp", "mobilenet")


def default_norm(model: str) -> "Norm":
    """The reference's normalisation per model: GroupNorm for WideResNets, none ("NoNorm") otherwise."""
    return Norm.GROUP if model.startswith("wrn") else Norm.NONE


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lenet"  # one of MODEL_NAMES
    in_channels: int = 1  # input image channels (digits/MNIST 1, CIFAR 3)
    image_size: int = 8  # input height = width in pixels (digits 8, MNIST 28, CIFAR 32)
    num_classes: int = 10
    activation: Activation = Activation.HARDSWISH  # reference default
    norm: Norm = Norm.NONE  # LeNet default "NoNorm" (reference MNIST recipe); WRN uses GROUP

    def __post_init__(self):
        coerce_enums(self)  # a config read from JSON names its activation and norm by value


class OptimizerName(str, enum.Enum):
    ADAM = "adam"  # reference default
    SGD = "sgd"


def coerce_enums(cfg) -> None:
    """Set every enum-typed field of the frozen dataclass ``cfg`` that holds a string to its enum."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        v = getattr(cfg, name)
        kind = next((k for k in typing.get_args(hint) or (hint,) if isinstance(k, type) and issubclass(k, enum.Enum)),
                    None)
        if kind is not None and isinstance(v, str) and not isinstance(v, enum.Enum):
            object.__setattr__(cfg, name, kind(v))


@dataclass(frozen=True)
class OptimConfig:
    optimizer: OptimizerName = OptimizerName.ADAM
    lr: float = 1e-2  # reference MNIST recipe
    betas: tuple[float, float] = (0.9, 0.99)  # reference Adam betas
    momentum: float = 0.9  # SGD only (reference)
    weight_decay: float = 5e-4  # reference
    milestones: tuple[int, ...] = ()  # epochs at which lr *= gamma (reference MNIST: none within 20)
    gamma: float = 0.2  # reference lr decay ratio
    clip: float | None = 0.3  # inf-norm clipping of each client's gradient (reference); None = off
    ema_decay: float | None = 0.995  # EMA of weights, updated per epoch (reference); None = off
    local_lr: float = 1e-2  # FedAvg: clients' local SGD step size

    def __post_init__(self):
        coerce_enums(self)
        if not self.lr > 0:
            raise ValueError(f"lr (--lr) must be > 0, got {self.lr}")


class Aggregate(str, enum.Enum):
    MEAN = "mean"  # sample-weighted mean (reference FedSGD/FedAvg)
    MEDIAN = "median"  # coordinate-wise median (Byzantine-robust, breakdown point 1/2)
    TRIMMED_MEAN = "trimmed-mean"  # coordinate-wise mean after dropping the `trim` fraction at each end


class Method(str, enum.Enum):
    BAFFLE = "baffle"  # forward passes only, K loss scalars per client
    BP = "bp"  # exact backprop gradients on the same schedule (the float baseline)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "lenet"  # lenet | wrn-10-2 | mlp | mobilenet (config.MODEL_NAMES)
    dataset: str = "digits"  # digits (embedded) | fashion-mnist (Debian path default) | mnist | cifar10 (data_dir)
    data_dir: str | None = None
    activation: Activation = Activation.HARDSWISH
    norm: Norm | None = None  # None: model default (lenet/mlp none, wrn group)
    clients: int = 10  # reference: 10 IID clients
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration (partition=dirichlet)
    batch_size: int = 32  # reference
    method: Method = Method.BAFFLE
    strategy: str = "fedsgd"  # fedsgd (reference default) | fedavg
    local_steps: int = 5  # fedavg only: local steps per round (~ one local epoch on digits)
    k: int | None = None  # perturbations per client per step; None: block noise spends DEFAULT_FORWARD_BUDGET,
    # isotropic noise takes ISOTROPIC_K (the reference MNIST recipe); given, it is K whatever the noise
    sigma: float = 1e-4  # reference
    scheme: Scheme = Scheme.FORWARD
    noise: NoiseKind | None = None  # None: block where the runtime has block rows (default_noise), else the
    # domain's isotropic noise (float: gaussian; int8-step: rademacher)
    noise_scope: NoiseScope = NoiseScope.CLIENT
    block_draw: BlockDrawPolicy = BlockDrawPolicy.SIZE  # block noise: how blocks are drawn (block_draw.py)
    forward_budget: float | None = None  # block noise: K chosen so a client round costs this many full forwards
    # (MACs: runtimes/torch_incremental.equal_compute_k, e.g. 101 = an isotropic K = 100 round); None: use k,
    # or DEFAULT_FORWARD_BUDGET when k is None too
    int8_estimator: StepEstimator = StepEstimator.RMS  # int8-step runtimes: how steps decode (protocol.py)
    int8_block_steps: int | None = None  # int8-step block noise: cap on the whole steps a block moves
    # (RoundTask.max_block_steps; docs/noise.md section 10); None: m_b = round(sqrt(d / d_b)) alone
    baseline: Baseline | None = None  # None: the runtime's (float: base loss; int8-step: leave-one-out)
    rounds: int = 150  # total rounds (an epoch = ceil(N_train / (clients * batch)) rounds)
    optim: OptimConfig = OptimConfig()
    seed: int = 0
    eval_every: int = 5  # rounds between test evaluations (the last round is always evaluated)
    checkpoint_every: int = 50  # rounds between checkpoints (and at the end)
    runtime: str = "torch"  # client runtime by name (runtimes.REGISTRY)
    provider: str = "cpu"  # onnxruntime execution provider (runtimes/onnxruntime_runtime.py PROVIDERS)
    perturbations_per_call: int | str = "auto"  # P per runtime call; "auto": measured on the device (runtimes/batching.py)
    target: str = "auto"  # bundle runtimes: CPU the int8 bundles are exported for (baffle_edge/targets.py); auto = here
    refresh_every: int | None = None  # bundle runtimes: re-export (re-calibrate int8 scales) every N rounds;
    # None = the format's default (REFRESH_DEFAULT: every round; ONNX exports in < 1 s, TFLite in ~5 s)
    workers: int = 2  # threads simulating clients / decoding reports (results do not depend on it)
    report_encoding: ReportEncoding = ReportEncoding.COMPACT  # how reports travel (compact.py): 16-bit loss
    # differences (devices that speak it; the simulation round-trips its reports) | json: float64 losses
    # faults (docs/faults.md)
    quorum: float = 0.0  # fraction of clients whose valid reports a round needs, else it is skipped (0: >= 1)
    round_timeout: float | None = None  # seconds a round waits for reports; None = wait for all
    aggregate: Aggregate = Aggregate.MEAN  # mean | median | trimmed-mean over per-client estimates
    trim: float = 0.1  # trimmed-mean: fraction dropped at each end
    byzantine: float = 0.0  # simulation only: seeded fraction of clients that upload garbage losses

    def to_json(self) -> dict:
        def conv(v):
            if isinstance(v, enum.Enum):
                return v.value
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v
        return conv(self)

    def __post_init__(self):
        """Choices given as strings (CLI, JSON) are held as their enums; values are checked here, once,
        for every caller (CLI, JSON, Flower's run config, tests)."""
        coerce_enums(self)
        from .targets import CHOICES
        if self.target not in CHOICES:
            raise ValueError(f"unknown export target {self.target!r}; known: {', '.join(CHOICES)}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k (--k) must be >= 1, got {self.k}")
        for name in ("clients", "batch_size", "rounds", "eval_every", "checkpoint_every", "workers", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {getattr(self, name)}")
        if not self.sigma > 0:
            raise ValueError(f"sigma (--sigma) must be > 0, got {self.sigma}")
        for name in ("quorum", "byzantine"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")
        if self.round_timeout is not None and not self.round_timeout > 0:
            raise ValueError(f"round_timeout must be > 0 seconds (or None), got {self.round_timeout}")

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        """The inverse of ``to_json``: enums, tuples and the nested optimizer config restored."""
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if isinstance(d.get("optim"), dict):
            d["optim"] = OptimConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["optim"].items()})
        return cls(**d)


def rounds_per_epoch(cfg: TrainConfig, data) -> int:
    """Rounds in one epoch: every client passes once over its share of ``data`` (a ``data.Dataset``)."""
    return max(1, math.ceil(len(data.y_train) / (cfg.clients * cfg.batch_size)))


# rounds between bundle re-exports per format: int8 activation ranges and weight scales go stale as
# the weights move (measured: int8 gradient cosine drops until the next refresh)
REFRESH_DEFAULT = {"onnx": 1, "onnx-int8": 1, "tflite-int8": 1}  # tflite every 10: 73% vs 88% (verify)


# The default estimator, chosen by measurement (README "Block noise"; digits, LeNet, 150 rounds, seed 0):
# block noise at the compute of K+1 = 101 full forwards reached 96.4% (torch) and 95.3% (ONNX Runtime
# int8) where isotropic noise at K = 100 reached 91.4% / 90.3%. Isotropic noise is one option away.
ISOTROPIC_K = 100  # K of isotropic noise when --k is not given (the reference MNIST recipe)
DEFAULT_FORWARD_BUDGET = 101.0  # block noise without --k / --forward-budget: an isotropic K = 100 round's compute
CHAIN_MODEL_NAMES = ("lenet", "mlp", "mobilenet")  # runtimes/torch_incremental.CHAIN_MODELS by name (torch-free)
RESIDUAL_MODEL_NAMES = ("wrn-10-2",)  # rows re-run from the perturbed module (torch_residual.py, ORT graph segments)


def has_block_rows(info: RuntimeInfo, model: str, norm: Norm | None = None) -> bool:
    """Whether ``info`` evaluates block-noise rows of ``model`` for less than a full forward each, in the
    cases where block noise was measured to win (runtimes/torch_incremental.block_macs counts the rows):
    torch's delta rule for a norm-free LeNet or a WideResNet (GroupNorm and all: runtimes/torch_residual.py
    re-runs a row from its module), ONNX Runtime's graph rule for a WideResNet (export/graph_blocks.py) or a
    norm-free chain model, LiteRT's chain rule for a norm-free chain model. (ONNX Runtime also has graph
    rows for a chain model with GroupNorm; block noise was not measured there, so it keeps isotropic noise.)"""
    if info.block_forward in ("delta", "graph") and model in RESIDUAL_MODEL_NAMES:
        return True
    if (norm if norm is not None else default_norm(model)) is not Norm.NONE:
        return False  # GroupNorm couples a group's channels: chain rows would run as full forwards
    if info.block_forward == "delta":
        return model == "lenet"
    return info.block_forward in ("chain", "graph") and model in CHAIN_MODEL_NAMES


def default_noise(info: RuntimeInfo, model: str, norm: Norm | None = None) -> NoiseKind:
    """The noise of a run that does not choose one: block noise where the runtime has block rows (the
    measured winner at equal compute), else its domain's isotropic noise (``protocol.DOMAIN_DEFAULTS``)."""
    if has_block_rows(info, model, norm):
        return NoiseKind.BLOCK
    return DOMAIN_DEFAULTS[Domain(info.domain)].noise


def isotropic_noise(runtime: str) -> NoiseKind:
    """The isotropic noise of ``runtime``'s domain (gaussian for float, rademacher for int8-step)."""
    return DOMAIN_DEFAULTS[Domain(runtime_info(runtime).domain)].noise


@dataclass(frozen=True)
class RunChoices:
    """What a run's settings resolve to: the runtime's registry entry, its perturbation domain, the noise
    and baseline (the defaults where the config leaves them open), the bundle refresh period, and what
    sets K: ``forward_budget`` (block noise: K follows the budget) or else ``k``."""

    runtime: RuntimeInfo
    domain: Domain
    noise: NoiseKind
    baseline: Baseline
    refresh_every: int
    k: int = ISOTROPIC_K  # K when forward_budget is None
    forward_budget: float | None = None


def run_choices(cfg: TrainConfig) -> RunChoices:
    """Resolve and check the choices of ``cfg`` that depend on each other (runtime, noise, K or forward
    budget, block draw, baseline, refresh): a ValueError saying what to change, raised before anything is
    built or listened on (``Federation`` and ``serve`` both call it; torch-free)."""
    info = runtime_info(cfg.runtime)  # ValueError naming the close name, if any
    domain = Domain(info.domain)
    defaults = DOMAIN_DEFAULTS[domain]
    noise = cfg.noise if cfg.noise is not None else default_noise(info, cfg.model, cfg.norm)
    try:
        check_noise(domain, noise)
    except ValueError as e:
        raise ValueError(f"runtime {cfg.runtime!r}: {e} (use --noise rademacher or --noise block)") from None
    if noise is not NoiseKind.BLOCK and cfg.block_draw is not BlockDrawPolicy.SIZE:
        raise ValueError("block_draw (--block-draw) chooses how block noise draws its blocks: use --noise block")
    cap = cfg.int8_block_steps
    if cap is not None:
        if noise is not NoiseKind.BLOCK or domain is not Domain.INT8_STEP:
            raise ValueError("int8_block_steps (--int8-block-steps) caps the whole steps of int8-step block noise: "
                             "use an int8 runtime with --noise block")
        if not (isinstance(cap, int) and 1 <= cap <= MAX_BLOCK_STEPS):
            raise ValueError(f"int8_block_steps must be an integer in [1, {MAX_BLOCK_STEPS}], got {cap!r}")
    budget = cfg.forward_budget
    if budget is not None:
        if noise is not NoiseKind.BLOCK:
            raise ValueError("forward_budget (--forward-budget) sets K for block noise only (--noise block)")
        if not budget >= 2:
            raise ValueError(f"forward_budget must be >= 2 full forwards, got {budget}")
    elif noise is NoiseKind.BLOCK and cfg.k is None:
        budget = DEFAULT_FORWARD_BUDGET
    k = cfg.k if cfg.k is not None else ISOTROPIC_K
    baseline = cfg.baseline if cfg.baseline is not None else defaults.baseline
    if baseline is Baseline.LOO and budget is None and k < 2 and cfg.method is Method.BAFFLE:
        raise ValueError("the leave-one-out baseline (the default for int8 runtimes) needs --k >= 2; "
                         "use --baseline base for k = 1")
    refresh_every = cfg.refresh_every if cfg.refresh_every is not None else REFRESH_DEFAULT.get(info.format, 10)
    if refresh_every < 1:
        raise ValueError(f"refresh_every must be >= 1 round, got {refresh_every}")
    return RunChoices(info, domain, noise, baseline, refresh_every, k, budget)
