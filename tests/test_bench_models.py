"""Tests for ocnopt.bench.models: architectures, shapes, layer counts, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ocnopt.bench.models import MODELS, build_model, count_parameters

_ALLOWED = (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.Flatten, nn.ReLU, nn.Tanh, nn.Sigmoid)

# (model, dataset, input_shape, num_classes): every model on the datasets it is meant for
CASES = [
    ("fcn", "wine", (13,), 3),
    ("fcn", "digits", (64,), 10),
    ("fcn", "mnist5k", (1, 28, 28), 10),
    ("fcn", "fashion-mnist", (784,), 10),
    ("cnn", "digits", (1, 8, 8), 10),
    ("cnn", "mnist", (1, 28, 28), 10),
    ("cnn", "fashion-mnist", (1, 28, 28), 10),
    ("mlp", "fashion-mnist", (1, 28, 28), 10),
    ("mlp", "digits", (64,), 10),
    ("small-cnn", "fashion-mnist", (1, 28, 28), 10),
    ("small-cnn", "digits", (1, 8, 8), 10),
    ("deep-sigmoid", "digits", (64,), 10),
    ("deep-sigmoid", "digits", (1, 8, 8), 10),
]


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name,dataset,shape,classes", CASES)
def test_builds_and_output_shape(name, dataset, shape, classes):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=classes, dataset=dataset)
    assert isinstance(model, nn.Sequential)
    assert all(isinstance(m, _ALLOWED) for m in model), model
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,dataset,shape,classes", CASES)
def test_deterministic_under_seed(name, dataset, shape, classes):
    def params(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        m = build_model(name, input_shape=shape, num_classes=classes, dataset=dataset)
        return [p.detach().clone() for p in m.parameters()]

    a, b, c = params(7), params(7), params(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    "dataset,shape,width,act",
    [("wine", (13,), 10, nn.Tanh), ("digits", (64,), 32, nn.Tanh),
     ("fashion-mnist", (1, 28, 28), 32, nn.ReLU), (None, (20,), 32, nn.ReLU)],
)
def test_fcn_architecture(dataset, shape, width, act):
    model = build_model("fcn", input_shape=shape, num_classes=5, dataset=dataset)
    lin = _linears(model)
    assert len(lin) == 5 and _count(model, nn.Conv2d) == 0
    assert [m.out_features for m in lin] == [width] * 4 + [5]
    assert lin[0].in_features == torch.Size(shape).numel()
    assert _count(model, act) == 4 and _count(model, nn.Sigmoid) == 0
    assert _count(model, nn.Flatten) == (1 if len(shape) > 1 else 0)
    assert isinstance(model[-1], nn.Linear)


def test_fcn_overrides():
    model = build_model("fcn", input_shape=(13,), num_classes=3, dataset="wine", width=7,
                        activation="sigmoid", depth=3)
    lin = _linears(model)
    assert [m.out_features for m in lin] == [7, 7, 3]
    assert _count(model, nn.Sigmoid) == 2 and _count(model, nn.Tanh) == 0
    m2 = build_model("fcn", input_shape=(4,), num_classes=2, activation=nn.GELU)
    assert _count(m2, nn.GELU) == 4


@pytest.mark.parametrize("shape,flat", [((1, 28, 28), 32 * 7 * 7), ((1, 8, 8), 32 * 2 * 2)])
def test_cnn_architecture(shape, flat):
    model = build_model("cnn", input_shape=shape, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.out_channels == 32
               for c in convs)
    assert convs[0].in_channels == 1
    lin = _linears(model)
    assert [(m.in_features, m.out_features) for m in lin] == [(flat, 64), (64, 10)]
    assert _count(model, nn.MaxPool2d) == 2 and _count(model, nn.ReLU) == 5
    kinds = [type(m) for m in model]
    assert kinds.index(nn.MaxPool2d) == 4  # after the 2nd conv (+ its ReLU)


def test_mlp_is_784_256_256_10():
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
    assert [(m.in_features, m.out_features) for m in _linears(model)] == [
        (784, 256), (256, 256), (256, 10)]
    assert _count(model, nn.ReLU) == 2
    assert count_parameters(model) == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


@pytest.mark.parametrize("shape,flat", [((1, 28, 28), 32 * 7 * 7), ((1, 8, 8), 32 * 2 * 2)])
def test_small_cnn_architecture(shape, flat):
    model = build_model("small-cnn", input_shape=shape, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 16), (16, 32)]
    assert [(m.in_features, m.out_features) for m in _linears(model)] == [(flat, 10)]
    assert _count(model, nn.MaxPool2d) == 2 and _count(model, nn.ReLU) == 2


def test_deep_sigmoid_architecture():
    model = build_model("deep_sigmoid", input_shape=(64,), num_classes=10, dataset="digits")
    lin = _linears(model)
    assert len(lin) == 10 and [m.out_features for m in lin] == [32] * 9 + [10]
    assert _count(model, nn.Sigmoid) == 9 and _count(model, nn.ReLU) == 0
    small = build_model("deep-sigmoid", input_shape=(64,), num_classes=10, depth=4, width=16)
    assert [m.out_features for m in _linears(small)] == [16, 16, 16, 10]


def test_count_parameters():
    model = build_model("fcn", input_shape=(13,), num_classes=3, dataset="wine")
    expected = (13 * 10 + 10) + 3 * (10 * 10 + 10) + (10 * 3 + 3)
    assert count_parameters(model) == expected
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == expected - 130
    assert count_parameters(model) == expected


def test_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vit", input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ValueError, match="flatten=False"):
        build_model("cnn", input_shape=(64,), num_classes=10)
    with pytest.raises(ValueError, match="at least 4x4"):
        build_model("cnn", input_shape=(1, 3, 3), num_classes=10)
    with pytest.raises(TypeError):
        build_model("mlp", input_shape=(4,), num_classes=2, widht=3)
    with pytest.raises(ValueError, match="activation"):
        build_model("fcn", input_shape=(4,), num_classes=2, activation="swishy")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("fcn", input_shape=(4,), num_classes=0)
    assert set(MODELS) == {"fcn", "cnn", "mlp", "small-cnn", "deep-sigmoid", "resnet",
                           "inception"}


def test_models_train_on_loaded_digits():
    """Integration: cnn and fcn accept the loader's output and a step reduces the loss."""
    from ocnopt.bench.data import load_dataset

    pytest.importorskip("sklearn")
    for name, flatten in (("cnn", False), ("fcn", True)):
        splits = load_dataset("digits", flatten=flatten, subset=200)
        torch.manual_seed(0)
        model = build_model(name, input_shape=splits.input_shape,
                            num_classes=splits.num_classes, dataset=splits.name)
        x, y = splits.train.tensors
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(20):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], (name, losses)
