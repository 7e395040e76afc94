"""Neural ODEs (SNOpt): adjoint-solved ODE blocks, time-integrated Kronecker factors collected
during the adjoint solve (O(1) memory), and the integration time ``t1`` as a control.

Needs the optional dependency torchdiffeq (``pip install 'ocnopt[ode]'``).

Pieces:

* :class:`ODEBlock` (``x -> x(t1)`` through the stock ``torchdiffeq.odeint_adjoint``), time-
  dependent layers :class:`ConcatConv2d`, :class:`ConcatLinear`, :class:`ConcatSquashLinear`.
* :class:`ODEFactorCollector`: per-layer :class:`ODEFactors` (``A``, ``G``, batch size,
  locations, integrated time, sample count) of the ``nn.Linear`` / ``nn.Conv2d`` layers inside
  the blocks' vector fields, sampled on the adjoint solves run while it is active.
* :class:`IntegrationTimeController`: SNOpt's second-order feedback policy for ``t1`` (and the
  first-order baseline).
* :class:`SNOptPreconditioner`: the same factors as a kfac-style preconditioner for the classic
  ``backward(); precond.step(); optimizer.step()`` loop.

How an optimizer that owns the step (``OCNOpt``) uses them:

1. **Find the layers.** ``layers, skipped = ode_layers(model)`` (``{module: ODELayer}``) lists
   every supported layer inside an ODE function. These run at every solver stage, also under
   ``enable_grad`` inside the adjoint backward, so they must be kept out of per-forward capture
   (a forward hook would record every stage: memory growing with the solver steps) and out of
   the layer-wise feedback pass; they get open-loop Kronecker preconditioning (``kfac``/
   ``ekfac``) or their diagonal rule. Their weight gradients are ordinary autograd gradients
   (request them as ``param`` targets). ``find_ode_blocks(model)`` gives the blocks by name.
2. **Arm collection when factors are due**, around the pass that runs the backward::

       with ODEFactorCollector(model, layers) as col:     # only on factor-update steps
           loss = closure(); grads = torch.autograd.grad(loss, targets)
       for module, fac in col.factors().items():          # layers that ran this step
           st = state[module.weight]
           st["A"] = EMA(st["A"], fac.A); st["G"] = EMA(st["G"], fac.G)   # or replace
           st["locations"], st["batch_size"] = fac.locations, fac.batch_size
           refresh the eigenbasis when due (``refresh_eigenbasis``, ``ekfac_init``)

   ``fac.A`` / ``fac.G`` already have the core's conventions (ones column for the bias, per-
   sample ``B``-scaled cotangents), plus the integrated time (see ``ocnopt.ode.collector``).
   Statistics of all adjoint solves inside the block are pooled (e.g. one per observation
   interval of an ODE-RNN); nothing outlives the ``with``.
3. **Drive ``t1``** for each block built with ``learn_t1=True``: keep one
   ``IntegrationTimeController`` per block (its ``state_dict`` inside the optimizer's). In the
   closure step add ``block.t1_leaf`` (read after ``closure()`` ran) to the autograd targets;
   before updating parameters call ``ctrl.observe(t1_grad=dL/dt1, param_grads=[raw gradients
   of block.func's parameters])``; after all parameter updates call ``ctrl.step()`` (it
   measures the realised ``dtheta`` and writes ``block.t1`` on update steps). In the classic
   loop, ``ctrl.observe()`` without arguments reads ``block.t1_grad`` and ``p.grad``.
4. **Feedback after an ODE block**: the second (``no_grad``) pass re-integrates the block
   (``block.nfe_forward`` more evaluations); no collection or ``t1`` statistic is recorded then.
"""

from ocnopt.ode.block import ODEBlock, State, find_ode_blocks
from ocnopt.ode.collector import ODEFactorCollector, ODEFactors, ODELayer, ode_layers
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
    "SNOptPreconditioner",
    "State",
    "T1_MODES",
    "find_ode_blocks",
    "ode_layers",
]
