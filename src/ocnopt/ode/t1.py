"""The integration time ``t1`` of an ODE block as a control (SNOpt's t1 policy, spec §6.5).

The objective is ``L + (reg/2) t1^2``. With ``g = dL/dt1`` (the batch-mean loss over ``B``
samples; exactly ``<dL/dx(t1), F(t1, x(t1))>``) and ``p = dL/dtheta`` (the vector field's
parameters), the second-order expansion in ``(t1, theta)`` with a Gauss-Newton (outer-product)
curvature gives::

    Q_t   = reg * t1 + g
    Q_tt  = reg + B * g^2
    Q_tth = B * g * p                  (a vector: the cross term)

The outer products are per-sample second moments, ``E_i[(dl_i/dt1)^2]`` and
``E_i[(dl_i/dt1)(dl_i/dtheta)]``, estimated from batch means with the factor ``B`` (exact when
the per-sample terms are independent with zero mean; EKFAC's eigenvalue statistics
``B * (U_G^T grad U_A)^2`` use the same proxy). The square of the batch-mean gradient alone
would underestimate them about ``B``-fold and make the step ``~ -lr / g`` explode for small
``g``.

and, as ``t1`` is chosen after the parameter update ``dtheta``, the feedback policy::

    dt1 = -lr * (Q_t + <Q_tth, dtheta>) / Q_tt     (mode="feedback")
    dt1 = -lr * (g + reg * t1)                      (mode="gradient": the first-order baseline)
    t1 <- max(min_t1, t1 + dt1)                     every ``update_freq`` observations

Every ``Q`` term (and the baseline's gradient) is an exponential moving average with
``momentum``, bias-corrected like Adam's moments, so all terms of one formula are estimates of
the same kind; ``dtheta`` is the realised change of this step (measured, not predicted).
Differences from SNOpt's code, on purpose: ``g`` is the exact derivative of the batch-mean loss
(SNOpt divides it by the batch size once more and squares that, ``Q_tt = reg + g^2 / B^2``, so
its tuned ``t1_lr``/``t1_reg`` do not carry over); SNOpt mixes latest values and averages in the
feedback term; the baseline uses the true gradient ``g + reg * t1``; gradients are read after
``backward()`` returns; no host syncs.

Loop (classic)::

    loss.backward()
    ctrl.observe()          # reads block.t1_grad and the field's parameter gradients
    optimizer.step()        # (after any preconditioner rewrote .grad)
    ctrl.step()             # on update steps: dtheta = theta - theta_before, t1 updated
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ocnopt.ode.block import ODEBlock

__all__ = ["IntegrationTimeController", "T1_MODES"]

T1_MODES = ("feedback", "gradient")


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: allowed range is {allowed}")


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate(mode: Any, lr: Any, reg: Any, momentum: Any, update_freq: Any,
              min_t1: Any, prefix: str = "") -> None:
    """Check the hyperparameters; error messages name them ``prefix + name``."""
    p = prefix
    _check(f"{p}mode", mode, mode in T1_MODES, " or ".join(repr(m) for m in T1_MODES))
    _check(f"{p}lr", lr, _real(lr) and lr > 0, "a finite float > 0")
    if mode == "feedback":
        _check(f"{p}reg", reg, _real(reg) and reg > 0,
               f"a finite float > 0 for {p}mode='feedback'")
    else:
        _check(f"{p}reg", reg, _real(reg) and reg >= 0, "a finite float >= 0")
    _check(f"{p}momentum", momentum, _real(momentum) and 0 <= momentum < 1,
           f"0 <= {p}momentum < 1")
    _check(f"{p}update_freq", update_freq, isinstance(update_freq, int)
           and not isinstance(update_freq, bool) and update_freq >= 1, "an int >= 1")
    _check("min_t1", min_t1, _real(min_t1) and min_t1 > 0, "a finite float > 0")


class IntegrationTimeController:
    """Update ``block.t1`` by the feedback policy (or the first-order baseline).

    Args:
        block: an :class:`ODEBlock` built with ``learn_t1=True``.
        mode: ``"feedback"`` (second-order policy) or ``"gradient"`` (first-order baseline).
        lr: step scale (> 0); SNOpt recommends 0.05-0.1.
        reg: weight of the cost ``(reg/2) t1^2`` (>= 0; > 0 for feedback, where it keeps
            ``Q_tt > 0``).
        momentum: EMA momentum of the statistics, ``0 <= momentum < 1`` (SNOpt: 0.99).
        update_freq: observations between ``t1`` updates (int >= 1; SNOpt: 50-100).
        min_t1: lower clamp of ``t1`` (> 0; SNOpt: 0.1).
        params: the parameters ``theta`` of the cross term (default: the block's ``func``
            parameters that require grad).
    """

    def __init__(
        self,
        block: ODEBlock,
        mode: str = "feedback",
        lr: float = 0.1,
        reg: float = 1e-3,
        momentum: float = 0.99,
        update_freq: int = 50,
        min_t1: float = 0.1,
        params: Sequence[nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(block, ODEBlock) or not block.learn_t1:
            raise ValueError("block must be an ODEBlock built with learn_t1=True")
        _validate(mode, lr, reg, momentum, update_freq, min_t1)
        self.block = block
        self.mode = mode
        self.lr = float(lr)
        self.reg = float(reg)
        self.momentum = float(momentum)
        self.update_freq = update_freq
        self.min_t1 = float(min_t1)
        self.params = list(params) if params is not None else [
            p for p in block.func.parameters() if p.requires_grad]
        t1 = block.t1
        self.count = 0
        self.q_t = torch.zeros((), dtype=t1.dtype, device=t1.device)  # feedback: EMA of Q_t
        self.q_tt = torch.zeros_like(self.q_t)  # feedback: EMA of Q_tt
        self.grad = torch.zeros_like(self.q_t)  # gradient mode: EMA of g + reg * t1
        self.cross: Tensor | None = None  # feedback: EMA of B g p (flat), the cross term
        self._pending = False  # observed an update step whose t1 update is still to come
        self._before: Tensor | None = None  # feedback: theta before the parameter update

    # -- observation --------------------------------------------------------------------------
    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _ema(self, avg: Tensor, value: Tensor) -> None:
        avg.mul_(self.momentum).add_(value.to(avg.dtype), alpha=1 - self.momentum)

    def observe(self, t1_grad: Tensor | None = None,
                param_grads: Sequence[Tensor | None] | None = None,
                batch_size: int | None = None) -> None:
        """Record this step's statistics; call after ``backward()`` returned.

        ``t1_grad`` (default: ``block.t1_grad``, cleared after reading) is ``dL/dt1``;
        ``param_grads`` (feedback mode; default: the ``.grad`` of ``params``, ``None`` = 0) the
        raw gradients of the loss w.r.t. ``params``, before any preconditioning;
        ``batch_size`` ``B`` of the mean loss (default: the batch of the block's last call).
        """
        if t1_grad is None:
            t1_grad = self.block.t1_grad
            if t1_grad is None:
                raise RuntimeError("dL/dt1 is not available: run the block's forward with grad "
                                   "enabled (learn_t1=True) and call observe() after backward()")
            self.block.clear_t1_grad()
        g = t1_grad.detach().reshape(()).to(self.q_t.dtype)
        t1 = self.block.t1.detach()
        if self.mode == "gradient":
            self._ema(self.grad, g + self.reg * t1)
        else:
            batch = batch_size if batch_size is not None else self.block.batch_size
            if not (isinstance(batch, int) and batch >= 1):
                raise ValueError(f"invalid batch_size={batch!r}: allowed range is an int >= 1")
            self._ema(self.q_t, self.reg * t1 + g)
            self._ema(self.q_tt, self.reg + batch * g * g)
            grads = param_grads if param_grads is not None else [p.grad for p in self.params]
            if len(grads) != len(self.params):
                raise ValueError(f"param_grads has {len(grads)} entries, expected "
                                 f"{len(self.params)}")
            flat = torch.cat([(torch.zeros_like(p) if gr is None else gr.detach()).reshape(-1)
                              for p, gr in zip(self.params, grads, strict=True)])
            if self.cross is None:
                self.cross = torch.zeros_like(flat)
            self._ema(self.cross, flat * (batch * g).to(flat.dtype))
        self.count += 1
        self._pending = self.due
        if self._pending and self.mode == "feedback":
            self._before = self._flat_params().clone()

    @property
    def due(self) -> bool:
        """Whether the last observation is an update step."""
        return self.count > 0 and self.count % self.update_freq == 0

    # -- policy -------------------------------------------------------------------------------
    def propose(self, dtheta: Tensor | None = None) -> Tensor:
        """``dt1`` from the current statistics (0-dim tensor); ``dtheta`` (flat, like
        ``params``) is required in feedback mode. (The EMAs' bias correction ``1 - m^n``
        cancels in the feedback ratio; the baseline applies it.)"""
        if self.count == 0:
            raise RuntimeError("propose() needs at least one observe()")
        if self.mode == "gradient":
            return -self.lr * self.grad / (1.0 - self.momentum ** self.count)
        if dtheta is None or self.cross is None:
            raise ValueError("feedback mode needs dtheta, the realised parameter change")
        cross = torch.dot(self.cross.to(self.q_t.dtype), dtheta.reshape(-1).to(self.q_t.dtype))
        return -self.lr * (self.q_t + cross) / self.q_tt

    @torch.no_grad()
    def step(self) -> Tensor | None:
        """After the optimizer step: on update steps set ``t1`` and return ``dt1``, else None
        (also when called again before the next ``observe``)."""
        if not self._pending:
            return None
        self._pending = False
        if self.mode == "feedback":
            assert self._before is not None
            delta = self.propose(self._flat_params() - self._before)
            self._before = None
        else:
            delta = self.propose()
        t1 = self.block.t1
        self.block.set_t1((t1 + delta.to(t1.dtype)).clamp_min(self.min_t1))
        return delta

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "mode": self.mode, "lr": self.lr, "reg": self.reg, "momentum": self.momentum,
            "update_freq": self.update_freq, "min_t1": self.min_t1, "count": self.count,
            "q_t": self.q_t.clone(), "q_tt": self.q_tt.clone(), "grad": self.grad.clone(),
            "cross": None if self.cross is None else self.cross.clone(),
            "pending": self._pending,
            "before": None if self._before is None else self._before.clone(),
        }
        return state

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is a :meth:`state_dict` of a controller of this
        block's parameters (keys, hyperparameter ranges, tensor shapes)."""
        keys = ("mode", "lr", "reg", "momentum", "update_freq", "min_t1", "count", "q_t", "q_tt",
                "grad", "cross", "pending", "before")
        if not isinstance(state, dict) or set(state) != set(keys):
            raise ValueError(f"an integration-time controller state has the keys {keys}")
        _validate(state["mode"], state["lr"], state["reg"], state["momentum"],
                  state["update_freq"], state["min_t1"])
        count = state["count"]
        _check("count", count, isinstance(count, int) and not isinstance(count, bool)
               and count >= 0, "an int >= 0")
        _check("pending", state["pending"], isinstance(state["pending"], bool), "True or False")
        size = sum(p.numel() for p in self.params)
        for key, shape in (("q_t", ()), ("q_tt", ()), ("grad", ()), ("cross", (size,)),
                           ("before", (size,))):
            v = state[key]
            if (v is None and key in ("cross", "before")) or (
                    isinstance(v, Tensor) and v.is_floating_point() and v.shape == shape):
                continue
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"integration-time state {key!r} must be a float tensor of shape "
                             f"{shape}, got {got}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics and hyperparameters (validated by :meth:`check_state`)."""
        self.check_state(state)
        for key in ("mode", "lr", "reg", "momentum", "update_freq", "min_t1", "count"):
            setattr(self, key, state[key])
        self._pending = bool(state["pending"])
        dev = self.block.t1.device
        self.q_t = state["q_t"].to(dev).clone()
        self.q_tt = state["q_tt"].to(dev).clone()
        self.grad = state["grad"].to(dev).clone()
        self.cross = None if state["cross"] is None else state["cross"].to(dev).clone()
        self._before = None if state["before"] is None else state["before"].to(dev).clone()
