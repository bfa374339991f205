"""The wire protocol: what the server sends (RoundTask) and what a client returns (ClientReport).

Both are frozen dataclasses, versioned, serialised as JSON (``to_json``/``from_json``) or NPZ
(``to_npz``/``from_npz``, ``allow_pickle=False``). Nothing is ever unpickled. Every field is
validated at the boundary; a bad value raises ``ValueError`` naming the field, and the server
records such a report as rejected instead of crashing.

Version 2 (this build) added ``local_lr`` and ``clip`` to ``RoundTask`` (the FedAvg client's local
step and the clipping of each local estimate, so server replay and client always agree) and bounds
``local_steps * k`` by 2^32 (the noise counter word ``k' = step * K + k`` is an unsigned 32-bit
integer, docs/noise.md). Version-1 messages are refused with an error naming both versions.

Loss layout in a report: forward scheme -> ``losses[k] = L(w + delta_k)`` for k < K, plus
``base_loss = L(w)``; central scheme -> ``losses[k] = L(w + delta_k)``, ``losses[K + k] =
L(w - delta_k)``, ``base_loss`` optional. With ``local_steps = S > 1`` (FedAvg) the report holds
S such blocks, one per local step, and S base losses.
"""
from __future__ import annotations

import enum
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .perturb import NoiseKind

PROTOCOL_VERSION = 2
MAX_K = 1_000_000


class Scheme(str, enum.Enum):
    FORWARD = "forward"  # (L(w+d) - L(w)) / sigma: K+1 forwards (reference default)
    CENTRAL = "central"  # (L(w+d) - L(w-d)) / (2 sigma): 2K forwards


class NoiseScope(str, enum.Enum):
    CLIENT = "client"  # every client has its own stream (default: errors average out)
    SHARED = "shared"  # one stream per round for all clients (server regenerates K, not C*K)


class Domain(str, enum.Enum):
    """Where the perturbation is applied (see docs/quantized-perturbation.md)."""

    FLOAT = "float"  # delta = sigma * eps on float weights
    INT8_STEP = "int8-step"  # delta = scale * eps: whole int8 quantization steps per channel


class Baseline(str, enum.Enum):
    """What each perturbed loss is compared with (docs/quantized-perturbation.md, "Decoding")."""

    BASE = "base"  # L(w + delta_k) - L(w): the reference BAFFLE estimator
    LOO = "leave-one-out"  # L(w + delta_k) - mean_{j != k} L(w + delta_j): unbiased, cancels the
    # perturbation-independent curvature term 1/2 sum_i H_ii delta_i^2 of whole-step perturbations


class StepEstimator(str, enum.Enum):
    """How an int8-step estimate turns integer steps back into a float gradient
    (docs/quantized-perturbation.md, "Decoding")."""

    RMS = "rms-step"  # g = mean_k(dL_k eps_k) / rms(step): the gradient w.r.t. the integers, one scale
    PER_STEP = "per-step"  # g = mean_k(dL_k eps_k) / step_i: unbiased, but noise x 1/step_i per coordinate


@dataclass(frozen=True)
class DomainDefaults:
    """What a perturbation domain implies when the user does not say (the one place this is decided)."""

    noise: NoiseKind
    baseline: Baseline
    sigma_used: bool  # False: the domain moves whole quantization steps and ignores ``sigma``


# The isotropic noise of each domain (a task's default); a run's default is block noise where its runtime
# has block rows (config.default_noise), this noise otherwise.
DOMAIN_DEFAULTS: dict[Domain, DomainDefaults] = {
    Domain.FLOAT: DomainDefaults(NoiseKind.GAUSSIAN, Baseline.BASE, sigma_used=True),  # the reference
    # whole +-1 steps: Rademacher; leave-one-out cancels the curvature offset they add to every loss
    Domain.INT8_STEP: DomainDefaults(NoiseKind.RADEMACHER, Baseline.LOO, sigma_used=False),
}


def check_noise(domain: Domain, noise: NoiseKind) -> None:
    """int8-step perturbation moves integers by whole steps: it needs Rademacher noise, or block
    noise (whose int8 values are +-m_b steps, docs/noise.md section 10)."""
    if Domain(domain) is Domain.INT8_STEP and NoiseKind(noise) not in (NoiseKind.RADEMACHER, NoiseKind.BLOCK):
        raise ValueError(f"noise: the {Domain.INT8_STEP.value!r} domain moves int8 weights by whole quantization "
                         f"steps and needs 'rademacher' or 'block' noise, got {NoiseKind(noise).value!r}")


MAX_BLOCK_MODULES = 4096


def _block_weights(v, noise: NoiseKind) -> tuple[int, ...] | None:
    if v is None:
        return None
    _require(noise is NoiseKind.BLOCK, "block_weights", "only block noise draws blocks")
    _require(isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_BLOCK_MODULES, "block_weights",
             f"expected a list of 1..{MAX_BLOCK_MODULES} integers, got {v!r}"[:200])
    _require(all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x < 2**32 for x in v), "block_weights",
             "every weight must be an integer in [1, 2^32)")
    return tuple(int(x) for x in v)


MAX_BLOCK_STEPS = 127  # an int8 weight's whole range


def _max_block_steps(v, noise: NoiseKind, domain: Domain) -> int | None:
    if v is None:
        return None
    _require(noise is NoiseKind.BLOCK and domain is Domain.INT8_STEP, "max_block_steps",
             "only int8-step block noise moves blocks by whole steps")
    _require(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_BLOCK_STEPS, "max_block_steps",
             f"expected an integer in [1, {MAX_BLOCK_STEPS}], got {v!r}"[:120])
    return int(v)


def _require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {msg}")


def _int(d: dict, name: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    v = d.get(name)
    _require(isinstance(v, int) and not isinstance(v, bool), name, f"expected an integer, got {v!r}")
    _require(lo <= v <= hi, name, f"{v} outside [{lo}, {hi}]")
    return v


def _loads(text: str | bytes, what: str):
    """json.loads that fails only with ValueError: no NaN/Infinity literals, no deep nesting."""
    def no_constant(c: str):
        raise ValueError(f"{what}: non-finite literal {c} is not allowed")
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"{what}: expected JSON text, got {type(text).__name__}")
    try:
        return json.loads(text, parse_constant=no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{what}: JSON nested too deeply") from None


def _float(d: dict, name: str, *, positive: bool = False, optional: bool = False) -> float | None:
    v = d.get(name)
    if v is None and optional:
        return None
    _require(isinstance(v, (int, float)) and not isinstance(v, bool), name, f"expected a number, got {v!r}")
    _require(isinstance(v, float) or abs(v) < 2**1000, name, "must be finite, got an integer too large for a float")
    _require(math.isfinite(v), name, f"must be finite, got {v!r}")
    if positive:
        _require(v > 0, name, f"must be > 0, got {v!r}")
    return float(v)


def _enum(d: dict, name: str, kind: type[enum.Enum]):
    v = d.get(name)
    try:
        return kind(v)
    except ValueError:
        raise ValueError(f"{name}: {v!r} is not one of {[e.value for e in kind]}") from None


def _str(d: dict, name: str) -> str:
    v = d.get(name)
    _require(isinstance(v, str) and len(v) <= 256, name, f"expected a string of <= 256 chars, got {v!r}")
    return v


def _check_version(d: dict) -> None:
    _require(isinstance(d, dict), "message", f"expected a JSON object, got {type(d).__name__}")
    v = d.get("version")
    _require(v == PROTOCOL_VERSION, "version", f"protocol version {v!r} is not supported "
             f"(this build speaks {PROTOCOL_VERSION})")


@dataclass(frozen=True)
class RoundTask:
    """What one client must compute in one round."""

    round: int  # 0-based round index
    client: int  # client id (also keys the noise stream unless noise_scope is shared)
    seed: int  # run seed, uint64: with round/client/k it keys eps_k (docs/noise.md)
    k: int  # number of perturbations K
    sigma: float  # perturbation scale of the float domain (> 0); int8-step moves whole steps and ignores it
    scheme: Scheme = Scheme.FORWARD
    noise: NoiseKind = NoiseKind.GAUSSIAN
    noise_scope: NoiseScope = NoiseScope.CLIENT
    domain: Domain = Domain.FLOAT
    estimator: StepEstimator = StepEstimator.RMS  # int8-step only: how losses decode into a gradient
    baseline: Baseline = Baseline.BASE  # what each perturbed loss is compared with
    local_steps: int = 1  # FedSGD 1; FedAvg: local estimated-gradient steps on the client
    local_lr: float = 0.0  # FedAvg: the client's local SGD step size (server.OptimConfig.local_lr)
    clip: float | None = None  # inf-norm clip of each local estimate (the server sends its 0.3); None = off
    model_version: str = ""  # hash of the global weights the losses must be evaluated at
    version: int = PROTOCOL_VERSION
    # block noise: draw weight of each module's blocks, in block-table module order (docs/noise.md
    # section 11); None = in proportion to block size (section 8). Omitted from the JSON when None.
    block_weights: tuple[int, ...] | None = None
    # int8-step block noise: at most this many whole steps per coordinate, m_b = min(round(sqrt(d / d_b)),
    # max_block_steps) (docs/noise.md section 10); None = the rule alone. Omitted from the JSON when None.
    max_block_steps: int | None = None

    def __post_init__(self):
        """Validate every field and hold the choices as enums (strings are parsed once, here)."""
        for name, value in RoundTask._parse(self.to_dict()).items():
            object.__setattr__(self, name, value)

    @property
    def noise_client(self) -> int:
        """The client word of the noise counter (docs/noise.md)."""
        from .perturb import SHARED_CLIENT
        return SHARED_CLIENT if self.noise_scope is NoiseScope.SHARED else self.client

    @property
    def central(self) -> bool:
        return self.scheme is Scheme.CENTRAL

    @property
    def losses_per_step(self) -> int:
        return self.k * (2 if self.central else 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in ("scheme", "noise", "noise_scope", "domain", "estimator", "baseline"):
            d[f] = getattr(self, f).value if isinstance(getattr(self, f), enum.Enum) else d[f]
        if d["block_weights"] is None:
            del d["block_weights"]  # tasks without it stay readable by clients built before it
        else:
            d["block_weights"] = list(d["block_weights"])
        if d["max_block_steps"] is None:
            del d["max_block_steps"]  # likewise
        return d

    @classmethod
    def _parse(cls, d: dict) -> dict:
        _check_version(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        _require(not unknown, "task", f"unknown fields {sorted(unknown)}")
        out = dict(
            round=_int(d, "round", 0, 2**32 - 1), client=_int(d, "client", 0, 2**32 - 2),
            seed=_int(d, "seed"), k=_int(d, "k", 1, MAX_K), sigma=_float(d, "sigma", positive=True),
            scheme=_enum(d, "scheme", Scheme), noise=_enum(d, "noise", NoiseKind),
            noise_scope=_enum(d, "noise_scope", NoiseScope), domain=_enum(d, "domain", Domain),
            estimator=_enum(d, "estimator", StepEstimator), baseline=_enum(d, "baseline", Baseline),
            local_steps=_int(d, "local_steps", 1, 10_000), local_lr=_float(d, "local_lr"),
            clip=_float(d, "clip", positive=True, optional="clip" in d), model_version=_str(d, "model_version"),
            version=PROTOCOL_VERSION,
        )
        _require(out["local_lr"] >= 0, "local_lr", f"must be >= 0, got {out['local_lr']}")
        _require(out["local_steps"] * out["k"] <= 2**32, "k", f"local_steps x k = {out['local_steps'] * out['k']} "
                 "exceeds 2^32: the noise counter word k' = step * K + k is an unsigned 32-bit integer")
        _require(out["baseline"] is not Baseline.LOO or out["k"] >= 2, "baseline",
                 "leave-one-out needs k >= 2 perturbations")
        check_noise(out["domain"], out["noise"])
        out["block_weights"] = _block_weights(d.get("block_weights"), out["noise"])
        out["max_block_steps"] = _max_block_steps(d.get("max_block_steps"), out["noise"], out["domain"])
        return out

    @classmethod
    def for_domain(cls, domain: Domain | str, **fields) -> "RoundTask":
        """A task whose noise and baseline default to the domain's (``DOMAIN_DEFAULTS``)."""
        dflt = DOMAIN_DEFAULTS[Domain(domain)]
        fields.setdefault("noise", dflt.noise)
        fields.setdefault("baseline", dflt.baseline)
        return cls(domain=Domain(domain), **fields)

    @classmethod
    def from_dict(cls, d: dict) -> "RoundTask":
        return cls(**cls._parse(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "RoundTask":
        return cls.from_dict(_loads(text, "task"))


def _loss_array(v, name: str) -> np.ndarray:
    """A flat list (JSON) or 1-D real array (NPZ) of numbers as float64; anything else (bools,
    strings, nesting, complex, objects, out-of-range integers) is a ValueError."""
    if isinstance(v, np.ndarray):
        _require(v.ndim == 1 and v.dtype.kind in "fiu", name,
                 f"expected a 1-D array of real numbers, got shape {v.shape} dtype {v.dtype}")
        return v.astype(np.float64)
    _require(isinstance(v, list), name, f"expected a list of numbers, got {type(v).__name__}")
    for i, x in enumerate(v):  # every element checked before anything is converted (None, {} and 2**1100 too)
        _require(isinstance(x, (int, float)) and not isinstance(x, bool), name,
                 f"expected a flat list of numbers, found {str(x)[:40]!r} at index {i}")
        _require(isinstance(x, float) or abs(x) < 2**1000, name, f"integer at index {i} is too large for a float")
    return np.asarray(v, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class ClientReport:
    """What a client returns: loss scalars only (never noise, never a gradient)."""

    round: int
    client: int
    losses: np.ndarray  # float64, shape (local_steps * losses_per_step,)
    base_losses: np.ndarray  # float64, shape (local_steps,): L(w) per step (NaN-free; central: may be empty)
    num_samples: int  # samples in the client's batch: checked against what the server scheduled, never a weight
    model_version: str = ""
    runtime: str = ""  # which runtime produced the losses, e.g. "torch", "onnxruntime-int8"
    seconds: float = 0.0  # client wall time for the task
    version: int = PROTOCOL_VERSION

    def __post_init__(self):
        object.__setattr__(self, "losses", np.asarray(self.losses, dtype=np.float64).reshape(-1))
        object.__setattr__(self, "base_losses", np.asarray(self.base_losses, dtype=np.float64).reshape(-1))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["losses"] = [float(x) for x in self.losses]
        d["base_losses"] = [float(x) for x in self.base_losses]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClientReport":
        _check_version(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        _require(not unknown, "report", f"unknown fields {sorted(unknown)}")
        arrays = {name: _loss_array(d.get(name), name) for name in ("losses", "base_losses")}
        seconds = _float(d, "seconds")
        _require(seconds >= 0, "seconds", f"must be >= 0, got {seconds}")
        return cls(round=_int(d, "round", 0, 2**32 - 1), client=_int(d, "client", 0, 2**32 - 2),
                   losses=arrays["losses"], base_losses=arrays["base_losses"],
                   num_samples=_int(d, "num_samples", 1, 2**31), model_version=_str(d, "model_version"),
                   runtime=_str(d, "runtime"), seconds=seconds)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ClientReport":
        return cls.from_dict(_loads(text, "report"))

    def to_npz(self) -> bytes:
        header = {k: v for k, v in self.to_dict().items() if k not in ("losses", "base_losses")}
        buf = io.BytesIO()
        np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                 losses=self.losses, base_losses=self.base_losses)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> "ClientReport":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                raw = z["header"]
                _require(raw.dtype == np.uint8 and raw.ndim == 1, "header", "expected UTF-8 JSON bytes")
                header = _loads(raw.tobytes(), "header")
                _require(isinstance(header, dict), "header", "expected a JSON object")
                header["losses"], header["base_losses"] = z["losses"], z["base_losses"]
        except ValueError:
            raise
        except Exception as e:  # zipfile/format errors from a corrupt upload
            raise ValueError(f"report: not a valid NPZ report ({type(e).__name__}: {e})") from None
        return cls.from_dict(header)

    def check_against(self, task: RoundTask) -> None:
        """Raise ValueError if this report does not answer ``task`` exactly."""
        _require(self.round == task.round, "round", f"report is for round {self.round}, task is {task.round}")
        _require(self.client == task.client, "client", f"report is from client {self.client}, "
                 f"task was for {task.client}")
        _require(self.model_version == task.model_version, "model_version",
                 f"losses were computed at model {self.model_version!r}, task is {task.model_version!r}")
        want = task.local_steps * task.losses_per_step
        _require(self.losses.size == want, "losses", f"expected {want} values "
                 f"({task.local_steps} step(s) x {task.losses_per_step}), got {self.losses.size}")
        want_base = self.base_losses.size if task.central else task.local_steps
        _require(self.base_losses.size == want_base and self.base_losses.size in (0, task.local_steps),
                 "base_losses", f"expected {task.local_steps} value(s), got {self.base_losses.size}")
        for name in ("losses", "base_losses"):
            bad = np.flatnonzero(~np.isfinite(getattr(self, name)))
            _require(bad.size == 0, name, f"{bad.size} non-finite value(s), first at index "
                     f"{int(bad[0]) if bad.size else -1}")


def model_version(flat: np.ndarray) -> str:
    """The version of a flat weight vector, as ``RoundTask.model_version`` names it: the first 16 hex
    digits of the sha256 of its float32 little-endian bytes. A report must be computed at exactly
    these weights; every device checks the weights it downloads against it."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype="<f4").tobytes()).hexdigest()[:16]


def wire_bytes(msg: RoundTask | ClientReport) -> int:
    """Size of a message as sent (compact JSON, UTF-8)."""
    return len(msg.to_json().encode())
