"""Training losses of the benchmark: cross-entropy and the Max-Mahalanobis Center (MMC) loss.

A :class:`BenchLoss` maps the model output ``z`` (B, D) and integer labels ``y`` (B,) to the
batch-mean loss (scalar), and predicts classes from ``z``.

MMC (Pang, Xu, Zhu: "Max-Mahalanobis Linear Discriminant Analysis Networks", ICML 2018;
Pang, Xu, Dong, Du, Chen, Zhu: "Rethinking Softmax Cross-Entropy Loss for Adversarial
Robustness", ICLR 2020): the class centers ``mu_1 .. mu_C`` in R^D are fixed (not trained),
all of squared norm ``C_MM``, with the largest possible equal pairwise distance, i.e. pairwise
inner products ``-C_MM / (C - 1)`` (a regular simplex). The loss of a sample is
``||z - mu_y||^2 / 2`` and the prediction is the nearest center. DDPNOpt uses it in its
vanishing-gradient experiment because its Hessian in ``z`` is the identity (dense in the
parameters), unlike the nearly rank-deficient cross-entropy Hessian of a saturated network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LOSSES", "BenchLoss", "CrossEntropyLoss", "MMCLoss", "get_loss", "mmc_centers"]

#: Loss names accepted by :func:`get_loss`.
LOSSES = ("cross_entropy", "mmc")
#: Squared norm of the MMC centers (Pang et al. 2020 evaluate C_MM = 10 and 100).
MMC_SQUARED_NORM = 10.0


def mmc_centers(num_classes: int, dim: int, squared_norm: float = MMC_SQUARED_NORM,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """The Max-Mahalanobis centers (num_classes, dim) of Pang et al. (2018), Algorithm 1.

    Built row by row: ``mu_1 = e_1``; for ``i > 1`` the coordinates ``j < i`` solve
    ``<mu_i, mu_j> = -1 / (C - 1)`` given the earlier ones, and coordinate ``i`` completes the
    unit norm. This is the Cholesky factor of the simplex Gram matrix
    ``(1 + 1/(C-1)) I - 1/(C-1) 1 1^T``, which has rank ``C - 1`` (the last coordinate of the
    last center is 0). Finally every center is scaled to squared norm ``squared_norm``. Needs
    ``dim >= num_classes - 1``; coordinates past ``num_classes - 1`` are zero.
    """
    c = int(num_classes)
    if c < 2:
        raise ValueError(f"MMC needs at least 2 classes, got {num_classes}")
    if dim < c - 1:
        raise ValueError(f"MMC centers of {c} classes need dim >= {c - 1}, got {dim}")
    if not squared_norm > 0:
        raise ValueError(f"squared_norm must be > 0, got {squared_norm}")
    width = max(dim, c)
    mu = torch.zeros(c, width, dtype=torch.float64)
    mu[0, 0] = 1.0
    for i in range(1, c):
        for j in range(i):
            mu[i, j] = (-1.0 / (c - 1) - mu[i, :j] @ mu[j, :j]) / mu[j, j]
        if i < c - 1:  # the last center's own coordinate is 0 exactly (rank C - 1)
            mu[i, i] = math.sqrt(max(0.0, 1.0 - float(mu[i, :i] @ mu[i, :i])))
    return (mu[:, :dim] * math.sqrt(squared_norm)).to(dtype)


class BenchLoss:
    """Batch-mean training loss and prediction rule of a benchmark run."""

    name = "base"

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Batch-mean loss of outputs ``z`` (B, D) against labels ``y`` (B,)."""
        raise NotImplementedError

    def sum(self, z: Tensor, y: Tensor) -> Tensor:
        """Summed loss (for evaluation over several chunks)."""
        return self(z, y) * z.shape[0]

    def predict(self, z: Tensor) -> Tensor:
        """Predicted classes (B,) from ``z`` (B, D)."""
        raise NotImplementedError


class CrossEntropyLoss(BenchLoss):
    """Softmax cross-entropy on the logits; prediction = argmax."""

    name = "cross_entropy"

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(z, y)

    def predict(self, z: Tensor) -> Tensor:
        return z.argmax(dim=1)


class MMCLoss(BenchLoss):
    """``(1/B) sum_i ||z_i - mu_{y_i}||^2 / 2`` with fixed :func:`mmc_centers`; prediction =
    nearest center."""

    name = "mmc"

    def __init__(self, num_classes: int, dim: int, squared_norm: float = MMC_SQUARED_NORM
                 ) -> None:
        self.centers = mmc_centers(num_classes, dim, squared_norm, dtype=torch.float32)

    def _centers(self, z: Tensor) -> Tensor:
        if self.centers.device != z.device or self.centers.dtype != z.dtype:
            self.centers = self.centers.to(device=z.device, dtype=z.dtype)
        return self.centers

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (z - self._centers(z)[y]).pow(2).sum(dim=1).mean()

    def predict(self, z: Tensor) -> Tensor:
        return torch.cdist(z, self._centers(z)).argmin(dim=1)


def get_loss(name: str, num_classes: int, out_dim: int) -> BenchLoss:
    """The loss called ``name`` (:data:`LOSSES`) for ``num_classes`` classes and model outputs
    of width ``out_dim``."""
    if name == "cross_entropy":
        return CrossEntropyLoss()
    if name == "mmc":
        return MMCLoss(num_classes, out_dim)
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
