"""The measurements: one Federation per run with a gradient probe on every accepted update, the K/sigma
sweep on fixed weights, and the fingerprints that prove every run saw the same data and batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import sys
import time

import numpy as np
import torch

from ..client import Batch
from ..data import Dataset, load_dataset
from ..estimator import clip_inf, cosine
from ..models import build_model
from ..params import flat_grad, set_flat_params
from ..protocol import Domain
from ..server import ClientUpdate
from ..simulate import Federation, Method, TrainConfig
from .config import BASELINE, REFERENCE, Sweep, VerifyConfig


def batch_hash(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(np.ascontiguousarray(b.x).tobytes())
        h.update(np.ascontiguousarray(b.y).tobytes())
    return h.hexdigest()[:16]


class ExactGradient:
    """The server's own float model: exact gradient of one batch's loss at given weights."""

    def __init__(self, fed: Federation):
        self.model = build_model(fed.model_cfg, seed=fed.cfg.seed)

    def __call__(self, weights: np.ndarray, batch: Batch) -> np.ndarray:
        set_flat_params(self.model, torch.from_numpy(np.asarray(weights, dtype=np.float32)))
        self.model.zero_grad(set_to_none=True)
        logits = self.model(torch.from_numpy(batch.x)).double()
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.y)).backward()
        g = flat_grad(self.model).numpy().astype(np.float64)
        self.model.zero_grad(set_to_none=True)
        return g


class GradientProbe:
    """``on_update`` callback: compares each decoded client update with the exact gradient of the
    same client's batch at the same weights, and fingerprints the batches."""

    def __init__(self, fed: Federation):
        self.exact = ExactGradient(fed)
        self.clip = fed.cfg.optim.clip
        self.hashes: dict[tuple[int, int], str] = {}  # (round, client) -> batch hash
        self._reset()

    def _reset(self):
        self.cos, self.ratio, self.n = [], [], 0.0
        self.sum_est = self.sum_true = None

    def __call__(self, round_: int, client: int, weights: np.ndarray, batches: list[Batch],
                 update: ClientUpdate) -> None:
        self.hashes[(round_, client)] = batch_hash(batches)
        if update.gradient is None:
            raise ValueError("verify supports FedSGD updates (a gradient per client) only")
        est = np.asarray(update.gradient, dtype=np.float64)
        true = self.exact(weights, batches[0])
        self.cos.append(cosine(est, true))
        ref_norm = float(np.linalg.norm(clip_inf(true, self.clip)))
        self.ratio.append(float(np.linalg.norm(est)) / ref_norm if ref_norm > 0 else float("nan"))
        w = float(update.weight)
        self.sum_est = w * est if self.sum_est is None else self.sum_est + w * est
        self.sum_true = w * true if self.sum_true is None else self.sum_true + w * true
        self.n += w

    def finish_round(self, round_: int) -> dict:
        """The round's gradient metrics (None when no update was accepted)."""
        clients = sorted(c for (r, c) in self.hashes if r == round_)
        digest = hashlib.sha256("".join(f"{c}:{self.hashes[(round_, c)]};" for c in clients).encode())
        row = {"cos_clients_mean": _mean(self.cos), "cos_clients_min": min(self.cos) if self.cos else None,
               "cos_aggregate": cosine(self.sum_est, self.sum_true) if self.sum_est is not None else None,
               "norm_ratio_mean": _mean(self.ratio), "batch_hash": digest.hexdigest()[:16],
               "clients_hashed": len(clients)}
        self._reset()
        return row


def _val(x):
    return getattr(x, "value", x)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def load_data(vc: VerifyConfig) -> Dataset:
    """The check's dataset: ``vc.train``'s, cut to seeded train / test subsets when they are set."""
    cfg = vc.train
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0x5EB5])
    changes = {}
    for split, n in (("train", vc.train_subset), ("test", vc.test_subset)):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if n is not None and n < len(y):
            idx = np.sort(rng.choice(len(y), n, replace=False))
            changes[f"x_{split}"], changes[f"y_{split}"] = x[idx], y[idx]
    return dataclasses.replace(data, **changes) if changes else data


def data_hash(data: Dataset) -> str:
    """Fingerprint of the dataset arrays; checked after every run (no run may alter the shared data)."""
    h = hashlib.sha256()
    for a in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def runtime_status(name: str) -> str | None:
    """None if ``name`` can be instantiated, else the reason. Unknown names raise ValueError."""
    from baffle_edge.runtimes import get_runtime
    try:
        get_runtime(name)
    except ImportError as e:
        return str(e)
    return None


def default_runtimes() -> tuple[str, ...]:
    """torch plus every registered int8 runtime that is importable here."""
    from baffle_edge.runtimes import REGISTRY
    out = [REFERENCE]
    for name, info in REGISTRY.items():
        if name != REFERENCE and ("int8" in name or getattr(info, "domain", "float") == "int8-step"):
            try:
                ok = runtime_status(name) is None
            except Exception:
                ok = False
            if ok:
                out.append(name)
    return tuple(out)


def _runtime_versions(name: str) -> dict:
    from baffle_edge.runtimes import REGISTRY
    info = REGISTRY.get(name)
    out = {}
    for mod in getattr(info, "requires", ()) or ():
        try:
            out[mod] = str(getattr(importlib.import_module(mod), "__version__", "?"))
        except Exception:
            out[mod] = None
    return out


def run_one(name: str, cfg: TrainConfig, data: Dataset, *, progress: bool = False,
            snapshot_round: int | None = None) -> dict:
    """Train one run with its own Federation; return its record (rows, summary, batch hashes)."""
    fed = Federation(cfg, data=data)
    probe = GradientProbe(fed)
    t0 = fed.task(0, 0)  # what the Federation made of this runtime: noise, domain (recorded, not chosen here)
    effective = {"noise": _val(t0.noise), "domain": _val(t0.domain), "scheme": _val(t0.scheme), "k": t0.k,
                 "sigma": t0.sigma, "baseline": _val(t0.baseline)}
    if t0.domain is Domain.INT8_STEP:
        effective["estimator"] = _val(t0.estimator)
    rows, snapshot = [], None
    start = time.perf_counter()
    it = range(cfg.rounds)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"verify {name}", unit="round", dynamic_ncols=True, file=sys.stderr)
    try:
        for r in it:
            if snapshot_round is not None and r == snapshot_round:
                snapshot = fed.server.flat().numpy().copy()
            row = fed.step(r, on_update=probe).to_json()
            row.update(probe.finish_round(r))
            if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
                row.update(fed.evaluate())
            rows.append(row)
        if snapshot_round is not None and snapshot is None:
            snapshot = fed.server.flat().numpy().copy()
    finally:
        fed.pool.shutdown(wait=True)
    evals = [r for r in rows if "test_accuracy" in r]
    rejected = [(r["round"], c, why) for r in rows for c, why in r["rejected"].items()]
    summary = {
        "final_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "final_accuracy_raw": evals[-1]["test_accuracy_raw"] if evals else None,
        "final_train_loss": next((r["train_loss"] for r in reversed(rows) if r["train_loss"] is not None), None),
        "mean_cos_clients": _mean(r["cos_clients_mean"] for r in rows),
        "mean_cos_aggregate": _mean(r["cos_aggregate"] for r in rows),
        "mean_norm_ratio": _mean(r["norm_ratio_mean"] for r in rows),
        "rejected_reports": len(rejected),
        "first_rejection": (f"round {rejected[0][0]} client {rejected[0][1]}: {rejected[0][2]}"
                            if rejected else None),
        "seconds": time.perf_counter() - start,
        "bytes_up_per_report": _mean(r["bytes_up"] / max(1, r["clients_accepted"]) for r in rows
                                     if r["clients_accepted"]),
        **compute_summary(fed.client_compute(), rows, cfg.eval_every),
    }
    return {"name": name, "status": "ok", "method": cfg.method.value, "runtime": cfg.runtime,
            "config": cfg.to_json(), "effective": effective, "versions": _runtime_versions(cfg.runtime),
            "summary": summary,
            "rounds": rows, "_hashes": probe.hashes, "_snapshot": snapshot}


def compute_summary(compute: dict, rows: list[dict], eval_every: int) -> dict:
    """Compute per client round and the gradient it buys: cosine per forward-equivalent and per GMAC,
    and test accuracy at a quarter, half, three quarters and all of the rounds."""
    cos = _mean(r.get("cos_clients_mean") for r in rows)
    evals = {r["round"]: r["test_accuracy"] for r in rows if "test_accuracy" in r}
    n = len(rows)
    marks = sorted({min(n, max(eval_every, round(n * q / eval_every) * eval_every)) for q in (0.25, 0.5, 0.75)} | {n})
    return {"forward_equivalents": compute["forward_equivalents"], "macs_per_round": compute["macs"],
            "cos_per_forward": None if cos is None else cos / compute["forward_equivalents"],
            "cos_per_gmac": None if cos is None else cos / (compute["macs"] / 1e9),
            "accuracy_at": {str(r): evals.get(r) for r in marks}}


def compare_batches(runs: dict[str, dict]) -> dict:
    """Every run must have used the baseline's batch for every (round, client) it reports."""
    base = runs[BASELINE]["_hashes"]
    out = {"ok": True, "baseline_digest": _digest(base), "runs": {}}
    for name, run in runs.items():
        if run.get("status") != "ok":
            continue
        h = run["_hashes"]
        bad = sorted(key for key in h if base.get(key) != h[key])
        out["runs"][name] = {"digest": _digest(h), "pairs_checked": len(h), "mismatches": len(bad),
                             "first_mismatch": ({"round": bad[0][0], "client": bad[0][1]} if bad else None)}
        out["ok"] = out["ok"] and not bad
    return out


def _digest(h: dict) -> str:
    return hashlib.sha256("".join(f"{r}/{c}:{v};" for (r, c), v in sorted(h.items())).encode()).hexdigest()[:16]


def sweep_runtime(name: str, base: TrainConfig, data: Dataset, weights: np.ndarray, sw: Sweep,
                  round_: int) -> dict:
    """Cosine of the decoded estimate to the exact gradient on fixed weights and batches, for each
    K (at base.sigma) and each sigma (at base.k), averaged over ``sw.seeds`` noise seeds x clients.
    Every point goes through the runtime's own Federation (session + server decode)."""
    def points(cfg: TrainConfig, ks: list[int]) -> dict[int, list[float]]:
        fed = Federation(dataclasses.replace(cfg, rounds=max(cfg.rounds, round_ + 1)), data=data)
        try:
            fed.server.set_flat(weights)
            if getattr(fed, "bundle_dir", None) is not None:  # exported runtimes: re-export at these weights
                fed.refresh_bundle(fed.server.flat())
            exact = ExactGradient(fed)
            clients = list(range(min(sw.clients, cfg.clients)))
            batches = {c: fed.batches(c, round_) for c in clients}
            true = {c: exact(weights, batches[c][0]) for c in clients}
            jobs = [(k, s, c) for k in ks for s in range(sw.seeds) for c in clients]

            def one(job):
                k, s, c = job
                task = dataclasses.replace(fed.task(round_, c), k=k, seed=cfg.seed + 1000 * (s + 1))
                try:
                    out = fed.server.decode(task, fed.baffle_client(task, batches[c]))
                except Exception as e:  # a failing runtime is a result
                    out = f"{type(e).__name__}: {e}"
                return k, (cosine(out.gradient, true[c]) if isinstance(out, ClientUpdate) else str(out))

            res: dict[int, list] = {k: [] for k in ks}
            for k, c in fed.pool.map(one, jobs):
                res[k].append(c)
            return res
        finally:
            fed.pool.shutdown(wait=True)

    def stat(k: int, xs: list) -> dict:
        ok = [x for x in xs if not isinstance(x, str)]
        errors = [x for x in xs if isinstance(x, str)]
        return {"cos_mean": float(np.mean(ok)) if ok else None, "cos_std": float(np.std(ok)) if ok else None,
                "n": len(ok), "failed": len(errors), "first_error": errors[0] if errors else None}

    base = dataclasses.replace(base, method=Method.BAFFLE)
    start = time.perf_counter()
    by_k = points(base, list(sw.ks))
    k_rows = [{"k": k, **stat(k, by_k[k])} for k in sw.ks]
    s_rows = []
    for sigma in sw.sigmas:
        res = points(dataclasses.replace(base, sigma=sigma), [base.k])[base.k]
        s_rows.append({"sigma": sigma, **stat(base.k, res)})
    return {"k": k_rows, "sigma": s_rows, "seconds": time.perf_counter() - start}
