"""ONNX Runtime backends: fp32 and int8 graphs whose trainable tensors are graph inputs.

One InferenceSession serves all K perturbed forwards: only the fed arrays change. numpy +
onnxruntime only (no torch, no onnx): this is the code path an Android client mirrors with ORT
Mobile. export/'s graph tools (and ``onnx``) are imported only to build graphs a bundle lacks
(``train_p{P}``, block segments); export never imports runtimes.

Execution providers are chosen by short name (``cpu``, ``xnnpack``, ``nnapi``, ``qnn``,
``coreml``, ``cuda``, ``openvino``, ...); an unavailable one is a ValueError listing the available.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from baffle_edge.bundle import PLAN_KINDS, plan_roles, read_bundle
from baffle_edge.client import BaseSession, FloatWeights, StepWeights
from baffle_edge.perturb import BlockTable
from baffle_edge.protocol import Domain
from baffle_edge.targets import check_bundle

from .batching import AutoP, resolve
from .ort_incremental import LazyBlockForward
from .plugin_eps import PLUGINS, add_plugin, stdout_to_stderr

PROVIDERS = {
    "cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider", "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider", "coreml": "CoreMLExecutionProvider", "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider", "azure": "AzureExecutionProvider",
}


def available_providers() -> list[str]:
    """Built-in providers of this onnxruntime build (plugin EPs: ``plugin_providers``)."""
    import onnxruntime as ort
    names = {v: k for k, v in PROVIDERS.items()}
    return [names.get(p, p) for p in ort.get_available_providers()]


def plugin_providers() -> list[str]:
    """Plugin EPs (runtimes/plugin_eps.py) whose package is installed; whether they find a device shows at load."""
    return [k for k, p in PLUGINS.items() if importlib.util.find_spec(p.package) is not None]


def make_session(path: Path | bytes, *, provider: str = "cpu", threads: int | None = None, profile: bool = False,
                 batch: int | None = None):
    """An InferenceSession on ``provider`` (a PROVIDERS or plugin_eps.PLUGINS name; CPU takes what it
    refuses). ``batch`` fixes the symbolic batch dimension (required by a static-batch plugin EP)."""
    import onnxruntime as ort
    if provider not in PROVIDERS and provider not in PLUGINS:
        raise ValueError(f"unknown execution provider {provider!r}; known names: {', '.join([*PROVIDERS, *PLUGINS])}")
    if provider not in PLUGINS and PROVIDERS[provider] not in ort.get_available_providers():
        raise ValueError(f"execution provider {provider!r} is not available in this onnxruntime build "
                         f"({ort.__version__}); available here: {', '.join(available_providers() + plugin_providers())}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # No memory pattern: with it ORT plans one block for all activations at the second run of a
    # shape and allocates it *next to* the arena chunks the first run grew, so a BAFFLE step (K+1
    # runs) peaked at ~2x the activations of one forward (WRN-10-2 int8, batch 128: +165 MB vs
    # +86 MB; the arena alone reuses its chunks). Run time unchanged within noise (docs/benchmarks.md).
    so.enable_mem_pattern = False
    so.enable_profiling = profile
    if profile:  # the trace goes to the temp folder, not the working directory
        import tempfile
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "baffle-ort-profile")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if provider in PLUGINS:
        add_plugin(so, provider, batch)
        try:
            with stdout_to_stderr():
                return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            hint = PLUGINS[provider].build_hint
            raise ValueError(f"execution provider {provider!r} could not build this graph{' (' + hint + ')' if hint else ''}: "
                             f"{e}") from None
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)


class OrtSession(LazyBlockForward, AutoP, BaseSession):
    """A bundle's train graph in ONNX Runtime: every trainable tensor is a graph input, so one
    InferenceSession serves all perturbations. With ``P > 1`` the bundle's ``train_p{P}`` graph
    (export/batched.py: parameter inputs with a leading P axis, logits ``[P, batch, classes]``)
    evaluates P weight sets per call; it is built from the train graph at load time (needs
    ``onnx``) when the bundle has none. A remainder of r <= P/2 sets runs on the sequential graph
    (r small calls are cheaper than one padded P call); a larger one is padded with the first set
    (padding discarded). ``perturbations_per_call="auto"`` measures P at the first batch
    (runtimes/batching.py)."""

    fmt = ""

    def __init__(self, bundle_dir: str | Path, *, perturbations_per_call: int = 1, provider: str = "cpu",
                 threads: int | None = None, profile: bool = False):
        self.bundle = read_bundle(bundle_dir)
        self.name = f"onnxruntime{'-int8' if self.domain is Domain.INT8_STEP else ''}"
        self._options = dict(provider=provider, threads=threads, profile=profile)
        self.placement = None  # plugin EPs: plugin_eps.Placement of the train graph, checked at the first batch
        if provider in PLUGINS:  # built at the first batch: a static batch, the placement and the write-check
            self.session, perturbations_per_call = None, 1
        else:
            self._open(self.bundle.file(self.fmt, "train"), **self._options)
        m = self.bundle.meta["model"]
        self._auto_key_model = f"{m['name']}[{m['parameters']}]{m['image_size']}x{m['image_size']}"
        self._auto_threads = threads or os.cpu_count() or 1
        self._init_p(perturbations_per_call)
        self.input_name = self.bundle.meta["input"]["name"]
        self.output_name = self.bundle.meta["output"]["name"]
        self.dim = int(self.bundle.meta["model"]["parameters"])
        # block noise: the partition follows from the parameter table; rows run incrementally when
        # the bundle's model is a chain (its block graphs, export/blocks.py), else as full forwards
        self.blocks = BlockTable.from_layout(self.bundle.meta["parameters"])
        self._reset_block_forward()

    def _init_block_forward(self) -> None:
        """The incremental block forward from the bundle's block graphs, or cut now from its train
        graph (bundles exported before block noise, or shipped without the block files, as Flower's
        task messages do; needs ``onnx``). No plan (a module that is not a Conv/Gemm) or a plan of a
        kind this version does not know: rows run as full forwards (the reason is kept in
        ``block_forward_reason``). A listed block file that fails its sha256 is an error."""
        from .ort_incremental import OrtBlockForward
        plugin = PLUGINS.get(self._options["provider"])
        entry = self.bundle.meta["formats"][self.fmt]
        kind = entry.get("blocks", {}).get("kind", "chain")
        if kind not in PLAN_KINDS:
            self.block_forward_reason = (f"the bundle's block plan is of kind {kind!r}, which this version does not "
                                         f"run (known: {', '.join(PLAN_KINDS)}): block rows run as full forwards")
            return
        found = self._block_files(entry) or self._cut_block_graphs(entry)
        if found is not None:
            plan, graphs = found
            options = self._options  # the dict (a plugin EP adds its batch later), not ``self``: no cycle
            self.block_forward = OrtBlockForward(self, plan, graphs, self.blocks, lambda g: make_session(g, **options),
                                                 static_batch=plugin is not None and plugin.static_batch)

    def _block_files(self, entry: dict) -> tuple[dict, dict[str, Path]] | None:
        """(plan, {role: file}) of the bundle's verified block graphs; None if it lacks any of them."""
        if "blocks" not in entry:
            return None
        plan = entry["blocks"]
        roles = plan_roles(plan)
        if any(r not in entry["files"] for r in roles):
            return None
        try:
            return plan, {r: self.bundle.file(self.fmt, r) for r in roles}
        except FileNotFoundError:
            return None

    def _cut_block_graphs(self, entry: dict) -> tuple[dict, dict[str, bytes]] | None:
        """(plan, {role: serialized graph}) cut now from the train graph (export/blocks.py, needs ``onnx``);
        None, with the reason in ``block_forward_reason``, when that is not possible."""
        try:
            import onnx
            from baffle_edge.export.blocks import block_graphs
        except ImportError as e:
            self.block_forward_reason = entry.get("blocks_unsupported") or (
                f"the bundle has no block graphs and building them needs onnx ({e}): pip install onnx, or export "
                "the bundle with this version of baffle-edge (it writes them for models of Conv/Gemm modules)")
            return None
        try:
            proto = onnx.load(str(self.bundle.file(self.fmt, "train")))
            plan, protos = block_graphs(proto, self.bundle.meta["parameters"], self.table)
        except ValueError as e:
            self.block_forward_reason = str(e)
            return None
        return plan.to_json(), {r: g.SerializeToString() for r, g in protos.items()}

    def use_p(self, p: int) -> None:
        """Evaluate ``p`` sets per call (the ``train_p{p}`` graph for p > 1)."""
        if p != getattr(self, "_batched_p", None):
            self.batched = None  # release the previous P's session first
            if p > 1:
                path = batched_graph_path(self.bundle, self.fmt, p)
                self.batched = make_session(path, **self._options)
                if self.bundle.path not in path.parents:  # built now: the session holds it, the file can go
                    import shutil
                    shutil.rmtree(path.parent, ignore_errors=True)
            self._batched_p = p
        self.perturbations_per_call = p

    def _open_plugin(self, x: np.ndarray) -> None:
        """(Re)build the train graph's session on a plugin EP for batches of len(x): ORT's graph
        assignment gives the placement by node and MACs (kept in ``self.placement``), then the
        write-check of *every* weight input; a session whose output ignores a weight write is refused
        (plugin_eps.write_check)."""
        from .plugin_eps import placement, write_check
        self.session, self.block_forward = None, None
        self._options["batch"] = len(x)
        path = self.bundle.file(self.fmt, "train")
        probe = make_session(path, **self._options)
        weights = self.graph_feeds(self.weight_set(0, None, None))
        for name in weights:
            write_check(probe, {self.input_name: x, **weights}, name, self.output_name)
        try:
            import onnx
        except ImportError:  # a device without onnx: the write-check ran, the MAC count needs shape inference
            self.placement = None
        else:
            self.placement = placement(probe, onnx.load(str(path)), self._options["provider"], batch=len(x),
                                       weights=list(weights))
        del probe
        self._open(path, **self._options)
        self._block_ready = False

    def _open(self, path: Path, **options) -> None:
        """Load the verified train graph (the one hook an alternative executor overrides)."""
        self.session = make_session(path, **options)

    def graph_feeds(self, weights) -> dict[str, np.ndarray]:
        """The train graph's parameter inputs for one weight set (also fed to the block graphs)."""
        raise NotImplementedError

    def forward(self, x: np.ndarray, weights) -> np.ndarray:
        """Logits of one weight set (a ``weight_set``)."""
        return self.session.run([self.output_name], {self.input_name: x, **self.graph_feeds(weights)})[0]

    def prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.bundle.check_batch(x)
        if not np.all(np.isfinite(x)):
            raise ValueError("input batch contains non-finite values")
        if self._options["provider"] in PLUGINS and self._options.get("batch") != len(x):
            self._open_plugin(x)
        self._calibrate_once(x)
        return x

    def evaluate_sequential(self, x: np.ndarray, sets) -> list[np.ndarray]:
        return [self.forward(x, w) for w in sets]

    def evaluate(self, x: np.ndarray, sets) -> list[np.ndarray]:
        p = self.perturbations_per_call
        if self.batched is None or len(sets) <= p // 2:
            return self.evaluate_sequential(x, sets)
        feeds = [self.graph_feeds(w) for w in sets]
        feeds += [feeds[0]] * (p - len(sets))
        stacked = {name: np.stack([f[name] for f in feeds]) for name in feeds[0]}
        return list(self.batched.run([self.output_name], {self.input_name: x, **stacked})[0][:len(sets)])

    def end_profiling(self) -> str:
        """End profiling; returns the path of the trace (the batched session's when there is one,
        the other trace removed): the caller reads it and removes it."""
        trace = self.session.end_profiling()
        if self.batched is None:
            return trace
        Path(trace).unlink(missing_ok=True)
        return self.batched.end_profiling()


class OrtFloatSession(FloatWeights, OrtSession):
    """fp32: each parameter input is fed its slice of ``w + float32(sigma) * eps``."""

    fmt = "onnx"

    def __init__(self, bundle_dir, **kw):
        super().__init__(bundle_dir, **kw)
        self.specs = [(p["name"], p["offset"], p["size"], tuple(p["shape"])) for p in self.bundle.meta["parameters"]]
        self.set_weights(np.zeros(self.dim, np.float32))

    def graph_feeds(self, w):
        return {n: w[o:o + s].reshape(shape) for n, o, s, shape in self.specs}


class OrtInt8Session(StepWeights, OrtSession):
    """int8: the integers of every trainable tensor are inputs; perturbation k feeds
    ``QuantTable.perturb(q, eps_k)`` (whole quantization steps, baffle_edge/quant.py), computed as a
    select between q - m and q + m (``StepSelector``)."""

    fmt = "onnx-int8"
    cpu_bound = True  # the integer kernels depend on the CPU: warn when the bundle's target is another one

    def __init__(self, bundle_dir, **kw):
        super().__init__(bundle_dir, **kw)
        self.table = self.bundle.quant_table(self.fmt)
        on_cpu = self.cpu_bound and self._options["provider"] not in PLUGINS  # a plugin EP runs its own kernels
        self.target = check_bundle(self.bundle.meta, self.name) if on_cpu else None
        self.set_weights(np.zeros(self.dim, np.float32))

    def graph_feeds(self, qs):
        return {t.input: q for t, q in zip(self.table.tensors, qs)}


def batched_graph_path(bundle, fmt: str, p: int) -> Path:
    """The bundle's ``train_p{P}`` graph of ``fmt``, or one built now into a temporary folder."""
    files = bundle.meta["formats"].get(fmt, {}).get("files", {})
    if f"train_p{p}" in files:
        return bundle.file(fmt, f"train_p{p}")
    import tempfile
    try:
        import onnx
        from baffle_edge.export.batched import batch_graph
    except ImportError as e:
        raise ImportError(f"bundle {bundle.path} has no {fmt!r} graph for {p} perturbations per call (train_p{p}) "
                          f"and building it needs onnx ({e}): pip install onnx, or export the bundle with "
                          f"ExportConfig(perturbations_per_call={p})") from None
    proto = batch_graph(onnx.load(str(bundle.file(fmt, "train"))), p)
    out = Path(tempfile.mkdtemp(prefix="baffle-p")) / f"{fmt}.p{p}.train.onnx"
    out.write_bytes(proto.SerializeToString())
    return out


class OrtFloatRuntime:
    name = "onnxruntime"
    session_class = OrtFloatSession

    def __init__(self, provider: str = "cpu", perturbations_per_call: int | str = 1):
        resolve(perturbations_per_call, self.name)  # a bad value fails here, not at load
        self.provider = provider
        self.perturbations_per_call = perturbations_per_call

    def load(self, bundle_dir, *, threads: int | None = None, profile: bool = False):
        return self.session_class(bundle_dir, perturbations_per_call=self.perturbations_per_call,
                                  provider=self.provider, threads=threads, profile=profile)


class OrtInt8Runtime(OrtFloatRuntime):
    name = "onnxruntime-int8"
    session_class = OrtInt8Session
