"""The library's game feedback (ocnopt.feedback) against the float64 oracle (reference.game).

``identity_game_step`` below wires the library pieces into one step with identity curvature, the
way the optimizer's feedback pass will: first pass recorded, graph analysed before the single
backward, partial gradients collected during it, second pass observed; each layer's update is
``-lr (G^T diag(w) A / B + gamma theta)`` with ``w = 1 + beta * feedback``, and a cooperative
group's weights come from ``joint_weights`` at its first member.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt import OCNOpt
from ocnopt.feedback import (
    GameFeedback,
    joint_weights,
    output_inner,
    per_sample_gram,
    update_effect,
)
from ocnopt.hooks import FeedbackPass, ForwardCapture
from ocnopt.layers import helper_for
from ocnopt.reference import (
    AugmentedGame,
    Op,
    Program,
    ResidualMLP,
    TinyResCNN,
    TwoBranchNet,
    game_step,
)
from tests.conftest import tiny_cnn, tiny_mlp

D = torch.float64
NETS = {"residual-mlp": (ResidualMLP, (4,)), "residual-cnn": (TinyResCNN, (1, 6, 6)),
        "two-branch": (TwoBranchNet, (4,))}


def identity_game_step(model: nn.Module, closure, lr: float, information: str = "nash",
                       feedback_scale: float = 1.0, weight_decay: float = 0.0) -> dict:
    """One closed-loop step with identity curvature; returns the cooperative solves' ``r`` and
    the ``r`` measured from the applied updates, per group member (for consistency checks)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    game = GameFeedback(model, layers, information)
    with ForwardCapture(layers) as cap, game.record(), torch.enable_grad():
        loss = closure()
    plan = game.prepare(loss)
    with game.collect():  # the one backward (weight gradients too: simplest driver here)
        torch.autograd.grad(loss, [p for m in layers for p in m.parameters()])
    outputs = {p.call.module: p.call.outputs[0].value() for p in plan.players}
    effects: dict = {}

    def on_input(module: nn.Module, x_hat: Tensor) -> bool:
        members = game.group(module)
        if not members:
            return False
        s = game.feedback(module, x_hat)  # batch-mean-loss units
        B = x_hat.shape[0]
        w0 = torch.ones(B, dtype=D) if s is None else 1 + feedback_scale * B * s
        recs = [cap.records[m] for m in members]
        helpers = [helper_for(m)[0] for m in members]
        ws, solved = [w0], None
        if len(members) > 1:
            grams = [per_sample_gram(h, r.inputs[0], r.grads[0])
                     for h, r in zip(helpers, recs, strict=True)]
            inner = [output_inner(r.grads[0], outputs[m]) for m, r in zip(members, recs,
                                                                          strict=True)]
            ws, solved, _ = joint_weights(grams, inner, w0, lr, feedback_scale, weight_decay)
        for k, (m, h, r, w) in enumerate(zip(members, helpers, recs, ws, strict=True)):
            dw, db = h.weight_grad(r.inputs[0], r.grads[0], w)
            step_w = -lr * (dw + weight_decay * m.weight)
            step_b = None if db is None else -lr * (db + weight_decay * m.bias)
            m.weight.add_(step_w)
            if step_b is not None:
                m.bias.add_(step_b)
            effect = update_effect(m, r.inputs[0], r.grads[0], step_w, step_b)
            if solved is not None:
                effects[m] = (solved[k], effect)
            if m is not module:
                game.report_update(m, effect)
        return False

    with game.observe(), FeedbackPass([], [p.call.module for p in plan.players], on_input), \
            torch.no_grad():
        closure()
    game.release()
    return effects


def batch(shape: tuple[int, ...], n: int = 4, seed: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max().detach()) for p, q in zip(a.parameters(), b.parameters(),
                                                          strict=True))


# ------------------------------------------------------------------ against the oracle
@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("information", ["markov", "nash", "cooperative"])
@pytest.mark.parametrize("beta,wd", [(1.5, 0.02), (0.0, 0.05)])
def test_library_step_equals_the_oracle(name: str, information: str, beta: float,
                                        wd: float) -> None:
    cls, shape = NETS[name]
    x, y = batch(shape)
    ref, got = cls(), cls()
    game_step(ref.program(), x, y, "cross_entropy", lr=0.7, information=information,
              feedback_scale=beta, weight_decay=wd)
    effects = identity_game_step(got, lambda: F.cross_entropy(got(x), y), lr=0.7,
                                 information=information, feedback_scale=beta, weight_decay=wd)
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for solved, measured in effects.values():  # the solve's r is the applied update's effect
        torch.testing.assert_close(solved, measured, rtol=1e-10, atol=1e-13)
    assert bool(effects) == (information == "cooperative" and name != "residual-mlp")


def test_the_three_information_structures_differ_where_the_net_is_not_a_chain() -> None:
    """Guards the test above against vacuous agreement."""
    for name, (cls, shape) in NETS.items():
        x, y = batch(shape)
        runs = {}
        for information in ("markov", "nash", "cooperative"):
            model = cls()
            identity_game_step(model, lambda m=model, x=x, y=y: F.cross_entropy(m(x), y), lr=0.7,
                               information=information, feedback_scale=1.5)
            runs[information] = model
        assert _max_diff(runs["nash"], runs["markov"]) > 1e-4, name
        if name != "residual-mlp":  # no two layers of the residual MLP read the same tensor
            assert _max_diff(runs["cooperative"], runs["nash"]) > 1e-4, name
        else:
            assert _max_diff(runs["cooperative"], runs["nash"]) == 0.0


@pytest.mark.parametrize("name", NETS)
def test_partial_gradients_are_the_oracle_value_gradients(name: str) -> None:
    """B * (library partial of a cut tensor) == that block of the oracle's V^t, for every
    player and cut tensor (matched by value), and every non-input oracle block is found."""
    cls, shape = NETS[name]
    model = cls()
    x, y = batch(shape)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    game = GameFeedback(model, layers, "nash")
    with game.record():
        loss = F.cross_entropy(model(x), y)
    plan = game.prepare(loss)
    with game.collect():
        loss.backward()
    oracle = AugmentedGame(model.program(), x, "nash")
    V = oracle.value_gradients(y, "cross_entropy")
    B = x.shape[0]
    for t, player in enumerate(plan.players):
        assert player.call.module is oracle.stages[t].module
        blocks, offset = {}, 0
        for c in oracle.components[t]:
            blocks[c.key] = (oracle.nominal[c.key], V[t][:, offset:offset + c.size])
            offset += c.size
        matched = set()
        for term in player.terms:
            key = next(k for k, (v, _) in blocks.items() if torch.equal(v, term.seen.value()))
            matched.add(key)
            got = B * game.partial(term).reshape(B, -1)
            torch.testing.assert_close(got, blocks[key][1], rtol=1e-10, atol=1e-13)
        assert matched == set(blocks) - {"x"}


@pytest.mark.parametrize("make,shape", [(tiny_mlp, (6,)), (tiny_cnn, (1, 6, 6))],
                         ids=["tanh-mlp", "cnn"])
def test_chain_nash_is_the_current_optimizer_step(make, shape) -> None:
    x, y = torch.randn(5, *shape, dtype=D), torch.randint(0, 3, (5,))
    ref, got = make(D), make(D)
    OCNOpt(ref, lr=0.9, curvature="identity", feedback_scale=1.5, weight_decay=0.02).step(
        lambda: F.cross_entropy(ref(x), y))
    identity_game_step(got, lambda: F.cross_entropy(got(x), y), lr=0.9, information="nash",
                       feedback_scale=1.5, weight_decay=0.02)
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


class InputBranches(nn.Module):
    """Two branches read the network input itself (a tensor without an autograd edge)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.fa, self.fb, self.head = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(torch.cat([self.fa(x), self.fb(x)], dim=1)))

    def program(self) -> Program:
        return Program("x", (
            Op("a", ("x",), layer=self.fa), Op("b", ("x",), layer=self.fb),
            Op("c", ("a", "b"), fn=lambda a, b: torch.cat([a, b], dim=1)),
            Op("t", ("c",), fn=torch.tanh), Op("out", ("t",), layer=self.head)), "out")


def test_branches_reading_the_data_form_a_cooperative_group() -> None:
    x, y = batch((4,))
    ref, got = InputBranches(), InputBranches()
    pols = game_step(ref.program(), x, y, "cross_entropy", lr=0.7, information="cooperative",
                     feedback_scale=1.5)
    assert pols[0].players == (0, 1)
    effects = identity_game_step(got, lambda: F.cross_entropy(got(x), y), lr=0.7,
                                 information="cooperative", feedback_scale=1.5)
    assert set(effects) == {got.fa, got.fb}
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ cooperative pieces
def _per_sample_grads(module: nn.Module, x: Tensor, loss_of) -> Tensor:
    rows = []
    for i in range(x.shape[0]):
        ps = [module.weight] + ([module.bias] if module.bias is not None else [])
        gs = torch.autograd.grad(loss_of(module(x[i:i + 1]), i), ps)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["linear", "linear-seq", "conv", "conv-nobias"])
def test_per_sample_gram_and_inner_products(kind: str) -> None:
    torch.manual_seed(9)
    if kind.startswith("linear"):
        module = nn.Linear(4, 3).double()
        x = torch.randn(5, *((2,) if kind == "linear-seq" else ()), 4, dtype=D)
    else:
        module = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=kind == "conv").double()
        x = torch.randn(5, 2, 5, 5, dtype=D)
    target = torch.randn_like(module(x))

    def loss_of(out: Tensor, i: int) -> Tensor:  # sample i's own loss
        return ((out - target[i:i + 1]) ** 2).sum() + out.pow(3).sum()

    q = _per_sample_grads(module, x, loss_of)
    out = module(x)
    mean_loss = sum(loss_of(out[i:i + 1], i) for i in range(5)) / 5
    g = torch.autograd.grad(mean_loss, out)[0]
    helper, _ = helper_for(module)
    torch.testing.assert_close(per_sample_gram(helper, x, g), q @ q.T, rtol=1e-12, atol=1e-12)
    theta = torch.cat([p.reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(output_inner(g, out.detach()), q @ theta, rtol=1e-12,
                               atol=1e-12)
    dw = torch.randn_like(module.weight)
    db = None if module.bias is None else torch.randn_like(module.bias)
    delta = torch.cat([dw.reshape(-1)] + ([db] if db is not None else []))
    torch.testing.assert_close(update_effect(module, x, g, dw, db), q @ delta, rtol=1e-12,
                               atol=1e-12)


def test_joint_weights_solve_the_stationarity_system_or_drop_the_cross_terms() -> None:
    g = torch.Generator().manual_seed(10)
    B, dims = 4, (5, 7, 3)
    q = [torch.randn(B, d, generator=g, dtype=D) for d in dims]  # per-sample gradients
    theta = [torch.randn(d, generator=g, dtype=D) for d in dims]
    w0 = 1 + 0.3 * torch.randn(B, generator=g, dtype=D)
    for lr, beta, expect_min in ((0.3, 0.8, True), (30.0, 50.0, False), (0.3, 0.0, True)):
        pairs = list(zip(q, theta, strict=True))
        ws, rs, ok = joint_weights([qi @ qi.T for qi in q], [qi @ t for qi, t in pairs], w0, lr,
                                   beta, 0.1)
        assert ok == expect_min
        du = [-lr * ((w[:, None] * qi).mean(0) + 0.1 * t) for w, (qi, t) in zip(ws, pairs,
                                                                                strict=True)]
        for r, qi, d in zip(rs, q, du, strict=True):
            torch.testing.assert_close(r, qi @ d, rtol=1e-10, atol=1e-12)
        # brute-force joint Hessian of the stage model: blkdiag(I/lr) + (beta/B) cross blocks
        n = sum(dims)
        U = torch.zeros(B, n, dtype=D)
        U[:, :dims[0]], U[:, dims[0]:dims[0] + dims[1]], U[:, dims[0] + dims[1]:] = q
        H = torch.eye(n, dtype=D) / lr + beta / B * U.T @ U
        for a, b in ((0, dims[0]), (dims[0], dims[0] + dims[1]), (dims[0] + dims[1], n)):
            H[a:b, a:b] = torch.eye(b - a, dtype=D) / lr
        assert (torch.linalg.eigvalsh(H)[0] > 0) == expect_min
        if expect_min:
            rhs = torch.cat([(w0[:, None] * qi).mean(0) + 0.1 * t for qi, t in pairs])
            torch.testing.assert_close(torch.cat(du), -torch.linalg.solve(H, rhs), rtol=1e-10,
                                       atol=1e-12)
        else:
            assert all(torch.equal(w, w0) for w in ws)


def test_invalid_information_raises() -> None:
    with pytest.raises(ValueError, match="markov, nash, cooperative"):
        GameFeedback(nn.Linear(2, 2), [], "open")
    game = GameFeedback(nn.Linear(2, 2), [])
    with pytest.raises(RuntimeError, match="record"):
        game.prepare(torch.zeros((), requires_grad=True) * 1)


def test_release_drops_the_step_tensors() -> None:
    import gc
    import weakref

    model = ResidualMLP()
    x, y = batch((4,))
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    game = GameFeedback(model, layers, "nash")
    with game.record():
        loss = F.cross_entropy(model(x), y)
    plan = game.prepare(loss)
    with game.collect():
        loss.backward()
    ref = weakref.ref(plan.players[2].terms[1].seen.tensor)  # a skip tensor (fc2's cut: h0)
    del plan, loss
    gc.collect()
    assert ref() is not None  # still needed for the second pass
    game.release()
    gc.collect()
    assert ref() is None
