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


REGISTRY: dict[str, RuntimeInfo] = {
    "torch": RuntimeInfo("torch", "torch_runtime", "TorchRuntime", ("torch",), None,
                         "fp32 PyTorch reference, in-place (MeZO-style) perturbation"),
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
