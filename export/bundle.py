"""A bundle folder: every artifact a device client needs, plus ``baffle.json`` (the metadata a
client reads so nothing has to be guessed) and a README for app developers.

Written to a temporary sibling folder and renamed into place, so a failed export leaves nothing
half-written. Reading a bundle is the device side's job: ``baffle_edge.bundle.read_bundle`` (the
reader both ends use) verifies the sha256 of every file a runtime is about to load.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baffle_edge import __version__, targets
from baffle_edge.bundle import SCHEMA_VERSION, check_p, sha256
from baffle_edge.perturb import NOISE_SPEC_VERSION
from baffle_edge.quant import QuantTable

FORMATS = ("onnx", "onnx-int8", "ort", "tflite-int8")
FORMAT_FILES = {
    "onnx": ("model.onnx", "model.train.onnx"),
    "onnx-int8": ("model.int8.onnx", "model.int8.train.onnx"),
    "ort": ("model.int8.ort",),
    "tflite-int8": ("model.int8.tflite",),
}


SPEC_FILES = ("noise.md", "quantized-perturbation.md")  # docs/ pages copied into every bundle


def spec_text(name: str) -> bytes:
    """A normative docs/ page as installed with the package (baffle_edge/spec/ links to docs/)."""
    from importlib.resources import files
    return files("baffle_edge").joinpath("spec", name).read_bytes()


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ("onnx", "onnx-int8")
    calibration_samples: int = 256  # training samples used to calibrate int8 activation ranges
    calibration_method: str = "minmax"  # minmax | entropy | percentile (onnxruntime)
    target: str = "auto"  # CPU the int8 bundle is made for: arm64 | x86-vnni | x86-avx2 | auto (this machine's);
    # decides the int8 weight range (7-bit only for x86-avx2), baffle_edge/targets.py
    seed: int = 0  # which calibration samples are drawn
    perturbations_per_call: int = 1  # > 1: also write model[.int8].p{P}.train.onnx (export/batched.py, issue 9)

    def __post_init__(self):
        check_p(self.perturbations_per_call)
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"unknown format(s) {unknown or '(none)'}; known: {', '.join(FORMATS)}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        targets.resolve(self.target)  # an unknown name fails here

    @property
    def target_spec(self) -> "targets.TargetSpec":
        return targets.spec(self.target)


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    v = {"baffle_edge": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        from importlib.metadata import version
        v["litert_torch"] = version("litert-torch")
        v["ai_edge_litert"] = version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - optional extra not installed
        pass
    return v


def calibration_set(x_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0xCA11B])
    idx = np.sort(rng.choice(len(x_train), size=min(n, len(x_train)), replace=False))
    return np.ascontiguousarray(x_train[idx], dtype=np.float32)


def export_bundle(model, model_cfg, data, out: str | Path, cfg: ExportConfig = ExportConfig(), *,
                  force: bool = False, source: str = "") -> dict:
    """Export ``model`` (a torch module built from ``model_cfg``, trained on ``data``'s
    normalisation) in the requested formats into the folder ``out``. Returns the metadata."""
    from baffle_edge.models import check_model
    from baffle_edge.params import layout_of

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    check_model(model)
    formats = list(dict.fromkeys(cfg.formats))
    if "ort" in formats and "onnx-int8" not in formats:
        formats.insert(formats.index("ort"), "onnx-int8")  # .ort is converted from the int8 graph
    layout = layout_of(model)
    calib = calibration_set(data.x_train, cfg.calibration_samples, cfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    started = time.perf_counter()
    target = cfg.target_spec
    try:
        meta = _base_meta(model_cfg, data, layout, cfg, source, target)
        _write_models(tmp, meta, model, calib, layout, formats, cfg, target)
        _seal(tmp, meta)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "export_seconds": round(time.perf_counter() - started, 3)}  # timing kept out of the file


def _write_models(folder: Path, meta: dict, model, calib: np.ndarray, layout, formats: list[str],
                  cfg: ExportConfig, target: "targets.TargetSpec") -> None:
    """Every model file of ``formats`` into ``folder``, each format's entry into ``meta["formats"]``."""
    from . import onnx_export as ox
    float_proto = ox.export_float(model, calib, folder / "model.onnx")
    if "onnx" in formats:
        (folder / "model.train.onnx").write_bytes(
            ox.params_as_inputs(float_proto, [s.name for s in layout.specs]).SerializeToString())
        meta["formats"]["onnx"] = {
            "files": {"inference": "model.onnx", "train": "model.train.onnx"}, "domain": "float",
            "perturbation": "each trainable parameter is a float32 graph input named like the parameter; "
                            "feed w + float32(sigma) * eps (noise.md section 3)"}
    if "onnx-int8" in formats:
        meta["formats"]["onnx-int8"] = _int8_onnx(folder, calib, layout, cfg.calibration_method, target)
    _add_blocks(folder, meta)
    if cfg.perturbations_per_call > 1:
        _add_batched(folder, meta, cfg.perturbations_per_call)
    if "ort" in formats:
        meta["formats"]["ort"] = _ort(folder)
    if "tflite-int8" in formats:
        from .tflite_export import export_tflite_int8
        meta["formats"]["tflite-int8"] = export_tflite_int8(model, calib, folder / "model.int8.tflite", layout)
    if "onnx" not in formats:
        (folder / "model.onnx").unlink()


def _int8_onnx(folder: Path, calib: np.ndarray, layout, method: str, target: "targets.TargetSpec") -> dict:
    """``model.int8.onnx`` quantized from ``model.onnx``, its train variant; the format entry."""
    import onnx

    from . import onnx_export as ox
    ox.quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", calib, method=method,
                     reduce_range=target.reduce_range, per_channel=target.per_channel, logits=target.logits)
    int8 = onnx.load(str(folder / "model.int8.onnx"))
    table = ox.quant_table(int8, layout, reduce_range=target.reduce_range)
    (folder / "model.int8.train.onnx").write_bytes(ox.int8_train_variant(int8, table).SerializeToString())
    return {"files": {"inference": "model.int8.onnx", "train": "model.int8.train.onnx"}, "domain": "int8-step",
            "perturbation": "each trainable tensor's integers are a graph input (table 'quantization', field "
                            "'input'); feed q' per docs/quantized-perturbation.md",
            "quantization": table.to_json(), "reduce_range": target.reduce_range,
            "per_channel": target.per_channel, **({"logits": target.logits} if target.logits != "float" else {})}


def _add_blocks(folder: Path, meta: dict) -> None:
    """Block noise's incremental forward (docs/noise.md section 10) for every ONNX format."""
    from .blocks import add_block_graphs
    for fmt in ("onnx", "onnx-int8"):
        if fmt in meta["formats"]:
            entry = meta["formats"][fmt]
            table = QuantTable.from_json(entry["quantization"]) if "quantization" in entry else None
            why = add_block_graphs(folder, entry, meta["parameters"], table)
            if why is not None:
                entry["blocks_unsupported"] = why


def _ort(folder: Path) -> dict:
    """``model.int8.ort`` (and its operator config) converted from the int8 graph; the format entry."""
    from . import onnx_export as ox
    ort, config = ox.to_ort_format(folder / "model.int8.onnx", folder)
    files = {"inference": ort.name}
    if config is not None:
        ops = folder / "model.int8.required_operators.config"
        config.replace(ops)
        files["required_operators"] = ops.name
    return {"files": files, "domain": "int8-step",
            "note": "ORT Mobile format of model.int8.onnx; build a minimal ORT with "
                    "--include_ops_by_config model.int8.required_operators.config"}


def _seal(folder: Path, meta: dict) -> None:
    """The normative texts, every file's sha256, ``baffle.json`` and the README."""
    for name in SPEC_FILES:  # the normative texts travel with the bundle (hashed like the models)
        (folder / name).write_bytes(spec_text(name))
    meta["files"] = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                     for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / "baffle.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    from .readme import bundle_readme
    (folder / "README.md").write_text(bundle_readme(meta))


def add_batched(folder: str | Path, ps) -> None:
    """Add the ``train_p{P}`` graphs for every P in ``ps`` to an exported bundle and seal it again: a device
    without ``onnx`` cannot build them (benchmarks/store.py keeps bundles for such devices)."""
    folder = Path(folder)
    meta = json.loads((folder / "baffle.json").read_text())
    for p in ps:
        check_p(p)
        if p > 1:
            _add_batched(folder, meta, p)
    (folder / "README.md").unlink(missing_ok=True)  # _seal hashes the models and specs, then writes it anew
    _seal(folder, meta)


def _add_batched(folder: Path, meta: dict, p: int) -> None:
    """Write the P-perturbations-per-call variant of every ONNX train graph (export/batched.py)."""
    import onnx
    from .batched import batch_graph, train_file_name
    for fmt in ("onnx", "onnx-int8"):
        if fmt not in meta["formats"]:
            continue
        entry = meta["formats"][fmt]
        name = train_file_name(entry["files"]["train"], p)
        (folder / name).write_bytes(batch_graph(onnx.load(str(folder / entry["files"]["train"])), p)
                                    .SerializeToString())
        entry["files"][f"train_p{p}"] = name
        entry["perturbations_per_call"] = p


def _base_meta(model_cfg, data, layout, cfg: ExportConfig, source: str, target: "targets.TargetSpec") -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "model": {"name": model_cfg.name, "in_channels": model_cfg.in_channels, "image_size": model_cfg.image_size,
                  "num_classes": model_cfg.num_classes, "activation": str(getattr(model_cfg.activation, "value",
                                                                                  model_cfg.activation)),
                  "norm": str(getattr(model_cfg.norm, "value", model_cfg.norm)), "parameters": layout.dim},
        "input": {"name": "input", "shape": ["batch", model_cfg.in_channels, model_cfg.image_size,
                                             model_cfg.image_size], "dtype": "float32", "layout": "NCHW",
                  "normalisation": {"formula": "x = (raw / scale - mean[c]) / std[c]", "scale": data.scale,
                                    "mean": list(data.mean), "std": list(data.std)}},
        "output": {"name": "logits", "shape": ["batch", model_cfg.num_classes], "dtype": "float32",
                   "loss": "mean softmax cross-entropy of the logits in float64, bit for bit as noise.md section 7 "
                           "specifies (fdlibm exp/log, pairwise sums)"},
        "parameters": layout.to_json(),
        "noise": {"spec_version": NOISE_SPEC_VERSION, "spec": "noise.md", "int8_spec": "quantized-perturbation.md", "generator": "philox4x32-10",
                  "key": "(seed & 0xFFFFFFFF, seed >> 32)", "counter": "(block, step*K + k, client, round)",
                  "kinds": {"gaussian": "Box-Muller in float64 -> float32", "rademacher": "1 bit per value",
                            "block": "one output-channel block per perturbation (noise.md sections 8-11; int8: "
                                     "whole steps, freeze rule of section 10)"}},
        "calibration": {"samples": cfg.calibration_samples, "method": cfg.calibration_method, "seed": cfg.seed,
                        "reduce_range": target.reduce_range,
                        "dataset": data.name},
        "target": {"name": target.target.value, "requested": str(getattr(cfg.target, "value", cfg.target)),
                   "int8_weight_range": list(target.weight_range), "accumulation": target.accumulation,
                   "exported_on": targets.isa_summary()},
        "versions": _versions(),
        "formats": {},
    }
