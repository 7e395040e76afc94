"""Benchmark adapter for vanilla batch DDP (:class:`ocnopt.reference.VanillaDDP`).

The reference runs exact (brute-force) DDP in float64 and needs the minibatch ``(X, Y)``
itself, while the registry's ``train_step`` only hands over ``closure()``, which returns the
batch-mean loss of the float32 bench model. :class:`BenchVanillaDDP` bridges the two. Each
``step(closure)``:

1. runs ``closure()`` once, with a context-managed hook on the model that records its input
   ``X`` (B, ...) and output ``Z`` (B, n_T). Every hook is removed on exit.
2. recovers the targets from ``G = dL/dZ``, the loss gradient at the logits:

   * mean cross-entropy: ``G = (softmax(Z) - onehot(Y)) / B``, so ``Y = argmin_j G_ij``
     (the only negative entry of each row);
   * mean MSE: ``G = 2 (Z - Y) / (B n_T)``, so ``Y = Z - G B n_T / 2``.

   The recovered loss is checked against the closure's loss value (``loss="auto"`` tries
   cross-entropy, then MSE). Any other loss raises ``ValueError``.
3. copies the bench model's parameters into a float64 shadow copy of the model, runs one
   ``VanillaDDP`` step there on ``(X.double(), Y)``, and copies the result back, rounded to
   the bench model's dtype.

So the bench runs DDP in float64 on tiny nets (registry entry ``vanilla-ddp``,
``tiny_only=True``), and only the parameters are stored in the bench's precision. ``lr`` is
the reference's proximal weight: ``Q~ = clip(Q_uu) + (1/lr) I``, so ``lr -> 0`` is gradient
descent with step ``lr``. ``lr`` and ``weight_decay`` live in this optimizer's
``param_groups`` (schedulers work) and are forwarded at every step.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt.reference import VanillaDDP

__all__ = ["BenchVanillaDDP", "build_vanilla_ddp", "recover_targets", "LR_GRID"]

log = logging.getLogger(__name__)

#: Tuning grid of the proximal weight ``lr`` (1/lr is added to the clipped Q_uu).
LR_GRID: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)

_LOSSES = ("auto", "cross_entropy", "mse")


def recover_targets(z: Tensor, g: Tensor, loss: Tensor, kind: str = "auto") -> tuple[str, Tensor]:
    """Targets ``Y`` of a batch-mean CE / MSE loss from logits ``z`` and ``g = dL/dz``.

    Args:
        z: logits (B, n_T). g: loss gradient at z (B, n_T). loss: the loss value (scalar).
        kind: ``"cross_entropy"``, ``"mse"`` or ``"auto"`` (first that reproduces ``loss``).
    Returns:
        ``(kind, Y)``: class indices (B,) int64, or regression targets (B, n_T).
    Raises:
        ValueError: no candidate reproduces ``loss`` (rtol 1e-4).
    """
    z, g = z.detach().reshape(z.shape[0], -1), g.detach().reshape(z.shape[0], -1)
    B, n = z.shape
    value = float(loss.detach())
    tried = []
    for cand in (("cross_entropy", "mse") if kind == "auto" else (kind,)):
        if cand == "cross_entropy":
            y = g.argmin(dim=1)
            rec = F.cross_entropy(z, y)
        elif cand == "mse":
            y = z - g * (B * n / 2.0)
            rec = F.mse_loss(z, y)
        else:
            raise ValueError(f"unknown loss {cand!r}; valid: {', '.join(_LOSSES)}")
        if abs(float(rec) - value) <= 1e-4 * max(1.0, abs(value)):
            return cand, y
        tried.append(f"{cand} gives {float(rec):.6g}")
    raise ValueError(
        f"vanilla-ddp: could not identify the closure's loss ({value:.6g}; {', '.join(tried)});"
        " the bench adapter supports batch-mean cross-entropy and MSE on the model output")


class BenchVanillaDDP(torch.optim.Optimizer):
    """``VanillaDDP`` on a float64 shadow of ``model``, driven by ``step(closure)`` only.

    Args:
        model: tiny ``nn.Sequential`` of Linear / Conv2d and parameter-free modules (any dtype).
        lr: proximal weight of the reference (``Q~ = clip(Q_uu) + I / lr``).
        weight_decay: gamma of the running cost ``(gamma/2)||u||^2``.
        second_order_terms: keep the f_uu / f_ux / f_xx tensor terms (exact DDP).
        loss: ``"auto"``, ``"cross_entropy"`` or ``"mse"``: how targets are recovered.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        weight_decay: float = 0.0,
        second_order_terms: bool = True,
        loss: str = "auto",
    ) -> None:
        if loss not in _LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(_LOSSES)}")
        params = list(model.parameters())
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.model = model
        self.loss_kind = loss
        self.shadow = copy.deepcopy(model).to(torch.float64)
        for m in self.shadow.modules():  # hooks of the bench model do not belong on the shadow
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            m._backward_hooks.clear()
        self.ddp = VanillaDDP(self.shadow, lr=lr, weight_decay=weight_decay,
                              second_order_terms=second_order_terms, loss="cross_entropy")

    def _run_closure(self, closure: Callable[[], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        seen: list[tuple[Tensor, Tensor]] = []

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                seen.append((args[0], output))

        handle = self.model.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"closure() must run the model exactly once (ran {len(seen)}x)")
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("closure() must return the scalar batch-mean loss with its graph")
        x, z = seen[0]
        return loss.reshape(()), x.detach(), z

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One float64 vanilla-DDP step on the closure's minibatch; returns the loss before."""
        if closure is None:
            raise ValueError("BenchVanillaDDP.step needs a closure returning the batch-mean loss")
        loss, x, z = self._run_closure(closure)
        (g,) = torch.autograd.grad(loss, z)
        kind, y = recover_targets(z, g, loss, self.loss_kind)
        self.ddp.loss = kind
        group, ddp_group = self.param_groups[0], self.ddp.param_groups[0]
        ddp_group["lr"], ddp_group["weight_decay"] = group["lr"], group["weight_decay"]
        self.shadow.train(self.model.training)
        with torch.no_grad():
            for p, s in zip(self.model.parameters(), self.shadow.parameters(), strict=True):
                s.copy_(p)
        y = y.to(torch.float64) if kind == "mse" else y
        self.ddp.step(inputs=x.to(torch.float64), targets=y)
        with torch.no_grad():
            for p, s in zip(self.model.parameters(), self.shadow.parameters(), strict=True):
                p.copy_(s)
        return loss.detach()


def build_vanilla_ddp(model: nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    """Registry builder of ``vanilla-ddp`` (see :class:`BenchVanillaDDP`)."""
    return BenchVanillaDDP(model, lr=lr, **kw)
