"""What the operator sees of a served run: each round's slots (waiting, working, reported), the
likely cause of every absent device, and the finished rounds' figures (``/v1/status``, the live
page at ``/run``).

``RoundWatch`` is fed by the ``Board`` (under its lock): a task handed out, a report accepted, a
request refused. ``check`` turns what it saw into notices, one per cause per round, logged while the
round is still open (refusals at once, silence after ``grace`` seconds), so a server whose devices
cannot answer says why long before the round times out. Notices name client slots, never device
names or tokens: they are public, like the rest of ``/v1/status``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

HISTORY_FIELDS = ("round", "train_loss", "test_accuracy", "test_loss", "clients_accepted", "bytes_up",
                  "bytes_down", "seconds", "applied", "skipped")
NOTICES_KEPT = 50  # notices of past rounds kept for /v1/status (the log has them all)
GRACE_MAX = 30.0  # s of silence after which a device that has not fetched or answered is reported
BUNDLE_KINDS = ("unknown-bundle", "unknown-file")  # refusals of a bundle request


@dataclass(frozen=True)
class Notice:
    """One likely cause of absent devices in one round (``round`` is 1-based, as in metrics.json)."""

    round: int
    cause: str  # never-fetched, no-report, no-demo-data, wrong-bundle, unauthenticated, refused-report
    clients: list[int]  # the slots concerned (empty for unauthenticated requests)
    message: str  # one line saying what was seen and what to do

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunFacts:
    """The run's settings a cause's hint depends on."""

    demo_data: bool  # serve --demo-data: the server hands out batches
    runtime: str  # the run's runtime name
    bundle_format: str | None  # None: the runtime exports no bundle (torch)


@dataclass
class RoundSeen:
    round: int  # 0-based
    clients: set[int]  # slots with a task
    opened: float  # time.monotonic()
    fetched: set[int] = field(default_factory=set)
    reported: set[int] = field(default_factory=set)
    refused: dict[str, set[int]] = field(default_factory=dict)  # cause -> slots
    unauthenticated: int = 0  # requests with no valid token while the round was open
    logged: set[str] = field(default_factory=set)  # causes already noticed this round


def _slots(clients) -> str:
    c = sorted(clients)
    shown = ", ".join(str(x) for x in c[:12]) + (f" and {len(c) - 12} more" if len(c) > 12 else "")
    return f"client{'s' if len(c) > 1 else ''} {shown}"


class RoundWatch:
    def __init__(self, facts: RunFacts, *, log: Callable[[str], None]):
        self.facts, self.log = facts, log
        self.current: RoundSeen | None = None
        self.notices: list[Notice] = []
        self.history: list[dict] = []  # finished rounds, HISTORY_FIELDS only

    # ------------------------------------------------------------------ events (Board, under its lock)
    def open(self, round_: int, clients) -> None:
        self.current = RoundSeen(round_, set(clients), time.monotonic())

    def fetched(self, client: int) -> None:
        if self.current is not None:
            self.current.fetched.add(client)

    def reported(self, client: int) -> None:
        if self.current is not None:
            self.current.reported.add(client)

    def refused(self, client: int | None, kind: str, endpoint: str) -> None:
        seen = self.current
        if seen is None:
            return
        if kind == "unauthenticated":
            seen.unauthenticated += 1
            return
        if client is None or client not in seen.clients:
            return
        cause = ("no-demo-data" if kind == "no-demo-data" else "wrong-bundle" if kind in BUNDLE_KINDS
                 else "refused-report" if endpoint == "/v1/report" else None)
        if cause is not None:
            seen.refused.setdefault(cause, set()).add(client)

    def finished(self, row: dict) -> None:
        self.history.append({k: row.get(k) for k in HISTORY_FIELDS} | {
            "rejected": len(row.get("rejected") or ()), "absent": len(row.get("absent") or ())})

    # ------------------------------------------------------------------ notices
    def check(self, *, timeout: float | None, now: float | None = None) -> list[Notice]:
        """New notices of the open round (logged here): refusals at once, silent slots after the grace."""
        seen = self.current
        if seen is None:
            return []
        now = time.monotonic() if now is None else now
        grace = GRACE_MAX if not timeout else min(GRACE_MAX, timeout / 2)
        found = {cause: slots - seen.reported for cause, slots in seen.refused.items()}
        if seen.unauthenticated:
            found["unauthenticated"] = set()
        if now - seen.opened >= grace:
            refused = set().union(*seen.refused.values()) if seen.refused else set()
            found["never-fetched"] = seen.clients - seen.fetched - refused
            found["no-report"] = seen.fetched - seen.reported - refused
        new = []
        for cause, slots in found.items():
            if cause in seen.logged or (not slots and cause != "unauthenticated"):
                continue
            seen.logged.add(cause)
            new.append(Notice(seen.round + 1, cause, sorted(slots), self._message(cause, slots, seen, now)))
        for n in new:
            self.log(f"round {n.round}: {n.message}")
        self.notices = (self.notices + new)[-NOTICES_KEPT:]
        return new

    def _message(self, cause: str, slots: set[int], seen: RoundSeen, now: float) -> str:
        f = self.facts
        who = _slots(slots)
        if cause == "unauthenticated":
            return (f"{seen.unauthenticated} request(s) with a missing, unknown or revoked token: give each "
                    "device its own token file (device-tokens/client-C.token), not tokens.json, and one issued "
                    "for this server's --tokens file")
        if cause == "no-demo-data":
            return (f"{who} asked for the server's data, but this server hands out none: start serve with "
                    "--demo-data (demo only) or give each device its own data (baffle-edge device --data FILE.npz)")
        if cause == "wrong-bundle":
            fmt = f"format {f.bundle_format}" if f.bundle_format else "no bundle"
            return (f"{who} asked for a bundle file this server does not serve (runtime {f.runtime}, {fmt}): "
                    "the device and the run disagree on the runtime")
        if cause == "refused-report":
            return f"{who}: report refused (the reason is in gateway.json and the round's 'rejected' entry)"
        waited = f"{now - seen.opened:.0f} s"
        if cause == "never-fetched":
            return (f"{who} never fetched the task in {waited}: no device polled for these slots (is each "
                    "device running, with this server's URL and its own token?)")
        hints = []
        if not f.demo_data:
            hints.append("this server hands out no data (no --demo-data): each device needs its own "
                         "(baffle-edge device --data FILE.npz)")
        if f.bundle_format is None:
            hints.append(f"runtime {f.runtime} exports no bundle: Node and browser devices need "
                         "--runtime onnxruntime-int8 or onnxruntime")
        hint = "; ".join(hints) or "a device slower than --round-timeout, or one that failed: see its output"
        return f"{who} took the task and sent no report in {waited}: likely cause: {hint}"

    # ------------------------------------------------------------------ /v1/status
    def slots(self) -> dict:
        seen = self.current
        if seen is None:
            return {"reported": 0, "working": 0, "not_fetched": 0}
        return {"reported": len(seen.reported), "working": len(seen.fetched - seen.reported),
                "not_fetched": len(seen.clients - seen.fetched - seen.reported)}

    def round_seconds(self) -> float | None:
        return None if self.current is None else round(time.monotonic() - self.current.opened, 3)

    def history_since(self, since: int, limit: int) -> list[dict]:
        return [h for h in self.history if h["round"] > since][:limit]
