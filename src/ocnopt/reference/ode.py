"""Brute-force float64 oracles for the Neural-ODE machinery (``ocnopt.ode``).

Everything is an explicit loop over a fixed time grid, written for clarity: the forward
trajectory and the augmented state ``(x, a)`` at every node of the backward grid are computed
step by step, vector-Jacobian products are taken explicitly (the gradient of ``<a, F>`` w.r.t.
an additive perturbation of each layer's output, no tensor hooks), every row is kept and the
Kronecker factors are formed from all rows at once. It reproduces the arithmetic of
torchdiffeq's fixed-grid ``euler`` / ``midpoint`` solvers with ``options={"step_size": h}``,
including the adjoint solve that runs backwards from the end time on its own grid, so
``ODEFactorCollector`` must agree with it to rounding error.

Also: a dense EKFAC step on given factors (eigendecompositions of ``A`` and ``G``, Kronecker
eigenvalue initialisation, one eigenvalue-EMA update), the oracle of ``SNOptPreconditioner``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FIXED_METHODS",
    "OracleFactors",
    "adjoint_factor_oracle",
    "dense_ekfac_direction",
    "fixed_grid",
    "solve_fixed",
]

#: Fixed-grid methods the oracle reproduces.
FIXED_METHODS = ("euler", "midpoint")

Field = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]]


def fixed_grid(start: float, end: float, step: float) -> list[float]:
    """torchdiffeq's grid for ``step_size`` on an increasing interval: ``start + k h``, last =
    ``end`` (computed as torchdiffeq does, so the float64 values are identical)."""
    n = math.ceil((end - start) / step + 1)
    grid = [k * step + start for k in range(n)]
    grid[-1] = end
    return grid


def _step(method: str, f: Field, s0: float, ds: float, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """One fixed-grid step of ``dy/ds = f(s, y)`` (torchdiffeq's arithmetic)."""
    t0 = torch.tensor(s0, dtype=torch.float64)
    dt = torch.tensor(ds, dtype=torch.float64)
    k1 = f(t0, y)
    if method == "euler":
        return tuple(yi + dt * ki for yi, ki in zip(y, k1, strict=True))
    if method == "midpoint":
        half = 0.5 * dt
        mid = tuple(yi + ki * half for yi, ki in zip(y, k1, strict=True))
        k2 = f(t0 + half, mid)
        return tuple(yi + dt * ki for yi, ki in zip(y, k2, strict=True))
    raise ValueError(f"invalid method={method!r}: allowed values are {', '.join(FIXED_METHODS)}")


def solve_fixed(func: Field, y0: tuple[Tensor, ...], t0: float, t1: float, step: float,
                method: str) -> tuple[Tensor, ...]:
    """``y(t1)`` of ``dy/dt = func(t, y)`` from ``y(t0) = y0`` on torchdiffeq's fixed grid
    (either direction; a decreasing interval runs in negated time, as torchdiffeq does)."""
    if t1 >= t0:
        grid, f = fixed_grid(t0, t1, step), func
    else:
        grid = fixed_grid(-t0, -t1, step)

        def f(s: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(-1.0 * v for v in func(-s, y))

    y = y0
    for s0, s1 in zip(grid[:-1], grid[1:], strict=True):
        y = _step(method, f, s0, s1 - s0, y)
    return y


@dataclass
class OracleFactors:
    """Per-layer factors with the scalings of :class:`ocnopt.ode.ODEFactors`."""

    A: Tensor
    G: Tensor
    time: float
    samples: int


def _layer_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Input rows (im2col for Conv2d), ones column for the bias."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def _out_rows(module: nn.Module, g: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def adjoint_factor_oracle(
    func: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    layers: Sequence[nn.Module],
    y0: tuple[Tensor, ...],
    t_start: float,
    t_end: float,
    loss: Callable[[tuple[Tensor, ...]], Tensor],
    step: float,
    method: str,
    mask: Tensor | None = None,
) -> dict[nn.Module, OracleFactors]:
    """Factors of ``layers`` sampled on the adjoint solve of one fixed-grid integration.

    ``func(t, y)`` is the (unmasked) vector field on tuple states; ``mask`` (bool ``(B,)``)
    freezes samples as ``ODEBlock.integrate`` does. The forward solve gives ``y(t_end)``;
    ``a(t_end) = dL/dy(t_end)``; the augmented state ``(y, a)`` with ``dy/dt = F``,
    ``da/dt = -a^T dF/dy`` is integrated from ``t_end`` back to ``t_start`` on the adjoint's
    grid. At every grid node (step start) the layer inputs and output cotangents are recorded
    with the step length as weight.
    """
    batch = y0[0].shape[0]

    def field(t: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        f = func(t, y)
        if mask is None:
            return f
        return tuple(v * mask.reshape((-1,) + (1,) * (v.dim() - 1)).to(v.dtype) for v in f)

    y_end = solve_fixed(field, y0, t_start, t_end, step, method)
    y_end = tuple(v.detach().requires_grad_(True) for v in y_end)
    a_end = torch.autograd.grad(loss(y_end), y_end)
    n = len(y0)

    def augmented(t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        y = tuple(v.detach().requires_grad_(True) for v in state[:n])
        a = state[n:]
        with torch.enable_grad():
            f = field(t, y)
            vjp = torch.autograd.grad(f, y, a, allow_unused=True)
        vjp = tuple(torch.zeros_like(v) if g is None else g for v, g in zip(y, vjp, strict=True))
        return tuple(v.detach() for v in f) + tuple(-g for g in vjp)

    # the adjoint runs from t_end to t_start in torchdiffeq's internal increasing time
    sign = 1.0 if t_end >= t_start else -1.0
    grid = fixed_grid(-sign * t_end, -sign * t_start, step)

    def internal(s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(-sign * v for v in augmented(-sign * s, state))

    rows: dict[nn.Module, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {
        m: ([], [], []) for m in layers}
    weights: list[float] = []
    times = 0.0
    state = tuple(v.detach() for v in y_end) + a_end
    for s0, s1 in zip(grid[:-1], grid[1:], strict=True):
        w = s1 - s0
        t = torch.tensor(-sign * s0, dtype=torch.float64)  # the user's time of the node
        _record(field, layers, t, state[:n], state[n:], w, batch, mask, rows)
        weights.append(w)
        times += w * (1.0 if mask is None else float(mask.double().mean()))
        state = _step(method, internal, s0, w, state)
    out: dict[nn.Module, OracleFactors] = {}
    for m, (zs, gs, ks) in rows.items():
        z, g, k = torch.cat(zs), torch.cat(gs), torch.cat(ks)
        count = k.sum()
        a_fac = (z * k[:, None]).t().mm(z) / count
        g_fac = (g * k[:, None]).t().mm(g) * (times ** 2) / count
        out[m] = OracleFactors(a_fac, g_fac, times, len(weights))
    return out


def _record(field: Field, layers: Sequence[nn.Module], t: Tensor, y: tuple[Tensor, ...],
            a: tuple[Tensor, ...], w: float, batch: int, mask: Tensor | None,
            rows: dict[nn.Module, tuple[list[Tensor], list[Tensor], list[Tensor]]]) -> None:
    """Layer inputs and explicit VJPs ``d<a, F>/d(layer output)`` at one node."""
    inputs: dict[nn.Module, Tensor] = {}
    deltas: dict[nn.Module, Tensor] = {}

    def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        inputs[m] = args[0].detach().clone()
        deltas[m] = torch.zeros_like(out, requires_grad=True)
        return out + deltas[m]

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            yy = tuple(v.detach().requires_grad_(True) for v in y)
            f = field(t, yy)
            inner = sum((fk * ak).sum() for fk, ak in zip(f, a, strict=True))
            grads = torch.autograd.grad(inner, [deltas[m] for m in layers])
    finally:
        for h in handles:
            h.remove()
    for m, g in zip(layers, grads, strict=True):
        x = inputs[m]
        z = _layer_rows(m, x)
        per = z.shape[0] // x.shape[0]
        keep = torch.ones(z.shape[0], dtype=torch.float64)
        if mask is not None and x.shape[0] == batch:
            keep = mask.double().repeat_interleave(per)
        rows[m][0].append(z)
        rows[m][1].append(_out_rows(m, g) * batch)
        rows[m][2].append(keep * w)


def dense_ekfac_direction(grad: Tensor, a_factor: Tensor, g_factor: Tensor, locations: float,
                          batch: int, damping: float, decay: float,
                          m2: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One EKFAC step on the eigenbases of ``(A, G)`` for a gradient matrix ``(d_out, d_in[+1])``.

    ``m2`` (default: the refresh value ``L lambda_G lambda_A^T``, in ``eigh``'s ascending
    order), then ``m2 <- decay m2 + (1 - decay) B (U_G^T grad U_A)^2`` and the direction
    ``U_G [(U_G^T grad U_A) / (m2 + damping)] U_A^T``. Returns ``(direction, m2)``.
    """
    la, ua = torch.linalg.eigh(a_factor.double())
    lg, ug = torch.linalg.eigh(g_factor.double())
    if m2 is None:
        m2 = locations * torch.outer(lg.clamp_min(0), la.clamp_min(0))
    proj = ug.t() @ grad.double() @ ua
    m2 = decay * m2 + (1 - decay) * batch * proj ** 2
    return ug @ (proj / (m2 + damping)) @ ua.t(), m2
