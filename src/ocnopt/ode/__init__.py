"""Neural ODEs (SNOpt): adjoint-solved ODE blocks, time-integrated Kronecker factors collected
during the adjoint solve (O(1) memory), and the integration time ``t1`` as a control.

Needs the optional dependency torchdiffeq (``pip install 'ocnopt[ode]'``).

With :class:`~ocnopt.OCNOpt` (one optimizer for the whole model)::

    model = nn.Sequential(stem, ODEBlock(ConvField(), learn_t1=True), head)
    opt = OCNOpt(model, lr=0.01, curvature="ekfac", momentum=0.9,
                 ode={"t1_lr": 0.1, "t1_reg": 1e-3, "t1_update_freq": 50})
    for x, y in loader:
        opt.step(lambda: F.cross_entropy(model(x), y))      # or backward(); opt.step()

* The ``nn.Linear`` / ``nn.Conv2d`` layers inside the blocks' vector fields get open-loop
  updates: ``kfac``/``ekfac`` precondition them with the time-integrated factors collected in
  the adjoint solve on the steps where their statistics are due (the same per-layer schedule as
  every other layer); ``identity``/``rmsprop``/``adam`` apply their torch rule (bitwise the torch
  optimizer with the feedback off). They are never captured per forward (they run at every
  solver stage) and get no feedback.
* Layers outside the blocks keep OCNOpt's path, feedback included. Layers that run after an ODE
  block get open-loop updates by default, so the feedback pass stops before the first block;
  ``ode={"feedback_after_ode": True}`` gives them the feedback at the price of re-integrating
  the block in the second pass (measured by ``examples/ode_feedback_trade.py``).
* ``learn_t1`` blocks: ``dL/dt1`` and the field's gradients come from the first pass, the
  realised parameter change after the update; the ``t1`` update is part of the all-or-nothing
  step (a skipped step moves neither ``t1`` nor the controller's statistics) and its state part
  of ``state_dict()``.
* In the classic ``backward(); opt.step()`` loop the factor collection is armed between steps
  (see :mod:`ocnopt.ode.driver` for its lifetime); no module hooks exist between steps.

With any ``torch.optim`` optimizer: :class:`SNOptPreconditioner` (``with precond.collect():
loss.backward()``, ``precond.step()``, ``optimizer.step()``) and one
:class:`IntegrationTimeController` per ``learn_t1`` block (``observe()`` after ``backward()``,
``step()`` after ``optimizer.step()``).

Pieces:

* :class:`ODEBlock` (``x -> x(t1)`` through the stock ``torchdiffeq.odeint_adjoint``), time-
  dependent layers :class:`ConcatConv2d`, :class:`ConcatLinear`, :class:`ConcatSquashLinear`.
* :class:`ODEFactorCollector`: per-layer :class:`ODEFactors` (``A``, ``G``, batch size,
  locations, integrated time, sample count) of the layers inside the blocks' vector fields,
  sampled on the adjoint solves run while it is active (statistics of all adjoint solves of a
  step pool, e.g. one per observation interval of an ODE-RNN).
* :class:`IntegrationTimeController`: SNOpt's second-order feedback policy for ``t1`` (and the
  first-order baseline).
* :class:`SNOptPreconditioner`: the factors as an EKFAC preconditioner for the classic loop.
* :class:`ODEOptions` and :mod:`ocnopt.ode.driver`: what OCNOpt does with the blocks.
"""

from ocnopt.ode.block import ODEBlock, State, find_ode_blocks
from ocnopt.ode.collector import ODEFactorCollector, ODEFactors, ODELayer, ode_layers
from ocnopt.ode.driver import ODEOptions
from ocnopt.ode.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear
from ocnopt.ode.precond import SNOptPreconditioner
from ocnopt.ode.t1 import T1_MODES, IntegrationTimeController

__all__ = [
    "ConcatConv2d",
    "ConcatLinear",
    "ConcatSquashLinear",
    "IntegrationTimeController",
    "ODEBlock",
    "ODEFactorCollector",
    "ODEFactors",
    "ODELayer",
    "ODEOptions",
    "SNOptPreconditioner",
    "State",
    "T1_MODES",
    "find_ode_blocks",
    "ode_layers",
]
