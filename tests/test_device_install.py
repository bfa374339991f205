"""The lean device install, for real: a clean venv with `pip install baffle-edge` (numpy + onnxruntime
and what they need, no torch, no onnx) replays a conformance kit written by the full install.

Slow (builds a venv and installs wheels: ~1-3 min): python -m pytest -m slow tests/test_device_install.py
"""
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from baffle_edge.conformance import write_kit

ROOT = Path(__file__).resolve().parents[1]
# what pip may install for the base requirements (numpy, onnxruntime and onnxruntime's own dependencies)
ALLOWED = {"baffle-edge", "numpy", "onnxruntime", "flatbuffers", "packaging", "protobuf", "sympy", "mpmath",
           "coloredlogs", "humanfriendly", "pip", "setuptools", "wheel"}


@pytest.mark.slow
def test_a_clean_device_venv_replays_the_kit(tmp_path):
    kit = tmp_path / "kit"
    index = write_kit(kit, progress=False)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT)], check=True, timeout=900,
                   capture_output=True, text=True)
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True,
                            text=True).stdout.split()
    names = {line.split("==")[0].lower() for line in listed}
    assert names <= ALLOWED, f"the device install pulled in {sorted(names - ALLOWED)}"
    assert not names & {"torch", "onnx", "scikit-learn", "matplotlib"}
    out = subprocess.run([env_dir / "bin" / "baffle-edge", "check-kit", str(kit)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"check-kit: {len(index['rounds'])} round(s) match, 0 differ" in out.stdout
    server = subprocess.run([env_dir / "bin" / "baffle-edge", "train", "--rounds", "1"], capture_output=True,
                            text=True, timeout=120)
    assert server.returncode == 2 and "baffle-edge[server]" in server.stderr, server.stderr
    assert sys.executable != str(py)
