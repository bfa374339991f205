"""How many perturbations a session evaluates per runtime call (``--perturbations-per-call``).

``resolve(p, runtime)`` turns the user's choice into an int >= 1 or ``"auto"``; anything else is a
ValueError. ``"auto"`` is *measured on the device* (docs/batched-k.md), not looked up: a session
that can batch (torch, onnxruntime, onnxruntime-int8) calibrates when it sees its first batch:

* for each candidate P (``CANDIDATES``, increasing) it builds the P-sets call, runs it once
  (warm-up: graph build, arena growth), then times ``REPEATS`` calls (more for sub-millisecond
  calls), **each right after a timed P = 1 call** (``calibrate(sequential=...)``: the session's
  sequential path, whatever P it is set to), so a change of the machine's load hits both alike;
  a P's speedup is the median over those pairs of (P = 1 time x P) / (P-call time);
* memory cap: before a candidate runs, its resident memory is predicted from the growth measured
  so far (linear in P: activations and weight copies); a candidate predicted, or measured, above
  ``MEMORY_CAP`` x the RSS after the P = 1 call is not used, and larger ones are not tried;
* it stops early when a P is more than ``TOLERANCE`` slower per perturbation than the best so far
  (batching stopped paying), or when ``BUDGET_S`` of calibration time is spent;
* the choice (``choose``): P = 1 unless batching pays outside the noise: a P > 1 counts only when
  its median speedup is >= 1 + ``TOLERANCE`` and its lower-quartile pair still shows a gain; of
  those, the smallest P within ``TOLERANCE`` of the best speedup (smaller P = less memory).

A session that chose P = 1 runs exactly the code of a P = 1 session (``use_p(1)`` drops the batched
forward); benchmarks/test_batched.py's auto-P grid times the two alternately (docs/batched-k.md).

The result is cached per (model, runtime, threads, CPU, batch) in a small JSON file
(``cache_path()``: ``$BAFFLE_EDGE_CACHE_DIR`` or the user cache dir, ``auto-p.json``), so later
sessions of the same model on the same device skip the measurement. A session reports what it
measured (or read from the cache) in ``session.calibration`` (``Calibration.to_json``): train runs
write it to metrics.json, benchmarks to their extra_info.
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from baffle_edge.bundle import check_p

AUTO_KEY = "auto"
CANDIDATES = (1, 2, 5, 10, 25)  # P values tried, in order
REPEATS = 3  # timed calls per candidate (after one warm-up call) ...
MIN_TIME_S = 0.05  # ... and more, up to MAX_CALLS, until this much time was timed (sub-ms calls are noisy)
MAX_CALLS = 50
TOLERANCE = 0.10  # a P within 10% of the best time per perturbation counts as as fast
MEMORY_CAP = 1.5  # resident memory at most 1.5x the RSS after the P = 1 call
BUDGET_S = 10.0  # calibration stops trying larger P after this much time
RECHECK_ROUNDS = 3  # an auto session that chose P > 1 re-checks it paired against P = 1 at its first steps ...
DRIFT = 0.30  # ... and whenever a step's time per row moves more than 30% (docs/batched-k.md)
CACHE_ENV = "BAFFLE_EDGE_CACHE_DIR"
CACHE_VERSION = 2  # 2: P chosen by paired speedups over P = 1 (version-1 entries are measured again)


def resolve(p: int | str, runtime: str = "", model: str = "*") -> int | str:
    """An int >= 1, or ``"auto"`` for runtimes that batch (1 for the others: they ignore it)."""
    if isinstance(p, str):
        if p.strip().lower() == AUTO_KEY:
            from . import REGISTRY  # (runtimes/__init__ imports no runtime module at the top)
            return AUTO_KEY if (not runtime or (runtime in REGISTRY and REGISTRY[runtime].batched)) else 1
        try:
            p = int(p)
        except ValueError:
            raise ValueError(f"perturbations per call must be an integer >= 1 or 'auto', got {p!r}") from None
    return check_p(p)


def model_name(model) -> str:
    """The baffle_edge.models name of a torch module (``*`` when it is not one of them)."""
    from baffle_edge.models import MLP, LeNet, WideResNet
    return {LeNet: "lenet", WideResNet: "wrn-10-2", MLP: "mlp"}.get(type(model), "*")


# ----------------------------------------------------------------------------- measurement
def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unavailable: no cap applied)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Calibration:
    p: int  # the chosen P
    seconds_per_set: dict[int, float] = field(default_factory=dict)  # fastest timed call / P
    rss_bytes: dict[int, int] = field(default_factory=dict)  # resident memory after the candidate's warm-up
    cap_bytes: int = 0  # MEMORY_CAP x RSS after the P = 1 call (0: not measurable here)
    over_cap: list[int] = field(default_factory=list)  # candidates predicted or measured above the cap
    stopped: str = ""  # why larger candidates were not tried
    seconds: float = 0.0  # calibration time
    key: str = ""  # the cache key (model, runtime, threads, CPU, batch)
    cached: bool = False  # read from the cache file instead of measured now
    speedup: dict[int, float] = field(default_factory=dict)  # P > 1: median of (P=1 time x P / P-call time), paired calls
    speedup_low: dict[int, float] = field(default_factory=dict)  # the lower quartile of those pair ratios
    rechecks: list[dict] = field(default_factory=list)  # this session's re-checks of P > 1 (not cached)

    def to_json(self) -> dict:
        return {"p": self.p, "seconds_per_set": {str(k): v for k, v in self.seconds_per_set.items()},
                "rss_bytes": {str(k): v for k, v in self.rss_bytes.items()}, "cap_bytes": self.cap_bytes,
                "over_cap": self.over_cap, "stopped": self.stopped, "seconds": self.seconds, "key": self.key,
                "cached": self.cached, "speedup": {str(k): v for k, v in self.speedup.items()},
                "speedup_low": {str(k): v for k, v in self.speedup_low.items()}, "rechecks": self.rechecks}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        return cls(check_p(d["p"]), {int(k): float(v) for k, v in d.get("seconds_per_set", {}).items()},
                   {int(k): int(v) for k, v in d.get("rss_bytes", {}).items()}, int(d.get("cap_bytes", 0)),
                   [int(v) for v in d.get("over_cap", [])], str(d.get("stopped", "")),
                   float(d.get("seconds", 0.0)), str(d.get("key", "")), bool(d.get("cached", False)),
                   {int(k): float(v) for k, v in d.get("speedup", {}).items()},
                   {int(k): float(v) for k, v in d.get("speedup_low", {}).items()})


def calibrate(run: Callable[[int], Callable[[], object]], *, candidates=CANDIDATES, repeats: int = REPEATS,
              timer: Callable[[], float] = time.perf_counter, memory: Callable[[], int] = rss_bytes,
              cap: float = MEMORY_CAP, budget_s: float = BUDGET_S, tolerance: float = TOLERANCE,
              min_time_s: float = MIN_TIME_S, sequential: Callable[[], object] | None = None) -> Calibration:
    """Measure the candidates and choose P (the rule in the module docstring). ``run(p)`` prepares
    the P-sets call and returns it; ``sequential`` is a one-set call that runs the P = 1 path
    whatever P the session is set to (default: ``run(1)``'s call); ``timer`` and ``memory`` are
    injectable (tests fake them)."""
    candidates = sorted({check_p(p) for p in candidates} | {1})
    out = Calibration(1)
    start = timer()
    base = memory()  # before any candidate ran
    per_set_growth = 0.0
    one = None
    for p in candidates:
        if out.cap_bytes and base + p * per_set_growth > out.cap_bytes:
            out.over_cap.append(p)
            out.stopped = f"P={p} predicted above the memory cap"
            break
        try:
            call = run(p)
        except ImportError as e:  # e.g. a device without `onnx` cannot build ORT's p{P} graph
            out.stopped = f"P={p} unavailable here ({e})"
            break
        if p == 1:
            one = sequential or call
        call()  # warm-up
        rss = memory()
        out.rss_bytes[p] = rss
        if p == 1:
            out.cap_bytes = int(cap * rss) if rss else 0
        elif out.cap_bytes and rss > out.cap_bytes:
            out.over_cap.append(p)
            out.stopped = f"P={p} measured above the memory cap"
            break
        if rss:
            per_set_growth = max(per_set_growth, (rss - base) / p)
        _time_paired(out, p, call, one, timer=timer, repeats=repeats, min_time_s=min_time_s)
        best = max(out.speedup.values(), default=1.0)
        if p > 1 and out.speedup[p] * (1 + tolerance) < max(best, 1.0):
            fastest = max(out.speedup, key=out.speedup.get) if best > 1.0 else 1
            out.stopped = f"P={p} slower per perturbation than P={fastest}"
            break
        if timer() - start > budget_s and p != candidates[-1]:
            out.stopped = f"calibration budget ({budget_s:g} s) spent"
            break
    out.p = choose(out, tolerance)
    out.seconds = timer() - start
    return out


def _time_paired(out: Calibration, p: int, call, one, *, timer, repeats: int, min_time_s: float) -> None:
    """Time ``call`` (P sets); for P > 1 each timed call follows a timed P = 1 call (``one``), so a
    load change on the machine hits both alike: the speedup is the median of the pairs' ratios."""
    times, ratios = [], []
    while len(times) < repeats or (sum(times) < min_time_s and len(times) < MAX_CALLS):
        t1 = None
        if p > 1:
            t0 = timer()
            one()
            t1 = timer() - t0
        t0 = timer()
        call()
        times.append(timer() - t0)
        if t1 is not None:
            ratios.append(t1 * p / times[-1] if times[-1] > 0 else 1.0)
    out.seconds_per_set[p] = min(times) / p
    if p > 1:
        ratios.sort()
        out.speedup[p] = ratios[len(ratios) // 2]
        out.speedup_low[p] = ratios[len(ratios) // 4]


def choose(cal: Calibration, tolerance: float = TOLERANCE) -> int:
    """P = 1 unless batching pays outside the noise: a P counts when its median paired speedup over
    P = 1 is at least ``1 + tolerance`` and its lower-quartile pair still shows a gain (> 1); of those,
    the smallest P within ``tolerance`` of the best speedup (smaller P = less memory)."""
    ok = {p: s for p, s in cal.speedup.items() if s >= 1 + tolerance and cal.speedup_low.get(p, s) > 1.0}
    if not ok:
        return 1
    best = max(ok.values())
    return min(p for p, s in ok.items() if s * (1 + tolerance) >= best)


# ----------------------------------------------------------------------------- cache
def cache_path() -> Path:
    """``$BAFFLE_EDGE_CACHE_DIR/auto-p.json``, else the user cache dir's ``baffle-edge/auto-p.json``."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "baffle-edge")
    return Path(root) / "auto-p.json"


def cache_key(*, model: str, runtime: str, threads: int, batch: int) -> str:
    from baffle_edge.targets import cpu_model
    return f"model={model}|runtime={runtime}|threads={threads}|cpu={cpu_model()}|batch={batch}"


_lock = threading.Lock()


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"version {data.get('version')!r}")
        return data["entries"]
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        warnings.warn(f"ignoring the auto-P cache {path} ({e}); it will be rewritten", RuntimeWarning, stacklevel=3)
        return {}


def cached_calibration(key: str, measure: Callable[[], Calibration]) -> Calibration:
    """The cached calibration of ``key``, or ``measure()`` stored under it (one measurement at a
    time in this process: concurrent sessions would disturb each other's timings)."""
    path = cache_path()
    with _lock:
        entry = _read_cache(path).get(key)
        if entry is not None:
            try:
                got = Calibration.from_json(entry)
                got.cached, got.key = True, key
                return got
            except (KeyError, TypeError, ValueError):
                pass  # a damaged entry is measured again
        got = measure()
        got.key = key
        entries = _read_cache(path)
        entries[key] = got.to_json()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:  # a read-only home is not an error: the choice is just not remembered
            warnings.warn(f"cannot write the auto-P cache {path} ({e})", RuntimeWarning, stacklevel=3)
        return got


class AutoP:
    """Session mixin: P as given, or ``"auto"`` resolved at the first batch (``prepare``).

    A backend implements ``use_p(p)`` (sets ``perturbations_per_call`` and builds what P needs) and
    calls ``_init_p`` in its constructor and ``_calibrate_once(x)`` at the start of ``prepare``;
    ``_auto_key_model`` and ``_auto_threads`` name what the cache key needs."""

    calibration: Calibration | None = None
    _auto_pending = False
    _auto_watch: "RoundWatch | None" = None  # auto sessions that chose P > 1: the re-check schedule

    def _init_p(self, p: int | str) -> None:
        p = resolve(p, self.name)
        self._auto_pending = p == AUTO_KEY
        self.use_p(1 if p == AUTO_KEY else p)

    def losses(self, batch, task, step: int = 0):
        """The step's losses (``BaseSession.losses``), timed per row for the auto-P re-check."""
        t0 = time.perf_counter()
        out = super().losses(batch, task, step)
        if self._auto_watch is not None and len(out):
            self._auto_watch.observe((time.perf_counter() - t0) / len(out))
        return out

    def _recheck(self, x) -> None:
        """Time the chosen P against P = 1 again, paired (``_time_paired``) on this batch; fall back to
        P = 1 for good when the gain is no longer outside the noise (``choose``)."""
        watch, p = self._auto_watch, self.perturbations_per_call
        watch.pending = False
        sets = self.weight_set(0, None, None)
        check = Calibration(p)
        _time_paired(check, p, lambda: self.evaluate(x, [sets] * p),
                     lambda: self.evaluate_sequential(x, [sets]), timer=time.perf_counter, repeats=REPEATS,
                     min_time_s=MIN_TIME_S)
        watch.checks.append({"speedup": check.speedup[p], "speedup_low": check.speedup_low[p]})
        if choose(check) == 1:
            self.use_p(1)
            self._auto_watch = None
            self.calibration.stopped = "; ".join(filter(None, [self.calibration.stopped, f"re-check at round "
                                                               f"{watch.rounds}: P={p} no faster than P=1, now P=1"]))
        self.calibration.rechecks = watch.checks

    def use_p(self, p: int) -> None:
        raise NotImplementedError

    def evaluate_sequential(self, x, sets):
        """``evaluate`` on the P = 1 path whatever P is set (calibration times it against P)."""
        raise NotImplementedError

    def _calibrate_once(self, x) -> None:
        if not self._auto_pending:
            if self._auto_watch is not None and self._auto_watch.pending:
                self._recheck(x)
            return
        self._auto_pending = False
        sets = self.weight_set(0, None, None)

        def run(p: int):
            self.use_p(p)
            return lambda: self.evaluate(x, [sets] * p)

        def measure() -> Calibration:
            return calibrate(run, candidates=CANDIDATES, min_time_s=MIN_TIME_S,
                             sequential=lambda: self.evaluate_sequential(x, [sets]))

        key = cache_key(model=self._auto_key_model, runtime=self.name, threads=self._auto_threads, batch=len(x))
        self.calibration = cached_calibration(key, measure)
        try:
            self.use_p(self.calibration.p)
        except ImportError as e:  # cached where this P could be built (e.g. ORT's p{P} graph with onnx), not here
            cached, self.calibration = self.calibration.p, measure()  # among the P usable here, not cached
            self.calibration.key = key
            self.calibration.stopped = "; ".join(filter(None, [f"cached P={cached} unusable here ({e})",
                                                                self.calibration.stopped]))
            self.use_p(self.calibration.p)
        if self.perturbations_per_call > 1:
            self._auto_watch = RoundWatch(pending=self.calibration.cached)  # a cached choice: re-check at once


class RoundWatch:
    """When an auto session re-checks its P > 1 against P = 1: at the start of each of the first
    ``RECHECK_ROUNDS`` steps, and whenever a step's time per row drifts more than ``DRIFT`` from the
    first one's (the machine's load moved)."""

    def __init__(self, *, pending: bool = False):
        self.rounds, self.reference, self.pending = 0, None, pending
        self.checks: list[dict] = []

    def observe(self, seconds_per_row: float) -> None:
        self.rounds += 1
        if self.reference is None:
            self.reference = seconds_per_row
        drift = abs(seconds_per_row / self.reference - 1) > DRIFT if self.reference > 0 else False
        if self.rounds < RECHECK_ROUNDS or drift:
            self.pending = True
            self.reference = seconds_per_row if drift else self.reference
