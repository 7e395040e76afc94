"""Tests of the float64 brute-force DDP reference (ocnopt.reference).

Every oracle here is computed independently of the module under test: finite differences,
torch autograd on the plain network, or an explicit stacked-state DDP written from scratch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian

from ocnopt.reference import (
    VanillaDDP,
    batch_objective,
    closed_loop_gn_step,
    ddp_step,
    first_order_dp,
    per_sample_value_gradients,
    q_terms,
    regularized_curvature,
    stage_jacobians,
    stages,
    trajectory,
)

DT = torch.float64


# ------------------------------------------------------------------ fixtures
def make_mlp(sizes: tuple[int, ...] = (5, 4, 3, 2), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT)


def make_cnn(seed: int = 0) -> nn.Sequential:
    """1x5x5 -> Conv2d(1,2,3) -> tanh -> Flatten -> Linear(18, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).to(DT)


def make_cnn_relu(pool: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    if pool:
        mods = [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
        return nn.Sequential(*mods, nn.Linear(8, 3)).to(DT)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).to(DT)


def data(kind: str, B: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(B, 5, generator=g, dtype=DT), torch.randint(0, 2, (B,), generator=g)
    return torch.randn(B, 1, 5, 5, generator=g, dtype=DT), torch.randint(0, 3, (B,), generator=g)


def param_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


def per_sample_losses(out: Tensor, Y: Tensor, loss: str) -> Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(out, Y, reduction="none")
    return ((out - Y) ** 2).mean(dim=1)


def fd_grad_hess(fun, z: Tensor, h: float = 2e-4) -> tuple[Tensor, Tensor]:
    """Central finite differences of a scalar function: gradient (N,) and Hessian (N, N).

    All perturbed points are evaluated in one ``torch.vmap`` call (plain function values only).
    """
    N = z.numel()
    E = torch.eye(N, dtype=DT) * h
    a, b = torch.triu_indices(N, N)
    Ea, Eb = E[a], E[b]
    pts = torch.cat([z + E, z - E, z + Ea + Eb, z + Ea - Eb, z - Ea + Eb, z - Ea - Eb])
    vals = torch.vmap(fun)(pts)
    gp, gm, pp, pm, mp, mm = torch.split(vals, [N, N] + [a.numel()] * 4)
    g = (gp - gm) / (2 * h)
    H = torch.zeros(N, N, dtype=DT)
    H[a, b] = (pp - pm - mp + mm) / (4 * h * h)
    H[b, a] = H[a, b]
    return g, H


# ------------------------------------------------------------ architecture
def test_stages_shapes_and_roundtrip() -> None:
    # leading parameter-free modules are preprocessing; nested Sequentials are flattened
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(25, 4), nn.Tanh()), nn.Linear(4, 2))
    model = model.to(DT)
    X = torch.randn(2, 1, 5, 5, dtype=DT)
    with pytest.raises(ValueError):
        stages(model)  # first module is not Linear: input_shape required
    assert [(s.n_x, s.n_u, s.n_out) for s in stages(model, (1, 5, 5))] == [(25, 104, 4), (4, 10, 2)]
    xs = trajectory(model, X)
    assert torch.equal(xs[0], X.reshape(2, 25)) and torch.equal(xs[-1], model(X).detach())
    model = make_cnn_relu(pool=True)
    X, _ = data("cnn", 3)
    sts = stages(model, (1, 5, 5))
    assert [(s.n_x, s.n_u, s.n_out) for s in sts] == [(25, 20, 8), (8, 27, 3)]
    xs = trajectory(model, X)
    assert [x.shape for x in xs] == [(3, 25), (3, 8), (3, 3)]
    assert torch.equal(xs[-1], model(X).detach())
    for st, x in zip(sts, xs[:-1], strict=True):
        u = st.get_u()
        y = torch.stack([st.f(x[i], u) for i in range(3)])
        assert torch.allclose(y, st.forward_batch(x), atol=1e-14)
        st.set_u(2 * u)
        assert torch.equal(st.get_u(), 2 * u)
    with pytest.raises(ValueError):
        stages(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).to(DT))
    with pytest.raises(TypeError):
        stages(nn.Sequential(nn.Linear(3, 3)))  # float32


# ------------------------------------------------------- §3.2 exact Q terms
def _linear_tanh_case():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(DT)
    st = stages(model)[0]

    def f(x: Tensor, u: Tensor) -> Tensor:  # independent of Stage.f
        return torch.tanh(u[:12].view(3, 4) @ x + u[12:])

    return st, f, 4


def _conv_tanh_case():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh()).to(DT)
    st = stages(model, (1, 5, 5))[0]

    def f(x: Tensor, u: Tensor) -> Tensor:
        y = F.conv2d(x.view(1, 1, 5, 5), u[:18].view(2, 1, 3, 3), u[18:])
        return torch.tanh(y).reshape(-1)

    return st, f, 25


@pytest.mark.parametrize("case", [_linear_tanh_case, _conv_tanh_case], ids=["linear", "conv"])
def test_q_terms_match_finite_differences(case) -> None:
    st, f, n = case()
    wd = 0.3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=g, dtype=DT)
    u = st.get_u()
    y0 = f(x, u)
    Vx = torch.randn(st.n_out, generator=g, dtype=DT)
    A = torch.randn(st.n_out, st.n_out, generator=g, dtype=DT)
    Vxx = A + A.T  # symmetric, indefinite

    def Q(z: Tensor) -> Tensor:
        xx, uu = z[:n], z[n:]
        d = f(xx, uu) - y0
        return 0.5 * wd * uu @ uu + Vx @ d + 0.5 * d @ Vxx @ d

    gz, Hz = fd_grad_hess(Q, torch.cat([x, u]))
    full = q_terms(st, x, u, Vx, Vxx, weight_decay=wd, second_order_terms=True)
    tol = 1e-6
    assert torch.allclose(full.Qx, gz[:n], atol=tol)
    assert torch.allclose(full.Qu, gz[n:], atol=tol)
    assert torch.allclose(full.Qxx, Hz[:n, :n], atol=tol)
    assert torch.allclose(full.Quu, Hz[n:, n:], atol=tol)
    assert torch.allclose(full.Qux, Hz[n:, :n], atol=tol)

    # Gauss-Newton: the difference full - GN is the tensor term V'_x . f_**, here the FD
    # Hessian of <Vx, f(x, u)>; gradients are unchanged.
    gn = q_terms(st, x, u, Vx, Vxx, weight_decay=wd, second_order_terms=False)
    _, T = fd_grad_hess(lambda z: Vx @ f(z[:n], z[n:]), torch.cat([x, u]))
    assert torch.equal(gn.Qx, full.Qx) and torch.equal(gn.Qu, full.Qu)
    assert torch.allclose(full.Qxx - gn.Qxx, T[:n, :n], atol=tol)
    assert torch.allclose(full.Quu - gn.Quu, T[n:, n:], atol=tol)
    assert torch.allclose(full.Qux - gn.Qux, T[n:, :n], atol=tol)
    assert T[n:, :n].abs().max() > 1e-2  # the tensor term is not trivially zero


# ----------------------------------------------------------- §3.1 Theorem 1
def _autograd_grads(model, X, Y, loss, wd) -> list[Tensor]:
    out = model(X)
    data_loss = F.cross_entropy(out, Y) if loss == "cross_entropy" else F.mse_loss(out, Y)
    params = list(model.parameters())
    J = data_loss + 0.5 * wd * sum((p**2).sum() for p in params)
    grads = torch.autograd.grad(J, params)
    return [torch.cat([gw.reshape(-1), gb]) for gw, gb in zip(grads[::2], grads[1::2], strict=True)]


@pytest.mark.parametrize("name", ["mlp_mse", "cnn_relu_ce", "cnn_relu_maxpool_ce"])
def test_theorem1_first_order_dp_is_backprop(name: str) -> None:
    if name == "mlp_mse":
        model, wd, loss = make_mlp((5, 4, 3, 2)), 0.1, "mse"
        X, _ = data("mlp", 6)
        Y = torch.randn(6, 2, dtype=DT)
    else:
        model, wd, loss = make_cnn_relu(pool="maxpool" in name), 0.05, "cross_entropy"
        X, Y = data("cnn", 4)
    ref = first_order_dp(model, X, Y, loss, wd)
    expected = _autograd_grads(model, X, Y, loss, wd)
    assert len(ref) == len(expected) == len(param_modules(model))
    for a, b in zip(ref, expected, strict=True):
        assert (a - b).abs().max() < 1e-10
    # the reference objective is the usual mean-reduced torch loss + weight decay
    J = batch_objective(model, X, Y, loss, wd)
    out = model(X)
    base = F.mse_loss(out, Y) if loss == "mse" else F.cross_entropy(out, Y)
    sq = sum((p**2).sum() for p in model.parameters())
    assert torch.allclose(J, base + 0.5 * wd * sq, atol=1e-14)


def test_per_sample_value_gradients_match_autograd() -> None:
    model = make_cnn()
    X, Y = data("cnn", 3)
    P = per_sample_value_gradients(model, X, Y, "cross_entropy")
    acts = [X.clone().requires_grad_(True)]
    h = acts[0]
    for m in model:
        h = m(h)
        h.retain_grad()
        acts.append(h)
    F.cross_entropy(h, Y, reduction="sum").backward()
    # stage inputs: X, Flatten output (input of the Linear), and the logits
    for p, a in zip(P, [acts[0], acts[3], acts[4]], strict=True):
        assert torch.allclose(p, a.grad.reshape(3, -1), atol=1e-13)


# ---------------------------------------------------- §4.3 / §4.4 identities
@pytest.mark.parametrize("case", [_linear_tanh_case, _conv_tanh_case], ids=["linear", "conv"])
def test_gn_outer_product_identities(case) -> None:
    st, _, n = case()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, generator=g, dtype=DT)
    v = torch.randn(st.n_out, generator=g, dtype=DT)
    u = st.get_u()
    Q = q_terms(st, x, u, v, torch.outer(v, v), weight_decay=0.0, second_order_terms=False)
    q, p = Q.Qu, Q.Qx
    assert torch.allclose(Q.Quu, torch.outer(q, q), atol=1e-13)
    assert torch.allclose(Q.Qux, torch.outer(q, p), atol=1e-13)
    assert torch.allclose(Q.Qxx, torch.outer(p, p), atol=1e-13)
    eps = 0.37
    M = torch.outer(q, q) + eps * torch.eye(q.numel(), dtype=DT)
    dx = torch.randn(n, generator=g, dtype=DT)
    K = torch.linalg.solve(M, Q.Qux)
    qq = q @ q
    assert torch.allclose(K @ dx, q * (p @ dx) / (eps + qq), atol=1e-12)
    c = 1 - q @ torch.linalg.solve(M, q)
    assert torch.allclose(c, eps / (eps + qq), atol=1e-12)
    Vx = Q.Qx - Q.Qux.T @ torch.linalg.solve(M, Q.Qu)
    Vxx = Q.Qxx - Q.Qux.T @ K
    assert torch.allclose(Vx, c * p, atol=1e-12)
    assert torch.allclose(Vxx, c * torch.outer(p, p), atol=1e-12)


def test_batch_reweighting_identity_linear_layer() -> None:
    """sum_i s_i q_i = G^T diag(s) A (weight) and G^T s (bias), q_i from explicit Jacobians."""
    model = make_mlp((5, 4, 3, 2))
    X, Y = data("mlp", 6)
    t = 1
    st = stages(model)[t]
    xs = trajectory(model, X)
    P = per_sample_value_gradients(model, X, Y, "cross_entropy")
    u = st.get_u()
    q = []
    for i in range(6):
        _, fu = stage_jacobians(st, xs[t][i], u)
        q.append(fu.T @ P[t + 1][i])
    q = torch.stack(q)  # (B, m)
    # independent G (grad of each sample's loss w.r.t. the pre-activation) and A (layer input)
    A = xs[t]
    H = F.linear(A, st.module.weight, st.module.bias).detach().requires_grad_(True)
    out = model[4](torch.tanh(H))
    F.cross_entropy(out, Y, reduction="sum").backward()
    G = H.grad
    s = torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(2))
    lhs = (s[:, None] * q).sum(0)
    assert torch.allclose(lhs[:12].view(3, 4), G.T @ torch.diag(s) @ A, atol=1e-13)
    assert torch.allclose(lhs[12:], G.T @ s, atol=1e-13)


# -------------------------------------------------- closed-loop GN (§7.1)
def _setup(kind: str):
    if kind == "mlp":
        return make_mlp((5, 4, 3, 2)), *data("mlp", 4)
    return make_cnn(), *data("cnn", 3)


def _sgd_step(model, X, Y, lr, wd) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    opt.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    opt.step()


def _max_diff(a: nn.Module, b: nn.Module) -> list[float]:
    """Largest absolute parameter difference, per parametric module (= per stage)."""
    out = []
    for ma, mb in zip(param_modules(a), param_modules(b), strict=True):
        pairs = zip(ma.parameters(), mb.parameters(), strict=True)
        out.append(max((p - q).abs().max().item() for p, q in pairs))
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_closed_loop_gn_without_feedback_is_sgd(kind: str) -> None:
    model, X, Y = _setup(kind)
    sgd = copy.deepcopy(model)
    closed_loop_gn_step(model, X, Y, "cross_entropy", lr=0.5, feedback_scale=0.0, weight_decay=0.01)
    _sgd_step(sgd, X, Y, lr=0.5, wd=0.01)
    assert max(_max_diff(model, sgd)) < 1e-13


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_closed_loop_gn_feedback_only_after_first_stage(kind: str) -> None:
    model, X, Y = _setup(kind)
    sgd = copy.deepcopy(model)
    closed_loop_gn_step(model, X, Y, "cross_entropy", lr=0.5, feedback_scale=1.0, weight_decay=0.01)
    _sgd_step(sgd, X, Y, lr=0.5, wd=0.01)
    diffs = _max_diff(model, sgd)
    assert diffs[0] < 1e-13  # dx_0 = 0: no feedback on the first stage
    assert min(diffs[1:]) > 1e-5  # the feedback changes every later stage


def _reweighted_step(model, X, Y, loss, lr, beta, wd) -> None:
    """Independent (1/B) sum_i (1 + s_i) q_i form with autograd per-sample gradients."""
    B = X.shape[0]
    mods = param_modules(model)
    h = X.clone().requires_grad_(True)
    nominal_in = []
    for m in model:
        if m in mods:
            h.retain_grad()
            nominal_in.append(h)
        h = m(h)
    losses = per_sample_losses(h, Y, loss)
    losses.sum().backward(retain_graph=True)
    # (read P before the per-sample autograd.grad calls, which also feed retain_grad hooks)
    P = [a.grad.reshape(B, -1).clone() for a in nominal_in]
    q = [
        [torch.autograd.grad(losses[i], list(m.parameters()), retain_graph=True) for i in range(B)]
        for m in mods
    ]
    with torch.no_grad():
        h, t = X, 0
        for m in model:
            if m in mods:
                dx = (h - nominal_in[t]).reshape(B, -1)
                s = beta * (P[t] * dx).sum(1)
                for j, p in enumerate(m.parameters()):
                    d = sum((1 + s[i]) * q[t][i][j] for i in range(B)) / B + wd * p
                    p -= lr * d
                t += 1
            h = m(h)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_closed_loop_gn_matches_reweighted_form(kind: str) -> None:
    model, X, Y = _setup(kind)
    other = copy.deepcopy(model)
    closed_loop_gn_step(model, X, Y, "cross_entropy", lr=0.4, feedback_scale=0.7, weight_decay=0.02)
    _reweighted_step(other, X, Y, "cross_entropy", lr=0.4, beta=0.7, wd=0.02)
    assert max(_max_diff(model, other)) < 1e-12


# ------------------------------------------------------- vanilla batch DDP
def _stacked_ddp_step(model, X, Y, lr, wd, second_order_terms=True, drop_cross=True) -> None:
    """Independent batch DDP on the stacked state X_t = concat_i x_t^(i) (tanh MLP, CE).

    Q-derivatives are the autograd Hessian of Q(X, u) = wd/2|u|^2 + V'(F(X, u)) with the
    quadratic value model V'; textbook Tassa-form value update on the full (Bn x Bn) V_XX,
    whose cross-sample blocks are zeroed if ``drop_cross``.
    """
    B = X.shape[0]
    lins = param_modules(model)
    T = len(lins)

    def Ft(t: int, Xf: Tensor, u: Tensor) -> Tensor:
        lin = lins[t]
        W = u[: lin.weight.numel()].view_as(lin.weight)
        H = Xf.view(B, -1) @ W.T + u[lin.weight.numel() :]
        return (torch.tanh(H) if t < T - 1 else H).reshape(-1)

    us = [torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]) for m in lins]
    xs = [X.reshape(-1)]
    for t in range(T):
        xs.append(Ft(t, xs[-1], us[t]).detach())

    def phi(Z: Tensor) -> Tensor:
        return F.cross_entropy(Z.view(B, -1), Y)

    Vx, Vxx = jacobian(phi, xs[-1]), hessian(phi, xs[-1])
    gains = [None] * T
    for t in reversed(range(T)):
        n, m = xs[t].numel(), us[t].numel()
        y0 = xs[t + 1]

        def Q(Xf, u, t=t, y0=y0, Vx=Vx, Vxx=Vxx):
            d = Ft(t, Xf, u) - y0
            return 0.5 * wd * u @ u + Vx @ d + 0.5 * d @ Vxx @ d

        Qx, Qu = jacobian(Q, (xs[t], us[t]))
        if second_order_terms:
            H = hessian(Q, (xs[t], us[t]))
            Qxx, Quu, Qux = H[0][0], H[1][1], H[1][0]
        else:
            Jx, Ju = jacobian(lambda a, b, t=t: Ft(t, a, b), (xs[t], us[t]))
            Qxx, Qux = Jx.T @ Vxx @ Jx, Ju.T @ Vxx @ Jx
            Quu = Ju.T @ Vxx @ Ju + wd * torch.eye(m, dtype=DT)
        lam, U = torch.linalg.eigh(0.5 * (Quu + Quu.T))
        Qinv = U @ torch.diag(1.0 / (lam.clamp(min=0) + 1 / lr)) @ U.T
        k, K = Qinv @ Qu, Qinv @ Qux  # K: (m, B n)
        Vx = Qx + K.T @ Quu @ k - K.T @ Qu - Qux.T @ k
        Vxx = Qxx + K.T @ Quu @ K - K.T @ Qux - Qux.T @ K
        if drop_cross:
            mask = torch.block_diag(*[torch.ones(n // B, n // B, dtype=DT)] * B)
            Vxx = Vxx * mask
        gains[t] = (k, K)
    with torch.no_grad():
        xhat = xs[0]
        for t, lin in enumerate(lins):
            k, K = gains[t]
            u = us[t] - (k + K @ (xhat - xs[t]))
            lin.weight.copy_(u[: lin.weight.numel()].view_as(lin.weight))
            lin.bias.copy_(u[lin.weight.numel() :])
            xhat = Ft(t, xhat, u)


@pytest.mark.parametrize(
    "B, second_order_terms", [(1, True), (3, True), (3, False)], ids=["B1", "B3", "B3-GN"]
)
def test_batch_ddp_matches_stacked_textbook_ddp(B: int, second_order_terms: bool) -> None:
    model = make_mlp((4, 3, 3, 2), seed=2)
    g = torch.Generator().manual_seed(8)
    X, Y = torch.randn(B, 4, generator=g, dtype=DT), torch.randint(0, 2, (B,), generator=g)
    lr, wd = 2.0, 0.01
    ours, oracle = copy.deepcopy(model), copy.deepcopy(model)
    ddp_step(ours, X, Y, "cross_entropy", lr, wd, second_order_terms)
    _stacked_ddp_step(oracle, X, Y, lr, wd, second_order_terms, drop_cross=True)
    assert max(_max_diff(ours, oracle)) < 1e-10
    assert max(_max_diff(ours, model)) > 1e-2  # a real step was taken
    if B > 1:  # the test can see the per-sample split: keeping cross blocks changes the result
        exact = copy.deepcopy(model)
        _stacked_ddp_step(exact, X, Y, lr, wd, second_order_terms, drop_cross=False)
        assert max(_max_diff(ours, exact)) > 1e-8


def test_ddp_single_linear_layer_reaches_least_squares_optimum() -> None:
    """Quadratic objective + lr -> infinity: one DDP step is the exact (ridge) minimiser."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X, Y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    wd = 1e-3
    g0 = torch.cat([g.reshape(-1) for g in _autograd_grads(model, X, Y, "mse", wd)])
    ddp_step(model, X, Y, "mse", lr=1e12, weight_decay=wd)
    g1 = torch.cat([g.reshape(-1) for g in _autograd_grads(model, X, Y, "mse", wd)])
    assert g0.norm() > 0.1 and g1.norm() < 1e-9


def test_ddp_small_lr_is_gradient_descent() -> None:
    model = make_mlp((5, 4, 3, 2))
    X, Y = data("mlp", 5)
    lr, wd = 1e-7, 0.05
    grads = _autograd_grads(model, X, Y, "cross_entropy", wd)
    before = [st.get_u() for st in stages(model)]
    ddp_step(model, X, Y, "cross_entropy", lr=lr, weight_decay=wd)
    after = [st.get_u() for st in stages(model)]
    for u0, u1, gr in zip(before, after, grads, strict=True):
        assert torch.allclose((u1 - u0) / lr, -gr, rtol=1e-5, atol=1e-7)


def test_regularized_curvature() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=DT)
    psd = A @ A.T
    assert torch.allclose(regularized_curvature(psd, 0.5), psd + 2 * torch.eye(5, dtype=DT))
    indefinite = A + A.T
    lam = torch.linalg.eigvalsh(regularized_curvature(indefinite, 0.5))
    assert torch.linalg.eigvalsh(indefinite).min() < 0 and lam.min() >= 2 - 1e-12


def test_vanilla_ddp_optimizer_decreases_loss() -> None:
    model = make_mlp((4, 6, 3), seed=1)
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
    opt = VanillaDDP(model, lr=3.0, weight_decay=1e-4, loss="cross_entropy")
    losses = []
    for _ in range(5):
        val = opt.step(lambda: F.cross_entropy(model(X), Y), inputs=X, targets=Y)
        assert val.dim() == 0
        losses.append(val.item())
    final = F.cross_entropy(model(X), Y).item()
    assert all(b < a for a, b in zip(losses, losses[1:] + [final], strict=True))
    assert final < 0.5 * losses[0]
    # step_batch returns the same loss as the closure would; lr is read from param_groups
    opt.param_groups[0]["lr"] = 1e-12
    before = [p.detach().clone() for p in model.parameters()]
    assert abs(opt.step_batch(X, Y).item() - final) < 1e-12
    assert all(
        torch.allclose(p, q, atol=1e-9) for p, q in zip(model.parameters(), before, strict=True)
    )
    with pytest.raises(ValueError):
        opt.step(lambda: F.cross_entropy(model(X), Y))
