"""The layer-helper interface (pure tensor functions, no hooks)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

__all__ = ["LayerHelper", "helper_for"]


class LayerHelper(ABC):
    """Math of one parametric layer ``h = W a (+ b)`` seen as a Kronecker-factored stage.

    Conventions: ``x`` is the layer input as the module receives it (batch first, ``B`` samples),
    ``g`` the gradient of the *batch-mean* loss w.r.t. the layer output (same shape as the output).
    The direction matrix has shape ``(d_out, d_in [+1])`` with the bias as last column.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None

    @property
    def weight(self) -> Tensor:
        return self.module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias if self.has_bias else None  # type: ignore[return-value]

    @abstractmethod
    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``a`` of the input factor, shape ``(N, d_in [+1])`` (ones column if bias)."""

    @abstractmethod
    def output_rows(self, g: Tensor) -> Tensor:
        """Rows of the output-gradient factor, shape ``(N, d_out)`` (unscaled)."""

    @abstractmethod
    def weight_grad(self, x: Tensor, g: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``sum_i w_i * q_i`` as (weight-shaped, bias-shaped) tensors.

        ``q_i`` is sample i's share of the batch-mean gradient; ``w`` (shape ``(B,)``) re-weights
        samples (``None`` = all ones, i.e. the ordinary batch gradient). Never materialises
        per-sample gradients: one weight-gradient computation with re-weighted ``g``.
        """

    def to_matrix(self, dw: Tensor, db: Tensor | None) -> Tensor:
        """Weight/bias-shaped tensors -> direction matrix ``(d_out, d_in [+1])``."""
        m = dw.reshape(dw.shape[0], -1)
        if db is not None:
            m = torch.cat([m, db.reshape(-1, 1)], dim=1)
        return m

    def from_matrix(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`to_matrix`."""
        w_shape = self.weight.shape
        if self.has_bias:
            return m[:, :-1].reshape(w_shape), m[:, -1].reshape(-1)
        return m.reshape(w_shape), None

    @staticmethod
    def _reweight(g: Tensor, w: Tensor | None) -> Tensor:
        if w is None:
            return g
        return g * w.reshape((-1,) + (1,) * (g.dim() - 1)).to(g.dtype)


def helper_for(module: nn.Module) -> tuple[LayerHelper | None, str]:
    """Return ``(helper, "")`` for a supported module, else ``(None, reason)``."""
    from ocnopt.layers.conv2d import Conv2dHelper
    from ocnopt.layers.linear import LinearHelper

    if isinstance(module, nn.Linear):
        return LinearHelper(module), ""
    if isinstance(module, nn.Conv2d):
        reason = Conv2dHelper.unsupported_reason(module)
        if reason:
            return None, reason
        return Conv2dHelper(module), ""
    return None, f"{type(module).__name__} has no Kronecker helper"
