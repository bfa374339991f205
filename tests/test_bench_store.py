"""The benchmark suites without torch (``--bench-bundles``, benchmarks/store.py): a device install measures
the bundles, weights and reference losses a run with torch kept. The device subset (``--bench-device``) runs
here with every ``import torch`` / ``import onnx`` refused (tests/lean_device.py), as on an arm64 board or in scripts/arm64-root."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import store
from benchmarks.cases import MODELS

ROOT = Path(__file__).resolve().parents[1]
LEAN = ROOT / "tests" / "lean_device.py"  # no torch, no onnx


def test_the_store_keeps_what_torch_computed_and_reads_it_back_without_torch(tmp_path, monkeypatch):
    case = MODELS["lenet-8"]
    kept = store.Store(tmp_path)
    w = kept.weights(case)
    assert w.dtype == np.float32 and w.ndim == 1 and w.size == case.dim
    batch = case.batch(4)
    ref = kept.reference_loss(case, batch, lambda: 2.5)
    assert ref == 2.5 and (tmp_path / "cases" / "lenet-8.npy").is_file()

    monkeypatch.setattr(store, "have_torch", lambda: False)
    device = store.Store(tmp_path)
    assert not device.torch
    np.testing.assert_array_equal(device.weights(case), w)
    assert device.reference_loss(case, batch, lambda: pytest.fail("recomputed")) == 2.5
    with pytest.raises(pytest.skip.Exception, match="not in --bench-bundles .* torch is not installed"):
        device.reference_loss(case, case.batch(5), lambda: 0.0)  # another batch: not kept
    with pytest.raises(pytest.skip.Exception, match="--bench-bundles"):
        store.Store(None).weights(MODELS["mlp"])  # nothing kept and no torch: a skip naming the way out
    assert store.Store(tmp_path).bundle("onnxruntime", case, "onnx", tmp_path / "w") == tmp_path / "onnxruntime" / "lenet-8-onnx"
    assert store.Store(None).bundle("onnxruntime", case, "onnx", tmp_path / "w") == tmp_path / "w" / "lenet-8-onnx"


def test_the_lean_device_has_no_torch():
    r = subprocess.run([sys.executable, str(LEAN), "-m", "baffle_edge", "train", "--rounds", "1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "baffle-edge[server]" in r.stderr, r.stderr  # the CLI's install hint


def _bench(*args, tmp_path, torch: bool, timeout=900):
    suites = ["benchmarks/test_forward.py", "benchmarks/test_bytes.py",
              "benchmarks/test_batched.py::test_batched_round[onnxruntime-int8-5]"]  # P = 5: a kept train_p5 graph
    cmd = [sys.executable, *([] if torch else [str(LEAN)]), "-m", "pytest", *suites, "--bench-device",
           f"--bench-bundles={tmp_path / 'bundles'}", "-p", "no:cacheprovider", "-q",
           "-k", "not tflite", *args]  # LiteRT's export is the slow part; tests/test_arm64.py measures it in the root
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_the_device_subset_measures_kept_bundles_without_torch(tmp_path):
    first = _bench(tmp_path=tmp_path, torch=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    results = tmp_path / "device.json"
    second = _bench("--benchmark-only", f"--benchmark-json={results}", tmp_path=tmp_path, torch=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    data = json.loads(results.read_text())
    assert data["machine_info"]["baffle_edge"]["torch"] is None  # measured where torch is not installed
    ran = {(b["extra_info"].get("runtime"), b["extra_info"].get("stage")) for b in data["benchmarks"]}
    assert {("onnxruntime", "forward"), ("onnxruntime-int8", "forward"), (None, "bytes"),
            ("onnxruntime-int8", "batched_k")} <= ran, ran  # P > 1 from the kept train_p{P} graphs (no onnx)
    assert ("torch", "forward") not in ran  # torch's own cases skip, naming why
    assert "pip install torch" in second.stdout  # the torch runtime says what it lacks
    # every forward loss was checked against the torch reference the first run kept
    assert all(b["stats"]["rounds"] >= 1 for b in data["benchmarks"])

    empty = _bench("--benchmark-only", tmp_path=tmp_path / "none", torch=False)
    assert empty.returncode == 0 and "is not in --bench-bundles" in empty.stdout + empty.stderr  # skips, not errors
