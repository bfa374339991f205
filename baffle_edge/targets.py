"""The CPU an int8 bundle is made for (``baffle-edge export --target``), decided once.

What differs between targets is how the int8 kernels accumulate:

* ``x86-avx2`` (x86 without VNNI): ONNX Runtime's int8 GEMM multiplies u8 x s8 pairs with
  ``vpmaddubsw``, which adds two products into a *saturating* int16. Full-range weights overflow it
  (measured on digits LeNet: 90.0% vs 93.9% float), so weights are exported with 7 bits
  ([-64, 64], ``reduce_range``) and their +-1 perturbation steps stay inside that range too.
* ``x86-vnni`` (AVX512-VNNI or AVX-VNNI; AMX-INT8 machines have it too): ``vpdpbusd`` accumulates
  straight into int32, no saturation: full 8-bit weights ([-127, 127]).
* ``arm64`` (Android phones, Apple silicon, Graviton): NEON ``smull``/``sdot`` accumulate into
  int32: full 8-bit weights. Pick it for Android whatever machine exports the bundle.
* ``qnn-htp`` (Qualcomm Hexagon NPU through ONNX Runtime's QNN EP, docs/npu.md): full-range per-tensor
  weights and uint16 logits, the form in which the HTP runs the whole train graph.

``detect()`` names this machine's target (``platform.machine()`` and the ``/proc/cpuinfo`` flags);
``"auto"`` resolves to it. A bundle records its target in ``baffle.json``; ``check_bundle`` warns
(``TargetMismatchWarning``) when a client runs an int8 bundle on a CPU of another target.
Pure Python: a device client imports it without torch or onnx.
"""
from __future__ import annotations

import enum
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"


class Target(str, enum.Enum):
    ARM64 = "arm64"
    X86_VNNI = "x86-vnni"
    X86_AVX2 = "x86-avx2"
    QNN_HTP = "qnn-htp"  # Qualcomm Hexagon NPU through ONNX Runtime's QNN EP (docs/npu.md)


@dataclass(frozen=True)
class TargetSpec:
    target: Target
    reduce_range: bool  # int8 weights in [-64, 64] (7 bits) instead of [-127, 127]
    accumulation: str  # how the int8 kernels add products (why the range is what it is)
    isa_flags: tuple[str, ...]  # /proc/cpuinfo flags (any of them) that identify the target on x86
    per_channel: bool = True  # one weight scale per output channel (False: one per tensor)
    # "float": the head's output Q/DQ pair is dropped (CPU QGemm with float logits); "uint16": symmetric uint16
    # logits over +-32 at least (steps ~1e-3): the HTP runs a head only when its output is quantized
    logits: str = "float"

    @property
    def weight_range(self) -> tuple[int, int]:
        return (-64, 64) if self.reduce_range else (-127, 127)


SPECS: dict[Target, TargetSpec] = {
    Target.ARM64: TargetSpec(Target.ARM64, False, "NEON smull/sdot into int32 (no saturation)", ()),
    Target.X86_VNNI: TargetSpec(Target.X86_VNNI, False, "VNNI vpdpbusd into int32 (no saturation)",
                                ("avx512_vnni", "avx_vnni", "amx_int8")),
    Target.X86_AVX2: TargetSpec(Target.X86_AVX2, True, "AVX2 vpmaddubsw into saturating int16 pairs", ("avx2",)),
    # the HTP refuses per-channel int8 conv weights fed as graph inputs (ORT 1.32, QNN 2.51): per-tensor;
    # it runs the Gemm head only with a quantized output: uint16 logits (docs/npu.md)
    Target.QNN_HTP: TargetSpec(Target.QNN_HTP, False, "Hexagon HTP int8 (per-tensor weights as inputs)", (),
                               per_channel=False, logits="uint16"),
}
CHOICES = (AUTO, *(t.value for t in Target))


class TargetMismatchWarning(UserWarning):
    """An int8 bundle runs on a CPU of another target than the one it was exported for."""


def cpuinfo_field(keys: tuple[str, ...], cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The first non-empty value of a ``key : value`` line of ``cpuinfo`` whose key is one of ``keys`` (the first
    processor's), or None when there is none or the file is unreadable."""
    for line in _read(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys and value.strip():
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty when unreadable)."""
    return frozenset((cpuinfo_field(("flags", "Features"), cpuinfo) or "").split())  # x86 / arm64 spelling


def cpu_vendor(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``, ...), or None where the kernel gives none."""
    return cpuinfo_field(("vendor_id",), cpuinfo)


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """This CPU's name and target, e.g. ``Intel(R) Xeon(R) Processor (x86-vnni)`` (auto-P's cache key)."""
    name = cpuinfo_field(("model name", "Hardware", "CPU part"), cpuinfo) or platform.processor() or platform.machine()
    try:
        return f"{name} ({detect().value})"
    except ValueError:
        return name


def detect(machine: str | None = None, flags: frozenset[str] | None = None) -> Target:
    """This machine's target (or the one of ``machine`` / ``flags``, for tests)."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine in ("arm64", "aarch64", "armv8", "armv8l", "arm64-v8a"):
        return Target.ARM64
    if machine in ("x86_64", "amd64", "x64", "i386", "i686", "x86"):
        flags = cpu_flags() if flags is None else flags
        return Target.X86_VNNI if flags & set(SPECS[Target.X86_VNNI].isa_flags) else Target.X86_AVX2
    raise ValueError(f"no int8 export target for CPU architecture {machine!r}; pass --target "
                     f"{' / '.join(t.value for t in Target)} explicitly")


def resolve(target: str | Target) -> Target:
    """A ``Target`` from its name or ``"auto"`` (this machine's)."""
    if isinstance(target, Target):
        return target
    name = str(target).strip().lower()
    if name == AUTO:
        return detect()
    try:
        return Target(name)
    except ValueError:
        raise ValueError(f"unknown export target {target!r}; known: {', '.join(CHOICES)}") from None


def spec(target: str | Target) -> TargetSpec:
    return SPECS[resolve(target)]


def isa_summary(flags: frozenset[str] | None = None) -> dict:
    """What benchmarks record about this CPU: architecture, target, and the int8-relevant ISA flags."""
    flags = cpu_flags() if flags is None else flags
    keep = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
            "amx_bf16", "asimd", "asimddp", "i8mm")
    try:
        target = detect().value
    except ValueError:
        target = None
    return {"machine": platform.machine(), "target": target, "isa": [f for f in keep if f in flags]}


def arm_kernel_paths(hwcaps: tuple[int, int] | None = None) -> dict[str, str] | None:
    """The int8 GEMM kernel paths ONNX Runtime's MLAS and XNNPACK (LiteRT) pick on this arm64 CPU, from the
    HWCAP bits the process sees (what both libraries' cpuinfo reads): ``i8mm`` (smmla/ummla, ARMv8.6),
    ``dotprod`` (sdot/udot, ARMv8.2), else ``neon`` (smull/sadalp, ARMv8.0); ``None`` off arm64 Linux.
    Both ladders are the same: MLAS takes its Smmla dispatch with i8mm, its Sdot one with dotprod; XNNPACK its
    ``neoni8mm`` / ``neondot`` / ``neon-mlal`` qs8 microkernels."""
    if hwcaps is None:
        if platform.machine().lower() not in ("arm64", "aarch64") or not sys.platform.startswith("linux"):
            return None
        try:
            import ctypes
            getauxval = ctypes.CDLL(None).getauxval
            getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
            hwcaps = (getauxval(16), getauxval(26))  # AT_HWCAP, AT_HWCAP2
        except (OSError, AttributeError):
            return None
    hwcap, hwcap2 = hwcaps
    path = "i8mm" if hwcap2 >> 13 & 1 else "dotprod" if hwcap >> 20 & 1 else "neon"  # HWCAP2_I8MM, HWCAP_ASIMDDP
    return {"mlas": path, "xnnpack": path}


EMULATION_MARK = Path("/etc/baffle-edge-emulated")  # scripts/arm64-root writes it into its qemu-user root


def emulated(mark: Path = EMULATION_MARK, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """Why this CPU is an emulation (so its times are not device speed), or None: the arm64 root's mark,
    or an arm64 process that sees an x86 /proc/cpuinfo (qemu-user without a CPU view)."""
    if mark.is_file():
        return mark.read_text(errors="replace").strip() or "emulated"
    if platform.machine().lower() in ("arm64", "aarch64") and "vendor_id" in _read(cpuinfo):
        return "qemu-user: an arm64 process on an x86 host (/proc/cpuinfo is the host's)"
    return None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def bundle_target(meta: dict) -> Target | None:
    """The target a bundle was exported for; bundles from before targets existed: x86-avx2 when
    their int8 weights are 7-bit (the old default), else unknown (``None``)."""
    name = (meta.get("target") or {}).get("name")
    if name is not None:
        return Target(name)
    if (meta.get("calibration") or {}).get("reduce_range"):
        return Target.X86_AVX2
    return None


def check_bundle(meta: dict, runtime: str, *, here: Target | None = None) -> Target | None:
    """Warn (``TargetMismatchWarning``) when the int8 bundle ``meta`` was made for another target
    than this CPU's. Returns the bundle's target."""
    made_for = bundle_target(meta)
    try:
        here = detect() if here is None else here
    except ValueError:
        return made_for
    if made_for is None or made_for is here:
        return made_for
    if SPECS[here].reduce_range and not SPECS[made_for].reduce_range:
        cost = (f"its full-range int8 weights can saturate this CPU's int16 sums ({SPECS[here].accumulation}): "
                "losses may be wrong")
    elif SPECS[made_for].reduce_range and not SPECS[here].reduce_range:
        cost = "its 7-bit weights cost accuracy this CPU does not need to give up"
    else:
        cost = "its kernels' numerics are the same, but the bundle was not validated here"
    warnings.warn(f"{runtime}: bundle exported for target {made_for.value!r} runs on a {here.value!r} CPU; {cost}. "
                  f"Re-export it with `baffle-edge export --target {here.value}` (or auto).",
                  TargetMismatchWarning, stacklevel=3)
    return made_for
