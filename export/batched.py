"""Batched-K train graphs: P perturbations evaluated in one ONNX Runtime call (GitHub issue 9).

``batch_graph(train_proto, P)`` rewrites a train graph (``model.train.onnx`` or
``model.int8.train.onnx``: trainable tensors are graph inputs) into ``model[.int8].p{P}.train.onnx``:

* every parameter input gets a leading P axis (``[P, *shape]``; copy p = perturbation p);
* activations carry the P copies side by side in the channel axis, ``[B, P*C, H, W]``, copy-major;
  the image input stays ``[B, C, H, W]``, shared by all copies (it is never repeated);
* ``Conv``: weights ``[P, O, I, kh, kw]`` are reshaped to ``[P*O, I, kh, kw]`` (bias ``[P*O]``) and
  ``group`` becomes ``P * group`` (the first conv reads the shared input with ``group`` unchanged:
  one conv with P*O output channels). In the int8 graph the Reshape sits on the integer input,
  before its ``DequantizeLinear``, whose per-channel scale is tiled P times, so ORT still fuses
  ``DQ -> Conv -> Q`` into ``QLinearConv`` (tests/test_batched.py checks with the profiler);
* ``Gemm`` (fully connected): unrolled into P ``Gemm`` nodes on the P channel slices of their
  input (``Split``; in the int8 graph before the activation's ``QuantizeLinear``, so each copy is
  still a ``QGemm``), each with weight ``Gather(w, p)``; results are concatenated back to
  ``[B, P*O]`` (an int8 intermediate: after per-copy ``QuantizeLinear``), or for the graph output
  stacked to ``[P, B, O]``;
* GroupNorm as exported by torch (``Reshape [0, G, -1]`` / ``InstanceNormalization`` /
  per-channel ``Mul``/``Add`` constants): ``G -> P*G`` and the constants tiled P times, which is the
  same normalisation because each group lies inside one copy;
* elementwise and per-channel ops (activations, pooling, activation Q/DQ, ``Add`` of two stacked
  tensors, ``Flatten`` of ``[B, P*C, 1, 1]``) are unchanged.

An op this builder does not know raises ``ValueError`` naming it. Quantization arithmetic is
elementwise or per output channel, so copy p of the int8 graph computes exactly what the
sequential int8 graph computes for perturbation p (the same kernels on the same integers).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from baffle_edge.bundle import check_p

INPUT = "input"
PASS_THROUGH = {"Relu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Selu", "Elu", "LeakyRelu", "MaxPool",
                "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "QuantizeLinear",
                "DequantizeLinear", "Shape", "Flatten", "Clip"}


def train_file_name(train_name: str, p: int) -> str:
    """``model.train.onnx`` -> ``model.p{P}.train.onnx`` (``model.int8.train.onnx`` likewise)."""
    if not train_name.endswith(".train.onnx"):
        raise ValueError(f"{train_name!r} is not a train graph file name (*.train.onnx)")
    return f"{train_name[:-len('.train.onnx')]}.p{p}.train.onnx"


class _Builder:
    def __init__(self, proto: onnx.ModelProto, p: int):
        self.src, self.p = proto, p
        g = proto.graph
        self.params = {i.name: i for i in g.input if i.name != INPUT}
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.stacked: set[str] = set()  # activations holding the P copies in axis 1
        self.weight_dq: dict[str, onnx.NodeProto] = {}  # DQ output -> DQ node of a parameter input
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.skip: set[int] = set()
        self._uid = 0

    # ------------------------------------------------------------------ helpers
    def name(self, base: str) -> str:
        self._uid += 1
        return f"{base}__p{self.p}_{self._uid}"

    def const(self, value: np.ndarray, base: str) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def node(self, op: str, inputs: list[str], base: str, n_out: int = 1, outputs: list[str] | None = None,
             **attrs) -> list[str]:
        outs = outputs or [self.name(f"{base}_{op}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs

    def root(self, name: str) -> np.ndarray | None:
        """The constant behind ``name`` (through per-tensor Q/DQ nodes), or None."""
        while name not in self.consts:
            n = self.producer.get(name)
            if n is None or n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                return None
            name = n.input[0]
        return self.consts[name]

    def tiled(self, name: str, base: str, axis: int = 0) -> str:
        """A per-channel constant (scale, zero point, [C,1,1] affine) repeated P times along axis 0."""
        if name not in self.consts:  # int8 graph: a constant behind QuantizeLinear / DequantizeLinear
            n = self.producer.get(name)
            if n is None or n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(
                    self.consts.get(i, np.zeros(2)).size > 1 for i in n.input[1:]):
                raise ValueError(f"{name!r} is not a constant (or a per-tensor Q/DQ of one); cannot tile it")
            ins = [self.tiled(n.input[0], base, axis)] + list(n.input[1:])
            return self.node(n.op_type, ins, base, **{a.name: helper.get_attribute_value(a) for a in n.attribute})[0]
        v = self.consts[name]
        if v.ndim == 0 or v.size == 1:
            return name
        return self.const(np.concatenate([v] * self.p, axis=axis), base)

    def param_shape(self, name: str) -> list[int]:
        return [d.dim_value for d in self.params[name].type.tensor_type.shape.dim]

    def param_of(self, tensor: str) -> tuple[str, onnx.NodeProto | None]:
        if tensor in self.params:
            return tensor, None
        if tensor in self.weight_dq:
            dq = self.weight_dq[tensor]
            return dq.input[0], dq
        raise ValueError(f"tensor {tensor!r} is not a trainable parameter input (or its DequantizeLinear)")

    def flat_param(self, tensor: str) -> str:
        """A parameter with its P copies merged into axis 0 ([P*O, ...]), dequantized if int8."""
        param, dq = self.param_of(tensor)
        shape = self.param_shape(param)
        merged = self.node("Reshape", [param, self.const(np.array([self.p * shape[0]] + shape[1:], np.int64),
                                                         f"{param}_shape")], param)[0]
        if dq is None:
            return merged
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if len(dq.input) > 1 and self.consts[dq.input[1]].size > 1 and axis != 0:
            raise ValueError(f"{param}: per-channel quantization on axis {axis} (expected 0)")
        ins = [merged] + [self.tiled(i, f"{param}_q") for i in dq.input[1:]]
        return self.node("DequantizeLinear", ins, param, axis=0)[0]

    def param_copy(self, tensor: str, k: int) -> str:
        """Copy k of a parameter ([O, ...]), dequantized if int8."""
        param, dq = self.param_of(tensor)
        one = self.node("Gather", [param, self.const(np.array(k, np.int64), f"{param}_idx")], param, axis=0)[0]
        if dq is None:
            return one
        return self.node("DequantizeLinear", [one] + list(dq.input[1:]), param,
                         **{a.name: helper.get_attribute_value(a) for a in dq.attribute})[0]

    def slices(self, x: str) -> list[str]:
        """The P copies of a stacked [B, P*C] activation. If it is DQ(Q(f)), split f and quantize each
        slice with the same parameters, so each copy keeps its own Q -> DQ -> Gemm (QGemm) chain."""
        dq = self.producer.get(x)
        q = self.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            parts = self.split(q.input[0])
            out = []
            for part in parts:
                qp = self.node("QuantizeLinear", [part] + list(q.input[1:]), "q")[0]
                out.append(self.node("DequantizeLinear", [qp] + list(dq.input[1:]), "dq")[0])
            return out
        return self.split(x)

    def split(self, x: str) -> list[str]:
        if self.p == 1:
            return [self.node("Identity", [x], "split")[0]]
        opset = next(o.version for o in self.src.opset_import if o.domain in ("", "ai.onnx"))
        extra = {"num_outputs": self.p} if opset >= 18 else {}  # opset < 18: equal split by output count
        return self.node("Split", [x], "split", n_out=self.p, axis=1, **extra)

    # ------------------------------------------------------------------ ops
    def conv(self, n: onnx.NodeProto) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        group = int(attrs.get("group", 1))
        shared = n.input[0] not in self.stacked
        if shared and group != 1:
            raise ValueError(f"{n.name}: a grouped Conv (group={group}) on the shared input is not supported")
        attrs["group"] = group if shared else group * self.p
        ins = [n.input[0], self.flat_param(n.input[1])] + ([self.flat_param(n.input[2])] if len(n.input) > 2
                                                           and n.input[2] else [])
        self.nodes.append(helper.make_node("Conv", ins, list(n.output), name=n.name, **attrs))
        self.stacked.add(n.output[0])

    def gemm(self, n: onnx.NodeProto, graph_outputs: set[str]) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("transA", 0) or not attrs.get("transB", 0):
            raise ValueError(f"{n.name}: Gemm with transA={attrs.get('transA', 0)}, transB={attrs.get('transB', 0)}"
                             " (expected a Linear layer: transA=0, transB=1)")
        xs = self.slices(n.input[0]) if n.input[0] in self.stacked else [n.input[0]] * self.p
        ys = []
        for k, x in enumerate(xs):
            ins = [x, self.param_copy(n.input[1], k)] + ([self.param_copy(n.input[2], k)] if len(n.input) > 2
                                                         and n.input[2] else [])
            ys.append(self.node("Gemm", ins, "fc", **attrs)[0])
        out = n.output[0]
        users = self.consumers.get(out, [])
        if out in graph_outputs:
            ups = [self.node("Unsqueeze", [y, self.const(np.array([0], np.int64), "axes")], "out")[0] for y in ys]
            self.node("Concat", ups, "out", outputs=[out], axis=0)
            return
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":  # int8: quantize each copy, then concat
            q = users[0]
            qs = [self.node("QuantizeLinear", [y] + list(q.input[1:]), "q")[0] for y in ys]
            self.node("Concat", qs, "cat", outputs=[q.output[0]], axis=1)
            self.skip.add(id(q))
            self.stacked.add(q.output[0])
            return
        self.node("Concat", ys, "cat", outputs=[out], axis=1)
        self.stacked.add(out)

    def channel_op(self, n: onnx.NodeProto) -> None:
        """Reshape / InstanceNormalization / Mul / Add / Sub / Div on stacked tensors."""
        ins = list(n.input)
        if n.op_type == "Reshape":
            shape = self.consts.get(ins[1])
            if shape is None:  # dynamic shape (e.g. Shape of a stacked tensor): already right
                pass
            elif len(shape) >= 2 and shape[1] > 0:
                shape = shape.copy()
                shape[1] *= self.p
                ins[1] = self.const(shape, "shape")
            else:
                raise ValueError(f"{n.name}: Reshape of a stacked tensor to {shape.tolist()} is not supported")
        elif n.op_type == "InstanceNormalization":
            ins[1], ins[2] = self.tiled(ins[1], "in_scale"), self.tiled(ins[2], "in_bias")
        else:  # elementwise with a constant: tile a per-channel [C, 1, 1] constant
            for i, t in enumerate(ins):
                if t in self.stacked:
                    continue
                v = self.root(t)
                if v is None:
                    raise ValueError(f"{n.name}: {n.op_type} of a stacked and a non-constant tensor {t!r}")
                if v.ndim >= 3 and v.shape[-3] > 1:
                    ins[i] = self.tiled(t, "chan", axis=-3)
                elif v.size > 1:
                    raise ValueError(f"{n.name}: {n.op_type} with a constant of shape {v.shape} is not supported")
        self.nodes.append(helper.make_node(n.op_type, ins, list(n.output), name=n.name,
                                           **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
        self.stacked.update(n.output)

    def build(self) -> onnx.ModelProto:
        g = self.src.graph
        outputs = {o.name for o in g.output}
        for n in g.node:
            if id(n) in self.skip:
                continue
            if n.op_type == "DequantizeLinear" and n.input[0] in self.params:
                self.weight_dq[n.output[0]] = n  # emitted per use (reshaped or gathered)
                continue
            if n.op_type == "Constant":
                self.nodes.append(n)
                continue
            if any(i in self.params or i in self.weight_dq for i in n.input) and n.op_type not in ("Conv", "Gemm"):
                raise ValueError(f"{n.name}: parameter consumed by {n.op_type}; only Conv and Gemm are supported")
            if n.op_type == "Conv":
                self.conv(n)
            elif n.op_type == "Gemm":
                self.gemm(n, outputs)
            elif not any(i in self.stacked for i in n.input):
                self.nodes.append(n)  # works on the shared input only
            elif n.op_type in PASS_THROUGH:
                self.nodes.append(n)
                self.stacked.update(n.output)
            elif n.op_type in ("Reshape", "InstanceNormalization", "Mul", "Add", "Sub", "Div"):
                if n.op_type in ("Add", "Sub", "Mul", "Div") and all(i in self.stacked for i in n.input):
                    self.nodes.append(n)
                    self.stacked.update(n.output)
                else:
                    self.channel_op(n)
            else:
                raise ValueError(f"{n.name}: op {n.op_type} on P-stacked activations is not supported by "
                                 "export/batched.py")
        missing = [o for o in outputs if o not in self.stacked and not any(o in n.output for n in self.nodes)]
        if missing:
            raise ValueError(f"graph outputs {missing} were not produced")
        inputs = []
        for i in g.input:
            if i.name in self.params:
                t = i.type.tensor_type
                inputs.append(helper.make_tensor_value_info(i.name, t.elem_type, [self.p] + self.param_shape(i.name)))
            else:
                inputs.append(i)
        outs = []
        for o in g.output:
            t = o.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            outs.append(helper.make_tensor_value_info(o.name, t.elem_type, [self.p] + dims))
        used = {i for n in self.nodes for i in n.input}
        inits = [i for i in g.initializer if i.name in used] + self.inits
        graph = helper.make_graph(self.nodes, f"{g.name}_p{self.p}", inputs, outs, inits)
        model = helper.make_model(graph, opset_imports=list(self.src.opset_import), producer_name="baffle-edge")
        model.ir_version = self.src.ir_version
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model)


def batch_graph(train: onnx.ModelProto, p: int) -> onnx.ModelProto:
    """The P-perturbations-per-call variant of a train graph (see the module doc)."""
    p = check_p(p)
    if INPUT not in {i.name for i in train.graph.input}:
        raise ValueError(f"train graph has no input named {INPUT!r}")
    return _Builder(train, p).build()
