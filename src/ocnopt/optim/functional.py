"""Functional update kernels (pure math, no hooks, no optimizer object), on lists of tensors.

Each kernel updates the parameters ``params`` in place from their *directions* ``ds`` (the
open-loop gradients, or OCNOpt's closed-loop directions) and returns each parameter's NEW state
entries. The states it is given are only read, never modified: the caller decides whether the
new entries are committed (an optimizer step is all-or-nothing, see
:mod:`ocnopt.optim.transaction`). The lists are processed with ``torch._foreach_*`` ops (one
call for a whole param group when the optimizer's ``foreach`` is on; a list of one otherwise),
in the operation order of the single-tensor code paths of ``torch.optim.SGD``, ``RMSprop`` and
``Adam``, so OCNOpt with feedback off is bitwise the torch optimizer on CPU (tested).

``maximize`` is the caller's business: pass ``-d`` (torch negates the gradient first, too).
State keys follow torch.optim (``momentum_buffer``, ``square_avg``, ``grad_avg``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ``step``), so the per-parameter state is torch's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["sgd_update", "rmsprop_update", "adam_update", "momentum_update", "rms_normalize",
           "ema_update", "STATE_KEYS"]

#: The per-parameter state keys each kernel may write (used to validate loaded state).
STATE_KEYS: dict[str, frozenset[str]] = {
    "sgd": frozenset({"momentum_buffer"}),
    "rmsprop": frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"}),
    "adam": frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "graft": frozenset({"step", "exp_avg", "exp_avg_sq"}),
}

States = Sequence[Mapping[str, Any]]


def _get(states: States, key: str, params: Sequence[Tensor]) -> list[Tensor]:
    """State ``key`` of every parameter, zeros where it does not exist yet."""
    return [st[key] if key in st else torch.zeros_like(p, memory_format=torch.preserve_format)
            for st, p in zip(states, params, strict=True)]


def _steps(states: States) -> list[Tensor]:
    return [st["step"] + 1 if "step" in st else torch.tensor(1.0) for st in states]


def momentum_update(
    params: Sequence[Tensor],
    ds: Sequence[Tensor],
    states: States,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> list[dict[str, Tensor]]:
    """``param -= lr * v`` with torch.optim.SGD's momentum rule on ``d`` (no weight decay)."""
    new: list[dict[str, Tensor]] = [{} for _ in params]
    if momentum != 0:
        bufs: list[Tensor] = []
        for st, d, entry in zip(states, ds, new, strict=True):
            buf = st.get("momentum_buffer")
            buf = d.detach().clone() if buf is None else torch._foreach_add(
                torch._foreach_mul([buf], momentum), [d], alpha=1 - dampening)[0]
            entry["momentum_buffer"] = buf
            bufs.append(buf)
        ds = torch._foreach_add(ds, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(list(params), list(ds), alpha=-lr)
    return new


def sgd_update(
    params: Sequence[Tensor],
    ds: Sequence[Tensor],
    states: States,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> list[dict[str, Tensor]]:
    """One ``torch.optim.SGD`` step on ``params`` with directions ``ds`` (same shapes)."""
    if weight_decay != 0:
        ds = torch._foreach_add(list(ds), list(params), alpha=weight_decay)
    return momentum_update(params, ds, states, lr=lr, momentum=momentum, dampening=dampening,
                           nesterov=nesterov)


def rmsprop_update(
    params: Sequence[Tensor],
    ds: Sequence[Tensor],
    states: States,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
) -> list[dict[str, Tensor]]:
    """One ``torch.optim.RMSprop`` step on ``params`` with directions ``ds``."""
    params, ds = list(params), list(ds)
    steps = _steps(states)
    if weight_decay != 0:
        ds = torch._foreach_add(ds, params, alpha=weight_decay)
    square_avgs = torch._foreach_mul(_get(states, "square_avg", params), alpha)
    torch._foreach_addcmul_(square_avgs, ds, ds, value=1 - alpha)
    new = [{"step": s, "square_avg": q} for s, q in zip(steps, square_avgs, strict=True)]
    if centered:
        grad_avgs = torch._foreach_lerp(_get(states, "grad_avg", params), ds, 1 - alpha)
        for entry, g in zip(new, grad_avgs, strict=True):
            entry["grad_avg"] = g
        avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(avg, eps)
    if momentum > 0:
        bufs = torch._foreach_mul(_get(states, "momentum_buffer", params), momentum)
        torch._foreach_addcdiv_(bufs, ds, avg)
        for entry, b in zip(new, bufs, strict=True):
            entry["momentum_buffer"] = b
        torch._foreach_add_(params, bufs, alpha=-lr)
    else:
        torch._foreach_addcdiv_(params, ds, avg, value=-lr)
    return new


def adam_update(
    params: Sequence[Tensor],
    ds: Sequence[Tensor],
    states: States,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled_weight_decay: bool,
) -> list[dict[str, Tensor]]:
    """One ``torch.optim.Adam`` step (AdamW if ``decoupled_weight_decay``) with directions
    ``ds``."""
    params, ds = list(params), list(ds)
    beta1, beta2 = betas
    steps = _steps(states)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            ds = torch._foreach_add(ds, params, alpha=weight_decay)
    exp_avgs = torch._foreach_lerp(_get(states, "exp_avg", params), ds, 1 - beta1)
    exp_avg_sqs = torch._foreach_mul(_get(states, "exp_avg_sq", params), beta2)
    torch._foreach_addcmul_(exp_avg_sqs, ds, ds, value=1 - beta2)
    new = [{"step": s, "exp_avg": m, "exp_avg_sq": v}
           for s, m, v in zip(steps, exp_avgs, exp_avg_sqs, strict=True)]
    counts = [s.item() for s in steps]
    step_sizes = [-(lr / (1 - beta1**k)) for k in counts]
    bc2_sqrt = [(1 - beta2**k) ** 0.5 for k in counts]
    if amsgrad:
        maxes = [v.clone() if "max_exp_avg_sq" not in st else torch.maximum(
            st["max_exp_avg_sq"], v) for st, v in zip(states, exp_avg_sqs, strict=True)]
        for entry, mx in zip(new, maxes, strict=True):
            entry["max_exp_avg_sq"] = mx
        denom = torch._foreach_sqrt(maxes)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
    return new


def rms_normalize(
    ds: Sequence[Tensor], states: States, *, beta2: float, eps: float
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Adam's normalised direction ``d / (sqrt(v_hat) + eps)`` with ``v`` the EMA (``beta2``,
    bias-corrected) of ``d^2``; returns the directions and the new ``step``/``exp_avg_sq``."""
    ds = list(ds)
    steps = _steps(states)
    sqs = torch._foreach_mul(_get(states, "exp_avg_sq", ds), beta2)
    torch._foreach_addcmul_(sqs, ds, ds, value=1 - beta2)
    denom = torch._foreach_sqrt(sqs)
    torch._foreach_div_(denom, [(1 - beta2 ** s.item()) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    return (torch._foreach_div(ds, denom),
            [{"step": s, "exp_avg_sq": v} for s, v in zip(steps, sqs, strict=True)])


def ema_update(
    params: Sequence[Tensor], ds: Sequence[Tensor], states: States, steps: Sequence[Tensor], *,
    lr: float, beta1: float,
) -> list[dict[str, Tensor]]:
    """``param -= lr * m_hat`` with ``m`` Adam's first moment (EMA ``beta1`` of ``d``,
    bias-corrected at the given ``steps``); returns the new ``exp_avg``."""
    params, ds = list(params), list(ds)
    exp_avgs = torch._foreach_lerp(_get(states, "exp_avg", params), ds, 1 - beta1)
    torch._foreach_add_(params, torch._foreach_mul(
        exp_avgs, [-(lr / (1 - beta1 ** s.item())) for s in steps]))
    return [{"exp_avg": m} for m in exp_avgs]
