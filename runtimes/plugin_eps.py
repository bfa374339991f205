"""ONNX Runtime *plugin* execution providers (NPUs): registration, placement report, write-check.

The stock ``onnxruntime`` wheel loads these from separate PyPI packages at run time
(``ort.register_execution_provider_library``); a session then takes them with
``SessionOptions.add_provider_for_devices`` and the EP's entries of ``ort.get_ep_devices()``.
What each plugin needs is data (``PLUGINS``), read by ``onnxruntime_runtime.make_session``:

- ``qnn-htp``: ``onnxruntime-qnn`` (Qualcomm QNN SDK). On x86 its ``libQnnHtp.so`` runs the Hexagon
  Tensor Processor backend *in simulation* (the HTP's int8 op implementations, on this CPU): it
  proves function, never device speed.
- ``openvino``: ``onnxruntime-ep-openvino`` (Intel OpenVINO: CPU, GPU, NPU devices).

Placement is checked, never assumed: ``placement`` reads the session's profile (which provider ran
each node) and names the nodes that fell back to CPU; ``write_check`` refuses a session whose output
does not change when a weight input changes (an EP that packed the weights at compile time).
numpy + onnxruntime only.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PluginEP:
    ep_name: str  # the EP's name in ort.get_ep_devices()
    package: str  # importable module of the PyPI package shipping the library
    extra: str  # baffle-edge pip extra that installs it
    backend: str | None = None  # attribute of ``package`` giving a "backend_path" provider option
    static_batch: bool = False  # the EP takes no symbolic dimension: the batch is fixed at load
    simulated_on: str | None = None  # the machine type on which the backend is a simulator, not the device
    build_hint: str | None = None  # what a graph the EP cannot build usually lacks (shown with ORT's error)


PLUGINS: dict[str, PluginEP] = {
    "qnn-htp": PluginEP("QNNExecutionProvider", "onnxruntime_qnn", "qnn", backend="get_qnn_htp_path",
                        static_batch=True, simulated_on="x86_64",
                        build_hint="the HTP refuses per-channel int8 conv weights fed as graph inputs; a bundle with "
                        "per-tensor int8 weights and an HTP-compatible head is needed, which no export target writes yet"),
    "openvino": PluginEP("OpenVINOExecutionProvider", "onnxruntime_ep_openvino", "openvino"),
}
_registered: set[str] = set()


def plugin_module(short: str):
    """The plugin's Python package, or an ImportError naming the extra to install."""
    plugin = PLUGINS[short]
    try:
        return importlib.import_module(plugin.package)
    except ImportError as e:
        raise ImportError(f"execution provider {short!r} needs the {plugin.package!r} package ({e}): "
                          f"pip install 'baffle-edge[{plugin.extra}]'") from None


def add_plugin(so, short: str, batch: int | None) -> None:
    """Register plugin ``short`` (once per process) and add its devices to session options ``so``."""
    import onnxruntime as ort
    plugin, mod = PLUGINS[short], plugin_module(short)
    if plugin.ep_name not in _registered:
        ort.register_execution_provider_library(plugin.ep_name, mod.get_library_path())
        _registered.add(plugin.ep_name)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == plugin.ep_name]
    if not devices:
        raise ValueError(f"execution provider {short!r}: {plugin.package} registered but reports no device on this "
                         f"machine (ort.get_ep_devices() lists only "
                         f"{sorted({d.ep_name for d in ort.get_ep_devices()})}); choose another --provider")
    if plugin.static_batch:
        if not batch:
            raise ValueError(f"execution provider {short!r} needs a static batch: pass batch=N at load")
        so.add_free_dimension_override_by_name("batch", int(batch))
    options = {"backend_path": getattr(mod, plugin.backend)()} if plugin.backend else {}
    so.add_provider_for_devices(devices, options)


@dataclass(frozen=True)
class Placement:
    """Which provider ran each node of one profiled run."""
    nodes: dict[str, tuple[str, str]]  # node name -> (op type, provider short name)
    provider: str

    @property
    def on_device(self) -> int:
        return sum(p != "cpu" for _, p in self.nodes.values())

    def fallback(self) -> list[str]:
        return sorted(n for n, (_, p) in self.nodes.items() if p == "cpu")

    def to_json(self) -> dict:
        return {"provider": self.provider, "nodes": len(self.nodes), "on_device": self.on_device,
                "on_cpu": self.fallback(), "ops": {n: list(v) for n, v in sorted(self.nodes.items())}}


def placement(trace_path: str | Path, provider: str) -> Placement:
    """Node -> provider from an ORT profile (``SessionOptions.enable_profiling``). A plugin EP that
    compiled a partition shows as one fused node run by that EP."""
    short = {"CPUExecutionProvider": "cpu"} | {p.ep_name: k for k, p in PLUGINS.items()}
    nodes: dict[str, tuple[str, str]] = {}
    for event in json.loads(Path(trace_path).read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            name = event["name"].removesuffix("_kernel_time")
            nodes[name] = (args.get("op_name", "?"), short.get(args["provider"], args["provider"]))
    return Placement(nodes, provider)


def write_check(session, feeds: dict[str, np.ndarray], weight: str, output: str) -> None:
    """Refuse ``session`` when changing weight input ``weight`` leaves ``output`` unchanged (stale
    weights: the EP packed them once). The changed copy moves every element far (an int8 one by >= 63
    steps, across zero): a one-step move can vanish in the output quantization (all-zero weights
    did, on the QNN HTP simulator), which would refuse a sound session."""
    base = session.run([output], feeds)[0]
    w = feeds[weight]
    if np.issubdtype(w.dtype, np.integer):
        info = np.iinfo(w.dtype)
        changed = np.where(w >= 0, info.min // 2, info.max // 2).astype(w.dtype)  # >= 63 steps for int8
    else:
        changed = (w + np.float32(0.5) * (np.abs(w).max() + 1)).astype(w.dtype)
    after = session.run([output], {**feeds, weight: changed})[0]
    if np.array_equal(base, after):
        raise ValueError(f"write-check failed: changing weight input {weight!r} left the output unchanged on this "
                         "execution provider (weights packed at compile time: every perturbed forward would be "
                         "the same); refusing the session")
