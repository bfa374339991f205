"""The server side: rebuilding gradients from K loss scalars (streaming over k, one eps_k in memory
at a time: ``Server.decode`` -> ``rows.step_gradient``) for C clients, plus one optimizer step.

Reports are synthetic but exact: the loss is linear, L(w + sigma eps) = L0 + sigma eps . g, so the
decoded gradient must point along g (cosine > 0 always, about sqrt(K / (K + d)) on average).
Clients share one noise stream (``noise_scope=shared``) only to make the setup cheap; the server
still regenerates K vectors per report, exactly as for per-client streams.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the server side (gradient decode, optimizer) runs on torch: needs torch (pip install torch==2.13.0)")

from baffle_edge.estimator import cosine, expected_cosine
from baffle_edge.perturb import SHARED_CLIENT, noise
from baffle_edge.protocol import ClientReport, NoiseScope
from baffle_edge.server import FedSGD, OptimConfig, OptimizerName, RoundLog, Server

from .cases import FULL, MODELS, SIGMA

SEED = 11
QUICK = {("lenet-8", 10, 10), ("lenet-8", 10, 100), ("lenet-8", 100, 10), ("mlp", 100, 10), ("wrn-10-2", 10, 10)}
CASES = [pytest.param(m, k, c, id=f"{m}-K{k}-C{c}", marks=[] if (m, k, c) in QUICK else [FULL])
         for m, k, c in sorted(QUICK | {("lenet-8", 100, 100), ("lenet-8", 500, 10), ("mlp", 500, 100),
                                        ("wrn-10-2", 100, 10), ("wrn-10-2", 10, 100), ("wrn-10-2", 500, 10)})]


@lru_cache(maxsize=4)
def linear_losses(case_id: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(g, losses): exact losses of the linear loss with gradient g under the shared stream."""
    d = MODELS[case_id].dim
    g = np.random.default_rng(SEED).standard_normal(d)
    diffs = np.array([SIGMA * float(noise(SEED, 0, SHARED_CLIENT, j, d).astype(np.float64) @ g) for j in range(k)])
    return g, 2.3 + diffs


def make_round(case_id: str, k: int, clients: int, optimizer=OptimizerName.ADAM):
    server = Server(MODELS[case_id].build(), FedSGD(), OptimConfig(optimizer=optimizer))
    g, losses = linear_losses(case_id, k)
    tasks = [server.make_task(0, c, seed=SEED, k=k, sigma=SIGMA, noise_scope=NoiseScope.SHARED)
             for c in range(clients)]
    reports = [ClientReport(round=0, client=c, losses=losses, base_losses=[2.3], num_samples=32,
                            model_version=t.model_version, runtime="synthetic") for c, t in enumerate(tasks)]
    return server, tasks, reports, g


@pytest.mark.parametrize("case_id,k,clients", CASES)
def test_server_round(benchmark, measuring, case_id, k, clients):
    case = MODELS[case_id]
    server, tasks, reports, g = make_round(case_id, k, clients)
    w0 = server.flat().clone()

    def server_round():
        log = RoundLog()
        updates = [u for t, r in zip(tasks, reports) if (u := server.accept(t, r, log)) is not None]
        server.apply(updates, log)
        return updates, log

    benchmark.group = f"server {case_id}"
    updates, log = benchmark.pedantic(server_round, rounds=1 if k * clients >= 1000 else 3, warmup_rounds=0)
    benchmark.extra_info.update(case.info(), runtime="torch (server)", dtype="fp32 weights, fp64 estimate",
                                batch=32, K=k, clients=clients, optimizer="adam", stage="server",
                                noise_vectors_regenerated=k * clients)

    assert log.accepted == list(range(clients)) and not log.rejected
    est = updates[0].gradient
    assert np.max(np.abs(est)) <= OptimConfig().clip + 1e-6  # the reference inf-norm clipping
    c = cosine(est, g)
    assert c > 0.4 * expected_cosine(k, case.dim), f"decoded gradient has cosine {c:.3f} to the true one"
    w1 = server.flat()
    assert torch.isfinite(w1).all() and not torch.equal(w0, w1), "the optimizer step did not move the weights"


@pytest.mark.parametrize("optimizer", [OptimizerName.ADAM, OptimizerName.SGD], ids=["adam", "sgd"])
@pytest.mark.parametrize("case_id", ["lenet-8", "wrn-10-2", "mlp"])
def test_optimizer_step(benchmark, case_id, optimizer):
    """One server optimizer step from an averaged gradient (no decoding)."""
    case = MODELS[case_id]
    server, tasks, reports, g = make_round(case_id, 1, 1, optimizer)
    update = server.decode(tasks[0], reports[0])
    w0 = server.flat().clone()
    benchmark.group = f"server {case_id}"
    benchmark.extra_info.update(case.info(), runtime="torch (server)", dtype="fp32", batch=32, K=None, clients=1,
                                optimizer=optimizer.value, stage="server-step")
    benchmark(server.apply, [update], RoundLog())
    assert not torch.equal(w0, server.flat()) and torch.isfinite(server.flat()).all()
