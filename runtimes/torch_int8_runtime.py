"""The int8 oracle: the bundle's QDQ graph (``model.int8.onnx``) executed op by op in float32
torch ("fake quantization"), fed the same perturbed integers as the ONNX Runtime int8 session.

ORT computes the same graph with integer kernels (int32 accumulation, one requantization per
layer); the oracle rounds at the same QuantizeLinear points but accumulates in float32, so the
two agree up to rare one-step differences in intermediate activations. Parity tests state and
check that tolerance; a silent fallback or a wrong feed in the ORT path breaks it at once.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .onnxruntime_runtime import OrtInt8Session


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _qrange(zero_point: torch.Tensor) -> tuple[int, int]:
    return {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int32: (-(2**31), 2**31 - 1)}[zero_point.dtype]


def _per_axis(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


class QdqInterpreter:
    """Evaluates a QDQ ONNX graph with torch ops (the subset our exporter produces)."""

    def __init__(self, proto: onnx.ModelProto):
        self.nodes = list(proto.graph.node)
        self.consts = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer}
        self.output = proto.graph.output[0].name
        unknown = {n.op_type for n in self.nodes} - set(self.OPS)
        if unknown:
            raise ValueError(f"the int8 oracle cannot execute op(s) {sorted(unknown)}")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        env = dict(self.consts)
        env.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        with torch.no_grad():
            for node in self.nodes:
                args = [env[i] if i else None for i in node.input]
                env[node.output[0]] = self.OPS[node.op_type](self, args, _attrs(node))
        return env[self.output].numpy()

    def _quantize(self, a, at):
        x, scale, zp = a[0], a[1].float(), a[2]
        lo, hi = _qrange(zp)
        axis = at.get("axis", 1)
        q = torch.round(x / _per_axis(scale, axis, x.ndim)) + _per_axis(zp.float(), axis, x.ndim)
        return q.clamp(lo, hi).to(zp.dtype)

    def _dequantize(self, a, at):
        q, scale = a[0], a[1].float()
        zp = a[2] if len(a) > 2 and a[2] is not None else torch.zeros((), dtype=q.dtype)
        axis = at.get("axis", 1)
        return ((q.double() - _per_axis(zp.double(), axis, q.ndim)) * _per_axis(scale.double(), axis, q.ndim)).float()

    def _conv(self, a, at):
        pads = at.get("pads", [0, 0, 0, 0])
        if pads[:2] != pads[2:]:
            raise ValueError(f"asymmetric Conv pads {pads} are not supported by the oracle")
        # float64: the sums of dequantized int8 products are exact enough that the next QuantizeLinear
        # rounds like ORT's int32 accumulation, whatever torch's thread count (float32 sums flipped
        # rare activation steps when the summation order changed)
        bias = a[2].double() if len(a) > 2 and a[2] is not None else None
        return F.conv2d(a[0].double(), a[1].double(), bias, stride=at.get("strides", [1, 1]), padding=pads[:2],
                        dilation=at.get("dilations", [1, 1]), groups=at.get("group", 1)).float()

    def _gemm(self, a, at):
        x, w = a[0], a[1]
        x = x.t() if at.get("transA", 0) else x
        w = w.t() if at.get("transB", 0) else w
        y = at.get("alpha", 1.0) * (x.double() @ w.double())
        y = y + at.get("beta", 1.0) * a[2].double() if len(a) > 2 and a[2] is not None else y
        return y.float()

    def _maxpool(self, a, at):
        pads = at.get("pads", [0, 0, 0, 0])
        return F.max_pool2d(a[0], at["kernel_shape"], at.get("strides", at["kernel_shape"]), pads[:2])

    OPS = {
        "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "Conv": _conv, "Gemm": _gemm,
        "MaxPool": _maxpool,
        "HardSwish": lambda s, a, at: F.hardswish(a[0]),
        "HardSigmoid": lambda s, a, at: torch.clamp(at.get("alpha", 0.2) * a[0] + at.get("beta", 0.5), 0, 1),
        "Relu": lambda s, a, at: F.relu(a[0]),
        "Mul": lambda s, a, at: a[0] * a[1],
        "Add": lambda s, a, at: a[0] + a[1],
        "GlobalAveragePool": lambda s, a, at: a[0].mean(dim=(2, 3), keepdim=True),
        "ReduceMean": lambda s, a, at: a[0].mean(dim=tuple(at.get("axes", [2, 3])), keepdim=bool(at.get("keepdims", 1))),
        "Flatten": lambda s, a, at: a[0].flatten(at.get("axis", 1)),
        "Reshape": lambda s, a, at: a[0].reshape(tuple(int(v) for v in a[1])),
    }


class TorchInt8Session(OrtInt8Session):
    """Same feeds and perturbations as the ORT int8 session; forward = QdqInterpreter."""

    cpu_bound = False  # float32 fake quantization: exact for any target's range on any CPU

    def __init__(self, bundle_dir, **kw):
        super().__init__(bundle_dir, **kw)
        self.name = "torch-int8"
        # block noise: every row a full forward of the interpreter (the ORT segment graphs would run ONNX Runtime)
        self.block_forward = None

    def _open(self, path, **options) -> None:
        self.interpreter = QdqInterpreter(onnx.load(str(path)))

    def forward(self, x, weights):
        return self.interpreter.run({self.input_name: x, **self.graph_feeds(weights)})


class TorchInt8Runtime:
    name = "torch-int8"

    def load(self, bundle_dir, *, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        return TorchInt8Session(bundle_dir)
