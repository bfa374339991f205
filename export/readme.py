"""The README.md written into every bundle: how an app developer loads and feeds it."""
from __future__ import annotations


def _int8_rule(fmt: str, info: dict) -> str:
    """The integer perturbation of one int8 format, read from its quantization table (quant.py)."""
    from baffle_edge.quant import QuantTable
    table = QuantTable.from_json(info["quantization"])
    weights = sorted({(t.qmax, *t.bounds) for t in table.tensors if t.dtype == "int8"})
    rules = "; ".join(f"`q = clip(rint(w / scale), -{qmax}, {qmax})`, perturbed `clip(q + eps, {lo}, {hi})`"
                      for qmax, lo, hi in weights)
    return (f"- {fmt}: quantize w with the per-channel scales in `formats.{fmt}.quantization`. int8 weights: "
            f"{rules or 'none'}. int32 biases: `q = rint(w / scale)`, perturbed `q + multiplier * eps` "
            "(`multiplier` per tensor in the table). eps is Rademacher (+-1).")


def bundle_readme(meta: dict) -> str:
    m, inp, out = meta["model"], meta["input"], meta["output"]
    shape = ", ".join(str(s) for s in inp["shape"])
    norm = inp["normalisation"]
    lines = [
        f"# baffle-edge bundle: {m['name']} ({m['parameters']:,} trainable parameters)",
        "",
        "Files and their sha256 are listed in `baffle.json` (schema version "
        f"{meta['schema_version']}); a client must check them before loading.",
        "",
        "| format | files | perturbation domain |",
        "|---|---|---|",
    ]
    for fmt, info in meta["formats"].items():
        lines.append(f"| {fmt} | {', '.join('`%s`' % f for f in info['files'].values())} | {info['domain']} |")
    target = meta.get("target")
    if target:
        lo, hi = target["int8_weight_range"]
        lines += ["", f"Made for CPU target **{target['name']}** (int8 weights in [{lo}, {hi}]; "
                      f"{target['accumulation']}). A client on another CPU warns; re-export with "
                      "`baffle-edge export --target arm64|x86-vnni|x86-avx2`."]
    lines += [
        "",
        "## Input and output",
        f"- input `{inp['name']}`: {inp['dtype']} [{shape}], {inp['layout']}; "
        f"`{norm['formula']}` with scale {norm['scale']}, mean {norm['mean']}, std {norm['std']}",
        f"- output `{out['name']}`: {out['dtype']} [{', '.join(map(str, out['shape']))}]; {out['loss']}",
        "",
        "## A BAFFLE client round",
        "1. Receive the RoundTask (JSON) and the round's float weights (flat, parameter order of `baffle.json`"
        " `parameters`).",
        "2. For k = 0..K-1 regenerate eps_k (Philox4x32-10 keyed by seed/round/client/k, see `noise` in "
        "`baffle.json` and `noise.md` in this folder, the normative spec with test vectors), evaluate the loss "
        "at the perturbed weights, then upload the K "
        "losses (+ the unperturbed loss) as a ClientReport.",
        "- float graphs (`model.train.onnx`): feed every parameter input `w + float32(sigma) * eps`.",
    ] + [_int8_rule(fmt, info) for fmt, info in meta["formats"].items() if "quantization" in info] + [
        "  The exact integer rules are in `quantized-perturbation.md` in this folder.",
    ] + ([
        "- block noise (`\"noise\": \"block\"`: one output-channel block per perturbation, noise.md sections 8 and "
        "10): `*.block_cache.onnx` runs the unperturbed forward and also outputs the cut tensors listed in "
        "`baffle.json` `formats.<format>.blocks.boundaries`; `*.block_seg<i>.onnx` maps boundary i and module i's "
        "parameters to boundary i+1. Put a row's perturbed channel into channel c of the module's parameters "
        "(one row per channel per call), replace channel c (axis 1) of the cached next boundary with the "
        "output's, and finish the later segments unperturbed: the losses equal a full forward's. A plan with "
        "`\"kind\": \"graph\"` (residual / normalised models) has per module `*.block_mod<i>.onnx` (the "
        "segment's `input` and the parameters -> its `output`) and `*.block_rest<i>.onnx` (that output with "
        "channel c replaced, the cached `sides` repeated per row and the `rest_params` -> logits); a client "
        "that does not know a plan's `kind` runs the rows as full forwards.",
    ] if any("blocks" in info for fmt, info in meta["formats"].items() if fmt != "tflite-int8") else []) + [
        "",
        "## ONNX Runtime Mobile (Kotlin)",
        "```kotlin",
        "val env = OrtEnvironment.getEnvironment()",
        'val session = env.createSession(assets.open("model.int8.train.onnx").readBytes(), OrtSession.SessionOptions())',
        f'val x = OnnxTensor.createTensor(env, FloatBuffer.wrap(batch), longArrayOf(n, {", ".join(map(str, inp["shape"][1:]))}L))',
        "// one OnnxTensor per trainable tensor: name = quantization[i].input, dtype int8/int32, shape = its shape",
        f'val logits = session.run(mapOf("{inp["name"]}" to x) + weightTensors)["{out["name"]}"]',
        "```",
        "For plain inference load `model.int8.ort` (ORT format) or `model.int8.onnx` and feed only "
        f"`{inp['name']}`.",
    ]
    if "tflite-int8" in meta["formats"]:
        lines += [
            "",
            "## LiteRT (TFLite) Interpreter",
            "```kotlin",
            'val options = Interpreter.Options().setUseXNNPACK(false)  // in-place weight writes need built-in kernels',
            'val interpreter = Interpreter(loadModelFile("model.int8.tflite"), options)',
            "// write the perturbed int8 weights into the tensors listed in formats.tflite-int8, then run",
            "interpreter.run(input, logits)",
            "```",
            "XNNPACK packs the weights at load time and silently ignores later writes: keep it off for training "
            "rounds (plain inference may use it).",
        ]
        lines += _tflite_blocks(meta["formats"]["tflite-int8"])
    return "\n".join(lines) + "\n"


def _tflite_blocks(entry: dict) -> list[str]:
    """The LiteRT block-noise paragraph (bundles with segment models)."""
    if "blocks" not in entry:
        return []
    return [
        "",
        "Block noise: `model.int8.block_seg<i>.tflite` is the model's operators from boundary i (the int8 "
        "input of module i, same scale and zero point) to boundary i+1 (`formats.tflite-int8.blocks`; "
        "`segments[i]` gives the input, output and parameter tensor indices). Run them in turn to cache "
        "the boundaries; for a row of module i write its perturbed channel c into segment i's parameter "
        "tensors (one row per channel per call), replace channel c (the last, NHWC axis) of the cached "
        "boundary i+1 with the output's, and finish the later segments unperturbed (a segment with float "
        "operators at the batch's own size): the losses equal a full forward's bit for bit.",
    ]
