"""Tiny non-Markovian float64 networks, each with the :class:`Program` the game oracle reads.

Every ``forward`` is ordinary PyTorch (functional ops between modules, an in-place residual
addition, a concatenation); ``program()`` lists the same operations in the same order, written
by hand, so the oracle does not depend on how the library discovers the structure.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .game import Op, Program

__all__ = ["ResidualMLP", "TinyResCNN", "TwoBranchNet"]


def _add(a: Tensor, b: Tensor) -> Tensor:
    return a + b


class ResidualMLP(nn.Module):
    """``h0 = tanh(fc0 x)``, two residual blocks ``h + fc(tanh(fc h))``, and a long skip from
    ``h0`` to the head: ``head(tanh(h2 + h0))``.  Input ``(B, 4)``, 3 outputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc0, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(4, 5)
        self.fc3, self.fc4 = nn.Linear(5, 4), nn.Linear(4, 5)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.tanh(self.fc0(x))
        h1 = h0 + self.fc2(torch.tanh(self.fc1(h0)))
        h2 = h1 + self.fc4(torch.tanh(self.fc3(h1)))
        return self.head(torch.tanh(h2 + h0))

    def program(self) -> Program:
        return Program("x", (
            Op("a0", ("x",), layer=self.fc0), Op("h0", ("a0",), fn=torch.tanh),
            Op("a1", ("h0",), layer=self.fc1), Op("t1", ("a1",), fn=torch.tanh),
            Op("b1", ("t1",), layer=self.fc2), Op("h1", ("h0", "b1"), fn=_add),
            Op("a3", ("h1",), layer=self.fc3), Op("t3", ("a3",), fn=torch.tanh),
            Op("b3", ("t3",), layer=self.fc4), Op("h2", ("h1", "b3"), fn=_add),
            Op("s", ("h2", "h0"), fn=_add), Op("ts", ("s",), fn=torch.tanh),
            Op("out", ("ts",), layer=self.head),
        ), "out")


def _frozen_bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm in eval mode with random, frozen statistics and affine parameters."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.requires_grad_(False)
    return bn.eval()


class TinyResCNN(nn.Module):
    """A stem conv and one torchvision-style basic block with a downsampling skip.

    ``x1 = tanh(conv0 x)``; ``out = bn2(conv2(tanh(bn1(conv1 x1))))``; the skip is
    ``bn_d(conv_d x1)`` (1x1, stride 2); ``out += skip`` (in place); ``head(flatten(tanh out))``.
    The block convolutions have no bias; BatchNorms are frozen (the model is built in eval
    mode; keep it there).  Input ``(B, 1, 6, 6)``, 3 outputs.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv0, self.act0 = nn.Conv2d(1, 2, 3, padding=1), nn.Tanh()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
        self.bn1, self.act1 = _frozen_bn(3), nn.Tanh()
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), _frozen_bn(3)
        self.downsample = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2, bias=False), _frozen_bn(3))
        self.act2, self.flatten, self.head = nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act0(self.conv0(x))
        identity = x
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x)
        out += identity
        return self.head(self.flatten(self.act2(out)))

    def program(self) -> Program:
        ds_conv, ds_bn = self.downsample
        return Program("x", (
            Op("a0", ("x",), layer=self.conv0), Op("x1", ("a0",), fn=self.act0),
            Op("c1", ("x1",), layer=self.conv1), Op("n1", ("c1",), fn=self.bn1),
            Op("t1", ("n1",), fn=self.act1), Op("c2", ("t1",), layer=self.conv2),
            Op("n2", ("c2",), fn=self.bn2), Op("d", ("x1",), layer=ds_conv),
            Op("dn", ("d",), fn=ds_bn), Op("s", ("n2", "dn"), fn=_add),
            Op("o", ("s",), fn=self.act2), Op("f", ("o",), fn=self.flatten),
            Op("out", ("f",), layer=self.head),
        ), "out")


def _cat(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a, b], dim=1)


class TwoBranchNet(nn.Module):
    """Inception-like: ``h = tanh(fc0 x)`` read by two branches, ``a = fa2(tanh(fa1 h))`` and
    ``b = tanh(fb1 h)``, concatenated: ``head(tanh([a, b]))``.  Input ``(B, 4)``, 3 outputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc0 = nn.Linear(4, 5)
        self.fa1, self.fa2 = nn.Linear(5, 3), nn.Linear(3, 2)
        self.fb1, self.head = nn.Linear(5, 3), nn.Linear(5, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc0(x))
        a = self.fa2(torch.tanh(self.fa1(h)))
        b = torch.tanh(self.fb1(h))
        return self.head(torch.tanh(torch.cat([a, b], dim=1)))

    def program(self) -> Program:
        return Program("x", (
            Op("a0", ("x",), layer=self.fc0), Op("h", ("a0",), fn=torch.tanh),
            Op("p1", ("h",), layer=self.fa1), Op("q1", ("p1",), fn=torch.tanh),
            Op("a", ("q1",), layer=self.fa2), Op("p2", ("h",), layer=self.fb1),
            Op("b", ("p2",), fn=torch.tanh), Op("c", ("a", "b"), fn=_cat),
            Op("tc", ("c",), fn=torch.tanh), Op("out", ("tc",), layer=self.head),
        ), "out")
