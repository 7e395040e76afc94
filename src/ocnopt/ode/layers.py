"""Time-dependent layers for vector fields ``F(t, x)``.

Each wraps ordinary ``nn.Linear`` / ``nn.Conv2d`` modules, so the Kronecker machinery sees plain
layers (the time enters as an extra input column/channel, or through small ``Linear(1, .)``
hyper-networks). ``t`` is a 0-dim tensor (the solver's time); it is cast to the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConcatConv2d", "ConcatLinear", "ConcatSquashLinear"]


class ConcatConv2d(nn.Module):
    """``Conv2d`` over ``[t, x]``: the time as an extra (first) constant input channel.

    Input ``x``: ``(B, C_in, H, W)``; the wrapped ``conv`` has ``C_in + 1`` input channels.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in + 1, dim_out, kernel_size, stride=stride, padding=padding,
                              bias=bias)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = torch.ones_like(x[:, :1]) * t.to(x.dtype)
        return self.conv(torch.cat([tt, x], dim=1))


class ConcatLinear(nn.Module):
    """``Linear`` over ``[t, x]``: the time as an extra (first) input feature.

    Input ``x``: ``(B, d_in)``; the wrapped ``linear`` has ``d_in + 1`` inputs.
    """

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out, bias=bias)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = torch.ones_like(x[:, :1]) * t.to(x.dtype)
        return self.linear(torch.cat([tt, x], dim=1))


class ConcatSquashLinear(nn.Module):
    """FFJORD's gated layer: ``linear(x) * sigmoid(gate(t)) + shift(t)``.

    ``gate`` is ``Linear(1, d_out)`` and ``shift`` ``Linear(1, d_out, bias=False)``; both read the
    time as a ``(1, 1)`` input, so their outputs broadcast over the batch. ``x``: ``(B, d_in)``.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.to(x.dtype).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)
