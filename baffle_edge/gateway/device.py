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
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..client import Batch
from ..device import DeviceSettings, SessionCache, answer, model_artifact, open_session, task_batches
from ..errors import CommandError
from ..protocol import ClientReport, RoundTask, model_version
from .tokens import parse_device_token


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
    upload: str = "npz"  # npz | json
    patience: float = 120.0  # seconds the server may stay unreachable before the device gives up
    poll: float = 25.0  # long-poll length of GET /v1/task
    threads: int | None = None  # runtime threads (None: the runtime's default)
    max_tasks: int | None = None  # stop after answering this many tasks (None: until the run is done)

    def __post_init__(self):
        if self.upload not in ("npz", "json"):
            raise ValueError(f"upload must be npz or json, got {self.upload!r}")
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
        import ssl
        verify = ssl.create_default_context(cafile=dc.cafile) if dc.cafile else True
        self.http = httpx.Client(base_url=dc.server.rstrip("/"), verify=verify,
                                 headers={"Authorization": f"Bearer {dc.token}"},
                                 timeout=httpx.Timeout(30.0, read=dc.poll + 30.0))
        self._httpx = httpx
        self.config: dict | None = None
        self.sessions = SessionCache()
        self.weights_cache: tuple[str, np.ndarray] | None = None
        self.cache_dir = Path(tempfile.mkdtemp(prefix="baffle-device-"))
        self.own = self._load_own(dc.data) if dc.data else None
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

    def bundle(self, offer: dict) -> Path:
        b = offer["bundle"]
        folder = self.cache_dir / f"bundle-{b['generation']}"
        if folder.exists():
            return folder
        tmp = self.cache_dir / f".bundle-{b['generation']}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, f in b["files"].items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"bundle: refusing file name {name!r}")
            data = self._check(self.request("GET", f["url"]), f"bundle file {name}").content
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise ValueError(f"bundle file {name}: sha256 does not match the task's ({f['sha256'][:12]})")
            (tmp / name).write_bytes(data)
        for old in self.cache_dir.glob("bundle-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(folder)
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
        return self.sessions.get(key, lambda: open_session(settings, self.bundle(offer)))

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
        weights = self.weights(offer)
        session = self.load_session(offer, settings)
        return answer(task, session, self.batches(offer, task, settings), weights=weights, runtime=settings.runtime)

    def post(self, report: ClientReport):
        if self.dc.upload == "npz":
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
