"""Bytes per client per round: BAFFLE (K loss scalars + header) vs dense FedSGD / FedAvg updates.

The BAFFLE upload is measured on real messages (``protocol.wire_bytes`` of the JSON report, the NPZ
encoding and the compact encoding, ``compact.encode``: 16-bit loss differences, the default);
``float32 payload`` is what a float32 binary client would send (4 bytes per loss).
Downloads: every scheme sends the global weights (float32) each round; BAFFLE adds its RoundTask.
The timed part is encoding and decoding the NPZ report.
"""
from __future__ import annotations

import numpy as np
import pytest

from baffle_edge import compact
from baffle_edge.protocol import ClientReport, RoundTask, wire_bytes

from .cases import DEVICE, MODELS

CASES = [pytest.param(m, k, id=f"{m}-K{k}", marks=[DEVICE] if (m, k) == ("lenet-8", 100) else [])
         for m in ("lenet-8", "wrn-10-2", "mlp") for k in (10, 100, 500)]


@pytest.mark.parametrize("case_id,k", CASES)
def test_bytes_per_round(benchmark, case_id, k):
    case = MODELS[case_id]
    d = case.dim
    task = RoundTask(round=123, client=7, seed=2**63 + 5, k=k, sigma=1e-4, model_version="f" * 16)
    rng = np.random.default_rng(k)
    report = ClientReport(round=123, client=7, losses=2.3 + 1e-3 * rng.standard_normal(k), base_losses=[2.3],
                          num_samples=32, model_version="f" * 16, runtime="onnxruntime-int8", seconds=0.0)

    def roundtrip():
        return ClientReport.from_npz(report.to_npz())

    benchmark.group = f"bytes {case_id}"
    back = benchmark(roundtrip)
    npz = report.to_npz()
    packed = compact.encode(report)
    up = {"baffle_json": wire_bytes(report), "baffle_npz": len(npz), "baffle_compact": len(packed),
          "baffle_float32": 4 * (k + 1),
          "fedsgd": 4 * d, "fedavg": 4 * d}
    down = {"baffle": 4 * d + wire_bytes(task), "fedsgd": 4 * d, "fedavg": 4 * d}
    benchmark.extra_info.update(case.info(), runtime=None, dtype="float64 losses", batch=32, K=k, stage="bytes",
                                upload_bytes=up, download_bytes=down,
                                upload_reduction_vs_dense=up["fedsgd"] / up["baffle_npz"])

    assert np.array_equal(back.losses, report.losses) and np.array_equal(back.base_losses, report.base_losses)
    back.check_against(task)
    assert up["baffle_float32"] < up["baffle_npz"] < up["baffle_npz"] + 8 * (k + 1) + 2048  # float64 + header
    assert up["baffle_json"] < 40 * (k + 1) + 1024  # ~ 20 characters per float64
    assert up["baffle_compact"] == 2 * k + 36 + 16 + 16 + 16 < up["baffle_npz"]  # 16 bits per loss + 84 B of header
    if k >= 100:
        assert up["baffle_compact"] < 0.71 * up["baffle_float32"]
    assert np.all(np.abs(compact.decode(packed).losses - report.losses) <= compact.bound(report))
    if d > 50 * k:  # the paper's claim: K scalars are far below a dense update
        assert up["baffle_npz"] * 5 < up["fedsgd"]
