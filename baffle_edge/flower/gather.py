"""The ServerApp's side of a round: ``FlowerGather`` hands ``Federation.step``'s tasks to SuperNodes
over a Flower Grid and collects their reports; ``run_server`` is the reference training loop
(``simulate.train``: checkpoints, quorum, deadline, robust aggregation, metrics) with it as the
``gather`` hook.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from ..protocol import ClientReport, RoundTask
from .records import RoundPayload, parse_node_info, parse_reply, query_message, round_payload, task_message
from .runconfig import FlowerConfig

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from ..simulate import TrainConfig

log = logging.getLogger("baffle_edge.flower")
LATE_QUERY_WAIT = 5.0  # seconds a round waits for the answers of nodes that joined mid-run


class FlowerGather:
    """``Federation.step``'s ``gather`` hook over a Flower Grid: one message per task, replies
    collected until all arrived or ``round_timeout`` passed.

    Which node runs client c: with ``client_data="shard"`` the c-th connected node (by node id,
    cyclically if there are fewer nodes than clients); with ``"node"`` the node holding partition c
    (asked once per node), else a node without a partition id, else nobody (client c is absent)."""

    def __init__(self, grid: "Grid", cfg: TrainConfig, flower: FlowerConfig):
        self.grid, self.cfg, self.flower = grid, cfg, flower
        self.fed = None
        self.partition_of: dict[int, int | None] = {}  # node id -> partition id it holds (None: any)
        self._payload_key: tuple | None = None
        self._payload: RoundPayload | None = None
        self._waited = False
        self._queries: dict[str, tuple[int, float]] = {}  # pending query message id -> (node, sent at)

    def bind(self, fed) -> None:
        """Called by ``simulate.train`` with the run's Federation (its model and bundle)."""
        self.fed = fed

    @property
    def devices_own_data(self) -> bool:
        """``client-data = "node"``: nodes train on their own partitions, whose sizes the server does
        not know, so ``Federation.step`` gives them equal weights (bounded num_samples claims);
        ``"shard"``: the server's shards, whose scheduled sizes are the exact weights."""
        return self.flower.client_data != "shard"

    def payload(self) -> RoundPayload | None:
        if self.fed is None:
            return None
        key = (str(self.fed.bundle_dir), self.fed.bundle_generation)
        if key != self._payload_key:
            self._payload, self._payload_key = round_payload(self.fed), key
        return self._payload

    def nodes(self) -> list[int]:
        """The connected nodes; before the first round, wait until ``min_nodes`` are connected."""
        if self._waited:
            return sorted(self.grid.get_node_ids())
        deadline = time.monotonic() + self.flower.node_wait
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.flower.min_nodes:
                self._waited = True
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} Flower node(s) connected after {self.flower.node_wait:.0f} s; "
                                   f"need {self.flower.min_nodes}")
            time.sleep(0.2)

    def exchange(self, messages: list, timeout: float | None) -> list:
        """Push ``messages`` and pull their replies until all arrived or ``timeout`` passed
        (``Grid.send_and_receive`` does the same but polls every 3 s, a third of a short round)."""
        if not messages:
            return []
        pending = {i for i in self.grid.push_messages(messages) if i}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while pending:
            got = list(self.grid.pull_messages(list(pending)))
            replies.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.flower.poll)
        return replies

    def describe(self, nodes: list[int]) -> None:
        """Ask nodes not seen before which partition they hold (one query message each).

        Before the first round this waits up to ``query_timeout`` for the answers; later (a node
        that joins mid-run) at most ``LATE_QUERY_WAIT`` seconds, so a node that never answers does
        not stall the rounds: its query stays pending (re-sent after ``query_timeout``) and the node
        joins in the round after its answer arrives."""
        now = time.monotonic()
        self._queries = {m: (n, t) for m, (n, t) in self._queries.items() if now - t < self.flower.query_timeout}
        asked = {n for n, _ in self._queries.values()}
        new = [n for n in nodes if n not in self.partition_of and n not in asked]
        if new:
            ids = self.grid.push_messages([query_message(n) for n in new])
            self._queries.update({m: (n, now) for m, n in zip(ids, new) if m})
        wait = self.flower.query_timeout if not self.partition_of else min(LATE_QUERY_WAIT, self.flower.query_timeout)
        deadline = now + wait
        while self._queries:
            for reply in self.grid.pull_messages(list(self._queries)):
                self._queries.pop(reply.metadata.reply_to_message_id, None)
                node, info = reply.metadata.src_node_id, parse_node_info(reply)
                if isinstance(info, Exception):
                    log.warning("node %s cannot train (asked again next round): %s", node, info)
                else:
                    self.partition_of[node] = info
                    log.info("node %s holds partition %s", node, "-" if info is None else info)
            if not self._queries or time.monotonic() >= deadline:
                break
            time.sleep(self.flower.poll)

    def assign(self, nodes: list[int]) -> dict[int, int]:
        """client -> node for this round."""
        clients = self.cfg.clients
        if self.flower.client_data == "shard":
            return {c: nodes[c % len(nodes)] for c in range(clients)} if nodes else {}
        self.describe(nodes)
        ready = [n for n in nodes if n in self.partition_of]
        node_of: dict[int, int] = {}
        for n in ready:
            pid = self.partition_of[n]
            if pid is not None and 0 <= pid < clients and pid not in node_of:
                node_of[pid] = n
        spare = [n for n in ready if n not in node_of.values() and self.partition_of[n] is None]
        free = [c for c in range(clients) if c not in node_of]
        node_of.update(zip(free, spare))
        return node_of

    def __call__(self, tasks: list[RoundTask], weights: np.ndarray) -> list[tuple]:
        start = time.monotonic()
        node_of = self.assign(self.nodes())
        payload = self.payload()
        sent = [t for t in tasks if t.client in node_of]
        by_node: dict[int, list[RoundTask]] = {}
        for t in sent:
            by_node.setdefault(node_of[t.client], []).append(t)
        messages = [task_message(t, weights, self.cfg, node_of[t.client], payload=payload,
                                 client_data=self.flower.client_data) for t in sent]
        replies = self.exchange(messages, self.cfg.round_timeout)
        answered = []
        for reply in replies:
            report = parse_reply(reply)
            # the task a reply answers: the one its report names, among those sent to that node
            mine = by_node.get(reply.metadata.src_node_id, [])
            claimed = report.client if isinstance(report, ClientReport) else None
            task = next((t for t in mine if t.client == claimed), mine[0] if len(mine) == 1 else None)
            if task is not None:
                answered.append((task, report))
        order = {t.client: i for i, t in enumerate(tasks)}
        heard = {t.client for t, _ in answered}
        log.info("round %d/%d: %d/%d replies in %.1f s%s", tasks[0].round + 1 if tasks else 0, self.cfg.rounds,
                 len(answered), len(tasks),
                 time.monotonic() - start, f"; absent: {sorted(set(order) - heard)}" if len(heard) < len(tasks) else "")
        return sorted(answered, key=lambda a: order[a[0].client])  # reproducible: client order


def run_server(grid: "Grid", cfg: TrainConfig, flower: FlowerConfig, *, progress: bool = False) -> dict:
    """The ServerApp's body: the reference training loop with Flower as the transport."""
    from ..simulate import train
    return train(cfg, flower.out, resume=flower.resume, progress=progress, gather=FlowerGather(grid, cfg, flower))
