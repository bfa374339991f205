"""Export targets (baffle_edge/targets.py): the target decides the int8 weight range, the bundle
records it, a client on another CPU warns, and int8 accuracy holds per target."""
import json
import warnings

import numpy as np
import pytest
import torch

from baffle_edge import targets
from baffle_edge.export.bundle import ExportConfig, export_bundle
from baffle_edge.models import ModelConfig
from baffle_edge.runtimes import get_runtime
from baffle_edge.targets import Target, TargetMismatchWarning
from bundles import accuracy_of, trained_lenet

RANGES = {"arm64": 127, "x86-vnni": 127, "x86-avx2": 64}


@pytest.fixture(scope="module")
def model(digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster, and much faster on a loaded machine
    try:
        return trained_lenet(digits)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundles(model, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    for name in RANGES:
        export_bundle(model, ModelConfig(), digits, root / name,
                      ExportConfig(formats=("onnx-int8",), calibration_samples=128, target=name))
    return root


def test_detect_from_machine_and_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_int8\n\nprocessor\t: 1\n")
    flags = targets.cpu_flags(info)
    assert {"avx2", "avx512_vnni", "amx_int8"} <= flags
    assert targets.detect("x86_64", flags) is Target.X86_VNNI
    assert targets.detect("x86_64", frozenset({"avx2", "fma"})) is Target.X86_AVX2
    assert targets.detect("AMD64", frozenset({"avx2", "avx_vnni"})) is Target.X86_VNNI
    assert targets.detect("aarch64", frozenset()) is Target.ARM64
    assert targets.cpu_flags(tmp_path / "missing") == frozenset()
    with pytest.raises(ValueError, match="riscv64"):
        targets.detect("riscv64", frozenset())
    assert targets.resolve("auto") is targets.detect()
    with pytest.raises(ValueError, match="x86-avx2"):
        ExportConfig(target="x86")


def test_the_target_decides_the_int8_range(bundles):
    for name, qmax in RANGES.items():
        meta = json.loads((bundles / name / "baffle.json").read_text())
        assert meta["target"]["name"] == name and meta["target"]["int8_weight_range"] == [-qmax, qmax]
        assert meta["formats"]["onnx-int8"]["reduce_range"] is (qmax == 64)
        weights = [t for t in meta["formats"]["onnx-int8"]["quantization"] if t["dtype"] == "int8"]
        # perturbed integers stay in the target's symmetric range: the table's [lo, hi] is int8_weight_range
        assert weights and all(t["qmax"] == qmax and [t["lo"], t["hi"]] == meta["target"]["int8_weight_range"]
                               for t in weights)
        import onnx
        from onnx import numpy_helper
        graph = onnx.load(str(bundles / name / "model.int8.onnx")).graph
        stored = [numpy_helper.to_array(i) for i in graph.initializer if i.name == weights[0]["input"]][0]
        assert np.abs(stored).max() <= qmax and np.abs(stored).max() > 64 - (qmax == 64) * 1  # range is used
        assert f"**{name}**" in (bundles / name / "README.md").read_text()


def test_mismatch_warning(bundles, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetMismatchWarning)
        monkeypatch.setattr(targets, "detect", lambda *a: Target.ARM64)
        get_runtime("onnxruntime-int8").load(bundles / "arm64")  # same target: silent
        get_runtime("torch-int8").load(bundles / "x86-avx2")  # the oracle executes any range anywhere
    with pytest.warns(TargetMismatchWarning, match="'x86-avx2'.*'arm64'.*7-bit"):
        get_runtime("onnxruntime-int8").load(bundles / "x86-avx2")
    monkeypatch.setattr(targets, "detect", lambda *a: Target.X86_AVX2)
    with pytest.warns(TargetMismatchWarning, match="'arm64'.*'x86-avx2'.*saturate"):
        get_runtime("onnxruntime-int8").load(bundles / "arm64")
    legacy = json.loads((bundles / "x86-avx2" / "baffle.json").read_text())
    del legacy["target"]  # bundles from before targets: 7-bit ones were made for x86-avx2
    assert targets.bundle_target(legacy) is Target.X86_AVX2


def test_int8_accuracy_per_target(model, bundles, digits):
    """Float vs int8 test accuracy per target, through the oracle (float32 fake quantization executes
    any range on any CPU); ORT's integer kernels are checked where this CPU runs them exactly."""
    x, y = digits.x_test, digits.y_test
    with torch.no_grad():
        ref = accuracy_of(lambda b: model(torch.from_numpy(b)).numpy(), x, y)
    here = targets.detect()
    acc = {}
    for name in RANGES:
        oracle = get_runtime("torch-int8").load(bundles / name)
        oracle.set_weights(_flat(model))
        acc[name] = accuracy_of(oracle.logits, x, y)
        assert acc[name] >= ref - 0.03, (name, acc[name], ref)
        if here is Target(name) or (here is not Target.X86_AVX2 and name != "x86-avx2"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TargetMismatchWarning)
                ort8 = get_runtime("onnxruntime-int8").load(bundles / name)
            ort8.set_weights(_flat(model))
            assert abs(accuracy_of(ort8.logits, x, y) - acc[name]) <= 1 / len(y) + 1e-9
    print(f"\nfloat {ref:.4f}, int8 per target (oracle): {acc}")


def _flat(model):
    from baffle_edge.params import flat_params
    return flat_params(model).numpy()
