"""``nn.Conv2d`` (groups=1, zero padding): im2col factors, re-weighted weight gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt.layers.base import LayerHelper

__all__ = ["Conv2dHelper"]


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        # "same": symmetric only when the dilated kernel extent is odd
        out = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            extent = d * (k - 1)
            if extent % 2:
                return None
            out.append(extent // 2)
        return (out[0], out[1])
    return (int(pad[0]), int(pad[1]))


class Conv2dHelper(LayerHelper):
    """Kronecker factors over (sample, location) rows, KFC-style (Grosse & Martens, 2016)."""

    @staticmethod
    def unsupported_reason(module: nn.Conv2d) -> str:
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is Kronecker-factored)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros')"
        if _explicit_padding(module) is None:
            return "Conv2d with asymmetric padding='same'"
        return ""

    def __init__(self, module: nn.Conv2d, train_bias: bool = True, batch_dim: int = 0) -> None:
        super().__init__(module, train_bias, batch_dim)
        self._padding = _explicit_padding(module)

    def input_rows(self, x: Tensor) -> Tensor:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        cols = F.unfold(self._cast(x), m.kernel_size, dilation=m.dilation, padding=self._padding,
                        stride=m.stride)
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*L, C*kh*kw)
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a

    def output_rows(self, g: Tensor) -> Tensor:
        return self._cast(g).permute(0, 2, 3, 1).reshape(-1, g.shape[1])

    def input_moments(self, x: Tensor, row_weights: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor | int]:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        cols = F.unfold(self._cast(x), m.kernel_size, dilation=m.dilation, padding=self._padding,
                        stride=m.stride)  # (B, C*kh*kw, L): one row per (sample, location)
        a = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C*kh*kw, B*L), sample-major
        if row_weights is None:
            return a.mm(a.t()), a.sum(1), a.shape[1]
        wa = a * row_weights.to(a.dtype)
        return wa.mm(a.t()), wa.sum(1), row_weights.sum()

    def output_moments(self, g: Tensor, row_weights: Tensor | None = None
                       ) -> tuple[Tensor, Tensor | int]:
        g = self._cast(g)
        n: Tensor | int = g.shape[0] * g.shape[2] * g.shape[3]
        if row_weights is not None:
            n = row_weights.sum()
        if g.is_contiguous(memory_format=torch.channels_last):  # rows are a view
            y = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
            wy = y if row_weights is None else y * row_weights.to(y.dtype)[:, None]
            return wy.t().mm(y), n
        g3 = g.flatten(2)  # (B, C, H*W): sum of per-sample C x C products, no copy
        wg = g3 if row_weights is None else g3 * row_weights.to(g3.dtype).view(
            g.shape[0], 1, -1)
        return torch.matmul(wg, g3.transpose(1, 2)).sum(0), n

    def rows_per_sample(self, x: Tensor) -> int:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        pad = self._padding
        h, w = x.shape[-2:]
        out = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in zip(
            (h, w), pad, m.dilation, m.kernel_size, m.stride, strict=True)]
        return out[0] * out[1]

    def weight_grad(self, x: Tensor, g: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        gw = self._reweight(g, w)
        # The kernel autograd itself uses (input gradient masked off).
        _, dw, db = torch.ops.aten.convolution_backward(
            gw, self._cast(x), m.weight, [m.out_channels] if self.has_bias else None,
            list(m.stride), list(self._padding), list(m.dilation),
            False, [0, 0], 1, [False, True, self.has_bias],
        )
        return dw, (db if self.has_bias else None)
