"""Tests of the bench adapter of vanilla DDP (ocnopt.bench.ddp_baseline)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt.bench.ddp_baseline import BenchVanillaDDP, recover_targets
from ocnopt.bench.optimizers import OPTIMIZERS, train_step
from ocnopt.reference import VanillaDDP


def _tiny() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))


def _batch(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(b, 4, generator=g), torch.randint(0, 3, (b,), generator=g)


def test_recover_targets() -> None:
    z = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0])
    loss = F.cross_entropy(z, y)
    (g,) = torch.autograd.grad(loss, z)
    kind, rec = recover_targets(z, g, loss)
    assert kind == "cross_entropy" and torch.equal(rec, y)
    t = torch.randn(5, 3)
    loss = F.mse_loss(z, t)
    (g,) = torch.autograd.grad(loss, z)
    kind, rec = recover_targets(z, g, loss)
    assert kind == "mse"
    torch.testing.assert_close(rec, t)
    loss = F.cross_entropy(z, y, label_smoothing=0.2)
    (g,) = torch.autograd.grad(loss, z)
    with pytest.raises(ValueError, match="could not identify"):
        recover_targets(z, g, loss)


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_one_step_matches_the_float64_reference(kind: str) -> None:
    model = _tiny()
    x, y = _batch()
    if kind == "mse":
        y = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(6))
    loss_fn = F.cross_entropy if kind == "cross_entropy" else F.mse_loss
    ref = copy.deepcopy(model).double()
    VanillaDDP(ref, lr=0.3, weight_decay=1e-3, loss=kind).step(
        inputs=x.double(), targets=y.double() if kind == "mse" else y)
    init = [p.detach().clone() for p in model.parameters()]
    opt = BenchVanillaDDP(model, lr=0.3, weight_decay=1e-3)
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    loss = opt.step(lambda: loss_fn(model(x), y))
    torch.testing.assert_close(loss, loss_fn(_tiny()(x), y))
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
    for p, q, p0 in zip(model.parameters(), ref.parameters(), init, strict=True):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q.float())
        assert not torch.equal(p, p0)


def test_registry_entry_trains_through_train_step() -> None:
    spec = OPTIMIZERS["vanilla-ddp"]
    assert spec.mode == "closure" and spec.family == "optimal-control" and spec.tiny_only
    model = _tiny()
    x, y = _batch()
    opt = spec.build(model, lr=0.3)
    losses = [train_step(opt, spec, model, x, y, F.cross_entropy).item() for _ in range(4)]
    assert losses[-1] < losses[0], losses
