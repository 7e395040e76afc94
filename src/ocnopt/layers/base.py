"""The layer-helper interface (pure tensor functions, no hooks)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["LayerHelper", "helper_for"]


class LayerHelper(ABC):
    """Math of one parametric layer ``h = W a (+ b)`` seen as a Kronecker-factored stage.

    Conventions: ``x`` is the layer input as the module receives it (``B`` samples along
    ``batch_dim``), ``g`` the gradient of the *batch-mean* loss w.r.t. the layer output (same
    shape as the output). The direction matrix has shape ``(d_out, d_in [+1])`` with the bias as
    last column. ``has_bias`` means "the bias is optimised" (a frozen bias, or one left out of
    the optimizer's params, is a constant of the layer: no ones column, never updated). All
    arithmetic runs in the weight's dtype (inputs and gradients are cast, e.g. under autocast).
    """

    def __init__(self, module: nn.Module, train_bias: bool = True, batch_dim: int = 0) -> None:
        self.module = module
        self.has_bias = train_bias and getattr(module, "bias", None) is not None
        self.batch_dim = batch_dim

    @property
    def weight(self) -> Tensor:
        return self.module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias if self.has_bias else None  # type: ignore[return-value]

    @abstractmethod
    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``a`` of the input factor, ``(N, d_in [+1])`` sample-major (ones column for an
        optimised bias): the per-sample structure, for per-sample products."""

    @abstractmethod
    def output_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows ``(N, d_out)``, sample-major, in the same order as the input
        rows."""

    @abstractmethod
    def input_moments(self, x: Tensor, row_weights: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor | int]:
        """``(X^T W X, X^T w, sum w)`` of the input rows ``X`` ``(N, d_in)`` of one call, with
        optional per-row weights ``w`` ``(N,)`` (rows ordered sample-major); ``W = diag(w)``."""

    @abstractmethod
    def output_moments(self, g: Tensor, row_weights: Tensor | None = None
                       ) -> tuple[Tensor, Tensor | int]:
        """``(Y^T W Y, sum w)`` of the output-gradient rows ``Y`` ``(N, d_out)`` of one call."""

    @abstractmethod
    def rows_per_sample(self, x: Tensor) -> int:
        """Number of factor rows (locations) per sample of the layer input ``x``."""

    def input_outer(self, x: Tensor, row_weights: Tensor | None = None
                    ) -> tuple[Tensor, Tensor | int]:
        """``(sum_r w_r a_r a_r^T, sum_r w_r)`` over the rows ``a_r`` of one call, with the ones
        column of an optimised bias (assembled as a block, the rows are never copied)."""
        xtx, colsum, n = self.input_moments(x, row_weights)
        if not self.has_bias:
            return xtx, n
        d = xtx.shape[0]
        out = xtx.new_empty(d + 1, d + 1)
        out[:d, :d] = xtx
        out[:d, d] = colsum
        out[d, :d] = colsum
        out[d, d] = n
        return out, n

    def input_factor(self, xs: Sequence[Tensor]) -> tuple[Tensor, int]:
        """Input factor ``A = mean_rows a a^T`` over the calls ``xs`` and the number of rows."""
        total, n = self.input_outer(xs[0])
        for x in xs[1:]:
            s, m = self.input_outer(x)
            total, n = total + s, n + m
        return total.div_(n), int(n)

    def output_factor(self, gs: Sequence[Tensor], batch: int) -> Tensor:
        """Output factor ``G = mean_rows (B g)(B g)^T`` over the calls' gradients ``gs`` of the
        batch-MEAN loss (``B g`` is the per-sample gradient)."""
        gtg, n = self.output_moments(gs[0])
        for g in gs[1:]:
            p, m = self.output_moments(g)
            gtg, n = gtg + p, n + m
        return gtg.mul_(batch * batch / n)

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

    def batch_size(self, x: Tensor) -> int:
        """Number of samples ``B`` in the layer input ``x``."""
        return x.shape[self.batch_dim]

    def _cast(self, t: Tensor) -> Tensor:
        dtype = self.module.weight.dtype  # type: ignore[union-attr]
        return t if t.dtype == dtype else t.to(dtype)

    def _reweight(self, g: Tensor, w: Tensor | None) -> Tensor:
        g = self._cast(g)
        if w is None:
            return g
        shape = [1] * g.dim()
        shape[self.batch_dim] = -1
        w = w.reshape(shape)
        return g * (w if w.dtype == g.dtype else w.to(g.dtype))


def helper_for(
    module: nn.Module, train_bias: bool = True, batch_dim: int = 0
) -> tuple[LayerHelper | None, str]:
    """Return ``(helper, "")`` for a supported module, else ``(None, reason)``."""
    from ocnopt.layers.conv2d import Conv2dHelper
    from ocnopt.layers.linear import LinearHelper

    if isinstance(module, nn.Linear):
        return LinearHelper(module, train_bias, batch_dim), ""
    if isinstance(module, nn.Conv2d):
        reason = Conv2dHelper.unsupported_reason(module)
        if not reason and batch_dim != 0:
            reason = "Conv2d inputs are (N, C, H, W): batch_dim must be 0"
        if reason:
            return None, reason
        return Conv2dHelper(module, train_bias, batch_dim), ""
    return None, f"{type(module).__name__} has no Kronecker helper"
