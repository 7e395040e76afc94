"""Offline data for the Neural-ODE benchmarks (never downloads anything).

Every loader returns a :class:`~ocnopt.bench.data.DatasetSplits` with fixed splits that do not
depend on the training seed. The image sets of ConvODENet come from
:func:`ocnopt.bench.data.load_dataset` (``fashion-mnist``, ``mnist5k``).

Time series (:func:`load_timeseries`; sktime's bundled UEA files, ``pip install sktime``):

* ``japanese-vowels``: 270 train / 370 test sequences of 7..29 steps, 12 channels, 9 classes.
* ``basic-motions``: 40 / 40 sequences of 100 steps, 6 channels, 4 classes.

  Inputs ``(N, L_max, C + 1)``: the values, zero-padded after a sequence's end, and a last
  channel that is 1 at observed steps and 0 at padding (what :class:`ODERNNClassifier` reads,
  so padding is never integrated). ``drop`` > 0 marks that fraction of the observations
  missing (fixed seed): an irregularly sampled variant. Validation: a stratified 20% of the
  official training split (``SPLIT_SEED``); test: the official test split. Each channel is
  standardised with the mean/std of the observed training values.

Densities (:func:`load_density`; targets are all 0, ``num_classes`` 1):

* 2-D toys (FFJORD's): ``circles``, ``moons`` (scikit-learn generators), ``8gaussians``,
  ``checkerboard``; train/val/test drawn with distinct fixed seeds.
* ``breast-cancer``: scikit-learn's bundled UCI Wisconsin diagnostic table (569 x 30, all
  features >= 0), ``log1p`` then standardised with train statistics; stratified 60/20/20 by the
  diagnosis.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ocnopt.bench.data import (
    SPLIT_SEED,
    DatasetSplits,
    DatasetUnavailableError,
    _stratified_split,
)

__all__ = [
    "DENSITIES",
    "TIMESERIES",
    "load_density",
    "load_timeseries",
    "sample_density2d",
]

logger = logging.getLogger(__name__)

#: One-line description of every name accepted by :func:`load_timeseries`.
TIMESERIES: dict[str, str] = {
    "japanese-vowels": "UEA JapaneseVowels (sktime): 270/370, 12 channels x 7..29 steps, 9 classes",
    "basic-motions": "UEA BasicMotions (sktime): 40/40, 6 channels x 100 steps, 4 classes",
}

#: One-line description of every name accepted by :func:`load_density`.
DENSITIES: dict[str, str] = {
    "circles": "2-D two concentric circles (sklearn make_circles, factor 0.5, noise 0.08, x3)",
    "moons": "2-D two moons (sklearn make_moons, noise 0.1, x2 shifted)",
    "8gaussians": "2-D mixture of 8 Gaussians on a circle of radius 4 (std 0.5), / sqrt 2",
    "checkerboard": "2-D uniform checkerboard on [-4, 4]^2 (8 cells)",
    "breast-cancer": "sklearn UCI breast cancer table, 569 x 30 (log1p, standardised)",
}


def _canonical(name: str, table: dict[str, str]) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in table:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(table)}")
    return key


# --------------------------------------------------------------------------- time series


def _sktime_sequences(key: str, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """List of ``(L_i, C)`` float arrays and the string labels of one official split."""
    if importlib.util.find_spec("sktime") is None:
        raise DatasetUnavailableError(f"{key} needs sktime: `pip install sktime` or "
                                      "`pip install 'ocnopt[timeseries]'` (bundled data, no "
                                      "download)")
    from sktime.datasets import load_basic_motions, load_japanese_vowels

    if key == "basic-motions":
        x, y = load_basic_motions(split=split, return_type="numpy3D")
        return [a.T.astype(np.float64) for a in x], np.asarray(y)
    x, y = load_japanese_vowels(split=split, return_type="pd-multiindex")
    seqs = [g.to_numpy(dtype=np.float64) for _, g in x.groupby(level=0, sort=True)]
    return seqs, np.asarray(y)


def load_timeseries(name: str, *, drop: float = 0.0) -> DatasetSplits:
    """Load a bundled time-series classification set (see :data:`TIMESERIES`).

    Args:
        name: ``japanese-vowels`` or ``basic-motions``.
        drop: fraction of observations marked missing (``0 <= drop < 1``, fixed seed).

    Raises:
        DatasetUnavailableError: sktime is not installed.
        ValueError: unknown name or invalid ``drop``.
    """
    key = _canonical(name, TIMESERIES)
    if not (0 <= drop < 1):
        raise ValueError(f"invalid drop={drop!r}: allowed range is 0 <= drop < 1")
    train_seqs, train_y = _sktime_sequences(key, "train")
    test_seqs, test_y = _sktime_sequences(key, "test")
    seqs = train_seqs + test_seqs
    classes = np.unique(train_y)
    labels = np.searchsorted(classes, np.concatenate([train_y, test_y]))
    n_train = len(train_seqs)
    channels = seqs[0].shape[1]
    length = max(len(s) for s in seqs)
    observed = np.zeros((len(seqs), length), dtype=bool)
    for i, s in enumerate(seqs):
        observed[i, : len(s)] = True
    if drop > 0:
        rng = np.random.default_rng(SPLIT_SEED + 1)
        observed &= rng.random(observed.shape) >= drop
    train_idx, val_idx, _ = _stratified_split(labels[:n_train], val_frac=0.2, test_frac=0.0)
    values = np.zeros((len(seqs), length, channels))
    for i, s in enumerate(seqs):
        values[i, : len(s)] = s
    fit = values[train_idx][observed[train_idx]]  # observed training values, (n_obs, C)
    mean, std = fit.mean(0), fit.std(0)
    std[std < 1e-8] = 1.0
    values = np.where(observed[..., None], (values - mean) / std, 0.0)
    x = np.concatenate([values, observed[..., None].astype(np.float64)], axis=2)
    test_idx = np.arange(n_train, len(seqs))

    def take(i: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[i].astype(np.float32)),
                             torch.from_numpy(labels[i].astype(np.int64)))

    lengths = observed.sum(1)
    notes = (f"{len(seqs)} sequences, {channels} channels, observed steps per sequence "
             f"{lengths.min()}..{lengths.max()} (padded to {length}); last input channel = "
             "observation indicator; val = stratified 20% of the official train split.")
    if drop > 0:
        notes += f" {drop:.0%} of the observations dropped at random (fixed seed)."
    logger.info("loaded %s: train/val/test %d/%d/%d", key, len(train_idx), len(val_idx),
                len(test_idx))
    return DatasetSplits(name=key, train=take(train_idx), val=take(val_idx), test=take(test_idx),
                         input_shape=(length, channels + 1), num_classes=len(classes),
                         source="sktime bundled UEA .ts files", notes=notes)


# --------------------------------------------------------------------------- densities


def sample_density2d(name: str, n: int, seed: int) -> np.ndarray:
    """``n`` samples ``(n, 2)`` of a 2-D toy density (FFJORD's generators), float64."""
    key = _canonical(name, DENSITIES)
    rng = np.random.default_rng(seed)
    if key in ("circles", "moons"):
        from sklearn.datasets import make_circles, make_moons

        state = int(rng.integers(2**31))
        if key == "circles":
            return make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=state)[0] * 3
        return make_moons(n_samples=n, noise=0.1, random_state=state)[0] * 2 + [-1.0, -0.2]
    if key == "8gaussians":
        s = 1 / np.sqrt(2)
        centers = 4 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s),
                                (-s, -s)])
        points = rng.normal(size=(n, 2)) * 0.5 + centers[rng.integers(0, 8, n)]
        return points / np.sqrt(2)
    if key == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
        return np.stack([x1, x2], 1) * 2
    raise ValueError(f"{name!r} is not a 2-D density")


def load_density(name: str, *, n_train: int = 5000, n_val: int = 1000,
                 n_test: int = 2000) -> DatasetSplits:
    """Load a density-estimation set (see :data:`DENSITIES`); sizes apply to the 2-D toys."""
    key = _canonical(name, DENSITIES)
    if key == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        idx = _stratified_split(data.target)
        x = np.log1p(data.data)
        mean, std = x[idx[0]].mean(0), x[idx[0]].std(0)
        std[std < 1e-8] = 1.0
        x = (x - mean) / std
        parts = [x[i] for i in idx]
        source = "sklearn.datasets.load_breast_cancer (bundled)"
    else:
        for label, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if not (isinstance(n, int) and n >= 1):
                raise ValueError(f"invalid {label}={n!r}: allowed range is an int >= 1")
        parts = [sample_density2d(key, n, SPLIT_SEED + 100 * k)
                 for k, n in enumerate((n_train, n_val, n_test))]
        source = "generated (fixed seeds)"

    def take(x: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x.astype(np.float32)),
                             torch.zeros(len(x), dtype=torch.int64))

    return DatasetSplits(name=key, train=take(parts[0]), val=take(parts[1]), test=take(parts[2]),
                         input_shape=(parts[0].shape[1],), num_classes=1, source=source,
                         notes="density estimation: targets are all 0 (unused)")
