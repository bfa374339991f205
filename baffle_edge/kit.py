"""Check this device against a conformance kit: replay the kit's rounds through ``baffle_edge.device``.

    baffle-edge check-kit KIT            # every round; exit 1 if any round differs beyond the kit's tolerance
    python -m baffle_edge.kit KIT

The kit (``baffle-edge conformance --out KIT``, written on any machine) holds tasks, weights, batches, an
fp32 + int8 bundle and the reports the writer's Python client produced. Replaying needs numpy and
onnxruntime only (no torch, no onnx): the install a device has (``pip install baffle-edge``). int8 losses
must be float64 bit for bit the kit's; fp32 losses within the kit's relative tolerance (float kernels may
round differently on another CPU: docs/device-clients.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .client import Batch
from .device import DeviceSettings, answer, open_session
from .protocol import RoundTask

FORMAT_RUNTIMES = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime-int8"}  # kit bundle format -> runtime


@dataclass(frozen=True)
class RoundCheck:
    name: str
    runtime: str
    losses: int  # values compared (perturbed + base)
    max_relative: float  # largest |ours - kit| / max(|kit|, 1e-300)
    tolerance: float  # the kit's: 0 for int8 (bit-identical), fp32_losses_relative otherwise
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_relative <= self.tolerance


def _read(kit: Path, rel: str, dtype: str) -> np.ndarray:
    path = kit / rel
    if not path.is_file():
        raise ValueError(f"{kit}: the kit names {rel}, which is missing")
    return np.fromfile(path, dtype)


def load_index(kit: str | Path) -> dict:
    path = Path(kit) / "conformance.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: write a kit with `baffle-edge conformance --out DIR`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("rounds"), list):
        raise ValueError(f"{path}: not a conformance kit index (no 'rounds' list)")
    return index


def check_round(kit: Path, entry: dict, tolerance: dict, *, threads: int = 1) -> RoundCheck:
    """Replay one kit round on this machine and compare its losses with the kit's report."""
    runtime = FORMAT_RUNTIMES.get(entry.get("format"))
    if runtime is None:
        raise ValueError(f"round {entry.get('name')!r}: unknown bundle format {entry.get('format')!r}")
    task = RoundTask.from_dict(entry["task"])
    weights = _read(kit, entry["weights"], "<f4")
    batches = [Batch(_read(kit, b["x"], "<f4").reshape(b["shape"]), _read(kit, b["y"], "<i4").astype(np.int64))
               for b in entry["batches"]]
    session = open_session(DeviceSettings(runtime=runtime, perturbations_per_call=1, threads=threads), kit / "bundle")
    start = time.perf_counter()
    report = answer(task, session, batches, weights=weights, runtime=runtime)
    seconds = time.perf_counter() - start
    want = np.concatenate([np.asarray(entry["report"]["base_losses"], np.float64),
                           np.asarray(entry["report"]["losses"], np.float64)])
    got = np.concatenate([report.base_losses, report.losses])
    if got.shape != want.shape:
        raise ValueError(f"round {entry['name']!r}: {got.size} losses, the kit has {want.size}")
    rel = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300))) if want.size else 0.0
    return RoundCheck(entry["name"], runtime, int(want.size), rel, round_tolerance(entry, tolerance), seconds)


def round_tolerance(entry: dict, tolerance: dict) -> float:
    """The kit's loss tolerance for one round: int8 exact; fp32 ``fp32_losses_relative``, or for a round of
    several local steps ``fp32_multistep_losses_relative`` (later steps start from weights that the earlier
    steps' float losses moved, so another CPU's float kernels compound through 1/sigma; kits without the field
    use the single-step one)."""
    if entry["format"] == "onnx-int8":
        return float(tolerance.get("int8_losses_relative", 0.0))
    single = float(tolerance.get("fp32_losses_relative", 1e-6))
    if int(entry["task"].get("local_steps", 1)) > 1:
        return float(tolerance.get("fp32_multistep_losses_relative", single))
    return single


def check_kit(kit: str | Path, *, rounds: list[str] | None = None, threads: int = 1) -> list[RoundCheck]:
    """Every round of the kit (or those named in ``rounds``), replayed and compared."""
    kit = Path(kit)
    index = load_index(kit)
    entries = [e for e in index["rounds"] if rounds is None or e.get("name") in rounds]
    if rounds is not None and len(entries) != len(set(rounds)):
        known = ", ".join(e.get("name", "?") for e in index["rounds"])
        raise ValueError(f"unknown kit round(s) in {', '.join(rounds)}; the kit has: {known}")
    return [check_round(kit, e, index.get("tolerance", {}), threads=threads) for e in entries]


def add_parser(sub) -> None:
    p = sub.add_parser("check-kit", help="replay a conformance kit's rounds on this device (numpy + onnxruntime)",
                       description=__doc__.splitlines()[0])
    p.add_argument("kit", help="the kit folder (baffle-edge conformance --out KIT)")
    p.add_argument("--round", action="append", dest="rounds", help="only this round (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: %(default)s, "
                   "as the kit was written)")
    p.set_defaults(func=cmd_check_kit)


def cmd_check_kit(a: argparse.Namespace) -> int:
    results = check_kit(a.kit, rounds=a.rounds, threads=a.threads)
    for r in results:
        verdict = "ok" if r.ok else "DIFFERS"
        print(f"{r.name:28s} {r.runtime:17s} {r.losses:4d} losses  max rel {r.max_relative:.3g} "
              f"(tolerance {r.tolerance:g})  {r.seconds * 1e3:7.1f} ms  {verdict}")
    bad = [r.name for r in results if not r.ok]
    print(f"check-kit: {len(results) - len(bad)} round(s) match, {len(bad)} differ" if results else "check-kit: no rounds")
    return 1 if bad or not results else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baffle_edge.kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    a = parser.parse_args(["check-kit", *(argv if argv is not None else sys.argv[1:])])
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"check-kit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
