"""Brute-force float64 DDP on tiny sequential networks (the test oracle of ``ocnopt``).

Every derivative is an explicit matrix from ``torch.autograd.functional``; nothing is fused,
factorised or re-weighted.  See algorithm.md §3 (exact expansion), §4.2-4.5 (GN, rank-one
value Hessian, batch DDP) and §7.1 (closed-loop step).

Sign convention (algorithm.md §1): the optimal policy is

    du*(dx) = -(k + K dx),     k = Q_uu^{-1} Q_u,   K = Q_uu^{-1} Q_ux,

i.e. ``k`` and ``K`` are stored with the sign that makes them look like a gradient and are
*subtracted*.  In the Tassa-form value update we write k~ = -k, K~ = -K for the applied gains.

Batch convention (algorithm.md §4.5): the B samples share the control u_t; the batch state is
the stack of per-sample states x_t^(i).  Per-sample value derivatives are carried as
V_x^(i) (n_t,) and V_xx^(i) (n_t, n_t) (the cross-sample blocks of V_XX are dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian

from .model import (
    LossSpec,
    Stage,
    _split,
    loss_derivatives,
    per_sample_loss,
    preprocess,
    stages,
    trajectory,
)

__all__ = [
    "QTerms",
    "Policy",
    "stage_jacobians",
    "tensor_terms",
    "q_terms",
    "per_sample_value_gradients",
    "first_order_dp",
    "closed_loop_gn_step",
    "regularized_curvature",
    "ddp_backward",
    "ddp_forward_update",
    "ddp_step",
    "VanillaDDP",
]

logger = logging.getLogger(__name__)


class QTerms(NamedTuple):
    """Derivatives of the Bellman objective Q_t(x, u) at the nominal point, ONE sample.

    Shapes: Qx (n,), Qu (m,), Qxx (n, n), Quu (m, m), Qux (m, n).
    """

    Qx: Tensor
    Qu: Tensor
    Qxx: Tensor
    Quu: Tensor
    Qux: Tensor


@dataclass
class Policy:
    """Affine feedback policy of one stage, spec sign convention.

    The applied update is ``u <- u - (k + sum_i K[i] @ (xhat^(i) - x_nominal^(i)))``.
    The learning rate is already folded into k and K (they are built with the regularised
    curvature Q~ = clip(Q_uu) + (1/lr) I, see :func:`regularized_curvature`).

    Attributes:
        k: (m,) open-loop term Q~^{-1} Q_u.
        K: (B, m, n) per-sample feedback gains Q~^{-1} Q_ux^(i).
        x_nominal: (B, n) nominal states x_t^(i) at which the policy was built.
    """

    k: Tensor
    K: Tensor
    x_nominal: Tensor


# ----------------------------------------------------------------- derivatives
def stage_jacobians(stage: Stage, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Explicit Jacobians of f_t at (x, u), one sample.

    Returns:
        f_x (n_{t+1}, n_t) and f_u (n_{t+1}, m_t).
    """
    fx, fu = jacobian(stage.f, (x.detach(), u.detach()), vectorize=True)
    return fx, fu


def tensor_terms(stage: Stage, x: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Second-order tensor contractions v . f_** = sum_k v_k Hess f^(k), one sample.

    Computed as the Hessian of the scalar g(x, u) = <v, f(x, u)> with v held fixed, which is
    exactly the contraction of v with the per-component Hessians of f.

    Returns:
        (v.f_xx (n, n), v.f_uu (m, m), v.f_ux (m, n)).
    """
    v = v.detach()
    H = hessian(lambda xx, uu: v @ stage.f(xx, uu), (x.detach(), u.detach()), vectorize=True)
    return H[0][0], H[1][1], H[1][0]


def q_terms(
    stage: Stage,
    x: Tensor,
    u: Tensor,
    Vx_next: Tensor,
    Vxx_next: Tensor,
    weight_decay: float = 0.0,
    second_order_terms: bool = True,
) -> QTerms:
    """Exact second-order expansion of Q(x, u) = (gamma/2)||u||^2 + V'(f(x, u)) (§3.2).

    ::

        Q_x  = f_x^T V'_x                    Q_u  = gamma u + f_u^T V'_x
        Q_xx = f_x^T V'_xx f_x + V'_x.f_xx   Q_uu = gamma I + f_u^T V'_xx f_u + V'_x.f_uu
        Q_ux = f_u^T V'_xx f_x + V'_x.f_ux

    With ``second_order_terms=False`` the V'_x.f_** tensor terms are dropped (Gauss-Newton,
    §4.2).

    Args:
        x: (n,) nominal state; u: (m,) nominal control.
        Vx_next: (n',) and Vxx_next: (n', n'): value derivatives at x' = f(x, u).
    """
    fx, fu = stage_jacobians(stage, x, u)
    Qx = fx.T @ Vx_next
    Qu = fu.T @ Vx_next + weight_decay * u
    Qxx = fx.T @ Vxx_next @ fx
    Quu = fu.T @ Vxx_next @ fu + weight_decay * torch.eye(u.numel(), dtype=u.dtype)
    Qux = fu.T @ Vxx_next @ fx
    if second_order_terms:
        Txx, Tuu, Tux = tensor_terms(stage, x, u, Vx_next)
        Qxx, Quu, Qux = Qxx + Txx, Quu + Tuu, Qux + Tux
    return QTerms(Qx, Qu, Qxx, Quu, Qux)


def _all_jacobians(
    sts: list[Stage], xs: list[Tensor], us: list[Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """Per-sample Jacobians for every stage: [(F_x (B, n', n), F_u (B, n', m)), ...]."""
    out = []
    for st, X, u in zip(sts, xs[:-1], us, strict=True):
        pairs = [stage_jacobians(st, X[i], u) for i in range(X.shape[0])]
        out.append((torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
    return out


def _terminal_gradients(loss: LossSpec, XT: Tensor, Y: Tensor) -> Tensor:
    """Per-sample grad phi(x_T^(i), y_i): (B, n_T)."""
    return torch.stack([loss_derivatives(loss, XT[i], Y[i])[0] for i in range(XT.shape[0])])


def per_sample_value_gradients(
    model: nn.Module, X: Tensor, Y: Tensor, loss: LossSpec
) -> list[Tensor]:
    """Backprop value gradients p_t^(i) = d l_i / d x_t^(i) for t = 0..T (§3.1).

    ``l_i = phi(x_T^(i), y_i)`` is sample i's OWN (unscaled) loss.  Computed by the explicit
    recursion V_x^T = grad phi, V_x^t = f_x^T V_x^{t+1}.

    Returns:
        [P_0, ..., P_T], P_t (B, n_t).
    """
    sts = stages(model, X.shape[1:])
    xs = trajectory(model, X)
    jac = _all_jacobians(sts, xs, [st.get_u() for st in sts])
    P = [_terminal_gradients(loss, xs[-1], Y)]
    for Fx, _ in reversed(jac):
        P.insert(0, torch.einsum("bij,bi->bj", Fx, P[0]))
    return P


# --------------------------------------------------------------- first order
def first_order_dp(
    model: nn.Module, X: Tensor, Y: Tensor, loss: LossSpec, weight_decay: float = 0.0
) -> list[Tensor]:
    """Theorem 1 (§3.1): first-order DP with V_xx := 0 reproduces backprop.

    Per sample: V_x^T = grad phi_i, Q_u^(i) = f_u^T V_x^{t+1}, V_x^t = Q_x^t = f_x^T V_x^{t+1}.
    Batch: Q_u^t = (1/B) sum_i Q_u^(i) + gamma u_t, which equals dJ/du_t.

    Returns:
        [Q_u^0, ..., Q_u^{T-1}], Q_u^t (m_t,) in the ``Stage.get_u`` layout.
    """
    sts = stages(model, X.shape[1:])
    xs = trajectory(model, X)
    us = [st.get_u() for st in sts]
    B = X.shape[0]
    Qu = [torch.zeros_like(u) for u in us]
    for i in range(B):
        V = loss_derivatives(loss, xs[-1][i], Y[i])[0]
        for t in reversed(range(len(sts))):
            fx, fu = stage_jacobians(sts[t], xs[t][i], us[t])
            Qu[t] += fu.T @ V
            V = fx.T @ V  # V_x^t = Q_x^t (no Q_ux correction since V_xx = 0)
    return [q / B + weight_decay * u for q, u in zip(Qu, us, strict=True)]


# ---------------------------------------------------------- closed-loop (GN)
@torch.no_grad()
def closed_loop_gn_step(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    loss: LossSpec,
    lr: float,
    feedback_scale: float = 1.0,
    weight_decay: float = 0.0,
) -> None:
    """One DDPNOpt closed-loop step with identity curvature, GN, rank-one V_xx (§4.3, §7.1).

    Brute force, explicit matrices (no re-weighting shortcut):

    * V_x^{t+1,(i)} = d l_i / d x_{t+1}^(i) (backprop gradient of sample i's own loss);
    * V'_xx^(i) = beta V_x^{t+1,(i)} V_x^{t+1,(i)T}   (beta = ``feedback_scale``);
    * Q_u^(i) = f_u^T V_x^{t+1,(i)},  Q_ux^(i) = f_u^T V'_xx^(i) f_x   (m, n);
    * closed-loop forward, t = 0..T-1: dx^(i) = xhat_t^(i) - x_t^(i),
      u_t <- u_t - lr [ (1/B) sum_i (Q_u^(i) + Q_ux^(i) dx^(i)) + gamma u_t ],
      xhat_{t+1} = f_t(xhat_t, u_t_new).

    Equivalent to u_t <- u_t - lr [(1/B) sum_i (1 + s_i) Q_u^(i) + gamma u_t] with
    s_i = beta <V_x^{t,(i)}, dx^(i)>.  Updates ``model`` in place.

    Args:
        X: (B, ...) inputs; Y: (B,) class indices or (B, n_T) regression targets.
    """
    sts = stages(model, X.shape[1:])
    xs = trajectory(model, X)
    us = [st.get_u() for st in sts]
    B = X.shape[0]
    with torch.enable_grad():
        jac = _all_jacobians(sts, xs, us)
        V = [_terminal_gradients(loss, xs[-1], Y)]
        for Fx, _ in reversed(jac):
            V.insert(0, torch.einsum("bij,bi->bj", Fx, V[0]))
    qu: list[Tensor] = []  # (B, m) per stage
    qux: list[Tensor] = []  # (B, m, n) per stage
    for t, (Fx, Fu) in enumerate(jac):
        qu_t, qux_t = [], []
        for i in range(B):
            v = V[t + 1][i]
            Vxx = feedback_scale * torch.outer(v, v)
            qu_t.append(Fu[i].T @ v)
            qux_t.append(Fu[i].T @ Vxx @ Fx[i])
        qu.append(torch.stack(qu_t))
        qux.append(torch.stack(qux_t))

    xhat = xs[0]
    for t, st in enumerate(sts):
        dx = xhat - xs[t]
        d = sum(qu[t][i] + qux[t][i] @ dx[i] for i in range(B)) / B + weight_decay * us[t]
        st.set_u(us[t] - lr * d)
        logger.debug("closed-loop GN stage %d: |dx|=%.3e |d|=%.3e", t, dx.norm(), d.norm())
        xhat = st.forward_batch(xhat)


# ------------------------------------------------------------ vanilla DDP
def regularized_curvature(Quu: Tensor, lr: float) -> Tensor:
    """Q~ = U diag(max(lambda, 0) + 1/lr) U^T for Q_uu = U diag(lambda) U^T.

    Equals Q_uu + (1/lr) I when Q_uu is positive semi-definite; negative eigenvalues are
    clipped to 0 first, so Q~ >= (1/lr) I always and the step is well defined even when
    Q_uu is indefinite.  As lr -> 0, Q~^{-1} -> lr I (gradient descent, §3.1).
    """
    Quu = 0.5 * (Quu + Quu.T)
    lam, U = torch.linalg.eigh(Quu)
    n_neg = int((lam < 0).sum())
    if n_neg:
        logger.debug("regularized_curvature: clipped %d negative eigenvalue(s)", n_neg)
    return (U * (lam.clamp(min=0.0) + 1.0 / lr)) @ U.T


def ddp_backward(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    loss: LossSpec,
    weight_decay: float = 0.0,
    lr: float = 1.0,
    second_order_terms: bool = True,
) -> list[Policy]:
    """Backward pass of vanilla batch DDP with exact second-order terms (§3.2, §3.3, §4.5).

    Terminal, per sample (batch-mean objective): V_x^(i) = grad phi_i / B,
    V_xx^(i) = Hess phi_i / B (exact, e.g. diag(p) - p p^T for softmax cross-entropy).

    Stage t, with per-sample terms q^(i) = ``q_terms(..., weight_decay=0)``::

        Q_u  = gamma u + sum_i q^(i).Qu          Q_uu = gamma I + sum_i q^(i).Quu
        Q_ux^(i), Q_x^(i), Q_xx^(i)  per sample  (block i of Q_uX, Q_X, diag block of Q_XX)
        Q~   = regularized_curvature(Q_uu, lr)
        k    = Q~^{-1} Q_u,   K^(i) = Q~^{-1} Q_ux^(i)     (applied: du = -(k + sum_i K^(i) dx^(i)))

    Value update (Tassa form with the applied gains k~ = -k, K~^(i) = -K^(i) and the
    UNregularised Q_uu, i.e. the exact value of the quadratic model under the applied policy)::

        V_x^(i)  = Q_x^(i)  + K~^(i)T Q_uu k~    + K~^(i)T Q_u     + Q_ux^(i)T k~
        V_xx^(i) = Q_xx^(i) + K~^(i)T Q_uu K~^(i) + K~^(i)T Q_ux^(i) + Q_ux^(i)T K~^(i)

    These are block i of the batch formulas V_X = Q_X + K~^T Q_uu k~ + K~^T Q_u + Q_uX^T k~
    and V_XX = Q_XX + K~^T Q_uu K~ + K~^T Q_uX + Q_uX^T K~ with K~ = [K~^(1) ... K~^(B)]:
    V_X is exact; of V_XX only the diagonal blocks are kept (the cross-sample blocks
    K~^(i)T Q_uu K~^(j) + K~^(i)T Q_ux^(j) + Q_ux^(i)T K~^(j), i != j, are dropped).
    With B = 1 this is exactly textbook (Tassa-regularised) DDP.

    Returns:
        policies for t = 0..T-1.
    """
    sts = stages(model, X.shape[1:])
    xs = trajectory(model, X)
    us = [st.get_u() for st in sts]
    B = X.shape[0]
    grads_hess = [loss_derivatives(loss, xs[-1][i], Y[i]) for i in range(B)]
    Vx = [g / B for g, _ in grads_hess]
    Vxx = [H / B for _, H in grads_hess]
    policies: list[Policy] = []
    for t in reversed(range(len(sts))):
        u = us[t]
        m = u.numel()
        qs = [
            q_terms(sts[t], xs[t][i], u, Vx[i], Vxx[i], 0.0, second_order_terms) for i in range(B)
        ]
        Qu = weight_decay * u + sum(q.Qu for q in qs)
        Quu = weight_decay * torch.eye(m, dtype=u.dtype) + sum(q.Quu for q in qs)
        Quu = 0.5 * (Quu + Quu.T)
        Qt = regularized_curvature(Quu, lr)
        k = torch.linalg.solve(Qt, Qu)
        K = torch.stack([torch.linalg.solve(Qt, q.Qux) for q in qs])
        kt, Kt = -k, -K
        new_Vx, new_Vxx = [], []
        for i, q in enumerate(qs):
            new_Vx.append(q.Qx + Kt[i].T @ Quu @ kt + Kt[i].T @ Qu + q.Qux.T @ kt)
            Vxx_i = q.Qxx + Kt[i].T @ Quu @ Kt[i] + Kt[i].T @ q.Qux + q.Qux.T @ Kt[i]
            new_Vxx.append(0.5 * (Vxx_i + Vxx_i.T))
        Vx, Vxx = new_Vx, new_Vxx
        if logger.isEnabledFor(logging.DEBUG):
            lam = torch.linalg.eigvalsh(Quu)
            msg = "ddp_backward stage %d: |Q_u|=%.3e eig(Q_uu) in [%.3e, %.3e] |k|=%.3e"
            logger.debug(msg, t, Qu.norm(), lam[0], lam[-1], k.norm())
        policies.insert(0, Policy(k=k, K=K, x_nominal=xs[t]))
    return policies


@torch.no_grad()
def ddp_forward_update(model: nn.Module, X: Tensor, policies: list[Policy]) -> list[Tensor]:
    """Sequential closed-loop forward pass (§3.5), updates ``model`` in place.

    xhat_0 = x_0; for t: dx^(i) = xhat_t^(i) - x_t^(i),
    u_t <- u_t - (k_t + sum_i K_t^(i) dx^(i)), xhat_{t+1} = f_t(xhat_t, u_t_new).

    Returns:
        [xhat_0, ..., xhat_T], xhat_t (B, n_t): the trajectory under the new controls.
    """
    sts = stages(model, X.shape[1:])
    if len(policies) != len(sts):
        raise ValueError(f"got {len(policies)} policies for {len(sts)} stages")
    xhat = [preprocess(model, X)]
    for st, pol in zip(sts, policies, strict=True):
        dx = xhat[-1] - pol.x_nominal
        du = -(pol.k + torch.einsum("bmn,bn->m", pol.K, dx))
        st.set_u(st.get_u() + du)
        xhat.append(st.forward_batch(xhat[-1]))
    return xhat


def ddp_step(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    loss: LossSpec,
    lr: float,
    weight_decay: float = 0.0,
    second_order_terms: bool = True,
) -> Tensor:
    """One vanilla batch-DDP iteration (backward + closed-loop forward), in place.

    Returns:
        the mean data loss (1/B) sum_i phi_i at the parameters BEFORE the step (scalar).
    """
    phi = per_sample_loss(loss)
    XT = trajectory(model, X)[-1]
    before = torch.stack([phi(XT[i], Y[i]) for i in range(X.shape[0])]).mean()
    policies = ddp_backward(model, X, Y, loss, weight_decay, lr, second_order_terms)
    ddp_forward_update(model, X, policies)
    return before.detach()


class VanillaDDP(torch.optim.Optimizer):
    """Vanilla batch DDP (exact Q_uu, full per-sample feedback) as a torch optimizer.

    Meant for tiny nets only (cost grows like B * (n + m)^2 Hessian entries per stage).
    The DDP step needs the minibatch itself, so it is passed explicitly::

        opt = VanillaDDP(model, lr=0.5, weight_decay=1e-4, loss="cross_entropy")
        for X, Y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(X), Y), inputs=X, targets=Y)
            # or: loss = opt.step_batch(X, Y)

    The closure must return the mean-reduced loss and must NOT call ``backward``; it is only
    evaluated (under ``no_grad``, before the update) to produce the returned loss.  ``lr`` and
    ``weight_decay`` are read from ``param_groups[0]`` at every step, so LR schedulers work.
    ``lr`` enters as the proximal weight: Q~ = clip(Q_uu) + (1/lr) I.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        second_order_terms: bool = True,
        loss: LossSpec = "cross_entropy",
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "second_order_terms": second_order_terms,
        }
        super().__init__(model.parameters(), defaults)
        _split(model)  # validate the architecture early
        self.model = model
        self.loss = loss

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Tensor:
        """One DDP step on the minibatch (inputs (B, ...), targets (B,) or (B, n_T)).

        Returns:
            ``closure()`` if given, else the mean data loss, both before the update.
        """
        if inputs is None or targets is None:
            raise ValueError("VanillaDDP.step needs the batch: step(closure, inputs=X, targets=Y)")
        group = self.param_groups[0]
        before = None
        if closure is not None:
            with torch.no_grad():
                before = closure()
        mean_loss = ddp_step(
            self.model,
            inputs,
            targets,
            self.loss,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            second_order_terms=group["second_order_terms"],
        )
        return mean_loss if before is None else before

    def step_batch(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Same as ``step(inputs=inputs, targets=targets)``; returns the loss before the step."""
        return self.step(inputs=inputs, targets=targets)
