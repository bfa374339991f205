"""Cutting ONNX train graphs into block-noise segments (docs/noise.md section 10): the primitives the chain
plan (export/blocks.py) and the graph plan (export/graph_blocks.py) share. ``graph_modules`` finds the
Conv / Gemm modules whose parameters are graph inputs, ``cut`` takes the nodes between some tensors and
another out of the graph in place, ``cache_graph`` adds outputs to the unperturbed forward."""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import shape_inference

MODULE_OPS = {"Conv", "Gemm"}


@dataclass(frozen=True)
class Module:
    """One Conv/Gemm module of a train graph: what a block row perturbs."""
    name: str
    params: tuple[str, ...]  # its graph inputs (weights, bias), in parameter order
    data: str  # the tensor it reads (int8: the quantized tensor the fused QLinearConv/QGemm reads)
    output: str  # the Conv/Gemm node's output
    channels: int  # output channels (rows)


def graph_modules(proto: onnx.ModelProto, param_inputs: dict[str, list[str]]) -> list[Module]:
    """The modules of a train graph whose parameters are graph inputs, in ``param_inputs`` order; a
    ValueError names a module whose weight does not feed exactly one Conv / Gemm (transB) node."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = consumer_map(proto)

    def through_dq(name: str) -> str:
        """Follow a parameter input through its DequantizeLinear (int8 graphs) to what the module reads."""
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == "DequantizeLinear":
            return users[0].output[0]
        return name

    out = []
    for module, inputs in param_inputs.items():
        weight = through_dq(inputs[0])
        users = consumers.get(weight, [])
        if len(users) != 1 or users[0].op_type not in MODULE_OPS or users[0].input[1] != weight:
            raise ValueError(f"module {module!r}: its weight does not feed exactly one Conv/Gemm")
        node = users[0]
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            raise ValueError(f"module {module!r}: a Gemm without transB (rows are not output features)")
        data = node.input[0]
        dq = producer.get(data)
        if dq is not None and dq.op_type == "DequantizeLinear" and producer.get(dq.input[0]) is not None \
                and producer[dq.input[0]].op_type == "QuantizeLinear":
            data = dq.input[0]  # int8: the quantized tensor the fused QLinearConv/QGemm reads
        dims = next(i for i in g.input if i.name == inputs[0]).type.tensor_type.shape.dim
        out.append(Module(module, tuple(inputs), data, node.output[0], int(dims[0].dim_value)))
    return out


def consumer_map(proto: onnx.ModelProto) -> dict[str, list]:
    """tensor name -> the nodes that read it, in graph order."""
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def cut(inferred: onnx.ModelProto, inputs: list[str], out: str, module: str) -> onnx.ModelProto:
    """The nodes between ``inputs`` and ``out`` as a model, cut out of a copy of ``inferred`` in place
    (same node order, value_info, metadata: ONNX Runtime then fuses the QDQ groups as in the whole
    graph; a model rebuilt by onnx.utils.Extractor kept its Gemm unfused)."""
    m = onnx.ModelProto.FromString(inferred.SerializeToString())
    g = m.graph
    info = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
    producer = {o: n for n in g.node for o in n.output}
    needed, stack = set(), [out]
    while stack:  # walk back from the output, stopping at the inputs
        name = stack.pop()
        if name in inputs or name not in producer:
            continue
        node = producer[name]
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(x for x in node.input if x)
    if out not in info:
        raise ValueError(f"module {module!r}: no tensor {out!r} in the graph")
    nodes = [n for n in g.node if id(n) in needed]
    new_inputs = [onnx.ValueInfoProto.FromString(info[x].SerializeToString()) for x in inputs]
    new_output = onnx.ValueInfoProto.FromString(info[out].SerializeToString())
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(new_inputs)
    del g.output[:]
    g.output.append(new_output)
    used = {x for n in nodes for x in n.input}
    for init in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(init)
    keep = [v for v in g.value_info if v.name in used or v.name == out]
    del g.value_info[:]
    g.value_info.extend(keep)
    return m


def cache_graph(proto: onnx.ModelProto, cached: list[str]) -> onnx.ModelProto:
    """The train graph with the tensors ``cached`` as extra outputs (a chain: the inner boundaries
    B_1 .. B_{L-1}; a graph plan: every tensor a segment reads, ``GraphPlan.cached``)."""
    inferred = shape_inference.infer_shapes(proto)
    info = {v.name: v for v in inferred.graph.value_info}
    out = onnx.ModelProto.FromString(proto.SerializeToString())
    for b in cached:
        v = onnx.ValueInfoProto.FromString(info[b].SerializeToString())
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
        out.graph.output.append(v)
    onnx.checker.check_model(out)
    return out
