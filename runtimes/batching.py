"""How many perturbations a session evaluates per runtime call (``--perturbations-per-call``).

``resolve(p, runtime, model)`` turns the user's choice into an int: an int >= 1 is kept, ``"auto"``
looks up ``AUTO`` (measured, docs/batched-k.md: LeNet 28x28 / WRN-10-2 32x32 / MLP, batch 32, K=100,
this 2-core x86 machine), and anything else is a ValueError. The rule behind the table:

* the fastest P of the measured grid (1, 5, 10, 25), rounded down to the smaller P when two are
  within ~10% (smaller P = less memory: activations grow linearly with P);
* capped so that the client's peak RSS stays within 1.5x the plain-inference peak (``MEMORY_CAP``);
* 1 for runtimes without a batched session (they ignore the option).
"""
from __future__ import annotations

import numpy as np

AUTO_KEY = "auto"

# (runtime, model) -> P chosen by the measured rule; unknown models use the runtime's "*" entry.
AUTO: dict[tuple[str, str], int] = {
    ("torch", "lenet"): 10,  # 4.2x (P=25: 4.5x, but +58 MB more RSS)
    ("torch", "mlp"): 25,  # tiny activations; call overhead dominates
    ("torch", "wrn-10-2"): 5,  # 1.8x; P=10 (1.95x) breaks the 1.5x RSS cap
    ("torch", "*"): 5,
    ("onnxruntime", "lenet"): 5,  # 1.2-1.4x, noisy: ORT's fp32 grouped conv loops over groups
    ("onnxruntime", "mlp"): 10,
    ("onnxruntime", "wrn-10-2"): 1,
    ("onnxruntime", "*"): 1,
    ("onnxruntime-int8", "lenet"): 10,  # 1.7x, peak RSS 408 MB vs cap 412 MB
    ("onnxruntime-int8", "mlp"): 10,
    ("onnxruntime-int8", "wrn-10-2"): 1,  # no gain (0.9-0.96x): float convs around GroupNorm dominate
    ("onnxruntime-int8", "*"): 1,
}
BATCHED_RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8")


def resolve(p: int | str, runtime: str, model: str = "*") -> int:
    """P for ``runtime`` on ``model`` (a baffle_edge.models name) from an int or ``"auto"``."""
    if isinstance(p, str):
        if p.strip().lower() == AUTO_KEY:
            if runtime not in BATCHED_RUNTIMES:
                return 1
            return AUTO.get((runtime, model), AUTO[(runtime, "*")])
        try:
            p = int(p)
        except ValueError:
            raise ValueError(f"perturbations per call must be an integer >= 1 or 'auto', got {p!r}") from None
    return check_p(p)


def check_p(p) -> int:
    """A valid perturbations-per-call count (int >= 1); anything else is a ValueError."""
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or int(p) < 1:
        raise ValueError(f"perturbations per call must be an integer >= 1, got {p!r}")
    return int(p)


def model_name(model) -> str:
    """The baffle_edge.models name of a torch module (``*`` when it is not one of them)."""
    from baffle_edge.models import MLP, LeNet, WideResNet
    return {LeNet: "lenet", WideResNet: "wrn-10-2", MLP: "mlp"}.get(type(model), "*")
