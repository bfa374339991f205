"""Structure the refactor of issue 12 promised, checked: the pure-torch runtime needs no ONNX, the
runtime modules import no cycle, and the loss loop lives in client.py only."""
import ast
import subprocess
import sys
from pathlib import Path

import baffle_edge.runtimes as runtimes_pkg

RUNTIMES = Path(runtimes_pkg.__file__).parent

NO_ONNX = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
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


def test_runtime_modules_have_no_import_cycle():
    graph = {p.stem: _imports(p) for p in RUNTIMES.glob("*.py")}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph.get(n, ()):
            assert state.get(m) != 1, f"import cycle: {' -> '.join(path + [n, m])}"
            if m not in state:
                visit(m, path + [n])
        state[n] = 2
    for n in graph:
        if n not in state:
            visit(n, [])


def test_the_loss_loop_lives_in_client_only():
    """Backends evaluate weight sets; noise, row order and losses are client.step_losses' job."""
    for p in RUNTIMES.glob("*.py"):
        text = p.read_text()
        for name in ("noise_stream", "step_noise", "cross_entropy", "Scheme.CENTRAL"):
            assert name not in text, f"{p.name} uses {name}: the loss loop belongs in baffle_edge/client.py"
