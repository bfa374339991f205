"""Run a command as the lean device install would (numpy + the runtimes; no torch, no onnx):
``python tests/lean_device.py -m pytest ...`` makes every ``import torch`` / ``import onnx`` (and
``importlib.util.find_spec`` of them) fail, then runs ``python`` with the rest of the arguments."""
from __future__ import annotations

import runpy
import sys

ABSENT = ("torch", "onnx")  # what `pip install baffle-edge` (the device install) does not bring


class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (tests/lean_device.py: the device install)",
                                      name=name)
        return None


sys.meta_path.insert(0, Absent())
for loaded in [m for m in sys.modules if m.split(".")[0] in ABSENT]:
    del sys.modules[loaded]

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] != ["-m"] or len(args) < 2:
        sys.exit("usage: python tests/lean_device.py -m MODULE [ARGS...]")
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
