"""Connection hygiene for the gateway's uvicorn server: idle and body timeouts, a cap on idle connections.

uvicorn closes a keep-alive connection after ``timeout_keep_alive`` but never one that opens and
sends nothing, nor a request whose body stalls, and its ``limit_concurrency`` counts idle
connections too: a flood of silent sockets turned every device's request into a 503 (issue 26).
``guarded_protocol(limits)`` subclasses the HTTP protocol uvicorn would pick (httptools or h11) with
three rules per connection:

    idle   no complete request head within ``idle_timeout`` s of opening (or of the previous
           response): closed
    body   a request body not complete ``body_timeout`` s after its head: closed (the handler sees
           the disconnect and records an ``aborted`` refusal)
    cap    more than ``max_idle`` connections waiting for a request head: the longest-waiting one
           is closed

A device's connection leaves the idle set as soon as its request head arrives (milliseconds after
it connects), so a flood of idle sockets evicts itself, oldest first, instead of locking devices
out; a request being served (a long poll included) is never timed or counted here.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits of the gateway's HTTP server (GatewayConfig holds the CLI's values)."""

    idle_timeout: float = 10.0  # s a connection may wait before its request head is complete
    body_timeout: float = 30.0  # s a request body may take after its head
    max_idle: int = 1024  # connections waiting for a request head; beyond: the longest-waiting is closed

    def __post_init__(self):
        if not self.idle_timeout > 0 or not self.body_timeout > 0 or self.max_idle < 1:
            raise ValueError(f"need idle_timeout > 0, body_timeout > 0, max_idle >= 1; got {self.idle_timeout}, "
                             f"{self.body_timeout}, {self.max_idle}")


class ConnectionGuard:
    """The connections of one server that wait for a request head (in the order they began to wait),
    and what the limits closed (``closed``: idle, body, evicted)."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.idle: dict = {}  # connection -> None; insertion order = waiting since
        self.closed: collections.Counter = collections.Counter()

    def waiting(self, conn) -> None:
        self.idle.pop(conn, None)
        self.idle[conn] = None
        while len(self.idle) > self.limits.max_idle:
            oldest = next(iter(self.idle))
            self.idle.pop(oldest)
            self.closed["evicted"] += 1
            oldest.transport.close()

    def busy(self, conn) -> None:
        self.idle.pop(conn, None)


def guarded_protocol(limits: ConnectionLimits, base: type | None = None) -> tuple[type, ConnectionGuard]:
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) enforcing ``limits``, and its guard."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base  # httptools if installed, else h11
    guard = ConnectionGuard(limits)

    class GuardedHTTPProtocol(base):
        """uvicorn's protocol; the phase (idle, body, app) is read from its request cycle after every read."""

        def connection_made(self, transport) -> None:
            self.guard_cycle, self.guard_timer, self.guard_phase = None, None, None
            super().connection_made(transport)
            self.guard_enter("idle")

        def guard_enter(self, phase: str) -> None:
            self.guard_phase = phase
            if self.guard_timer is not None:
                self.guard_timer.cancel()
                self.guard_timer = None
            if phase == "idle":
                guard.waiting(self)
            else:
                guard.busy(self)
            timeout = {"idle": limits.idle_timeout, "body": limits.body_timeout}.get(phase)
            if timeout is not None and not self.transport.is_closing():
                self.guard_timer = self.loop.call_later(timeout, self.guard_expired, phase)

        def guard_expired(self, phase: str) -> None:
            self.guard_timer = None
            if self.guard_phase == phase and not self.transport.is_closing():
                guard.closed[phase] += 1
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.guard_track()

        def guard_track(self) -> None:
            cycle = self.cycle
            if cycle is None or self.transport.is_closing():
                return
            if cycle is not self.guard_cycle:  # a new request head is complete
                self.guard_cycle = cycle
                self.guard_enter("body" if cycle.more_body else "app")
            elif self.guard_phase == "body" and not cycle.more_body:
                self.guard_enter("app")

        def on_response_complete(self) -> None:
            pipelined = bool(getattr(self, "pipeline", None))  # httptools: a request queued behind this one
            super().on_response_complete()  # h11 may start the next pipelined request's cycle here
            if self.transport.is_closing():
                return
            if pipelined or self.cycle is not self.guard_cycle:
                self.guard_track()
            else:
                self.guard_enter("idle")

        def connection_lost(self, exc) -> None:
            guard.busy(self)
            if self.guard_timer is not None:
                self.guard_timer.cancel()
            super().connection_lost(exc)

    return GuardedHTTPProtocol, guard
