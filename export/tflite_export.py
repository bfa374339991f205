"""torch -> full-integer int8 TFLite (LiteRT) with litert-torch's PT2E route, no TensorFlow.

Route (the one that works with litert-torch 0.10 / torch 2.13):

1. ``torch.export`` with a dynamic batch dimension (so calibration runs in batches of 64);
2. torchao ``prepare_pt2e`` with litert-torch's ``PT2EQuantizer`` (per-channel symmetric int8
   weights in [-127, 127], int8 per-tensor affine activations, histogram observers);
3. calibration: the calibration batches run through the observed model; ``convert_pt2e``;
4. with ``float_logits`` (default) the QuantizeLinear/DequantizeLinear pair on the logits is
   dropped, as in onnx_export: the last layer (linear, 640 MACs for LeNet) then runs as a float
   FULLY_CONNECTED on float32 weights that are exactly ``q * scale`` (the runtime writes the
   perturbed ``q' * scale``), and the loss is not rounded to one int8 logit step (LeNet on digits:
   0.15 in logit units, which halved the gradient cosine in our measurement). Every conv stays
   int8 (CONV_2D / DEPTHWISE_CONV_2D with int8 input, filter, output and int32 bias);
5. ``litert_torch.convert`` at a fixed sample batch, then the batch entry of every constant
   RESHAPE shape is rewritten to -1 in the flatbuffer (the converter bakes the sample batch into
   them, and ``litert_torch.convert(dynamic_shapes=...)`` fails to lower ``flatten``), so the
   interpreter can ``resize_tensor_input`` to any batch. Verified by comparing per-sample outputs
   at several batch sizes.

The model input stays int8 (the converter folds the input QuantizeLinear into the signature):
the client quantizes its float batch with ``input.scale`` / ``input.zero_point`` from the
returned metadata. Integers of each trainable tensor are matched to the torch parameters by
dequantizing every constant candidate under every axis permutation and taking the best fit to
the float weights (no name guessing); the metadata records per parameter the TFLite tensor
index, its dtype and the permutation from the torch layout to the TFLite layout (conv filters
OIHW -> OHWI, the 1-input-channel conv becomes DEPTHWISE_CONV_2D with filter 1HWO).
"""
from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path

import numpy as np

from baffle_edge.bundle import dequantize_output, quantize_input
from baffle_edge.quant import QTensor, QuantTable, bias_tensor, weight_tensor

from .tflite_blocks import add_segments

INFERENCE_FILE = "model.int8.tflite"
CONVERT_BATCH = 7  # sample batch of the conversion; chosen so it cannot be confused with a channel count of 1
CALIBRATION_BATCH = 64
MATCH_TOLERANCE = 0.51  # a matched tensor must dequantize to within 0.51 quantization steps of the float weights
CHECK_BATCHES = (1, 3, 32)


def _import_litert_torch():
    try:
        import litert_torch  # noqa: F401
        from litert_torch.quantize import pt2e_quantizer, quant_config  # noqa: F401
        from torchao.quantization.pt2e import quantize_pt2e  # noqa: F401
    except ImportError as e:
        raise ImportError(f"TFLite export needs litert-torch and torchao ({e}); install them with: "
                          "pip install 'baffle-edge[tflite]'") from None
    return litert_torch


def _interpreter(content: bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    return Interpreter(model_content=bytes(content), num_threads=1,
                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


# ---------------------------------------------------------------------------- PT2E quantization

def _quantize_pt2e(model, calibration: np.ndarray):
    """Exported, observed, calibrated and converted (Q/DQ) GraphModule and its quantizer."""
    import torch
    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e import quantize_pt2e

    x = torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.float32))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = torch.export.export(model.eval(), (x[:2],), dynamic_shapes=({0: batch},)).module()
        quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
        gm = quantize_pt2e.prepare_pt2e(gm, quantizer)
        with torch.no_grad():
            for i in range(0, len(x), CALIBRATION_BATCH):
                gm(x[i:i + CALIBRATION_BATCH])
        gm = quantize_pt2e.convert_pt2e(gm, fold_quantize=False)
    return gm, quantizer


def _pt2e_scales(gm, layout) -> dict[str, dict]:
    """Per trainable parameter: the PT2E weight scales (per output channel) or, for a bias, the
    input activation scale of the op that consumes it. Read from the Q/DQ graph."""
    import torch

    qpc = torch.ops.quantized_decomposed.quantize_per_channel.default
    dq_pt = {torch.ops.quantized_decomposed.dequantize_per_tensor.default,
             torch.ops.quantized_decomposed.dequantize_per_tensor.tensor}
    names = {s.name for s in layout.specs}
    out: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in names:
            continue
        for user in node.users:
            if user.target == qpc:
                scale = getattr(gm, user.args[1].target).detach().double().numpy().reshape(-1)
                out[node.target] = {"scale": scale, "axis": int(user.args[3])}
            elif len(user.args) > 2 and user.args[2] is node:  # bias of conv2d / linear
                src = user.args[0]
                if getattr(src, "target", None) in dq_pt:
                    out[node.target] = {"input_scale": float(src.args[1])}
    return out


def _drop_output_qdq(gm) -> bool:
    """Remove the quantize/dequantize pair on the graph output (float logits). True if removed."""
    import torch

    out = next(n for n in gm.graph.nodes if n.op == "output")
    res = out.args[0]
    first = res[0] if isinstance(res, (tuple, list)) else res
    dq_ops = {torch.ops.quantized_decomposed.dequantize_per_tensor.default}
    q_ops = {torch.ops.quantized_decomposed.quantize_per_tensor.default}
    if getattr(first, "target", None) not in dq_ops or getattr(first.args[0], "target", None) not in q_ops:
        return False
    q = first.args[0]
    src = q.args[0]
    out.args = ((src,) + tuple(res[1:]),) if isinstance(res, (tuple, list)) else (src,)
    gm.graph.erase_node(first)
    gm.graph.erase_node(q)
    gm.recompile()
    return True


def _convert(litert_torch, model, calibration: np.ndarray, layout,
             float_logits: bool) -> tuple[bytes, int, bool, dict]:
    """Steps 1-5 of the module doc: (flatbuffer with a resizable batch, RESHAPEs rewritten,
    whether the logits' Q/DQ pair was dropped, the PT2E scales per parameter)."""
    import torch
    from litert_torch.quantize import quant_config

    gm, quantizer = _quantize_pt2e(model, calibration)
    pt2e = _pt2e_scales(gm, layout)
    dropped = _drop_output_qdq(gm) if float_logits else False
    sample = (torch.from_numpy(calibration[:CONVERT_BATCH]),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = litert_torch.convert(gm, sample, quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
    content, patched = _dynamic_batch(edge.model_content(), CONVERT_BATCH)
    return content, patched, dropped, pt2e


# ---------------------------------------------------------------------------- flatbuffer surgery

def tflite_schema():
    """The TFLite flatbuffer schema module (object API) of the installed LiteRT."""
    try:
        from ai_edge_litert import schema_py_generated as s
    except ImportError:  # pragma: no cover - older wheels
        from tflite_runtime import schema_py_generated as s  # type: ignore
    return s


def _dynamic_batch(content: bytes, batch: int) -> tuple[bytes, int]:
    """Rewrite dim 0 of every constant RESHAPE shape equal to ``batch`` to -1 (in place in the
    flatbuffer, so nothing else moves). Returns the new bytes and how many shapes changed."""
    s = tflite_schema()
    buf = bytearray(content)
    model = s.Model.GetRootAs(buf, 0)
    codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(model.OperatorCodesLength())]
    changed = 0
    for g in (model.Subgraphs(i) for i in range(model.SubgraphsLength())):
        for op in (g.Operators(i) for i in range(g.OperatorsLength())):
            if codes[op.OpcodeIndex()] != s.BuiltinOperator.RESHAPE or op.InputsLength() < 2:
                continue
            data = model.Buffers(g.Tensors(op.Inputs(1)).Buffer()).DataAsNumpy()
            if isinstance(data, int) or data.size < 4:  # not a constant shape
                continue
            shape = data.view(np.int32)  # a writable view into ``buf``
            if shape[0] == batch:
                shape[0] = -1
                changed += 1
    g = model.Subgraphs(0)  # declare batch 1 (shape) / dynamic batch (shape_signature) on the signature tensors
    for t in [g.Inputs(i) for i in range(g.InputsLength())] + [g.Outputs(i) for i in range(g.OutputsLength())]:
        tensor = g.Tensors(t)
        if tensor.ShapeLength() and tensor.ShapeAsNumpy()[0] == batch:
            tensor.ShapeAsNumpy()[0] = 1
        if tensor.ShapeSignatureLength() and tensor.ShapeSignatureAsNumpy()[0] == batch:
            tensor.ShapeSignatureAsNumpy()[0] = -1
    return bytes(buf), changed


def _buffer_users(content: bytes) -> dict[int, list[int]]:
    """Constant buffer index -> the tensor indices of subgraph 0 stored in it."""
    s = tflite_schema()
    model = s.Model.GetRootAs(bytearray(content), 0)
    g = model.Subgraphs(0)
    users: dict[int, list[int]] = {}
    for i in range(g.TensorsLength()):
        b = g.Tensors(i).Buffer()
        data = model.Buffers(b).DataAsNumpy() if b > 0 else 0
        if not isinstance(data, int) and data.size:
            users.setdefault(b, []).append(i)
    return users


def _constant_tensors(content: bytes) -> set[int]:
    return {t for ts in _buffer_users(content).values() for t in ts}


# ---------------------------------------------------------------------------- matching

def _dequantized(details: dict, a: np.ndarray) -> np.ndarray | None:
    if a.dtype == np.float32:
        return a.astype(np.float64)
    qp = details["quantization_parameters"]
    scales = np.asarray(qp["scales"], dtype=np.float64)
    if scales.size == 0:
        return None
    zp = np.asarray(qp["zero_points"], dtype=np.float64)
    shape = [1] * a.ndim
    if scales.size > 1:
        shape[qp["quantized_dimension"]] = -1
    return (a.astype(np.float64) - zp.reshape(shape)) * scales.reshape(shape)


def _match(interp, constants: set[int], layout, weights: dict[str, np.ndarray], pt2e: dict) -> list[dict]:
    """For each parameter, the constant TFLite tensor and axis permutation that dequantize closest
    to its float values. Raises ValueError when a parameter has no good match."""
    details = {d["index"]: d for d in interp.get_tensor_details() if d["index"] in constants}
    taken: set[int] = set()
    rows = []
    for spec in layout.specs:
        w = weights[spec.name].astype(np.float64)
        info = pt2e.get(spec.name, {})
        if "scale" in info:
            tol = MATCH_TOLERANCE * float(np.max(info["scale"]))
        else:  # bias: integer step s_in * s_w is tiny; allow half of the weight tolerance scale
            tol = 1e-3 * max(1.0, float(np.abs(w).max()))
        best = None
        for idx, d in details.items():
            if idx in taken or int(np.prod(d["shape"])) != w.size or d["dtype"] not in (np.int8, np.int32, np.float32):
                continue
            f = _dequantized(d, interp.get_tensor(idx))
            if f is None:
                continue
            for perm in itertools.permutations(range(w.ndim)):
                wt = w.transpose(perm)
                if wt.shape != f.shape:
                    continue
                err = float(np.abs(wt - f).max())
                if best is None or err < best[0]:
                    best = (err, idx, perm, d)
        if best is None or best[0] > tol:
            raise ValueError(f"parameter {spec.name!r} {spec.shape}: no TFLite constant matches its weights "
                             f"(best error {None if best is None else best[0]:.3g} > {tol:.3g}); the converter "
                             "fused or transformed it, which int8-step perturbation cannot follow")
        err, idx, perm, d = best
        taken.add(idx)
        rows.append({"param": spec.name, "index": int(idx), "tflite_name": d["name"],
                     "tflite_shape": [int(v) for v in d["shape"]], "tflite_dtype": np.dtype(d["dtype"]).name,
                     "permutation": [int(p) for p in perm], "match_error": err})
    return rows


def _quant_table(interp, rows: list[dict], layout, pt2e: dict) -> QuantTable:
    """QTensors in torch layout. int8 / int32 tensors: the TFLite scales. Float tensors (the
    float-logits head): the PT2E scales the float weights were rounded with."""
    details = {d["index"]: d for d in interp.get_tensor_details()}
    tensors: list[QTensor] = []
    for spec, row in zip(layout.specs, rows):
        qp = details[row["index"]]["quantization_parameters"]
        perm = row["permutation"]
        is_bias = len(spec.shape) == 1 and spec.name.endswith("bias")
        if row["tflite_dtype"] == "float32":
            info = pt2e.get(spec.name)
            if info is None:
                raise ValueError(f"parameter {spec.name!r} runs in float but PT2E did not quantize it")
            if is_bias:
                wrow = next(t for t in tensors if t.name == spec.name.rsplit(".", 1)[0] + ".weight")
                scale = tuple(float(info["input_scale"] * s) for s in wrow.scale)
            else:
                scale = tuple(float(np.float32(s)) for s in info["scale"])
                axis = info["axis"]
        else:
            scale = tuple(float(s) for s in np.asarray(qp["scales"], dtype=np.float32))
            axis = perm[qp["quantized_dimension"]] if len(scale) > 1 else 0
        if is_bias:
            wrow = next(t for t in tensors if t.name == spec.name.rsplit(".", 1)[0] + ".weight")
            tensors.append(bias_tensor(spec.name, row["tflite_name"], spec.offset, spec.shape, scale, wrow))
        else:
            tensors.append(weight_tensor(spec.name, row["tflite_name"], spec.offset, spec.shape,
                                         axis if len(spec.shape) > 1 else 0, scale))
    return QuantTable(tuple(tensors))


def _tflite_integers(interp, rows: list[dict], table: QuantTable) -> list[np.ndarray]:
    """The exported integers of every parameter, back in torch layout (float tensors: value / scale)."""
    out = []
    for row, t in zip(rows, table.tensors):
        a = interp.get_tensor(row["index"])
        a = np.transpose(a, np.argsort(row["permutation"]))
        if a.dtype == np.float32:
            a = np.rint(a.astype(np.float64) / t.broadcast(t.scale)).astype(t.dtype)
        out.append(a)
    return out


# ---------------------------------------------------------------------------- checks

def _run(interp, inp: dict, out: dict, x: np.ndarray) -> np.ndarray:
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], quantize_input(x, inp))
    interp.invoke()
    return dequantize_output(interp.get_tensor(out["index"]), out)


def _io(d: dict) -> dict:
    dtype = np.dtype(d["dtype"]).name
    scale, zp = d["quantization"]
    row = {"index": int(d["index"]), "name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": dtype}
    if dtype != "float32":
        row.update(scale=float(scale), zero_point=int(zp))
    return row


def _ops(interp) -> list[str]:
    dt = lambda ts: ",".join(np.dtype(t).name for t in ts)  # noqa: E731
    return [f"{o['op_name']}({dt(o['operand_types'])})->{dt(o['result_types'])}" for o in interp._get_ops_details()]


def _check_quantize(interp, rows: list[dict], table: QuantTable, layout, weights: dict[str, np.ndarray]) -> dict:
    """``QuantTable.quantize(float weights)`` must reproduce the exported integers (within one step)."""
    flat = np.concatenate([weights[s.name].reshape(-1) for s in layout.specs]).astype(np.float32)
    mine, theirs = table.quantize(flat), _tflite_integers(interp, rows, table)
    diffs = {t.name: int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) for t, a, b in zip(table.tensors, mine, theirs)}
    mismatched = {t.name: int(np.count_nonzero(a != b)) for t, a, b in zip(table.tensors, mine, theirs)}
    if max(diffs.values()) > 1:
        raise ValueError(f"QuantTable.quantize does not reproduce the exported integers (max |diff| per tensor: {diffs})")
    return {"max_abs_int_diff": diffs, "mismatches": mismatched}


def _check_batch_independent(interp, inp: dict, out: dict, calibration: np.ndarray) -> None:
    """Per-sample outputs must not depend on the batch size (checks the RESHAPE rewrite)."""
    probe = calibration[:max(CHECK_BATCHES)]
    ref = np.concatenate([_run(interp, inp, out, probe[i:i + 1]) for i in range(len(probe))])
    for b in CHECK_BATCHES:
        got = np.concatenate([_run(interp, inp, out, probe[i:i + b]) for i in range(0, len(probe), b)])
        # int8 logits must be identical; float logits may differ by float summation order (GEMV vs GEMM)
        if not np.allclose(got, ref, rtol=1e-5, atol=1e-5 if out["dtype"] == "float32" else 0.0):
            raise ValueError(f"TFLite outputs at batch {b} differ from batch 1 (max {np.abs(got - ref).max():.3g}): "
                             "the converted graph is not batch-independent")


def _tensor_row(row: dict) -> dict:
    """A parameter's row of the format entry's ``tensors``: where and how the runtime writes it."""
    return {"param": row["param"], "index": row["index"], "tflite_name": row["tflite_name"],
            "tflite_shape": row["tflite_shape"], "tflite_dtype": row["tflite_dtype"],
            "permutation": row["permutation"],
            "write": "q" if row["tflite_dtype"] != "float32" else "float32(q * scale)"}


# ---------------------------------------------------------------------------- entry point

def export_tflite_int8(model, calibration: np.ndarray, path: Path, layout, *, float_logits: bool = True) -> dict:
    """Write ``path`` (full-integer int8 .tflite) and return its ``baffle.json`` format entry."""
    litert_torch = _import_litert_torch()
    started = time.perf_counter()
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) < CONVERT_BATCH:
        raise ValueError(f"calibration: expected (N >= {CONVERT_BATCH}, C, H, W) floats, got {calibration.shape}")
    weights = {n: p.detach().cpu().numpy() for n, p in model.named_parameters()}
    content, patched, dropped, pt2e = _convert(litert_torch, model, calibration, layout, float_logits)

    # shared constant buffers would make one in-place write change two tensors
    users = _buffer_users(content)
    interp = _interpreter(content)
    interp.allocate_tensors()
    rows = _match(interp, _constant_tensors(content), layout, weights, pt2e)
    for row in rows:
        shared = [u for us in users.values() if row["index"] in us for u in us if u != row["index"]]
        if shared:
            raise ValueError(f"parameter {row['param']!r}: TFLite tensor {row['index']} shares its buffer with "
                             f"tensor(s) {shared}; in-place perturbation would change both")
    table = _quant_table(interp, rows, layout, pt2e)
    quantize_check = _check_quantize(interp, rows, table, layout, weights)
    inp = _io(interp.get_input_details()[0])
    out = _io(interp.get_output_details()[0])
    _check_batch_independent(interp, inp, out, calibration)
    ops = _ops(interp)
    Path(path).write_bytes(content)
    inp["layout"] = "NCHW"
    entry = {
        "files": {"inference": Path(path).name},
        "domain": "int8-step",
        "quantization": table.to_json(),
        "tensors": [_tensor_row(row) for row in rows],
        "input": inp,
        "output": out,
        "float_logits": bool(dropped),
        "ops": ops,
        "resolver": "BUILTIN_WITHOUT_DEFAULT_DELEGATES (the XNNPACK delegate packs weights at init and ignores "
                    "in-place writes)",
        "perturbation": "for tensor i write np.transpose(q'_i, permutation) into interpreter.tensor(index)() "
                        "(q' = QuantTable.perturb in torch layout; float32 tensors get q' * scale); load from "
                        "model_content (a private bytes copy: constant tensors point into it), never model_path "
                        "(read-only mmap)",
        "batch": f"converted at batch {CONVERT_BATCH}; {patched} RESHAPE shape(s) rewritten to -1 so "
                 f"resize_tensor_input works; outputs checked batch-independent at {list(CHECK_BATCHES)}",
        "converter": {"route": "litert_torch PT2E: torch.export (dynamic batch) -> prepare_pt2e(PT2EQuantizer "
                               "per-channel symmetric) -> calibrate -> convert_pt2e -> litert_torch.convert",
                      "calibration_samples": int(len(calibration)), "observer": "histogram (activations), "
                      "per-channel min-max (weights)"},
        "quantize_check": quantize_check,
        "deterministic": "yes: two exports of the same model and calibration gave identical bytes "
                         "(tests/test_tflite.py::test_export_deterministic)",
    }
    probe = quantize_input(calibration[:max(CHECK_BATCHES)], inp)
    why = add_segments(Path(path).parent, entry, content, _interpreter, probe)  # block noise (export/tflite_blocks.py)
    if why is not None:
        entry["blocks_unsupported"] = why
    entry["export_seconds"] = round(time.perf_counter() - started, 3)
    return entry
