"""The round board: ``Federation.step``'s ``gather`` hook for devices that talk HTTP.

The training thread calls ``board(tasks, weights)``: the round's tasks and float32 weights are
published, the call blocks until every task is answered or ``round_timeout`` passes, and it
returns ``(task, report)`` pairs in client order, so the reference server (quorum, robust
aggregation, replay guard, checkpoints) decides what the round does. The HTTP handlers call
``offer``/``submit`` from the event loop; every refusal is a ``Rejection`` (HTTP status, kind,
reason) that is counted and logged here and, when it refuses a report upload from a device with a
task in the open round, also handed to the server as that client's failed report, so it lands in
the round's ``rejected`` entry of ``metrics.json`` like any rejected report.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import downloads
from ..protocol import ClientReport, RoundTask
from ..server import ReplayGuard
from .tokens import Device
from .watch import RoundWatch, RunFacts

LOG_KEEP = 500  # rejections kept in full in gateway.json / metrics.json (all are counted)
REPORT_ENDPOINT = "/v1/report"  # refusals here are refused reports; elsewhere refused requests


class Rejection(Exception):
    """A refused request: HTTP ``status``, a short machine-readable ``kind`` and a reason."""

    def __init__(self, status: int, kind: str, reason: str, *, headers: dict | None = None):
        super().__init__(f"HTTP {status} {kind}: {reason}")
        self.status, self.kind, self.reason, self.headers = status, kind, reason, headers or {}
        self.recorded = False  # set by Board.record: every refusal is counted exactly once


class GatewayRejected(Exception):
    """What the server sees for a client whose uploads the gateway refused this round."""


class GatewayStopped(RuntimeError):
    """The gateway is shutting down while a round is open (the run can be resumed)."""


@dataclass(frozen=True)
class BundleSnapshot:
    """One bundle generation held in memory, every file checked against ``baffle.json``."""

    generation: int
    format: str
    files: dict[str, bytes]  # name -> content, baffle.json included
    sha256: dict[str, str]  # name -> hex digest

    @classmethod
    def read(cls, folder: Path, generation: int, fmt: str) -> BundleSnapshot:
        manifest = (folder / "baffle.json").read_bytes()
        meta = json.loads(manifest)
        files, digests = {"baffle.json": manifest}, {"baffle.json": hashlib.sha256(manifest).hexdigest()}
        for name, entry in meta["files"].items():
            data = (folder / name).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:  # never hand a device a file that is not the exported one
                raise RuntimeError(f"bundle {folder}: {name} has sha256 {digest[:12]}, baffle.json says "
                                   f"{entry['sha256'][:12]}")
            files[name], digests[name] = data, digest
        return cls(generation, fmt, files, digests)


@dataclass
class RoundState:
    round: int
    tasks: dict[int, RoundTask]
    weights: bytes  # float32 little-endian
    version: str  # the model hash the tasks name (also the weights' ETag)
    deadline: float | None  # time.monotonic() when the round closes, None = waits for all
    bundle: BundleSnapshot | None
    ints: bytes | None = None  # int8-step bundles: the integers the devices run (downloads.int_payload)
    reports: dict[int, ClientReport] = field(default_factory=dict)
    rejections: dict[int, list[str]] = field(default_factory=dict)
    guard: ReplayGuard = field(default_factory=ReplayGuard)
    closed: bool = False


class Board:
    def __init__(self, cfg, *, out_dir: str | Path | None = None, demo_data: bool = False,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.demo_data = demo_data
        self.fed = None  # the run's Federation (set by ``bind`` before the first round)
        self.cond = threading.Condition()
        self.current: RoundState | None = None
        self.bundles: dict[int, BundleSnapshot] = {}  # the current and the previous generation
        self.int_payloads: dict[str, bytes] = {}  # model version -> integers: this round's and the last one's
        self.packed: dict[tuple, bytes] = {}  # (what, key, base) -> compressed body, for the rounds above
        self.rounds_version: str | None = None  # the model version of the last round opened
        self.finished = False
        self.stopping: str | None = None
        self.listeners: list[Callable[[], None]] = []  # woken on every state change (long polls)
        self.requests: collections.Counter = collections.Counter()  # endpoint -> count
        self.rejected_by_kind: collections.Counter = collections.Counter()
        self.rejection_log: collections.deque = collections.deque(maxlen=LOG_KEEP)
        self.accepted_total = 0
        self.refused_reports = 0  # refused POST /v1/report requests (all refused requests: rejected_by_kind)
        self.devices_seen: set[str] = set()
        self.watch = RoundWatch(RunFacts(demo_data, cfg.runtime, None), log=log or _log_stderr)

    # ------------------------------------------------------------------ training thread side
    def bind(self, fed) -> None:
        """``simulate.train``'s ``setup`` hook: the Federation whose rounds this board serves."""
        self.fed = fed
        fmt = None if fed.bundle_dir is None else fed.runtime_info.format
        self.watch.facts = RunFacts(self.demo_data, self.cfg.runtime, fmt)

    def round_done(self, row: dict) -> None:
        """``simulate.train``'s ``on_round`` hook: a finished round's metrics row (for /v1/status)."""
        with self.cond:
            self.watch.finished(row)
        self._pulse()

    @property
    def lean_downloads(self) -> bool:
        """int8 devices download integers and zlib'd bundle files (metrics' bytes_down counts them so)."""
        return True

    @property
    def devices_own_data(self) -> bool:
        """Devices train on their own data unless the server hands them its batches (``--demo-data``):
        then ``Federation.step`` weighs them equally and bounds their num_samples claims."""
        return not self.demo_data

    def __call__(self, tasks: list[RoundTask], weights: np.ndarray) -> list[tuple]:
        if self.fed is None:
            raise RuntimeError("Board.bind(federation) must be called before the first round")
        round_ = tasks[0].round
        bundle = self._snapshot_bundle()
        timeout = self.cfg.round_timeout
        table = getattr(self.fed.server, "quant_table", None)
        ints = downloads.int_payload(table, weights) if bundle is not None and table is not None else None
        state = RoundState(round=round_, tasks={t.client: t for t in tasks},
                           weights=np.ascontiguousarray(weights, dtype="<f4").tobytes(),
                           version=tasks[0].model_version, bundle=bundle, ints=ints,
                           deadline=time.monotonic() + timeout if timeout else None)
        with self.cond:
            self.current = state
            keep = {state.version} | ({self.rounds_version} if self.rounds_version else set())
            self.int_payloads = {v: p for v, p in self.int_payloads.items() if v in keep}
            if ints is not None:
                self.int_payloads[state.version] = ints
            self.rounds_version = state.version
            self.packed = {k: v for k, v in self.packed.items() if k[0] != "ints" or k[1] in keep}
            self.watch.open(round_, state.tasks)
        self._pulse()
        with self.cond:
            while len(state.reports) < len(state.tasks) and self.stopping is None:
                remaining = None if state.deadline is None else state.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.watch.check(timeout=timeout)  # absent devices' likely causes, while the round is open
                self.cond.wait(1.0 if remaining is None else min(remaining, 1.0))
            state.closed = True
            stopping = self.stopping
        self._pulse()
        if stopping is not None:
            raise GatewayStopped(f"round {round_ + 1} interrupted: {stopping}")
        answered = []
        for client in sorted(state.tasks):  # client order: the same result however the HTTP calls raced
            task = state.tasks[client]
            reasons = state.rejections.get(client)
            if reasons:
                more = f" ({len(reasons)} refused uploads; first shown)" if len(reasons) > 1 else ""
                answered.append((task, GatewayRejected(reasons[0] + more)))
            if client in state.reports:
                answered.append((task, state.reports[client]))
        self.write_log()
        return answered

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()
        self._pulse()

    def stop(self, reason: str) -> None:
        """Make an open (or the next) round raise ``GatewayStopped``: the server is going down."""
        with self.cond:
            self.stopping = reason
            self.cond.notify_all()
        self._pulse()

    def _snapshot_bundle(self) -> BundleSnapshot | None:
        fed = self.fed
        if fed.bundle_dir is None:
            return None
        gen = fed.bundle_generation
        if gen not in self.bundles:
            snap = BundleSnapshot.read(Path(fed.bundle_dir), gen, fed.runtime_info.format)
            with self.cond:
                self.bundles = {g: b for g, b in self.bundles.items() if g >= gen - 1}
                self.packed = {k: v for k, v in self.packed.items() if k[0] != "bundle" or k[1][0] >= gen - 1}
                self.bundles[gen] = snap
        return self.bundles[gen]

    def _pulse(self) -> None:
        for wake in list(self.listeners):
            wake()

    # ------------------------------------------------------------------ HTTP side
    def record(self, device: Device | None, rejection: Rejection, endpoint: str) -> Rejection:
        """Log and count a refused request (once: a recorded ``Rejection`` is marked). A refused report
        upload from a device with a task in the open round also becomes that client's rejected report
        in the round's metrics; other refused requests (a 404 download, a 429 poll) are counted only."""
        if rejection.recorded:
            return rejection
        rejection.recorded = True
        entry = {"time": round(time.time(), 3), "endpoint": endpoint, "status": rejection.status,
                 "kind": rejection.kind, "reason": rejection.reason,
                 "device": device.name if device else None, "client": device.client if device else None}
        report = endpoint == REPORT_ENDPOINT
        with self.cond:
            st = self.current
            self.refused_reports += report
            if report and device is not None and st is not None and not st.closed and device.client in st.tasks:
                entry["round"] = st.round + 1  # 1-based, as in metrics.json rows
                st.rejections.setdefault(device.client, []).append(
                    f"gateway refused an upload from device {device.name!r}: HTTP {rejection.status} "
                    f"{rejection.kind}: {rejection.reason}")
            self.rejected_by_kind[rejection.kind] += 1
            self.rejection_log.append(entry)
            if st is not None and not st.closed:
                self.watch.refused(device.client if device else None, rejection.kind, endpoint)
        return rejection

    def offer(self, device: Device) -> dict:
        """What ``GET /v1/task`` answers: the device's task of the open round, or wait, or done."""
        with self.cond:
            self.devices_seen.add(device.name)
            if self.finished:
                return {"status": "done", "rounds": self.cfg.rounds}
            st = self.current
            if st is None or st.closed or device.client not in st.tasks or device.client in st.reports:
                return {"status": "wait", "retry_after": 1.0,
                        "round": None if st is None else st.round}
            task = st.tasks[device.client]
            self.watch.fetched(device.client)
            deadline_in = None if st.deadline is None else max(0.0, st.deadline - time.monotonic())
            bundle = st.bundle
        return {
            "status": "task", "round": st.round, "rounds": self.cfg.rounds, "task": task.to_dict(),
            "weights": {"url": f"/v1/weights/{st.version}", "version": st.version, "dtype": "float32",
                        "byte_order": "little", "count": len(st.weights) // 4,
                        **({} if st.ints is None else {"int8": {
                            "url": f"/v1/weights/{st.version}/int8", "sha256": downloads.digest(st.ints),
                            "bytes": len(st.ints)}})},
            "bundle": None if bundle is None else {
                "generation": bundle.generation, "format": bundle.format,
                "manifest": f"/v1/bundle/{bundle.generation}/baffle.json",
                "files": {n: {"url": f"/v1/bundle/{bundle.generation}/{n}", "sha256": h,
                              "bytes": len(bundle.files[n])} for n, h in bundle.sha256.items()}},
            "data": f"/v1/data/{st.round}" if self.demo_data else None,
            "deadline_in": deadline_in,
            "runtime": self.cfg.runtime,
        }

    def submit(self, device: Device, report: ClientReport) -> dict:
        """Admit a parsed report or raise ``Rejection`` (the caller records it)."""
        with self.cond:
            st = self.current
            if report.client != device.client:
                raise Rejection(403, "wrong-device", f"the report names client {report.client}, but this token "
                                f"answers for client {device.client}")
            if st is None or self.finished:
                raise Rejection(409, "stale", "no round is open")
            if report.round != st.round:
                raise Rejection(409, "stale", f"the report is for round {report.round + 1}, the current round is "
                                f"{st.round + 1}")
            if st.closed:
                raise Rejection(409, "late", f"round {st.round + 1} closed before the report arrived "
                                "(deadline passed)")
            task = st.tasks.get(device.client)
            if task is None:
                raise Rejection(409, "stale", f"client {device.client} has no task in round {st.round + 1}")
            if device.client in st.reports:
                raise Rejection(409, "duplicate", f"client {device.client} already reported for round {st.round + 1}")
            if report.model_version != task.model_version:
                raise Rejection(409, "stale", f"the losses were computed at model {report.model_version!r}, "
                                f"the round's model is {task.model_version!r}")
            try:
                report.check_against(task)
                self.fed.samples(task, exact=self.demo_data).check(report)
            except ValueError as e:
                raise Rejection(422, "invalid", str(e)) from None
            reason = st.guard.admit(report)
            if reason is not None:
                raise Rejection(409, "replay" if reason.startswith("replay") else "duplicate", reason)
            st.reports[device.client] = report
            self.watch.reported(device.client)
            self.accepted_total += 1
            self.cond.notify_all()
            return {"accepted": True, "round": st.round, "client": device.client,
                    "reports": len(st.reports), "tasks": len(st.tasks)}

    def weights(self, version: str) -> bytes:
        st = self.current
        if st is None or st.version != version:
            raise Rejection(404, "unknown-version", f"no weights with model version {version!r} are served "
                            f"(current: {st.version if st else 'none'})")
        return st.weights

    def int_weights(self, version: str, base: str | None) -> tuple[bytes, str, str]:
        """``GET /v1/weights/{version}/int8``: (zlib body, sha256 of the integers, the base used or "none")."""
        with self.cond:
            ints = self.int_payloads.get(version)
            if ints is None:
                st = self.current
                raise Rejection(404, "unknown-version", f"no integers of model version {version!r} are served "
                                f"(current: {st.version if st and st.ints is not None else 'none'})")
            old = self.int_payloads.get(base) if base and base != version else None
            used = base if old is not None else "none"
            key = ("ints", version, used)
            if key not in self.packed:
                self.packed[key] = downloads.deflate(ints if old is None else downloads.byte_delta(ints, old))
            return self.packed[key], downloads.digest(ints), used

    def bundle_file(self, generation: int, name: str, *, packed: bool = False,
                    base: int | None = None) -> tuple[bytes, str, str]:
        """A bundle file: (body, sha256 of the file, encoding): ``identity``, or with ``packed`` ``zlib``, or
        ``zlib-dict:G`` when generation ``base`` (still served) has the same file as the dictionary."""
        snap = self.bundles.get(generation)
        if snap is None:
            raise Rejection(404, "unknown-bundle", f"bundle generation {generation} is not served "
                            f"(current: {max(self.bundles) if self.bundles else 'none'})")
        if name not in snap.files:
            raise Rejection(404, "unknown-file", f"bundle generation {generation} has no file {name!r}")
        data = snap.files[name]
        if not packed and base is None:
            return data, snap.sha256[name], "identity"
        old = self.bundles.get(base) if base is not None and base != generation else None
        zdict = old.files.get(name) if old is not None else None
        encoding = f"zlib-dict:{base}" if zdict is not None else "zlib"
        with self.cond:
            key = ("bundle", (generation, name), encoding)
            if key not in self.packed:
                self.packed[key] = downloads.deflate(data, zdict)
            return self.packed[key], snap.sha256[name], encoding

    def batches(self, device: Device, round_: int):
        """Demo only: the device's batches of the open round, from the server's dataset."""
        if not self.demo_data:
            raise Rejection(404, "no-demo-data", "this server does not hand out data (start it with "
                            "--demo-data); a real device trains on its own data")
        st = self.current
        if st is None or st.closed or st.round != round_ or device.client not in st.tasks:
            raise Rejection(409, "stale", f"round {round_ + 1} is not open for client {device.client}")
        return self.fed.batches(device.client, round_)

    def status(self, *, since: int = 0, limit: int = 1000) -> dict:
        """The public state of the run (``/v1/status``): ``history`` holds the finished rounds after round
        ``since`` (at most ``limit``), so a page polls only what is new."""
        with self.cond:
            st = self.current
            state = ("done" if self.finished else "waiting" if st is None else "closed" if st.closed else "open")
            return {"state": state, "round": None if st is None else st.round + 1, "rounds": self.cfg.rounds,
                    "clients": self.cfg.clients,
                    "reports": 0 if st is None else len(st.reports), "tasks": 0 if st is None else len(st.tasks),
                    "deadline_in": None if st is None or st.deadline is None or st.closed
                    else round(max(0.0, st.deadline - time.monotonic()), 3),
                    "accepted_total": self.accepted_total, "rejected_total": sum(self.rejected_by_kind.values()),
                    "rejected_reports": self.refused_reports,
                    "rejected_by_kind": dict(self.rejected_by_kind), "devices_seen": len(self.devices_seen),
                    "round_seconds": None if st is None or st.closed else self.watch.round_seconds(),
                    "round_timeout": self.cfg.round_timeout, "eval_every": self.cfg.eval_every,
                    "slots": self.watch.slots(), "notices": [n.to_json() for n in self.watch.notices],
                    "history": self.watch.history_since(since, limit)}

    def summary(self) -> dict:
        """The gateway's record of the run (``OUT/gateway.json``, metrics.json ``gateway``)."""
        with self.cond:
            return {"requests": dict(self.requests), "accepted_reports": self.accepted_total,
                    "refused_reports": self.refused_reports,
                    "refused_requests": sum(self.rejected_by_kind.values()),
                    "rejected_by_kind": dict(self.rejected_by_kind),
                    "rejections": list(self.rejection_log), "devices_seen": sorted(self.devices_seen)}

    def write_log(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / ".gateway.json.tmp"
        tmp.write_text(json.dumps(self.summary(), indent=1))
        os.replace(tmp, self.out_dir / "gateway.json")


def _log_stderr(line: str) -> None:
    print(f"baffle-edge serve: {line}", file=sys.stderr, flush=True)
