"""Cooperative players: the joint minimiser of a stage's quadratic model (identity curvature).

Players ``n = 1..N`` read the same tensor and decide together (``docs/game-theory.md``).  With
per-sample gradients ``q_n,i`` of sample ``i``'s own loss, sample weights ``w0_i = 1 + s_i`` from
the stage's feedback, and the cross terms ``Q_nm = (beta / B) sum_i q_n,i q_m,i^T``, the
stationary point of the stage's model with identity curvature ``I / lr`` on the diagonal blocks is

    d_n = (1/B) sum_i w_n,i q_n,i + gamma theta_n,     theta_n <- theta_n - lr d_n,
    w_n = w0 + beta sum_{m != n} r_m,                 r_m,i = <q_m,i, delta theta_m>,

where the per-sample changes ``r`` solve ``r_n + K_n sum_{m != n} r_m = a_n`` with
``K_n = (lr beta / B) G_n``, ``a_n = -lr (G_n w0 / B + gamma v_n)``, ``G_n[i, j] = <q_n,i, q_n,j>``
and ``v_n,i = <q_n,i, theta_n>``.  It is a minimiser iff ``I + (lr beta / B) G^1/2 E G^1/2`` is
positive definite (``G = blkdiag(G_n)``, ``E`` the block pattern ``(J - I) (x) I_B``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt.layers.base import LayerHelper

__all__ = ["per_sample_gram", "output_inner", "update_effect", "joint_weights"]


def per_sample_gram(helper: LayerHelper, x: Tensor, g: Tensor) -> Tensor:
    """``G[i, j] = <q_i, q_j>``, ``(B, B)``, for the per-sample gradients ``q_i`` of sample i's
    own loss (``g``: gradient of the batch-MEAN loss w.r.t. the layer output, so
    ``q_i = B * (sample i's share)``).

    Cost: ``O(B^2 (d_out + d_in))`` when every sample gives one row (Linear on ``(B, d)``),
    else ``O(B N d_out d_in)`` to form the per-sample gradients (``N`` rows per sample) and
    ``O(B^2 d_out d_in)`` for their Gram matrix.
    """
    B = x.shape[0]
    a = helper.input_rows(x)
    gr = helper.output_rows(g) * B
    if a.shape[0] == B:
        return (gr @ gr.T) * (a @ a.T)
    rows = a.shape[0] // B
    q = torch.bmm(gr.view(B, rows, -1).transpose(1, 2), a.view(B, rows, -1)).reshape(B, -1)
    return q @ q.T


def output_inner(g: Tensor, out: Tensor) -> Tensor:
    """``B * <g_i, out_i>`` per sample, ``(B,)``: with ``out`` a layer's output this is
    ``<q_i, theta>`` (the layer is linear in its weight and bias)."""
    B = g.shape[0]
    return (g * out).reshape(B, -1).sum(1) * B


def update_effect(module: nn.Module, x: Tensor, g: Tensor, dw: Tensor, db: Tensor | None) -> Tensor:
    """``r_i = <q_i, delta theta>`` for a parameter change ``(dw, db)`` of a Linear/Conv2d layer:
    the layer's map evaluated with the change as its parameters (no module hooks fire), ``(B,)``.
    """
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
    """Sample weights of the joint minimiser of a cooperative stage (identity curvature).

    Args:
        grams: per player ``G_n`` ``(B, B)`` (:func:`per_sample_gram`).
        inner: per player ``v_n,i = <q_n,i, theta_n>`` ``(B,)`` (:func:`output_inner`).
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
