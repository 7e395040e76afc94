"""Functional per-tensor update kernels (pure math, no hooks, no optimizer object).

Each kernel updates ONE parameter tensor in place from a *direction* ``d`` (the open-loop
gradient, or OCNOpt's closed-loop direction) and returns the tensor's NEW state entries. The
state it is given is only read, never modified: the caller decides whether the new entries are
committed (an optimizer step is all-or-nothing, see :mod:`ocnopt.optim.transaction`). The
operation order mirrors the single-tensor code paths of ``torch.optim.SGD``, ``RMSprop`` and
``Adam``, so that OCNOpt with feedback off is bitwise the torch optimizer on CPU (tested).

``maximize`` is the caller's business: pass ``-d`` (torch negates the gradient first, too).

State keys follow torch.optim (``momentum_buffer``, ``square_avg``, ``grad_avg``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ``step``), so the per-parameter state is torch's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["sgd_update", "rmsprop_update", "adam_update", "momentum_update", "STATE_KEYS"]

#: The per-parameter state keys each kernel may write (used to validate loaded state).
STATE_KEYS: dict[str, frozenset[str]] = {
    "sgd": frozenset({"momentum_buffer"}),
    "rmsprop": frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"}),
    "adam": frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
}


def momentum_update(
    param: Tensor,
    d: Tensor,
    state: Mapping[str, Any],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> dict[str, Tensor]:
    """``param -= lr * v`` with torch.optim.SGD's momentum rule on ``d`` (no weight decay)."""
    new: dict[str, Tensor] = {}
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = d.detach().clone()
        else:
            buf = buf.mul(momentum).add_(d, alpha=1 - dampening)
        new["momentum_buffer"] = buf
        d = d.add(buf, alpha=momentum) if nesterov else buf
    param.add_(d, alpha=-lr)
    return new


def sgd_update(
    param: Tensor,
    d: Tensor,
    state: Mapping[str, Any],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> dict[str, Tensor]:
    """One ``torch.optim.SGD`` step on ``param`` (any shape) with direction ``d`` (same shape)."""
    if weight_decay != 0:
        d = d.add(param, alpha=weight_decay)
    return momentum_update(
        param, d, state, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov
    )


def rmsprop_update(
    param: Tensor,
    d: Tensor,
    state: Mapping[str, Any],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
) -> dict[str, Tensor]:
    """One ``torch.optim.RMSprop`` step on ``param`` with direction ``d``."""
    if "square_avg" in state:
        step, square_avg = state["step"] + 1, state["square_avg"].mul(alpha)
    else:
        step, square_avg = torch.tensor(1.0), torch.zeros_like(param).mul_(alpha)
    new: dict[str, Tensor] = {"step": step, "square_avg": square_avg}
    if weight_decay != 0:
        d = d.add(param, alpha=weight_decay)
    square_avg.addcmul_(d, d, value=1 - alpha)
    if centered:
        prev = state.get("grad_avg")
        grad_avg = (prev if prev is not None else torch.zeros_like(param)).lerp(d, 1 - alpha)
        new["grad_avg"] = grad_avg
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(eps)
    if momentum > 0:
        prev = state.get("momentum_buffer")
        buf = (prev if prev is not None else torch.zeros_like(param)).mul(momentum)
        buf.addcdiv_(d, avg)
        new["momentum_buffer"] = buf
        param.add_(buf, alpha=-lr)
    else:
        param.addcdiv_(d, avg, value=-lr)
    return new


def adam_update(
    param: Tensor,
    d: Tensor,
    state: Mapping[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled_weight_decay: bool,
) -> dict[str, Tensor]:
    """One ``torch.optim.Adam`` step (AdamW if ``decoupled_weight_decay``), direction ``d``."""
    beta1, beta2 = betas
    if "exp_avg" in state:
        step_t = state["step"] + 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    else:
        step_t = torch.tensor(1.0)
        exp_avg = exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            d = d.add(param, alpha=weight_decay)
    exp_avg = exp_avg.lerp(d, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(d, d, value=1 - beta2)
    new = {"step": step_t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        prev = state.get("max_exp_avg_sq")
        max_sq = exp_avg_sq.clone() if prev is None else torch.maximum(prev, exp_avg_sq)
        new["max_exp_avg_sq"] = max_sq
        denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    return new
