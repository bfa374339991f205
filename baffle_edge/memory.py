"""Peak memory of one training step on a client, measured in a fresh process.

Run one measurement alone (prints one JSON object)::

    python -m baffle_edge.memory --mode baffle --model wrn-10-2 --batch 128
    python -m baffle_edge.memory --mode bp-adam --model lenet --image-size 28 --batch 32

Modes (one step each, on a random batch of the model's input shape):

    inference   forward pass under ``torch.no_grad`` + loss (the floor every client pays)
    bp-sgd      forward + backward + SGD (momentum) step: the backprop client, small optimizer state
    bp-adam     forward + backward + Adam step: the backprop client of the reference recipe
    baffle      ``client.run_task`` with the torch runtime: K+1 forwards, in-place perturbation
    baffle-<runtime>   the same through another registered runtime (e.g. baffle-onnxruntime-int8);
                       bundle runtimes get a bundle exported during setup, in a child process (a
                       device never holds the exporter: its imports would inflate every figure)
    inference-<runtime>  one plain forward + loss through that runtime, the floor its BAFFLE step
                       is compared with: ONNX Runtime runs the bundle's inference graph (weights as
                       initializers) in its own session; other runtimes their session's forward

How peak memory is measured (``method`` in the output):

* ``vmhwm-reset`` (Linux, Android): after setup the kernel's RSS high-water mark is reset
  (``echo 5 > /proc/self/clear_refs``), the step runs, and ``peak_rss`` is ``VmHWM`` read from
  ``/proc/self/status``. ``step_peak_bytes = peak_rss - rss_before``: the extra resident memory
  the step needed on top of the loaded model, its input and the runtime's libraries.
* ``ru_maxrss`` (elsewhere): the process high-water mark since start, so setup peaks may hide
  the step's; the figure is an upper bound and ``step_peak_bytes`` a lower bound.

``tracemalloc_peak_bytes`` counts Python and numpy allocations during the step (the noise
vectors, the losses), not torch's own CPU allocator, which exposes no counters on CPU; the
``state_bytes`` fields are exact tensor sizes (parameters, gradients, optimizer state).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field

import numpy as np

from .config import MODEL_NAMES

MODES = ("inference", "bp-sgd", "bp-adam", "baffle")
_KB = 1024


@dataclass(frozen=True)
class MemoryConfig:
    mode: str = "baffle"  # one of MODES, or "baffle-<registered runtime>"
    model: str = "lenet"  # one of config.MODEL_NAMES
    in_channels: int = 1  # 1 (digits, MNIST) or 3 (CIFAR)
    image_size: int = 28  # 8 (digits), 28 (MNIST), 32 (CIFAR)
    batch: int = 32  # reference client batch
    k: int = 4  # BAFFLE perturbations; in-place perturbation makes the peak independent of K
    threads: int | None = None  # torch intra-op threads (None: library default)
    seed: int = 0


@dataclass
class MemoryResult:
    config: dict
    method: str  # vmhwm-reset | ru_maxrss
    rss_before_bytes: int  # resident set after setup (imports, model, batch), before the step
    peak_rss_bytes: int  # process peak during the step (method above)
    step_peak_bytes: int  # peak_rss - rss_before: what the step added
    tracemalloc_peak_bytes: int  # Python/numpy allocations during the step
    param_bytes: int  # float32 trainable parameters
    grad_bytes: int  # gradients kept after the step (backprop only)
    optimizer_state_bytes: int  # momentum / Adam moments (backprop only)
    seconds: float  # wall time of the step
    result: float  # the step's loss (a finite number, or the step is wrong)
    versions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class MemoryUnsupported(RuntimeError):
    """The configuration cannot run here (e.g. a runtime that cannot execute the model's ops)."""


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _rss_now() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * _KB
    import psutil
    return int(psutil.Process().memory_info().rss)


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * _KB)  # macOS reports bytes, Linux kB


def _tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _model_config(cfg: MemoryConfig):
    from .models import ModelConfig, default_norm
    return ModelConfig(cfg.model, cfg.in_channels, cfg.image_size, 10, norm=default_norm(cfg.model))


def _prepare(cfg: MemoryConfig):
    """Everything but the step: model, batch, optimizer / session. Returns (step, state fn)."""
    import torch
    from torch import nn

    from .client import Batch, cross_entropy, run_task
    from .models import build_model
    from .params import flat_params

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(_model_config(cfg), seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.batch, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    y = rng.integers(0, 10, cfg.batch).astype(np.int64)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():  # warm the kernels and thread pools on one sample: not the step's cost
        model(xt[:1])
    params = [p for p in model.parameters() if p.requires_grad]
    state = {"grad": lambda: 0, "opt": lambda: 0}

    if cfg.mode == "inference":
        def step():
            with torch.no_grad():
                return cross_entropy(model(xt).numpy(), y)
    elif cfg.mode in ("bp-sgd", "bp-adam"):
        from .server import OptimConfig
        o = OptimConfig()
        opt = (torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
               if cfg.mode == "bp-sgd" else
               torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay))
        model.train()
        # warm the autograd and optimizer code paths on a throwaway copy at batch 1, so the
        # measured step pays for its activations, gradients and optimizer state, not for imports
        spare = build_model(_model_config(cfg), seed=cfg.seed).train()
        spare_opt = type(opt)([p for p in spare.parameters() if p.requires_grad], lr=o.lr)
        nn.functional.cross_entropy(spare(xt[:1]), yt[:1]).backward()
        spare_opt.step()
        del spare, spare_opt

        def step():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xt), yt)
            loss.backward()
            opt.step()
            return float(loss.detach())
        state["grad"] = lambda: _tensor_bytes(p.grad for p in params if p.grad is not None)
        state["opt"] = lambda: _tensor_bytes(v for s in opt.state.values() for v in s.values()
                                             if torch.is_tensor(v) and v.dim() > 0)
    elif cfg.mode.startswith("inference-"):
        runtime = cfg.mode[len("inference-"):]
        forward = _inference_forward(runtime, cfg, model, x, y)
        forward(x[:1])  # warm at batch 1, like the BAFFLE modes

        def step():
            return cross_entropy(forward(x), y)
    elif cfg.mode == "baffle" or cfg.mode.startswith("baffle-"):
        runtime = "torch" if cfg.mode == "baffle" else cfg.mode[len("baffle-"):]
        session, task = _runtime_session(runtime, cfg, model, x, y)
        weights = flat_params(model).numpy()
        batch = Batch(x, y)
        run_task(task, session, [Batch(x[:1], y[:1])], weights=weights, runtime=runtime)  # warm at batch 1

        def step():
            report = run_task(task, session, [batch], weights=weights, runtime=runtime)
            return float(report.base_losses[0] if report.base_losses.size else report.losses.mean())
    else:
        raise ValueError(f"mode: {cfg.mode!r} is not one of {MODES}, 'baffle-<runtime>' or 'inference-<runtime>'")
    return step, state, _tensor_bytes(params)


def _runtime_session(runtime: str, cfg: MemoryConfig, model, x: np.ndarray, y: np.ndarray):
    """A loaded session of a registered runtime and a RoundTask it can answer. Bundle runtimes
    get a bundle exported here (setup, not measured) into a temporary folder."""
    from .device import DeviceSettings, open_session
    from .protocol import RoundTask
    settings = DeviceSettings(runtime=runtime, perturbations_per_call=1, threads=cfg.threads)  # ValueError: unknown
    session = open_session(settings, _artifact(runtime, cfg, model))  # ImportError naming the extra
    task = RoundTask.for_domain(session.domain, round=0, client=0, seed=cfg.seed, k=cfg.k, sigma=1e-4)
    return session, task


def _artifact(runtime: str, cfg: MemoryConfig, model):
    """What ``runtime`` loads: the torch model, or a bundle exported by a child process from the
    same seeded model (``build_model`` is deterministic), so the exporter's imports stay out."""
    from .runtimes import REGISTRY
    info = REGISTRY[runtime]
    if getattr(info, "artifact", "torch-model") != "bundle":
        return model
    import atexit
    import shutil
    import tempfile
    from pathlib import Path
    folder = tempfile.mkdtemp(prefix="baffle-memory-")
    atexit.register(shutil.rmtree, folder, True)  # sessions may read it lazily: gone with the process
    out = Path(folder) / "bundle"
    code = ("import sys, json; from baffle_edge.memory import MemoryConfig, export_for; "
            "export_for(MemoryConfig(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg)), info.format, str(out)],
                          capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"exporting the {info.format} bundle failed: {proc.stderr.strip()[-2000:]}")
    return out


def export_for(cfg: MemoryConfig, fmt: str, out: str) -> None:
    """Export the seeded model of ``cfg`` as a ``fmt`` bundle into ``out`` (``_artifact``'s child)."""
    from baffle_edge.export.bundle import ExportConfig, export_bundle
    from .data import Dataset
    from .models import build_model
    rng = np.random.default_rng(cfg.seed)  # the same calibration batch as the measuring process
    x = rng.standard_normal((cfg.batch, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    y = rng.integers(0, 10, cfg.batch).astype(np.int64)
    c = cfg.in_channels
    data = Dataset("synthetic", x, y, x[:1], y[:1], 10, (0.0,) * c, (1.0,) * c, 1.0)
    export_bundle(build_model(_model_config(cfg), seed=cfg.seed), _model_config(cfg), data, out,
                  ExportConfig(formats=(fmt,)), source="baffle_edge.memory")


def _inference_forward(runtime: str, cfg: MemoryConfig, model, x: np.ndarray, y: np.ndarray):
    """``forward(x) -> logits`` of a plain inference through ``runtime`` at the model's weights."""
    from .params import flat_params
    from .runtimes import runtime_info
    if runtime_info(runtime).engine == "onnxruntime":
        from .bundle import read_bundle
        from .runtimes.onnxruntime_runtime import make_session
        from .runtimes import REGISTRY
        bundle = read_bundle(_artifact(runtime, cfg, model))
        sess = make_session(bundle.file(REGISTRY[runtime].format, "inference"), threads=cfg.threads)
        name, out = bundle.meta["input"]["name"], bundle.meta["output"]["name"]
        return lambda xb: sess.run([out], {name: xb})[0]
    session, _ = _runtime_session(runtime, cfg, model, x, y)
    session.set_weights(flat_params(model).numpy())
    return session.logits


def measure(cfg: MemoryConfig) -> MemoryResult:
    """Measure one step in *this* process (use ``measure_in_subprocess`` for a clean figure)."""
    step, state, param_bytes = _prepare(cfg)
    import gc
    gc.collect()
    rss_before = _rss_now()
    reset = _reset_peak()
    tracemalloc.start()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _status_kb("VmHWM") * _KB if reset else _ru_maxrss_bytes()
    peak = max(peak, _rss_now())
    if not np.isfinite(loss):
        raise RuntimeError(f"{cfg.mode}: the step's loss is not finite ({loss})")
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "torch_threads": torch.get_num_threads()}
    return MemoryResult(config=asdict(cfg), method="vmhwm-reset" if reset else "ru_maxrss",
                        rss_before_bytes=rss_before, peak_rss_bytes=peak,
                        step_peak_bytes=max(0, peak - rss_before), tracemalloc_peak_bytes=int(py_peak),
                        param_bytes=param_bytes, grad_bytes=int(state["grad"]()),
                        optimizer_state_bytes=int(state["opt"]()), seconds=seconds, result=float(loss),
                        versions=versions)


def _cli_args(cfg: MemoryConfig) -> list[str]:
    args = ["--mode", cfg.mode, "--model", cfg.model, "--in-channels", str(cfg.in_channels),
            "--image-size", str(cfg.image_size), "--batch", str(cfg.batch), "--k", str(cfg.k),
            "--seed", str(cfg.seed)]
    return args + (["--threads", str(cfg.threads)] if cfg.threads else [])


def measure_in_subprocess(cfg: MemoryConfig, *, timeout: float = 600.0) -> MemoryResult:
    """Run ``measure`` in a fresh interpreter (``python -m baffle_edge.memory``) and parse its JSON."""
    proc = subprocess.run([sys.executable, "-m", "baffle_edge.memory", *_cli_args(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if proc.returncode == 2:  # the child refused the configuration (ValueError): not a crash
        raise MemoryUnsupported(f"memory child refused {cfg.mode!r}: {proc.stderr.strip()[-2000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    return MemoryResult(**d)


def build_arg_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m baffle_edge.memory", description=__doc__.split("\n\n")[0])
    d = MemoryConfig()
    p.add_argument("--mode", default=d.mode, help=f"{', '.join(MODES)} or baffle-<runtime> (default: {d.mode})")
    p.add_argument("--model", default=d.model, choices=MODEL_NAMES, help=f"(default: {d.model})")
    p.add_argument("--in-channels", type=int, default=None, help="input channels (default: 3 for wrn-10-2, else 1)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: 32 for wrn-10-2, else 28)")
    p.add_argument("--batch", type=int, default=d.batch, help=f"batch size (default: {d.batch})")
    p.add_argument("--k", type=int, default=d.k, help=f"BAFFLE perturbations (default: {d.k})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: library default)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    return p


def config_from_args(a: argparse.Namespace) -> MemoryConfig:
    wrn = a.model.startswith("wrn")
    cfg = MemoryConfig(mode=a.mode, model=a.model, in_channels=a.in_channels or (3 if wrn else 1),
                       image_size=a.image_size or (32 if wrn else 28), batch=a.batch, k=a.k,
                       threads=a.threads, seed=a.seed)
    for name in ("batch", "k", "in_channels", "image_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    a = build_arg_parser().parse_args(argv)
    try:
        cfg = config_from_args(a)
        print(measure(cfg).to_json())
    except ValueError as e:
        print(f"baffle_edge.memory: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
