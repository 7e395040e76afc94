"""Tests of the E-MSA baseline (ocnopt.bench.emsa)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt.bench.emsa import EMSA, split_stages
from ocnopt.bench.optimizers import OPTIMIZERS, get_optimizer, train_step
from tests.conftest import batches, tiny_cnn, tiny_mlp


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("rho", [0.0, 0.5])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_one_gd_step_is_sgd(make, rho: float, wd: float) -> None:
    """rho = 0 (and, since the penalties vanish at theta_k, any rho), 1 GD step == 1 SGD step."""
    model = make(torch.float64)
    ref = copy.deepcopy(model)
    x, y = batches(model, n=1, dtype=torch.float64)[0]
    opt = EMSA(model, lr=0.3, rho=rho, inner_steps=1, inner_optimizer="gd", weight_decay=wd)
    loss = opt.step(lambda: F.cross_entropy(model(x), y))
    sgd = torch.optim.SGD(ref.parameters(), lr=0.3, weight_decay=wd)
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    sgd.step()
    torch.testing.assert_close(loss, ref_loss.detach())
    moved = False
    for p, q, p0 in zip(model.parameters(), ref.parameters(), _params(make(torch.float64)),
                        strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        moved |= not torch.equal(p, p0)
    assert moved


def test_more_inner_steps_differ_from_sgd_with_rho() -> None:
    """The rho terms act from the second inner step on (guards against a dead penalty)."""
    model = tiny_mlp(torch.float64)
    x, y = batches(model, n=1, dtype=torch.float64)[0]
    out = []
    for rho in (0.0, 5.0):
        m = copy.deepcopy(model)
        EMSA(m, lr=0.3, rho=rho, inner_steps=3, inner_optimizer="gd").step(
            lambda m=m: F.cross_entropy(m(x), y))
        out.append(torch.cat([p.flatten() for p in m.parameters()]))
    assert (out[0] - out[1]).abs().max() > 1e-6


def test_inner_ascent_matches_explicit_augmented_hamiltonian() -> None:
    """Two GD inner steps with rho > 0 against H~ written out per sample (docstring formula)."""
    model = tiny_mlp(torch.float64)
    x, y = batches(model, n=1, dtype=torch.float64)[0]
    B, lr, rho, gamma = x.shape[0], 0.2, 0.7, 0.05
    lin = [model[0], model[2], model[4]]
    acts = [torch.tanh, torch.tanh, lambda h: h]
    # nominal states and costates, by hand
    xs = [x.detach().requires_grad_(True)]
    for m, a in zip(lin, acts, strict=True):
        xs.append(a(m(xs[-1])))
    ps = [-g.detach() for g in torch.autograd.grad(F.cross_entropy(xs[-1], y), xs)]
    xs = [s.detach() for s in xs]
    expected = []
    for t, (m, a) in enumerate(zip(lin, acts, strict=True)):
        w, b = m.weight.detach().clone(), m.bias.detach().clone()
        for _ in range(2):
            w.requires_grad_(True)
            b.requires_grad_(True)
            obj = -0.5 * gamma * (w.pow(2).sum() + b.pow(2).sum())
            for i in range(B):
                xi = xs[t][i].clone().requires_grad_(True)
                fi = a(xi @ w.T + b)
                hi = (ps[t + 1][i] * fi).sum()
                (dhdx,) = torch.autograd.grad(hi, xi, create_graph=True)
                obj = obj + hi - 0.5 * rho * ((xs[t + 1][i] - fi).pow(2).sum()
                                              + (ps[t][i] - dhdx).pow(2).sum())
            gw, gb = torch.autograd.grad(obj, (w, b))
            w, b = (w + lr * gw).detach(), (b + lr * gb).detach()
        expected += [w, b]
    EMSA(model, lr=lr, rho=rho, inner_steps=2, inner_optimizer="gd", weight_decay=gamma).step(
        lambda: F.cross_entropy(model(x), y))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def _manual_states(model: nn.Sequential, x: Tensor) -> list[Tensor]:
    """x_0..x_T by running the children by hand, each state a graph node requiring grad."""
    _, stages = split_stages(model)
    states = [x.detach().requires_grad_(True)]
    for s in stages:
        states.append(s(states[-1]))
    return states


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
def test_costates_are_minus_mean_loss_gradients(make) -> None:
    """p_t = -dL/dx_t for the batch-MEAN loss, i.e. -(1/B) x the per-sample gradient."""
    model = make(torch.float64)
    x, y = batches(model, n=1, dtype=torch.float64)[0]
    B = x.shape[0]
    opt = EMSA(model, lr=0.1)
    traj = opt.trajectory(lambda: F.cross_entropy(model(x), y))
    states = _manual_states(model, x)
    loss = F.cross_entropy(states[-1], y)
    grads = torch.autograd.grad(loss, states)
    assert len(traj.costates) == len(states) == len(opt.stages) + 1
    for t, (p, g) in enumerate(zip(traj.costates, grads, strict=True)):
        assert p is not None, t
        torch.testing.assert_close(traj.states[t], states[t].detach())
        torch.testing.assert_close(p, -g, rtol=1e-10, atol=1e-12)
    # per sample: p_t^i = -(1/B) d phi_i / d x_t^i, from a forward of sample i alone
    for i in (0, B - 1):
        st = _manual_states(model, x[i:i + 1])
        gi = torch.autograd.grad(F.cross_entropy(st[-1], y[i:i + 1]), st)
        for t in range(len(st)):
            torch.testing.assert_close(traj.costates[t][i:i + 1], -gi[t] / B,
                                       rtol=1e-10, atol=1e-12)


def test_loss_decreases_on_wine() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_wine

    X, Y = load_wine(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    Y = torch.tensor(Y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                          nn.Linear(10, 3))
    opt = EMSA(model, lr=3e-3, rho=0.03, inner_steps=5, inner_optimizer="adam")
    with torch.no_grad():
        before = F.cross_entropy(model(X), Y).item()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(X), (16,), generator=g)
        opt.step(lambda idx=idx: F.cross_entropy(model(X[idx]), Y[idx]))
    with torch.no_grad():
        after = F.cross_entropy(model(X), Y).item()
        acc = (model(X).argmax(1) == Y).float().mean().item()
    assert after < 0.3 * before, (before, after)
    assert acc > 0.9


@pytest.mark.parametrize("inner", ["gd", "adam"])
def test_tiny_cnn_trains(inner: str) -> None:
    model = tiny_cnn()
    x, y = batches(model, n=1, batch=16)[0]
    opt = EMSA(model, lr=0.1 if inner == "gd" else 1e-2, rho=0.1, inner_steps=3,
               inner_optimizer=inner)
    losses = [opt.step(lambda: F.cross_entropy(model(x), y)).item() for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_hooks_never_outlive_the_step() -> None:
    model = tiny_cnn()
    x, y = batches(model, n=1)[0]
    opt = EMSA(model, lr=1e-2)
    n0 = _hook_count(model)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert _hook_count(model) == n0

    def raising() -> Tensor:
        model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(raising)
    assert _hook_count(model) == n0
    with pytest.raises(RuntimeError, match="exactly once"):
        opt.step(lambda: F.cross_entropy(model(x), y) + F.cross_entropy(model(x), y))
    assert _hook_count(model) == n0


def test_rejects_unsupported_models() -> None:
    with pytest.raises(TypeError, match="Sequential"):
        EMSA(nn.Linear(3, 2))
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = EMSA(model)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="BatchNorm"):
        opt.step(lambda: model(x).pow(2).mean())
    with pytest.raises(ValueError, match="inner_steps"):
        EMSA(tiny_mlp(), inner_steps=0)
    with pytest.raises(ValueError, match="rho"):
        EMSA(tiny_mlp(), rho=-1.0)


def test_registry_entry_and_train_step() -> None:
    spec = get_optimizer("emsa")
    assert "emsa" in OPTIMIZERS
    assert spec.mode == "closure" and spec.family == "optimal-control"
    assert spec.available() == (True, "")
    model = tiny_mlp()
    x, y = batches(model, n=1)[0]
    opt = spec.build(model, lr=spec.lr_grid[-1])
    losses = [train_step(opt, spec, model, x, y, F.cross_entropy).item() for _ in range(10)]
    assert losses[-1] < losses[0]
