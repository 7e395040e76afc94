"""Builders for external second-order / preconditioned peers (the ``peers`` extra).

Each builder takes ``(model, lr, **overrides)`` and returns a ``torch.optim.Optimizer`` that
is driven by the classic ``zero_grad(); loss.backward(); step()`` loop (registry mode
``"backward"``). The optional packages are imported inside the builders, so importing this
module never fails. ``OptimizerSpec.requires`` reports missing ones as unavailable.

Settings (algorithm.md §9.3; datasets.md §4):

* ``soap``: ``pytorch_optimizer.SOAP`` (Adam in the eigenbasis of Shampoo's factors),
  ``betas=(0.95, 0.95)``, eigenbasis refresh every ``precondition_frequency=10`` steps.
  ``weight_decay=0``: the package default is 0.01 decoupled, but no other benchmarked
  optimizer decays by default.
* ``shampoo``: ``pytorch_optimizer.ScalableShampoo``, the blocked Shampoo of Anil et al. The
  plain ``Shampoo`` takes the inverse 4th root of the full 784x784 factor at every step
  (~107 ms/step on CPU for a 784-256-256-10 MLP, datasets.md §4.1).
  The package defaults (preconditioners recomputed every 1000 steps, first used at step 25)
  make short runs nearly pure grafted SGD. The defaults here are instead:
  ``block_size=256`` (a 256x784 weight becomes 256x256 blocks plus one 256x16 block);
  ``preconditioning_compute_steps=10`` (inverse roots refreshed every 10 steps, amortised);
  ``start_preconditioning_step=10``; ``statistics_compute_steps=1``;
  layer-wise ``RMSPROP`` grafting (the step norm is that of RMSprop, so the lr grid is an
  Adam-like one); ``moving_average_for_momentum=True`` (momentum is an EMA, so lr is not
  multiplied by 1/(1-beta1)); ``betas=(0.9, 0.999)``; Nesterov momentum (package default).
* ``singd``: ``singd.optim.optimizer.SINGD(model, ...)`` (structured inverse-free natural
  gradient, empirical Fisher). It takes the MODEL first and installs forward hooks on the
  model's Linear/Conv2d layers at construction. They stay for the optimizer's lifetime:
  call :func:`close_singd` before reusing the same model with another optimizer. Each forward
  pass with gradients enabled at a preconditioner step (``steps % T == 0``) registers tensor
  hooks, which accumulate the Kronecker statistics during the following ``backward()``. So
  ``step()`` needs a preceding forward+backward with grad enabled, and it rejects closures.
  Other parameter types (BatchNorm, ...) are left untrained (with a warning). Settings:
  ``structures=("dense", "dense")``, ``T=10``, ``momentum=0.9``, ``lr_cov=1e-2``,
  ``damping=1e-3``, ``alpha1=0.5``, ``loss_average="batch"`` (the loss is a batch mean), and
  ``kfac_like=False`` (the SINGD update; ``kfac_like=True`` gives IKFAC).

Every keyword of the underlying constructor can be overridden via ``**overrides``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["build_soap", "build_shampoo", "build_singd", "close_singd", "PEER_DEFAULTS"]

log = logging.getLogger(__name__)

#: Constructor keywords used unless overridden (documented in the module docstring).
PEER_DEFAULTS: dict[str, dict[str, Any]] = {
    "soap": dict(betas=(0.95, 0.95), weight_decay=0.0, precondition_frequency=10),
    "shampoo": dict(
        betas=(0.9, 0.999), moving_average_for_momentum=True, weight_decay=0.0,
        block_size=256, start_preconditioning_step=10, preconditioning_compute_steps=10,
        statistics_compute_steps=1, graft="rmsprop",
    ),
    "singd": dict(
        momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=0.0, T=10, lr_cov=1e-2,
        structures=("dense", "dense"), kfac_like=False, loss_average="batch",
    ),
}


def build_soap(model: nn.Module, lr: float, **overrides: Any) -> torch.optim.Optimizer:
    """``pytorch_optimizer.SOAP`` on all trainable parameters of ``model``."""
    from pytorch_optimizer import SOAP

    kw = {**PEER_DEFAULTS["soap"], **overrides}
    return SOAP([p for p in model.parameters() if p.requires_grad], lr=lr, **kw)


def build_shampoo(model: nn.Module, lr: float, **overrides: Any) -> torch.optim.Optimizer:
    """``pytorch_optimizer.ScalableShampoo`` (blocked, grafted); ``graft`` is a
    ``LayerWiseGrafting`` name: none, sgd, adagrad, rmsprop, sqrtn."""
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    kw = {**PEER_DEFAULTS["shampoo"], **overrides}
    graft = kw.pop("graft")
    if "graft_type" not in kw:
        kw["graft_type"] = LayerWiseGrafting[str(graft).upper()]
    return ScalableShampoo([p for p in model.parameters() if p.requires_grad], lr=lr, **kw)


def build_singd(model: nn.Module, lr: float, **overrides: Any) -> torch.optim.Optimizer:
    """``singd.optim.optimizer.SINGD(model, ...)``; hooks the model (see :func:`close_singd`)."""
    from singd.optim.optimizer import SINGD

    kw = {**PEER_DEFAULTS["singd"], **overrides}
    kw["structures"] = tuple(kw["structures"])
    return SINGD(model, lr=lr, **kw)


def close_singd(opt: torch.optim.Optimizer) -> None:
    """Remove the forward hooks a SINGD optimizer installed on its model (idempotent)."""
    handles = getattr(opt, "hook_handles", None)
    if handles is None:
        raise TypeError(f"{type(opt).__name__} has no hook_handles (not a SINGD optimizer?)")
    for h in handles:
        h.remove()
    handles.clear()
