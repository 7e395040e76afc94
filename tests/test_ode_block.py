"""ODEBlock: adjoint gradients, counters, reverse time, dL/dt1, masks, time-dependent layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchdiffeq")
from torchdiffeq import odeint  # noqa: E402

from ocnopt.ode import (  # noqa: E402
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashLinear,
    ODEBlock,
    find_ode_blocks,
)

D = torch.float64


class TanhField(nn.Module):
    def __init__(self, dim: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.l1 = ConcatLinear(dim, hidden)
        self.l2 = ConcatLinear(hidden, dim)

    def forward(self, t, x):
        return self.l2(t, torch.tanh(self.l1(t, x)))


def _field(seed: int = 0) -> TanhField:
    torch.manual_seed(seed)
    return TanhField().to(D)


def test_adjoint_gradients_equal_direct_backprop_through_fixed_step_solver():
    f = _field()
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    target = torch.randn(4, 3, dtype=D)
    # direct: backprop through torchdiffeq's fixed-step rk4 (fine grid: discretisation ~1e-10)
    y = odeint(f, x, torch.tensor([0.0, 1.0], dtype=D), method="rk4",
               options={"step_size": 1 / 128})[-1]
    direct = torch.autograd.grad((y - target).square().sum(), [x, *f.parameters()])
    for method, kw in (("rk4", {"options": {"step_size": 1 / 128}}),
                       ("dopri5", {"rtol": 1e-10, "atol": 1e-10})):
        block = ODEBlock(f, t1=1.0, method=method, **kw)
        out = block(x)
        adj = torch.autograd.grad((out - target).square().sum(), [x, *f.parameters()])
        for a, d in zip(adj, direct, strict=True):
            torch.testing.assert_close(a, d, rtol=1e-7, atol=1e-9)


def test_nfe_counters_count_solver_evaluations():
    f = _field()
    block = ODEBlock(f, t1=1.0, method="euler", options={"step_size": 0.25})
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    out = block(x)
    assert (block.nfe_forward, block.nfe_backward) == (4, 0)
    out.sum().backward()
    assert (block.nfe_forward, block.nfe_backward) == (4, 4)  # one evaluation per Euler step
    block(x).sum().backward()
    assert (block.nfe_forward_total, block.nfe_backward_total) == (8, 8)
    block.reset_nfe()
    assert (block.nfe_forward_total, block.nfe_backward_total) == (0, 0)
    midpoint = ODEBlock(f, t1=1.0, method="midpoint", options={"step_size": 0.25})
    midpoint(x).sum().backward()
    assert (midpoint.nfe_forward, midpoint.nfe_backward) == (8, 8)


def test_reverse_integrates_from_t1_down_to_zero():
    f = _field()
    x = torch.randn(3, 3, dtype=D)
    block = ODEBlock(f, t1=0.7, rtol=1e-9, atol=1e-9, reverse=True)
    expected = odeint(f, x, torch.tensor([0.7, 0.0], dtype=D), rtol=1e-9, atol=1e-9)[-1]
    torch.testing.assert_close(block(x), expected)
    forward = ODEBlock(f, t1=0.7, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(block(forward(x)), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_dt1_equals_finite_differences_and_the_adjoint_formula(reverse):
    f = _field(1)
    x = torch.randn(4, 3, dtype=D)
    target = torch.randn(4, 3, dtype=D)
    opts = {"options": {"step_size": 0.05}, "method": "rk4"}  # t1 = 0.77: 16 steps, last 0.02

    def loss_at(t1: float) -> torch.Tensor:
        with torch.no_grad():
            return (ODEBlock(f, t1=t1, reverse=reverse, **opts)(x) - target).square().mean()

    block = ODEBlock(f, t1=0.77, learn_t1=True, reverse=reverse, **opts)
    out = block(x)
    (out - target).square().mean().backward()
    eps = 1e-6
    fd = (loss_at(0.77 + eps) - loss_at(0.77 - eps)) / (2 * eps)
    torch.testing.assert_close(block.t1_grad, fd, rtol=1e-6, atol=1e-9)
    if not reverse:  # dL/dt1 = <dL/dx(t1), F(t1, x(t1))> (spec 11, item 6)
        out = out.detach().requires_grad_(True)
        a = torch.autograd.grad((out - target).square().mean(), out)[0]
        formula = (a * f(torch.tensor(0.77, dtype=D), out)).sum()
        torch.testing.assert_close(block.t1_grad, formula.detach(), rtol=1e-6, atol=1e-9)


def test_t1_leaf_is_shared_until_t1_changes_and_unused_without_grad():
    block = ODEBlock(_field(), t1=0.5, learn_t1=True, method="euler", options={"step_size": 0.1})
    x = torch.randn(2, 3, dtype=D)
    block(x).sum().backward()
    first = block.t1_grad.clone()
    block(x).sum().backward()  # the same leaf: its grad accumulates like a parameter's
    torch.testing.assert_close(block.t1_grad, 2 * first)
    block.clear_t1_grad()
    assert block.t1_grad is None
    leaf = block.t1_leaf
    block.set_t1(0.6)
    assert block.t1_leaf is not leaf and float(block.t1) == 0.6
    with torch.no_grad():
        assert not block.time_span().requires_grad
    assert ODEBlock(_field(), learn_t1=False).t1_leaf is None


def test_mask_freezes_samples_and_leaves_the_others_unchanged():
    f = _field()
    x = torch.randn(4, 3, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    block = ODEBlock(f, method="euler", options={"step_size": 0.1})
    mask = torch.tensor([True, False, True, False])
    out = block.integrate(x, t, mask=mask)[-1]
    torch.testing.assert_close(out[~mask], x[~mask], rtol=0, atol=0)
    torch.testing.assert_close(out[mask], block(x[mask]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        block.integrate(x, t, mask=torch.ones(4))


def test_tuple_states_integrate_per_component():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, t, state):
            z, s = state
            dz = torch.tanh(self.lin(z))
            return dz, dz.sum(1, keepdim=True)

    torch.manual_seed(0)
    f = Pair().to(D)
    z = torch.randn(3, 2, dtype=D)
    s = torch.zeros(3, 1, dtype=D)
    zt, st = ODEBlock(f, rtol=1e-9, atol=1e-9)((z, s))
    torch.testing.assert_close(st[:, 0], zt.sum(1) - z.sum(1))  # s tracks sum(z) - sum(z0)


def test_time_dependent_layers_match_their_definitions():
    torch.manual_seed(0)
    t = torch.tensor(0.3, dtype=D)
    conv = ConcatConv2d(2, 3).to(D)
    x = torch.randn(2, 2, 4, 4, dtype=D)
    manual = conv.conv(torch.cat([torch.full((2, 1, 4, 4), 0.3, dtype=D), x], 1))
    torch.testing.assert_close(conv(t, x), manual)
    lin = ConcatLinear(2, 3).to(D)
    v = torch.randn(5, 2, dtype=D)
    torch.testing.assert_close(lin(t, v), lin.linear(torch.cat([torch.full((5, 1), 0.3,
                                                                           dtype=D), v], 1)))
    sq = ConcatSquashLinear(2, 3).to(D)
    tt = torch.full((1, 1), 0.3, dtype=D)
    torch.testing.assert_close(sq(t, v), sq.linear(v) * torch.sigmoid(sq.gate(tt)) + sq.shift(tt))


def test_validation_and_discovery():
    f = _field()
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="allowed range is a finite float > 0"):
            ODEBlock(f, t1=bad)
    with pytest.raises(ValueError, match="allowed values are"):
        ODEBlock(f, method="leapfrog")
    with pytest.raises(ValueError, match="rtol"):
        ODEBlock(f, rtol=0)
    with pytest.raises(TypeError):
        ODEBlock(lambda t, x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed range"):
        ODEBlock(f).set_t1(0.0)
    a, b = ODEBlock(f), ODEBlock(_field(1))
    model = nn.Sequential(nn.Linear(3, 3), a, nn.Tanh(), b)
    assert find_ode_blocks(model) == {"1": a, "3": b}
    with pytest.raises(ValueError, match="nested"):
        find_ode_blocks(ODEBlock(nn.Sequential(ODEBlock(f))))
