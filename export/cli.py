"""``baffle-edge export``: a checkpoint (or a fresh seeded model) -> a device bundle folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .bundle import FORMATS, ExportConfig, export_bundle


def load_model_for_export(a: argparse.Namespace):
    """(model, model_cfg, dataset, source) from --checkpoint or --model/--init-seed."""
    from baffle_edge.data import load_dataset
    from baffle_edge.models import ModelConfig, build_model, default_norm

    if a.checkpoint:
        from baffle_edge.simulate import TrainConfig, load_checkpoint, model_config
        path = Path(a.checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint {path} does not exist")
        state = load_checkpoint(path)
        try:
            cfg = TrainConfig.from_json(json.loads(state["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: checkpoint has no valid run config ({e})") from None
        data = load_dataset(cfg.dataset, a.data_dir or cfg.data_dir, seed=cfg.seed)
        mcfg = model_config(cfg, data)
        model = build_model(mcfg, seed=cfg.seed)
        try:
            model.load_state_dict(state["server"]["model"])
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{path}: weights do not fit model {mcfg.name!r} ({str(e).splitlines()[0]})") from None
        return model, mcfg, data, f"checkpoint {path} (round {state['next_round']})"
    data = load_dataset(a.calibration, a.data_dir, seed=a.init_seed)
    mcfg = ModelConfig(a.model, data.in_channels, data.image_size, data.num_classes,
                       norm=default_norm(a.model))
    return build_model(mcfg, seed=a.init_seed), mcfg, data, f"fresh {a.model} (init seed {a.init_seed})"


def cmd_export(a: argparse.Namespace) -> int:
    formats = tuple(f.strip() for f in a.formats.split(",") if f.strip())
    cfg = ExportConfig(formats=formats, calibration_samples=a.calibration_samples,
                       calibration_method=a.calibration_method, seed=a.init_seed, target=a.target)
    model, mcfg, data, source = load_model_for_export(a)
    meta = export_bundle(model, mcfg, data, a.out, cfg, force=a.force, source=source)
    t = meta["target"]
    print(f"bundle {a.out} ({source}), target {t['name']} (int8 weights in {t['int8_weight_range']}), "
          f"{meta['export_seconds']:.1f} s:")
    for name, f in meta["files"].items():
        print(f"  {name:42s} {f['bytes']:>10,d} bytes  sha256 {f['sha256'][:16]}")
    return 0


def add_parser(sub) -> None:
    from baffle_edge.data import DATASETS
    from baffle_edge.config import MODEL_NAMES
    p = sub.add_parser("export", help="export a model to an int8 ONNX / ORT / TFLite bundle for devices",
                       description="Write a bundle folder (model files, baffle.json metadata, README.md) that a "
                                   "device client loads; with the block-noise segments of every format: for chain "
                                   "models (lenet, mobilenet, mlp without normalisation) *.block_seg<i>.onnx and "
                                   "model.int8.block_seg<i>.tflite, for other ONNX graphs of Conv/Gemm modules "
                                   "(wrn-10-2, --norm group) *.block_mod<i>.onnx + *.block_rest<i>.onnx "
                                   "(docs/noise.md section 10). "
                                   "Written atomically: a failed export leaves nothing.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="RUN/checkpoint.pt from `baffle-edge train`")
    src.add_argument("--model", default="lenet", choices=MODEL_NAMES,
                     help="export a fresh seeded model instead (default: lenet)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the fresh model and calibration draw (default: 0)")
    p.add_argument("--formats", default="onnx,onnx-int8",
                   help=f"comma-separated, of: {', '.join(FORMATS)} (default: onnx,onnx-int8; tflite-int8 needs "
                        "pip install 'baffle-edge[tflite]')")
    p.add_argument("--calibration", default="digits", choices=DATASETS,
                   help="dataset for shapes, normalisation and int8 calibration of a fresh model (a checkpoint "
                        "uses its own) (default: digits)")
    p.add_argument("--data-dir", default=None, help="local files for mnist/cifar10")
    p.add_argument("--calibration-samples", type=int, default=256, help="training samples to calibrate on (default: 256)")
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="onnxruntime calibration method for activation ranges (default: minmax)")
    from baffle_edge.targets import CHOICES, detect
    try:
        here = detect().value
    except ValueError:
        here = "unknown"
    p.add_argument("--target", default="auto", choices=CHOICES,
                   help="CPU the int8 bundle runs on; decides the int8 weight range: x86-avx2 (x86 without VNNI) "
                        "gets 7-bit weights so ORT's saturating int16 sums stay exact, arm64 (Android) and x86-vnni "
                        f"full 8-bit ones (default: auto = this machine, {here})")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)
