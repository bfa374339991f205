"""arm64 for real: the ARM builds of ONNX Runtime, LiteRT and Node run the project's bundles in an arm64
Debian root under qemu-user (scripts/arm64-root; docs/arm64.md). Each kernel path is a qemu CPU model with a
matching /proc/cpuinfo: ``cortex-a53`` (plain NEON), ``neoverse-n1`` (dotprod: sdot/udot), ``max`` (dotprod +
i8mm: smmla/ummla). int8 losses must be bit-identical to this x86 host's on every path.

Skipped only when this machine cannot hold the root (not root, no qemu-user-static / mmdebstrap); under CI
(``CI`` set) that is a failure instead, and .ci/run installs what the root needs. Every emulated process is
bounded by a timeout; the server of the serve test listens on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "arm64-root"
PROBE = ROOT / "tests" / "arm64_probe.py"
CPUS = {"cortex-a53": (False, False), "neoverse-n1": (True, False), "max": (True, True)}  # asimddp, i8mm
LITERT_RELATIVE = 2e-5  # LiteRT aarch64 vs x86 int8 losses (measured 7.2e-6; see the test)
TIMEOUT = 600  # seconds one emulated command may take (the slowest here: ~2 min on 2 loaded cores)


def arm64(*cmd: str, cpu: str = "max", timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "run", "--cpu", cpu, *cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def root():
    r = subprocess.run([sys.executable, str(SCRIPT), "build"], capture_output=True, text=True, timeout=1800)
    if r.returncode == 3:  # Unavailable: not root, no qemu, no binfmt_misc
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the arm64 checks, but the root cannot be built: {r.stderr}")
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    from baffle_edge.conformance import write_kit
    out = tmp_path_factory.mktemp("arm64") / "kit"
    return out, write_kit(out, progress=False)


def test_the_script_refuses_bad_input():
    for args, want in ((["frobnicate"], "unknown command 'frobnicate'"), (["run", "--cpu", "pentium", "true"],
                       "unknown --cpu 'pentium'; known: cortex-a53, neoverse-n1, max"), (["build", "--fast"],
                       "build takes only --force"), (["bench", "--out", "/etc/x"], "must be under /tmp or the project"),
                       (["bench", "--frob"], "bench takes --cpu CPU, --out DIR and -- PYTEST_ARGS")):
        r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and want in r.stderr, (args, r.stderr)
    assert "kernel" in subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("cpu", list(CPUS))
def test_kit_replays_bit_identically_on_ort_aarch64(root, kit, cpu):
    path, index = kit
    # every round on `max`; on the other paths the int8 rounds (their GEMM is what the path changes), to bound CI
    rounds = [r["name"] for r in index["rounds"] if cpu == "max" or r["format"] == "onnx-int8"]
    assert rounds and (cpu != "max" or len(rounds) == len(index["rounds"]))
    only = " ".join(f"--round {name}" for name in rounds)
    r = arm64("sh", "-c", f"python3 {PROBE.relative_to(ROOT)} --cpu && python3 -m baffle_edge check-kit {path} {only}",
              cpu=cpu)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.loads(r.stdout.splitlines()[0])
    assert info["machine"] == "aarch64" and info["target"] == "arm64" and info["emulated"]
    assert (info["asimddp"], info["i8mm"]) == CPUS[cpu], info  # the kernel path this run took
    assert f"check-kit: {len(rounds)} round(s) match, 0 differ" in r.stdout
    assert all("max rel 0 " in ln for ln in r.stdout.splitlines() if "onnxruntime-int8" in ln)  # int8: bit for bit
    assert "cpuinfo_initialize failed" not in r.stderr and "Error in cpuinfo" not in r.stderr, r.stderr[-2000:]
    # the kit's bundle is this x86 host's target: an arm64 client warns (and still matches)
    from baffle_edge.targets import Target, bundle_target
    made_for = bundle_target(json.loads((path / "bundle" / "baffle.json").read_text()))
    assert made_for is not Target.ARM64  # the kit's bundle is written for this x86 host
    assert "TargetMismatchWarning" in r.stderr and f"exported for target '{made_for.value}' runs on a 'arm64'" in r.stderr


@pytest.fixture(scope="module")
def tflite_case(tmp_path_factory, digits):
    pytest.importorskip("ai_edge_litert", reason="pip install 'baffle-edge[tflite]'")
    from baffle_edge.export.bundle import ExportConfig, export_bundle
    from baffle_edge.models import ModelConfig, build_model
    from baffle_edge.params import flat_params
    from baffle_edge.protocol import Domain, RoundTask, model_version
    d = tmp_path_factory.mktemp("arm64-tflite")
    model = build_model(ModelConfig(), seed=0).eval()
    export_bundle(model, ModelConfig(), digits, d / "bundle", ExportConfig(formats=("tflite-int8",), target="arm64"))
    w = flat_params(model).numpy().astype(np.float32)
    np.savez(d / "case.npz", w=w, x=digits.x_train[:32], y=digits.y_train[:32])
    task = RoundTask(round=3, client=1, seed=11, k=12, sigma=1.0, noise="rademacher", domain=Domain.INT8_STEP,
                     model_version=model_version(w))
    (d / "task.json").write_text(task.to_json())
    host = probe_here("tflite-int8", d)
    return d, host


def probe_here(runtime: str, d: Path) -> dict:
    r = subprocess.run([sys.executable, str(PROBE), runtime, str(d / "bundle"), str(d / "case.npz"),
                        str(d / "task.json")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("cpu", ["cortex-a53", "max"])
def test_litert_aarch64_losses_equal_x86_bit_for_bit(root, tflite_case, cpu):
    d, host = tflite_case
    r = arm64("python3", str(PROBE), "tflite-int8", str(d / "bundle"), str(d / "case.npz"), str(d / "task.json"),
              cpu=cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["cpu"]["target"] == "arm64" and (got["cpu"]["asimddp"], got["cpu"]["i8mm"]) == CPUS[cpu]
    assert not got["torch_loaded"]
    ours, x86 = (np.array([float.fromhex(v) for v in r["losses"]]) for r in (got, host))
    assert ours.size == x86.size == 13
    # not bit for bit: LiteRT's ARM int8 CONV_2D rounds a few requantized outputs one step apart from x86's
    # (19 of 32,768 here) and the float head (DEQUANTIZE + FULLY_CONNECTED) rounds differently (~1e-7):
    # measured 7.2e-6 relative on every ARM path (docs/arm64.md); ORT's int8 is bit-identical (test above)
    assert np.max(np.abs(ours - x86) / np.abs(x86)) <= LITERT_RELATIVE
    assert not [w for w in got["warnings"] if "TargetMismatch" in w], got["warnings"]  # an arm64 bundle on arm64
    assert [w for w in host["warnings"] if "TargetMismatch" in w]  # ... and on this x86 host it warns


def test_node_arm64_replays_the_kit(root, kit):
    cli = ROOT / "clients" / "js" / "dist" / "src" / "cli.js"
    if not cli.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{cli} is not built (.ci/run builds clients/js before pytest)")
        pytest.skip("clients/js is not built: (cd clients/js && npm ci --ignore-scripts && npm run build)")
    path, index = kit
    r = arm64("sh", "-c", f"node -p process.arch && node {cli} conformance {path}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == "arm64"
    oks = [ln for ln in r.stdout.splitlines()[1:] if ln.startswith("ok ")]
    assert len(oks) == len(index["rounds"]) and "FAIL" not in r.stdout, r.stdout
    int8 = [ln for ln in oks if ln.split()[1].startswith("int8")]
    assert int8 and all("max relative difference 0.00e+0," in ln for ln in int8), int8  # bit for bit


def test_an_arm64_device_trains_a_bundle_exported_on_x86_through_serve(root, tmp_path):
    pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")
    from baffle_edge.cli import main as cli
    from baffle_edge.gateway import tokens as tk
    # isotropic noise: the torch-int8 oracle has no block rows (its default stays isotropic; block rows on
    # ORT aarch64 are checked bit for bit by the kit's block rounds above)
    run = ["--clients", "1", "--k", "4", "--rounds", "2", "--eval-every", "1", "--no-progress", "--noise", "rademacher",
           "--runtime", "onnxruntime-int8", "--target", "arm64"]
    # the same run on x86 through the torch-int8 oracle (exact integer arithmetic on any CPU) and, on an x86
    # CPU that accumulates int8 in int32 (VNNI), through ONNX Runtime itself; on AVX2 without VNNI ORT's
    # int16 pair sums saturate on an arm64 bundle's full-range weights (TargetMismatchWarning says so)
    run_oracle = [*run[:-4], "--runtime", "torch-int8", "--target", "arm64"]
    assert cli(["train", *run_oracle, "--out", str(tmp_path / "oracle")]) == 0
    from baffle_edge.targets import Target, detect
    exact_here = detect() is not Target.X86_AVX2
    if exact_here:
        assert cli(["train", *run, "--out", str(tmp_path / "ref")]) == 0
    (tmp_path / "toks").mkdir()
    for c in range(1):  # one emulated device: two on 2 shared cores took 6 min
        (tmp_path / "toks" / f"client-{c}.token").write_text(tk.issue(tmp_path / "tokens.json", c)[1])
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "baffle_edge", "serve", "--tokens", "tokens.json", "--port",
                               "0", "--linger", "1", "--round-timeout", "600", *run, "--demo-data", "--out", "run"],
                              stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path)
    devices = []
    try:
        line = server.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + (tmp_path / "serve.log").read_text()
        url = "http://127.0.0.1:" + line.split("127.0.0.1:")[1].split()[0]
        devices = [subprocess.Popen([sys.executable, str(SCRIPT), "run", "python3", "-m", "baffle_edge", "device",
                                     "--server", url, "--token", str(tmp_path / "toks" / f"client-{c}.token")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
                   for c in range(1)]
        assert server.wait(TIMEOUT) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        outs = [d.communicate(timeout=120)[0] for d in devices]
        assert all(d.returncode == 0 for d in devices), outs
    finally:
        for p in [server, *devices]:
            if p.poll() is None:
                p.kill()
                p.wait()
        log.close()
    assert not any("TargetMismatchWarning" in o for o in outs), outs  # an arm64 bundle on an arm64 device
    def rounds(folder: str) -> list[dict]:
        return json.loads((tmp_path / folder / "metrics.json").read_text())["rounds"]
    got, oracle = rounds("run"), rounds("oracle")
    assert [r["clients_accepted"] for r in got] == [1, 1] and not any(r["rejected"] for r in got)
    for ours, want in zip(got, oracle, strict=True):  # the oracle's float losses round 1e-10 apart from int8 kernels'
        assert ours["test_accuracy"] == want["test_accuracy"] and ours["applied"] and want["applied"]
        assert abs(ours["train_loss"] - want["train_loss"]) <= 1e-9 * want["train_loss"], (ours, want)
        assert abs(ours["test_loss"] - want["test_loss"]) <= 1e-6 * want["test_loss"], (ours, want)
    if exact_here:  # int8 ORT on x86 with int32 sums: the same metrics, bit for bit
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in got] == \
            [{k: v for k, v in r.items() if k != "seconds"} for r in rounds("ref")]


def test_bench_report_says_emulated_times_are_not_device_speed(tmp_path):
    from baffle_edge.bench_report import build_report
    info = {"cpu_model": "0xd49 (arm64)", "cpu_isa": ["asimd", "asimddp", "i8mm"], "cpu_target": "arm64",
            "kernel_path": "i8mm", "emulated": "qemu-user: this arm64 root runs emulated on an x86 host"}
    md = build_report({"machine_info": info, "benchmarks": []}, tmp_path).markdown
    assert "emulation time, not the speed of a device" in md and "arm64 int8 kernels: MLAS i8mm" in md
    info["emulated"] = "qemu-user"
    kest = [{"stage": "k_estimation", "runtime": "onnxruntime", "case": "lenet-8", "scheme": "forward", "K": 10,
             "ratio_to_forwards": 1.4}]
    md = build_report({"machine_info": info, "benchmarks": [{"stats": {"median": 1.0}, "extra_info": e}
                                                             for e in kest]}, tmp_path).markdown
    assert "not judged (emulated CPU; measured FAIL: 0/1 rows hold" in md  # a speed target is not judged emulated
    info.pop("emulated")
    assert "emulation time" not in build_report({"machine_info": info, "benchmarks": []}, tmp_path).markdown


def test_emulation_is_detected_from_the_mark_or_an_x86_cpuinfo(tmp_path, monkeypatch):
    from baffle_edge import targets
    mark, cpuinfo = tmp_path / "mark", tmp_path / "cpuinfo"
    assert targets.emulated(mark, cpuinfo) is None
    mark.write_text("qemu-user: test\n")
    assert targets.emulated(mark, cpuinfo) == "qemu-user: test"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t: fpu avx2\n")
    monkeypatch.setattr(targets.platform, "machine", lambda: "aarch64")
    assert "qemu-user" in targets.emulated(tmp_path / "none", cpuinfo)
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0c\n")
    assert targets.emulated(tmp_path / "none", cpuinfo) is None


BENCH_SUBSET = "forward_latency or tflite_kernel_paths or bytes"  # CI's bound; `bench` alone runs the whole device subset


def test_the_benchmark_suites_run_in_the_root_without_torch_and_say_so(root, tmp_path):
    """`scripts/arm64-root bench`: the host exports the device subset's bundles (--bench-bundles), the root
    measures them with pytest-benchmark (no torch there), bench-report renders it as emulation times."""
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, str(SCRIPT), "bench", "--cpu", "neoverse-n1", "--out", str(out), "--",
                        "-k", BENCH_SUBSET], capture_output=True, text=True, timeout=2 * TIMEOUT, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    data = json.loads((out / "arm64-neoverse-n1.json").read_text())
    m = data["machine_info"]
    assert m["machine"] == "aarch64" and m["cpu_target"] == "arm64" and m["emulated"]
    assert m["kernel_paths"] == {"mlas": "dotprod", "xnnpack": "dotprod"} and m["arm64_cpu_model"] == "neoverse-n1"
    assert m["baffle_edge"]["torch"] is None and m["baffle_edge"]["onnxruntime"]  # the device install
    ran = {(b["extra_info"].get("runtime"), b["extra_info"].get("stage")) for b in data["benchmarks"]}
    assert {("onnxruntime", "forward"), ("onnxruntime-int8", "forward"), ("tflite-int8", "forward"),
            ("tflite-int8", "tflite_paths"), (None, "bytes")} <= ran, ran
    paths = next(b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("stage") == "tflite_paths")
    assert paths["exact"]["builtin"]  # the runtime's path; XNNPACK's ARM kernels ran beside it (their diff recorded)
    assert {"xnnpack-inputs", "xnnpack-rebuild"} <= set(paths["max_logit_diff_vs_builtin"])
    md = (out / "report" / "benchmarks.md").read_text()
    assert "emulation time, not the speed of a device" in md
    assert "arm64 int8 kernels: MLAS dotprod, XNNPACK dotprod; qemu CPU model neoverse-n1" in md
