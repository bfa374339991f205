"""Block-noise segment graphs for any train graph of Conv / Gemm modules (docs/noise.md section 10).

The chain plan (export/blocks.py) needs a model whose modules are joined by channel-wise ops only. A
residual add or a normalisation (GroupNorm exported as Reshape / InstanceNormalization / Reshape)
moves every channel after the perturbed module, so a row of module m is evaluated by re-running
*everything downstream of m*, and only that:

    module seg m   m's data input and m's parameters -> m's output cut tensor
    rest seg m     m's output cut tensor + the side tensors -> logits
    cache          the train graph that also outputs every tensor a segment reads

m's data input is what its Conv / Gemm reads (int8: the uint8 tensor the fused QLinearConv / QGemm
reads); its output cut tensor is the node's output (int8: the uint8 output of the QuantizeLinear after
it, so the module segment is exactly one fused QLinearConv). The *side tensors* are what the nodes
downstream of m read that m does not affect (the skip of a residual unit, its other branch), taken
from the unperturbed forward. A side tensor that is an activation's DequantizeLinear output is cut
before the DequantizeLinear (at the uint8 tensor), so every QDQ group (QLinearAdd, QLinearConv, ...)
lies whole inside one segment and ONNX Runtime fuses it as in the whole graph. A chain is the special
case whose rest is the chain's later segments; the chain plan stays what chain models use.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import shape_inference

from baffle_edge.bundle import plan_roles

from .graph_cut import MODULE_OPS, Module, cache_graph, consumer_map, cut, graph_modules

QDQ = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class GraphPlan:
    modules: tuple[str, ...]  # module names in parameter order
    params: tuple[tuple[str, ...], ...]  # per module: its graph inputs (weights, bias), in parameter order
    channels: tuple[int, ...]  # per module: output channels (rows)
    inputs: tuple[str, ...]  # per module: the tensor its module segment reads (the graph input for the stem)
    outputs: tuple[str, ...]  # per module: its output cut tensor (the logits for a head that ends the graph)
    sides: tuple[tuple[str, ...], ...]  # per module: the cached tensors its rest segment reads besides outputs[i]
    rest_params: tuple[tuple[str, ...], ...]  # per module: the parameter inputs its rest segment reads
    input: str  # the graph's data input
    output: str  # the graph's logits

    def has_rest(self, i: int) -> bool:
        return self.outputs[i] != self.output

    def cached(self) -> list[str]:
        """Every tensor the segments read from the unperturbed forward (the cache graph's extra outputs)."""
        names = [*self.inputs, *self.outputs, *(s for side in self.sides for s in side)]
        return [n for n in dict.fromkeys(names) if n not in (self.input, self.output)]

    def roles(self) -> list[str]:
        """The bundle file roles of the plan's graphs, in the order ``graph_segments`` returns them."""
        return plan_roles(self.to_json())

    def to_json(self) -> dict:
        return {"kind": "graph", "modules": list(self.modules), "params": [list(p) for p in self.params],
                "channels": list(self.channels), "channel_axis": 1, "input": self.input, "output": self.output,
                "segments": [{"input": self.inputs[i], "output": self.outputs[i], "sides": list(self.sides[i]),
                              "rest_params": list(self.rest_params[i])} for i in range(len(self.modules))]}

    @classmethod
    def from_json(cls, d: dict) -> GraphPlan:
        seg = d["segments"]
        return cls(tuple(d["modules"]), tuple(tuple(p) for p in d["params"]), tuple(int(c) for c in d["channels"]),
                   tuple(s["input"] for s in seg), tuple(s["output"] for s in seg),
                   tuple(tuple(s["sides"]) for s in seg), tuple(tuple(s["rest_params"]) for s in seg),
                   d["input"], d["output"])


def graph_plan(proto: onnx.ModelProto, param_inputs: dict[str, list[str]]) -> GraphPlan:
    """The graph plan of a train graph whose parameters are graph inputs (``param_inputs``: module ->
    its graph inputs, as for ``blocks.chain_plan``). Raises ValueError naming the module whose
    output cannot be cut (a float consumer beside its QuantizeLinear, a rest that reads the data input
    or the module's own parameters)."""
    g = proto.graph
    x, logits = g.input[0].name, g.output[0].name
    producer = {o: n for n in g.node for o in n.output}
    consumers = consumer_map(proto)
    needed = _walk_back(producer, logits, set())[0]  # nodes the logits depend on
    data_dep = _forward(consumers, x)[1]
    all_params = {p for ps in param_inputs.values() for p in ps}
    inputs, outputs, sides, rests = [], [], [], []
    modules = graph_modules(proto, param_inputs)
    for m in modules:
        out = _output_cut(m, consumers)
        down, produced = _forward(consumers, out)
        side = []
        for n in (n for n in down if id(n) in needed):
            side.extend(_uint8(producer, t) for t in n.input
                        if t and t != out and t not in produced and t in data_dep)
        side = [s for s in dict.fromkeys(side)]
        if out != logits and logits not in produced:
            raise ValueError(f"module {m.name!r}: the logits do not depend on its output {out!r}")
        reached = _walk_back(producer, logits, {out, *side})[1] if out != logits else set()
        if x in reached:
            raise ValueError(f"module {m.name!r}: the nodes after it read the data input {x!r} through a path "
                             "that is not cut")
        own = reached & set(m.params)
        if own:
            raise ValueError(f"module {m.name!r}: the nodes after it also read its parameters {sorted(own)}")
        inputs.append(m.data)
        outputs.append(out)
        sides.append(tuple(side))
        rests.append(tuple(p for p in dict.fromkeys(i.name for i in g.input) if p in reached and p in all_params))
    plan = GraphPlan(tuple(m.name for m in modules), tuple(m.params for m in modules),
                     tuple(m.channels for m in modules), tuple(inputs), tuple(outputs), tuple(sides),
                     tuple(rests), x, logits)
    _check_segments(proto, plan)
    return plan


def _output_cut(m: Module, consumers: dict) -> str:
    """m's output cut tensor: its node's output, or (int8) the uint8 output of the QuantizeLinear after it."""
    users = consumers.get(m.output, [])
    quant = [u for u in users if u.op_type == "QuantizeLinear"]
    if not quant:
        return m.output
    if len(users) != 1:
        raise ValueError(f"module {m.name!r}: its output {m.output!r} feeds a QuantizeLinear and "
                         f"{[u.op_type for u in users if u not in quant]} (no single uint8 tensor to cut at)")
    return quant[0].output[0]


def _uint8(producer: dict, name: str) -> str:
    """An activation's DequantizeLinear output -> the uint8 tensor it reads (the QDQ group then stays whole)."""
    dq = producer.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in producer \
            and producer[dq.input[0]].op_type == "QuantizeLinear":
        return dq.input[0]
    return name


def _forward(consumers: dict, start: str) -> tuple[list, set[str]]:
    """The nodes downstream of tensor ``start`` (graph order is kept by the caller's iteration) and the
    tensors they produce (``start`` included)."""
    nodes, seen, produced, stack = [], set(), {start}, [start]
    while stack:
        for n in consumers.get(stack.pop(), []):
            if id(n) not in seen:
                seen.add(id(n))
                nodes.append(n)
                new = [o for o in n.output if o and o not in produced]
                produced.update(new)
                stack.extend(new)
    return nodes, produced


def _walk_back(producer: dict, out: str, stops: set[str]) -> tuple[set[int], set[str]]:
    """(ids of the nodes ``out`` depends on, stopping at ``stops``; the names reached that no node makes)."""
    needed, leaves, stack = set(), set(), [out]
    while stack:
        name = stack.pop()
        if name in stops:
            continue
        node = producer.get(name)
        if node is None:
            leaves.add(name)
        elif id(node) not in needed:
            needed.add(id(node))
            stack.extend(x for x in node.input if x)
    return needed, leaves


def _check_segments(proto: onnx.ModelProto, plan: GraphPlan) -> list[onnx.ModelProto]:
    """Cut every segment of ``plan`` and check it (shapes inferred once): [mod 0, (rest 0), mod 1, ...]."""
    inferred = shape_inference.infer_shapes(proto)
    out = []
    for i, name in enumerate(plan.modules):
        mod = cut(inferred, [plan.inputs[i], *plan.params[i]], plan.outputs[i], name)
        _no_missing(mod, [plan.inputs[i], *plan.params[i]], name, "module")
        ops = [n.op_type for n in mod.graph.node]
        if sorted(op for op in ops if op in MODULE_OPS) not in ([op] for op in MODULE_OPS) \
                or any(op not in MODULE_OPS | QDQ | {"Constant"} for op in ops):
            raise ValueError(f"module {name!r}: its segment has ops {ops} (one Conv/Gemm and Quantize/DequantizeLinear "
                             "expected)")
        shape = [d.dim_value for d in mod.graph.output[0].type.tensor_type.shape.dim]
        if len(shape) < 2 or shape[1] != plan.channels[i]:
            raise ValueError(f"module {name!r}: output {plan.outputs[i]!r} has shape {shape}; channel axis 1 must "
                             f"have its {plan.channels[i]} channels")
        onnx.checker.check_model(mod)
        out.append(mod)
        if plan.has_rest(i):
            ins = [plan.outputs[i], *plan.sides[i], *plan.rest_params[i]]
            rest = cut(inferred, ins, plan.output, name)
            _no_missing(rest, ins, name, "rest")
            onnx.checker.check_model(rest)
            out.append(rest)
    return out


def _no_missing(seg: onnx.ModelProto, inputs: list[str], module: str, what: str) -> None:
    known = set(inputs) | {t.name for t in seg.graph.initializer} | {o for n in seg.graph.node for o in n.output}
    missing = sorted({x for n in seg.graph.node for x in n.input if x and x not in known})
    if missing:
        raise ValueError(f"module {module!r}: its {what} segment also reads {missing}")


def graph_segments(proto: onnx.ModelProto, plan: GraphPlan) -> dict[str, onnx.ModelProto]:
    """{"block_cache": cache graph, "block_mod0": ..., "block_rest0": ..., ...} (``GraphPlan.roles`` order)."""
    return dict(zip(plan.roles(), [cache_graph(proto, plan.cached()), *_check_segments(proto, plan)]))
