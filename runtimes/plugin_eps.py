"""ONNX Runtime *plugin* execution providers (NPUs): registration, placement report, write-check.

The stock ``onnxruntime`` wheel loads these from separate PyPI packages at run time
(``ort.register_execution_provider_library``); a session then takes them with
``SessionOptions.add_provider_for_devices`` and the EP's entries of ``ort.get_ep_devices()``.
What each plugin needs is data (``PLUGINS``), read by ``onnxruntime_runtime.make_session``:

- ``qnn-htp``: ``onnxruntime-qnn`` (Qualcomm QNN SDK). On x86 its ``libQnnHtp.so`` runs the Hexagon
  Tensor Processor backend *in simulation* (the HTP's int8 op implementations, on this CPU): it
  proves function, never device speed.
- ``openvino``: ``onnxruntime-ep-openvino`` (Intel OpenVINO: CPU, GPU, NPU devices).

Placement is checked, never assumed: ``placement`` reads ORT's graph assignment (which provider runs
each node), weighs it by each node's MACs (``node_macs``, needs ``onnx`` for shape inference) and names
the weight inputs consumed on CPU; ``write_check`` refuses a session whose output does not change when a
weight input changes (an EP that packed the weights at compile time). numpy + onnxruntime (+ onnx).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from dataclasses import dataclass
import numpy as np

from baffle_edge.targets import cpu_vendor


@dataclass(frozen=True)
class PluginEP:
    ep_name: str  # the EP's name in ort.get_ep_devices()
    package: str  # importable module of the PyPI package shipping the library
    extra: str  # baffle-edge pip extra that installs it
    backend: str | None = None  # attribute of ``package`` giving a "backend_path" provider option
    static_batch: bool = False  # the EP takes no symbolic dimension: the batch is fixed at load
    simulated_on: str | None = None  # the machine type on which the backend is a simulator, not the device
    build_hint: str | None = None  # what a graph the EP cannot build usually lacks (shown with ORT's error)
    target: str | None = None  # the export target (--target) whose bundles the EP runs wholly (verify picks it)
    domains: tuple[str, ...] = ("float", "int8-step")  # the runtimes' domains whose graphs it runs
    cpu_vendors: tuple[str, ...] | None = None  # /proc/cpuinfo vendor_ids whose machines it offers devices on
    vendor_note: str | None = None  # why it offers none elsewhere


PLUGINS: dict[str, PluginEP] = {
    "qnn-htp": PluginEP("QNNExecutionProvider", "onnxruntime_qnn", "qnn", backend="get_qnn_htp_path",
                        static_batch=True, simulated_on="x86_64", target="qnn-htp", domains=("int8-step",),
                        build_hint="the HTP refuses per-channel int8 conv weights fed as graph inputs: export the "
                        "bundle with --target qnn-htp (per-tensor weights, a uint16 head output)"),
    "openvino": PluginEP("OpenVINOExecutionProvider", "onnxruntime_ep_openvino", "openvino",
                         cpu_vendors=("GenuineIntel",),
                         vendor_note="onnxruntime-ep-openvino's factory offers Intel devices only, its CPU device "
                         "included (microsoft/onnxruntime PR #31981 would allow other CPUs)"),
}
_registered: set[str] = set()


@contextlib.contextmanager
def stdout_to_stderr():
    """Native chatter of a plugin (QNN's libnative prints a ``# LIBNATIVE: ...`` line on the process's stdout at its
    first session) goes to stderr, so that ``--json`` output stays JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


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
        vendor = cpu_vendor()
        why = (f": {plugin.vendor_note}, and this CPU's vendor is {vendor!r}"
               if plugin.cpu_vendors and vendor not in plugin.cpu_vendors else "")
        raise ValueError(f"execution provider {short!r}: {plugin.package} registered but reports no device on this "
                         f"machine{why} (ort.get_ep_devices() lists only "
                         f"{sorted({d.ep_name for d in ort.get_ep_devices()})}); choose another --provider")
    if plugin.static_batch:
        if not batch:
            raise ValueError(f"execution provider {short!r} needs a static batch: pass batch=N at load")
        so.add_free_dimension_override_by_name("batch", int(batch))
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")  # for placement()
    options = {"backend_path": getattr(mod, plugin.backend)()} if plugin.backend else {}
    so.add_provider_for_devices(devices, options)


MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger",
           "ConvInteger")


def node_macs(proto, batch: int) -> dict[str, tuple[str, int]]:
    """Multiply-accumulates of every conv / matmul / gemm node of ONNX graph ``proto`` at batch size
    ``batch`` (shapes from ONNX shape inference with the symbolic batch fixed): name -> (op type, MACs).
    Conv: output elements x (input channels / group) x kernel area; MatMul / Gemm: output elements x K."""
    import onnx
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for value in proto.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = int(batch)
    proto = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*proto.graph.input, *proto.graph.value_info, *proto.graph.output)}
    shapes |= {i.name: list(i.dims) for i in proto.graph.initializer}
    out: dict[str, tuple[str, int]] = {}
    for n in proto.graph.node:
        if n.op_type not in MAC_OPS:
            continue
        w_index = 3 if n.op_type.startswith("QLinear") or n.op_type == "QGemm" else 1
        y, w = shapes.get(n.output[0]), shapes.get(n.input[w_index])
        if not y or not w or 0 in y or 0 in w:
            raise ValueError(f"node {n.name!r} ({n.op_type}): no static shapes to count its MACs")
        if "Conv" in n.op_type:
            macs = int(np.prod(y)) * int(np.prod(w[1:]))  # w = [Cout, Cin/group, kh, kw]
        else:  # K is the weight's reduced dimension (Gemm transB: its last)
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            macs = int(np.prod(y)) * int(w[-1] if trans_b else w[-2] if len(w) > 1 else w[0])
        out[n.name] = (n.op_type, macs)
    return out


@dataclass(frozen=True)
class Placement:
    """Which provider ran each node of the graph (ORT's graph assignment), weighed by MACs."""
    nodes: dict[str, tuple[str, str]]  # graph node name -> (op type, provider short name, or "unassigned")
    macs: dict[str, int]  # MAC-bearing node name -> multiply-accumulates at the session's batch
    weights: dict[str, list[str]]  # weight input -> the nodes consuming it
    provider: str

    def _where(self, *providers: str) -> list[str]:
        return sorted(n for n, (_, p) in self.nodes.items() if p in providers)

    @property
    def on_device(self) -> int:
        return len(self.nodes) - len(self._where("cpu", "unassigned"))

    def fallback(self) -> list[str]:
        """Nodes ORT assigned to CPU."""
        return self._where("cpu")

    def unassigned(self) -> list[str]:
        """Nodes the assignment does not name (renamed by a layout pass): neither counted on the device."""
        return self._where("unassigned")

    @property
    def macs_on_device(self) -> int:
        off = set(self._where("cpu", "unassigned"))
        return sum(m for n, m in self.macs.items() if n not in off)

    @property
    def device_mac_share(self) -> float:
        """MACs of the nodes assigned to the EP's device / all MACs (1.0 for a graph without any)."""
        total = sum(self.macs.values())
        return self.macs_on_device / total if total else 1.0

    def weights_on(self, *providers: str) -> list[str]:
        """Perturbed tensors (weight graph inputs) of which some consumer is on ``providers``."""
        nodes = set(self._where(*providers))
        return sorted(w for w, users in self.weights.items() if nodes.intersection(users))

    def to_json(self) -> dict:
        return {"provider": self.provider, "nodes": len(self.nodes), "on_device": self.on_device,
                "on_cpu": self.fallback(), "unassigned": self.unassigned(), "macs": sum(self.macs.values()),
                "macs_on_device": self.macs_on_device, "device_mac_share": round(self.device_mac_share, 6),
                "weights_consumed_on_cpu": self.weights_on("cpu"),
                "weights_consumed_unassigned": self.weights_on("unassigned"),
                "mac_nodes": {n: [m, self.nodes[n][1]] for n, m in sorted(self.macs.items())}}


def placement(session, proto, provider: str, *, batch: int, weights: list[str]) -> Placement:
    """Placement of ONNX graph ``proto`` in ``session`` (made with ``session.record_ep_graph_assignment_info``):
    ORT's assignment names each node an EP ran, some renamed by its layout passes (``<name>_token_<n>``,
    mapped back); a node of ``proto`` it does not name is "unassigned" (counted with CPU)."""
    short = {"CPUExecutionProvider": "cpu"} | {p.ep_name: k for k, p in PLUGINS.items()}
    assigned: dict[str, str] = {}
    for sub in session.get_provider_graph_assignment_info():
        for node in sub.get_nodes():
            assigned.setdefault(re.sub(r"_token_\d+$", "", node.name), short.get(sub.ep_name, sub.ep_name))
    nodes = {n.name: (n.op_type, assigned.get(n.name, "unassigned")) for n in proto.graph.node}
    users = {w: sorted(n.name for n in proto.graph.node if w in n.input) for w in weights}
    return Placement(nodes, {n: m for n, (_, m) in node_macs(proto, batch).items()}, users, provider)


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
