"""``nn.Linear``: ``h = a W^T + b`` over any number of leading dims (samples along batch_dim)."""

from __future__ import annotations

from torch import Tensor

from ocnopt.layers.base import LayerHelper

__all__ = ["LinearHelper"]


class LinearHelper(LayerHelper):
    def input_moments(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        a = self._cast(x).reshape(-1, x.shape[-1])
        return a.t().mm(a), a.sum(0), a.shape[0]

    def output_moments(self, g: Tensor) -> tuple[Tensor, int]:
        y = self._cast(g).reshape(-1, g.shape[-1])
        return y.t().mm(y), y.shape[0]

    def weight_grad(self, x: Tensor, g: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g2 = self._reweight(g, w).reshape(-1, g.shape[-1])
        a2 = self._cast(x).reshape(-1, x.shape[-1])
        # Bitwise autograd's weight gradient when w = 1 (tested), and contiguous: a transposed
        # result would make every later elementwise update several times slower.
        dw = g2.t().mm(a2)
        db = g2.sum(0) if self.has_bias else None
        return dw, db
