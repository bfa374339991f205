"""``baffle-edge serve``, ``baffle-edge tokens issue|revoke|list`` and ``baffle-edge device``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import cmd_serve as serve  # FastAPI/uvicorn load only when serving
    return serve(a)


def cmd_tokens_issue(a: argparse.Namespace) -> int:
    from .tokens import issue
    if (a.client is None) == (a.clients is None):
        raise ValueError("give --client C (one device) or --clients N (devices for clients 0..N-1)")
    if a.out is not None and a.out_dir is not None:
        raise ValueError("give --out FILE or --out-dir DIR, not both")
    if a.clients is not None:
        if a.out_dir is None:
            raise ValueError("--clients N writes N token files: give --out-dir DIR" +
                             (" (--out FILE is for one --client C)" if a.out else ""))
        if a.name is not None:
            raise ValueError("--name names one device: use it with --client C (--clients N names them client-<c>)")
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for c in range(a.clients):
            name, token = issue(a.tokens, c, replace=a.replace)
            _write_secret(out / f"{name}.token", token)
        print(f"issued {a.clients} tokens (clients 0..{a.clients - 1}) -> {out}/client-<c>.token; "
              f"hashes in {a.tokens}")
        return 0
    name, token = issue(a.tokens, a.client, name=a.name, replace=a.replace)
    out = Path(a.out) if a.out else Path(a.out_dir) / f"{name}.token" if a.out_dir else None
    if out is not None:
        _write_secret(out, token)
        print(f"issued a token for device {name!r} (client {a.client}) -> {out}")
    else:
        print(token)  # shown once: only its hash is stored
    return 0


def _write_secret(path: Path, token: str) -> None:
    import os
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def cmd_tokens_revoke(a: argparse.Namespace) -> int:
    from .tokens import revoke
    for name in a.names:
        revoke(a.tokens, name)
    print(f"revoked {', '.join(a.names)} (a running server stops accepting them within a second)")
    return 0


def cmd_tokens_list(a: argparse.Namespace) -> int:
    from .tokens import listing
    rows = listing(a.tokens)
    print(f"{'device':<24} {'client':>6}  {'issued':<21} state")
    for r in rows:
        print(f"{r['name']:<24} {r['client']:>6}  {r['issued']:<21} {'revoked' if r['revoked'] else 'live'}")
    return 0


def cmd_device(a: argparse.Namespace) -> int:
    from .device import DeviceConfig, read_token, run_device
    token = read_token(a.token)
    dc = DeviceConfig(server=a.server, token=token, runtime=a.runtime, data=a.data, cafile=a.cafile,
                      upload=a.upload, download=a.download, patience=a.patience, threads=a.threads, max_tasks=a.max_tasks)
    log = (lambda s: None) if a.quiet else (lambda s: print(f"device: {s}", file=sys.stderr, flush=True))
    s = run_device(dc, log=log)
    print(f"device: {s.answered} reports accepted, {len(s.refused)} refused")
    return 0


def add_parser(subparsers) -> None:
    from ..train_options import add_train_args
    p = subparsers.add_parser("serve", help="the reference server over HTTP for real devices (pip install "
                                            "'baffle-edge[serve]')",
                              description="Run the training schedule with remote devices as the clients: they "
                                          "fetch tasks and post loss scalars over HTTP(S). Same training options as "
                                          "`train`; see docs/gateway.md. Writes OUT/metrics.json, checkpoint.pt, "
                                          "gateway.json.")
    add_train_args(p)
    p.set_defaults(round_timeout=120.0)
    g = p.add_argument_group("gateway")
    g.add_argument("--tokens", required=True, help="the token file `baffle-edge tokens issue --tokens FILE` wrote "
                                                 "(hashes only; not a device's .token file)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 = all)")
    g.add_argument("--port", type=int, default=8080, help="TCP port, 0 = any free one (default: 8080)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate: serve HTTPS (with --tls-key)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--rate-limit", type=float, default=20.0, help="requests/s per device (default: 20)")
    g.add_argument("--burst", type=int, default=40, help="requests a device may send at once (default: 40)")
    g.add_argument("--max-poll", type=float, default=30.0, help="longest task long-poll, seconds (default: 30)")
    g.add_argument("--max-report-bytes", type=int, default=None,
                   help="largest report body (default: ~40 bytes per loss value + 64 KiB)")
    g.add_argument("--demo-data", action="store_true",
                   help="DEMO ONLY: hand each device its batches of the server's dataset (real devices train on "
                        "their own data)")
    g.add_argument("--web", default=None, metavar="DIR", help="serve DIR/index.html at / (the browser client)")
    g.add_argument("--linger", type=float, default=5.0,
                   help="seconds to keep telling devices 'done' after the last round (default: 5)")
    g.add_argument("--idle-timeout", type=float, default=10.0,
                   help="close a connection that has not sent a complete request head this many seconds after "
                        "opening or after its last response (default: 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="close a connection whose request body is not complete this many seconds after its head "
                        "(default: 30; recorded as an 'aborted' refusal)")
    g.add_argument("--max-idle-connections", type=int, default=1024,
                   help="most connections waiting for a request head; beyond it the longest-waiting is closed, so "
                        "idle sockets cannot lock devices out (default: 1024)")
    g.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="HTTP server log level (default: warning)")
    p.set_defaults(func=cmd_serve, command="serve")

    t = subparsers.add_parser("tokens", help="issue, revoke and list device tokens for `serve`",
                              description="Device bearer tokens. The token file stores only SHA-256 hashes; "
                                          "a token is shown (or written) once, at issue time.")
    sub = t.add_subparsers(dest="tokens_command", metavar="TOKENS_COMMAND", required=True)
    i = sub.add_parser("issue", help="new token(s): one device per client slot")
    i.add_argument("--tokens", required=True, help="token file (created if missing)")
    i.add_argument("--client", type=int, default=None, help="the client slot this device answers for")
    i.add_argument("--clients", type=int, default=None, help="issue tokens for clients 0..N-1 (with --out-dir)")
    i.add_argument("--name", default=None, help="device name (default: client-<c>)")
    i.add_argument("--out", default=None, help="write the token to this file (mode 0600) instead of printing it")
    i.add_argument("--out-dir", default=None, help="write DIR/<name>.token (client-<c>.token by default) instead of printing")
    i.add_argument("--replace", action="store_true", help="revoke the slot's live token and issue a new one")
    i.set_defaults(func=cmd_tokens_issue, command="tokens issue")
    r = sub.add_parser("revoke", help="revoke devices by name (takes effect on a running server)")
    r.add_argument("--tokens", required=True)
    r.add_argument("names", nargs="+", metavar="NAME")
    r.set_defaults(func=cmd_tokens_revoke, command="tokens revoke")
    s = sub.add_parser("list", help="devices, client slots, live or revoked")
    s.add_argument("--tokens", required=True)
    s.set_defaults(func=cmd_tokens_list, command="tokens list")

    _add_device_parser(subparsers)


def _add_device_parser(subparsers) -> None:
    d = subparsers.add_parser("device", help="a device over HTTP: answer a `serve` run's tasks on any runtime",
                              description="Fetch tasks from a `baffle-edge serve` server, evaluate the perturbed "
                                          "losses with `client.run_task` on a registered runtime and post them.")
    d.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    d.add_argument("--token", required=True, help="this device's token file (DIR/client-N.token from `baffle-edge tokens "
                                                "issue --out-dir DIR`; not the server's tokens.json)")
    d.add_argument("--runtime", default=None, help="runtime (default: the run's); see `baffle-edge runtimes`")
    d.add_argument("--data", default=None, help=".npz with x (N,C,H,W) float32 and y (N,) (default: the server's "
                                                 "demo data, if it hands it out)")
    d.add_argument("--cafile", default=None, help="CA certificate (PEM) to trust for an https server")
    d.add_argument("--upload", default="auto", choices=["auto", "compact", "npz", "json"],
                   help="report encoding: compact (16-bit loss differences, docs/gateway.md 'Compact reports'), npz or "
                        "json (float64 losses); auto = the run's --report-encoding (default: %(default)s)")
    d.add_argument("--download", default="lean", choices=["lean", "full"],
                   help="lean: an int8 device fetches the round's integers (a zlib delta against the last round's) "
                        "and only the bundle files it loads, zlib against the generation it holds; full: float32 "
                        "weights and every bundle file as stored (docs/gateway.md, 'Lean downloads') (default: %(default)s)")
    d.add_argument("--patience", type=float, default=120.0,
                   help="seconds to keep retrying an unreachable server (default: 120)")
    d.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    d.add_argument("--max-tasks", type=int, default=None, help="stop after this many accepted reports")
    d.add_argument("--quiet", action="store_true", help="no per-round log on stderr")
    d.set_defaults(func=cmd_device, command="device")
