"""Run by tests/test_arm64.py on the x86 host and inside the arm64 root (scripts/arm64-root run): one
JSON line with what this CPU is and the losses a runtime gives for a task, so the two can be compared bit
for bit. Needs only the device install (numpy + onnxruntime / ai-edge-litert): torch and onnx are blocked.

    python3 tests/arm64_probe.py RUNTIME BUNDLE CASE.npz TASK.json
    python3 tests/arm64_probe.py --cpu     # only the CPU line
"""
import ctypes
import json
import platform
import sys
import warnings

sys.modules["torch"] = None  # the device path must not need them
sys.modules["onnx"] = None

import numpy as np  # noqa: E402

from baffle_edge import targets  # noqa: E402
from baffle_edge.client import Batch  # noqa: E402
from baffle_edge.device import DeviceSettings, answer, open_session  # noqa: E402
from baffle_edge.protocol import RoundTask  # noqa: E402


def cpu() -> dict:
    info = {"machine": platform.machine(), "target": targets.detect().value, "emulated": targets.emulated()}
    if info["machine"] == "aarch64":
        g = ctypes.CDLL(None).getauxval
        g.restype, g.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        hwcap, hwcap2 = g(16), g(26)  # AT_HWCAP, AT_HWCAP2: what ORT's and XNNPACK's CPU detection read
        info |= {"asimddp": bool(hwcap >> 20 & 1), "i8mm": bool(hwcap2 >> 13 & 1)}
    return info


def main(runtime: str, bundle: str, case: str, task_json: str) -> None:
    data = np.load(case)
    task = RoundTask.from_json(open(task_json).read())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = open_session(DeviceSettings(runtime=runtime, perturbations_per_call=1, threads=1), bundle)
    report = answer(task, session, [Batch(data["x"], data["y"])], weights=data["w"], runtime=runtime)
    losses = [float(v).hex() for v in np.concatenate([report.base_losses, report.losses])]
    print(json.dumps({"cpu": cpu(), "losses": losses, "torch_loaded": "torch" in sys.modules and
                      sys.modules["torch"] is not None,
                      "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))


if __name__ == "__main__":
    if sys.argv[1:] == ["--cpu"]:
        print(json.dumps(cpu()))
    else:
        main(*sys.argv[1:])
