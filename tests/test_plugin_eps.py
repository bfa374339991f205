"""Plugin execution providers (runtimes/plugin_eps.py): the QNN HTP backend (simulated on x86) and
OpenVINO through ONNX Runtime's plugin EP API; placement read from the profile, the write-check,
and the errors a user meets. Skipped where the extra is not installed."""
from __future__ import annotations

import numpy as np
import pytest

from baffle_edge.runtimes.onnxruntime_runtime import make_session, plugin_providers
from baffle_edge.runtimes.plugin_eps import PLUGINS, placement, plugin_module, write_check


def qdq_matmul(per_tensor: bool = True) -> bytes:
    """X[batch,4] -> QDQ -> MatMul(DQ(W int8 input, per-tensor scale)) -> QDQ -> Y."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.array(0.1, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.2, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"], name="head"),
             helper.make_node("QuantizeLinear", ["m", "ys", "yz"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "ys", "yz"], ["Y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4]),
                                         helper.make_tensor_value_info("W", TensorProto.INT8, [4, 3])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def feeds():
    rng = np.random.default_rng(0)
    return {"X": rng.random((2, 4), dtype=np.float32) * 5, "W": rng.integers(-20, 20, (4, 3)).astype(np.int8)}


@pytest.fixture
def qnn():
    pytest.importorskip("onnxruntime_qnn", reason="pip install 'baffle-edge[qnn]'")


def test_unknown_provider_lists_plugins():
    with pytest.raises(ValueError, match="qnn-htp"):
        make_session(b"", provider="hexagon")


def test_static_batch_required(qnn):
    with pytest.raises(ValueError, match="static batch"):
        make_session(qdq_matmul(), provider="qnn-htp")


def test_qnn_htp_runs_weight_input_and_reports_placement(qnn):
    s = make_session(qdq_matmul(), provider="qnn-htp", batch=2, profile=True)
    f = feeds()
    write_check(s, f, "W", "Y")  # a changed int8 weight changes the HTP output
    p = placement(s.end_profiling(), "qnn-htp")
    # the HTP runs the quantized core (one fused QNN node); only the float-boundary Q/DQ stay on CPU
    assert p.on_device == 1 and {p.nodes[n][0] for n in p.fallback()} <= {"QuantizeLinear", "DequantizeLinear"}, \
        p.to_json()
    assert "qnn-htp" in plugin_providers()
    cpu = make_session(qdq_matmul(), provider="cpu").run(["Y"], f)[0]
    htp = make_session(qdq_matmul(), provider="qnn-htp", batch=2).run(["Y"], f)[0]
    assert np.max(np.abs(htp - cpu)) <= 0.2 + 1e-6  # within one output quantization step (scale 0.2)


def test_write_check_refuses_stale_weights():
    class Stale:  # an EP that packed its weights: the output never moves
        def run(self, names, f):
            return [np.ones((2, 3), np.float32)]
    with pytest.raises(ValueError, match="write-check failed.*'W'"):
        write_check(Stale(), feeds(), "W", "Y")


def test_missing_package_names_the_extra(monkeypatch):
    import importlib
    real = importlib.import_module

    def blocked(name, *a):
        if name == PLUGINS["openvino"].package:
            raise ImportError("blocked")
        return real(name, *a)
    monkeypatch.setattr(importlib, "import_module", blocked)
    with pytest.raises(ImportError, match=r"baffle-edge\[openvino\]"):
        plugin_module("openvino")


def export(tmp_path, *extra):
    pytest.importorskip("torch")
    import subprocess
    import sys
    out = tmp_path / "b"
    subprocess.run([sys.executable, "-m", "baffle_edge", "export", "--model", "lenet", "--out", str(out), *extra],
                   check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_per_channel_bundle_on_htp_fails_with_the_cause(qnn, tmp_path):
    """The CPU targets' int8 train graph (per-channel conv weights as inputs) is refused by the HTP:
    the error says why, at the first batch, instead of running silently on CPU."""
    from baffle_edge.runtimes import get_runtime
    s = get_runtime("onnxruntime-int8", provider="qnn-htp").load(export(tmp_path))
    with pytest.raises(ValueError, match="per-channel int8 conv weights"):
        s.prepare(np.zeros((4, 1, 8, 8), np.float32))


def test_qnn_htp_target_bundle_convs_on_htp(qnn, tmp_path):
    """--target qnn-htp: per-tensor weights, recorded; both convs run in one HTP partition, the head
    (QGemm) and the input quantizer fall back to CPU (named), the write-check passes, and the HTP
    logits stay within 5% of the largest CPU int8 logit on the same integers (measured: 3%)."""
    import json
    from baffle_edge.runtimes import get_runtime
    out = export(tmp_path, "--target", "qnn-htp")
    meta = json.loads((out / "baffle.json").read_text())
    assert meta["formats"]["onnx-int8"]["per_channel"] is False
    w = np.random.default_rng(1).normal(0, 0.1, int(meta["model"]["parameters"])).astype(np.float32)
    x = np.random.default_rng(2).random((8, 1, 8, 8), dtype=np.float32)
    htp, cpu = (get_runtime("onnxruntime-int8", provider=p).load(out) for p in ("qnn-htp", "cpu"))
    for s in (htp, cpu):
        s.set_weights(w)
    xh, xc = htp.prepare(x), cpu.prepare(x)
    assert htp.placement.on_device == 1
    assert {htp.placement.nodes[n][0] for n in htp.placement.fallback()} == {"QGemm", "QuantizeLinear"}
    q = htp.weight_set(0, None, None)
    a, b = htp.forward(xh, q), cpu.forward(xc, q)
    assert a.shape == b.shape == (8, 10)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max() + 1e-6, (np.abs(a - b).max(), np.abs(b).max())
