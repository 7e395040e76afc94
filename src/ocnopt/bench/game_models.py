"""Non-Markovian benchmark networks for the game-theoretic feedback (``--suite game``).

* ``resnet``: a small CIFAR-style ResNet: a 3x3 stem conv (stride 2) + BatchNorm + ReLU, then
  three stages of torchvision-style BasicBlocks (two 3x3 convs with BatchNorm, in-place ReLU,
  in-place ``out += identity``; a 1x1-conv+BatchNorm downsample where the shape changes),
  global average pooling and a Linear head.
* ``inception``: a small inception-style CNN: a stem conv (stride 2), two inception modules
  (four parallel branches: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; 3x3 max-pool -> 1x1,
  concatenated), a max-pool between them, global average pooling and a Linear head.  Every
  branch conv is torchvision's ``BasicConv2d`` (conv without bias, BatchNorm, ReLU).

In both, several convolutions read the same tensor (the block input: conv1 and the
downsample conv; the module input: three branch heads), and skips or finished branches wait
across layers: the structures ``markov``, ``nash`` and ``cooperative`` differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "Inception", "resnet", "inception"]


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (expansion 1)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """torchvision's ``BasicConv2d``: conv (no bias), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Four parallel branches concatenated along channels (``4 * width`` outputs)."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn(cin, width, 1)
        self.branch3 = nn.Sequential(_conv_bn(cin, width, 1), _conv_bn(width, width, 3))
        self.branch5 = nn.Sequential(_conv_bn(cin, width, 1), _conv_bn(width, width, 3),
                                     _conv_bn(width, width, 3))
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.branch_pool = _conv_bn(cin, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x),
                          self.branch_pool(self.pool(x))], dim=1)


def _image(input_shape: tuple[int, ...], model: str) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs an image input_shape (C, H, W), got {input_shape}")
    return input_shape[0]


def resnet(input_shape: tuple[int, ...], num_classes: int, dataset: str | None = None, *,
           widths: Sequence[int] = (8, 16, 32), blocks: int = 1,
           stem_stride: int = 2) -> nn.Sequential:
    """Stem (3x3 conv with ``stem_stride``) + ``len(widths)`` stages of ``blocks`` BasicBlocks
    (stride 2 from stage 2 on); on 28x28 inputs the stages see 14x14, 7x7 and 4x4 maps."""
    if blocks < 1 or not widths:
        raise ValueError(f"resnet needs blocks >= 1 and at least one stage, got {blocks}, "
                         f"{widths}")
    c = _image(input_shape, "resnet")
    layers: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, stem_stride, 1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    cin = widths[0]
    for stage, width in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(cin, width, 2 if stage > 0 and b == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def inception(input_shape: tuple[int, ...], num_classes: int, dataset: str | None = None, *,
              stem: int = 16, widths: Sequence[int] = (8, 16)) -> nn.Sequential:
    """Stem conv (stride 2), then one inception module per entry of ``widths`` (max-pool
    between); on 28x28 inputs the modules see 14x14 and 7x7 maps."""
    if not widths:
        raise ValueError("inception needs at least one module")
    c = _image(input_shape, "inception")
    layers: list[nn.Module] = [nn.Conv2d(c, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem),
                               nn.ReLU(inplace=True)]
    cin = stem
    for i, width in enumerate(widths):
        if i:
            layers.append(nn.MaxPool2d(2))
        layers.append(Inception(cin, width))
        cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
