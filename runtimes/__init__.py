"""Inference runtimes that evaluate K perturbed forward passes, registered by name.

One backend = one module behind the small ``Runtime`` / ``Session`` protocol
(``baffle_edge.client.Session``). Optional dependencies are imported inside the backend module;
``get_runtime`` turns a missing one into an error naming the extra to install.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol


class Runtime(Protocol):
    name: str

    def load(self, artifact, *, threads: int | None = None): ...


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    module: str  # baffle_edge.runtimes.<module>
    factory: str  # attribute creating the Runtime
    requires: tuple[str, ...]  # importable modules it needs
    extra: str | None  # pip extra that installs them
    summary: str
    artifact: str = "torch-model"  # what load() takes: "torch-model" (an nn.Module) or "bundle" (a folder)
    format: str | None = None  # bundle format the runtime reads (export/bundle.py FORMATS)
    domain: str = "float"  # perturbation domain: "float" or "int8-step" (protocol.Domain)
    block_forward: str = "full"  # how block-noise rows run (torch_incremental.block_macs): delta, chain, full


REGISTRY: dict[str, RuntimeInfo] = {
    "torch": RuntimeInfo("torch", "torch_runtime", "TorchRuntime", ("torch",), None,
                         "fp32 PyTorch reference, in-place (MeZO-style) perturbation", block_forward="delta"),
    "onnxruntime": RuntimeInfo("onnxruntime", "onnxruntime_runtime", "OrtFloatRuntime", ("onnxruntime",), None,
                               "fp32 ONNX graph, trainable tensors fed as inputs (one session for all K)",
                               artifact="bundle", format="onnx", domain="float", block_forward="chain"),
    "onnxruntime-int8": RuntimeInfo("onnxruntime-int8", "onnxruntime_runtime", "OrtInt8Runtime", ("onnxruntime",),
                                    None, "int8 QDQ graph (QLinearConv/QGemm), integer weights fed as inputs, "
                                    "perturbed by whole quantization steps", artifact="bundle", format="onnx-int8",
                                    domain="int8-step", block_forward="chain"),
    "torch-int8": RuntimeInfo("torch-int8", "torch_int8_runtime", "TorchInt8Runtime", ("torch", "onnxruntime"), None,
                              "int8 oracle: the QDQ graph executed in float32 torch (fake quantization), same "
                              "integer feeds as onnxruntime-int8", artifact="bundle", format="onnx-int8",
                              domain="int8-step"),
    "tflite-int8": RuntimeInfo("tflite-int8", "tflite_runtime", "TFLiteRuntime", ("ai_edge_litert",), "tflite",
                               "full-integer int8 LiteRT model (int8 CONV_2D kernels, built-in resolver), integer "
                               "weights written in place, perturbed by whole quantization steps",
                               artifact="bundle", format="tflite-int8", domain="int8-step"),
}


def get_runtime(name: str, **options):
    """Instantiate the runtime registered as ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown runtime {name!r}; known: {', '.join(sorted(REGISTRY))}")
    info = REGISTRY[name]
    for mod in info.requires:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            hint = f"pip install 'baffle-edge[{info.extra}]'" if info.extra else f"pip install {mod}"
            raise ImportError(f"runtime {name!r} needs {mod!r}, which is not importable ({e}); "
                              f"install it with: {hint}") from None
    module = importlib.import_module(f"{__name__}.{info.module}")
    return getattr(module, info.factory)(**options)
