"""torch -> ONNX: float graph, int8 QDQ graph, and the "train" variants whose trainable tensors
are graph inputs (so one session serves all K perturbed forwards).

Graph variants (file names in the bundle):
- ``model.onnx``            float, weights as initializers (plain inference)
- ``model.train.onnx``      float, each trainable tensor is a graph input named like the torch
                            parameter (fed ``w + sigma * eps``)
- ``model.int8.onnx``       int8 QDQ (per-channel symmetric int8 weights, int32 biases, uint8
                            activations), weights as initializers (plain inference)
- ``model.int8.train.onnx`` the same int8 graph with each ``<param>_quantized`` integer
                            initializer turned into a graph input (fed perturbed integers); ORT
                            still runs QLinearConv / QGemm kernels (docs/quantized-perturbation.md)
"""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from baffle_edge.quant import QuantTable, bias_tensor, weight_tensor

OPSET = 17
INPUT, OUTPUT = "input", "logits"


def export_float(model, example: np.ndarray, path: Path) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter (stable parameter names, deterministic bytes)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.onnx.export(model.eval(), (torch.from_numpy(example[:1]),), buf, input_names=[INPUT],
                          output_names=[OUTPUT], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    Path(path).write_bytes(proto.SerializeToString())
    return proto


def params_as_inputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Turn the named initializers into graph inputs (same name, dtype and shape)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    by_name = {i.name: i for i in proto.graph.initializer}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"graph has no initializer(s) {missing}; it does not match the model's parameters")
    for n in names:
        init = by_name[n]
        proto.graph.input.append(onnx.helper.make_tensor_value_info(n, init.data_type, list(init.dims)))
        proto.graph.initializer.remove(init)
    onnx.checker.check_model(proto)
    return proto


class _Reader:
    def __init__(self, x: np.ndarray, batch: int = 32):
        self._it = iter([{INPUT: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(float_path: Path, int8_path: Path, calibration: np.ndarray, *, method: str = "minmax",
                  reduce_range: bool = True, per_channel: bool = True, logits: str = "float") -> None:
    """Static QDQ quantization with onnxruntime: per-channel symmetric int8 weights, uint8
    (asymmetric) activations calibrated on ``calibration``; the final logits are left in float
    (finer losses).

    uint8 activations (u8 x s8, the pair MLAS's x86 and ARM int8 kernels are built around): with
    int8 activations ORT fused only 3 of WRN-10-2's 10 convolutions into QLinearConv and ran the
    other 7 as DequantizeLinear -> float Conv -> QuantizeLinear (profile in docs/benchmarks.md);
    with uint8 all 10 fuse, and Add/Mul become QLinearAdd/QLinearMul.

    ``reduce_range`` keeps weights in [-64, 64] (7 bits): ORT's x86 int8 kernels without VNNI
    (AVX2) multiply-add pairs into int16 with saturation, which costs accuracy with full-range
    weights (measured on digits LeNet: 90.0% vs 93.9% float; 93.6% with 7-bit weights). ARM
    (NEON / dot-product) and VNNI kernels do not saturate: export with reduce_range=False there."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(methods)}")
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # quantizer's advice banner
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(np.ascontiguousarray(calibration, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(float_path), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, reduce_range=reduce_range,
                        calibrate_method=methods[method],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    if logits not in ("float", "uint16"):
        raise ValueError(f"unknown logits encoding {logits!r}; known: float, uint16")
    proto = (_float_output if logits == "float" else _uint16_output)(onnx.load(str(int8_path)))
    onnx.checker.check_model(proto)
    Path(int8_path).write_bytes(proto.SerializeToString())


def _float_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the QuantizeLinear/DequantizeLinear pair on the graph output: ORT then runs the last
    layer as QGemm with float output, so loss differences are not rounded to one int8 step."""
    g = proto.graph
    out = g.output[0].name
    dq = next((n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == out), None)
    q = next((n for n in g.node if dq is not None and n.op_type == "QuantizeLinear" and n.output[0] == dq.input[0]),
             None)
    if dq is None or q is None:
        return proto
    for n in g.node:  # the producer of q's input now writes the graph output directly
        for i, o in enumerate(n.output):
            if o == q.input[0]:
                n.output[i] = out
    g.node.remove(q)
    g.node.remove(dq)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return proto


LOGIT_BOUND = 32.0  # uint16 logits cover [-32, 32] at least (steps of 9.8e-4)


def _uint16_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Requantize the graph output's QuantizeLinear/DequantizeLinear pair from uint8 to symmetric uint16,
    so the head stays a quantized op (the QNN HTP runs it; with float logits it falls back to CPU). The
    range is not the calibrated one (an export-time model's logits: training outgrows it and would clip)
    but +-max(LOGIT_BOUND, 2x the calibrated bound): steps of ~1e-3 instead of uint8's ~range/255.
    uint16 QuantizeLinear is standard ONNX from opset 21."""
    g = proto.graph
    dq = next((n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == g.output[0].name), None)
    if dq is None:
        raise ValueError("the int8 graph's output is not a DequantizeLinear: no quantized head to requantize")
    inits = {i.name: i for i in g.initializer}
    scale, zero = (numpy_helper.to_array(inits[n]) for n in dq.input[1:3])
    if zero.dtype != np.uint8:
        raise ValueError(f"the head's output is {zero.dtype}, not uint8: cannot requantize it to uint16")
    calibrated = float(max(abs(0 - int(zero)), abs(255 - int(zero))) * scale)
    bound = max(LOGIT_BOUND, 2 * calibrated)
    for name, value in ((dq.input[1], np.array(2 * bound / 65535, np.float32)), (dq.input[2], np.array(32768, np.uint16))):
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, 21)
    return proto


def quant_table(int8: onnx.ModelProto, layout, *, reduce_range: bool = True) -> QuantTable:
    """Read each trainable tensor's integer initializer, scale and axis from a QDQ graph."""
    inits = {i.name: i for i in int8.graph.initializer}
    dq = {n.input[0]: n for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    tensors = []
    for spec in layout.specs:
        qname = f"{spec.name}_quantized"
        if qname not in inits or qname not in dq:
            raise ValueError(f"parameter {spec.name!r} was not quantized (no {qname!r}); the model has an op "
                             "the int8 exporter cannot quantize")
        node = dq[qname]
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64).reshape(-1)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        dtype = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT32: "int32"}[inits[qname].data_type]
        axis = axis % len(spec.shape) if len(spec.shape) > 1 else 0
        if dtype == "int8":
            tensors.append(weight_tensor(spec.name, qname, spec.offset, spec.shape, axis, tuple(scale),
                                         reduce_range=reduce_range))
        else:
            wrow = next(t for t in tensors if t.name == spec.name.rsplit(".", 1)[0] + ".weight")
            tensors.append(bias_tensor(spec.name, qname, spec.offset, spec.shape, tuple(scale), wrow))
    return QuantTable(tuple(tensors))


def int8_train_variant(int8: onnx.ModelProto, table: QuantTable) -> onnx.ModelProto:
    return params_as_inputs(int8, [t.input for t in table.tensors])


def to_ort_format(onnx_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Convert to the ORT format for ORT Mobile; returns (.ort file, required-operators config)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path),
                        "--output_dir", str(out_dir), "--optimization_style", "Fixed"],
                       capture_output=True, text=True)
    stem = Path(onnx_path).stem
    ort = Path(out_dir) / f"{stem}.ort"
    if r.returncode != 0 or not ort.exists():
        raise RuntimeError(f"ORT format conversion failed: {r.stderr.strip()[-800:]}")
    configs = sorted(Path(out_dir).glob("*.required_operators*.config"))
    return ort, configs[0] if configs else None
