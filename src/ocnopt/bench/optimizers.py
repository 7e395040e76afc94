"""Registry of the optimizers the benchmark compares, with a uniform training step.

Every entry is an :class:`OptimizerSpec`. Two calling conventions exist:

* ``mode="backward"``: classic ``zero_grad(); loss.backward(); opt.step()`` (torch.optim, peers);
* ``mode="closure"``: ``opt.step(closure)`` where ``closure()`` returns the batch-mean loss WITHOUT
  calling ``backward()`` (OCNOpt, vanilla DDP, E-MSA: they run their own passes).

:func:`train_step` hides the difference. Learning-rate grids are the small per-method tuning grids
of the protocol (chosen on the validation split); the robustness sweep uses ``best x 10^[-1..1]``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ocnopt import OCNOpt

__all__ = ["OptimizerSpec", "OPTIMIZERS", "register", "get_optimizer", "train_step",
           "available_optimizers"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and drive one benchmarked optimizer.

    ``build(model, lr, **options)`` returns the optimizer; ``lr_grid`` is the tuning grid;
    ``requires`` lists importable modules needed (an optional extra); ``family`` is one of
    ``first-order``, ``second-order``, ``ocnopt``, ``optimal-control``, ``peer``.
    """

    name: str
    description: str
    build: Callable[..., torch.optim.Optimizer]
    lr_grid: tuple[float, ...]
    mode: str = "backward"
    family: str = "first-order"
    requires: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    tiny_only: bool = False  # only feasible on tiny networks (e.g. exact vanilla DDP)

    def available(self) -> tuple[bool, str]:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"needs {', '.join(missing)} (pip install 'ocnopt[peers]')"
        return True, ""


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r} registered twice")
    OPTIMIZERS[spec.name] = spec
    return spec


def get_optimizer(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def available_optimizers() -> dict[str, tuple[bool, str]]:
    return {name: spec.available() for name, spec in OPTIMIZERS.items()}


def train_step(
    opt: torch.optim.Optimizer, spec: OptimizerSpec, model: nn.Module, x: Tensor, y: Tensor,
    loss_fn: LossFn,
) -> Tensor:
    """One training step on minibatch ``(x, y)``; returns the (detached) batch-mean loss."""
    if spec.mode == "closure":
        loss = opt.step(lambda: loss_fn(model(x), y))
        assert loss is not None
        return loss.detach()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _ocnopt(curvature: str, feedback: bool, **fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
        return OCNOpt(model, lr=lr, curvature=curvature, feedback=feedback, **{**fixed, **kw})

    return build


_GRID_SGD = (0.01, 0.03, 0.1, 0.3)
_GRID_ADAPTIVE = (3e-4, 1e-3, 3e-3, 1e-2)
_GRID_KRON = (0.003, 0.01, 0.03, 0.1)

register(OptimizerSpec(
    "sgd", "torch.optim.SGD, momentum 0.9",
    lambda model, lr, **kw: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, **kw),
    _GRID_SGD))
register(OptimizerSpec(
    "rmsprop", "torch.optim.RMSprop",
    lambda model, lr, **kw: torch.optim.RMSprop(model.parameters(), lr=lr, **kw),
    _GRID_ADAPTIVE))
register(OptimizerSpec(
    "adam", "torch.optim.Adam",
    lambda model, lr, **kw: torch.optim.Adam(model.parameters(), lr=lr, **kw),
    _GRID_ADAPTIVE))
register(OptimizerSpec(
    "kfac", "OCNOpt curvature='kfac', feedback off (K-FAC, momentum 0.9)",
    _ocnopt("kfac", False, momentum=0.9), _GRID_KRON, mode="closure", family="second-order"))
register(OptimizerSpec(
    "ekfac", "OCNOpt curvature='ekfac', feedback off (EKFAC as in SNOpt, momentum 0.9)",
    _ocnopt("ekfac", False, momentum=0.9), _GRID_KRON, mode="closure", family="second-order"))
register(OptimizerSpec(
    "ocnopt-identity", "OCNOpt identity curvature + feedback (DDPNOpt-SGD, momentum 0.9)",
    _ocnopt("identity", True, momentum=0.9), _GRID_SGD, mode="closure", family="ocnopt"))
register(OptimizerSpec(
    "ocnopt-adam", "OCNOpt adam curvature + feedback (DDPNOpt-Adam)",
    _ocnopt("adam", True), _GRID_ADAPTIVE, mode="closure", family="ocnopt"))
register(OptimizerSpec(
    "ocnopt-ekfac", "OCNOpt ekfac curvature + feedback (momentum 0.9)",
    _ocnopt("ekfac", True, momentum=0.9), _GRID_KRON, mode="closure", family="ocnopt"))
