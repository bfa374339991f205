"""Datasets and federated partitions.

``digits`` (scikit-learn's 8x8 handwritten digits) is embedded and needs no download.
``fashion-mnist`` (Zalando's 60,000 + 10,000 28x28 product images, IDX files) loads from Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) unless ``data_dir`` says
otherwise; MNIST (IDX files) and CIFAR-10 (binary or python batches) load from a local ``data_dir``.
Every random choice (test split, partition, per-client batch order) flows from an explicit
seed, and the batch a client uses in a round is a pure function of (seed, client, round), so
runs, resumed runs and verification runs all see the same batches.
"""
from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")
# where a dataset lives when --data-dir is not given, and what installs it there
DEFAULT_DIRS = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist", "apt-get install dataset-fashion-mnist")}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32 (N, C, H, W), normalised
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]  # per-channel normalisation applied: x = (raw/scale - mean) / std
    std: tuple[float, ...]
    scale: float  # raw pixel range divisor (digits 16, images 255)

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]


def _normalise(name, xtr, ytr, xte, yte, scale, num_classes=10) -> Dataset:
    xtr = xtr.astype(np.float32) / scale
    xte = xte.astype(np.float32) / scale
    mean = xtr.mean(axis=(0, 2, 3))
    std = xtr.std(axis=(0, 2, 3)) + 1e-8
    norm = lambda x: ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)  # noqa: E731
    return Dataset(name, norm(xtr), ytr.astype(np.int64), norm(xte), yte.astype(np.int64), num_classes,
                   tuple(float(m) for m in mean), tuple(float(s) for s in std), float(scale))


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits (1,797 images, 8x8, 10 classes) with a seeded stratified split."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = d.images.reshape(-1, 1, 8, 8)
    y = d.target
    rng = np.random.default_rng([seed, 0xD161])
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, int(round(len(idx) * test_fraction)), replace=False)] = True
    return _normalise("digits", x[~test], y[~test], x[test], y[test], 16.0)


def _open_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if candidate.suffix == ".gz" else raw
    raise FileNotFoundError(f"missing {path} (or {path.name}.gz)")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format): magic 0x00000800 | dtype | ndim, big-endian dims."""
    raw = _open_maybe_gz(Path(path))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    body = 4 + 4 * ndim
    if len(raw) - body != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {tuple(dims)}, "
                         f"found {len(raw) - body}")
    return np.frombuffer(raw, dtype=np.uint8, offset=body).reshape(dims)


def _idx_split(d: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(d / f"{prefix}-images-idx3-ubyte"), read_idx(d / f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{d}: {prefix} images {images.shape} and labels {labels.shape} do not pair up "
                         "(expected (N, H, W) images and N labels)")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{d}: {prefix} labels reach {int(labels.max())}; MNIST-format labels are 0-9")
    return images[:, None], labels


def load_mnist(data_dir: Path, name: str = "mnist") -> Dataset:
    """MNIST-format IDX files (``train-*`` and ``t10k-*``, plain or ``.gz``): MNIST or Fashion-MNIST."""
    d = Path(data_dir)
    missing = [f for f in IDX_FILES if not (d / f).exists() and not (d / f"{f}.gz").exists()]
    if missing:
        raise FileNotFoundError(f"{name}: {d} lacks {', '.join(missing)} (IDX files, plain or .gz)")
    (xtr, ytr), (xte, yte) = _idx_split(d, "train"), _idx_split(d, "t10k")
    return _normalise(name, xtr, ytr, xte, yte, 255.0)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR python batches (dicts of lists and numpy arrays) and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def _cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size % 3073:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 3073 (label + 32x32x3 image)")
    rows = raw.reshape(-1, 3073)
    return rows[:, 1:].reshape(-1, 3, 32, 32), rows[:, 0].astype(np.int64)


def load_cifar10(data_dir: Path) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-bin`` (``data_batch_N.bin``) or ``cifar-10-batches-py``."""
    d = Path(data_dir)
    for sub, pattern, test_name, reader in (
        ("cifar-10-batches-bin", "data_batch_{}.bin", "test_batch.bin", _cifar_binary_batch),
        ("cifar-10-batches-py", "data_batch_{}", "test_batch", _cifar_python_batch),
    ):
        root = d / sub if (d / sub).is_dir() else d
        if (root / pattern.format(1)).exists():
            train = [reader(p) for i in range(1, 6) if (p := root / pattern.format(i)).exists()]
            xte, yte = reader(root / test_name)
            return _normalise("cifar10", np.concatenate([t[0] for t in train]),
                              np.concatenate([t[1] for t in train]), xte, yte, 255.0)
    raise FileNotFoundError(f"no CIFAR-10 batches in {d} (expected cifar-10-batches-bin/data_batch_1.bin "
                            "or cifar-10-batches-py/data_batch_1)")


def data_dir_for(name: str, data_dir: str | Path | None) -> Path:
    """The folder dataset ``name`` loads from: ``data_dir``, or the dataset's default location (a clear
    error naming what installs it when that is absent)."""
    if data_dir is None:
        if name not in DEFAULT_DIRS:
            raise ValueError(f"dataset {name!r} needs --data-dir pointing at its local files (no download)")
        where, install = DEFAULT_DIRS[name]
        if not Path(where).is_dir():
            raise FileNotFoundError(f"dataset {name!r} is not installed at {where}: install it with `{install}` "
                                    "(Debian), or pass --data-dir with its IDX files")
        return Path(where)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist or is not a folder")
    return Path(data_dir)


def load_dataset(name: str, data_dir: str | Path | None = None, *, seed: int = 0) -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name not in DATASETS:
        from .errors import did_you_mean
        raise ValueError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known: {', '.join(DATASETS)}")
    d = data_dir_for(name, data_dir)
    return load_cifar10(d) if name == "cifar10" else load_mnist(d, name)


def partition(labels: np.ndarray, clients: int, *, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[np.ndarray]:
    """Split sample indices among clients: ``iid`` (shuffled, equal shares) or ``dirichlet``
    (per class, proportions ~ Dir(alpha); smaller alpha = more skew). Every client gets >= 1 sample."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if clients > len(labels):
        raise ValueError(f"{clients} clients but only {len(labels)} training samples")
    rng = np.random.default_rng([seed, 0x9A27])
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), clients)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition {scheme!r}; known: iid, dirichlet")
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    shares: list[list[int]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
        for client, part in enumerate(np.split(idx, cuts)):
            shares[client].extend(part.tolist())
    for client in range(clients):  # an empty client would stall every round: lend it one sample
        if not shares[client]:
            donor = max(range(clients), key=lambda j: len(shares[j]))
            shares[client].append(shares[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]


def batch_indices(client_indices: np.ndarray, round_: int, batch_size: int, *, seed: int,
                  client: int) -> np.ndarray:
    """The samples client ``client`` uses in round ``round_``.

    Each client walks through its data in epochs, each a fresh permutation seeded by
    (seed, client, epoch); round r takes positions [r*B, r*B + B) of that endless walk
    (a batch is shorter than B only if the client has fewer than B samples)."""
    n = len(client_indices)
    b = min(batch_size, n)
    start = round_ * b
    out = []
    while len(out) < b:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, 0xBA7C, client, epoch]).permutation(n)
        out.extend(perm[pos: pos + b - len(out)].tolist())
    return client_indices[np.asarray(out, dtype=np.int64)]
