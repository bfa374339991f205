"""Structure the refactor of issue 12 promised, checked: the pure-torch runtime needs no ONNX, the
ONNX Runtime device path needs neither onnx nor torch, runtime modules and the packages import no
cycle (export never imports runtimes), and the loss loop lives in client.py only."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import baffle_edge
import baffle_edge.export as export_pkg
import baffle_edge.runtimes as runtimes_pkg

RUNTIMES = Path(runtimes_pkg.__file__).parent
CORE = Path(baffle_edge.__file__).parent


def blocking(*packages: str) -> str:
    """Code that makes every later import of ``packages`` (and their submodules) fail."""
    return f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
"""


NO_ONNX = blocking("onnx", "onnxruntime") + """
import numpy as np
from baffle_edge.runtimes import get_runtime
from baffle_edge.models import ModelConfig, build_model
from baffle_edge.client import Batch, run_task
from baffle_edge.protocol import RoundTask
for p in (1, 4):
    s = get_runtime("torch", perturbations_per_call=p).load(build_model(ModelConfig(), seed=0))
    r = run_task(RoundTask(round=0, client=0, seed=1, k=5, sigma=1e-3), s,
                 [Batch(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64))], weights=s.w0)
    assert r.losses.size == 5
print(sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime")))
"""


def test_torch_runtime_runs_without_onnx():
    out = subprocess.run([sys.executable, "-c", NO_ONNX], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


ORT_DEVICE = blocking("onnx", "torch") + """
import json
import numpy as np
from baffle_edge.runtimes import onnxruntime_runtime as ort
from baffle_edge.client import Batch, run_task
from baffle_edge.protocol import RoundTask
bundle, arrays, cases = sys.argv[1], np.load(sys.argv[2]), json.loads(sys.argv[3])
batch, w = [Batch(arrays["x"], arrays["y"])], arrays["w"]
out = {}
for name, cls, kw in cases:
    s = getattr(ort, cls)(bundle, perturbations_per_call="auto" if name == "auto" else 1)
    out[name] = run_task(RoundTask(round=0, client=0, seed=1, k=5, sigma=1e-3, **kw), s, batch, weights=w).losses.tolist()
    if name == "auto":
        out["auto_p"], out["auto_stopped"] = s.perturbations_per_call, s.calibration.stopped
    if "block" in name:
        out[name + "_incremental"] = s.block_forward is not None
try:
    ort.OrtFloatSession(bundle, perturbations_per_call=2)
except ImportError as e:
    out["p2_error"] = str(e)
out["loaded"] = sorted({m.split(".")[0] for m in sys.modules} & {"onnx", "torch"})
print(json.dumps(out))
"""
ORT_CASES = [  # (name, session class, RoundTask fields): each a P = 1 round, "auto" with auto-P
    ("float", "OrtFloatSession", {}),
    ("int8", "OrtInt8Session", {"noise": "rademacher", "domain": "int8-step"}),
    ("float_block", "OrtFloatSession", {"noise": "block"}),
    ("int8_block", "OrtInt8Session", {"noise": "block", "domain": "int8-step"}),
    ("auto", "OrtFloatSession", {}),
]


def test_onnxruntime_device_path_runs_without_onnx_and_torch(digits, tmp_path):
    """A bundle's device side: imports, P = 1 rounds (float, int8, block noise on the bundle's block
    graphs) with the losses of a full install, auto-P falls back to P = 1 saying why, and a P
    graph the bundle lacks is an ImportError naming what to install or export."""
    from baffle_edge.client import Batch, run_task
    from baffle_edge.export.bundle import ExportConfig, export_bundle
    from baffle_edge.models import ModelConfig, build_model
    from baffle_edge.params import flat_params
    from baffle_edge.protocol import RoundTask
    from baffle_edge.runtimes import onnxruntime_runtime as ort

    model = build_model(ModelConfig(), seed=0)
    export_bundle(model, ModelConfig(), digits, tmp_path / "b", ExportConfig(formats=("onnx", "onnx-int8")))
    w = flat_params(model).numpy()
    x, y = digits.x_test[:8], digits.y_test[:8]
    np.savez(tmp_path / "in.npz", x=x, y=y, w=w)
    env = {**os.environ, "BAFFLE_EDGE_CACHE_DIR": str(tmp_path / "auto-p")}  # no P cached by other tests
    r = subprocess.run([sys.executable, "-c", ORT_DEVICE, str(tmp_path / "b"), str(tmp_path / "in.npz"),
                        json.dumps(ORT_CASES)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    for name, cls, kw in ORT_CASES:  # the same rounds with onnx and torch installed
        task = RoundTask(round=0, client=0, seed=1, k=5, sigma=1e-3, **kw)
        ref = run_task(task, getattr(ort, cls)(tmp_path / "b"), [Batch(x, y)], weights=w).losses
        assert np.array_equal(np.asarray(got[name]), ref), name
    assert got["float_block_incremental"] and got["int8_block_incremental"]  # the bundle's block graphs
    assert got["auto_p"] == 1 and "P=2 unavailable here" in got["auto_stopped"]
    assert "pip install onnx" in got["auto_stopped"]
    assert "pip install onnx" in got["p2_error"] and "perturbations_per_call=2" in got["p2_error"]


def _imports(path: Path) -> set[str]:
    """Sibling runtime modules a module imports (relative or baffle_edge.runtimes.*), at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                names.add(mod.split(".")[0] if mod else "")
            elif mod.startswith("baffle_edge.runtimes."):
                names.add(mod.split(".")[2])
    return {n for n in names if (RUNTIMES / f"{n}.py").exists()}


def _assert_acyclic(graph: dict[str, set[str]], what: str) -> None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph.get(n, ()):
            assert state.get(m) != 1, f"{what} import cycle: {' -> '.join(path + [n, m])}"
            if m not in state:
                visit(m, path + [n])
        state[n] = 2
    for n in graph:
        if n not in state:
            visit(n, [])


def test_runtime_modules_have_no_import_cycle():
    _assert_acyclic({p.stem: _imports(p) for p in RUNTIMES.glob("*.py")}, "runtime module")


def _package_of(dotted: str) -> str | None:
    """The first-level package of baffle_edge a dotted module name lies in (export, runtimes, ...)."""
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] != "baffle_edge":
        return None
    return parts[1] if parts[1] in PACKAGES else None


PACKAGES = {"export": Path(export_pkg.__file__).parent, "runtimes": RUNTIMES,
            **{d.name: d for d in CORE.iterdir() if (d / "__init__.py").exists()}}


def _package_imports(package: str) -> set[str]:
    """Other first-level packages a package imports: at the top or inside functions, relative or
    absolute, or named in a string (importlib)."""
    found = set()
    for path in PACKAGES[package].rglob("*.py"):
        here = ["baffle_edge", package, *path.relative_to(PACKAGES[package]).parent.parts]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
                mod = ".".join(p for p in (base, node.module or "") if p)
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value.split()[0]] if node.value.startswith("baffle_edge.") else []
            found.update(p for p in map(_package_of, names) if p is not None)
    return found - {package}


def test_packages_import_no_cycle_and_export_never_imports_runtimes():
    """The device side (runtimes) may use export's graph tools; export never imports runtimes."""
    graph = {p: _package_imports(p) for p in PACKAGES}
    assert "runtimes" not in graph["export"], graph["export"]
    _assert_acyclic(graph, "package")


def test_the_loss_loop_lives_in_client_only():
    """Backends evaluate weight sets; noise, row order and losses are client.step_losses' job."""
    for p in RUNTIMES.glob("*.py"):
        text = p.read_text()
        for name in ("noise_stream", "step_noise", "cross_entropy", "Scheme.CENTRAL"):
            assert name not in text, f"{p.name} uses {name}: the loss loop belongs in baffle_edge/client.py"


SOURCE_ROOTS = {"baffle_edge": CORE, "baffle_edge.export": PACKAGES["export"], "baffle_edge.runtimes": RUNTIMES}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (export/ and runtimes/ mapped in)."""
    out = {}
    for pkg, root in SOURCE_ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if pkg == "baffle_edge" and parts[0] in ("export", "runtimes"):
                continue  # (an editable install may link them in)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _module_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports: at the top or inside functions, relative or absolute,
    ``from pkg import module``, or named in a string (importlib, the CLI's command table)."""
    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("baffle_edge."):
            targets = [node.value.split()[0].split(":")[0]]
        found.update(m for m in map(known, targets) if m is not None)
    return found - {name}


def test_modules_import_no_cycle():
    """No file-level import cycle anywhere in the package, counting function-local imports and
    importlib names (a cycle is how cli.py and its subcommands, or flower_app and flower_deploy, used
    to hold each other)."""
    modules = _modules()
    graph = {name: _module_imports(name, path, modules) for name, path in modules.items()}
    assert "baffle_edge.device" in graph and "baffle_edge.cli" in graph["baffle_edge.__main__"], sorted(graph)
    _assert_acyclic(graph, "module")


def test_no_module_or_function_is_too_long_to_hold_in_your_head():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_modules_import_no_private_names_of_other_modules():
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


DEVICE_CLI = blocking("torch", "onnx", "sklearn", "matplotlib") + """
from baffle_edge.cli import main
import baffle_edge.device, baffle_edge.gateway.device, baffle_edge.kit
sys.exit(main(["verify", "--help"]))
"""


def test_the_cli_of_a_device_install_names_what_a_server_command_needs():
    """Without torch (a device install) `baffle-edge` still starts; a server command says what to install."""
    out = subprocess.run([sys.executable, "-c", DEVICE_CLI], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "pip install torch==2.13.0 && pip install 'baffle-edge[server]'" in out.stderr, (
        out.returncode, out.stderr[-2000:])
