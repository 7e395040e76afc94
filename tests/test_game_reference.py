"""The float64 game oracle (ocnopt.reference.game) against independent computations.

Independent oracles: finite differences of the loss-to-go, the chain oracle
``closed_loop_gn_step``, ``torch.optim.SGD``, per-sample parameter gradients from plain autograd
on the module, and the optimality conditions of the stage's quadratic model written out here.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt import OCNOpt
from ocnopt.reference import (
    AugmentedGame,
    Op,
    Program,
    ResidualMLP,
    TinyResCNN,
    TwoBranchNet,
    closed_loop_gn_step,
    game_step,
    sequential_program,
)
from tests.conftest import tiny_cnn, tiny_mlp

D = torch.float64
NETS = {"residual-mlp": (ResidualMLP, (4,)), "residual-cnn": (TinyResCNN, (1, 6, 6)),
        "two-branch": (TwoBranchNet, (4,))}


def batch(shape: tuple[int, ...], n: int = 4, seed: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def players(model: nn.Module) -> list[nn.Module]:
    return [op.layer for op in model.program().ops if op.layer is not None]


def flat_params(m: nn.Module) -> Tensor:
    return torch.cat([m.weight.reshape(-1)] + ([m.bias.reshape(-1)] if m.bias is not None else []))


def per_sample_param_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[nn.Module, Tensor]:
    """dl_i/dtheta for every player, (B, m), by plain autograd on the module (one sample at a
    time, the sample's own cross-entropy)."""
    out: dict[nn.Module, list[Tensor]] = {m: [] for m in players(model)}
    for i in range(x.shape[0]):
        li = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for m in out:
            ps = [m.weight] + ([m.bias] if m.bias is not None else [])
            out[m].append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, ps,
                                                                                 retain_graph=True)]))
    return {m: torch.stack(v) for m, v in out.items()}


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize("name", NETS)
def test_programs_reproduce_the_modules(name: str) -> None:
    cls, shape = NETS[name]
    model = cls()
    x, _ = batch(shape)
    assert torch.equal(model.program().run(x)["out"], model(x))


def test_cuts_decisions_and_pending_controls() -> None:
    x, _ = batch((4,))
    mlp = AugmentedGame(ResidualMLP().program(), x, "nash")
    assert mlp.cut == [["x"], ["h0"], ["h0", "t1"], ["h0", "h1"], ["h0", "h1", "t3"], ["ts"]]
    assert [c.kind for cs in mlp.components for c in cs].count("control") == 0
    two = AugmentedGame(TwoBranchNet().program(), x, "cooperative")
    assert two.cut[3] == ["h", "a"]  # fb1: its input and the finished sibling branch
    assert two.decided == [(0,), (1, 3), (2,), (), (4,)]
    # fa2 runs while fb1 (decided with fa1) has not run yet: its control is state
    assert [(c.kind, c.key) for c in two.components[2]] == [("value", "h"), ("value", "q1"),
                                                            ("control", 3)]
    cnn = AugmentedGame(TinyResCNN().program(), batch((1, 6, 6))[0], "cooperative")
    assert cnn.cut[3] == ["x1", "n2"] and cnn.decided[1] == (1, 3)  # conv1 + downsample conv


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("information", ["nash", "cooperative"])
def test_value_recursion_matches_finite_differences(name: str, information: str) -> None:
    """Each block of V^t (cut values and pending controls) is the partial derivative of the
    sample's loss-to-go w.r.t. that block, others held fixed: central differences along a
    random direction inside the block."""
    cls, shape = NETS[name]
    x, y = batch(shape, n=2)
    game = AugmentedGame(cls().program(), x, information)
    V = game.value_gradients(y, "cross_entropy")
    g = torch.Generator().manual_seed(0)
    h = 1e-5
    checked = 0
    with torch.no_grad():
        for t in range(game.T):
            offset = 0
            for comp in game.components[t]:
                v = torch.zeros(game.z_nominal[t].shape[1], dtype=D)
                v[offset:offset + comp.size] = torch.randn(comp.size, generator=g, dtype=D)
                offset += comp.size
                for i in range(2):
                    z = game.z_nominal[t][i]
                    fd = (game.loss_to_go(t, z + h * v, y[i], "cross_entropy")
                          - game.loss_to_go(t, z - h * v, y[i], "cross_entropy")) / (2 * h)
                    assert abs(float(V[t][i] @ v - fd)) < 1e-8 * (1 + abs(float(fd)))
                    checked += 1
    assert checked >= 2 * game.T


# ------------------------------------------------------------------ special cases
@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn], ids=["tanh-mlp", "cnn"])
def test_chain_all_informations_equal_closed_loop_gn_step(make) -> None:
    x = torch.randn(5, *((6,) if make is tiny_mlp else (1, 6, 6)), dtype=D)
    y = torch.randint(0, 3, (5,))
    ref = make(D)
    closed_loop_gn_step(ref, x, y, "cross_entropy", lr=0.9, feedback_scale=1.5, weight_decay=0.02)
    for information in ("markov", "nash", "cooperative"):
        got = make(D)
        game_step(sequential_program(got), x, y, "cross_entropy", lr=0.9,
                  information=information, feedback_scale=1.5, weight_decay=0.02)
        for a, b in zip(ref.parameters(), got.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("information", ["markov", "nash", "cooperative"])
def test_feedback_scale_zero_is_sgd(name: str, information: str) -> None:
    cls, shape = NETS[name]
    x, y = batch(shape)
    got, sgd = cls(), cls()
    game_step(got.program(), x, y, "cross_entropy", lr=0.7, information=information,
              feedback_scale=0.0, weight_decay=0.03)
    params = [p for p in sgd.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.7, weight_decay=0.03)
    F.cross_entropy(sgd(x), y).backward()
    opt.step()
    for a, b in zip(sgd.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_markov_differs_from_nash_by_exactly_the_skip_terms(name: str) -> None:
    """Same deviation dz: du_nash - du_markov = -lr (beta/B) sum_i q_i sum_{c skip} <V_c,i, dc_i>
    with q_i from plain per-sample autograd; and that difference is not zero."""
    cls, shape = NETS[name]
    model = cls()
    x, y = batch(shape)
    lr, beta, B = 0.6, 1.3, x.shape[0]
    nash, markov = (AugmentedGame(model.program(), x, info) for info in ("nash", "markov"))
    pn = nash.policies(y, "cross_entropy", lr, beta, weight_decay=0.01)
    pm = markov.policies(y, "cross_entropy", lr, beta, weight_decay=0.01)
    V = nash.value_gradients(y, "cross_entropy")
    q = per_sample_param_grads(model, x, y)
    g = torch.Generator().manual_seed(1)
    largest = 0.0
    for t in range(nash.T):
        dz = torch.randn(nash.z_nominal[t].shape, generator=g, dtype=D)
        du = [-(p.policy.k + torch.einsum("bmn,bn->m", p.policy.K, dz)) for p in (pn[t], pm[t])]
        skip = torch.zeros(B, dtype=D)
        offset = 0
        for c in nash.components[t]:
            sl = slice(offset, offset + c.size)
            if c.key != nash.own_input[t]:
                skip += (V[t][:, sl] * dz[:, sl]).sum(1)
            offset += c.size
        expected = -lr * beta / B * (skip[:, None] * q[nash.stages[t].module]).sum(0)
        torch.testing.assert_close(du[0] - du[1], expected, rtol=1e-9, atol=1e-12)
        largest = max(largest, float(expected.abs().max()))
    assert largest > 1e-3


def test_markov_equals_the_optimizer_markov_step_on_the_residual_mlp() -> None:
    """No layer of the residual MLP reads a tensor an earlier layer read, so the own-input
    partial is the whole input gradient: the Markovian game step is OCNOpt's markov step (and
    the step before the game feedback)."""
    x, y = batch((4,))
    ref, got = ResidualMLP(), ResidualMLP()
    game_step(ref.program(), x, y, "cross_entropy", lr=0.8, information="markov",
              feedback_scale=1.5, weight_decay=0.02)
    opt = OCNOpt(got, lr=0.8, curvature="identity", feedback_scale=1.5, weight_decay=0.02,
                 information="markov")
    opt.step(lambda: F.cross_entropy(got(x), y))
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ cooperative stage
def _stationarity_residual(model, x, y, lr, beta, wd, curvature, drop_cross: bool) -> Tensor:
    """Residual of the first-order conditions of every multi-player stage, written out:
    (M_n/lr) du_n + (beta/B) sum_i q_n,i sum_{m!=n} <q_m,i, du_m>
        + (1/B) sum_i q_n,i (1 + beta <V_i, dz_i>) + gamma theta_n = 0."""
    game = AugmentedGame(model.program(), x, "cooperative")
    pols = game.policies(y, "cross_entropy", lr, beta, wd, curvature)
    V = game.value_gradients(y, "cross_entropy")
    q = per_sample_param_grads(model, x, y)
    g = torch.Generator().manual_seed(2)
    B = x.shape[0]
    worst = torch.zeros((), dtype=D)
    for t, sp in enumerate(pols):
        if sp is None or len(sp.players) < 2:
            continue
        assert sp.cross_terms_dropped == drop_cross
        dz = torch.randn(game.z_nominal[t].shape, generator=g, dtype=D)
        du = -(sp.policy.k + torch.einsum("bmn,bn->m", sp.policy.K, dz))
        mods = [game.stages[m].module for m in sp.players]
        parts = dict(zip(mods, du.split([game.stages[m].n_u for m in sp.players]), strict=True))
        r = {m: q[m] @ parts[m] for m in mods}  # <q_m,i, du_m>
        w = 1 + beta * (V[t] * dz).sum(1)
        for m in mods:
            M = curvature.get(m, None) if curvature else None
            M = torch.eye(parts[m].numel(), dtype=D) if M is None else M
            M = torch.diag(M) if M.dim() == 1 else M
            res = M @ parts[m] / lr + (w[:, None] * q[m]).mean(0) + wd * flat_params(m).detach()
            if not drop_cross:
                cross = sum(r[o] for o in mods if o is not m)
                res = res + beta / B * (cross[:, None] * q[m]).sum(0)
            worst = torch.maximum(worst, res.abs().max())
    return worst


@pytest.mark.parametrize("name", ["residual-cnn", "two-branch"])
@pytest.mark.parametrize("curv", ["identity", "spd"])
def test_cooperative_stage_is_the_joint_minimiser(name: str, curv: str) -> None:
    cls, shape = NETS[name]
    model = cls()
    x, y = batch(shape)
    curvature = None
    if curv == "spd":
        g = torch.Generator().manual_seed(3)
        curvature = {}
        for i, m in enumerate(players(model)):
            n = flat_params(m).numel()
            if i % 2:
                A = torch.randn(n, n, generator=g, dtype=D)
                curvature[m] = A @ A.T / n + 0.5 * torch.eye(n, dtype=D)
            else:
                curvature[m] = torch.rand(n, generator=g, dtype=D) + 0.5
    res = _stationarity_residual(model, x, y, 0.7, 1.4, 0.02, curvature, drop_cross=False)
    assert res < 1e-10


def test_cooperative_stage_that_is_not_positive_definite_drops_cross_terms(caplog) -> None:
    model = TwoBranchNet()
    x, y = batch((4,))
    with caplog.at_level(logging.WARNING, logger="ocnopt.reference.game"):
        res = _stationarity_residual(model, x, y, 40.0, 60.0, 0.0, None, drop_cross=True)
    assert res < 1e-8
    assert "not positive definite" in caplog.text and "p1" in caplog.text


def test_curvature_preconditions_the_policies() -> None:
    """Nash with a fixed M: k_M = M^-1 k_I and K_M = M^-1 K_I (the feedback goes through M)."""
    model = ResidualMLP()
    x, y = batch((4,))
    g = torch.Generator().manual_seed(4)
    curvature = {}
    for i, m in enumerate(players(model)):
        n = flat_params(m).numel()
        A = torch.randn(n, n, generator=g, dtype=D)
        curvature[m] = (A @ A.T / n + torch.eye(n, dtype=D)) if i % 2 else torch.rand(
            n, generator=g, dtype=D) + 0.2
    game = AugmentedGame(model.program(), x, "nash")
    plain = game.policies(y, "cross_entropy", 0.5, 1.2, 0.01)
    pre = game.policies(y, "cross_entropy", 0.5, 1.2, 0.01, curvature)
    for t, (a, b) in enumerate(zip(plain, pre, strict=True)):
        M = curvature[game.stages[t].module]
        M = torch.diag(M) if M.dim() == 1 else M
        torch.testing.assert_close(M @ b.policy.k, a.policy.k, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(M @ b.policy.K, a.policy.K, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ invalid input
def test_invalid_arguments_raise() -> None:
    model = ResidualMLP()
    x, y = batch((4,))
    with pytest.raises(ValueError, match="markov, nash, cooperative"):
        AugmentedGame(model.program(), x, "stackelberg")
    with pytest.raises(TypeError, match="float64"):
        AugmentedGame(model.program(), x.float(), "nash")
    game = AugmentedGame(model.program(), x, "nash")
    with pytest.raises(ValueError, match="lr"):
        game.policies(y, "cross_entropy", 0.0)
    with pytest.raises(ValueError, match=r"must be \(24,\) or \(24, 24\)"):
        game.policies(y, "cross_entropy", 0.1, curvature={model.fc1: torch.ones(3, dtype=D)})
    with pytest.raises(ValueError, match="positive definite"):
        game.policies(y, "cross_entropy", 0.1, curvature={model.fc1: -torch.eye(24, dtype=D)})
    with pytest.raises(ValueError, match="undefined"):
        AugmentedGame(Program("x", (Op("a", ("y",), fn=torch.tanh),), "a"), x)
    lin = nn.Linear(4, 2).to(D)
    with pytest.raises(ValueError, match="reused"):
        AugmentedGame(Program("x", (Op("a", ("x",), layer=lin), Op("b", ("x",), layer=lin),
                                    Op("c", ("a", "b"), fn=torch.add)), "c"), x)
    with pytest.raises(ValueError, match="no player"):
        AugmentedGame(Program("x", (Op("a", ("x",), fn=torch.tanh),), "a"), x)
