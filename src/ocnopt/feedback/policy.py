"""Per-sample feedback weights of the layer-wise policy (DDPNOpt §4.4; spec algorithm.md §4.4).

With the per-sample Gauss-Newton, rank-one value Hessian, the closed-loop direction of layer t
is a re-weighted gradient ``d_t = (1/B) sum_i (1 + s_i) q_t_i`` with one scalar per sample::

    s_i = beta * sum_c < B * dl/dc_i , c_hat_i - c_i >

over the tensors ``c`` the layer's stage depends on (its input; on non-Markovian networks also
the tensors that bypass it). ``dl/dc`` is the gradient of the batch-MEAN loss, hence the factor
``B`` that makes it per-sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["feedback_terms", "sample_weights", "momentum_gain_correction"]


def feedback_terms(
    grads: Sequence[Tensor], deltas: Sequence[Tensor], batch_dim: int = 0
) -> Tensor:
    """``sum_c <grad_c_i, delta_c_i>`` per sample: shape ``(B,)`` in the grads' dtype.

    ``grads[c]`` and ``deltas[c]`` have equal shapes with the samples along ``batch_dim``; the
    inner product runs over every other dimension (no reshape, so channels_last tensors are not
    copied).
    """
    total: Tensor | None = None
    for g, dx in zip(grads, deltas, strict=True):
        dims = [d for d in range(g.dim()) if d != batch_dim % g.dim()]
        prod = g * dx.to(g.dtype)
        s = prod.sum(dims) if dims else prod
        total = s if total is None else total + s
    if total is None:
        raise ValueError("feedback_terms needs at least one (grad, delta) pair")
    return total


def sample_weights(
    s: Tensor, *, scale: float, clip: float | None
) -> tuple[Tensor, Tensor]:
    """Sample weights ``w_i = 1 + clip(scale * s_i)`` and the count of non-finite ``s_i``.

    ``scale`` is ``beta * B`` (times the momentum-gain correction). A non-finite ``s_i`` is
    replaced by 0 (that sample keeps its open-loop weight 1); the returned count is a 0-d tensor
    so that no host synchronisation happens here.
    """
    s = s * scale
    bad = torch.isfinite(s).logical_not_().sum()
    s = s.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if clip is not None:
        s = s.clamp_(-clip, clip)
    return s.add_(1.0), bad


def momentum_gain_correction(
    rule: str, momentum: float, dampening: float
) -> float:
    """``(1 - momentum) / (1 - dampening)`` for accumulating momentum, else 1.

    A momentum buffer applies each direction with a total gain ``(1 - dampening) /
    (1 - momentum)`` over the following steps, while the observed ``dx`` already contains the
    upstream layers' momentum. Scaling the feedback term by the inverse gain makes its
    accumulated effect that of one application, as in momentum-free DDP (without it the
    corrections pile up roughly ``1/(1 - momentum)``-fold and training diverges). RMSprop's
    buffer has no dampening (gain ``1 / (1 - momentum)``); Adam's first moment is a normalised
    EMA and needs no correction (``rule`` is ``"sgd"``, ``"rmsprop"`` or ``"adam"``).
    """
    if momentum == 0 or rule == "adam" or dampening >= 1:
        return 1.0
    if rule == "rmsprop":
        return 1.0 - momentum
    return (1.0 - momentum) / (1.0 - dampening)
