"""A SuperNode's own data: what ``--node-config 'data=PATH'`` points at (``load_node_data``), its
normalisation with the server's statistics (``normalise``), and ``write_shards``: one data file
per node, the same partition as ``baffle-edge train``, for tests and for users who want to try a
federation before devices have their own data.

The formats are those ``data.py`` reads: an ``.npz`` with ``x`` (raw pixels, uint8,
(N, C, H, W) or (N, H, W)) and ``y`` (labels), or a folder with MNIST-style IDX files
``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (optionally ``.gz``). Pixels are raw:
the node normalises them with the server's normalisation (sent with each task), as an app would.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

IDX_IMAGES, IDX_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def load_node_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A SuperNode's own samples: raw pixels (N, C, H, W) and int64 labels (N,).

    ``path``: an ``.npz`` with arrays ``x`` (N, C, H, W) or (N, H, W) and ``y`` (N,) (read without
    pickle), or a folder with ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (IDX, as
    MNIST ships; ``.gz`` accepted)."""
    from ..data import read_idx
    p = Path(path)
    if p.is_dir():
        x, y = read_idx(p / IDX_IMAGES), read_idx(p / IDX_LABELS)
    elif p.is_file():
        try:
            with np.load(p, allow_pickle=False) as z:
                names = sorted(z.files)
                x, y = (z["x"], z["y"]) if {"x", "y"} <= set(names) else (None, None)
        except Exception as e:  # not a zip, truncated, object arrays (pickle refused)
            raise ValueError(f"{p}: not a readable .npz of x, y ({type(e).__name__}: {e})") from None
        if x is None:
            raise ValueError(f"{p}: expected arrays 'x' and 'y', found {names}")
    else:
        raise FileNotFoundError(f"node data {p} does not exist (give an .npz file or a folder of IDX files)")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{p}: x must be numeric (N, C, H, W) or (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x) or len(y) == 0:
        raise ValueError(f"{p}: y must be N >= 1 integer labels matching x; got {y.dtype} {y.shape} for x {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{p}: x contains NaN or infinite values")
    return x, y.astype(np.int64)


def normalise(x_raw: np.ndarray, norm: dict, *, channels: int, size: int, where: str = "node data") -> np.ndarray:
    """Raw pixels -> model inputs with the server's normalisation, computed exactly as
    ``data._normalise`` does (float32), so a node's inputs equal the in-process ones bit for bit."""
    if x_raw.shape[1:] != (channels, size, size):
        raise ValueError(f"{where}: images are {x_raw.shape[1:]} but the model expects ({channels}, {size}, {size})")
    mean = np.asarray(norm["mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(norm["std"], dtype=np.float32)[None, :, None, None]
    if mean.size != channels or std.size != channels:
        raise ValueError(f"normalisation has {mean.size} channel means for {channels}-channel images")
    x = x_raw.astype(np.float32) / float(norm["scale"])
    return ((x - mean) / std).astype(np.float32)


def raw_pixels(x: np.ndarray, mean, std, scale: float) -> np.ndarray:
    """Invert ``data._normalise`` (the datasets' pixels are integers) -> uint8."""
    m = np.asarray(mean, dtype=np.float64)[None, :, None, None]
    s = np.asarray(std, dtype=np.float64)[None, :, None, None]
    raw = (x.astype(np.float64) * s + m) * scale
    out = np.rint(raw)
    if np.abs(raw - out).max(initial=0) > 0.05 or out.min(initial=0) < 0 or out.max(initial=0) > 255:
        raise ValueError("these inputs do not come from 8-bit integer pixels")
    return out.astype(np.uint8)


def write_idx(path: Path, a: np.ndarray) -> None:
    """An unsigned-byte IDX file (the MNIST format ``data.read_idx`` reads)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    path.write_bytes(header + a.tobytes())


def write_shards(out: str | Path, *, dataset: str = "digits", data_dir: str | None = None, clients: int = 10,
                 partition: str = "iid", alpha: float = 0.5, seed: int = 0, fmt: str = "npz",
                 force: bool = False) -> list[Path]:
    """One data file per client (``client-C.npz`` or IDX folder ``client-C/``): the training samples
    ``baffle-edge train`` gives client C with the same dataset, clients, partition and seed, as raw
    8-bit pixels in partition order. A SuperNode started with ``data=`` one of them and
    ``partition-id=C`` trains exactly like client C in-process."""
    from ..data import load_dataset
    from ..data import partition as split
    if fmt not in ("npz", "idx"):
        raise ValueError(f"format must be npz or idx, got {fmt!r}")
    d = Path(out)
    names = [d / (f"client-{c}.npz" if fmt == "npz" else f"client-{c}") for c in range(clients)]
    if any(p.exists() for p in names) and not force:
        raise FileExistsError(f"shards exist in {d}; pass --force to replace them")
    data = load_dataset(dataset, data_dir, seed=seed)
    parts = split(data.y_train, clients, scheme=partition, alpha=alpha, seed=seed)
    d.mkdir(parents=True, exist_ok=True)
    for c, (p, idx) in enumerate(zip(names, parts)):
        x = raw_pixels(data.x_train[idx], data.mean, data.std, data.scale)
        y = data.y_train[idx]
        if fmt == "npz":
            np.savez_compressed(p, x=x, y=y)
        else:
            p.mkdir(exist_ok=True)
            write_idx(p / IDX_IMAGES, x[:, 0] if x.shape[1] == 1 else x)
            write_idx(p / IDX_LABELS, y.astype(np.uint8))
    return names
