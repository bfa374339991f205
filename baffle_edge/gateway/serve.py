"""``baffle-edge serve``: the reference training loop with devices over HTTP as the clients.

The training thread runs ``simulate.train`` with a ``Board`` as its ``gather`` hook; uvicorn serves
the API on the main thread. The listening socket is bound before training starts (a busy port is
a clear error, ``--port 0`` picks a free one and the first line printed names it).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..simulate import Method, TrainConfig, train
from .board import Board, GatewayStopped
from .connections import ConnectionLimits, guarded_protocol
from .tokens import TokenStore

try:
    import uvicorn

    from .app import create_app
except ImportError as e:  # optional extra
    _SERVE_ERROR: ImportError | None = ImportError(
        f"the device gateway needs FastAPI and uvicorn ({e}); install them with: pip install 'baffle-edge[serve]'")
else:
    _SERVE_ERROR = None


def require_serve() -> None:
    if _SERVE_ERROR is not None:
        raise _SERVE_ERROR


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway listens and polices devices (the training itself is a TrainConfig)."""

    tokens: str  # token file (`baffle-edge tokens issue`): hashed bearer tokens -> client slots
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 to accept devices on the network
    port: int = 8080  # 0: any free port (printed)
    tls_cert: str | None = None  # PEM certificate (chain); with tls_key: serve HTTPS
    tls_key: str | None = None
    rate: float = 20.0  # requests per second per device (token bucket; a round needs ~5)
    burst: int = 40  # requests a device may send at once before the rate applies
    max_poll: float = 30.0  # longest a GET /v1/task long poll is held (seconds)
    max_report_bytes: int | None = None  # None: ~40 bytes per loss value + 64 KiB (app.report_limit)
    demo_data: bool = False  # hand each device its batches from the server's dataset (demo only)
    web_dir: str | None = None  # serve this folder's index.html at / (the browser client)
    linger: float = 5.0  # seconds the server keeps answering "done" after the last round
    idle_timeout: float = 10.0  # s a connection may wait before sending a complete request head (connections.py)
    body_timeout: float = 30.0  # s a request body may take after its head
    max_idle_connections: int = 1024  # connections waiting for a request head; beyond: the longest-waiting closed
    log_level: str = "warning"  # uvicorn's log level

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both --tls-cert and --tls-key (or neither)")
        for f in (self.tls_cert, self.tls_key):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"TLS file {f} does not exist")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.rate > 0 or self.burst < 1 or not self.max_poll > 0 or self.linger < 0:
            raise ValueError(f"need rate > 0, burst >= 1, max_poll > 0, linger >= 0; got {self.rate}, {self.burst}, "
                             f"{self.max_poll}, {self.linger}")
        if self.max_report_bytes is not None and self.max_report_bytes < 1024:
            raise ValueError(f"max_report_bytes must be >= 1024, got {self.max_report_bytes}")
        self.limits()  # ValueError naming a bad timeout or cap

    def limits(self) -> ConnectionLimits:
        return ConnectionLimits(idle_timeout=self.idle_timeout, body_timeout=self.body_timeout,
                                max_idle=self.max_idle_connections)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, gw: GatewayConfig):
    """uvicorn's settings for the gateway and the ``ConnectionGuard`` enforcing ``gw.limits()``: idle and
    body timeouts and the idle cap replace uvicorn's ``limit_concurrency``, which counted idle sockets
    (a flood of them made every device's request a 503)."""
    protocol, guard = guarded_protocol(gw.limits())
    return uvicorn.Config(app, ssl_certfile=gw.tls_cert, ssl_keyfile=gw.tls_key, log_level=gw.log_level,
                          access_log=False, http=protocol, timeout_keep_alive=gw.idle_timeout,
                          limit_concurrency=None), guard


def serve(cfg: TrainConfig, gw: GatewayConfig, out: str | Path, *, resume: bool = False,
          progress: bool = True, announce=print) -> dict:
    """Run the training schedule with devices over HTTP; return the metrics (as ``train``)."""
    require_serve()
    if cfg.method is not Method.BAFFLE:
        raise ValueError("serve runs BAFFLE rounds (devices upload loss scalars); --method bp is in-process only")
    from baffle_edge.config import run_choices
    run_choices(cfg)  # a typo'd runtime or clashing options are refused before the server listens
    out = Path(out)
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue it or choose another --out")
    tokens = TokenStore(gw.tokens)
    if not tokens.devices():
        raise ValueError(f"token file {gw.tokens} has no live device token; issue some with "
                         f"`baffle-edge tokens issue --tokens {gw.tokens} --clients {cfg.clients} --out-dir DIR`")
    board = Board(cfg, out_dir=out, demo_data=gw.demo_data)
    app = create_app(board, tokens, rate=gw.rate, burst=gw.burst, max_poll=gw.max_poll,
                     max_report_bytes=gw.max_report_bytes, web_dir=gw.web_dir)
    sock = bind(gw.host, gw.port)
    port = sock.getsockname()[1]
    scheme = "https" if gw.tls_cert else "http"
    config, guard = uvicorn_config(app, gw)
    server = uvicorn.Server(config)
    result: dict = {}

    def training() -> None:
        try:
            result["metrics"] = train(cfg, out, resume=resume, progress=progress, gather=board,
                                      on_round=board.round_done)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread after uvicorn stops
            result["error"] = e
        finally:
            board.finish()
            linger = gw.linger if "metrics" in result else 0.0  # let polling devices hear "done"
            deadline = time.monotonic() + linger
            while time.monotonic() < deadline and not server.should_exit:
                time.sleep(0.05)
            server.should_exit = True

    announce(f"baffle-edge serve: listening on {scheme}://{gw.host}:{port} ({cfg.clients} client slots, "
             f"{cfg.rounds} rounds, runtime {cfg.runtime}) -> {out}")
    sys.stdout.flush()
    worker = threading.Thread(target=training, name="training", daemon=True)
    worker.start()
    try:
        server.run(sockets=[sock])
    finally:
        board.stop("the server is shutting down")
        worker.join(timeout=30)
        sock.close()
    if "error" in result:
        e = result["error"]
        if isinstance(e, GatewayStopped):
            raise KeyboardInterrupt(str(e))
        raise e
    if "metrics" not in result:
        raise KeyboardInterrupt("the server stopped before training finished")
    metrics = result["metrics"]
    metrics["gateway"] = {**board.summary(), "connections_closed": dict(guard.closed)}
    board.write_log()
    path = out / "metrics.json"
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, path)
    return metrics


def gateway_config_from_args(a) -> GatewayConfig:
    return GatewayConfig(tokens=a.tokens, host=a.host, port=a.port, tls_cert=a.tls_cert, tls_key=a.tls_key,
                         rate=a.rate_limit, burst=a.burst, max_poll=a.max_poll, max_report_bytes=a.max_report_bytes,
                         demo_data=a.demo_data, web_dir=a.web, linger=a.linger, log_level=a.log_level,
                         idle_timeout=a.idle_timeout, body_timeout=a.body_timeout,
                         max_idle_connections=a.max_idle_connections)


def cmd_serve(a) -> int:
    from ..train_options import config_from_args
    require_serve()
    cfg = config_from_args(a)
    gw = gateway_config_from_args(a)
    out = Path(a.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-serve-{cfg.model}-{cfg.dataset}")
    m = serve(cfg, gw, out, resume=a.resume, progress=not a.no_progress)
    f, g = m["final"], m["gateway"]
    print(f"serve: test accuracy {100 * (f['test_accuracy'] or 0):.2f}% after {f['rounds_done']} rounds; "
          f"{g['accepted_reports']} reports accepted, {g['refused_reports']} refused ({f['rejected_reports']} "
          f"rejected in rounds), {g['refused_requests']} requests refused in all, {f['absent_reports']} absent -> {out}")
    return 0


__all__ = ["GatewayConfig", "cmd_serve", "serve", "uvicorn_config"]
