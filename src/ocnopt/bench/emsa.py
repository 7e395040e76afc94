"""E-MSA: the extended method of successive approximations (Li, Chen, Tai, E; JMLR 18(165), 2018).

The optimal-control baseline of DDPNOpt (algorithm.md §8.1, §9.3). A ``nn.Sequential`` model
is split into *stages* ``x_{t+1} = f_t(x_t, theta_t)``: one module that owns parameters (the
control ``theta_t``) followed by every parameter-free module up to the next one. Parameter-free
modules before the first such module are preprocessing (e.g. ``nn.Flatten``); nested
``nn.Sequential`` containers are flattened.

One ``step(closure)`` on a minibatch of B samples (``closure()`` returns the batch-MEAN loss
``L = (1/B) sum_i phi(x_T^i, y^i)`` and does not call ``backward()``):

1. **States.** The closure's forward pass is recorded with context-managed hooks:
   ``x_t`` (B, ...) is the input of stage t, ``x_T`` the model output.
2. **Costates.** ``p_{t+1} = -dL/dx_{t+1}`` (B, ...), by autograd on that same graph. Because L
   is the batch MEAN, each sample's costate carries the factor 1/B:
   ``p_t^i = -(1/B) d phi_i / d x_t^i``. This satisfies the discrete PMP backward equation
   ``p_t^i = grad_x H(x_t^i, p_{t+1}^i, theta_t)`` with ``p_T^i = -(1/B) grad phi_i(x_T^i)``.
   The official code (LiQianxiao/MaxPrinciple-DeepLearning) uses the same scaling.
3. **Hamiltonian maximisation.** Each stage t is handled independently, with the nominal
   ``x_t, x_{t+1}, p_t, p_{t+1}`` held fixed (so the stages could run in parallel). Starting
   from the current ``theta_t``, ``inner_steps`` steps of gradient ASCENT (plain GD or Adam,
   step size ``lr``) are taken on

       H~_t(theta) = sum_i p_{t+1}^i . f_t(x_t^i, theta)                   [Hamiltonian]
                     - (gamma / 2) ||theta||^2                             [reg, weight_decay]
                     - (rho / 2) sum_i ||x_{t+1}^i - f_t(x_t^i, theta)||^2         [state]
                     - (rho / 2) sum_i ||p_t^i - grad_x H(x_t^i, p_{t+1}^i, theta)||^2  [costate]

   where ``H(x, p, theta) = p . f_t(x, theta) - (gamma/2)||theta||^2`` and therefore
   ``grad_x H = J_x f_t(x, theta)^T p``. Sums run over the batch, exactly as in the official
   code: its ``tf.nn.l2_loss`` is ``sum(.)^2 / 2``. Sign conventions: the costate is MINUS
   the loss gradient, H is maximised, and both penalties are subtracted.

Consequences (tested):

* ``grad_theta H~`` at the current ``theta`` equals ``-dL/dtheta - gamma theta``. Both
  feasibility residuals vanish there, and so do their gradients. Hence ONE plain-GD inner
  step is exactly one SGD step ``theta <- theta - lr (dL/dtheta + gamma theta)``, whatever
  ``rho`` is. The rho terms only act from the second inner step on, keeping ``theta_t`` from
  moving the stage's states and costates too far.
* With Adam, the inner moments are reset at every outer step by default. Each step solves a
  new maximisation problem, just as the official L-BFGS-B inner solver restarts at every step.

Cost: per outer step, one forward and one backward of the closure, plus, for each stage,
``inner_steps`` x (stage forward + backward). With ``rho > 0`` each of these also has a double
backward for ``grad_x H``. Differences from the official code: the official inner solver is
L-BFGS-B (maxiter 10) from a slightly perturbed start; the brief here asks for GD/Adam steps.
Official settings: rho = 1.0 (toy) and 0.03 (MNIST, batch 128); reg 1e-3.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ocnopt.reference.model import split_sequential

__all__ = ["EMSA", "Stage", "Trajectory", "split_stages", "capture_states"]

log = logging.getLogger(__name__)

INNER_OPTIMIZERS = ("gd", "adam")


@dataclass(frozen=True)
class Stage:
    """One control stage ``x_{t+1} = post(head(x_t))``; ``params`` are the optimized ones."""

    index: int
    head: nn.Module
    post: tuple[nn.Module, ...]
    params: tuple[nn.Parameter, ...]

    def __call__(self, x: Tensor) -> Tensor:
        """``f_t(x, theta_t)`` at the current parameters: (B, ...) -> (B, ...)."""
        h = self.head(x)
        for m in self.post:
            h = m(h)
        return h


@dataclass
class Trajectory:
    """Nominal pass of one minibatch: ``loss`` (scalar, batch mean, detached);
    ``states[t]`` = x_t (B, ...) for t = 0..T (x_T = model output); ``costates[t]`` = p_t =
    -dL/dx_t (B, ...) (``None`` where not computed). Both lists are detached."""

    loss: Tensor
    states: list[Tensor]
    costates: list[Tensor | None]


def split_stages(
    model: nn.Module, optimized: set[nn.Parameter] | None = None
) -> tuple[list[nn.Module], list[Stage]]:
    """Split a (nested) ``nn.Sequential`` into (preprocessing modules, stages).

    A module owning at least one parameter heads a new stage; ``optimized`` (default: every
    parameter) selects which of its parameters the stage updates.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"E-MSA needs an nn.Sequential model, got {type(model).__name__}")
    pre, groups = split_sequential(model, lambda m: any(True for _ in m.parameters()))
    heads = [h for h, _ in groups]
    if len(set(map(id, heads))) != len(heads):
        raise ValueError("a parametric module appears twice in the Sequential (shared weights)")
    stages = []
    for t, (head, post) in enumerate(groups):
        params = tuple(p for p in head.parameters()
                       if p.requires_grad and (optimized is None or p in optimized))
        stages.append(Stage(t, head, tuple(post), params))
    return pre, stages


@dataclass
class _Capture:
    inputs: dict[int, list[Tensor]]
    output: list[Tensor]


@contextmanager
def capture_states(model: nn.Module, heads: list[nn.Module]) -> Iterator[_Capture]:
    """Record each head's input and ``model``'s output while the block runs (grad mode only).

    Every hook is removed on exit, also when the block raises.
    """
    cap = _Capture({id(h): [] for h in heads}, [])
    handles: list[RemovableHandle] = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled() and args and isinstance(args[0], Tensor):
            cap.inputs[id(module)].append(args[0])

    def out_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):
            cap.output.append(output)

    try:
        for h in heads:
            handles.append(h.register_forward_pre_hook(pre_hook))
        handles.append(model.register_forward_hook(out_hook))
        yield cap
    finally:
        for handle in handles:
            handle.remove()


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class EMSA(Optimizer):
    """Extended method of successive approximations (E-MSA) for ``nn.Sequential`` models.

    Args:
        model: ``nn.Sequential``; every module owning parameters heads a stage (see module doc).
            No BatchNorm in training mode, no active dropout: ``f_t`` is re-evaluated in the
            inner loop and must be deterministic and free of side effects.
        lr: step size of the inner gradient ascent (in ``param_groups``; schedulers work).
        rho: feasibility penalty ``rho >= 0`` (0 = plain MSA on the Hamiltonian).
        inner_steps: gradient-ascent steps per stage and outer step (>= 1).
        inner_optimizer: ``"gd"`` (theta += lr g) or ``"adam"`` (Adam ascent, ``betas``, ``eps``).
        weight_decay: ``gamma`` of the running cost ``(gamma/2)||theta||^2``.
        reset_inner_state: reset the inner Adam moments at each outer step (default, as the
            paper's inner solver restarts); ``False`` carries them over.
        params: optional parameters / param groups (all owned by ``model``); default all.

    ``step(closure)`` returns the batch-mean loss before the update (detached). The
    parameters' ``.grad`` fields are neither read nor written (all gradients come from
    ``torch.autograd.grad``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        rho: float = 0.03,
        inner_steps: int = 5,
        inner_optimizer: str = "adam",
        *,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        reset_inner_state: bool = True,
        params: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMSA needs the model (nn.Module) first, got {type(model).__name__}")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner_optimizer {inner_optimizer!r}; valid: "
                             f"{', '.join(INNER_OPTIMIZERS)}")
        if not (isinstance(inner_steps, int) and not isinstance(inner_steps, bool)
                and inner_steps >= 1):
            raise ValueError(f"invalid inner_steps={inner_steps!r}: must be an int >= 1")
        for name, v in (("lr", lr), ("rho", rho), ("weight_decay", weight_decay), ("eps", eps)):
            if not (_is_real(v) and v >= 0):
                raise ValueError(f"invalid {name}={v!r}: must be a finite float >= 0")
        if not (len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"invalid betas={betas!r}: need 0 <= beta < 1")
        self.model = model
        self.inner_steps = inner_steps
        self.inner_optimizer = inner_optimizer
        self.reset_inner_state = bool(reset_inner_state)
        defaults = dict(lr=lr, rho=rho, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        owned = {p for p in model.parameters()}
        optimized = {p for g in self.param_groups for p in g["params"]}
        if not optimized <= owned:
            raise ValueError("some optimized parameters do not belong to the model")
        self.pre, self.stages = split_stages(model, optimized)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        in_stage = {p for s in self.stages for p in s.params}
        if optimized - in_stage:
            raise ValueError(f"{len(optimized - in_stage)} optimized parameter(s) are not "
                             "direct parameters of a stage module")

    # ------------------------------------------------------------------ nominal pass
    def _check_model(self) -> None:
        for m in self.model.modules():
            if isinstance(m, _BatchNorm) and m.training:
                raise ValueError("E-MSA re-evaluates each stage: BatchNorm in training mode is "
                                 "not supported (use eval mode or a model without BatchNorm)")
            if isinstance(m, _DropoutNd) and m.training and m.p > 0:
                raise ValueError("E-MSA re-evaluates each stage: active dropout makes f_t "
                                 "random; call model.eval() or remove the dropout")

    def trajectory(
        self, closure: Callable[[], Tensor], all_costates: bool = True
    ) -> Trajectory:
        """Run ``closure`` once; return states x_0..x_T and costates p_t = -dL/dx_t.

        With ``all_costates=False`` only the costates ``p_{t+1}`` that the update needs (outputs
        of stages with optimized parameters) are computed. ``p_t`` for states that do not
        depend on any parameter (e.g. p_0) are filled by the stage backward recursion
        ``p_t = J_x f_t^T p_{t+1}``.
        """
        self._check_model()
        heads = [s.head for s in self.stages]
        with torch.enable_grad(), capture_states(self.model, heads) as cap:
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("closure() must return the scalar batch-mean loss (a Tensor)")
        counts = [len(cap.inputs[id(h)]) for h in heads]
        if any(c != 1 for c in counts) or len(cap.output) != 1:
            raise RuntimeError(
                "closure() must run the model exactly once with gradients enabled; "
                f"stage calls {counts}, model calls {len(cap.output)}")
        if not loss.requires_grad:
            raise RuntimeError("the loss does not require grad: did closure() run under "
                               "no_grad or are all parameters frozen?")
        states = [*(cap.inputs[id(h)][0] for h in heads), cap.output[0]]
        T = len(self.stages)
        wanted = [t + 1 for t, s in enumerate(self.stages) if s.params]
        if all_costates:
            wanted = [t for t in range(T + 1) if states[t].requires_grad]
        grads = torch.autograd.grad(loss.reshape(()), [states[t] for t in wanted])
        costates: list[Tensor | None] = [None] * (T + 1)
        for t, g in zip(wanted, grads, strict=True):
            costates[t] = -g.detach()
        if all_costates:
            for t in range(T - 1, -1, -1):
                if costates[t] is None and costates[t + 1] is not None:
                    costates[t] = self._input_costate(self.stages[t], states[t],
                                                      costates[t + 1])
        return Trajectory(loss.detach().reshape(()), [s.detach() for s in states], costates)

    @staticmethod
    def _input_costate(stage: Stage, x: Tensor, p_next: Tensor) -> Tensor:
        """p_t = grad_x H(x_t, p_{t+1}, theta) = J_x f_t^T p_{t+1}, (B, ...)."""
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(stage(xi), xi, p_next)
        return g.detach()

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One E-MSA iteration on the closure's minibatch; returns the loss before it."""
        if closure is None:
            raise ValueError("EMSA.step needs a closure returning the batch-mean loss "
                             "(without backward())")
        traj = self.trajectory(closure, all_costates=False)
        for stage in self.stages:
            if stage.params:
                if self.reset_inner_state:
                    for p in stage.params:
                        self.state[p].clear()
                p_next = traj.costates[stage.index + 1]
                assert p_next is not None
                self._maximise(stage, traj.states[stage.index], traj.states[stage.index + 1],
                               p_next)
        return traj.loss

    def _maximise(self, stage: Stage, x: Tensor, x_next: Tensor, p_next: Tensor) -> None:
        """``inner_steps`` ascent steps on H~_t(theta_t) (module docstring), in place."""
        rho = self._group_of[stage.params[0]]["rho"]
        q: Tensor | None = None  # p_t = grad_x H at the nominal theta (first inner step)
        for _ in range(self.inner_steps):
            with torch.enable_grad():
                xi = x.detach().requires_grad_(rho > 0)
                out = stage(xi)
                obj = (p_next * out).sum()
                if rho > 0:
                    (dhdx,) = torch.autograd.grad(obj, xi, create_graph=True)
                    if q is None:
                        q = dhdx.detach()
                    obj = obj - 0.5 * rho * ((x_next - out).pow(2).sum()
                                             + (q - dhdx).pow(2).sum())
                grads = torch.autograd.grad(obj, stage.params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(stage.params, grads, strict=True):
                    self._ascend(p, torch.zeros_like(p) if g is None else g)

    def _ascend(self, p: Tensor, g: Tensor) -> None:
        """theta <- theta + step(g - gamma theta): GD or Adam ascent."""
        group = self._group_of[p]
        if group["weight_decay"]:
            g = g.add(p, alpha=-group["weight_decay"])
        if self.inner_optimizer == "gd":
            p.add_(g, alpha=group["lr"])
            return
        st = self.state[p]
        if not st:
            st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        b1, b2 = group["betas"]
        st["step"] += 1
        k = st["step"]
        st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["exp_avg_sq"] / (1 - b2**k)).sqrt_().add_(group["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=group["lr"] / (1 - b1**k))
