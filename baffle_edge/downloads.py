"""Lean downloads for int8 devices (torch-free; the gateway and the Python device import it).

An int8-step device runs integers, not float weights: for FedSGD (one local step) it needs the round's
**integer payload** — every tensor of the bundle's quantization table (``quant.QuantTable``, table
order) quantized from the global weights (``QTensor.quantize``), as little-endian int8 (weights) or
int32 (biases), concatenated — and the bundle's graphs. Both change a little every round, so both
travel as deflate streams (zlib, RFC 1950) against what the device already holds
(docs/gateway.md, "Lean downloads"):

- integers: ``zlib(delta)`` with ``delta[i] = (payload[i] - base[i]) mod 256`` byte by byte against the
  payload of the model version the device ran last (``?base=VERSION``), or ``zlib(payload)`` when the
  server no longer has that version;
- a bundle file: ``zlib`` with the same file of the generation the device holds (``?base=GEN``) as the
  preset dictionary, or plain ``zlib`` (``?z=1``).

The device checks the sha256 of what it decodes against the task offer (the integers' digest is bound
to the task's ``model_version`` by the server; bundle files against ``baffle.json``), exactly as it
checks downloaded float weights against ``model_version``.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Callable

import numpy as np

LEVEL = 9  # zlib level: the server compresses one payload per round, every device decodes it


def int_payload(table, flat: np.ndarray) -> bytes:
    """The integers of ``flat`` under ``table`` (a ``quant.QuantTable``), little-endian, table order."""
    return b"".join(np.ascontiguousarray(q, dtype=np.dtype(q.dtype).newbyteorder("<")).tobytes()
                    for q in table.quantize(flat))


def payload_size(table) -> int:
    return sum(t.size * np.dtype(t.dtype).itemsize for t in table.tensors)


def split_payload(table, payload: bytes) -> list[np.ndarray]:
    """The integer tensors of ``payload`` (``int_payload``'s layout); ValueError if the size is wrong."""
    if len(payload) != payload_size(table):
        raise ValueError(f"integers: {len(payload)} bytes, the bundle's quantization table needs {payload_size(table)}")
    out, pos = [], 0
    for t in table.tensors:
        dt = np.dtype(t.dtype).newbyteorder("<")
        n = t.size * dt.itemsize
        out.append(np.frombuffer(payload, dtype=dt, count=t.size, offset=pos).astype(t.dtype).reshape(t.shape))
        pos += n
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def byte_delta(new: bytes, base: bytes) -> bytes:
    """``(new - base) mod 256`` byte by byte (equal lengths)."""
    if len(new) != len(base):
        raise ValueError(f"delta: {len(new)} bytes against a base of {len(base)}")
    return (np.frombuffer(new, np.uint8) - np.frombuffer(base, np.uint8)).astype(np.uint8).tobytes()


def apply_delta(delta: bytes, base: bytes) -> bytes:
    """``(base + delta) mod 256`` byte by byte: the inverse of ``byte_delta``."""
    if len(delta) != len(base):
        raise ValueError(f"delta: {len(delta)} bytes against a base of {len(base)}")
    return (np.frombuffer(base, np.uint8) + np.frombuffer(delta, np.uint8)).astype(np.uint8).tobytes()


def deflate(data: bytes, zdict: bytes | None = None) -> bytes:
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, **({"zdict": zdict} if zdict else {}))
    return c.compress(data) + c.flush()


def inflate(data: bytes, *, size: int, zdict: bytes | None = None) -> bytes:
    """The ``size`` bytes a zlib stream holds; ValueError if it is corrupt, shorter, longer or trails bytes
    (never inflates more than ``size + 1`` bytes: a small body cannot become a huge buffer)."""
    d = zlib.decompressobj(**({"zdict": zdict} if zdict else {}))
    try:
        out = d.decompress(data, size + 1)
    except zlib.error as e:
        raise ValueError(f"download: not a valid zlib stream ({e})") from None
    if len(out) != size or not d.eof or d.unused_data or d.unconsumed_tail:
        raise ValueError(f"download: the zlib stream does not hold exactly {size} bytes")
    return out


def runtime_file_names(meta: dict, fmt: str) -> list[str]:
    """The bundle files a runtime of format ``fmt`` loads (besides ``baffle.json``): its format's graphs, without
    the standalone ``inference`` model when a ``train`` graph exists (docs and other formats are never loaded)."""
    files = meta["formats"][fmt]["files"]
    return [n for role, n in files.items() if role != "inference" or "train" not in files]


def read_runtime_files(bundle_dir, fmt: str) -> dict[str, bytes]:
    """``baffle.json`` and the files of ``bundle_dir`` that a runtime of format ``fmt`` loads (what a lean device
    fetches)."""
    import json
    from pathlib import Path
    bundle_dir = Path(bundle_dir)
    meta = json.loads((bundle_dir / "baffle.json").read_bytes())
    return {n: (bundle_dir / n).read_bytes() for n in ["baffle.json", *runtime_file_names(meta, fmt)]}


class LeanLedger:
    """What one lean int8 device downloads per round when it took part in the previous one (the simulation's
    ``bytes_down``; the gateway's lean device does exactly this, docs/gateway.md "Lean downloads"): the integers
    as a zlib delta against the last round's, and a re-exported bundle's files zlib'd against the held ones.
    ``state()`` / ``LeanLedger(**state)`` carry what the device holds across a resumed run."""

    def __init__(self, ints: bytes | None = None, files: dict[str, bytes] | None = None) -> None:
        self.ints = ints
        self.files = dict(files or {})

    def state(self) -> dict:
        return {"ints": self.ints, "files": dict(self.files)}

    def integers(self, payload: bytes) -> int:
        n = len(deflate(payload if self.ints is None or len(self.ints) != len(payload)
                        else byte_delta(payload, self.ints)))
        self.ints = payload
        return n

    def bundle(self, files: dict[str, bytes]) -> int:
        """Bytes of the bundle files (name -> content) that differ from the held ones, each zlib'd with the held
        file of its name as the dictionary; 0 when the device holds them all."""
        n = sum(len(deflate(data, self.files.get(name))) for name, data in files.items()
                if self.files.get(name) != data)
        self.files = dict(files)
        return n
