"""Device bearer tokens: issued once, stored only as their SHA-256, revocable.

A token file (JSON, written atomically, mode 0600) maps a device name to the client slot it
answers for and the hash of its token:

    {"version": 1, "devices": {"phone-3": {"client": 3, "sha256": "…", "issued": "2026-…Z",
                                           "revoked": false}}}

A token is 32 random bytes (``secrets.token_urlsafe``) with the prefix ``bfl_``: high-entropy, so
a plain SHA-256 is a safe verifier (no password stretching needed) and the file leaks nothing a
device could use. One live token per client slot: a client id keys the device's noise stream and
its task, so two devices must never answer for the same slot.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_PREFIX = "bfl_"
FILE_VERSION = 1
MAX_TOKEN_CHARS = 256


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Device:
    name: str  # the name given at issue time (unique in the file)
    client: int  # the client slot (task, noise stream, demo data shard) it answers for


class TokenStore:
    """The token file, re-read when it changes on disk (a revocation takes effect within
    ``reload_every`` seconds on a running server)."""

    def __init__(self, path: str | Path, *, reload_every: float = 1.0):
        self.path = Path(path)
        self.reload_every = reload_every
        self._lock = threading.Lock()
        self._by_hash: dict[str, Device] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._load()

    # --- file I/O ---
    @staticmethod
    def read(path: Path) -> dict:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"token file {path} does not exist; create it with "
                                    f"`baffle-edge tokens issue --tokens {path} --client 0`") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"token file {path}: not valid JSON ({e})") from None
        if text.strip().startswith(TOKEN_PREFIX):
            raise ValueError(f"{path} is a device token, not the server's token file: --tokens needs the tokens.json "
                             "that `baffle-edge tokens issue --tokens tokens.json ...` wrote (it holds only hashes)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"token file {path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("devices"), dict):
            raise ValueError(f"token file {path}: expected {{'version': {FILE_VERSION}, 'devices': {{...}}}}")
        for name, d in data["devices"].items():
            ok = (isinstance(d, dict) and isinstance(d.get("client"), int) and d["client"] >= 0
                  and isinstance(d.get("sha256"), str) and len(d["sha256"]) == 64)
            if not ok:
                raise ValueError(f"token file {path}: device {name!r} needs an integer 'client' >= 0 and a "
                                 "64-hex-digit 'sha256'")
        return data

    @staticmethod
    def write(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def _load(self) -> None:
        data = self.read(self.path)
        self._by_hash = {d["sha256"]: Device(name, d["client"]) for name, d in data["devices"].items()
                         if not d.get("revoked")}
        self._mtime = self.path.stat().st_mtime_ns

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_every:
            return
        self._checked = now
        try:
            if self.path.stat().st_mtime_ns != self._mtime:
                self._load()
        except (OSError, ValueError):
            pass  # a file being edited by hand: keep the last good set

    # --- lookups ---
    def authenticate(self, token: str | None) -> Device | None:
        """The device owning ``token``, or None (missing, malformed, unknown or revoked)."""
        if not token or len(token) > MAX_TOKEN_CHARS or not token.startswith(TOKEN_PREFIX):
            return None
        with self._lock:
            self._maybe_reload()
            # keyed by the hash of a high-entropy secret: a lookup's timing reveals nothing usable
            return self._by_hash.get(token_hash(token))

    def devices(self) -> list[Device]:
        with self._lock:
            return sorted(self._by_hash.values(), key=lambda d: (d.client, d.name))


SERVER_FILE_HINT = "use a device token file (device-tokens/client-N.token from `baffle-edge tokens issue --clients N " \
                   "--out-dir device-tokens`)"


def parse_device_token(text: str, source: str) -> str:
    """The bearer token in the text of a device token file, refused (ValueError naming the file and
    what to pass) before any request if it cannot be one: the server's token file, an empty file,
    characters an HTTP header cannot carry, or not a ``bfl_`` token."""
    token = text.strip()
    if not token:
        raise ValueError(f"token file {source} is empty; {SERVER_FILE_HINT}")
    if token.startswith("{"):
        try:
            is_store = isinstance(json.loads(token).get("devices"), dict)
        except (json.JSONDecodeError, AttributeError):
            is_store = False
        if is_store:
            raise ValueError(f"{source} is the server's tokens.json (token hashes), not a device token: "
                             f"{SERVER_FILE_HINT}")
    bad = next((c for c in token if not (0x21 <= ord(c) <= 0x7E)), None)
    if bad is not None:
        raise ValueError(f"token file {source} holds {bad!r}, which an HTTP header cannot carry: a device token is "
                         f"one line of letters, digits, '-' and '_'; {SERVER_FILE_HINT}")
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"token file {source} does not hold a baffle-edge device token (one line starting "
                         f"{TOKEN_PREFIX!r}, at most {MAX_TOKEN_CHARS} characters); {SERVER_FILE_HINT}")
    return token


def issue(path: str | Path, client: int, *, name: str | None = None, replace: bool = False) -> tuple[str, str]:
    """Add a device answering for ``client``; return (name, token). The token is shown once."""
    path = Path(path)
    if client < 0:
        raise ValueError(f"client must be >= 0, got {client}")
    data = TokenStore.read(path) if path.exists() else {"version": FILE_VERSION, "devices": {}}
    name = name or f"client-{client}"
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"device name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
    devices = data["devices"]
    live = [n for n, d in devices.items() if d["client"] == client and not d.get("revoked")]
    if name in devices and not devices[name].get("revoked") and not replace:
        raise ValueError(f"device {name!r} already has a live token; pass --replace to revoke it and issue a new one")
    if live and not replace:
        raise ValueError(f"client {client} already has a live token (device {live[0]!r}); pass --replace "
                         "to revoke it and issue a new one")
    for n in live:
        devices[n]["revoked"] = True
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    devices[name] = {"client": client, "sha256": token_hash(token), "revoked": False,
                     "issued": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    TokenStore.write(path, data)
    return name, token


def revoke(path: str | Path, name: str) -> None:
    path = Path(path)
    data = TokenStore.read(path)
    if name not in data["devices"]:
        raise ValueError(f"no device named {name!r} in {path}; known: {', '.join(sorted(data['devices'])) or 'none'}")
    data["devices"][name]["revoked"] = True
    TokenStore.write(path, data)


def listing(path: str | Path) -> list[dict]:
    data = TokenStore.read(Path(path))
    return [{"name": n, "client": d["client"], "issued": d.get("issued", ""), "revoked": bool(d.get("revoked"))}
            for n, d in sorted(data["devices"].items(), key=lambda kv: (kv[1]["client"], kv[0]))]
