"""Fixture layer of the benchmarks: options, machine info, and the one place sessions are built.

Every suite gets a runtime session through ``sessions.get(runtime, case, provider)``, which calls
``load_session`` below. To plug in a new runtime: register it in ``baffle_edge.runtimes.REGISTRY``
(it then appears in every suite) and, if it loads an exported bundle rather than a torch
module, fill in ``build_artifact`` / ``runtime_options`` / ``forward_loss_fn`` at the places
marked ``PLUG-IN``.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from baffle_edge.client import Batch, cross_entropies, cross_entropy
from baffle_edge.runtimes import REGISTRY, get_runtime

from . import store
from .cases import MODELS, SIGMA, ModelCase, runtime_names


# ---------------------------------------------------------------------------------- options
def pytest_addoption(parser):
    g = parser.getgroup("baffle-edge benchmarks")
    g.addoption("--bench-full", action="store_true", default=False,
                help="also run the slow configurations (WRN-10-2 at batch 128, K=500, C=100, "
                     "memory of WRN-10-2); the default is a quick set for CI and a first look")
    g.addoption("--bench-threads", type=int, default=None,
                help="intra-op threads for every runtime (default: each library's default)")
    g.addoption("--bench-bundles", metavar="DIR", default=None,
                help="keep the exported bundles, initial weights and torch reference losses in DIR (written "
                     "where torch is installed, read where it is not: a device without torch measures the "
                     "same bundles; see benchmarks/store.py and scripts/arm64-root bench)")
    g.addoption("--bench-device", action="store_true", default=False,
                help="only the device subset (marker `device`): one model per suite, the runtimes a device "
                     "runs; what scripts/arm64-root bench measures")


def pytest_configure(config):
    # the markers bench_full and device are declared in setup.cfg (tests/ import the cases too)
    bundles = config.getoption("--bench-bundles", default=None)
    store.use(Path(bundles).resolve() if bundles else None)
    # setup.cfg's addopts hold --benchmark-disable (plain test runs execute each benchmark once);
    # asking for --benchmark-only means "measure": enable, instead of pytest-benchmark's error.
    # (pytest-benchmark's own pytest_configure runs after this one: it is trylast.)
    if getattr(config.option, "benchmark_only", False):
        config.option.benchmark_enable = True


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-device", default=False):
        keep = [i for i in items if "device" in i.keywords or not _in_benchmarks(i)]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    if config.getoption("--bench-full", default=False):
        return
    skip = pytest.mark.skip(reason="slow configuration: run with --bench-full")
    for item in items:
        if "bench_full" in item.keywords:
            item.add_marker(skip)


def _in_benchmarks(item) -> bool:
    return Path(str(item.fspath)).resolve().parent == Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    return bool(request.config.getoption("--bench-full"))


@pytest.fixture(scope="session")
def bench_threads(request) -> int | None:
    return request.config.getoption("--bench-threads")


@pytest.fixture(scope="session")
def measuring(request) -> bool:
    """True when timings are kept (--benchmark-only or benchmarks enabled), False in plain test runs."""
    opt = request.config.option  # --benchmark-only sets benchmark_enable (pytest_configure above)
    return bool(getattr(opt, "benchmark_enable", False)) or not getattr(opt, "benchmark_disable", False)


# ----------------------------------------------------------------------------- machine info
def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_environment() -> dict:
    """Library versions, execution providers / delegates and which runtimes load here."""
    import numpy

    import baffle_edge
    env: dict = {"baffle_edge": baffle_edge.__version__, "numpy": numpy.__version__, "torch": None,
                 "torch_threads": None}
    if store.have_torch():  # a device install has none: its suites read --bench-bundles
        import torch
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    try:
        import onnxruntime as ort
        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    try:
        from importlib.metadata import version
        env["ai_edge_litert"] = version("ai-edge-litert")
        env["tflite_delegates"] = ["builtin", "xnnpack (default resolver)"]
    except Exception:
        env["ai_edge_litert"] = None
    runtimes = {}
    for name in runtime_names():
        if name not in REGISTRY:
            runtimes[name] = "not registered"
            continue
        try:
            get_runtime(name)
            runtimes[name] = "available"
        except Exception as e:  # ImportError with the install hint, or a constructor error
            runtimes[name] = f"unavailable: {e}"
    env["runtimes"] = runtimes
    return env


def pytest_benchmark_update_machine_info(config, machine_info):
    import psutil
    from baffle_edge.targets import arm_kernel_paths, cpu_flags, emulated, isa_summary
    machine_info["cpu_model"] = cpu_model_name()
    # arm64: the int8 GEMM kernels MLAS (ONNX Runtime) and XNNPACK (LiteRT) pick from the HWCAP bits this
    # process sees: neon / dotprod / i8mm (scripts/arm64-root --cpu chooses them under qemu)
    paths = arm_kernel_paths()
    machine_info["kernel_path"] = paths["mlas"] if paths else None
    machine_info["kernel_paths"] = paths
    machine_info["arm64_cpu_model"] = os.environ.get("BAFFLE_ARM64_CPU")  # the qemu CPU model, under arm64-root
    machine_info["bench_bundles"] = str(store.current.root) if store.current.root else None
    machine_info["emulated"] = emulated()  # e.g. scripts/arm64-root's qemu-user: times are not device speed
    isa = isa_summary()  # int8-relevant ISA: avx2 / avx512_vnni / avx_vnni / amx_int8 (x86), asimddp / i8mm (arm)
    machine_info["cpu_isa"] = isa["isa"]
    machine_info["cpu_target"] = isa["target"]  # what `baffle-edge export --target auto` picks here
    machine_info["cpu_flags"] = sorted(cpu_flags())
    machine_info["cores_logical"] = os.cpu_count()
    machine_info["cores_physical"] = psutil.cpu_count(logical=False)
    machine_info["memory_total_bytes"] = psutil.virtual_memory().total
    machine_info["bench_full"] = bool(config.getoption("--bench-full", default=False))
    machine_info["bench_threads"] = config.getoption("--bench-threads", default=None)
    machine_info["baffle_edge"] = runtime_environment()


# --------------------------------------------------------------------------- session layer
def runtime_options(runtime: str, provider: str) -> dict:
    """Keyword options for ``get_runtime(runtime, **options)`` that select ``provider``."""
    from baffle_edge.runtimes import REGISTRY
    if runtime not in REGISTRY:
        return {}
    return REGISTRY[runtime].options(provider=None if provider == "default" else provider)


def synthetic_dataset(case: ModelCase, n: int = 256):
    """A stand-in training set of the case's shape: exporters calibrate int8 ranges on it."""
    from baffle_edge.data import Dataset
    b, t = case.batch(n, seed=1), case.batch(32, seed=2)
    c = case.in_channels
    return Dataset(f"synthetic-{case.input_shape}", b.x, b.y, t.x, t.y, 10, (0.0,) * c, (1.0,) * c, 1.0)


def build_artifact(runtime: str, case: ModelCase, workdir: Path, *, target: str | None = None):
    """What ``get_runtime(runtime).load(...)`` takes for ``case``: the torch module for
    ``artifact == "torch-model"`` runtimes, an exported bundle folder for ``"bundle"`` ones.
    The ONE place where exported bundles are made; export failures skip, naming the cause. ``target``: the
    int8 export target (a plugin EP's, e.g. qnn-htp; default: this machine's)."""
    info = REGISTRY[runtime]
    if getattr(info, "artifact", "torch-model") == "torch-model":
        return case.build()
    # ---- PLUG-IN: bundle-based runtimes (onnxruntime, onnxruntime-int8, tflite-int8, ...) -------
    # A runtime whose RuntimeInfo says artifact="bundle", format=F is fed a bundle exported with
    # formats=(F,) (export/bundle.py). A new bundle runtime needs nothing here; a new kind of
    # artifact needs one more branch.
    # With --bench-bundles DIR the bundle is kept there, and read back where torch is missing (store.py).
    fmt = getattr(info, "format", None)
    out = store.current.bundle(runtime, case, fmt + (f"-{target}" if target else ""), workdir)
    if (out / "baffle.json").exists():
        return out
    if not store.have_torch():
        pytest.skip(store.current.missing(f"the {fmt} bundle of {case.id} for {runtime}"))
    try:
        from baffle_edge.export.bundle import ExportConfig, export_bundle
    except ImportError as e:
        pytest.skip(f"runtime {runtime!r} loads an exported bundle but the exporter is not importable ({e}); "
                    "install the package with its export extras or wire it in benchmarks/conftest.py:build_artifact")
    model = case.build()
    try:
        export_bundle(model, case.config, synthetic_dataset(case), out,
                      ExportConfig(formats=(fmt,), target=target or "auto"), force=True, source="benchmarks")
    except ImportError as e:  # e.g. litert-torch for tflite-int8
        pytest.skip(f"runtime {runtime!r}: exporting format {fmt!r} needs a missing package ({e}); "
                    "pip install 'baffle-edge[tflite]' for TFLite")
    except Exception as e:  # noqa: BLE001 - an export that cannot be built here is a skip, not a failure
        pytest.skip(f"runtime {runtime!r}: cannot export format {fmt!r} for {case.id} here "
                    f"({type(e).__name__}: {e})")
    if store.current.root and fmt in ("onnx", "onnx-int8"):  # kept for a device, which has no onnx to build them
        from baffle_edge.export.bundle import add_batched
        add_batched(out, store.BATCHED_PS)
    return out


def load_session(runtime: str, case: ModelCase, *, provider: str, workdir: Path, threads: int | None):
    """Build the session for (runtime, model case, provider) at the case's initial weights,
    or skip saying how to enable it."""
    if runtime not in REGISTRY:
        pytest.skip(f"runtime {runtime!r} is not registered in baffle_edge.runtimes.REGISTRY yet "
                    f"(known: {', '.join(REGISTRY)}); it is benchmarked as soon as it is")
    try:
        rt = get_runtime(runtime, **runtime_options(runtime, provider))
    except ImportError as e:  # the message names the pip extra to install
        pytest.skip(str(e))
    except TypeError as e:
        pytest.skip(f"runtime {runtime!r} does not take options {runtime_options(runtime, provider)} ({e}); "
                    "adjust benchmarks/conftest.py:runtime_options")
    from baffle_edge.runtimes.plugin_eps import PLUGINS, plugin_module
    if provider in PLUGINS:  # plugin sessions open at the first batch: an absent package skips here, naming its extra
        try:
            plugin_module(provider)
        except ImportError as e:
            pytest.skip(str(e))
    artifact = build_artifact(runtime, case, workdir, target=PLUGINS[provider].target if provider in PLUGINS else None)
    try:
        session = rt.load(artifact, threads=threads)
    except ValueError as e:  # e.g. an execution provider this build lacks
        pytest.skip(f"runtime {runtime!r} ({provider}) cannot load here: {e}")
    session.set_weights(case.weights())  # bundle sessions start without weights
    return session


def task_for(runtime: str, *, k: int, scheme: str = "forward", client: int = 0, round_: int = 0,
             model_version: str = ""):
    """A RoundTask that ``runtime`` can answer: its perturbation domain with that domain's noise and
    baseline (protocol.DOMAIN_DEFAULTS)."""
    from baffle_edge.protocol import RoundTask
    return RoundTask.for_domain(getattr(REGISTRY.get(runtime), "domain", "float"), round=round_, client=client,
                                seed=7, k=k, sigma=SIGMA, scheme=scheme, model_version=model_version)


class Sessions:
    """Session-scoped cache: a (runtime, case, provider) session is built (exported) once."""

    def __init__(self, workdir: Path, threads: int | None):
        self.workdir, self.threads = workdir, threads
        self._cache: dict[tuple, object] = {}

    def get(self, runtime: str, case: str | ModelCase, provider: str | None = None):
        case = MODELS[case] if isinstance(case, str) else case
        key = (runtime, case.id, provider)
        if key not in self._cache:
            try:
                self._cache[key] = load_session(runtime, case, provider=provider or "default",
                                                workdir=self.workdir / runtime, threads=self.threads)
            except pytest.skip.Exception as e:
                self._cache[key] = e
        got = self._cache[key]
        if isinstance(got, pytest.skip.Exception):
            pytest.skip(str(got.msg))
        return got


@pytest.fixture(scope="session")
def sessions(tmp_path_factory, bench_threads) -> Sessions:
    return Sessions(tmp_path_factory.mktemp("bundles"), bench_threads)


def forward_loss_fn(session, batch: Batch) -> Callable[[], float]:
    """One plain forward + loss at the session's current weights: what each of the K+1 forwards
    of a client round costs without the perturbation (the batch is prepared once, outside the
    timed call). Works for every ``client.Session``. Returns a zero-argument callable."""
    x = session.prepare(batch.x)
    weights = session.weight_set(0, None, None)
    return lambda: cross_entropy(session.evaluate(x, [weights])[0], batch.y)


def forward_losses_fn(session, batch: Batch) -> Callable[[int], np.ndarray]:
    """n plain forwards at the session's current weights and their losses, gathered and computed
    in one ``cross_entropies`` call as ``client.step_losses`` does: the unperturbed counterpart of
    a client round (the specified loss costs ~0.1 ms per single call on LeNet, ~10 us per loss
    when gathered)."""
    x = session.prepare(batch.x)
    weights = session.weight_set(0, None, None)
    return lambda n: cross_entropies(np.stack([np.array(session.evaluate(x, [weights])[0]) for _ in range(n)]),
                                     batch.y)


def reference_loss(case: ModelCase, batch: Batch) -> float:
    """The torch fp32 reference: loss of the case's initial weights on ``batch`` (float64 CE); kept in and
    read from the ``--bench-bundles`` folder (store.py)."""
    def compute() -> float:
        import torch
        with torch.no_grad():
            logits = case.build()(torch.from_numpy(batch.x)).double()
            return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.y)))
    return store.current.reference_loss(case, batch, compute)


def loss_tolerance(runtime: str) -> float:
    """Absolute tolerance of a runtime's loss vs the fp32 reference (int8: quantization error)."""
    return 0.15 if "int8" in runtime else 1e-4


def plugin_info(session, provider: str | None) -> dict:
    """extra_info of a plugin-EP session (docs/npu.md): where its graph ran, by MACs, the perturbed tensors read on
    CPU, and whether the backend is a simulator here (its times are then not device speed); {} otherwise."""
    if getattr(session, "placement", None) is None:
        return {}
    from baffle_edge.runtimes.plugin_eps import PLUGINS
    placed = session.placement.to_json()
    return {"device_mac_share": placed["device_mac_share"], "weights_consumed_on_cpu": placed["weights_consumed_on_cpu"],
            "simulated": PLUGINS[provider].simulated_on == platform.machine()}
