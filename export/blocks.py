"""The graphs of the incremental block-noise forward on ONNX Runtime (docs/noise.md section 10).

A block-noise row moves one output channel c of one module (a conv filter + bias, a head row).
For a model that is a *chain* of modules M_0 .. M_{L-1} whose outputs pass only through
channel-wise ops (activation, pooling, flatten of 1x1 maps, Quantize/DequantizeLinear) until the
next module's input, the train graph is cut at the modules' inputs ("boundaries" B_1 .. B_{L-1};
in an int8 QDQ graph the uint8 tensor the next QLinearConv/QGemm reads):

    cache     the train graph that also outputs B_1 .. B_{L-1}  (the unperturbed forward)
    seg i     B_i (the graph input for i = 0) and M_i's parameters -> B_{i+1} (the logits for the last)

A device evaluates rows of module i in *slots*: ``seg i`` fed the cached B_i and M_i's parameters
in which channel c holds row r_c's perturbed values (one row per channel, the other channels
anything) computes every slot's channel c at once, with the graph's own kernels (QLinearConv /
QGemm for int8) and constant scales, so each channel equals the full forward's. Each row's B_{i+1}
is the cached one with channel c replaced; ``seg i+1 .. L-1`` (unperturbed) finish the rows
stacked along the batch. Cost of a row of M_i: 1/C_i of M_i plus the modules after it (LeNet:
a conv2 row 1/64 of conv2 + the head; a conv1 row 1/16 of conv1 + conv2 + the head).

``chain_plan`` finds the boundaries or says why a graph is not a chain; ``segment_graphs`` builds
the graphs (export writes them into the bundle; the runtime builds them at load for older bundles).
``block_graphs`` falls back to the graph plan (export/graph_blocks.py: a module segment and a rest
segment per module) for a model that is not a chain (residual adds, GroupNorm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
from onnx import shape_inference

from .graph_cut import MODULE_OPS, cache_graph, cut, graph_modules

if TYPE_CHECKING:
    from .graph_blocks import GraphPlan

CHANNELWISE = {"QuantizeLinear", "DequantizeLinear", "Relu", "HardSwish", "HardSigmoid", "Clip", "Sigmoid", "Tanh",
               "LeakyRelu", "Elu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten",
               "Identity"}


@dataclass(frozen=True)
class ChainPlan:
    modules: tuple[str, ...]  # module names in chain order (parameter order)
    params: tuple[tuple[str, ...], ...]  # per module: its graph inputs (weights, bias), in parameter order
    boundaries: tuple[str, ...]  # B_0 (graph input) .. B_L (graph output); len = modules + 1
    channels: tuple[int, ...]  # C_i: output channels (rows) of each module

    def to_json(self) -> dict:
        return {"modules": list(self.modules), "params": [list(p) for p in self.params],
                "boundaries": list(self.boundaries), "channels": list(self.channels), "channel_axis": 1}

    @classmethod
    def from_json(cls, d: dict) -> ChainPlan:
        return cls(tuple(d["modules"]), tuple(tuple(p) for p in d["params"]), tuple(d["boundaries"]),
                   tuple(int(c) for c in d["channels"]))


def chain_plan(proto: onnx.ModelProto, param_inputs: dict[str, list[str]]) -> ChainPlan:
    """The chain structure of a train graph whose parameters are graph inputs.

    ``param_inputs``: module name -> the graph inputs holding its tensors (parameter order; int8:
    the ``*_quantized`` inputs). Raises ValueError naming what breaks the chain (a module used
    twice, an op between modules that mixes channels, a skip connection)."""
    plan = _plan(proto, param_inputs)
    _segments(proto, plan)  # each segment must be a valid graph of the module + channel-wise ops
    return plan


def _plan(proto: onnx.ModelProto, param_inputs: dict[str, list[str]]) -> ChainPlan:
    """``chain_plan`` before its segments are checked: the modules, their inputs and the boundaries."""
    g = proto.graph
    modules = graph_modules(proto, param_inputs)
    boundaries = [g.input[0].name] + [m.data for m in modules[1:]] + [g.output[0].name]
    return ChainPlan(tuple(m.name for m in modules), tuple(m.params for m in modules), tuple(boundaries),
                     tuple(m.channels for m in modules))


def _segments(proto: onnx.ModelProto, plan: ChainPlan) -> list[onnx.ModelProto]:
    """Every seg i of ``plan``, shapes inferred once for all of them."""
    inferred = shape_inference.infer_shapes(proto)
    return [segment(inferred, plan, i) for i in range(len(plan.modules))]


def segment(inferred: onnx.ModelProto, plan: ChainPlan, i: int) -> onnx.ModelProto:
    """seg i: B_i and module i's parameters -> B_{i+1}, checked to be module i + channel-wise ops
    (``inferred``: the train graph with its shapes inferred)."""
    inputs = [plan.boundaries[i], *plan.params[i]]
    out = plan.boundaries[i + 1]
    seg = cut(inferred, inputs, out, plan.modules[i])
    known = set(inputs) | {t.name for t in seg.graph.initializer} | {o for n in seg.graph.node for o in n.output}
    missing = sorted({x for n in seg.graph.node for x in n.input if x and x not in known})
    if missing:
        raise ValueError(f"module {plan.modules[i]!r}: its segment also reads {missing} (not a chain: a skip "
                         "connection or a parameter shared across modules)")
    ops = [n.op_type for n in seg.graph.node]
    mixing = [op for op in ops if op not in CHANNELWISE]
    if sorted(mixing) not in ([op] for op in MODULE_OPS):
        raise ValueError(f"module {plan.modules[i]!r}: ops {mixing} between its input and the next module's "
                         f"(only its own Conv/Gemm and channel-wise ops {sorted(CHANNELWISE)} allowed)")
    shape = [d.dim_value for d in seg.graph.output[0].type.tensor_type.shape.dim]
    if len(shape) < 2 or shape[1] != plan.channels[i]:
        raise ValueError(f"module {plan.modules[i]!r}: output {out!r} has shape {shape}; channel axis 1 must have "
                         f"its {plan.channels[i]} channels")
    onnx.checker.check_model(seg)
    return seg


def segment_graphs(proto: onnx.ModelProto, plan: ChainPlan) -> dict[str, onnx.ModelProto]:
    """{"block_cache": cache graph, "block_seg0": seg 0, ...}; raises ValueError where the plan is not
    a chain (``chain_plan``'s checks, made while the segments are cut)."""
    return {"block_cache": cache_graph(proto, list(plan.boundaries[1:-1])),
            **{f"block_seg{i}": seg for i, seg in enumerate(_segments(proto, plan))}}


def module_inputs(layout_specs, input_of) -> dict[str, list[str]]:
    """module -> its graph inputs in parameter order; ``input_of(param name)`` maps a parameter to its
    graph input (float: the name itself; int8: the quantization table's ``input``)."""
    out: dict[str, list[str]] = {}
    for s in layout_specs:
        name = s["name"] if isinstance(s, dict) else s.name
        out.setdefault(name.rsplit(".", 1)[0], []).append(input_of(name))
    return out


def block_graphs(proto: onnx.ModelProto, parameters,
                 table=None) -> tuple[ChainPlan | GraphPlan, dict[str, onnx.ModelProto]]:
    """The block plan and graphs of a train graph (``parameters``: baffle.json's list or a layout's
    specs; ``table``: an int8 graph's quant.QuantTable, whose tensors name the graph inputs): the chain
    plan when the model is a chain of channel-local modules, else the graph plan (export/graph_blocks.py:
    residual adds, normalisation). Raises ValueError saying why when neither applies."""
    from .graph_blocks import graph_plan, graph_segments
    inputs = {t.name: t.input for t in table.tensors} if table is not None else {}
    param_inputs = module_inputs(parameters, lambda n: inputs.get(n, n))
    try:
        plan = _plan(proto, param_inputs)
        return plan, segment_graphs(proto, plan)  # cutting the segments checks the chain
    except ValueError as chain_error:
        try:
            graph = graph_plan(proto, param_inputs)
        except ValueError as e:
            raise ValueError(f"{e} (and not a chain: {chain_error})") from None
    return graph, graph_segments(proto, graph)


def add_block_graphs(folder, entry: dict, parameters, table=None) -> str | None:
    """Write a format's block graphs next to its train graph and list them in its baffle.json entry
    (``files``: block_cache, block_seg0, ... for a chain, block_mod0, block_rest0, ... for a graph plan;
    ``blocks``: the plan). Returns why not, or None."""
    from pathlib import Path
    train = entry["files"]["train"]
    try:
        plan, graphs = block_graphs(onnx.load(str(Path(folder) / train)), parameters, table)
    except ValueError as e:
        return str(e)
    stem = train[:-len(".train.onnx")] if train.endswith(".train.onnx") else train.rsplit(".", 1)[0]
    for role, g in graphs.items():
        name = f"{stem}.{role}.onnx"
        (Path(folder) / name).write_bytes(g.SerializeToString())
        entry["files"][role] = name
    entry["blocks"] = plan.to_json()
    return None
