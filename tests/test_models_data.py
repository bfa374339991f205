import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from baffle_edge import data as data_module
from baffle_edge.data import batch_indices, load_dataset, partition, read_idx
from baffle_edge.models import ModelConfig, build_model, check_model
from baffle_edge.params import layout_of


@pytest.mark.parametrize("name,c,s,params", [("lenet", 1, 8, 26_730), ("lenet", 1, 28, 26_730),
                                              ("wrn-10-2", 3, 32, 302_778), ("mlp", 1, 8, 2_410),
                                              ("mobilenet", 1, 28, 116_938), ("mobilenet", 3, 32, 117_514)])
def test_models_shapes_and_sizes(name, c, s, params):
    m = build_model(ModelConfig(name, c, s, 10, norm="group" if name.startswith("wrn") else "none"))
    assert m(torch.zeros(2, c, s, s)).shape == (2, 10)
    layout = layout_of(m)
    assert layout.dim == params
    assert layout.specs[0].offset == 0 and layout.specs[-1].offset + layout.specs[-1].size == params


def test_seeded_init_is_reproducible():
    a = build_model(ModelConfig(), seed=3).state_dict()
    b = build_model(ModelConfig(), seed=3).state_dict()
    c = build_model(ModelConfig(), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batchnorm_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="BatchNorm"):
        check_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))


def test_unknown_model_and_dataset():
    with pytest.raises(ValueError, match="known"):
        build_model(ModelConfig(name="resnet50"))
    with pytest.raises(ValueError, match="known"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="did you mean fashion-mnist"):
        load_dataset("fashion_mnist")
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", "/nonexistent/folder")


def test_digits(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8) and len(digits.y_train) + len(digits.y_test) == 1797
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert set(np.unique(digits.y_test)) == set(range(10))


def test_partitions_cover_disjointly_and_are_seeded(digits):
    for scheme in ("iid", "dirichlet"):
        parts = partition(digits.y_train, 10, scheme=scheme, alpha=0.3, seed=1)
        allidx = np.concatenate(parts)
        assert len(allidx) == len(set(allidx.tolist())) == len(digits.y_train)
        assert all(len(p) >= 1 for p in parts)
        again = partition(digits.y_train, 10, scheme=scheme, alpha=0.3, seed=1)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    sizes = [len(p) for p in partition(digits.y_train, 10, scheme="dirichlet", alpha=0.1, seed=0)]
    assert max(sizes) > 2 * min(sizes)  # non-IID really is skewed
    with pytest.raises(ValueError):
        partition(digits.y_train, 10, scheme="zipf")


def test_batches_walk_epochs_without_repeats():
    idx = np.arange(100, 170)
    seen = np.concatenate([batch_indices(idx, r, 7, seed=0, client=2) for r in range(10)])
    assert sorted(seen.tolist()) == idx.tolist()  # 10 rounds x 7 = one epoch of 70, each once
    assert np.array_equal(batch_indices(idx, 4, 7, seed=0, client=2), batch_indices(idx, 4, 7, seed=0, client=2))
    assert len(batch_indices(np.arange(5), 0, 32, seed=0, client=0)) == 5


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def test_mnist_idx_loader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 5)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    d = load_dataset("mnist", tmp_path)
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(ValueError, match="expected 9 bytes"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="magic"):
        (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04")
        read_idx(tmp_path / "x")


def _idx_folder(folder, *, train=20, test=5, labels_to=10, test_labels=None):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", train), ("t10k", test)):
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        n_labels = test_labels if prefix == "t10k" and test_labels is not None else n
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, labels_to, n_labels))


def test_fashion_mnist_reads_its_default_folder_and_names_the_package_when_absent(tmp_path, monkeypatch):
    monkeypatch.setitem(data_module.DEFAULT_DIRS, "fashion-mnist",
                        (str(tmp_path / "absent"), "apt-get install dataset-fashion-mnist"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    _idx_folder(tmp_path)
    monkeypatch.setitem(data_module.DEFAULT_DIRS, "fashion-mnist", (str(tmp_path), "apt-get install x"))
    d = load_dataset("fashion-mnist")
    assert d.name == "fashion-mnist" and d.x_train.shape == (20, 1, 28, 28) and d.y_test.shape == (5,)
    assert np.allclose(d.x_train.mean(), 0, atol=1e-5)  # normalised with its own statistics


def test_idx_folders_that_do_not_pair_up_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", tmp_path)  # an empty folder names the missing files
    _idx_folder(tmp_path, test_labels=4)
    with pytest.raises(ValueError, match="do not pair up"):
        load_dataset("fashion-mnist", tmp_path)
    _idx_folder(tmp_path, labels_to=12)
    with pytest.raises(ValueError, match="labels are 0-9"):
        load_dataset("mnist", tmp_path)


def test_the_real_fashion_mnist():
    where = data_module.DEFAULT_DIRS["fashion-mnist"][0]
    if not os.path.isdir(where):
        if os.environ.get("CI"):
            pytest.fail(f"CI installs dataset-fashion-mnist (.ci/run); {where} is missing")
        pytest.skip(f"{where} missing: apt-get install dataset-fashion-mnist")
    d = load_dataset("fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_train).tolist() == [6000] * 10 and np.bincount(d.y_test).tolist() == [1000] * 10


def test_cifar_binary_and_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    rows = lambda n: np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 255, (n, 3072))], 1)  # noqa
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for i in range(1, 3):
        binary.joinpath(f"data_batch_{i}.bin").write_bytes(rows(4).astype(np.uint8).tobytes())
    binary.joinpath("test_batch.bin").write_bytes(rows(3).astype(np.uint8).tobytes())
    d = load_dataset("cifar10", tmp_path / "bin")
    assert d.x_train.shape == (8, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)

    py = tmp_path / "py" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        batch = {b"data": rng.integers(0, 255, (4, 3072)).astype(np.uint8), b"labels": [1, 2, 3, 4]}
        py.joinpath(name).write_bytes(pickle.dumps(batch))
    assert load_dataset("cifar10", tmp_path / "py").x_train.shape == (4, 3, 32, 32)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    py.joinpath("data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", tmp_path / "py")
