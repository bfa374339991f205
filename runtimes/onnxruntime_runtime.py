"""ONNX Runtime backends: fp32 and int8 graphs whose trainable tensors are graph inputs.

One InferenceSession serves all K perturbed forwards: only the fed arrays change. numpy +
onnxruntime only (no torch): this is the code path an Android client mirrors with ORT Mobile.

Execution providers are chosen by short name (``cpu``, ``xnnpack``, ``nnapi``, ``qnn``,
``coreml``, ``cuda``, ``openvino``, ...); an unavailable one is a ValueError listing the available.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from baffle_edge.client import Batch, cross_entropy, noise_stream
from baffle_edge.export.bundle import read_bundle
from baffle_edge.perturb import NoiseKind
from baffle_edge.protocol import Domain, RoundTask, Scheme
from baffle_edge.quant import StepSelector

PROVIDERS = {
    "cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider", "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider", "coreml": "CoreMLExecutionProvider", "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider", "azure": "AzureExecutionProvider",
}


def available_providers() -> list[str]:
    import onnxruntime as ort
    names = {v: k for k, v in PROVIDERS.items()}
    return [names.get(p, p) for p in ort.get_available_providers()]


def make_session(path: Path, *, provider: str = "cpu", threads: int | None = None, profile: bool = False):
    import onnxruntime as ort
    if provider not in PROVIDERS:
        raise ValueError(f"unknown execution provider {provider!r}; known names: {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise ValueError(f"execution provider {provider!r} is not available in this onnxruntime build "
                         f"({ort.__version__}); available here: {', '.join(available_providers())}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = profile
    if profile:  # the trace goes to the temp folder, not the working directory
        import tempfile
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "baffle-ort-profile")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), so, providers=providers)


class _OrtSession:
    fmt = ""
    domain = Domain.FLOAT
    signs = False  # how eps_k reaches _weights: float32 values, or a Rademacher sign mask (client.step_noise)

    def __init__(self, bundle_dir: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 profile: bool = False):
        self.bundle = read_bundle(bundle_dir)
        self._open(self.bundle.file(self.fmt, "train"), provider=provider, threads=threads, profile=profile)
        self.input_name = self.bundle.meta["input"]["name"]
        self.output_name = self.bundle.meta["output"]["name"]
        self.dim = int(self.bundle.meta["model"]["parameters"])
        self.name = f"onnxruntime{'-int8' if self.domain is Domain.INT8_STEP else ''}"

    def _open(self, path: Path, **options) -> None:
        """Load the verified train graph (the one hook an alternative executor overrides)."""
        self.session = make_session(path, **options)

    def forward(self, x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x, **weights})[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Plain forward at the current (unperturbed) weights."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.bundle.check_batch(x)
        return self.forward(x, self._weights(0, None, None))

    def _check(self, batch: Batch, task: RoundTask) -> np.ndarray:
        if Domain(task.domain) is not self.domain:
            raise ValueError(f"runtime {self.name!r} perturbs in the {self.domain.value!r} domain; task asks for "
                             f"{Domain(task.domain).value!r}")
        x = np.ascontiguousarray(batch.x, dtype=np.float32)
        self.bundle.check_batch(x)
        if not np.all(np.isfinite(x)):
            raise ValueError("input batch contains non-finite values")
        return x

    def _weights(self, sign: int, eps: np.ndarray | None, task: RoundTask) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def losses(self, batch: Batch, task: RoundTask, step: int = 0) -> np.ndarray:
        x = self._check(batch, task)
        central = Scheme(task.scheme) is Scheme.CENTRAL
        loss = lambda w: cross_entropy(self.forward(x, w), batch.y)  # noqa: E731
        base = [] if central else [loss(self._weights(0, None, task))]
        plus, minus = [], []
        for eps in noise_stream(task, step, self.dim, signs=self.signs):
            plus.append(loss(self._weights(1, eps, task)))
            if central:
                minus.append(loss(self._weights(-1, eps, task)))
        out = np.asarray(base + plus + minus, dtype=np.float64)
        if not np.all(np.isfinite(out)):
            raise ValueError(f"runtime {self.name!r} produced non-finite losses")
        return out

    def end_profiling(self) -> str:
        return self.session.end_profiling()


class OrtFloatSession(_OrtSession):
    """fp32: each parameter input is fed ``w + float32(sigma) * eps`` (float32 arithmetic)."""

    fmt = "onnx"

    def __init__(self, bundle_dir, **kw):
        super().__init__(bundle_dir, **kw)
        self.specs = [(p["name"], p["offset"], p["size"], tuple(p["shape"])) for p in self.bundle.meta["parameters"]]
        self.w0 = np.zeros(self.dim, np.float32)

    def set_weights(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat, dtype=np.float32).reshape(-1)
        if flat.size != self.dim:
            raise ValueError(f"weights: expected {self.dim} values, got {flat.size}")
        self.w0 = flat.copy()

    def _weights(self, sign, eps, task):
        w = self.w0 if eps is None else self.w0 + np.float32(sign) * (np.float32(task.sigma) * eps)
        return {n: w[o:o + s].reshape(shape) for n, o, s, shape in self.specs}


class OrtInt8Session(_OrtSession):
    """int8: the integers of every trainable tensor are inputs; perturbation k feeds
    ``QuantTable.perturb(q, eps_k)`` (whole quantization steps, baffle_edge/quant.py), computed as a
    select between q - m and q + m (``StepSelector``)."""

    fmt = "onnx-int8"
    domain = Domain.INT8_STEP

    signs = True  # eps arrives as a boolean mask (True = -1) and selects between q - m and q + m

    def __init__(self, bundle_dir, **kw):
        super().__init__(bundle_dir, **kw)
        self.table = self.bundle.quant_table(self.fmt)
        self.set_weights(np.zeros(self.dim, np.float32))

    def set_weights(self, flat: np.ndarray) -> None:
        self.q = self.table.quantize(flat)
        self.select = StepSelector(self.table, self.q)

    def _check(self, batch, task):
        if NoiseKind(task.noise) is not NoiseKind.RADEMACHER:
            raise ValueError(f"runtime {self.name!r} moves integers by whole steps: it needs noise 'rademacher', "
                             f"task has {NoiseKind(task.noise).value!r}")
        return super()._check(batch, task)

    def _weights(self, sign, eps, task):
        qs = self.q if eps is None else self.select(eps, sign)
        return {t.input: q for t, q in zip(self.table.tensors, qs)}


class OrtFloatRuntime:
    name = "onnxruntime"
    session_class = OrtFloatSession

    def __init__(self, provider: str = "cpu", perturbations_per_call: int | str = 1):
        from .batching import resolve
        resolve(perturbations_per_call, self.name)  # a bad value fails here, not at load
        self.provider = provider
        self.perturbations_per_call = perturbations_per_call  # > 1 / "auto": onnxruntime_batched.py

    def load(self, bundle_dir, *, threads: int | None = None, profile: bool = False):
        from .batching import resolve
        from baffle_edge.export.bundle import read_bundle
        p = resolve(self.perturbations_per_call, self.name, read_bundle(bundle_dir).meta["model"]["name"])
        if p > 1:
            from . import onnxruntime_batched as ob
            cls = ob.OrtInt8BatchedSession if self.session_class is OrtInt8Session else ob.OrtFloatBatchedSession
            return cls(bundle_dir, perturbations_per_call=p, provider=self.provider, threads=threads,
                       profile=profile)
        return self.session_class(bundle_dir, provider=self.provider, threads=threads, profile=profile)


class OrtInt8Runtime(OrtFloatRuntime):
    name = "onnxruntime-int8"
    session_class = OrtInt8Session
