"""Sequential networks viewed as discrete-time control systems (float64, brute force).

A *stage* t is one parametric module (``nn.Linear`` or ``nn.Conv2d``) followed by every
parameter-free module up to the next parametric one.  Parameter-free modules that come
before the first parametric module are *preprocessing*; they are applied to the network
input and are not part of any stage.

* state   x_t : the input of the t-th parametric module, one sample, flattened to (n_t,)
* control u_t : ``concat(weight.flatten(), bias)`` of that module, shape (m_t,)
* dynamics    : x_{t+1} = f_t(x_t, u_t), shape (n_{t+1},)
* x_T         : the network output (logits), shape (n_T,)

Batch objective (algorithm.md §1, §2.1)::

    J = (1/B) sum_i phi(x_T^(i), y_i) + sum_t (gamma/2) ||u_t||^2

Everything here is written for clarity, not speed: no batching tricks, float64 only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Stage",
    "LossSpec",
    "stages",
    "preprocess",
    "trajectory",
    "per_sample_loss",
    "loss_derivatives",
    "batch_objective",
]

logger = logging.getLogger(__name__)

#: ``"cross_entropy"`` (integer class targets), ``"mse"`` (targets shaped like the output), or a
#: callable ``phi(z, y) -> scalar`` for ONE sample, ``z`` the flattened output (n_T,).
LossSpec = str | Callable[[Tensor, Tensor], Tensor]

_PARAMETRIC = (nn.Linear, nn.Conv2d)


def _flat_modules(model: nn.Module) -> list[nn.Module]:
    """Leaf modules of a (possibly nested) ``nn.Sequential``, in execution order."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected nn.Sequential, got {type(model).__name__}")
    out: list[nn.Module] = []
    for m in model.children():
        if isinstance(m, nn.Sequential):
            out.extend(_flat_modules(m))
        else:
            out.append(m)
    return out


def _check_module(m: nn.Module) -> bool:
    """Return True if ``m`` is parametric (a stage head); raise if it is unsupported."""
    if isinstance(m, _PARAMETRIC):
        if m.weight.dtype != torch.float64:
            raise TypeError(f"{m}: the reference works in float64 only, got {m.weight.dtype}")
        return True
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        raise ValueError(
            f"unsupported module {type(m).__name__}: only nn.Linear / nn.Conv2d may carry "
            "parameters, and parameter-free modules must not carry buffers (e.g. BatchNorm)"
        )
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
        raise ValueError("active dropout makes the dynamics random; call model.eval() first")
    return False


def split_sequential(
    model: nn.Module, is_head: Callable[[nn.Module], bool]
) -> tuple[list[nn.Module], list[tuple[nn.Module, list[nn.Module]]]]:
    """Split a (nested) ``nn.Sequential`` into (preprocessing modules, stages).

    A stage is ``(head, post)``: a module for which ``is_head`` is true, followed by the
    non-head modules up to the next head; non-head modules before the first head are the
    preprocessing. Raises ``ValueError`` if there is no head.
    """
    pre: list[nn.Module] = []
    groups: list[tuple[nn.Module, list[nn.Module]]] = []
    for m in _flat_modules(model):
        if is_head(m):
            groups.append((m, []))
        elif groups:
            groups[-1][1].append(m)
        else:
            pre.append(m)
    if not groups:
        raise ValueError("the model has no parametric module to build a stage from")
    return pre, groups


def _split(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, list[nn.Module]]]]:
    """Split into (preprocessing modules, [(Linear/Conv2d module, post modules), ...])."""
    return split_sequential(model, _check_module)


@dataclass
class Stage:
    """One DDP stage: ``x_{t+1} = post(module(x_t; u_t))``.

    Attributes:
        index: t.
        module: the parametric module (its parameters ARE u_t; ``set_u`` writes into them).
        post: the parameter-free modules applied after ``module``.
        in_shape: per-sample shape of the module input (x_t is its flattening, n_t elements).
        out_shape: per-sample shape of the stage output (x_{t+1} unflattened).
    """

    index: int
    module: nn.Module
    post: tuple[nn.Module, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    # ----------------------------------------------------------------- sizes
    @property
    def n_x(self) -> int:
        """State dimension n_t."""
        return _numel(self.in_shape)

    @property
    def n_out(self) -> int:
        """Next-state dimension n_{t+1}."""
        return _numel(self.out_shape)

    @property
    def n_u(self) -> int:
        """Control dimension m_t = weight.numel() (+ bias.numel())."""
        b = self.module.bias
        return self.module.weight.numel() + (0 if b is None else b.numel())

    # --------------------------------------------------------------- control
    def unpack(self, u: Tensor) -> dict[str, Tensor]:
        """Split u (m,) into ``{"weight": W, "bias": b}`` (views shaped like the params)."""
        w = self.module.weight
        params = {"weight": u[: w.numel()].view(w.shape)}
        if self.module.bias is not None:
            params["bias"] = u[w.numel() :]
        return params

    def get_u(self) -> Tensor:
        """Current control u_t = concat(weight.flatten(), bias), a detached copy (m,)."""
        parts = [self.module.weight.detach().reshape(-1)]
        if self.module.bias is not None:
            parts.append(self.module.bias.detach().reshape(-1))
        return torch.cat(parts).clone()

    @torch.no_grad()
    def set_u(self, u: Tensor) -> None:
        """Write u (m,) into the module parameters in place."""
        if u.shape != (self.n_u,):
            raise ValueError(f"stage {self.index}: expected u of shape ({self.n_u},)")
        for name, value in self.unpack(u).items():
            getattr(self.module, name).copy_(value)

    # -------------------------------------------------------------- dynamics
    def forward_batch(self, X: Tensor, u: Tensor | None = None) -> Tensor:
        """Batched dynamics: X (B, n_t) -> (B, n_{t+1}); u (m,) defaults to the module's own."""
        h = X.reshape(X.shape[0], *self.in_shape)
        if u is None:
            h = self.module(h)
        else:
            h = functional_call(self.module, self.unpack(u), (h,))
        for m in self.post:
            h = m(h)
        return h.reshape(X.shape[0], -1)

    def f(self, x: Tensor, u: Tensor) -> Tensor:
        """Single-sample dynamics f_t: x (n_t,), u (m,) -> x_next (n_{t+1},). Differentiable."""
        return self.forward_batch(x.unsqueeze(0), u)[0]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def stages(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[Stage]:
    """Split ``model`` into DDP stages.

    Args:
        model: float64 ``nn.Sequential`` of Linear / Conv2d and parameter-free modules.
        input_shape: per-sample shape of the *network* input (no batch dimension).  May be
            omitted only when the first module is an ``nn.Linear``.
    Returns:
        list of T stages; shapes are found by probing with a zero input.
    """
    pre, groups = _split(model)
    if input_shape is None:
        first = _flat_modules(model)[0]
        if not isinstance(first, nn.Linear):
            raise ValueError("input_shape is required unless the first module is nn.Linear")
        input_shape = (first.in_features,)
    h = torch.zeros(1, *input_shape, dtype=torch.float64)
    out: list[Stage] = []
    with torch.no_grad():
        for m in pre:
            h = m(h)
        for t, (mod, post) in enumerate(groups):
            in_shape = tuple(h.shape[1:])
            h = mod(h)
            for p in post:
                h = p(h)
            out.append(Stage(t, mod, tuple(post), in_shape, tuple(h.shape[1:])))
    return out


def preprocess(model: nn.Module, X: Tensor) -> Tensor:
    """Apply the leading parameter-free modules: X (B, ...) -> X_0 (B, n_0), detached."""
    if X.dtype != torch.float64:
        raise TypeError(f"the reference works in float64 only, got inputs of dtype {X.dtype}")
    pre, _ = _split(model)
    with torch.no_grad():
        h = X
        for m in pre:
            h = m(h)
    return h.reshape(X.shape[0], -1)


def trajectory(model: nn.Module, X: Tensor) -> list[Tensor]:
    """Nominal forward pass.

    Args:
        X: network input (B, ...), float64.
    Returns:
        [X_0, ..., X_T]: X_t (B, n_t) is the (flattened) input of stage t and X_T (B, n_T) the
        flattened network output.  Detached.
    """
    xs = [preprocess(model, X)]
    with torch.no_grad():
        for st in stages(model, X.shape[1:]):
            xs.append(st.forward_batch(xs[-1]))
    return xs


# --------------------------------------------------------------------- losses
def _cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    return torch.logsumexp(z, dim=0) - z[y.long()]


def _mse(z: Tensor, y: Tensor) -> Tensor:
    return ((z - y.reshape(-1).to(z.dtype)) ** 2).mean()


def per_sample_loss(loss: LossSpec) -> Callable[[Tensor, Tensor], Tensor]:
    """Terminal cost phi(z, y) of ONE sample, z (n_T,) -> scalar.

    ``"cross_entropy"``: logsumexp(z) - z[y] (y an integer class);
    ``"mse"``: mean_j (z_j - y_j)^2.
    Both are chosen so that (1/B) sum_i phi_i equals ``F.cross_entropy`` / ``F.mse_loss``
    with their default ``reduction="mean"``.
    """
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return _cross_entropy
    if loss == "mse":
        return _mse
    raise ValueError(f"unknown loss {loss!r} (use 'cross_entropy', 'mse' or a callable)")


def loss_derivatives(loss: LossSpec, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Exact gradient (n_T,) and Hessian (n_T, n_T) of phi(., y) at z (one sample)."""
    phi = per_sample_loss(loss)
    z = z.detach()
    g = torch.autograd.functional.jacobian(lambda zz: phi(zz, y), z)
    H = torch.autograd.functional.hessian(lambda zz: phi(zz, y), z)
    return g, H


def batch_objective(
    model: nn.Module, X: Tensor, Y: Tensor, loss: LossSpec, weight_decay: float = 0.0
) -> Tensor:
    """J = (1/B) sum_i phi(model(X)_i, Y_i) + sum_t (gamma/2)||u_t||^2 (differentiable)."""
    phi = per_sample_loss(loss)
    out = model(X).reshape(X.shape[0], -1)
    data = torch.stack([phi(out[i], Y[i]) for i in range(X.shape[0])]).mean()
    reg = sum(
        (p.pow(2).sum() for st in stages(model, X.shape[1:]) for p in st.module.parameters()),
        torch.zeros((), dtype=torch.float64),
    )
    return data + 0.5 * weight_decay * reg
