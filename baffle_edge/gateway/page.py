"""The public pages of a served run: ``GET /v1/status`` (its response model is the OpenAPI schema's
``Status``), the live page ``/run`` (``static/run.html`` + ``static/run.js``, drawn from
/v1/status, no third-party code), and ``/``: the browser client of ``--web DIR`` or a redirect to
/run. ``check_web_dir`` refuses a ``--web`` folder whose page needs modules that were never built;
``stale_web_build`` warns when they are older than the client's sources.
"""
# no "from __future__ import annotations": FastAPI reads the models' annotations at runtime

import re
import sys
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from .board import Board

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'",
                "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
BUILT = re.compile(r"""["'](/web/(dist/[^"'?#\s]+))["']""")  # a built file the page loads: /web/dist/...


class Slots(BaseModel):
    reported: int = Field(description="slots of the open round whose report was accepted")
    working: int = Field(description="slots that fetched their task and have not reported yet")
    not_fetched: int = Field(description="slots whose task no device has fetched")


class Notice(BaseModel):
    round: int = Field(description="1-based round the notice is about")
    cause: str = Field(description="never-fetched, no-report, no-demo-data, wrong-bundle, unauthenticated, "
                                   "refused-report")
    clients: list[int] = Field(description="client slots concerned (never device names)")
    message: str = Field(description="what the server saw and the likely fix (also logged on the server)")


class HistoryRow(BaseModel):
    round: int = Field(description="1-based round")
    train_loss: float | None = Field(description="mean loss of the accepted clients at the round's weights")
    test_accuracy: float | None = Field(None, description="on evaluation rounds (every eval_every and the last)")
    test_loss: float | None = Field(None, description="on evaluation rounds")
    clients_accepted: int
    rejected: int = Field(description="rejected reports in the round")
    absent: int = Field(description="clients that did not answer before the deadline")
    bytes_up: int = Field(description="accepted uploads, bytes")
    bytes_down: int = Field(description="weights and tasks sent, bytes")
    seconds: float = Field(description="wall time of the round")
    applied: bool
    skipped: bool = Field(description="below quorum: the model was left unchanged")


class Status(BaseModel):
    """The public state of the run: no device names, tokens or server paths."""

    state: str = Field(description="waiting (no round yet), open, closed (between rounds), done")
    round: int | None = Field(description="1-based current round")
    rounds: int
    clients: int
    reports: int = Field(description="accepted reports of the current round")
    tasks: int = Field(description="tasks of the current round")
    deadline_in: float | None = Field(description="seconds until the open round closes (None: no deadline)")
    round_seconds: float | None = Field(description="seconds the open round has been open")
    round_timeout: float | None = Field(description="--round-timeout, seconds")
    eval_every: int = Field(description="rounds between test evaluations")
    accepted_total: int
    rejected_total: int = Field(description="refused requests, every endpoint")
    rejected_reports: int = Field(description="refused POST /v1/report requests")
    rejected_by_kind: dict[str, int]
    devices_seen: int = Field(description="distinct devices that polled for a task")
    slots: Slots
    notices: list[Notice] = Field(description="likely causes of absent devices, one per cause per round (last 50)")
    history: list[HistoryRow] = Field(description="finished rounds after `since` (at most 1000)")


def check_web_dir(web: Path) -> None:
    """FileNotFoundError unless ``web/index.html`` and every ``/web/dist/...`` file it loads exist,
    naming the command that builds them (``node web/build.mjs`` for clients/js/web)."""
    index = web / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"--web {web}: no index.html there")
    missing = [url for url, rel in BUILT.findall(index.read_text(errors="replace")) if not (web / rel).exists()]
    if not missing:
        return
    parent = web.parent if web.parent != Path(".") else web.resolve().parent  # clients/js for clients/js/web
    how = (f"build them with: cd {parent} && npm run build && node {web.name}/build.mjs"
           if (web / "build.mjs").is_file() else "build the page's modules into it first")
    raise FileNotFoundError(f"--web {web}: the page loads {missing[0]}, which is not built "
                            f"({len(missing)} file(s) missing); {how}")


def stale_web_build(web: Path) -> str | None:
    """Why the page's built modules look older than the client's sources (``web/../src/*.ts``,
    ``web/build.mjs``), or None: a page built before the last edit would run yesterday's client."""
    built = [web / rel for _, rel in BUILT.findall((web / "index.html").read_text(errors="replace"))]
    sources = [*sorted((web.parent / "src").glob("*.ts")), web / "build.mjs"]
    sources = [p for p in sources if p.is_file()]
    if not built or not sources:
        return None
    newest = max(sources, key=lambda p: p.stat().st_mtime)
    if newest.stat().st_mtime <= min(p.stat().st_mtime for p in built):
        return None
    return (f"--web {web}: {newest.name} changed after the page's modules were built; rebuild with: "
            f"cd {web.parent} && npm run build && node {web.name}/build.mjs")


def add_pages(app: FastAPI, board: Board, web_dir: str | Path | None, *, count: Callable[[Request], None]) -> None:
    """/v1/status, /run, /run.js and / (see the module docstring); ``count`` counts a status request."""
    @app.get("/v1/status", response_model=Status, summary="the run's progress, slots, absent devices' likely "
             "causes and finished rounds (public)")
    async def status(request: Request, since: int = Query(0, ge=0, le=2**32,
                                                          description="only rounds after this one in history")):
        count(request)
        return board.status(since=since)

    @app.get("/run", include_in_schema=False)
    async def run_page() -> FileResponse:
        return FileResponse(STATIC / "run.html", headers=PAGE_HEADERS)

    @app.get("/run.js", include_in_schema=False)
    async def run_script() -> FileResponse:
        return FileResponse(STATIC / "run.js", media_type="text/javascript", headers=PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # every browser tab asks: not a refusal worth counting
        return Response(status_code=204)

    if web_dir is not None:
        web = Path(web_dir)
        check_web_dir(web)
        stale = stale_web_build(web)
        if stale is not None:
            print(f"baffle-edge serve: warning: {stale}", file=sys.stderr, flush=True)
        app.mount("/web", StaticFiles(directory=web), name="web")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(web / "index.html")
    else:
        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/run")
