"""What the suites measure: model cases, runtimes, batches. Pure data, no pytest fixtures.

Inputs are seeded random tensors of each dataset's shape: the suites need no data files, so
they run on a device with only the package installed (and torch, or a ``--bench-bundles`` folder: store.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pytest

from baffle_edge.client import Batch
from baffle_edge.config import ModelConfig, Norm
from baffle_edge.runtimes import REGISTRY

from . import store

# Runtimes that are planned but may not be registered yet: they are still listed, so that the
# report shows them as skipped with a reason instead of silently leaving them out.
PLANNED_RUNTIMES = ("onnxruntime", "onnxruntime-int8", "tflite-int8")

FULL = pytest.mark.bench_full  # slow configurations: run with --bench-full
DEVICE = pytest.mark.device  # the device subset (--bench-device; scripts/arm64-root bench): one model per suite
SIGMA = 1e-4  # reference perturbation scale
SEED = 0


@dataclass(frozen=True)
class ModelCase:
    id: str  # test id and table label, e.g. "lenet-8"
    model: str  # baffle_edge.models name
    in_channels: int  # 1 digits/MNIST, 3 CIFAR
    image_size: int  # 8 digits, 28 MNIST, 32 CIFAR
    norm: Norm = Norm.NONE  # reference: NoNorm for LeNet/MLP, GroupNorm for WRN

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(self.model, self.in_channels, self.image_size, 10, norm=self.norm)

    @property
    def input_shape(self) -> str:
        return f"{self.in_channels}x{self.image_size}x{self.image_size}"

    def build(self):
        """A fresh torch model with the case's fixed initial weights (torch only: see ``weights``)."""
        if not store.have_torch():
            pytest.skip(store.current.missing(f"the torch model of {self.id}"))
        from baffle_edge.models import build_model
        return build_model(self.config, seed=SEED)

    def weights(self) -> np.ndarray:
        """The initial weights as one flat float32 vector: from torch, or the ``--bench-bundles`` folder."""
        return store.current.weights(self)

    @cached_property
    def dim(self) -> int:
        return int(self.weights().size)

    def batch(self, size: int, *, seed: int = SEED) -> Batch:
        rng = np.random.default_rng([seed, size, self.image_size])
        x = rng.standard_normal((size, self.in_channels, self.image_size, self.image_size)).astype(np.float32)
        return Batch(x, rng.integers(0, 10, size).astype(np.int64))

    def info(self) -> dict:
        return {"model": self.model, "case": self.id, "input": self.input_shape, "params": self.dim}


MODELS: dict[str, ModelCase] = {c.id: c for c in (
    ModelCase("lenet-8", "lenet", 1, 8),  # digits-shaped (8x8), the embedded dataset
    ModelCase("lenet-28", "lenet", 1, 28),  # MNIST-shaped, the paper's headline setup
    ModelCase("wrn-10-2", "wrn-10-2", 3, 32, Norm.GROUP),  # CIFAR-shaped
    ModelCase("mlp", "mlp", 1, 8),
    ModelCase("mobilenet-28", "mobilenet", 1, 28),  # the mobile-class model (depthwise-separable), Fashion-MNIST-shaped
)}


def dtype_of(runtime: str) -> str:
    return "int8" if "int8" in runtime else "fp32"


def runtime_names() -> list[str]:
    """Every registered runtime (new ones appear automatically), then the planned ones."""
    return list(REGISTRY) + [n for n in PLANNED_RUNTIMES if n not in REGISTRY]


def providers_of(runtime: str) -> list[str]:
    """Execution providers / delegates to measure a runtime on: those this machine offers."""
    engine = REGISTRY[runtime].engine if runtime in REGISTRY else None
    if engine == "onnxruntime":
        try:  # the runtime's own short names ("cpu", "xnnpack", ...)
            from baffle_edge.runtimes.onnxruntime_runtime import available_providers
            found = [p for p in available_providers() if p not in ("azure", "AzureExecutionProvider")]
            return (found or ["cpu"]) + plugin_params(REGISTRY[runtime].domain)
        except ImportError:
            return ["cpu"]
    if engine == "litert":
        return ["default"]  # the runtime picks its op resolver (see docs/benchmarks.md)
    return ["cpu"] if runtime == "torch" else ["default"]


def plugin_params(domain: str) -> list[str]:
    """Plugin EPs (docs/npu.md) asked for with ``BAFFLE_BENCH_PLUGINS=qnn-htp,openvino`` (an absent one skips naming its extra): opt-in,
    since the QNN HTP on x86 is a simulator (function, never speed) and every case would pay its build."""
    import os
    wanted = [p.strip() for p in os.environ.get("BAFFLE_BENCH_PLUGINS", "").split(",") if p.strip()]
    if not wanted:
        return []
    from baffle_edge.runtimes.plugin_eps import PLUGINS
    unknown = [p for p in wanted if p not in PLUGINS]
    if unknown:
        raise ValueError(f"BAFFLE_BENCH_PLUGINS: unknown plugin EP(s) {', '.join(unknown)}; known: {', '.join(PLUGINS)}")
    # one not installed stays a case: loading it skips, naming the pip extra (runtimes/plugin_eps.plugin_module)
    return [p for p in wanted if domain in PLUGINS[p].domains]


def runtime_params() -> list:
    """pytest params (runtime, provider) for every runtime x available provider."""
    return [pytest.param((r, p), id=f"{r}-{p}") for r in runtime_names() for p in providers_of(r)]
