"""The conformance kit: files a device client (TypeScript, Kotlin, C, ...) checks itself against.

``baffle-edge conformance --out DIR`` (or ``python -m baffle_edge.conformance --out DIR``) writes

    DIR/conformance.json     the index: noise vectors, rounds (task + files + the Python report)
    DIR/bundle/              an fp32 + int8 ONNX bundle of a briefly trained LeNet on digits
    DIR/rounds/*.f32|.i32    round inputs as raw little-endian arrays (weights, batch inputs, labels)

Noise vectors (docs/noise.md): the Philox known-answer tests, short streams given word by word
(``words`` hex = the numeric uint32 values, ``gauss`` hex = float32 bit patterns, ``rad`` signs) and
long ones by the SHA-256 of their float32 little-endian bytes plus a few values around the chunk
boundary. Seeds are JSON integers up to 2**64 - 1: a port must parse them as unsigned 64-bit.

Loss vectors (docs/noise.md section 7): fdlibm ``exp``/``log`` of edge-case arguments and
cross-entropies of small logits arrays, as float64 bit patterns.

Block-noise vectors (docs/noise.md sections 8-11): draws by size and by ``block_weights`` (one set
with a total weight W > 2**32), int8 steps and decoder weights, block tables of edge-case parameter
lists (``tables``) and the int8 freeze rule on hand-made integers (``freeze``).

Rounds: the same (task, weights, batches, bundle) run by the Python ONNX Runtime client
(``runtimes/onnxruntime_runtime.py``, one intra-op thread); its ``ClientReport`` is stored. The block
rounds (fp32 and int8; size, uniform and W > 2**32 draws; FedAvg; central) run through the bundle's
segment graphs. A port
must reproduce the int8 losses exactly (float64 bit for bit) and the fp32 ones within 1e-6
relative, exactly where its float kernels round like this machine's (docs/device-clients.md says
how to check a new client).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import perturb
from .perturb import philox4x32
from .protocol import model_version

KIT_RUNTIMES = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime-int8"}  # bundle format -> the runtime replaying it
KIT_VERSION = 2  # 2: int8 losses bit-identical (the specified loss), loss vectors
# a Gaussian pair with u1 = 1 (first word >= 0xFFFFFF00): r = sqrt(-2 ln 1) = sqrt(-0.0) = -0.0
U1_ONE = dict(seed=0, round=0, client=0, k=1229, index=2648)

KAT = [  # Random123 kat_vectors for philox4x32-10: (counter, key, expected output)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# short streams: (what it exercises, seed, round, client, k', d)
SHORT = [
    ("spec vector 1", 0, 0, 0, 0, 8),
    ("spec vector 2", 42, 7, 3, 11, 8),
    ("spec vector 3: seed >= 2**63, shared client word", 2**63 + 1, 1, perturb.SHARED_CLIENT, 0, 8),
    ("seed 2**64 - 1 (both key words 0xFFFFFFFF)", 2**64 - 1, 2**32 - 1, 2**32 - 2, 2**32 - 1, 8),
    ("seed 2**53 + 1 (not a float64)", 2**53 + 1, 3, 9, 4, 8),
    ("odd dimension 7 (last pair's second value dropped)", 7, 1, 2, 3, 7),
    ("dimension 1", 7, 1, 2, 3, 1),
    ("dimension 0", 7, 1, 2, 3, 0),
    ("odd dimension 33 (Rademacher: 2 words, 31 bits of the last one unused)", 5, 0, 4, 2, 33),
    ("FedAvg k' = step*K + k = 2*100 + 5", 1234, 6, 17, 205, 12),
]
# long streams: (what, seed, round, client, k', d, indices reported one by one)
LONG = [
    ("65,537 values: the Gaussian chunk boundary (65,536) and the odd tail", 3, 1, 2, 0, 65_537,
     [0, 1, 65_531, 65_532, 65_533, 65_534, 65_535, 65_536]),
    ("302,778 values (a WRN-10-2-sized vector)", 11, 4, 5, 6, 302_778, [0, 65_536, 131_072, 302_777]),
]

# block noise (docs/noise.md section 8) on LeNet digits' parameter table: (name, shape, offset)
LENET_PARAMS = [("features.0.weight", (16, 1, 5, 5), 0), ("features.0.bias", (16,), 400),
                ("features.4.weight", (64, 16, 5, 5), 416), ("features.4.bias", (64,), 26016),
                ("fc.weight", (10, 64), 26080), ("fc.bias", (10,), 26720)]
# (what, seed, round, client, k')
BLOCK = [("spec block vector 1", 0, 0, 0, 0), ("spec block vector 2", 42, 7, 3, 11),
         ("spec block vector 3: seed >= 2**63, shared client word", 2**63 + 1, 1, perturb.SHARED_CLIENT, 0),
         ("seed 2**64 - 1", 2**64 - 1, 2**32 - 1, 2**32 - 2, 2**32 - 1),
         ("FedAvg k' = 2*6058 + 5", 1234, 6, 17, 12_121)] + [
         (f"seed 5, k' = {k}", 5, 0, 4, k) for k in range(8)]


def block_vectors() -> dict:
    """Block-noise draws on LeNet digits: the drawn block, its flat indices and its values."""
    table = perturb.BlockTable(LENET_PARAMS)
    rows = []
    for what, seed, rnd, client, k in BLOCK:
        (b,), (v,) = table.draw(seed, rnd, client, [k])
        w = perturb.words(seed, rnd, client, k, 2)
        idx = table.index[table.bounds[b]:table.bounds[b + 1]]
        rows.append({"what": what, "seed": seed, "round": rnd, "client": client, "k": k,
                     "r": ((int(w[1]) << 32) | int(w[0])) % table.dim, "block": int(b),
                     "module": table.modules[table.module[b]], "row": int(table.row[b]), "size": int(v.size),
                     "first_index": int(idx[0]), "last_index": int(idx[-1]), "scale": _bits(table.scale[b:b + 1])[0],
                     "values_head": _bits(v[:4]), "values_last": _bits(v[-1:])[0], "sha256_f32le": _sha(v)})
    steps = []  # int8-step block noise (docs/noise.md section 10): the same block, +-m_b whole steps
    for what, seed, rnd, client, k in BLOCK:
        (b,), (v,) = table.draw_steps(seed, rnd, client, [k])
        steps.append({"what": what, "seed": seed, "round": rnd, "client": client, "k": k, "block": int(b),
                      "steps": int(table.steps[b]), "step_weight": float(table.step_weight[b]),
                      "signs": _signs(v)})
    weighted = []  # docs/noise.md section 11: block_weights per module
    for weights in WEIGHTED:
        t = table.weighted(weights)
        for what, seed, rnd, client, k in BLOCK[:5] + (BLOCK[5:] if t.draw_total > 2**32 else []):
            (b,), (v,) = t.draw(seed, rnd, client, [k])
            (_, ), (st,) = t.draw_steps(seed, rnd, client, [k])
            w = perturb.words(seed, rnd, client, k, 2)
            weighted.append({"block_weights": list(weights), "what": what, "seed": seed, "round": rnd,
                             "client": client, "k": k, "total_weight": t.draw_total,
                             "r": ((int(w[1]) << 32) | int(w[0])) % t.draw_total, "block": int(b),
                             "scale": _bits(t.scale[b:b + 1])[0], "values_head": _bits(v[:4]), "sha256_f32le": _sha(v),
                             "steps": int(t.steps[b]), "step_weight": float(t.step_weight[b]), "signs": _signs(st)})
    return {"parameters": [{"name": n, "shape": list(s), "offset": o} for n, s, o in LENET_PARAMS],
            "modules": table.to_json(), "draws": rows, "int8_step_draws": steps, "weighted_draws": weighted,
            "tables": table_vectors(), "freeze": freeze_vectors()}


# weighted draws: uniform, skewed, and a total draw weight W > 2**32 (r must be reduced in 64-bit arithmetic)
WEIGHTED = ((1, 1, 1), (3, 1, 1000), (2**32 - 1, 1, 2**31 + 7))

# block-table edge cases (docs/noise.md section 8): (what, parameters (name, shape, offset))
TABLES = [
    ("a name without a dot is its own module; a 0-d tensor is one row",
     [("scale", (), 0), ("layer.weight", (3, 2), 1), ("layer.bias", (3,), 7)]),
    ("tensors of one module that are not adjacent: grouped at the module's first tensor, in parameter order",
     [("a.weight", (2, 3), 0), ("b.weight", (4,), 6), ("a.bias", (2,), 10)]),
    ("m_b at a tie: sqrt(25 / 4) = 2.5 gives floor(2.5 + 0.5) = 3 (half-to-even would give 2)",
     [("t.weight", (4, 4), 0), ("u.weight", (1, 9), 16)]),
]


def table_vectors() -> list[dict]:
    """Block tables of edge-case parameter lists: every block's flat indices, m_b and scale."""
    out = []
    for what, params in TABLES:
        t = perturb.BlockTable(params)
        out.append({"what": what, "parameters": [{"name": n, "shape": list(s), "offset": o} for n, s, o in params],
                    "modules": list(t.modules), "blocks": [
                        {"module": t.modules[t.module[b]], "row": int(t.row[b]),
                         "index": [int(i) for i in t.index[t.bounds[b]:t.bounds[b + 1]]], "steps": int(t.steps[b]),
                         "scale": _bits(t.scale[b:b + 1])[0]} for b in range(len(t.sizes))]})
    out.append({"what": "tensors of one module disagreeing on their first dimension: refused",
                "parameters": [{"name": "m.weight", "shape": [3, 2], "offset": 0},
                               {"name": "m.bias", "shape": [2], "offset": 6}], "error": "disagree"})
    return out


def freeze_vectors() -> list[dict]:
    """The int8 freeze rule (docs/noise.md section 10, quant.FlatSteps) on hand-made integers: per
    coordinate its tensor's dtype, [lo, hi], multiplier, q and the drawn steps m_b * u (signed), the
    moved integers q'(+1), q'(-1), which coordinates are frozen, and eps_eff (forward and central)."""
    from .quant import FlatSteps, QTensor, QuantTable
    cases = [  # (what, QTensor fields, q, steps)
        ("8-bit weights, bounds [-127, 127]: frozen where q +- m_b leaves them (either direction)",
         dict(name="w", dtype="int8", lo=-127, hi=127), [127, 120, 119, -119, -120, -127, 0, 100],
         [8, 8, -8, 8, -8, 8, -32, -32]),
        ("7-bit weights (x86-avx2), bounds [-64, 64]", dict(name="w", dtype="int8", qmax=64, lo=-64, hi=64),
         [64, 56, 57, -56, -57, 0], [8, 8, -8, -8, 8, 20]),
        ("int32 biases: delta = multiplier * m_b * u (multiplier 37, not m_b); q + |delta| beyond 2^31 - 1 "
         "must be computed without int32 overflow", dict(name="b", dtype="int32", multiplier=37, qmax=2**31 - 1),
         [2**31 - 1 - 296, 2**31 - 1 - 295, -(2**31) + 296, -(2**31) + 295, 1000, -5],
         [-8, 8, 8, -8, 20, -20]),
    ]
    out = []
    for what, fields, q, steps in cases:
        f = dict(input=fields["name"], offset=0, shape=(len(q),), axis=0, scale=(1.0,) * len(q)) | fields
        t = QTensor(**f)
        flat = FlatSteps(QuantTable((t,)), [np.asarray(q, dtype=t.dtype)])
        idx, st = np.arange(len(q)), np.asarray(steps, np.int64)
        plus, minus = flat.moved(idx, st, 1), flat.moved(idx, st, -1)
        lo, hi = t.bounds
        out.append({"what": what, "dtype": t.dtype, "lo": lo, "hi": hi, "multiplier": t.multiplier, "q": q,
                    "steps": steps, "moved_plus": [int(v) for v in plus], "moved_minus": [int(v) for v in minus],
                    "frozen": [bool(v) for v in plus == np.asarray(q)],
                    "eps_eff_forward": [float(v) for v in flat.effective(idx, st)],
                    "eps_eff_central": [float(v) for v in flat.effective(idx, st, central=True)]})
    return out


def _hex(words_: np.ndarray) -> list[str]:
    return [f"{int(w):08x}" for w in words_]


def _bits(values: np.ndarray) -> list[str]:
    return _hex(np.asarray(values, np.float32).view(np.uint32))


def _signs(values: np.ndarray) -> str:
    return "".join("-" if v < 0 else "+" for v in values)


def _sha(values: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(values, "<f4").tobytes()).hexdigest()


def noise_vectors() -> dict:
    """Every noise vector of the kit (pure: no files)."""
    kat = [{"counter": _hex(c), "key": _hex(k), "output": _hex(o)} for c, k, o in KAT]
    for row, (c, k, o) in zip(kat, KAT):
        got = philox4x32(c, k).reshape(-1)
        assert tuple(int(x) for x in got) == o, f"philox4x32 fails its known-answer test {row}"
    short = []
    for what, seed, rnd, client, k, d in SHORT:
        gauss = perturb.noise(seed, rnd, client, k, d, "gaussian")
        rad = perturb.noise(seed, rnd, client, k, d, "rademacher")
        short.append({"what": what, "seed": seed, "round": rnd, "client": client, "k": k, "d": d,
                      "words": _hex(perturb.words(seed, rnd, client, k, max(8, d + (d & 1)))),
                      "gauss": _bits(gauss), "rad": _signs(rad),
                      "negative_signs_words": _hex(perturb.words(seed, rnd, client, k, -(-d // 32)))})
    long = []
    for what, seed, rnd, client, k, d, idx in LONG:
        for kind in ("gaussian", "rademacher"):
            v = perturb.noise(seed, rnd, client, k, d, kind)
            long.append({"what": what, "kind": kind, "seed": seed, "round": rnd, "client": client, "k": k,
                         "d": d, "sha256_f32le": _sha(v), "values": {str(i): _bits(v[i:i + 1])[0] for i in idx}})
    u = U1_ONE
    v = perturb.noise(u["seed"], u["round"], u["client"], u["k"], u["index"] + 2)
    w = perturb.words(u["seed"], u["round"], u["client"], u["k"], u["index"] + 2)
    assert w[u["index"]] >> 8 == 0xFFFFFF, "the u1 = 1 vector no longer has u1 = 1"
    u1_one = {**u, "d": u["index"] + 2, "pair_words": _hex(w[u["index"]:u["index"] + 2]),
              "gauss": _bits(v[u["index"]:]), "sha256_f32le": _sha(v)}
    return {"spec_version": perturb.NOISE_SPEC_VERSION, "philox_kat": kat, "short": short, "long": long,
            "u1_one": u1_one, "block": block_vectors()}


# ------------------------------------------------------------------------------------------- losses
LIBM_ARGUMENTS = [  # exp/log edge cases: zeros, subnormals, thresholds, fdlibm's branch boundaries
    0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1e-300, 2.0**-28, -2.0**-28,
    2.0**-29, 0.34657359027997264, 0.3465735902799727, -0.34657359027997264, 1.0397207708399179, -1.0397207708399179,
    1.0, 1.0000000000000002, 0.9999999999999999, 1.000000954, 0.5, 1.7, -1.7, 2.0, 10.0, -12.420129267708877,
    709.782712893384, 709.7827128933841, 709.79, -708.3964185322641, -708.4, -744.44, -745.1332191019411,
    -745.1332191019412, -746.0, 1e300, 1.7976931348623157e308, float("inf"), float("-inf"), float("nan")]


def _f64(v) -> list[str]:
    return [f"{b:016x}" for b in np.asarray(v, dtype="<f8").reshape(-1).view(np.uint64)]


def loss_vectors(seed: int = 0) -> dict:
    """fdlibm exp/log of ``LIBM_ARGUMENTS`` and the specified cross-entropy of a few logits arrays
    (random, ties for the maximum, one whose other classes underflow to exp = 0, 100 classes), all
    as float64 bit patterns (logits: float32 bit patterns, row-major batch x classes)."""
    from . import libm
    from .client import cross_entropy
    rng = np.random.default_rng([seed, 0x1055])
    x = np.array(LIBM_ARGUMENTS)
    cases = [("random, 4 x 10", (rng.standard_normal((4, 10)) * 4).astype(np.float32), [3, 0, 9, 5]),
             ("ties: the first maximum", np.array([[2, 5, 5, -1], [0, 0, 0, 0], [-0.0, 0.0, -3, -0.0]], np.float32), [1, 2, 0]),
             ("saturated: the other classes' exp underflows", np.array([[800, 0, -5], [0, 900, 1]], np.float32), [0, 1]),
             ("32 x 100", (rng.standard_normal((32, 100)) * 6).astype(np.float32), rng.integers(0, 100, 32).tolist())]
    return {"libm": {"x": _f64(x), "exp": _f64(libm.exp(x)), "log": _f64(libm.log(x))},
            "cross_entropy": [{"what": what, "shape": list(z.shape), "logits": _bits(z.reshape(-1)), "labels": y,
                               "loss": _f64(cross_entropy(z, np.array(y)))[0]} for what, z, y in cases]}


# ------------------------------------------------------------------------------------------- rounds
# (name, bundle format, task fields, client options). Every task is built at the kit's weights.
ROUNDS = [
    ("fp32-forward", "onnx", dict(k=8, sigma=1e-3), {}),
    ("fp32-central-rademacher", "onnx", dict(k=6, sigma=1e-3, scheme="central", noise="rademacher"), {}),
    ("fp32-fedavg", "onnx", dict(k=6, sigma=1e-3, local_steps=3), dict(local_lr=0.05, clip=0.3)),
    ("int8-forward-k100", "onnx-int8", dict(k=100, baseline="leave-one-out"), {}),
    ("int8-central-shared", "onnx-int8", dict(k=8, scheme="central", noise_scope="shared",
                                              seed=2**63 + 5, estimator="per-step"), {}),
    ("int8-fedavg", "onnx-int8", dict(k=10, baseline="leave-one-out", local_steps=3),
     dict(local_lr=0.05, clip=0.3)),
    ("int8-fedavg-noclip", "onnx-int8", dict(k=6, local_steps=2), dict(local_lr=0.02, clip=None)),
    # block noise (docs/noise.md sections 8-11): rows through the bundle's segment graphs
    ("fp32-block", "onnx", dict(k=300, sigma=1e-3, noise="block"), {}),
    ("fp32-block-uniform-central", "onnx", dict(k=60, sigma=1e-3, noise="block", scheme="central",
                                                block_weights=(1, 1, 1)), {}),
    ("fp32-block-fedavg", "onnx", dict(k=40, sigma=1e-3, noise="block", local_steps=2), dict(local_lr=0.05, clip=0.3)),
    ("int8-block", "onnx-int8", dict(k=400, noise="block", baseline="leave-one-out"), {}),
    ("int8-block-weighted-w64", "onnx-int8", dict(k=200, noise="block", block_weights=(2**32 - 1, 3, 2**31 + 7),
                                                           seed=2**64 - 1), {}),
    ("int8-block-central-fedavg", "onnx-int8", dict(k=60, noise="block", scheme="central", local_steps=2,
                                                    estimator="per-step", noise_scope="shared"),
     dict(local_lr=0.05, clip=0.3)),
    # at most 4 whole steps per block (docs/noise.md section 10: max_block_steps), weighted draws
    ("int8-block-max-steps-4", "onnx-int8", dict(k=200, noise="block", max_block_steps=4,
                                                 block_weights=(5, 1, 3)), {}),
]
INT8_TASK = dict(noise="rademacher", domain="int8-step", sigma=1.0)


def summation_vectors(seed: int = 0) -> list[dict]:
    """float64 arrays whose numpy sum depends on the summation order (numpy sums pairwise, with 8
    accumulators per block of <= 128 values): a port that sums in another order gets other bits in
    the losses' softmax sums and means, and in FedAvg's local weights."""
    rng = np.random.default_rng([seed, 0x5E])
    out = []
    for n in (5, 10, 32, 100, 128, 129, 300, 26_730):
        v = rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 12)
        out.append({"values": [float(x) for x in v], "sum": float(np.sum(v)), "mean": float(np.mean(v))})
    return out


KIT_MODELS = ("lenet", "wrn-10-2", "mobilenet")  # --model: LeNet (the kit), or a model whose block plan is a graph


def trained_model(data, steps: int, seed: int, name: str = "lenet"):
    """A model trained for a few Adam steps on digits (informative gradients, int8 scales of a real model)."""
    import torch

    from .models import ModelConfig, build_model
    model = build_model(ModelConfig(name), seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    for i in range(steps):
        j = (i * 32) % (len(y) - 32)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[j:j + 32]), y[j:j + 32]).backward()
        opt.step()
    return model.eval()


def trained_lenet(data, steps: int, seed: int):
    return trained_model(data, steps, seed)


# the rounds of a kit of another model (--model): its block rounds and one dense round per format (its
# segment graphs are what a port must get right; K small enough for a deeper model's rows)
OTHER_MODEL_ROUNDS = ("fp32-forward", "fp32-block", "fp32-block-uniform-central", "int8-forward-k100", "int8-block",
                      "int8-block-central-fedavg", "int8-block-max-steps-4")
OTHER_MODEL_K = {"fp32-block": 120, "int8-block": 160, "int8-forward-k100": 20}


def kit_rounds(model: str, modules: int) -> list[tuple]:
    """``ROUNDS`` for the LeNet kit; for another model (of ``modules`` block modules) the rounds named by
    ``OTHER_MODEL_ROUNDS``, uniform ``block_weights`` one per module."""
    if model == "lenet":
        return ROUNDS
    out = []
    for name, fmt, fields, options in ROUNDS:
        if name in OTHER_MODEL_ROUNDS:
            fields = fields | ({"k": OTHER_MODEL_K[name]} if name in OTHER_MODEL_K else {})
            if "block_weights" in fields:
                fields = fields | {"block_weights": (1,) * modules}  # the other model's module count
            out.append((name, fmt, fields, options))
    return out


def _make_task(fields: dict, options: dict, version: str):
    """A RoundTask of the kit; FedAvg's local_lr/clip (``options``) are task fields."""
    from .protocol import RoundTask
    return RoundTask(**({"round": 3, "client": 2, "seed": 2024, "model_version": version} | fields | options))


def write_kit(out: str | Path, *, force: bool = False, train_steps: int = 60, batch: int = 32,
              progress: bool = True, model: str = "lenet") -> dict:
    """Write the whole kit into ``out``; returns the index (conformance.json). ``model``: the kit's model
    (LeNet, the default kit; wrn-10-2 / mobilenet: a kit of that model's rounds, ``kit_rounds``)."""
    from .client import Batch
    from .data import load_digits
    from .device import DeviceSettings, answer, open_session
    from .export.bundle import ExportConfig, export_bundle
    from .models import ModelConfig
    from .params import flat_params, layout_of

    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    started = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if model not in KIT_MODELS:
        raise ValueError(f"unknown kit model {model!r}; known: {', '.join(KIT_MODELS)}")
    name = model
    data = load_digits(seed=0)
    say(f"conformance: training {name} on digits for {train_steps} steps, exporting the bundle")
    model = trained_model(data, train_steps, seed=0, name=name)
    (out / "rounds").mkdir(parents=True)
    export_bundle(model, ModelConfig(name), data, out / "bundle", ExportConfig(formats=("onnx", "onnx-int8")),
                  source=f"conformance kit: {name}, {train_steps} Adam steps on digits")
    kit = kit_rounds(name, len(perturb.BlockTable.from_layout(layout_of(model)).modules))
    weights = flat_params(model).numpy().astype("<f4")
    weights.tofile(out / "rounds" / "weights.f32")
    version = model_version(weights)
    n_batches = max(t.get("local_steps", 1) for _, _, t, _ in kit)
    batch_files = []
    for i in range(n_batches):
        x = np.ascontiguousarray(data.x_test[i * batch:(i + 1) * batch], "<f4")
        y = np.ascontiguousarray(data.y_test[i * batch:(i + 1) * batch], "<i4")
        x.tofile(out / "rounds" / f"batch{i}.x.f32")
        y.tofile(out / "rounds" / f"batch{i}.y.i32")
        batch_files.append({"x": f"rounds/batch{i}.x.f32", "y": f"rounds/batch{i}.y.i32",
                            "shape": list(x.shape), "labels": int(y.size)})
    sessions = {fmt: open_session(DeviceSettings(runtime=runtime, perturbations_per_call=1, threads=1), out / "bundle")
                for fmt, runtime in KIT_RUNTIMES.items()}
    x0 = np.fromfile(out / batch_files[0]["x"], "<f4").reshape(batch_files[0]["shape"])
    logits = {}
    for fmt, session in sessions.items():
        session.set_weights(weights)
        logits[fmt] = _bits(session.logits(x0).reshape(-1))  # float32 bit patterns, row-major (batch, classes)
    rounds = []
    for round_name, fmt, fields, options in kit:
        fields = (INT8_TASK if fmt == "onnx-int8" else {}) | fields
        task = _make_task(fields, options, version)
        steps = task.local_steps
        batches = [Batch(np.fromfile(out / b["x"], "<f4").reshape(b["shape"]),
                         np.fromfile(out / b["y"], "<i4").astype(np.int64)) for b in batch_files[:steps]]
        report = answer(task, sessions[fmt], batches, weights=weights, runtime=KIT_RUNTIMES[fmt],
                        label="onnxruntime-python")
        say(f"conformance: round {round_name:26s} {report.losses.size + report.base_losses.size:4d} losses, "
            f"{report.seconds * 1e3:7.1f} ms")
        rounds.append({"name": round_name, "format": fmt, "task": json.loads(task.to_json()),
                       "client_options": options, "weights": "rounds/weights.f32",
                       "batches": batch_files[:steps], "report": json.loads(report.to_json())})
    index = {"kit_version": KIT_VERSION, "model": name, "noise": noise_vectors(), "bundle": "bundle",
             "weights": {"file": "rounds/weights.f32", "values": int(weights.size), "model_version": version},
             "base_logits": {"batch": 0, "formats": logits},
             "tolerance": {"int8_logits": "identical", "int8_losses_relative": 0.0, "fp32_losses_relative": 1e-6,
                           "fp32_multistep_losses_relative": 1e-5, "gradient_cosine": 0.999999},
             "summation": summation_vectors(),
             "loss": loss_vectors(),
             "rounds": rounds,
             "python": {"onnxruntime_threads": 1, "versions": json.loads((out / "bundle" / "baffle.json")
                                                                        .read_text())["versions"]}}
    (out / "conformance.json").write_text(json.dumps(index, indent=1))
    say(f"conformance: kit written to {out} in {time.perf_counter() - started:.1f} s")
    return index


def add_parser(sub) -> None:
    p = sub.add_parser("conformance", help="write the conformance kit a device client port checks itself against",
                       description="Write noise vectors, an fp32 + int8 LeNet bundle, round inputs and the "
                                   "Python client's reports into OUT (docs/device-clients.md).")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--model", default="lenet", choices=KIT_MODELS,
                   help="the kit's model (default: %(default)s; wrn-10-2: residual adds and GroupNorm, its block "
                        "rows through a graph plan's module and rest segments; mobilenet: depthwise-separable)")
    p.set_defaults(func=lambda a: (write_kit(a.out, force=a.force, model=a.model), 0)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baffle_edge.conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    parser.add_argument("--model", default="lenet", choices=KIT_MODELS, help="the kit's model (default: %(default)s)")
    a = parser.parse_args(argv)
    try:
        write_kit(a.out, force=a.force, progress=not a.quiet, model=a.model)
    except (ValueError, FileExistsError) as e:
        print(f"conformance: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
