"""A bundle folder: every artifact a device client needs, plus ``baffle.json`` (the metadata a
client reads so nothing has to be guessed) and a README for app developers.

Written to a temporary sibling folder and renamed into place, so a failed export leaves nothing
half-written. ``read_bundle`` verifies the sha256 of every file a runtime is about to load.
"""
from __future__ import annotations

import hashlib
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
from baffle_edge.perturb import NOISE_SPEC_VERSION
from baffle_edge.quant import QuantTable

SCHEMA_VERSION = 1
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
        from .batched import check_p
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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    from . import onnx_export as ox

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
        float_proto = ox.export_float(model, calib, tmp / "model.onnx")
        if "onnx" in formats:
            (tmp / "model.train.onnx").write_bytes(
                ox.params_as_inputs(float_proto, [s.name for s in layout.specs]).SerializeToString())
            meta["formats"]["onnx"] = {
                "files": {"inference": "model.onnx", "train": "model.train.onnx"}, "domain": "float",
                "perturbation": "each trainable parameter is a float32 graph input named like the parameter; "
                                "feed w + float32(sigma) * eps (noise.md section 3)"}
        if "onnx-int8" in formats:
            import onnx
            ox.quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx", calib, method=cfg.calibration_method,
                             reduce_range=target.reduce_range)
            int8 = onnx.load(str(tmp / "model.int8.onnx"))
            table = ox.quant_table(int8, layout, reduce_range=target.reduce_range)
            (tmp / "model.int8.train.onnx").write_bytes(ox.int8_train_variant(int8, table).SerializeToString())
            meta["formats"]["onnx-int8"] = {
                "files": {"inference": "model.int8.onnx", "train": "model.int8.train.onnx"}, "domain": "int8-step",
                "perturbation": "each trainable tensor's integers are a graph input (table 'quantization', field "
                                "'input'); feed q' per docs/quantized-perturbation.md",
                "quantization": table.to_json(), "reduce_range": target.reduce_range}
        from .blocks import add_block_graphs
        for fmt in ("onnx", "onnx-int8"):  # block noise's incremental forward (docs/noise.md section 10)
            if fmt in meta["formats"]:
                entry = meta["formats"][fmt]
                table = QuantTable.from_json(entry["quantization"]) if "quantization" in entry else None
                why = add_block_graphs(tmp, entry, meta["parameters"], table)
                if why is not None:
                    entry["blocks_unsupported"] = why
        if cfg.perturbations_per_call > 1:
            _add_batched(tmp, meta, cfg.perturbations_per_call)
        if "ort" in formats:
            ort, config = ox.to_ort_format(tmp / "model.int8.onnx", tmp)
            files = {"inference": ort.name}
            if config is not None:
                ops = tmp / "model.int8.required_operators.config"
                config.replace(ops)
                files["required_operators"] = ops.name
            meta["formats"]["ort"] = {"files": files, "domain": "int8-step",
                                      "note": "ORT Mobile format of model.int8.onnx; build a minimal ORT with "
                                              "--include_ops_by_config model.int8.required_operators.config"}
        if "tflite-int8" in formats:
            from .tflite_export import export_tflite_int8
            meta["formats"]["tflite-int8"] = export_tflite_int8(model, calib, tmp / "model.int8.tflite", layout)
        if "onnx" not in formats:
            (tmp / "model.onnx").unlink()
        for name in SPEC_FILES:  # the normative texts travel with the bundle (hashed like the models)
            (tmp / name).write_bytes(spec_text(name))
        meta["files"] = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                         for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "baffle.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        from .readme import bundle_readme
        (tmp / "README.md").write_text(bundle_readme(meta))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "export_seconds": round(time.perf_counter() - started, 3)}  # timing kept out of the file


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
                  "kinds": {"gaussian": "Box-Muller in float64 -> float32", "rademacher": "1 bit per value"}},
        "calibration": {"samples": cfg.calibration_samples, "method": cfg.calibration_method, "seed": cfg.seed,
                        "reduce_range": target.reduce_range,
                        "dataset": data.name},
        "target": {"name": target.target.value, "requested": str(getattr(cfg.target, "value", cfg.target)),
                   "int8_weight_range": list(target.weight_range), "accumulation": target.accumulation,
                   "exported_on": targets.isa_summary()},
        "versions": _versions(),
        "formats": {},
    }


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: dict

    def file(self, fmt: str, role: str = "train") -> Path:
        if fmt not in self.meta["formats"]:
            raise ValueError(f"bundle {self.path} has no {fmt!r} format (has: {', '.join(self.meta['formats'])}); "
                             f"export it with --formats {fmt}")
        files = self.meta["formats"][fmt]["files"]
        name = files.get(role) or files["inference"]
        path = self.path / name
        want = self.meta["files"].get(name, {}).get("sha256")
        if not path.exists():
            raise FileNotFoundError(f"bundle {self.path} is missing {name}")
        if want is None or sha256(path) != want:
            raise ValueError(f"{path}: sha256 does not match baffle.json (corrupt or modified file)")
        return path

    def quant_table(self, fmt: str) -> QuantTable:
        return QuantTable.from_json(self.meta["formats"][fmt]["quantization"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["input"]["shape"][1:])

    def check_batch(self, x: np.ndarray) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input shape {tuple(x.shape)} does not match baffle.json's "
                             f"(batch, {', '.join(map(str, self.input_shape))})")


def read_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    meta_path = path / "baffle.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a bundle (no baffle.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{meta_path}: schema_version {meta.get('schema_version') if isinstance(meta, dict) else None!r}"
                         f" is not supported (expected {SCHEMA_VERSION})")
    return Bundle(path, meta)
