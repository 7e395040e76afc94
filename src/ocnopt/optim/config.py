"""Hyperparameters of OCNOpt: which belong to which curvature, their defaults and allowed ranges.

Every param group carries the common keys plus the keys of the chosen curvature, and nothing
else, so that ``torch.optim.lr_scheduler`` classes see the same keys as on the torch twin
(``OneCycleLR``/``CyclicLR`` cycle ``betas`` when a group has them, else ``momentum``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CURVATURES", "COMMON_DEFAULTS", "CURVATURE_DEFAULTS",
           "coerce_group", "validate_group", "check"]

CURVATURES = ("identity", "rmsprop", "adam", "kfac", "ekfac")

COMMON_DEFAULTS: dict[str, Any] = dict(
    lr=1e-2, weight_decay=0.0, maximize=False, foreach=None, max_grad_norm=None,
    feedback_scale=1.0, feedback_clip=None)
_SGD = dict(momentum=0.0, dampening=0.0, nesterov=False)
_KRON = dict(_SGD, damping=0.05, factor_decay=0.95, max_rank=64, fallback_lr=None,
             fallback_betas=(0.9, 0.999), fallback_eps=1e-8)
#: Kronecker curvatures grafted onto Adam: Adam's moments replace the SGD momentum (and serve
#: the fallback Adam too), so schedulers cycle ``betas`` as on torch.optim.Adam.
_KRON_GRAFT = dict(damping=0.05, factor_decay=0.95, max_rank=64, fallback_lr=None,
                   betas=(0.9, 0.999), eps=1e-8)
CURVATURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "identity": dict(_SGD),
    "rmsprop": dict(alpha=0.99, eps=1e-8, momentum=0.0, centered=False),
    "adam": dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=False, decoupled_weight_decay=False),
    "kfac": dict(_KRON),
    "ekfac": dict(_KRON, eigenvalue_decay=0.75),
}
GRAFTS = (None, "adam")
#: Every keyword any curvature takes (for the "not a setting of this curvature" error).
ALL_KEYS = frozenset(COMMON_DEFAULTS).union(*CURVATURE_DEFAULTS.values())


def curvature_defaults(curvature: str, graft: str | None) -> dict[str, Any]:
    """The per-group settings (and defaults) of ``curvature`` with optional Adam grafting."""
    if graft is None:
        return dict(CURVATURE_DEFAULTS[curvature])
    out = dict(_KRON_GRAFT)
    if curvature == "ekfac":
        out["eigenvalue_decay"] = CURVATURE_DEFAULTS["ekfac"]["eigenvalue_decay"]
    return out


def check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the allowed range unless ``ok``."""
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: allowed range is {allowed}")


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _as_float(v: Any) -> Any:
    """Real scalars of any kind (numpy, 0-d tensors) -> float; anything else unchanged."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        return float(v)
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return float(v)
    return v


def coerce_group(group: dict[str, Any]) -> None:
    """Normalise scalar hyperparameters given as numpy scalars or 0-d tensors to floats."""
    for key in ("lr", "weight_decay", "max_grad_norm", "feedback_scale", "feedback_clip",
                "momentum",
                "dampening", "alpha", "eps", "damping", "factor_decay", "eigenvalue_decay",
                "fallback_lr", "fallback_eps"):
        if key in group and group[key] is not None:
            group[key] = _as_float(group[key])
    for key in ("betas", "fallback_betas"):
        if isinstance(group.get(key), (tuple, list)):
            group[key] = tuple(_as_float(b) for b in group[key])


def validate_group(group: Mapping[str, Any]) -> None:
    """Raise ValueError naming the allowed range for every invalid hyperparameter present."""
    r = _real
    g = group
    check("lr", g["lr"], r(g["lr"]) and g["lr"] >= 0, "a finite real >= 0")
    check("weight_decay", g["weight_decay"], r(g["weight_decay"]) and g["weight_decay"] >= 0,
          "a finite real >= 0")
    check("maximize", g["maximize"], isinstance(g["maximize"], bool), "True or False")
    check("foreach", g["foreach"], g["foreach"] is None or isinstance(g["foreach"], bool),
          "None, True or False")
    mg = g["max_grad_norm"]
    check("max_grad_norm", mg, mg is None or (r(mg) and mg > 0), "None or a finite real > 0")
    fs = g["feedback_scale"]
    check("feedback_scale", fs, r(fs) and fs >= 0, "a finite real >= 0")
    fc = g["feedback_clip"]
    check("feedback_clip", fc, fc is None or (r(fc) and fc >= 0), "None or a finite real >= 0")
    if "momentum" in g:
        m = g["momentum"]
        check("momentum", m, r(m) and 0 <= m < 1, "0 <= momentum < 1")
    if "dampening" in g:
        dp = g["dampening"]
        check("dampening", dp, r(dp) and 0 <= dp <= 1, "0 <= dampening <= 1")
        if g["nesterov"] and (g["momentum"] <= 0 or dp != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
    if "alpha" in g:
        check("alpha", g["alpha"], r(g["alpha"]) and 0 <= g["alpha"] <= 1, "0 <= alpha <= 1")
    for key in ("betas", "fallback_betas"):
        if key in g:
            b = g[key]
            ok = isinstance(b, (tuple, list)) and len(b) == 2 and all(
                r(x) and 0 <= x < 1 for x in b)
            check(key, b, ok, "a pair (beta1, beta2) with 0 <= beta < 1")
    for key in ("eps", "fallback_eps"):
        if key in g:
            check(key, g[key], r(g[key]) and g[key] >= 0, "a finite real >= 0")
    if "damping" in g:
        check("damping", g["damping"], r(g["damping"]) and g["damping"] > 0, "a finite real > 0")
    for key in ("factor_decay", "eigenvalue_decay"):
        if key in g:
            check(key, g[key], r(g[key]) and 0 <= g[key] < 1, f"0 <= {key} < 1")
    if "max_rank" in g:
        mr = g["max_rank"]
        check("max_rank", mr, mr is None or (isinstance(mr, int) and not isinstance(mr, bool)
                                             and mr >= 1), "None or an int >= 1")
    if "fallback_lr" in g:
        fl = g["fallback_lr"]
        check("fallback_lr", fl, fl is None or (r(fl) and fl >= 0), "None or a finite real >= 0")
    for key in ("centered", "amsgrad", "decoupled_weight_decay", "nesterov"):
        if key in g:
            check(key, g[key], isinstance(g[key], bool), "True or False")
