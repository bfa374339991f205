"""A device over HTTP: fetch the task, answer it (``baffle_edge.device``) on any registered runtime, post
the losses. The Python counterpart of the TypeScript client (clients/js/src/gateway.ts).

    loop:
        GET  /v1/task?wait=25        -> task | wait | done
        GET  /v1/weights/{version}   float32, checked against the task's model_version (sha256)
        GET  /v1/bundle/{gen}/...    int8 runtimes: every file checked against its sha256
        data: own .npz (x, y), or GET /v1/data/{round} when the server is a --demo-data server
        device.answer(...) -> POST /v1/report (NPZ or JSON)

A server that is unreachable (restarting with --resume, say) or busy (503 while the gateway sheds a
connection flood, any 5xx) is retried for ``patience`` seconds with capped exponential backoff and
jitter (``backoff``; a 503's ``Retry-After`` is honoured, up to the cap), so devices that retry
together do not return together; 429 answers are retried after ``Retry-After``; 401/403 are fatal.
"""
from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import compact, downloads
from ..client import Batch
from ..device import (DeviceSettings, SessionCache, answer, check_integers, model_artifact, open_session,
                      task_batches)
from ..errors import CommandError
from ..protocol import ClientReport, RoundTask, model_version
from .tokens import parse_device_token


UPLOADS = ("auto", "compact", "npz", "json")  # DeviceConfig.upload: how reports are sent
BACKOFF_BASE = 0.2  # s: the first retry's delay
BACKOFF_CAP = 5.0  # s: the longest delay between two retries


def backoff(attempt: int, rng: random.Random, *, retry_after: float | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential from BACKOFF_BASE, capped at
    BACKOFF_CAP, with "equal jitter" (uniform in [d/2, d]); a server's ``Retry-After`` raises the
    floor (never past the cap)."""
    d = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt, 30))
    if retry_after is not None:
        d = min(BACKOFF_CAP, max(d, retry_after))
    return rng.uniform(d / 2, d)


NO_DATA = ("the server hands out no data (not a --demo-data server): pass --data FILE.npz (arrays x (N, C, H, W) "
           "float32 and y (N,)), or start the server with --demo-data")


class DeviceError(CommandError, RuntimeError):
    """The server refused this device for good (bad token, wrong slot) or stayed unreachable."""


@dataclass(frozen=True)
class DeviceConfig:
    server: str  # base URL, e.g. https://gateway.example:8443
    token: str  # this device's bearer token
    runtime: str | None = None  # None: the run's runtime
    data: str | None = None  # .npz with x (N, C, H, W) float32 normalised and y (N,) labels; None: server demo data
    cafile: str | None = None  # PEM CA bundle to verify the server's TLS certificate (self-signed servers)
    download: str = "lean"  # lean: int8 devices fetch integers + only the bundle files they load, zlib | full
    upload: str = "auto"  # auto (the run's report_encoding: compact, else npz) | compact | npz | json
    patience: float = 120.0  # seconds the server may stay unreachable before the device gives up
    poll: float = 25.0  # long-poll length of GET /v1/task
    threads: int | None = None  # runtime threads (None: the runtime's default)
    max_tasks: int | None = None  # stop after answering this many tasks (None: until the run is done)

    def __post_init__(self):
        if self.download not in ("lean", "full"):
            raise ValueError(f"download must be lean or full, got {self.download!r}")
        if self.upload not in UPLOADS:
            raise ValueError(f"upload must be one of {', '.join(UPLOADS)}, got {self.upload!r}")
        if not self.server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s):// URL, got {self.server!r}")


@dataclass
class DeviceSummary:
    answered: int = 0  # reports the server accepted
    refused: list[str] = field(default_factory=list)  # reasons of reports the server refused
    rounds: list[int] = field(default_factory=list)  # 0-based rounds answered


class Device:
    def __init__(self, dc: DeviceConfig, *, log: Callable[[str], None] = lambda s: None):
        import httpx
        self.dc, self.log = dc, log
        self.own = self._load_own(dc.data) if dc.data else None  # first: a bad file leaves nothing open
        import ssl
        verify = ssl.create_default_context(cafile=dc.cafile) if dc.cafile else True
        self.http = httpx.Client(base_url=dc.server.rstrip("/"), verify=verify,
                                 headers={"Authorization": f"Bearer {dc.token}"},
                                 timeout=httpx.Timeout(30.0, read=dc.poll + 30.0))
        self._httpx = httpx
        self.config: dict | None = None
        self.sessions = SessionCache()
        self.weights_cache: tuple[str, np.ndarray] | None = None
        self.ints_cache: tuple[str, bytes] | None = None  # (model version, integers) of the last int8 download
        self.bundle_bytes: tuple[int | None, dict[str, bytes]] = (None, {})  # the generation held, its files
        self.cache_dir = Path(tempfile.mkdtemp(prefix="baffle-device-"))
        self.rng = random.Random()  # backoff jitter: devices that retry together do not return together

    def close(self) -> None:
        self.http.close()
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    # --- transport ---
    def request(self, method: str, url: str, **kw):
        """One request, retried while the server is unreachable, restarting (5xx) or rate-limiting."""
        give_up = time.monotonic() + self.dc.patience
        attempt = 0
        while True:
            retry_after = None
            try:
                r = self.http.request(method, url, **kw)
            except (self._httpx.LocalProtocolError, self._httpx.UnsupportedProtocol) as e:
                raise DeviceError(f"cannot send {method} {url} to {self.dc.server} ({type(e).__name__}: "
                                  f"{str(e)[:120]}): a client-side mistake, not the server; check --server and --token")
            except self._httpx.TransportError as e:
                if "CERTIFICATE_VERIFY_FAILED" in str(e):
                    raise DeviceError(f"{self.dc.server}: the server's TLS certificate is not trusted ({e}); pass "
                                      "--cafile CERT.pem (the certificate the server was started with, or its CA)")
                reason = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 429:
                    time.sleep(min(10.0, _seconds(r.headers.get("retry-after"), 1.0)))
                    continue
                if r.status_code < 500:
                    return r
                reason, retry_after = f"HTTP {r.status_code}", _seconds(r.headers.get("retry-after"), None)
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise DeviceError(f"server {self.dc.server} unreachable for {self.dc.patience:.0f} s ({reason})")
            delay = min(remaining, backoff(attempt, self.rng, retry_after=retry_after))
            self.log(f"server unreachable or busy ({reason}); retry {attempt + 1} in {delay:.1f} s")
            time.sleep(delay)
            attempt += 1

    def _check(self, r, what: str):
        if r.status_code in (401, 403):
            raise DeviceError(f"{what}: HTTP {r.status_code} {_reason(r)}: {_refusal_hint(r)}")
        if r.status_code >= 400:
            raise ValueError(f"{what}: HTTP {r.status_code}: {_reason(r)}")
        return r

    # --- what a round needs ---
    def weights(self, offer: dict) -> np.ndarray:
        w = offer["weights"]
        if self.weights_cache is not None and self.weights_cache[0] == w["version"]:
            return self.weights_cache[1]
        r = self._check(self.request("GET", w["url"]), "weights")
        arr = np.frombuffer(r.content, dtype="<f4").copy()
        got = model_version(arr)
        if arr.size != w["count"] or got != w["version"]:
            raise ValueError(f"weights: {arr.size} values hashing to {got}, the task names {w['count']} / {w['version']}")
        self.weights_cache = (w["version"], arr)
        return arr

    def integers(self, offer: dict, session) -> list[np.ndarray]:
        """An int8 device's download (docs/gateway.md, "Lean downloads"): the round's integers, a zlib delta
        against the version it ran last, checked against the sha256 the offer binds to the model version."""
        w, spec = offer["weights"], offer["weights"]["int8"]
        base = self.ints_cache
        params = {"base": base[0]} if base is not None else {}
        r = self._check(self.request("GET", spec["url"], params=params), "integers")
        used = r.headers.get("x-baffle-base", "none")
        if used != "none" and (base is None or used != base[0]):
            raise ValueError(f"integers: the server sent a delta against {used!r}, this device holds "
                             f"{base[0] if base else 'nothing'!r}")
        raw = downloads.inflate(r.content, size=int(spec["bytes"]))
        payload = raw if used == "none" else downloads.apply_delta(raw, base[1])
        qs = check_integers(payload, spec["sha256"], session)
        self.ints_cache = (w["version"], payload)
        return qs

    def bundle(self, offer: dict, needed: Callable[[dict], list[str]] | None = None) -> Path:
        """The round's bundle folder: ``baffle.json`` and the files the runtime loads (``needed(meta)``;
        default: every file), each a zlib stream against the generation held (or plain zlib), sha256-checked."""
        b = offer["bundle"]
        folder = self.cache_dir / f"bundle-{b['generation']}"
        if folder.exists():
            return folder
        held_gen, held = self.bundle_bytes
        tmp = self.cache_dir / f".bundle-{b['generation']}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        got: dict[str, bytes] = {}

        def fetch(name: str) -> bytes:
            f = b["files"].get(name)
            if f is None or "/" in name or name.startswith("."):
                raise ValueError(f"bundle: refusing file name {name!r}")
            base = {"base": held_gen} if name in held else {"z": 1}
            r = self._check(self.request("GET", f["url"], params=base if "bytes" in f and self.dc.download == "lean" else {}), f"bundle file {name}")
            enc = r.headers.get("x-baffle-encoding", "identity")
            if enc == "identity":
                data = r.content
            elif enc in ("zlib", f"zlib-dict:{held_gen}"):
                data = downloads.inflate(r.content, size=int(f["bytes"]), zdict=held.get(name) if enc != "zlib" else None)
            else:
                raise ValueError(f"bundle file {name}: unexpected encoding {enc!r}")
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise ValueError(f"bundle file {name}: sha256 does not match the task's ({f['sha256'][:12]})")
            got[name] = data
            (tmp / name).write_bytes(data)
            return data

        meta = json.loads(fetch("baffle.json"))
        for name in (needed(meta) if needed is not None else [n for n in b["files"] if n != "baffle.json"]):
            fetch(name)
        for old in self.cache_dir.glob("bundle-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(folder)
        self.bundle_bytes = (b["generation"], got)
        return folder

    def settings(self) -> DeviceSettings:
        """The run's device settings (``/v1/config``'s train config), with this device's runtime and threads."""
        return DeviceSettings.from_json(self.config["train_config"], runtime=self.dc.runtime, threads=self.dc.threads)

    def batches(self, offer: dict, task: RoundTask, settings: DeviceSettings) -> list[Batch]:
        if self.own is not None:
            return task_batches(*self.own, task, settings)
        if offer.get("data") is None:
            raise DeviceError(NO_DATA)
        d = self._check(self.request("GET", offer["data"]), "data").json()
        return [Batch(np.frombuffer(base64.b64decode(b["x"]), dtype="<f4").reshape(b["shape"]).astype(np.float32),
                      np.asarray(b["y"], dtype=np.int64)) for b in d["batches"]]

    def load_session(self, offer: dict, settings: DeviceSettings):
        info, run_runtime = settings.info, self.config["train_config"]["runtime"]
        if info.artifact != "bundle":
            key = (settings, None)
            return self.sessions.get(key, lambda: open_session(settings, model_artifact(settings, self.config["model"])))
        if offer["bundle"] is None:
            raise DeviceError(f"runtime {settings.runtime!r} needs a bundle, but the run's runtime "
                              f"{run_runtime!r} does not export one; use --runtime {run_runtime}")
        if offer["bundle"]["format"] != info.format:
            raise DeviceError(f"runtime {settings.runtime!r} reads {info.format} bundles; the server exports "
                              f"{offer['bundle']['format']}")
        key = (settings, offer["bundle"]["generation"])
        return self.sessions.get(key, lambda: open_session(settings, self.bundle(
            offer, runtime_files(info.format) if self.dc.download == "lean" else None)))

    @staticmethod
    def _load_own(path: str) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise ValueError(f"{path}: expected arrays 'x' (N, C, H, W) and 'y' (N,)")
            x, y = np.asarray(z["x"], dtype=np.float32), np.asarray(z["y"], dtype=np.int64)
        if x.ndim != 4 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"{path}: x must be (N, C, H, W) and y (N,), got {x.shape} and {y.shape}")
        return x, y

    # --- the loop ---
    def answer(self, offer: dict) -> ClientReport:
        if self.config["model"] is None:  # fetched before the server had set its run up
            self.config = self._check(self.request("GET", "/v1/config"), "config").json()
        task = RoundTask.from_dict(offer["task"])
        try:
            settings = self.settings()
        except ValueError as e:  # an unknown --runtime, or a config this version cannot read
            raise DeviceError(str(e)) from None
        if settings.info.domain != task.domain.value:
            raise DeviceError(f"runtime {settings.runtime!r} perturbs in the {settings.info.domain} domain, the task "
                              f"in {task.domain.value}")
        session = self.load_session(offer, settings)
        if self.lean(offer, task, session):
            qs = self.integers(offer, session)
            return answer(task, session, self.batches(offer, task, settings), weights=None, integers=qs,
                          runtime=settings.runtime)
        weights = self.weights(offer)
        return answer(task, session, self.batches(offer, task, settings), weights=weights, runtime=settings.runtime)

    def lean(self, offer: dict, task: RoundTask, session) -> bool:
        """Download integers instead of float weights: an int8-step session, one local step, a server that
        offers them, and ``--download lean`` (the default)."""
        return (self.dc.download == "lean" and "int8" in offer["weights"] and task.local_steps == 1
                and getattr(session, "table", None) is not None and session.domain.value == "int8-step")

    def upload_kind(self) -> str:
        """compact, npz or json: ``--upload``, or for ``auto`` the run's ``report_encoding`` (an older
        server that does not publish one gets NPZ)."""
        if self.dc.upload != "auto":
            return self.dc.upload
        run = (self.config or {}).get("train_config", {}).get("report_encoding")
        return "compact" if run == compact.ReportEncoding.COMPACT.value else "npz"

    def post(self, report: ClientReport):
        kind = self.upload_kind()
        if kind == "compact":
            body, media = compact.encode(report), compact.MEDIA_TYPE
        elif kind == "npz":
            body, media = report.to_npz(), "application/x-npz"
        else:
            body, media = report.to_json().encode(), "application/json"
        return self.request("POST", "/v1/report", content=body, headers={"Content-Type": media})

    def run(self) -> DeviceSummary:
        summary = DeviceSummary()
        self.config = self._check(self.request("GET", "/v1/config"), "config").json()
        if self.own is None and self.config.get("demo_data") is False:
            raise DeviceError(NO_DATA)
        self.log(f"device for client {self.config['client']} on {self.dc.server}")
        while self.dc.max_tasks is None or summary.answered < self.dc.max_tasks:
            offer = self._check(self.request("GET", "/v1/task", params={"wait": self.dc.poll}), "task").json()
            if offer["status"] == "done":
                break
            if offer["status"] != "task":
                continue
            try:
                report = self.answer(offer)
            except ValueError as e:  # a download that failed its check: the round goes on without us
                summary.refused.append(f"round {offer['round'] + 1}: {e}")
                self.log(f"round {offer['round'] + 1}: skipped ({e})")
                continue
            r = self.post(report)
            if r.status_code == 202:
                summary.answered += 1
                summary.rounds.append(report.round)
                self.log(f"round {report.round + 1}: report accepted")
            elif r.status_code in (401, 403):
                self._check(r, "report")
            else:
                summary.refused.append(f"round {report.round + 1}: HTTP {r.status_code} {_reason(r)}")
                self.log(f"round {report.round + 1}: report refused: HTTP {r.status_code} {_reason(r)}")
        return summary


def runtime_files(fmt: str) -> Callable[[dict], list[str]]:
    """The bundle files a runtime of format ``fmt`` loads: its format's graphs, without the standalone
    ``inference`` model when a ``train`` graph exists (docs and other formats are never loaded)."""
    return lambda meta: downloads.runtime_file_names(meta, fmt)


def _refusal_hint(r) -> str:
    """What to do about a 401 / 403 (docs/gateway.md, "Refusals")."""
    if r.status_code == 401:
        return ("this server does not know the token (unknown or revoked): pass the device-tokens/client-N.token that "
                "`baffle-edge tokens issue` wrote next to the server's --tokens file, or issue a new one with "
                "`baffle-edge tokens issue --tokens tokens.json --client N --replace --out FILE`")
    try:
        kind = r.json().get("error")
    except Exception:  # noqa: BLE001 - a proxy's error page
        kind = None
    if kind == "no-slot":
        return "the token's client slot is not part of this run: use a token for a client below the server's --clients"
    return "this token may answer only its own client slot's task: use the token issued for that slot"


def _seconds(header: str | None, default: float | None) -> float | None:
    """A ``Retry-After`` header in seconds (an HTTP date or garbage: ``default``)."""
    try:
        v = float(header)
    except (TypeError, ValueError):
        return default
    return v if 0 <= v < 3600 else default


def _reason(r) -> str:
    try:
        d = r.json()
        return f"{d.get('error')}: {d.get('reason')}"
    except Exception:  # noqa: BLE001 - not our JSON (a proxy's error page)
        return r.text[:200]


def run_device(dc: DeviceConfig, *, log: Callable[[str], None] = lambda s: None) -> DeviceSummary:
    dev = Device(dc, log=log)
    try:
        return dev.run()
    finally:
        dev.close()


def read_token(path: str) -> str:
    """The device token in file ``path``, checked (tokens.parse_device_token) before any request."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise FileNotFoundError(f"token file {Path(path).resolve()} does not exist: pass the file `baffle-edge tokens "
                                "issue --out-dir DIR` wrote (DIR/client-N.token) or `--out FILE`") from None
    except IsADirectoryError:
        raise ValueError(f"--token {path} is a folder: pass one of its client-N.token files") from None
    return parse_device_token(text, path)
