"""``nn.Linear``: ``h = a W^T + b`` over any number of leading dims (samples along batch_dim)."""

from __future__ import annotations

import torch
from torch import Tensor

from ocnopt.layers.base import LayerHelper

__all__ = ["LinearHelper"]


class LinearHelper(LayerHelper):
    def input_rows(self, x: Tensor) -> Tensor:
        a = self._cast(x).reshape(-1, x.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a

    def output_rows(self, g: Tensor) -> Tensor:
        return self._cast(g).reshape(-1, g.shape[-1])

    def input_moments(self, x: Tensor, row_weights: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor | int]:
        a = self._cast(x).reshape(-1, x.shape[-1])
        if row_weights is None:
            return a.t().mm(a), a.sum(0), a.shape[0]
        wa = a * row_weights.to(a.dtype)[:, None]
        return wa.t().mm(a), wa.sum(0), row_weights.sum()

    def output_moments(self, g: Tensor, row_weights: Tensor | None = None
                       ) -> tuple[Tensor, Tensor | int]:
        y = self._cast(g).reshape(-1, g.shape[-1])
        if row_weights is None:
            return y.t().mm(y), y.shape[0]
        return (y * row_weights.to(y.dtype)[:, None]).t().mm(y), row_weights.sum()

    def rows_per_sample(self, x: Tensor) -> int:
        return x[..., 0].numel() // max(x.shape[self.batch_dim], 1) if x.dim() > 1 else 1

    def weight_grad(self, x: Tensor, g: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g2 = self._reweight(g, w).reshape(-1, g.shape[-1])
        a2 = self._cast(x).reshape(-1, x.shape[-1])
        # Bitwise autograd's weight gradient when w = 1 (tested), and contiguous: a transposed
        # result would make every later elementwise update several times slower.
        dw = g2.t().mm(a2)
        db = g2.sum(0) if self.has_bias else None
        return dw, db
