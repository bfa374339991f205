"""The HTTP API (FastAPI): versioned endpoints a device uses to fetch its task and answer it.

    GET  /v1/config                  the run's public settings (model, runtime, bundle format)
    GET  /v1/task?wait=S             the device's task of the open round, or "wait" / "done" (long poll)
    GET  /v1/weights/{version}       the round's float32 weights, little-endian; ETag = model version
    GET  /v1/weights/{version}/int8  int8-step bundles: the integers the devices run, zlib (?base=VERSION: a
                                     delta against that version's); X-Sha256 = the integers' sha256
    GET  /v1/bundle/{gen}/{file}     a bundle file (int8 runtimes); ETag and X-Sha256 = its sha256; ?z=1 zlib,
                                     ?base=GEN zlib with that generation's file as the dictionary
    GET  /v1/data/{round}            demo only (--demo-data): the device's batches for the round
    POST /v1/report                  a ClientReport, compact (compact.py), JSON or NPZ -> 202, or 4xx with a reason
    GET  /v1/status?since=R          public: round progress, slots, absent devices' causes, finished rounds
    GET  /run                        public: the live page of the run (page.py), drawn from /v1/status

Every device endpoint needs ``Authorization: Bearer <token>``. Every refusal, whatever the handler
(a ``Rejection``, a 422 parameter error, an unknown route), is JSON ``{"error": kind, "reason": text}``
with a 4xx status and is recorded once by the ``Board`` (in the one exception handler).
docs/gateway.md describes the API and its threat model.
"""
# no "from __future__ import annotations": FastAPI reads the local Annotated aliases at runtime

import asyncio
import base64
import contextlib
import io
import time
import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import compact
from ..protocol import PROTOCOL_VERSION, ClientReport
from .board import Board, Rejection
from .page import add_pages
from .tokens import Device, TokenStore

API_VERSION = "1"
JSON_TYPES = ("application/json",)
NPZ_TYPES = ("application/x-npz", "application/octet-stream")
COMPACT_TYPES = (compact.MEDIA_TYPE,)
NPZ_MEMBERS = {"header.npy", "losses.npy", "base_losses.npy"}
UNKNOWN_ROUTE = "(unknown route)"  # the request-count key of every path no route serves
# what a device reads of the run's TrainConfig (device.DeviceSettings, gateway/device.py, clients/js gateway.ts)
DEVICE_CONFIG_FIELDS = ("runtime", "provider", "perturbations_per_call", "seed", "batch_size", "rounds", "clients",
                        "local_steps", "strategy", "method", "report_encoding")


class ReportJSON(BaseModel):
    """A ``ClientReport`` in JSON (protocol.py): loss scalars only, never a gradient."""

    round: int = Field(ge=0, le=2**32 - 1, description="0-based round index of the task")
    client: int = Field(ge=0, le=2**32 - 2, description="client id of the task (must be the token's client)")
    losses: list[float] = Field(description="local_steps x (K or 2K) perturbed losses, finite")
    base_losses: list[float] = Field(description="L(w) per local step (forward scheme), finite")
    num_samples: int = Field(ge=1, le=2**31, description="samples in the device's batch(es)")
    model_version: str = Field(max_length=256, description="the task's model_version (hash of the weights used)")
    runtime: str = Field("", max_length=256, description="runtime that produced the losses")
    seconds: float = Field(0.0, ge=0, description="device wall time for the task")
    version: int = Field(ge=PROTOCOL_VERSION, le=PROTOCOL_VERSION, description="protocol version")


class Problem(BaseModel):
    error: str = Field(description="kind: unauthenticated, wrong-device, stale, late, duplicate, replay, "
                                   "malformed, invalid, too-large, unsupported-media-type, rate-limited, ...")
    reason: str


PROBLEMS = {s: {"model": Problem} for s in (400, 401, 403, 404, 409, 413, 415, 422, 429)}


class RateLimiter:
    """Token bucket per device: ``rate`` requests per second on average, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, last refill time)

    def allow(self, key: str) -> float:
        """0 if the request may proceed, else the seconds to wait."""
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens - 1.0, now)
        return 0.0


def report_limit(cfg, k: int | None = None) -> int:
    """Default largest accepted report body: ~40 bytes per loss value as JSON, plus headroom. ``k``: the
    most perturbations a round of the run asks for (``Federation.k_bound``: a forward budget's K); None:
    the K the config sets without a budget (``config.run_choices``)."""
    if k is None:
        from baffle_edge.config import run_choices
        k = run_choices(cfg).k
    steps = cfg.local_steps if cfg.strategy == "fedavg" else 1
    per_step = k * (2 if getattr(cfg.scheme, "value", cfg.scheme) == "central" else 1) + 1
    return 64 * 1024 + 40 * steps * per_step


def check_npz(body: bytes) -> None:
    """Refuse an NPZ that is not what ``ClientReport.to_npz`` writes: only the three expected
    members, stored uncompressed (so a small upload cannot inflate into a huge array)."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            infos = z.infolist()
    except Exception as e:  # noqa: BLE001 - any parse error of an upload (NotImplementedError: "version needed")
        raise ValueError(f"report: not a valid NPZ file ({type(e).__name__}: {e})") from None
    names = {i.filename for i in infos}
    if len(infos) != len(names) or not names <= NPZ_MEMBERS:
        raise ValueError(f"report: NPZ members must be {sorted(NPZ_MEMBERS)}, got {sorted(names)[:5]}")
    if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > len(body) for i in infos):
        raise ValueError("report: NPZ members must be stored uncompressed (numpy.savez)")


def create_app(board: Board, tokens: TokenStore, *, rate: float = 20.0, burst: int = 40, max_poll: float = 30.0,
               max_report_bytes: int | None = None, web_dir: str | Path | None = None) -> FastAPI:
    """The API of the module docstring over ``board``, for the devices ``tokens`` authenticates."""
    def limit() -> int:  # the bound of the run's K is known once the board is bound to its Federation
        return max_report_bytes or report_limit(board.cfg, getattr(board.fed, "k_bound", None))
    wake = {"event": None}  # set when the board changes: long polls wake (one Event per change)
    app = FastAPI(title="baffle-edge device gateway", version=API_VERSION, lifespan=_lifespan(board, wake),
                  description="Fetch a BAFFLE round task, evaluate K perturbed losses on the device, post them "
                              "back. Loss scalars only travel up; see docs/gateway.md.")
    _add_error_handlers(app, board)
    authenticated = Annotated[Device, Depends(_authenticator(board, tokens, RateLimiter(rate, burst)))]
    _add_task_routes(app, board, authenticated, wake=wake, max_poll=max_poll, limit=limit)
    _add_download_routes(app, board, authenticated)
    _add_report_routes(app, board, authenticated, limit=limit)
    add_pages(app, board, web_dir, count=lambda request: board.requests.update([endpoint_of(request)]))
    return app


def endpoint_of(request: Request) -> str:
    """The route's path template (``/v1/weights/{version}``): the key of the board's request counts
    (``UNKNOWN_ROUTE`` for a path no route serves, so random paths do not grow the counts)."""
    route = request.scope.get("route")
    return getattr(route, "path", UNKNOWN_ROUTE)


def _lifespan(board: Board, wake: dict):
    """While the app runs, every board change sets ``wake["event"]`` (from any thread) and replaces it."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        wake["event"] = asyncio.Event()

        def pulse() -> None:
            old, wake["event"] = wake["event"], asyncio.Event()
            old.set()

        listener = lambda: loop.call_soon_threadsafe(pulse)
        board.listeners.append(listener)
        yield
        board.listeners.remove(listener)
    return lifespan


def _add_error_handlers(app: FastAPI, board: Board) -> None:
    """Every refusal as ``{"error": kind, "reason": text}``, recorded by the board (with the device,
    when the request was authenticated): the one place refusals are answered and counted."""
    def refuse(request: Request, rejection: Rejection) -> JSONResponse:
        board.record(getattr(request.state, "device", None), rejection, endpoint_of(request))
        return JSONResponse({"error": rejection.kind, "reason": rejection.reason}, status_code=rejection.status,
                            headers=rejection.headers)

    @app.exception_handler(Rejection)
    async def _refused(request: Request, exc: Rejection) -> JSONResponse:
        return refuse(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return refuse(request, Rejection(422, "malformed", errors[:500]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        board.requests[endpoint_of(request)] += 1  # no handler ran to count it
        kind = {404: "unknown-route", 405: "method-not-allowed"}.get(exc.status_code, f"http-{exc.status_code}")
        reason = f"{request.method} {request.url.path[:100]!r}: {exc.detail}"
        return refuse(request, Rejection(exc.status_code, kind, reason, headers=dict(exc.headers or {})))


def _authenticator(board: Board, tokens: TokenStore, limiter: RateLimiter):
    """The dependency of every device endpoint: a known, unrevoked token within its rate and slot."""
    cfg = board.cfg
    bearer = HTTPBearer(auto_error=False, description="a device token from `baffle-edge tokens issue`")

    async def device_of(request: Request,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Device:
        board.requests[endpoint_of(request)] += 1
        device = tokens.authenticate(creds.credentials if creds else None)
        if device is None:
            raise Rejection(401, "unauthenticated", "missing, unknown or revoked bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
        request.state.device = device  # the error handler records refusals under it
        wait = limiter.allow(device.name)
        if wait:
            raise Rejection(429, "rate-limited", f"more than {limiter.rate:g} requests/s from device {device.name!r}",
                            headers={"Retry-After": f"{wait:.1f}"})
        if device.client >= cfg.clients:
            raise Rejection(403, "no-slot", f"client {device.client} is not in this run (clients 0..{cfg.clients - 1})")
        return device
    return device_of


def _add_task_routes(app: FastAPI, board: Board, Authenticated, *, wake: dict, max_poll: float, limit) -> None:
    """/v1/config and /v1/task (the long poll)."""
    cfg = board.cfg

    @app.get("/v1/config", responses=PROBLEMS, summary="the run's public settings")
    async def config(device: Authenticated) -> dict:
        fed = board.fed
        m = fed.model_cfg if fed is not None else None
        run = cfg.to_json()
        return {"api_version": API_VERSION, "client": device.client,
                "train_config": {k: run[k] for k in DEVICE_CONFIG_FIELDS if k in run},
                "model": None if m is None else {
                    "name": m.name, "in_channels": m.in_channels, "image_size": m.image_size,
                    "num_classes": m.num_classes, "activation": getattr(m.activation, "value", m.activation),
                    "norm": getattr(m.norm, "value", m.norm)},
                "parameters": None if fed is None else fed.server.dim,
                "bundle_format": None if fed is None or fed.bundle_dir is None else fed.runtime_info.format,
                "demo_data": board.demo_data, "max_report_bytes": limit()}

    @app.get("/v1/task", responses=PROBLEMS, summary="the device's task, or wait / done (long poll)")
    async def task(device: Authenticated,
                   wait: float = Query(0.0, ge=0.0, le=600.0,
                                       description=f"seconds to hold the request until a task is ready "
                                                   f"(capped at {max_poll:g})")) -> dict:
        loop = asyncio.get_running_loop()
        until = loop.time() + min(wait, max_poll)
        while True:
            changed = wake["event"]
            offer = board.offer(device)
            remaining = until - loop.time()
            if offer["status"] != "wait" or remaining <= 0 or changed is None:
                return offer
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass


def _add_download_routes(app: FastAPI, board: Board, Authenticated) -> None:
    """/v1/weights, /v1/bundle (cached by ETag) and the demo /v1/data."""
    binary = {**PROBLEMS, 200: {"content": {"application/octet-stream": {}}}}

    @app.get("/v1/weights/{version}", responses=binary, response_class=Response,
             summary="the round's float32 weights (ETag = model version)")
    async def weights(request: Request, version: Annotated[str, PathParam(max_length=64)],
                      device: Authenticated) -> Response:
        data = board.weights(version)
        etag = f'"{version}"'
        headers = {"ETag": etag, "X-Model-Version": version, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.get("/v1/weights/{version}/int8", responses=binary, response_class=Response,
             summary="int8 bundles: the round's integers, zlib, optionally a delta (docs/gateway.md)")
    async def int_weights(version: Annotated[str, PathParam(max_length=64)], device: Authenticated,
                          base: str | None = Query(None, max_length=64,
                                                   description="the model version whose integers the device holds")
                          ) -> Response:
        data, digest, used = board.int_weights(version, base)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Sha256": digest, "X-Baffle-Base": used, "X-Model-Version": version,
                                 "Cache-Control": "private, max-age=3600"})

    @app.get("/v1/bundle/{generation}/{name}", responses=binary, response_class=Response,
             summary="a file of the round's bundle (verify its sha256)")
    async def bundle(request: Request, generation: Annotated[int, PathParam(ge=0, le=2**31)],
                     name: Annotated[str, PathParam(max_length=128)], device: Authenticated,
                     z: bool = Query(False, description="zlib-compress the file"),
                     base: int | None = Query(None, ge=0, le=2**31, description="the generation the device holds: "
                                              "its file is the zlib dictionary (implies z)")) -> Response:
        data, digest, encoding = board.bundle_file(generation, name, packed=z, base=base)
        headers = {"ETag": f'"{digest}"', "X-Sha256": digest, "Cache-Control": "private, max-age=3600",
                   "X-Baffle-Encoding": encoding}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        media = "application/json" if name.endswith(".json") and encoding == "identity" else "application/octet-stream"
        return Response(data, media_type=media, headers=headers)

    @app.get("/v1/data/{round_}", responses=PROBLEMS, summary="demo only: the device's batches for the round")
    async def data(round_: Annotated[int, PathParam(ge=0, le=2**32 - 1)], device: Authenticated) -> dict:
        batches = board.batches(device, round_)
        return {"round": round_, "client": device.client, "batches": [
            {"shape": list(b.x.shape), "x": base64.b64encode(np.ascontiguousarray(b.x, "<f4").tobytes()).decode(),
             "y": [int(v) for v in b.y]} for b in batches]}


def _add_report_routes(app: FastAPI, board: Board, Authenticated, *, limit) -> None:
    """POST /v1/report (JSON or NPZ, at most ``limit()`` bytes)."""
    @app.post("/v1/report", status_code=202, responses=PROBLEMS, summary="post a ClientReport (compact, JSON or NPZ)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ReportJSON.model_json_schema()},
                  compact.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                  "application/x-npz": {"schema": {"type": "string", "format": "binary"}}}}})
    async def report(request: Request, device: Authenticated) -> dict:
        body = await read_body(request, limit())
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            parsed = parse_report(body, media)
        except ValueError as e:
            raise Rejection(400, "malformed", str(e)[:500]) from None
        return board.submit(device, parsed)


def parse_report(body: bytes, media: str) -> ClientReport:
    """A report body of Content-Type ``media`` (compact, JSON or NPZ); ValueError if malformed, 415 if none."""
    if media in COMPACT_TYPES:
        return compact.decode(body)
    if media in JSON_TYPES:
        return ClientReport.from_json(body)
    if media in NPZ_TYPES:
        check_npz(body)
        return ClientReport.from_npz(body)
    raise Rejection(415, "unsupported-media-type", f"Content-Type {media or '(none)'!r}: send "
                    f"{compact.MEDIA_TYPE}, application/json or application/x-npz")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Rejection(400, "malformed", f"Content-Length {declared[:20]!r} is not a number")
        if int(declared) > limit:
            raise Rejection(413, "too-large", f"report of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Rejection(413, "too-large", f"report exceeds the limit of {limit} bytes")
    except ClientDisconnect:  # an aborted upload (or one the body timeout cut): a refusal, not a traceback
        raise Rejection(400, "aborted", f"the connection closed after {len(body)} bytes of the body") from None
    return bytes(body)
