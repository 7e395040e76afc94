"""Benchmark networks of the DDPNOpt paper (algorithm.md section 8.1) plus two speed models,
and the game suite's non-Markovian networks (:mod:`ocnopt.bench.game_models`).

Every model of this module is a plain ``nn.Sequential`` of standard modules only
(``nn.Linear``, ``nn.Conv2d``, activations, ``nn.MaxPool2d``, ``nn.Flatten``; no BatchNorm), so
each layer is a standard module the optimisers can recognise. Input ``(B, *input_shape)``,
output logits ``(B, num_classes)``. Weights use PyTorch's default initialisation, so a model is
deterministic given ``torch.manual_seed`` set before :func:`build_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from ocnopt.bench import game_models

__all__ = ["MODELS", "build_model", "count_parameters"]

#: One-line description of every model name accepted by :func:`build_model`.
MODELS: dict[str, str] = {
    "fcn": "DDPNOpt FCN: 5 Linear layers, width 10 (wine) / 32 (else); tanh on wine/digits, "
    "ReLU else",
    "cnn": "DDPNOpt CNN: 4 conv 3x3x32 (ReLU, max-pool after conv 2 and 4) + 2 Linear (64)",
    "mlp": "speed model: MLP in-256-256-out, ReLU (784-256-256-10 on 28x28)",
    "small-cnn": "speed model: conv16-pool-conv32-pool-Linear (3x3 convs, ReLU)",
    "deep-sigmoid": "vanishing-gradient model: 10 Linear layers of width 32 with Sigmoid",
    "resnet": "game suite: small ResNet, stem + 3 stages of BasicBlocks (8/16/32, BatchNorm, "
    "in-place residual sums, 1x1-conv downsample)",
    "inception": "game suite: small inception-style CNN, stem + 2 four-branch modules (8/16)",
}

ActivationSpec = str | Callable[[], nn.Module]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky-relu": nn.LeakyReLU,
}


def _activation(spec: ActivationSpec) -> Callable[[], nn.Module]:
    if callable(spec):
        return spec
    key = spec.lower().replace("_", "-")
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {spec!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[key]


def _norm(name: str | None) -> str | None:
    return None if name is None else name.strip().lower().replace("_", "-")


def _flat_input(input_shape: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """``([nn.Flatten()] if image input else [], number of input features)``."""
    return ([nn.Flatten()] if len(input_shape) > 1 else []), math.prod(input_shape)


def _image_input(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"{model} needs an image input_shape (C, H, W), got {input_shape}; "
            "load the dataset with flatten=False"
        )
    return input_shape  # type: ignore[return-value]


def _mlp(
    head: list[nn.Module], sizes: Sequence[int], act: Callable[[], nn.Module]
) -> nn.Sequential:
    """``head`` then Linear(sizes[i] -> sizes[i+1]) with ``act`` between (not after the last)."""
    layers = list(head)
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _fcn(
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str | None,
    *,
    width: int | None = None,
    depth: int = 5,
    activation: ActivationSpec | None = None,
) -> nn.Sequential:
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    width = width if width is not None else (10 if dataset == "wine" else 32)
    if activation is None:
        activation = "tanh" if dataset in ("wine", "digits") else "relu"
    head, n_in = _flat_input(input_shape)
    return _mlp(head, [n_in, *[width] * (depth - 1), num_classes], _activation(activation))


def _cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str | None,
    *,
    channels: int = 32,
    hidden: int = 64,
    activation: ActivationSpec = "relu",
) -> nn.Sequential:
    c, h, w = _image_input(input_shape, "cnn")
    act = _activation(activation)
    layers: list[nn.Module] = []
    c_in = c
    for i in range(4):
        layers += [nn.Conv2d(c_in, channels, kernel_size=3, padding=1), act()]
        c_in = channels
        if i in (1, 3):
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise ValueError(f"cnn needs images of at least 4x4, got {input_shape}")
    layers += [nn.Flatten(), nn.Linear(channels * h * w, hidden), act()]
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


def _speed_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str | None,
    *,
    hidden: Sequence[int] = (256, 256),
    activation: ActivationSpec = "relu",
) -> nn.Sequential:
    head, n_in = _flat_input(input_shape)
    return _mlp(head, [n_in, *hidden, num_classes], _activation(activation))


def _small_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str | None,
    *,
    channels: Sequence[int] = (16, 32),
    activation: ActivationSpec = "relu",
) -> nn.Sequential:
    c, h, w = _image_input(input_shape, "small-cnn")
    act = _activation(activation)
    layers: list[nn.Module] = []
    for c_out in channels:
        layers += [nn.Conv2d(c, c_out, kernel_size=3, padding=1), act(), nn.MaxPool2d(2)]
        c, h, w = c_out, h // 2, w // 2
    if h < 1 or w < 1:
        raise ValueError(f"small-cnn input {input_shape} too small for {len(channels)} poolings")
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    return nn.Sequential(*layers)


def _deep_sigmoid(
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str | None,
    *,
    depth: int = 10,
    width: int = 32,
    activation: ActivationSpec = "sigmoid",
) -> nn.Sequential:
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    head, n_in = _flat_input(input_shape)
    return _mlp(head, [n_in, *[width] * (depth - 1), num_classes], _activation(activation))


_BUILDERS: dict[str, Callable[..., nn.Sequential]] = {
    "fcn": _fcn,
    "cnn": _cnn,
    "mlp": _speed_mlp,
    "small-cnn": _small_cnn,
    "deep-sigmoid": _deep_sigmoid,
    "resnet": game_models.resnet,
    "inception": game_models.inception,
}


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    dataset: str | None = None,
    **overrides: object,
) -> nn.Sequential:
    """Build model ``name`` (see :data:`MODELS`) mapping ``(B, *input_shape)`` to ``(B, C)``.

    Args:
        name: model name (case and ``_``/``-`` insensitive).
        input_shape: per-sample shape, flat ``(D,)`` or image ``(C, H, W)``; image inputs are
            flattened first by the fully-connected models; conv models need ``(C, H, W)``.
        num_classes: number of output logits ``C``.
        dataset: dataset name; sets the fcn defaults (wine: width 10; wine/digits: tanh).
        **overrides: per model: fcn ``width, depth, activation``; cnn ``channels, hidden,
            activation``; mlp ``hidden`` (sequence), ``activation``; small-cnn ``channels``
            (sequence), ``activation``; deep-sigmoid ``depth, width, activation``; resnet
            ``widths`` (sequence), ``blocks``, ``stem_stride``; inception ``stem``, ``widths``.
            An activation is a name (relu, tanh, sigmoid, gelu, elu, softplus, leaky-relu) or a
            zero-argument callable returning a module. Unknown keys raise ``TypeError``.
    """
    key = _norm(name)
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be non-empty positive ints, got {input_shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _BUILDERS[key](shape, int(num_classes), _norm(dataset), **overrides)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (only ``requires_grad`` ones if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
