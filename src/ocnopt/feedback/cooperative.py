"""Cooperative players: the joint minimiser of a stage's quadratic model.

Players ``n = 1..N`` read the same tensor and decide together (``docs/game-theory.md``).  With
per-sample gradients ``q_n,i`` of sample ``i``'s own loss, sample weights ``w0_i = 1 + s_i`` from
the stage's feedback, the cross terms ``Q_nm = (beta / B) sum_i q_n,i q_m,i^T`` and each member's
step modelled as ``delta theta_n = -(L_n d_n + D_n)`` (``L_n = lr M_n^-1``, ``D_n`` the weight-decay
part; identity curvature: ``L = lr I``, ``D = lr gamma theta``), the stationary point is

    d_n = (1/B) sum_i w_n,i q_n,i,     w_n = w0 + beta sum_{m != n} r_m,
    r_m,i = <q_m,i, delta theta_m>,

where the per-sample changes ``r`` solve ``r_n + K_n sum_{m != n} r_m = a_n`` with
``K_n = (beta / B) G_n``, ``a_n = -(G_n w0 / B + v_n)``, ``G_n[i, j] = <q_n,i, L_n q_n,j>`` and
``v_n,i = <q_n,i, D_n>``.  It is a minimiser iff ``I + (beta / B) G^1/2 E G^1/2`` is positive
definite (``G = blkdiag(G_n)``, ``E`` the block pattern ``(J - I) (x) I_B``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt.curvature.kronecker import Projection
from ocnopt.curvature.layer_state import KroneckerCurvature, bases
from ocnopt.layers.base import LayerHelper

__all__ = ["StepModel", "step_model", "per_sample_grads", "per_sample_gram", "output_inner",
           "update_effect", "joint_weights", "Member", "cooperative_weights"]


@dataclass
class StepModel:
    """A layer's step as a linear response to its direction: ``delta theta = -(L d + D)``.

    ``scale``: a diagonal ``L`` as a number or a direction-shaped matrix ``(d_out, d_in[+1])``
    (bias column last), or ``None`` when ``apply`` gives ``L`` on a batch of direction matrices
    ``(B, d_out, d_in[+1])``.  ``decay``: ``D`` as (weight-shaped, bias-shaped or None).
    """

    scale: Tensor | float | None
    apply: Callable[[Tensor], Tensor] | None
    decay: tuple[Tensor, Tensor | None]

    def __call__(self, q: Tensor) -> Tensor:
        return q * self.scale if self.scale is not None else self.apply(q)  # type: ignore[misc]


def _diagonal(helper: LayerHelper, wscale: Tensor | float, bscale: Tensor | float | None
              ) -> Tensor | float:
    """A per-parameter diagonal as a number (if uniform) or a direction-shaped matrix."""
    if not isinstance(wscale, Tensor) and (bscale is None or bscale == wscale):
        return wscale
    w = helper.weight
    ws = wscale if isinstance(wscale, Tensor) else torch.full_like(w, wscale)
    bs = None
    if helper.bias is not None:
        bs = bscale if isinstance(bscale, Tensor) else torch.full_like(helper.bias, bscale)
    return helper.to_matrix(ws, bs)


def step_model(
    curvature: str,
    helper: LayerHelper,
    states: tuple[Mapping[str, Any], Mapping[str, Any] | None],
    groups: tuple[Mapping[str, Any], Mapping[str, Any] | None],
    kron: KroneckerCurvature | None = None,
) -> StepModel | None:
    """The step model of one layer under ``curvature`` with ``M`` as the optimizer state stands
    before the step (EKFAC: before this step's second-moment update), weight and bias states and
    param groups given; ``None`` where the state has no ``M`` yet (RMSprop/Adam before their
    first step).  Momentum is not modelled (its accumulated gain is one, as for the feedback);
    a Kronecker layer uses the weight's learning rate for its bias too."""
    w, b = helper.weight, helper.bias
    (ws, bs), (wg, bg) = states, groups
    lr_w = wg["lr"]
    lr_b = bg["lr"] if b is not None and bg is not None else lr_w
    wd_b = bg["weight_decay"] if b is not None and bg is not None else 0.0
    if kron is not None:
        out, inp = bases(ws, w.shape[0], w[0].numel() + int(b is not None), w)
        blocks = kron.inverse_scale(ws, wg, out, inp)

        def inverse(v: Tensor) -> Tensor:
            return Projection(v, out, inp).apply(blocks)

        decay = inverse(helper.to_matrix(w * wg["weight_decay"], None if b is None else b * wd_b))
        return StepModel(None, lambda q: torch.func.vmap(inverse)(q) * lr_w,
                         helper.from_matrix(decay * lr_w))
    params = [(w, ws, wg, lr_w, wg["weight_decay"])]
    if b is not None:
        params.append((b, bs or {}, bg or wg, lr_b, wd_b))
    scales: list[Tensor | float] = []
    decays: list[Tensor] = []
    for p, st, g, lr, wd in params:
        if curvature == "identity":
            scales.append(lr)
            decays.append(p * (lr * wd))
            continue
        if curvature == "rmsprop":
            if "square_avg" not in st:
                return None
            avg = st["square_avg"]
            if g["centered"]:
                avg = avg.addcmul(st["grad_avg"], st["grad_avg"], value=-1)
            denom = avg.sqrt().add_(g["eps"])
        else:  # adam
            if "exp_avg_sq" not in st:
                return None
            v = st["max_exp_avg_sq"] if g["amsgrad"] else st["exp_avg_sq"]
            denom = v.sqrt().div_((1 - g["betas"][1] ** float(st["step"])) ** 0.5).add_(g["eps"])
        scales.append(lr / denom)
        decoupled = curvature == "adam" and g["decoupled_weight_decay"]
        decays.append(p * (lr * wd) if decoupled else p * (lr * wd) / denom)
    return StepModel(_diagonal(helper, scales[0], scales[1] if b is not None else None), None,
                     (decays[0], decays[1] if b is not None else None))


def per_sample_grads(helper: LayerHelper, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample gradients ``q_i`` of sample i's own loss as direction matrices
    ``(B, d_out, d_in[+1])`` (``g``: gradient of the batch-MEAN loss w.r.t. the layer output).
    Cost: ``O(B N d_out d_in)`` for ``N`` rows per sample, ``B d_out d_in`` memory."""
    B = x.shape[0]
    a = helper.input_rows(x)
    gr = helper.output_rows(g) * B
    rows = a.shape[0] // B
    return torch.bmm(gr.view(B, rows, -1).transpose(1, 2), a.view(B, rows, -1))


def per_sample_gram(helper: LayerHelper, x: Tensor, g: Tensor,
                    step: StepModel | None = None) -> Tensor:
    """``G[i, j] = <q_i, L q_j>``, ``(B, B)``, for the per-sample gradients ``q_i`` of sample
    i's own loss (``g``: gradient of the batch-MEAN loss w.r.t. the layer output, so
    ``q_i = B * (sample i's share)``); ``L`` from ``step`` (default the identity).

    Cost: ``O(B^2 (d_out + d_in))`` for a uniform diagonal ``L`` when every sample gives one
    row (Linear on ``(B, d)``), else :func:`per_sample_grads` and ``O(B^2 d_out d_in)`` for
    their Gram matrix (plus ``L`` on each of them).
    """
    B = x.shape[0]
    scale = 1.0 if step is None else step.scale
    if isinstance(scale, float):
        a = helper.input_rows(x)
        if a.shape[0] == B:
            gr = helper.output_rows(g) * B
            return (gr @ gr.T) * (a @ a.T) * scale
    q = per_sample_grads(helper, x, g)
    lq = q if step is None else step(q)
    return q.reshape(B, -1) @ lq.reshape(B, -1).T


def output_inner(g: Tensor, out: Tensor) -> Tensor:
    """``B * <g_i, out_i>`` per sample, ``(B,)``: with ``out`` a layer's output this is
    ``<q_i, theta>`` (the layer is linear in its weight and bias)."""
    B = g.shape[0]
    return (g * out).reshape(B, -1).sum(1) * B


def update_effect(module: nn.Module, x: Tensor, g: Tensor, dw: Tensor, db: Tensor | None) -> Tensor:
    """``r_i = <q_i, delta theta>`` for a parameter change ``(dw, db)`` of a Linear/Conv2d layer:
    the layer's map evaluated with the change as its parameters (no module hooks fire), ``(B,)``.
    """
    x = x.to(dw.dtype)
    if isinstance(module, nn.Conv2d):
        out = module._conv_forward(x, dw, db)
    elif isinstance(module, nn.Linear):
        out = F.linear(x, dw, db)
    else:
        raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(module).__name__}")
    return output_inner(g, out)


def joint_weights(
    grams: list[Tensor],
    inner: list[Tensor],
    w0: Tensor,
    lr: float,
    beta: float,
    weight_decay: float = 0.0,
) -> tuple[list[Tensor], list[Tensor], bool]:
    """Sample weights of the joint minimiser of a cooperative stage (``L = lr G``-scaled).

    Args:
        grams: per player ``G_n`` ``(B, B)`` (:func:`per_sample_gram`).
        inner: per player ``v_n,i`` ``(B,)``: ``<q_n,i, theta_n>`` (:func:`output_inner`) with
            ``lr``/``weight_decay`` the identity-curvature step, or ``<q_n,i, D_n>`` with
            ``lr = weight_decay = 1`` and ``grams`` of ``L_n``.
        w0: the stage's sample weights ``1 + s`` ``(B,)``.
        lr, beta, weight_decay: learning rate, ``feedback_scale`` and ``gamma``.
    Returns:
        ``(w, r, minimum)``: per player the sample weights ``w_n`` and the per-sample changes
        ``r_n``; ``minimum`` is False when the stage model is not positive definite, in which
        case the cross terms are dropped (``w_n = w0``).
    """
    n, B = len(grams), w0.numel()
    K = [(lr * beta / B) * G for G in grams]
    a = [-lr * (G @ w0 / B + weight_decay * v) for G, v in zip(grams, inner, strict=True)]
    roots = []
    for G in grams:
        lam, U = torch.linalg.eigh(0.5 * (G + G.T))
        roots.append((U * lam.clamp(min=0).sqrt()) @ U.T)
    T = torch.eye(n * B, dtype=w0.dtype, device=w0.device)
    A = torch.eye(n * B, dtype=w0.dtype, device=w0.device)
    for i in range(n):
        for j in range(n):
            if i != j:
                blk = (slice(i * B, (i + 1) * B), slice(j * B, (j + 1) * B))
                T[blk] = (lr * beta / B) * roots[i] @ roots[j]
                A[blk] = K[i]
    if torch.linalg.cholesky_ex(T).info.item() != 0:
        return [w0] * n, a, False
    r = list(torch.linalg.solve(A, torch.cat(a)).split(B))
    total = sum(r)
    return [w0 + beta * (total - ri) for ri in r], r, True


@dataclass
class Member:
    """A group member as the cooperative solve sees it: its module, helper, first-pass input
    ``x`` and output gradient ``g`` (of the batch-mean loss), and its step model."""

    module: nn.Module
    helper: LayerHelper
    x: Tensor
    g: Tensor
    step: StepModel


def cooperative_weights(members: list[Member], w0: Tensor, beta: float, maximize: bool = False
                        ) -> tuple[list[Tensor], bool]:
    """Per member the sample weights of the group's joint minimiser (see the module doc), and
    whether the stage model had a minimiser (else the weights are ``w0``: cross terms dropped).

    ``maximize``: the members ascend (``delta theta = -(-L d + D)``); the cross terms then enter
    the weights with the opposite sign, ``w_n = w0 - beta sum_{m != n} r_m``.
    """
    grams = [per_sample_gram(m.helper, m.x, m.g, m.step) for m in members]
    inner = [update_effect(m.module, m.x, m.g, *m.step.decay) for m in members]
    if maximize:  # r' = -r solves the minimising system with -v
        inner = [-v for v in inner]
    ws, _, ok = joint_weights(grams, inner, w0, 1.0, beta, 1.0)
    return ws, ok
