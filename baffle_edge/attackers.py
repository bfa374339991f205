"""Simulated attackers (``TrainConfig.byzantine``): which clients misbehave and what they upload.

numpy only: the simulation's threads and Flower's ClientApp (shard mode) both draw them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .protocol import ClientReport


def byzantine_clients(clients: int, fraction: float, *, seed: int) -> frozenset[int]:
    """The seeded set of ``round(fraction * clients)`` clients that misbehave in a simulation."""
    n = round(fraction * clients)
    rng = np.random.default_rng([seed, 0xB7])
    return frozenset(int(c) for c in rng.choice(clients, size=n, replace=False)) if n else frozenset()


def garbage_report(report: ClientReport, *, seed: int) -> ClientReport:
    """A Byzantine upload: well-formed and finite, but random large losses (uniform in [0, 1e3))
    instead of the measured ones; seeded by (seed, round, client)."""
    rng = np.random.default_rng([seed, report.round, report.client, 0xB7])
    return dataclasses.replace(report, losses=rng.uniform(0, 1e3, report.losses.size),
                               base_losses=rng.uniform(0, 1e3, report.base_losses.size))
