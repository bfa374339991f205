"""The device side of a round, torch-free: the mirror of the server's one round path.

Every transport — the in-process simulation, Flower's ClientApp, the HTTP gateway's device and the
conformance kit — turns a task into a report through these four steps, and only through them:

    settings = DeviceSettings.from_json(train_config)      # the run's fields a device needs
    session  = sessions.get(settings, artifact)           # open_session: RuntimeInfo decides the options
    batches  = task_batches(x, y, task, settings)          # the batch schedule round * local_steps + step
    report   = answer(task, session, batches, weights=w, runtime=settings.runtime)  # weights checked

Imports numpy and the protocol only; a runtime's own dependency (onnxruntime, ai-edge-litert, torch for
the torch runtimes) is imported when its session opens. The torch runtimes take a built model as their
artifact (``model_artifact``), which needs torch; the bundle runtimes take a folder.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .client import Batch, Session, run_task
from .config import TrainConfig
from .data import batch_indices
from .protocol import ClientReport, RoundTask, model_version
from .runtimes import RuntimeInfo, get_runtime, runtime_info


@dataclass(frozen=True)
class DeviceSettings:
    """What a device takes from the run's ``TrainConfig`` (defaults are TrainConfig's), plus its own
    thread count. ``from_json`` reads them from the config's JSON form (Flower's ``train-config``,
    the gateway's ``/v1/config``) without importing the server."""

    runtime: str = TrainConfig.runtime  # client runtime by name (runtimes.REGISTRY)
    provider: str = TrainConfig.provider  # ONNX Runtime execution provider (runtimes that take one)
    perturbations_per_call: int | str = TrainConfig.perturbations_per_call  # P per call, or "auto"
    seed: int = TrainConfig.seed  # the run's seed: the batch schedule and torch models are built from it
    batch_size: int = TrainConfig.batch_size  # samples per local step
    threads: int | None = None  # intra-op threads of the session; None: the runtime's default

    def __post_init__(self):
        runtime_info(self.runtime)  # ValueError naming the known runtimes
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1 (or None), got {self.threads!r}")

    @property
    def info(self) -> RuntimeInfo:
        return runtime_info(self.runtime)

    @classmethod
    def from_config(cls, cfg: TrainConfig, **overrides) -> "DeviceSettings":
        return cls.from_json(cfg.to_json(), **overrides)

    @classmethod
    def from_json(cls, d: dict, **overrides) -> "DeviceSettings":
        """Settings from a TrainConfig JSON dict (other keys ignored; absent ones take the defaults);
        ``overrides`` (e.g. the device's own runtime or threads) win. A wrong type is a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"train-config: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names} | {k: v for k, v in overrides.items() if v is not None}
        for name, kind in (("runtime", str), ("provider", str), ("seed", int), ("batch_size", int)):
            if name in values and (not isinstance(values[name], kind) or isinstance(values[name], bool)):
                raise ValueError(f"train-config: {name} must be {kind.__name__}, got {values[name]!r}")
        return cls(**values)


def open_session(settings: DeviceSettings, artifact: Any) -> Session:
    """A session of ``settings.runtime`` on ``artifact`` (a bundle folder, or a torch model for the
    torch runtime); the execution provider and P are passed where the runtime takes them."""
    info = settings.info
    rt = get_runtime(settings.runtime, **info.options(provider=settings.provider,
                                                      perturbations_per_call=settings.perturbations_per_call))
    return rt.load(artifact, threads=settings.threads) if settings.threads else rt.load(artifact)


def model_artifact(settings: DeviceSettings, model: dict) -> Any:
    """The artifact of a runtime that takes a model (``artifact == "torch-model"``): the model built
    from its config dict (``ModelConfig`` fields, as the server publishes them) with the run's seed.
    Needs torch."""
    from .config import ModelConfig
    from .models import build_model
    try:
        cfg = ModelConfig(**model)
    except TypeError as e:
        raise ValueError(f"model config: {e}") from None
    return build_model(cfg, seed=settings.seed)


class SessionCache:
    """One open session per key: reused while the key (runtime, bundle identity, ...) is the same,
    replaced when it changes (a refreshed bundle). Thread-safe; one round's session at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: Any = None
        self._session: Session | None = None

    def get(self, key: Any, make: Callable[[], Session]) -> Session:
        with self._lock:
            if self._session is None or self._key != key:
                self._session, self._key = None, None  # the old round's session goes first (memory; and a
                self._session, self._key = make(), key  # failed make() leaves no stale session behind)
            return self._session


def batch_schedule(pool: np.ndarray, *, round_: int, local_steps: int, client: int, batch_size: int,
                   seed: int) -> list[np.ndarray]:
    """The samples of each local step of round ``round_``: step s of the round is position
    ``round_ * local_steps + s`` of the client's seeded walk over ``pool`` (data.batch_indices)."""
    return [batch_indices(pool, round_ * local_steps + s, batch_size, seed=seed, client=client)
            for s in range(local_steps)]


def task_batches(x: np.ndarray, y: np.ndarray, task: RoundTask, settings: DeviceSettings) -> list[Batch]:
    """The batches of ``task`` (one per local step) from the device's own samples ``x``, ``y``."""
    idx = batch_schedule(np.arange(len(y)), round_=task.round, local_steps=task.local_steps, client=task.client,
                         batch_size=settings.batch_size, seed=settings.seed)
    return [Batch(x[i], y[i]) for i in idx]


def check_weights(task: RoundTask, weights: np.ndarray) -> np.ndarray:
    """The flat float32 weights, refused (ValueError) unless they hash to the task's model version."""
    w = np.ascontiguousarray(np.asarray(weights, dtype=np.float32).reshape(-1))
    got = model_version(w)
    if got != task.model_version:
        raise ValueError(f"weights ({w.size} values) hash to {got}, the task names model_version "
                         f"{task.model_version!r}")
    return w


def check_integers(payload: bytes, sha256: str, session: Session) -> list[np.ndarray]:
    """The integer tensors of a downloaded payload (downloads.int_payload's layout), refused (ValueError)
    unless it hashes to the ``sha256`` the task offer binds to its model version."""
    from .downloads import digest, split_payload
    got = digest(payload)
    if got != sha256:
        raise ValueError(f"integers ({len(payload)} bytes) hash to {got[:16]}, the task offer names {sha256[:16]}")
    return split_payload(session.table, payload)


def answer(task: RoundTask, session: Session, batches: list[Batch], *, weights: np.ndarray | None,
           runtime: str, label: str | None = None, integers: list[np.ndarray] | None = None) -> ClientReport:
    """The device's answer to ``task``: the weights checked against the task's model version, the
    runtime's domain against the task's, then the K (+1) losses of every local step (client.run_task).
    ``label`` names the client in the report's ``runtime`` field (default: the runtime's name).
    ``integers``: an int8 device's checked download (``check_integers``) in place of the float weights."""
    domain = runtime_info(runtime).domain
    if domain != task.domain.value:
        raise ValueError(f"runtime {runtime!r} perturbs in the {domain} domain, the task in {task.domain.value}")
    if integers is not None:
        return run_task(task, session, batches, weights=None, integers=integers, runtime=label or runtime)
    return run_task(task, session, batches, weights=check_weights(task, weights), runtime=label or runtime)
