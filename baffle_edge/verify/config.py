"""What a verification run is configured with: pass thresholds, the K/sigma sweep, presets."""
from __future__ import annotations

from dataclasses import dataclass


from ..simulate import TrainConfig



REFERENCE = "torch"  # the fp32 BAFFLE runtime every other runtime is compared with


BASELINE = "bp"  # name of the backprop run


FORMAT = 1


ESTIMATORS = ("block",)  # extra estimators a run name may carry: "<runtime>+block" (docs/verify.md)


def run_parts(name: str) -> tuple[str, str | None]:
    """A judged run's name -> (runtime, estimator): "torch" -> ("torch", None); "torch+block" ->
    ("torch", "block"): block noise at the compute of the reference's K+1 full forwards. A runtime may
    name its ONNX Runtime execution provider after "@" (``run_provider``): "onnxruntime-int8@qnn-htp"."""
    runtime, _, estimator = name.partition("+")
    if estimator and estimator not in ESTIMATORS:
        raise ValueError(f"run {name!r}: unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    run_provider(name)
    return runtime.partition("@")[0], estimator or None


def run_provider(name: str) -> str | None:
    """The execution provider a run's name asks for ("onnxruntime-int8@qnn-htp" -> "qnn-htp"), or None."""
    from ..runtimes.onnxruntime_runtime import PROVIDERS
    from ..runtimes.plugin_eps import PLUGINS
    runtime, _, provider = name.partition("+")[0].partition("@")
    if provider and provider not in PROVIDERS and provider not in PLUGINS:
        raise ValueError(f"run {name!r}: unknown execution provider {provider!r}; known: "
                         f"{', '.join(dict.fromkeys([*PROVIDERS, *PLUGINS]))}")
    if provider and not runtime.startswith("onnxruntime"):
        raise ValueError(f"run {name!r}: only the onnxruntime runtimes take an execution provider (@{provider})")
    return provider or None


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
