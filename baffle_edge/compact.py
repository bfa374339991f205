"""The compact report: a ``ClientReport`` in a few bytes per loss (media type ``application/x-baffle-report``).

Each local step's losses travel as integers against one exact float64 reference: the step's base loss
``L(w)`` when the report has base losses (the forward scheme), else the step's first loss. With ``d_k =
L_k - ref`` and ``m = max_k |d_k|`` the encoder sends ``scale = m / Q`` (``Q = 2^(bits-1) - 1``, float64)
and ``q_k = round_half_even(d_k / scale)`` clipped to ``[-Q, Q]`` (all 0 when ``m = 0``); the decoder
returns ``L_k = ref + q_k * scale``. So every decoded loss is within ``scale / 2`` of the sent one
(plus float64 rounding of the sum) and base losses are exact. Fully specified in docs/gateway.md,
"Compact reports"; a device needs nothing else. Little-endian throughout:

    offset  size  field
    0       4     magic b"BFLR"
    4       1     format version (1)
    5       1     bits per value: 16 (int16) or 8 (int8)
    6       1     protocol version (protocol.PROTOCOL_VERSION)
    7       1     flags: bit 0 = the report has base losses (one per step); other bits 0
    8       4     u32 round
    12      4     u32 client
    16      4     u32 num_samples
    20      4     u32 n: values per step (K forward, 2K central)
    24      2     u16 S: local steps
    26      1     u8 length of model_version (ASCII)
    27      1     u8 length of runtime (UTF-8)
    28      8     f64 seconds
    36      ...   model_version bytes, then runtime bytes
    then S records of: f64 ref, f64 scale, n signed integers of ``bits`` bits

Anything else (another length, magic, version or flag, a NaN / infinite / negative scale, a
non-finite reference, an integer of -2^(bits-1)) is a ``ValueError`` naming what is wrong; the gateway
answers it 400 ``malformed``. Whether ``n`` and ``S`` fit the task is ``ClientReport.check_against``'s.
"""
from __future__ import annotations

import enum
import struct

import numpy as np

from .protocol import PROTOCOL_VERSION, ClientReport

MEDIA_TYPE = "application/x-baffle-report"
MAGIC = b"BFLR"
FORMAT_VERSION = 1
BITS = (16, 8)  # supported integer widths; the encoder's default is the first (measured: docs/gateway.md)
HEADER = struct.Struct("<4sBBBBIIIIHBBd")  # 36 bytes
STEP = struct.Struct("<dd")  # ref, scale
FLAG_BASE = 1
MAX_VALUES = 2**26  # n * S bound: far above any task (protocol.MAX_K = 1e6, central 2K)


class ReportEncoding(str, enum.Enum):
    """How a run's reports travel (``TrainConfig.report_encoding``)."""

    COMPACT = "compact"  # this module: 16-bit loss differences + exact references (default)
    JSON = "json"  # float64 losses (JSON or NPZ): exact, ~20 bytes per loss as JSON


def _round_half_even(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # IEEE round-half-to-even, as docs/gateway.md specifies


def encode(report: ClientReport, *, bits: int = BITS[0]) -> bytes:
    """The compact bytes of ``report`` (its losses quantized as the module docstring says)."""
    if bits not in BITS:
        raise ValueError(f"bits: expected one of {BITS}, got {bits!r}")
    steps = max(1, report.base_losses.size)
    if report.losses.size % steps:
        raise ValueError(f"losses: {report.losses.size} values do not split into {steps} steps")
    n = report.losses.size // steps
    has_base = report.base_losses.size > 0
    mv, rt = report.model_version.encode("ascii"), report.runtime.encode("utf-8")
    if len(mv) > 255 or len(rt) > 255:
        raise ValueError("model_version and runtime must be at most 255 bytes")
    qmax = 2 ** (bits - 1) - 1
    out = [HEADER.pack(MAGIC, FORMAT_VERSION, bits, PROTOCOL_VERSION, FLAG_BASE if has_base else 0,
                       report.round, report.client, report.num_samples, n, steps, len(mv), len(rt),
                       float(report.seconds)), mv, rt]
    for s in range(steps):
        block = report.losses[s * n:(s + 1) * n]
        ref = float(report.base_losses[s]) if has_base else (float(block[0]) if n else 0.0)
        d = block - ref
        m = float(np.max(np.abs(d))) if n else 0.0
        if not np.isfinite(m) or not np.isfinite(ref):
            raise ValueError(f"losses: step {s} has non-finite values")
        scale = m / qmax
        q = np.zeros(n) if m == 0.0 else np.clip(_round_half_even(d / scale), -qmax, qmax)
        out += [STEP.pack(ref, scale), q.astype(f"<i{bits // 8}").tobytes()]
    return b"".join(out)


def decode(data: bytes) -> ClientReport:
    """The ``ClientReport`` of compact bytes (losses dequantized); ValueError if anything is malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"compact report: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER.size:
        raise ValueError(f"compact report: truncated: {len(data)} bytes, the header alone is {HEADER.size}")
    (magic, fmt, bits, version, flags, round_, client, num_samples, n, steps, lmv, lrt,
     seconds) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"compact report: bad magic {magic!r} (expected {MAGIC!r})")
    if fmt != FORMAT_VERSION:
        raise ValueError(f"compact report: format version {fmt} is not supported (this build reads {FORMAT_VERSION})")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"version: protocol version {version} is not supported (this build speaks {PROTOCOL_VERSION})")
    if bits not in BITS:
        raise ValueError(f"compact report: bits {bits} is not one of {BITS}")
    if flags & ~FLAG_BASE:
        raise ValueError(f"compact report: unknown flag bits {flags:#04x}")
    if steps < 1 or n * steps > MAX_VALUES:
        raise ValueError(f"compact report: {steps} step(s) x {n} values is outside [1, {MAX_VALUES}] values")
    width = bits // 8
    want = HEADER.size + lmv + lrt + steps * (STEP.size + n * width)
    if len(data) != want:
        kind = "truncated" if len(data) < want else "oversized"
        raise ValueError(f"compact report: {kind}: {len(data)} bytes, the header announces {want} "
                         f"({steps} step(s) x {n} values of {bits} bits)")
    if not np.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds: must be finite and >= 0, got {seconds!r}")
    pos = HEADER.size
    try:
        mv = data[pos:pos + lmv].decode("ascii")
        rt = data[pos + lmv:pos + lmv + lrt].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"compact report: model_version / runtime are not text ({e})") from None
    pos += lmv + lrt
    qmax = 2 ** (bits - 1) - 1
    losses, base = np.empty(n * steps), np.empty(steps)
    for s in range(steps):
        ref, scale = STEP.unpack_from(data, pos)
        pos += STEP.size
        if not np.isfinite(ref):
            raise ValueError(f"compact report: step {s}: reference {ref!r} is not finite")
        if not (np.isfinite(scale) and scale >= 0):
            raise ValueError(f"compact report: step {s}: scale {scale!r} must be finite and >= 0")
        q = np.frombuffer(data, dtype=f"<i{width}", count=n, offset=pos)
        pos += n * width
        if n and int(np.abs(q.astype(np.int64)).max()) > qmax:
            raise ValueError(f"compact report: step {s}: integer {-(qmax + 1)} is reserved (values are in "
                             f"[-{qmax}, {qmax}])")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
            losses[s * n:(s + 1) * n] = ref + q.astype(np.float64) * scale
        base[s] = ref
    if not np.all(np.isfinite(losses)):
        raise ValueError("compact report: decoded losses are not finite (ref + q * scale overflows)")
    return ClientReport(round=round_, client=client, losses=losses, base_losses=base if flags & FLAG_BASE else [],
                        num_samples=num_samples, model_version=mv, runtime=rt, seconds=seconds)


def wire_size(report: ClientReport, *, bits: int = BITS[0]) -> int:
    """Bytes of ``encode(report, bits=bits)``, without encoding it."""
    steps = max(1, report.base_losses.size)
    return (HEADER.size + len(report.model_version.encode("ascii")) + len(report.runtime.encode("utf-8"))
            + steps * STEP.size + report.losses.size * (bits // 8))


def roundtrip(report: ClientReport, *, bits: int = BITS[0]) -> ClientReport:
    """What the server decodes of ``report`` sent compact (the simulation's reports, so that
    ``train`` and ``serve`` with compact devices compute the same)."""
    return decode(encode(report, bits=bits))


def bound(report: ClientReport, *, bits: int = BITS[0]) -> np.ndarray:
    """Per loss, the largest |decoded - sent| the encoding allows: scale / 2 of its step, plus
    float64 rounding of ``ref + q * scale``."""
    steps = max(1, report.base_losses.size)
    n = report.losses.size // steps
    out = np.empty(report.losses.size)
    for s in range(steps):
        block = report.losses[s * n:(s + 1) * n]
        ref = report.base_losses[s] if report.base_losses.size else (block[0] if n else 0.0)
        scale = np.max(np.abs(block - ref)) / (2 ** (bits - 1) - 1) if n else 0.0
        out[s * n:(s + 1) * n] = scale / 2 + 4 * np.finfo(float).eps * (abs(ref) + np.abs(block))
    return out
