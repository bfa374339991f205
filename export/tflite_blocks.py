"""Segment models of the incremental block-noise forward on LiteRT (docs/noise.md section 10).

The int8 ``.tflite`` of a chain model (export/tflite_export.py) is cut at the int8 input B_i of each
module's CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED, the same cut points as the ONNX segments of
export/blocks.py (``chain_plan``), into ``seg i: B_i -> B_{i+1}`` (seg 0 reads the model input, the
last writes the logits). A segment is not re-converted: it is the full model's flatbuffer with only
the operators of that span kept (and the tensors and buffers they use), so every operator, kernel,
constant, scale and zero point is the full model's own, and B_i is the very int8 tensor (same scale
and zero point) the full forward computes and reads. Running seg 0 .. L-1 one after the other gives
the full model's logits bit for bit (checked at export), and a row of module i evaluated from the
cached B_i gives the full forward's logits at that row's weights (tests/test_tflite_blocks.py).

TFLite keeps activations NHWC, so the channel of a boundary is its **last** axis (``channel_axis``
-1 in the plan; the ONNX plan's is 1). What may sit between a module and the next module's input is
checked here: only channel-wise operators (activations, pooling, MEAN over the spatial axes, a
RESHAPE that keeps the channels last, QUANTIZE / DEQUANTIZE).

numpy + the flatbuffer schema shipped with LiteRT (``ai_edge_litert.schema_py_generated``) and the
``flatbuffers`` package it depends on: no converter, no torch, so a runtime can cut an older bundle's
model at load time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODULE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
CHANNELWISE = ("HARD_SWISH", "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LEAKY_RELU", "ELU", "LOGISTIC",
               "TANH", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "SUM", "REDUCE_MAX", "PAD", "PADV2", "RESHAPE",
               "SQUEEZE", "QUANTIZE", "DEQUANTIZE")
REDUCE = ("MEAN", "SUM", "REDUCE_MAX")  # channel-wise when the reduced axes exclude batch and channels
PADS = ("PAD", "PADV2")  # channel-wise when batch and channels are not padded
BUFFER_ALIGNMENT = 16  # constant data aligned as the converter aligns it (int32 biases are read in place)


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as s
    except ImportError:  # pragma: no cover - older wheels
        from tflite_runtime import schema_py_generated as s  # type: ignore
    return s


@dataclass(frozen=True)
class TFLitePlan:
    """Where a chain model's .tflite is cut (``to_json``: baffle.json ``formats.tflite-int8.blocks``)."""

    modules: tuple[str, ...]  # module names in execution order
    params: tuple[tuple[str, ...], ...]  # per module: its parameters (parameter order)
    boundaries: tuple[int, ...]  # B_0 (model input) .. B_L (logits): tensor indices of the full model
    boundary_names: tuple[str, ...]
    channels: tuple[int, ...]  # C_i: output channels of each module
    ops: tuple[tuple[int, int], ...]  # per segment: [first, last + 1) operator indices of the full model

    def to_json(self) -> dict:
        return {"modules": list(self.modules), "params": [list(p) for p in self.params],
                "boundaries": list(self.boundaries), "boundary_names": list(self.boundary_names),
                "channels": list(self.channels), "channel_axis": -1, "ops": [list(o) for o in self.ops]}


def _op_names(model) -> list[str]:
    s = _schema()
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return [names.get(codes[op.opcodeIndex], f"op{codes[op.opcodeIndex]}") for op in model.subgraphs[0].operators]


def _unpack(content: bytes):
    model = _schema().ModelT.InitFromPackedBuf(bytearray(content), 0)
    if len(model.subgraphs) != 1:
        raise ValueError(f"the model has {len(model.subgraphs)} subgraphs; block segments need one")
    return model


def _has_data(model, tensor) -> bool:
    data = model.buffers[tensor.buffer].data if tensor.buffer > 0 else None
    return data is not None and len(data) > 0


def chain_plan(content: bytes, tensors: list[dict]) -> TFLitePlan:
    """The cut points of a .tflite whose trainable tensors are ``tensors`` (the format entry's rows:
    param, index, tflite_shape, permutation). Raises ValueError naming what breaks the chain."""
    model = _unpack(content)
    g = model.subgraphs[0]
    names = _op_names(model)
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise ValueError(f"the model has {len(g.inputs)} inputs and {len(g.outputs)} outputs; expected one of each")
    ops = list(g.operators)
    producer = {int(o): i for i, op in enumerate(ops) for o in op.outputs}
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for t in op.inputs:
            consumers.setdefault(int(t), []).append(i)
    by_module: dict[str, list[dict]] = {}
    for row in tensors:
        by_module.setdefault(row["param"].rsplit(".", 1)[0], []).append(row)
    found = []  # (op index, module, params, channels)
    for module, rows in by_module.items():
        weight = rows[0]["index"]
        users = consumers.get(weight, [])
        if len(users) != 1 or names[users[0]] not in MODULE_OPS or int(ops[users[0]].inputs[1]) != weight:
            raise ValueError(f"module {module!r}: its weight does not feed exactly one "
                             f"{'/'.join(MODULE_OPS)} as its filter")
        pos = users[0]
        for row in rows[1:]:
            if consumers.get(row["index"], []) != [pos] or int(ops[pos].inputs[2]) != row["index"]:
                raise ValueError(f"module {module!r}: {row['param']!r} is not the bias of its {names[pos]}")
        perm = rows[0]["permutation"]
        channels = int(rows[0]["tflite_shape"][perm.index(0)])
        found.append((pos, module, tuple(r["param"] for r in rows), channels))
    found.sort()
    boundaries = [int(g.inputs[0])]
    for pos, module, _, _ in found[1:]:
        b = int(ops[pos].inputs[0])
        p = producer.get(b)
        if p is not None and names[p] == "DEQUANTIZE" and consumers.get(b) == [pos]:
            b = int(ops[p].inputs[0])  # the int8 tensor (a float module reads it dequantized)
        boundaries.append(b)
    boundaries.append(int(g.outputs[0]))
    spans = []
    for i, (pos, module, _, channels) in enumerate(found):
        first = producer[boundaries[i]] + 1 if boundaries[i] in producer else 0
        end = producer[boundaries[i + 1]] + 1
        if not first <= pos < end:
            raise ValueError(f"module {module!r}: its input is computed after the module (not a chain)")
        _check_segment(model, names, ops, consumers, first, end, pos, boundaries[i], boundaries[i + 1], module, channels)
        spans.append((first, end))
    if spans[-1][1] != len(ops):
        raise ValueError(f"operators after the logits: {names[spans[-1][1]:]}")
    return TFLitePlan(tuple(f[1] for f in found), tuple(f[2] for f in found), tuple(boundaries),
                      tuple(g.tensors[b].name.decode() for b in boundaries), tuple(f[3] for f in found), tuple(spans))


def _check_segment(model, names, ops, consumers, first, end, pos, start, out, module, channels) -> None:
    """Segment [first, end): reads only its boundary and constants; after the module only channel-wise
    operators; nothing it computes but ``out`` is read later; ``out`` keeps the module's channels last."""
    g = model.subgraphs[0]
    made = {int(o) for op in ops[first:end] for o in op.outputs}
    for i in range(first, end):
        for t in (int(t) for t in ops[i].inputs if t >= 0):
            if t != start and t not in made and not _has_data(model, g.tensors[t]):
                raise ValueError(f"module {module!r}: {names[i]} also reads tensor {g.tensors[t].name.decode()!r} "
                                 "(not a chain: a skip connection)")
        if i > pos and names[i] not in CHANNELWISE:
            raise ValueError(f"module {module!r}: {names[i]} between it and the next module mixes channels "
                             f"(only {', '.join(CHANNELWISE)} allowed)")
        if i > pos and names[i] in REDUCE + PADS and not _spatial_only(model, names[i], ops[i]):
            raise ValueError(f"module {module!r}: {names[i]} after it reduces or pads the batch or channel axis")
        if i >= pos and int(g.tensors[int(ops[i].outputs[0])].shape[-1]) != channels:
            raise ValueError(f"module {module!r}: {names[i]} does not keep its {channels} channels on the last axis")
    leaked = sorted(t for t in made - {out} for c in consumers.get(t, []) if c >= end)
    if leaked:
        raise ValueError(f"module {module!r}: tensors {leaked} are read beyond the next module (a skip connection)")


def _spatial_only(model, name: str, op) -> bool:
    """A reduction over / padding of the spatial axes only (constant axes / paddings)."""
    g = model.subgraphs[0]
    const = g.tensors[int(op.inputs[1])]
    if not _has_data(model, const):
        return False
    values = np.frombuffer(bytes(bytearray(model.buffers[const.buffer].data)), dtype=np.int32)
    rank = len(g.tensors[int(op.inputs[0])].shape)
    if name in PADS:
        pads = values.reshape(rank, 2)
        return not pads[0].any() and not pads[-1].any()
    axes = {int(a) % rank for a in values}
    return 0 not in axes and rank - 1 not in axes


def segment_model(content: bytes, plan: TFLitePlan, i: int, index: dict[str, int]) -> tuple[bytes, dict]:
    """Segment i as a .tflite and its row of the plan (``input`` / ``output`` tensor indices and, in
    ``tensors``, the index of each of module i's parameters in the segment; ``index``: parameter ->
    tensor index in the full model). Only the span's operators and what they use are kept; the
    boundary tensors are declared batch 1 with a dynamic batch (``resize_tensor_input``)."""
    model = _unpack(content)
    g = model.subgraphs[0]
    first, end = plan.ops[i]
    ops = g.operators[first:end]
    start, out = plan.boundaries[i], plan.boundaries[i + 1]
    used = sorted({start, out} | {int(t) for op in ops for t in [*op.inputs, *op.outputs,
                                                                 *(op.intermediates if op.intermediates is not None
                                                                   else [])] if t >= 0})
    new = {t: j for j, t in enumerate(used)}
    remap = lambda ts: np.array([new[int(t)] if t >= 0 else -1 for t in ts], dtype=np.int32)  # noqa: E731
    for op in ops:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        if op.intermediates is not None:
            op.intermediates = remap(op.intermediates)
    datas = [None]  # buffer 0: the empty sentinel every tensor without data points to

    def keep(b: int) -> int:
        data = model.buffers[b].data if b > 0 else None
        if data is None or len(data) == 0:
            return 0
        datas.append(data)
        return len(datas) - 1

    tensors = [g.tensors[t] for t in used]
    for t in tensors:
        t.buffer = keep(t.buffer)
    for t in (tensors[new[start]], tensors[new[out]]):
        shape = [int(v) for v in t.shape]
        t.shape = np.array([1, *shape[1:]], dtype=np.int32)
        t.shapeSignature = np.array([-1, *shape[1:]], dtype=np.int32)
    for m in model.metadata or []:  # e.g. min_runtime_version: kept, its buffer renumbered
        datas.append(model.buffers[m.buffer].data)
        m.buffer = len(datas) - 1
    g.tensors, g.operators = tensors, ops
    g.inputs, g.outputs = np.array([new[start]], dtype=np.int32), np.array([new[out]], dtype=np.int32)
    model.signatureDefs = None
    model.description = f"baffle-edge block segment {i} ({plan.modules[i]}) of model.int8.tflite".encode()
    row = {"input": new[start], "output": new[out], "ops": [first, end],
           "tensors": {p: new[index[p]] for p in plan.params[i]}}
    return _pack(model, datas), row


def _pack(model, datas: list) -> bytes:
    """Serialize a ModelT whose buffers hold ``datas`` (None: empty), each constant 16-byte aligned
    (the generated ``BufferT.Pack`` aligns bytes to 1)."""
    import flatbuffers

    s = _schema()
    builder = flatbuffers.Builder(1024)
    vectors = [None if d is None or len(d) == 0 else _aligned_vector(builder, np.asarray(d, dtype=np.uint8))
               for d in datas]
    buffers = []
    for vec in vectors:
        s.BufferStart(builder)
        if vec is not None:
            s.BufferAddData(builder, vec)
        buffers.append(s.BufferEnd(builder))
    codes = [c.Pack(builder) for c in model.operatorCodes]
    subgraphs = [g.Pack(builder) for g in model.subgraphs]
    description = builder.CreateString(model.description)
    metadata = [m.Pack(builder) for m in model.metadata or []]

    def vector(start, items):
        start(builder, len(items))
        for it in reversed(items):
            builder.PrependUOffsetTRelative(it)
        return builder.EndVector()

    codes_v = vector(s.ModelStartOperatorCodesVector, codes)
    subgraphs_v = vector(s.ModelStartSubgraphsVector, subgraphs)
    buffers_v = vector(s.ModelStartBuffersVector, buffers)
    metadata_v = vector(s.ModelStartMetadataVector, metadata) if metadata else None
    s.ModelStart(builder)
    s.ModelAddVersion(builder, model.version)
    s.ModelAddOperatorCodes(builder, codes_v)
    s.ModelAddSubgraphs(builder, subgraphs_v)
    s.ModelAddDescription(builder, description)
    s.ModelAddBuffers(builder, buffers_v)
    if metadata_v is not None:
        s.ModelAddMetadata(builder, metadata_v)
    builder.Finish(s.ModelEnd(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _aligned_vector(builder, data: np.ndarray) -> int:
    builder.StartVector(1, data.size, BUFFER_ALIGNMENT)
    builder.head = builder.head - data.size
    builder.Bytes[builder.head:builder.head + data.size] = data.tobytes()
    builder.vectorNumElems = data.size
    return builder.EndVector()


def segment_models(content: bytes, tensors: list[dict]) -> tuple[TFLitePlan, list[bytes], list[dict]]:
    """The plan, every segment's .tflite and its plan row (``segment_model``); ``tensors``: the format
    entry's rows. ValueError when the model is not a chain."""
    plan = chain_plan(content, tensors)
    index = {r["param"]: int(r["index"]) for r in tensors}
    segs = [segment_model(content, plan, i, index) for i in range(len(plan.modules))]
    return plan, [d for d, _ in segs], [r for _, r in segs]


def check_chain(make_interpreter, content: bytes, segments: list[bytes], plan_rows: list[dict], xq: np.ndarray) -> None:
    """Running the segments one after the other must give the full model's output bit for bit."""
    def run(data: bytes, inp: int, out: int, x: np.ndarray) -> np.ndarray:
        it = make_interpreter(data)
        it.resize_tensor_input(inp, list(x.shape))
        it.allocate_tensors()
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out).copy()

    full = make_interpreter(content)
    want = run(content, full.get_input_details()[0]["index"], full.get_output_details()[0]["index"], xq)
    h = xq
    for data, row in zip(segments, plan_rows):
        h = run(data, row["input"], row["output"], h)
    if h.shape != want.shape or not np.array_equal(h, want):
        raise ValueError("the block segments chained do not reproduce the model's output bit for bit")


def add_segments(folder, entry: dict, content: bytes, make_interpreter, xq: np.ndarray) -> str | None:
    """Write the segment models next to the format's model (``<stem>.block_seg<i>.tflite``), list them in
    its entry (``files.block_seg<i>``, ``blocks``: the plan with a ``segments`` row per file) after
    ``check_chain`` on ``xq``. Returns why the model is not a chain, or None."""
    try:
        plan, segments, rows = segment_models(content, entry["tensors"])
    except ValueError as e:
        return str(e)
    check_chain(make_interpreter, content, segments, rows, xq)
    stem = entry["files"]["inference"].rsplit(".", 1)[0]
    for i, data in enumerate(segments):
        name = f"{stem}.block_seg{i}.tflite"
        (Path(folder) / name).write_bytes(data)
        entry["files"][f"block_seg{i}"] = name
    entry["blocks"] = {**plan.to_json(), "segments": rows}
    return None
