"""bench-report on a small synthetic pytest-benchmark JSON: rows, targets and PNG files."""
import json

import pytest

from baffle_edge.bench_report import build_report
from baffle_edge.cli import main

MB = 1024 * 1024


def bench(stage, median, **extra):
    return {"group": stage, "name": f"test_{stage}", "fullname": f"benchmarks/x.py::test_{stage}",
            "stats": {"median": median, "mean": median, "min": median, "max": median, "rounds": 3},
            "extra_info": {"stage": stage, **extra}}


def mem(case, batch, mode, step_mb):
    return bench("memory", 2.0, case=case, model=case, batch=batch, mode=mode, step_peak_bytes=int(step_mb * MB),
                 peak_rss_bytes=int((300 + step_mb) * MB), optimizer_state_bytes=0, tracemalloc_peak_bytes=1000,
                 method="vmhwm-reset")


def synthetic():
    b = [
        bench("forward", 0.040, case="wrn-10-2", model="wrn-10-2", input="3x32x32", batch=32, runtime="torch",
              provider="cpu", dtype="fp32"),
        bench("forward", 0.016, case="wrn-10-2", model="wrn-10-2", input="3x32x32", batch=32,
              runtime="onnxruntime-int8", provider="cpu", dtype="int8"),
        bench("k_estimation", 1.3, case="lenet-8", model="lenet", runtime="torch", scheme="forward", K=100,
              forwards=101, round_s=1.3, forwards_s=1.0, ratio_to_forwards=1.3),
        bench("k_estimation", 0.11, case="lenet-8", model="lenet", runtime="torch", scheme="forward", K=10,
              forwards=11, round_s=0.11, forwards_s=0.1, ratio_to_forwards=1.1),
        bench("server", 0.5, case="lenet-8", model="lenet", params=26730, K=100, clients=10),
        bench("server-step", 0.002, case="lenet-8", model="lenet", params=26730, optimizer="adam"),
        mem("wrn-10-2", 128, "inference", 100.0), mem("wrn-10-2", 128, "baffle", 110.0),
        mem("wrn-10-2", 128, "bp-adam", 500.0), mem("wrn-10-2", 128, "bp-sgd", 450.0),
        bench("bytes", 1e-4, case="lenet-8", model="lenet", params=26730, K=100,
              upload_bytes={"baffle_json": 2300, "baffle_npz": 1500, "baffle_float32": 404, "fedsgd": 106920,
                            "fedavg": 106920},
              download_bytes={"baffle": 107200, "fedsgd": 106920, "fedavg": 106920}),
    ]
    return {"machine_info": {"cpu_model": "Test CPU 9000", "cores_logical": 2,
                             "baffle_edge": {"torch": "2.13.0", "runtimes": {"torch": "available"}}},
            "datetime": "2026-11-25T00:00:00", "benchmarks": b}


def row(md, *cells):
    """The Markdown table row that starts with ``cells``."""
    start = "| " + " | ".join(str(c) for c in cells) + " |"
    hits = [line for line in md.splitlines() if line.startswith(start)]
    assert hits, f"no row starting {start!r}"
    return hits[0]


def test_tables_targets_and_charts(tmp_path):
    r = build_report(synthetic(), tmp_path / "out")
    md = (tmp_path / "out" / "benchmarks.md").read_text()
    assert md == r.markdown and "Test CPU 9000" in md
    assert row(md, "wrn-10-2", "3x32x32", 32, "onnxruntime-int8", "int8", "cpu", "16.0")
    assert row(md, "torch", "lenet-8", "forward", 100, 101, "1.300", "1.000", "1.30", "**no**")
    assert row(md, "torch", "lenet-8", "forward", 10, 11).endswith("| 1.10 | yes |")
    assert row(md, "lenet-8", 26730, 100, 10, "0.500", "50.0")
    assert row(md, "wrn-10-2", 128, "baffle", "110.0", "410.0").split("|")[8].strip() == "1.10"
    assert row(md, "lenet-8", 26730, 100, "2.25", "1.46", "0.39", "104")  # KiB
    t = r.targets
    assert t["memory: BAFFLE <= 1.2 x inference (WRN-10-2, batch 128)"].startswith("PASS: 1.10")
    assert t["memory: backprop+Adam >= 3.0 x BAFFLE (WRN-10-2, batch 128)"].startswith("PASS: 4.55")
    assert t["latency: int8 forward >= 2.0 x faster than torch fp32 (WRN-10-2, batch 32)"].startswith("PASS: 2.50")
    assert t["K-estimation: client round <= 1.15 x (K+1) forwards"].startswith("FAIL: 1/2 rows hold; worst 1.30")
    for name in ("latency.png", "memory.png", "bytes.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in md


def test_failing_target_and_missing_suites(tmp_path):
    d = synthetic()
    d["benchmarks"] = [b for b in d["benchmarks"] if b["extra_info"]["stage"] == "memory"]
    d["benchmarks"][1]["extra_info"]["step_peak_bytes"] = 300 * MB  # BAFFLE 3x inference
    r = build_report(d, tmp_path)
    assert r.targets["memory: BAFFLE <= 1.2 x inference (WRN-10-2, batch 128)"].startswith("FAIL: 3.00")
    assert r.targets["latency: int8 forward >= 2.0 x faster than torch fp32 (WRN-10-2, batch 32)"].startswith(
        "not measured")
    assert {p.name for p in r.files} == {"benchmarks.md", "memory.png"}
    assert not (tmp_path / "latency.png").exists() and "## Forward latency" not in r.markdown


def test_cli(tmp_path, capsys):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(synthetic()))
    assert main(["bench-report", str(src), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "benchmarks.md").exists()
    assert "benchmarks.md" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "benchmarks"}')
    assert main(["bench-report", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    assert main(["bench-report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(ValueError, match="not a JSON file"):
        bad.write_text("{")
        build_report(bad, tmp_path / "y")


def test_batched_auto_p_and_litert_paths_sections(tmp_path):
    data = synthetic()
    data["machine_info"].update(kernel_paths={"mlas": "dotprod", "xnnpack": "dotprod"}, arm64_cpu_model="neoverse-n1")
    data["benchmarks"] += [
        bench("batched_k", 0.5, case="lenet-28", runtime="onnxruntime-int8", K=24, perturbations_per_call=5,
              round_s=0.5, sequential_round_s=1.0, speedup_vs_sequential=2.0, speedup_vs_torch_fp32_sequential=None),
        bench("auto_p", 0.3, case="lenet-8", runtime="onnxruntime-int8", threads=1, auto_p=10, auto_round_s=0.3,
              p1_round_s=0.6, speedup_auto_vs_p1=2.0),
        bench("tflite_paths", 0.01, case="lenet-28", runtime="tflite-int8",
              seconds_per_set={"builtin": 0.002, "xnnpack-inputs": 0.001},
              speedup_vs_builtin={"builtin": 1.0, "xnnpack-inputs": 2.0},
              max_logit_diff_vs_builtin={"builtin": 0.0, "xnnpack-inputs": 0.0123}),
    ]
    md = build_report(data, tmp_path).markdown
    row(md, "onnxruntime-int8", "lenet-28", 24, 5, "0.500", "1.000", "2.00x", "—")
    row(md, "onnxruntime-int8", "lenet-8", 1, 10, "0.300", "0.600", "2.00x")
    row(md, "lenet-28", "builtin", "2.000", "1.00x", "exact")
    row(md, "lenet-28", "xnnpack-inputs", "1.000", "2.00x", "0.0123")
    assert "arm64 int8 kernels: MLAS dotprod, XNNPACK dotprod; qemu CPU model neoverse-n1" in md
