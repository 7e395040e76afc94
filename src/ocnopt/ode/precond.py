"""SNOpt's preconditioner for the classic loop: EKFAC on time-integrated factors.

For users of any ``torch.optim`` optimizer (SNOpt pairs it with SGD)::

    precond = SNOptPreconditioner(model)
    for x, y in loader:
        optimizer.zero_grad()
        with precond.collect():           # arms factor collection on refresh steps only
            loss_fn(model(x), y).backward()
        precond.step()                    # rewrites .grad of the layers inside ODE blocks
        optimizer.step()

Only the ``nn.Linear`` / ``nn.Conv2d`` layers inside ODE blocks' vector fields are
preconditioned. Every ``update_freq`` steps the factors are collected afresh during the adjoint
solve (:class:`~ocnopt.ode.collector.ODEFactorCollector`; replaced, not averaged, as in SNOpt)
and re-eigendecomposed; every step the EKFAC eigenvalue statistics are updated with the
projected gradient and the gradient is rescaled (``ocnopt.curvature``'s algebra)::

    m2 <- decay * m2 + (1 - decay) * B * (U_G^T grad U_A)^2      (m2 = L l_G l_A^T at refresh)
    grad <- U_G [(U_G^T grad U_A) / (m2 + damping)] U_A^T
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ocnopt.curvature.kronecker import Eigenbasis, Projection, ekfac_init, refresh_eigenbasis
from ocnopt.ode.collector import ODEFactorCollector, ODELayer, ode_layers

__all__ = ["SNOptPreconditioner"]

_BASIS_KEYS = ("vectors", "values", "rest")


class SNOptPreconditioner:
    """EKFAC preconditioning of ODE-internal layers from adjoint-collected factors.

    Args:
        model: the network (its :class:`~ocnopt.ode.ODEBlock` s are found automatically).
        damping: added to the EKFAC eigenvalues (> 0; SNOpt: 0.05, 0.03-0.1).
        update_freq: steps between factor collections and eigenbasis refreshes (int >= 1).
        eigenvalue_decay: EMA decay of the eigenvalue statistics ``m2`` (``[0, 1)``; 0.75).
        max_rank: truncated eigenbases as in ``OCNOpt`` (None = exact).
        sample_dt: passed to :class:`~ocnopt.ode.collector.ODEFactorCollector` (denser adjoint
            samples for adaptive solvers, at extra cost on collection steps; None = the
            solver's steps).
    """

    def __init__(self, model: nn.Module, damping: float = 0.05, update_freq: int = 100,
                 eigenvalue_decay: float = 0.75, max_rank: int | None = None,
                 sample_dt: float | None = None) -> None:
        ok = isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0
        if not ok:
            raise ValueError(f"invalid damping={damping!r}: allowed range is a finite float > 0")
        if not (isinstance(update_freq, int) and not isinstance(update_freq, bool)
                and update_freq >= 1):
            raise ValueError(f"invalid update_freq={update_freq!r}: allowed range is an int >= 1")
        if not (isinstance(eigenvalue_decay, (int, float)) and 0 <= eigenvalue_decay < 1):
            raise ValueError(f"invalid eigenvalue_decay={eigenvalue_decay!r}: allowed range is "
                             "0 <= eigenvalue_decay < 1")
        if max_rank is not None and not (isinstance(max_rank, int) and max_rank >= 1):
            raise ValueError(f"invalid max_rank={max_rank!r}: allowed range is None or an int "
                             ">= 1")
        self.model = model
        self.damping = float(damping)
        self.update_freq = update_freq
        self.eigenvalue_decay = float(eigenvalue_decay)
        self.max_rank = max_rank
        ODEFactorCollector(model, [], sample_dt)  # validates sample_dt and the solvers
        self.sample_dt = sample_dt
        self.layers, skipped = ode_layers(model)
        if skipped:
            warnings.warn("layers inside ODE blocks without a Kronecker helper are not "
                          "preconditioned: " + "; ".join(skipped), RuntimeWarning, stacklevel=2)
        self.steps = 0
        self.eigh_failures = 0
        self.state: dict[str, dict[str, Any]] = {lay.name: {} for lay in self.layers.values()}
        self._collector: ODEFactorCollector | None = None

    @property
    def due(self) -> bool:
        """Whether this step collects factors: every ``update_freq``-th step, and every step
        until some layer has a basis (a layer that did not run waits for the next refresh)."""
        return self.steps % self.update_freq == 0 or all("m2" not in st
                                                         for st in self.state.values())

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Run forward and backward inside; collects factors when :attr:`due`."""
        if not self.due:
            yield
            return
        with ODEFactorCollector(self.model, list(self.layers), self.sample_dt) as col:
            yield
        self._collector = col

    @torch.no_grad()
    def step(self) -> None:
        """Refresh bases from the collected factors (if any), then precondition ``.grad``."""
        col, self._collector = self._collector, None
        if col is not None:
            factors = col.factors()
            if not factors:
                raise RuntimeError("no factors were collected: run backward() inside "
                                   "`with precond.collect():`")
            for module, fac in factors.items():
                self._refresh(self.layers[module], fac.A, fac.G, fac.locations, fac.batch_size)
        for lay in self.layers.values():
            self._precondition(lay)
        self.steps += 1

    def _refresh(self, lay: ODELayer, a: torch.Tensor, g: torch.Tensor, locations: float,
                 batch: int) -> None:
        st = self.state[lay.name]
        bases = []
        for side, f in (("in", a), ("out", g)):
            prev = None
            if f"{side}_vectors" in st:
                prev = Eigenbasis(*(st[f"{side}_{k}"] for k in _BASIS_KEYS))
            basis = refresh_eigenbasis(f, self.max_rank, prev)
            if basis is None:
                self.eigh_failures += 1
                warnings.warn(f"layer {lay.name!r}: eigendecomposition of the {side}put factor "
                              "failed; keeping the last good basis", RuntimeWarning,
                              stacklevel=3)
                if prev is None:
                    return
                basis = prev
            bases.append((side, basis))
        for side, basis in bases:
            for k in _BASIS_KEYS:
                st[f"{side}_{k}"] = getattr(basis, k)
        inp, out = bases[0][1], bases[1][1]
        st["m2"] = ekfac_init(out, inp, locations)
        st["batch_size"] = batch

    def _precondition(self, lay: ODELayer) -> None:
        st = self.state[lay.name]
        helper = lay.helper
        w, b = helper.weight, helper.bias
        if "m2" not in st or w.grad is None:
            return
        out = Eigenbasis(*(st[f"out_{k}"] for k in _BASIS_KEYS))
        inp = Eigenbasis(*(st[f"in_{k}"] for k in _BASIS_KEYS))
        db = b.grad if b is not None else None
        if b is not None and db is None:
            db = torch.zeros_like(b)
        proj = Projection(helper.to_matrix(w.grad, db), out, inp)
        decay = self.eigenvalue_decay
        st["m2"].mul_(decay).add_(proj.second_moments(), alpha=(1 - decay) * st["batch_size"])
        pw, pb = helper.from_matrix(proj.apply((st["m2"] + self.damping).reciprocal_()))
        w.grad.copy_(pw)
        if b is not None and pb is not None:
            if b.grad is None:
                b.grad = pb.clone()
            else:
                b.grad.copy_(pb)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, failure count and per-layer bases / statistics, keyed by layer name."""
        return {"steps": self.steps, "eigh_failures": self.eigh_failures,
                "layers": {n: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                               for k, v in st.items()} for n, st in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state["layers"]) - set(self.state)
        if unknown:
            raise ValueError(f"state has unknown layers: {sorted(unknown)}")
        self.steps = int(state["steps"])
        self.eigh_failures = int(state["eigh_failures"])
        devices = {lay.name: lay.helper.weight.device for lay in self.layers.values()}
        for name, st in state["layers"].items():
            self.state[name] = {k: (v.to(devices[name]).clone() if isinstance(v, torch.Tensor)
                                    else v) for k, v in st.items()}
