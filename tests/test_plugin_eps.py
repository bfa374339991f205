"""Plugin execution providers (runtimes/plugin_eps.py): the QNN HTP backend (simulated on x86) and
OpenVINO through ONNX Runtime's plugin EP API; placement read from the profile, the write-check,
and the errors a user meets. Skipped where the extra is not installed."""
from __future__ import annotations

import numpy as np
import pytest

from baffle_edge.targets import cpu_vendor
from baffle_edge.runtimes.onnxruntime_runtime import make_session, plugin_providers
from baffle_edge.runtimes.plugin_eps import PLUGINS, node_macs, placement, plugin_module, write_check


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
    nodes = [helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["wd"], name="dq_w"),
             helper.make_node("MatMul", ["xd", "wd"], ["m"], name="head"),
             helper.make_node("QuantizeLinear", ["m", "ys", "yz"], ["mq"], name="q_y"),
             helper.make_node("DequantizeLinear", ["mq", "ys", "yz"], ["Y"], name="dq_y")]
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
    import onnx
    s = make_session(qdq_matmul(), provider="qnn-htp", batch=2)
    f = feeds()
    write_check(s, f, "W", "Y")  # a changed int8 weight changes the HTP output
    p = placement(s, onnx.load_from_string(qdq_matmul()), "qnn-htp", batch=2, weights=["W"])
    # the HTP runs the quantized core; only the float-boundary Q/DQ stay on CPU; the MatMul's 2x3x4 MACs on it
    assert p.nodes["head"] == ("MatMul", "qnn-htp") and p.macs == {"head": 24} and p.device_mac_share == 1.0, \
        p.to_json()
    assert {p.nodes[n][0] for n in p.fallback()} <= {"QuantizeLinear", "DequantizeLinear"}, p.to_json()
    assert p.weights == {"W": ["dq_w"]} and p.nodes["dq_w"][1] == "qnn-htp" and p.weights_on("cpu") == [], p.to_json()
    assert "qnn-htp" in plugin_providers()
    cpu = make_session(qdq_matmul(), provider="cpu").run(["Y"], f)[0]
    htp = make_session(qdq_matmul(), provider="qnn-htp", batch=2).run(["Y"], f)[0]
    assert np.max(np.abs(htp - cpu)) <= 0.2 + 1e-6  # within one output quantization step (scale 0.2)


def test_node_macs_by_hand():
    """Conv: output elements x Cin/group x kernel area; Gemm (transB): output elements x K; a symbolic
    batch is fixed first; a node without static shapes is a ValueError."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.zeros((6, 2, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.zeros((5, 6 * 4 * 4), np.float32), "fc")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="flat"),
             helper.make_node("Gemm", ["r", "fc"], ["y"], name="gemm", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], [w, fc, shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert node_macs(m, 3) == {"conv": ("Conv", 3 * 6 * 16 * 2 * 9), "gemm": ("Gemm", 3 * 5 * 96)}
    g = m.graph  # make_model copied the graph
    g.initializer.remove(g.initializer[1])  # the head's weight becomes an input of unknown shape
    g.input.append(helper.make_tensor_value_info("fc", TensorProto.FLOAT, None))
    with pytest.raises(ValueError, match="gemm.*static shapes"):
        node_macs(m, 3)


def test_write_check_refuses_stale_weights():
    class Stale:  # an EP that packed its weights: the output never moves
        def run(self, names, f):
            return [np.ones((2, 3), np.float32)]
    with pytest.raises(ValueError, match="write-check failed.*'W'"):
        write_check(Stale(), feeds(), "W", "Y")


def test_cpu_vendor_reads_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert cpu_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\nBogoMIPS\t: 48.00\n")  # arm64 kernels give no vendor_id
    assert cpu_vendor(str(info)) is None and cpu_vendor(str(tmp_path / "absent")) is None


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


def device_and_cpu(bundle, provider: str):
    """The bundle's onnxruntime-int8 sessions on ``provider`` and on CPU at the same N(0, 0.1) weights, and a batch
    of 8 digits-shaped inputs prepared by each: (device, cpu, x_device, x_cpu)."""
    import json
    from baffle_edge.runtimes import get_runtime
    meta = json.loads((bundle / "baffle.json").read_text())
    w = np.random.default_rng(1).normal(0, 0.1, int(meta["model"]["parameters"])).astype(np.float32)
    x = np.random.default_rng(2).random((8, 1, 8, 8), dtype=np.float32)
    dev, cpu = (get_runtime("onnxruntime-int8", provider=p).load(bundle) for p in (provider, "cpu"))
    for s in (dev, cpu):
        s.set_weights(w)
    return dev, cpu, dev.prepare(x), cpu.prepare(x)


@pytest.mark.slow
def test_per_channel_bundle_on_htp_fails_with_the_cause(qnn, tmp_path):
    """The CPU targets' int8 train graph (per-channel conv weights as inputs) is refused by the HTP:
    the error says why, at the first batch, instead of running silently on CPU."""
    from baffle_edge.runtimes import get_runtime
    s = get_runtime("onnxruntime-int8", provider="qnn-htp").load(export(tmp_path))
    with pytest.raises(ValueError, match="per-channel int8 conv weights"):
        s.prepare(np.zeros((4, 1, 8, 8), np.float32))


def test_qnn_htp_target_bundle_wholly_on_htp(qnn, tmp_path):
    """--target qnn-htp: per-tensor weights and a uint16 head output, recorded; 100% of the LeNet train
    graph's MACs (both convs and the Gemm head) run on the HTP; the one perturbed tensor consumed on CPU is
    fc.bias (its DequantizeLinear, 0 MACs: the HTP takes a dynamic int32 bias only with an 8-bit output);
    every weight input passed the write-check at prepare; HTP logits within 8 uint16 output steps of the
    CPU int8 session on the same integers (measured: 1.95e-3 = 2 steps of 9.8e-4; the logits span +-32)."""
    import json

    import onnx
    out = export(tmp_path, "--target", "qnn-htp")
    entry = json.loads((out / "baffle.json").read_text())["formats"]["onnx-int8"]
    assert entry["per_channel"] is False and entry["logits"] == "uint16"
    htp, cpu, xh, xc = device_and_cpu(out, "qnn-htp")
    p = htp.placement
    assert p.device_mac_share == 1.0 and p.macs_on_device == 8 * (16 * 64 * 25 + 64 * 16 * 400 + 10 * 64), p.to_json()
    assert p.nodes["/fc/Gemm"] == ("Gemm", "qnn-htp"), p.to_json()
    assert p.weights_on("cpu") == ["fc.bias_quantized"] and p.weights_on("unassigned") == [], p.to_json()
    q = htp.weight_set(0, None, None)
    a, b = htp.forward(xh, q), cpu.forward(xc, q)
    graph = onnx.load(str(out / "model.int8.train.onnx"))
    step = next(float(onnx.numpy_helper.to_array(i)) for i in graph.graph.initializer if i.name == "logits_scale")
    assert a.shape == b.shape == (8, 10)
    assert np.abs(a - b).max() <= 8 * step + 1e-7, (np.abs(a - b).max() / step, np.abs(b).max())


def test_cpu_targets_keep_float_logits(tmp_path):
    """Only the qnn-htp target requantizes the head: the CPU targets' int8 graph still ends in the float Gemm
    at opset 17 (the graphs were compared byte for byte with the previous export: identical)."""
    import json

    import onnx
    from baffle_edge import targets
    assert [t.value for t, s in targets.SPECS.items() if s.logits != "float"] == ["qnn-htp"]
    out = export(tmp_path, "--target", "x86-vnni", "--formats", "onnx-int8")
    g = onnx.load(str(out / "model.int8.train.onnx"))
    assert g.graph.node[-1].op_type == "Gemm" and g.graph.node[-1].output[0] == "logits"
    assert [o.version for o in g.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert "logits" not in json.loads((out / "baffle.json").read_text())["formats"]["onnx-int8"]


def train_round(out, *provider_and_target):
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "baffle_edge", "train", "--runtime", "onnxruntime-int8", *provider_and_target,
                    "--rounds", "1", "--k", "2", "--clients", "1", "--batch-size", "16", "--workers", "1",
                    "--no-progress", "--noise", "rademacher", "--out", str(out)], check=True, capture_output=True,
                   timeout=300)


def test_train_round_and_runtimes_report_placement_on_htp(qnn, tmp_path):
    """One short HTP training round records the placement in metrics.json; `baffle-edge runtimes
    --placement` reports the same figures (all MACs on the HTP; fc.bias's DequantizeLinear on CPU)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "run"
    train_round(out, "--provider", "qnn-htp", "--target", "qnn-htp")
    placed = json.loads((out / "metrics.json").read_text())["placement"]
    assert placed["provider"] == "qnn-htp" and placed["device_mac_share"] == 1.0, placed
    assert placed["weights_consumed_on_cpu"] == ["fc.bias_quantized"], placed
    bundle = export(tmp_path, "--target", "qnn-htp")  # the run's own bundle is a temporary
    r = subprocess.run([sys.executable, "-m", "baffle_edge", "runtimes", "--placement", str(bundle), "--batch", "16",
                        "--json"], check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(r.stdout)  # the QNN library's LIBNATIVE line goes to stderr (plugin_eps.stdout_to_stderr)
    assert {k: report[k] for k in ("macs", "device_mac_share", "weights_consumed_on_cpu")} == \
        {k: placed[k] for k in ("macs", "device_mac_share", "weights_consumed_on_cpu")}
    bad = subprocess.run([sys.executable, "-m", "baffle_edge", "runtimes", "--placement", str(bundle), "--provider",
                          "cpu"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "plugin EP" in bad.stderr


def test_openvino_runs_the_int8_train_graph_wholly(tmp_path):
    """OpenVINO (its CPU plugin here: no Intel NPU on this machine) takes the CPU targets' int8 train graph,
    per-channel weights as inputs, whole: every node and MAC, every weight input write-checked; logits within
    2% of the largest CPU int8 logit on the same integers (measured: 0.4%)."""
    pytest.importorskip("onnxruntime_ep_openvino", reason="pip install 'baffle-edge[openvino]'")
    import json
    out = export(tmp_path, "--target", "x86-vnni", "--formats", "onnx-int8")
    vendor = cpu_vendor()
    if vendor not in PLUGINS["openvino"].cpu_vendors:  # the plugin offers no device here: the error says why
        with pytest.raises(ValueError, match=rf"Intel devices only.*vendor is '{vendor}'"):
            device_and_cpu(out, "openvino")
        pytest.skip(f"onnxruntime-ep-openvino offers Intel devices only; this CPU is {vendor!r} "
                    "(the error naming it was checked)")
    ov, cpu, xo, xc = device_and_cpu(out, "openvino")
    p = ov.placement
    assert p.device_mac_share == 1.0 and p.fallback() == [] and p.weights_on("cpu", "unassigned") == [], p.to_json()
    q = ov.weight_set(0, None, None)
    a, b = ov.forward(xo, q), cpu.forward(xc, q)
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())
    train_round(tmp_path / "run", "--provider", "openvino")  # one short round, placement in metrics.json
    placed = json.loads((tmp_path / "run" / "metrics.json").read_text())["placement"]
    assert placed["provider"] == "openvino" and placed["device_mac_share"] == 1.0, placed


def test_block_noise_runs_incrementally_on_the_htp(qnn, tmp_path):
    """Block noise on the HTP: the segment sessions get the static batch and every segment call takes exactly
    B rows; the incremental losses follow the HTP's own full forwards (not bit-exact: the segments requantize at
    their boundaries; measured 3.6e-4 against a loss-difference rms of 1.6e-4 at K = 40, cosine of the
    differences checked) — stale segment weights would make every row's loss the unperturbed one."""
    import json
    from baffle_edge.client import Batch
    from baffle_edge.protocol import RoundTask
    from baffle_edge.runtimes import get_runtime
    out = export(tmp_path, "--target", "qnn-htp", "--formats", "onnx-int8")
    meta = json.loads((out / "baffle.json").read_text())
    rng = np.random.default_rng(1)
    s = get_runtime("onnxruntime-int8", provider="qnn-htp").load(out)
    s.set_weights(rng.normal(0, 0.1, int(meta["model"]["parameters"])).astype(np.float32))
    batch = Batch(rng.random((16, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 16))
    task = RoundTask.for_domain("int8-step", round=0, client=0, seed=7, k=40, sigma=1.0, scheme="forward",
                                model_version="", noise="block")
    fwd = s.block_forward  # asked for before the batch is known, as clients do: its sessions wait for cache(x)
    assert fwd is not None and fwd.static_batch and fwd.sessions is None
    inc = s.losses(batch, task)
    assert fwd.sessions is not None  # the rows ran through the block segments
    s.block_forward = None
    full = s.losses(batch, task)
    d_inc, d_full = inc[1:] - inc[0], full[1:] - full[0]
    assert np.abs(inc - full).max() <= 2e-3, np.abs(inc - full).max()  # 2 uint16 logit steps
    assert d_inc @ d_full / np.linalg.norm(d_inc) / np.linalg.norm(d_full) > 0.5


def test_qnn_context_binary_keeps_weight_inputs(qnn, tmp_path):
    """docs/npu.md "Snapdragon": a QNN context model (`ep.context_enable`) compiled once from the qnn-htp train
    graph loads without compiling, gives the compiled session's logits bit for bit, and still takes the weights as
    inputs (a changed weight changes its output)."""
    import onnxruntime as ort
    from baffle_edge.runtimes.plugin_eps import add_plugin

    def session(path, **config):
        so = ort.SessionOptions()
        add_plugin(so, "qnn-htp", 8)
        for k, v in config.items():
            so.add_session_config_entry(k, v)
        return ort.InferenceSession(str(path), so)

    graph, ctx = export(tmp_path, "--target", "qnn-htp") / "model.int8.train.onnx", tmp_path / "train_ctx.onnx"
    compiled = session(graph, **{"ep.context_enable": "1", "ep.context_file_path": str(ctx), "ep.context_embed_mode": "1"})
    assert ctx.stat().st_size > 0
    cached = session(ctx)
    assert [i.name for i in cached.get_inputs()] == [i.name for i in compiled.get_inputs()]
    rng = np.random.default_rng(0)
    types = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(int32)": np.int32}
    f = {i.name: rng.random(i.shape, dtype=np.float32) if types[i.type] is np.float32
         else rng.integers(-20, 20, i.shape).astype(types[i.type]) for i in compiled.get_inputs()}
    y = cached.run(None, f)[0]
    assert np.array_equal(y, compiled.run(None, f)[0])
    moved = dict(f, **{"features.4.weight_quantized": np.clip(f["features.4.weight_quantized"].astype(np.int16) + 63,
                                                             -127, 127).astype(np.int8)})
    assert not np.array_equal(cached.run(None, moved)[0], y)


def test_benchmarks_take_plugins_on_request_and_skip_an_absent_one(monkeypatch):
    import subprocess
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.cases import plugin_params
    monkeypatch.delenv("BAFFLE_BENCH_PLUGINS", raising=False)
    assert plugin_params("int8-step") == []  # opt-in
    monkeypatch.setenv("BAFFLE_BENCH_PLUGINS", "qnn-htp, openvino")
    assert plugin_params("int8-step") == ["qnn-htp", "openvino"] and plugin_params("float") == ["openvino"]
    monkeypatch.setenv("BAFFLE_BENCH_PLUGINS", "hexagon")
    with pytest.raises(ValueError, match="unknown plugin EP.*hexagon.*known: qnn-htp"):
        plugin_params("int8-step")
    code = ("import sys; sys.modules['onnxruntime_qnn'] = None; import pytest; sys.exit(pytest.main(["
            "'benchmarks/test_k_estimation.py', '-q', '-rs', '-p', 'no:cacheprovider', '-k', "
            "'onnxruntime-int8-qnn-htp-lenet-8-K10-forward']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1], env={**__import__("os").environ, "BAFFLE_BENCH_PLUGINS": "qnn-htp"})
    assert r.returncode == 0 and "1 skipped" in r.stdout and "pip install 'baffle-edge[qnn]'" in r.stdout, r.stdout[-2000:]
