"""Functional per-tensor update kernels (pure math, no hooks).

Each kernel updates ONE parameter tensor in place from a *direction* ``d`` (the open-loop gradient,
or OCNOpt's closed-loop direction) and the tensor's state dict. The operation order mirrors the
single-tensor code paths of ``torch.optim.SGD``, ``torch.optim.RMSprop`` and ``torch.optim.Adam``
exactly, so that OCNOpt with feedback off is bitwise the torch optimizer on CPU (tested).

State keys follow torch.optim (``momentum_buffer``, ``square_avg``, ``grad_avg``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ``step``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["sgd_update", "rmsprop_update", "adam_update", "momentum_update"]


def momentum_update(
    param: Tensor,
    d: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> None:
    """``param -= lr * v`` with torch.optim.SGD's momentum rule on ``d`` (no weight decay)."""
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = d.detach().clone()
            state["momentum_buffer"] = buf
        else:
            buf.mul_(momentum).add_(d, alpha=1 - dampening)
        d = d.add(buf, alpha=momentum) if nesterov else buf
    param.add_(d, alpha=-lr)


def sgd_update(
    param: Tensor,
    d: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    """One ``torch.optim.SGD`` step on ``param`` (shape any) with direction ``d`` (same shape)."""
    if weight_decay != 0:
        d = d.add(param, alpha=weight_decay)
    momentum_update(
        param, d, state, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov
    )


def rmsprop_update(
    param: Tensor,
    d: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
) -> None:
    """One ``torch.optim.RMSprop`` step on ``param`` with direction ``d``."""
    if "square_avg" not in state:
        state["step"] = torch.tensor(0.0)
        state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if momentum > 0:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if centered:
            state["grad_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["step"] += 1
    if weight_decay != 0:
        d = d.add(param, alpha=weight_decay)
    square_avg = state["square_avg"]
    square_avg.mul_(alpha).addcmul_(d, d, value=1 - alpha)
    if centered:
        grad_avg = state["grad_avg"]
        grad_avg.lerp_(d, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(eps)
    if momentum > 0:
        buf = state["momentum_buffer"]
        buf.mul_(momentum).addcdiv_(d, avg)
        param.add_(buf, alpha=-lr)
    else:
        param.addcdiv_(d, avg, value=-lr)


def adam_update(
    param: Tensor,
    d: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled_weight_decay: bool,
) -> None:
    """One ``torch.optim.Adam`` step (AdamW if ``decoupled_weight_decay``), direction ``d``."""
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    step_t = state["step"]
    step_t += 1
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            d = d.add(param, alpha=weight_decay)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(d, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(d, d, value=1 - beta2)
    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        max_sq = state["max_exp_avg_sq"]
        torch.maximum(max_sq, exp_avg_sq, out=max_sq)
        denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
