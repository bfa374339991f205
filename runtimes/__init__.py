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
    block_forward: str = "full"  # how block-noise rows run (torch_incremental.block_macs): delta, chain, graph, full
    engine: str = "torch"  # what executes the forward: "torch", "onnxruntime" (a provider is chosen), "litert"
    batched: bool = False  # evaluates P perturbations per call (perturbations_per_call; runtimes/batching.py)

    @property
    def takes_provider(self) -> bool:
        """load() runs on an ONNX Runtime execution provider chosen by name (onnxruntime_runtime.PROVIDERS)."""
        return self.engine == "onnxruntime"

    def options(self, *, provider: str | None = None, perturbations_per_call: int | str | None = None) -> dict:
        """The keyword options ``get_runtime`` takes for this runtime, from a run's settings: the
        execution provider and P only where the runtime has them (``None``: the runtime's default)."""
        out: dict = {}
        if self.takes_provider and provider is not None:
            out["provider"] = provider
        if self.batched and perturbations_per_call is not None:
            out["perturbations_per_call"] = perturbations_per_call
        return out


REGISTRY: dict[str, RuntimeInfo] = {
    "torch": RuntimeInfo("torch", "torch_runtime", "TorchRuntime", ("torch",), None,
                         "fp32 PyTorch reference, in-place (MeZO-style) perturbation", block_forward="delta",
                         batched=True),
    "onnxruntime": RuntimeInfo("onnxruntime", "onnxruntime_runtime", "OrtFloatRuntime", ("onnxruntime",), None,
                               "fp32 ONNX graph, trainable tensors fed as inputs (one session for all K)",
                               artifact="bundle", format="onnx", domain="float", block_forward="graph",
                               engine="onnxruntime", batched=True),
    "onnxruntime-int8": RuntimeInfo("onnxruntime-int8", "onnxruntime_runtime", "OrtInt8Runtime", ("onnxruntime",),
                                    None, "int8 QDQ graph (QLinearConv/QGemm), integer weights fed as inputs, "
                                    "perturbed by whole quantization steps", artifact="bundle", format="onnx-int8",
                                    domain="int8-step", block_forward="graph", engine="onnxruntime", batched=True),
    "torch-int8": RuntimeInfo("torch-int8", "torch_int8_runtime", "TorchInt8Runtime", ("torch", "onnxruntime"), None,
                              "int8 oracle: the QDQ graph executed in float32 torch (fake quantization), same "
                              "integer feeds as onnxruntime-int8", artifact="bundle", format="onnx-int8",
                              domain="int8-step"),
    "tflite-int8": RuntimeInfo("tflite-int8", "tflite_runtime", "TFLiteRuntime", ("ai_edge_litert",), "tflite",
                               "full-integer int8 LiteRT model (int8 CONV_2D kernels, built-in resolver), integer "
                               "weights written in place, perturbed by whole quantization steps",
                               artifact="bundle", format="tflite-int8", domain="int8-step", block_forward="chain",
                               engine="litert"),
}


def runtime_info(name: str) -> RuntimeInfo:
    """The registry entry of runtime ``name``; an unknown name is a ValueError listing the known ones."""
    if name not in REGISTRY:
        from baffle_edge.errors import did_you_mean
        raise ValueError(f"unknown runtime {name!r}{did_you_mean(name, REGISTRY)}; known: {', '.join(sorted(REGISTRY))} "
                         "(`baffle-edge runtimes` lists them)")
    return REGISTRY[name]


def get_runtime(name: str, **options):
    """Instantiate the runtime registered as ``name``."""
    info = runtime_info(name)
    for mod in info.requires:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            hint = f"pip install 'baffle-edge[{info.extra}]'" if info.extra else f"pip install {mod}"
            raise ImportError(f"runtime {name!r} needs {mod!r}, which is not importable ({e}); "
                              f"install it with: {hint}") from None
    module = importlib.import_module(f"{__name__}.{info.module}")
    return getattr(module, info.factory)(**options)
