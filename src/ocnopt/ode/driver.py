"""What :class:`~ocnopt.OCNOpt` does with the ODE blocks of its model (SNOpt inside the optimizer).

The optimizer keeps the order of a step; everything ODE-specific is here:

* :class:`ODEOptions`: the optimizer's ODE settings (validated, ``ValueError`` with the allowed
  range): whether layers after an ODE block get the feedback, the adjoint sampling grid, and
  the integration-time controller's hyperparameters.
* :class:`ODEDriver`:

  - **layers**: the ``nn.Linear`` / ``nn.Conv2d`` layers inside the blocks' vector fields
    (:func:`~ocnopt.ode.collector.ode_layers`). They run at every solver stage, so the optimizer
    keeps them out of its per-forward capture and out of the feedback pass; they get open-loop
    updates: Kronecker (``kfac``/``ekfac``) from the time-integrated factors, or their diagonal
    rule.
  - **factor collection**, on the steps where a layer's statistics are due: in the closure step
    an :class:`~ocnopt.ode.collector.ODEFactorCollector` is active around the graph-building
    pass only (:meth:`ODEDriver.first_pass`). For the classic ``loss.backward(); opt.step()``
    loop one collector is armed (:meth:`ODEDriver.arm`) when the optimizer is built and at the
    end of every step whose successor is due, and consumed by that next ``step()``
    (:meth:`ODEDriver.take`): it lives from the end of one step to the next, samples every
    adjoint solve run in between (several backward passes pool, like accumulated gradients),
    is emptied by ``zero_grad()``, discarded by a closure step, disarmed by ``close()`` or when
    the optimizer is garbage-collected. It is registered with the blocks, never on the modules
    (no module hooks between steps; copies of the model are not armed).
  - **feedback order**: which feedback layers ran after an ODE block started in the first pass
    (:attr:`FirstPass.after`); unless ``feedback_after_ode``, they get open-loop updates, so the
    second pass stops before the first block instead of re-integrating it.
  - **t1**: one :class:`~ocnopt.ode.t1.IntegrationTimeController` per ``learn_t1`` block. ``dL/dt1``
    and the field's parameter gradients come from the first pass (:meth:`ODEDriver.observe`,
    before any parameter moves), the realised ``dtheta`` after every parameter update
    (:meth:`ODEDriver.update_t1`). Both run inside the step transaction: ``t1`` is backed up and
    checked for NaN/Inf with the parameters, the controller's statistics are restored on
    rollback, so a skipped step moves neither ``t1`` nor the statistics. Its state is part of the
    optimizer's ``state_dict()``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ocnopt.layers import LayerHelper
from ocnopt.ode.block import ODEBlock, _adjoint_callback_name, find_ode_blocks
from ocnopt.ode.collector import ODEFactorCollector, ODEFactors, ode_layers
from ocnopt.ode.t1 import IntegrationTimeController, _validate

__all__ = ["FirstPass", "ODEDriver", "ODEOptions"]


@dataclass(frozen=True)
class ODEOptions:
    """ODE settings of :class:`~ocnopt.OCNOpt` (``OCNOpt(model, ode={...})``).

    Attributes:
        feedback_after_ode: give the feedback policy also to layers that run after an ODE block
            (the second pass then re-integrates the block: about ``nfe_forward`` more function
            evaluations per step). Default ``False``: those layers get open-loop updates and
            the second pass stops before the first block (measured: the feedback after the
            block costs more than it gains; see the README).
        sample_dt: maximum spacing (time units) of the adjoint samples of the factor
            collection with adaptive solvers (``None``: the solver's own steps); see
            :class:`~ocnopt.ode.collector.ODEFactorCollector`.
        t1_mode: ``"feedback"`` (SNOpt's second-order policy) or ``"gradient"`` (the
            first-order baseline) for ``learn_t1`` blocks.
        t1_lr, t1_reg, t1_momentum, t1_update_freq, min_t1: the controller's ``lr``, ``reg``,
            ``momentum``, ``update_freq`` (optimizer steps between ``t1`` updates), ``min_t1``
            (see :class:`~ocnopt.ode.t1.IntegrationTimeController`).
    """

    feedback_after_ode: bool = False
    sample_dt: float | None = None
    t1_mode: str = "feedback"
    t1_lr: float = 0.1
    t1_reg: float = 1e-3
    t1_momentum: float = 0.99
    t1_update_freq: int = 50
    min_t1: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.feedback_after_ode, bool):
            raise ValueError(f"invalid feedback_after_ode={self.feedback_after_ode!r}: allowed "
                             "values are True, False")
        dt = self.sample_dt
        if dt is not None and not (isinstance(dt, (int, float)) and not isinstance(dt, bool)
                                   and math.isfinite(dt) and dt > 0):
            raise ValueError(f"invalid sample_dt={dt!r}: allowed range is None or a finite "
                             "float > 0")
        _validate(self.t1_mode, self.t1_lr, self.t1_reg, self.t1_momentum, self.t1_update_freq,
                  self.min_t1, prefix="t1_")

    @classmethod
    def of(cls, value: ODEOptions | Mapping[str, Any] | None) -> ODEOptions:
        """``value`` as options: an instance, a mapping of its fields, or ``None`` (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"invalid ode={value!r}: allowed values are None, an ODEOptions or "
                             "a mapping of its fields")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown ODE option(s) {', '.join(map(repr, unknown))}; valid: "
                             f"{', '.join(names)}")
        return cls(**value)

    def controller(self, block: ODEBlock) -> IntegrationTimeController:
        return IntegrationTimeController(block, mode=self.t1_mode, lr=self.t1_lr,
                                         reg=self.t1_reg, momentum=self.t1_momentum,
                                         update_freq=self.t1_update_freq, min_t1=self.min_t1)



@dataclass
class FirstPass:
    """What the closure step's first pass yields for the ODE part (filled on exit)."""

    factors: dict[nn.Module, ODEFactors] = field(default_factory=dict)
    after: set[nn.Module] = field(default_factory=set)


class _Order:
    """Pre-hooks on the feedback layers for one forward: which ran after an ODE block started
    (detected by the blocks' forward function evaluations, so ``integrate()`` calls count)."""

    def __init__(self, blocks: list[ODEBlock], watch: list[nn.Module]) -> None:
        self.blocks = blocks
        self.watch = watch
        self.after: set[nn.Module] = set()
        self._start = 0
        self._handles: list[RemovableHandle] = []

    def _evaluations(self) -> int:
        return sum(b.nfe_forward_total for b in self.blocks)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled() and self._evaluations() > self._start:
            self.after.add(module)

    def __enter__(self) -> _Order:
        self._start = self._evaluations()
        self._handles = [m.register_forward_pre_hook(self._pre_hook) for m in self.watch]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ODEDriver:
    """The ODE part of one optimizer (see the module docstring).

    Args:
        model: the optimizer's model (its :class:`ODEBlock` s are found once).
        options: the optimizer's :class:`ODEOptions`.
        kronecker: whether the curvature collects Kronecker factors (``kfac``/``ekfac``); then
            every block with layers must use a solver that calls the adjoint step callback.
    """

    def __init__(self, model: nn.Module, options: ODEOptions, kronecker: bool) -> None:
        self.model = model
        self.options = options
        self.blocks = find_ode_blocks(model)
        self.candidates, _ = ode_layers(model)
        if kronecker:
            used = {b for lay in self.candidates.values() for b in lay.blocks}
            blind = sorted(f"{n} ({self.blocks[n].method})" for n in used
                           if _adjoint_callback_name(self.blocks[n].method) is None)
            if blind:
                raise ValueError(f"ODE block(s) {', '.join(blind)}: kfac/ekfac collect the "
                                 "factors of their layers during the adjoint solve, which needs "
                                 "a torchdiffeq fixed-grid or adaptive Runge-Kutta method; "
                                 "allowed: such a method, or a diagonal curvature")
        self.controllers = {name: options.controller(b) for name, b in self.blocks.items()
                            if b.learn_t1}
        self.helpers: dict[nn.Module, LayerHelper] = {}
        self._armed: ODEFactorCollector | None = None
        self._leaves: dict[str, Tensor] = {}
        self._observed: list[IntegrationTimeController] = []

    def use(self, helpers: Mapping[nn.Module, LayerHelper]) -> None:
        """The ODE layers the optimizer updates, with its helpers (bias conventions)."""
        self.helpers = dict(helpers)

    # -- factor collection --------------------------------------------------------------------
    def _collector(self, due: list[nn.Module]) -> ODEFactorCollector:
        return ODEFactorCollector(self.model, {m: self.helpers[m] for m in due},
                                  self.options.sample_dt)

    def arm(self, due: list[nn.Module]) -> None:
        """Classic loop: collect the factors of ``due`` in the adjoint solves until :meth:`take`
        (replaces what was armed; nothing is armed for an empty ``due``)."""
        self.disarm()
        if due:
            self._armed = self._collector(due).__enter__()

    def disarm(self) -> None:
        """Stop and drop the classic loop's collector (idempotent)."""
        if self._armed is not None:
            self._armed.close()
            self._armed = None

    def take(self) -> dict[nn.Module, ODEFactors]:
        """Classic loop: the factors collected since :meth:`arm`; disarms."""
        col, self._armed = self._armed, None
        if col is None:
            return {}
        col.close()
        return col.factors()

    @contextmanager
    def first_pass(self, due: list[nn.Module], watch: list[nn.Module]) -> Iterator[FirstPass]:
        """Around the closure step's graph-building pass: collect the factors of the ODE layers
        ``due``; unless ``feedback_after_ode``, record which of the feedback layers ``watch``
        ran after an ODE block started. Discards the classic loop's collector."""
        self.disarm()
        out = FirstPass()
        with ExitStack() as stack:
            col = stack.enter_context(self._collector(due)) if due else None
            order = None
            if watch and self.blocks and not self.options.feedback_after_ode:
                order = stack.enter_context(_Order(list(self.blocks.values()), watch))
            yield out
        out.factors = col.factors() if col is not None else {}
        out.after = order.after if order is not None else set()

    # -- integration time ---------------------------------------------------------------------
    def t1_targets(self) -> list[Tensor]:
        """The ``t1`` leaves of the ``learn_t1`` blocks, to differentiate in the first pass (read
        after the closure ran: the leaf its forward integrated to)."""
        self._leaves = {}
        for name in self.controllers:
            leaf = self.blocks[name].t1_leaf
            if leaf is not None:
                self._leaves[name] = leaf
        return list(self._leaves.values())

    def observe(self, grads: Mapping[Tensor, Tensor | None], inv_scale: float, txn: Any) -> None:
        """Record ``dL/dt1`` and the fields' raw parameter gradients (before any update).

        ``grads``: the first pass's gradients (parameters, and the leaves of
        :meth:`t1_targets`); a block whose leaf is not there reads ``block.t1_grad`` (the
        closure or the user called ``backward()``), scaled by ``inv_scale`` (AMP). ``txn``: the
        step's :class:`~ocnopt.optim.transaction.StepTransaction`.
        """
        self._observed = []
        for name, ctrl in self.controllers.items():
            block = self.blocks[name]
            leaf = self._leaves.get(name)
            g = grads.get(leaf) if leaf is not None else None
            if g is None:
                g = block.t1_grad
                if g is not None and inv_scale != 1.0:
                    g = g * inv_scale
            if g is None:  # the block did not run with gradients this step
                continue
            txn.on_rollback(partial(ctrl.load_state_dict, ctrl.state_dict()))
            txn.touch(block.t1)
            ctrl.observe(t1_grad=g, param_grads=[grads.get(p) for p in ctrl.params])
            txn.watch(t for t in (ctrl.q_t, ctrl.q_tt, ctrl.grad, ctrl.cross) if t is not None)
            self._observed.append(ctrl)

    def update_t1(self) -> None:
        """After every parameter update of the step: the controllers' ``t1`` updates (on their
        update steps), from the realised parameter change."""
        for ctrl in self._observed:
            ctrl.step()
        self._observed = []

    def end_step(self) -> None:
        """Forget the step's ``t1`` leaves and gradients (``backward()`` accumulates them)."""
        self._leaves = {}
        self._observed = []
        for name in self.controllers:
            self.blocks[name].clear_t1_grad()

    def zero_grad(self) -> None:
        """``optimizer.zero_grad()``: clear the ``t1`` gradients and the classic collector's
        statistics (it stays armed)."""
        self.end_step()
        if self._armed is not None:
            self._armed.reset()

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"t1": {block name: controller state}}``."""
        return {"t1": {name: c.state_dict() for name, c in self.controllers.items()}}

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` fits this driver's blocks (see ``state_dict``)."""
        if not isinstance(state, dict) or not isinstance(state.get("t1"), dict):
            raise ValueError("the ODE state must be a dict with a 't1' dict of controller states")
        names, saved = set(self.controllers), set(state["t1"])
        if names != saved:
            raise ValueError(f"integration-time state for blocks {sorted(saved)}, but the model's "
                             f"learn_t1 blocks are {sorted(names)}")
        for name, ctrl in self.controllers.items():
            try:
                ctrl.check_state(state["t1"][name])
            except ValueError as exc:
                raise ValueError(f"ODE block {name!r}: {exc}") from exc

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for name, ctrl in self.controllers.items():
            ctrl.load_state_dict(state["t1"][name])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_armed=None, _leaves={}, _observed=[])
        return state
