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

    def weight_grad(self, x: Tensor, g: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g2 = self._reweight(g, w).reshape(-1, g.shape[-1])
        a2 = self._cast(x).reshape(-1, x.shape[-1])
        # Bitwise autograd's weight gradient when w = 1 (tested), and contiguous: a transposed
        # result would make every later elementwise update several times slower.
        dw = g2.t().mm(a2)
        db = g2.sum(0) if self.has_bias else None
        return dw, db
