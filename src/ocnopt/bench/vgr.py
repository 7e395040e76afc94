"""SGD with a vanishing-gradient regulariser: the "SGD-VGR" baseline of DDPNOpt's Fig. 6.

The regulariser is the gradient-norm-preserving term of Pascanu, Mikolov and Bengio ("On the
difficulty of training recurrent neural networks", ICML 2013, eq. 9), applied to the stages of
a feed-forward ``nn.Sequential`` instead of the time steps of an RNN. With ``x_t`` the input of
stage ``t`` (t = 0..T-1; a stage is a module with parameters followed by the parameter-free
modules up to the next one, as in :func:`ocnopt.bench.emsa.split_stages`), ``x_T`` the model
output and ``v_t = dL/dx_t`` (B, n_t) the per-sample backpropagated gradient of the batch-mean
loss ``L``:

    Omega = (1/B) sum_i sum_{t=1}^{T-1} ( ||J_t(x_t^i)^T v_{t+1}^i|| / ||v_{t+1}^i|| - 1 )^2

where ``J_t = d x_{t+1} / d x_t`` is the stage Jacobian (so ``J_t^T v_{t+1} = v_t``). Omega is
zero when every stage passes the gradient on with its norm unchanged, and penalises stages
that shrink (vanishing) or grow (exploding) it. As in Pascanu et al., ``v_{t+1}`` is held
constant when differentiating Omega; its dependence on the parameters through ``J_t`` and
``x_t`` is kept (double backward). Stage 0 is left out: its input is the data, through which
no gradient flows. The scale of ``v`` (1/B from the batch mean) cancels in the ratio.

One ``step(closure)`` (``closure()`` returns the batch-mean loss without ``backward()``):
forward with the stage inputs recorded, ``v_t`` by autograd, ``Omega`` by vector-Jacobian
products with ``create_graph=True``, then ``(L + vgr_weight * Omega).backward()`` and one
``torch.optim.SGD`` step (momentum, weight decay as given). Returns ``L`` (detached).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ocnopt.bench.emsa import capture_states, split_stages

__all__ = ["DEFAULT_WEIGHT", "SGDVGR", "vgr_regulariser"]

#: Default ``vgr_weight`` (the benchmark's setting).
DEFAULT_WEIGHT = 1.0


def vgr_regulariser(states: list[Tensor], loss: Tensor, eps: float = 1e-12) -> Tensor:
    """``Omega`` (scalar, differentiable) from the recorded ``states`` = [x_0, ..., x_T] of one
    forward pass (each (B, ...); x_1.. in the graph of ``loss``) and the batch-mean ``loss``."""
    if len(states) < 3:
        return loss.new_zeros(())
    vs = torch.autograd.grad(loss, states[1:], retain_graph=True, allow_unused=True)
    omega = loss.new_zeros(())
    for t in range(1, len(states) - 1):
        v_next = vs[t]  # dL/dx_{t+1}
        if v_next is None:
            continue
        v_next = v_next.detach()
        (u,) = torch.autograd.grad(states[t + 1], states[t], grad_outputs=v_next,
                                   create_graph=True)
        b = u.shape[0]
        ratio = u.reshape(b, -1).norm(dim=1) / (v_next.reshape(b, -1).norm(dim=1) + eps)
        omega = omega + (ratio - 1.0).pow(2).mean()
    return omega


class SGDVGR(torch.optim.SGD):
    """``torch.optim.SGD`` on ``L + vgr_weight * Omega`` (module docstring).

    Args:
        model: ``nn.Sequential`` (nested ones are flattened).
        lr, momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD``.
        vgr_weight: weight of the regulariser (>= 0; 0 gives plain SGD).
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9,
                 vgr_weight: float = DEFAULT_WEIGHT, **sgd_kwargs: Any) -> None:
        if not vgr_weight >= 0:
            raise ValueError(f"vgr_weight must be >= 0, got {vgr_weight}")
        super().__init__(model.parameters(), lr=lr, momentum=momentum, **sgd_kwargs)
        self.model = model
        self.vgr_weight = float(vgr_weight)
        _, self.stages = split_stages(model)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One SGD step on the regularised loss of the closure's minibatch; returns ``L``."""
        if closure is None:
            raise ValueError("SGDVGR.step needs a closure returning the batch-mean loss "
                             "(without backward())")
        heads = [s.head for s in self.stages]
        with torch.enable_grad():
            with capture_states(self.model, heads) as cap:
                loss = closure()
            states = [cap.inputs[id(h)][-1] for h in heads] + [cap.output[-1]]
            total = loss
            if self.vgr_weight > 0:
                total = loss + self.vgr_weight * vgr_regulariser(states, loss)
            self.zero_grad(set_to_none=True)
            total.backward()
        super().step()
        return loss.detach()
