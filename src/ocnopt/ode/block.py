"""``ODEBlock``: a Neural-ODE layer solved (and differentiated) by the stock ``odeint_adjoint``.

Every call of :meth:`ODEBlock.integrate` passes a small per-call vector field object to
``torchdiffeq.odeint_adjoint``. It counts function evaluations (forward solve / adjoint solve)
and exposes torchdiffeq's adjoint step callback (``callback_accept_step_adjoint`` for adaptive
solvers, ``callback_step_adjoint`` for fixed-grid ones), through which every armed
:class:`~ocnopt.ode.collector.ODEFactorCollector` samples the adjoint solve. The callback knows
its call's time grid, so the solver's step can be clipped to the interval it integrates. No
patched solver; nothing of the trajectory is kept (the adjoint re-integrates it backwards).

Armed collectors are registered in a process-wide weak table keyed by the block, never stored
on the module: copies of a model (``copy.deepcopy``, pickling) are never armed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ocnopt.ode.collector import ODEFactorCollector

__all__ = ["ODEBlock", "State", "find_ode_blocks"]

#: The collectors armed on each block, in arming order (see ``ODEFactorCollector``).
_ARMED: weakref.WeakKeyDictionary[ODEBlock, list[ODEFactorCollector]] = (
    weakref.WeakKeyDictionary())

#: An ODE state: one tensor, or a tuple of tensors (e.g. a CNF's ``(z, delta_logp)``); the
#: first tensor's leading dim is the batch.
State = Tensor | tuple[Tensor, ...]


def _solvers() -> dict[str, Any]:
    try:
        from torchdiffeq._impl.odeint import SOLVERS  # the solver table (valid callbacks)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ocnopt.ode needs torchdiffeq>=0.2.4: pip install 'ocnopt[ode]'") from err
    return SOLVERS


def _adjoint_callback_name(method: str) -> str | None:
    """The per-step adjoint callback that ``method`` calls once per step it keeps, or None."""
    valid = _solvers()[method].valid_callbacks()
    if "callback_accept_step" in valid:  # adaptive: rejected attempts are not samples
        return "callback_accept_step_adjoint"
    if "callback_step" in valid:  # fixed grid: every step is kept
        return "callback_step_adjoint"
    return None


class _CallField:
    """The vector field handed to ``odeint_adjoint`` for one :meth:`ODEBlock.integrate` call.

    Holds only the call's time grid, the state's shapes and the optional sample mask (all
    small); it lives as long as the autograd graph of that call.
    """

    def __init__(self, block: ODEBlock, t: Tensor, y0: State, mask: Tensor | None) -> None:
        self.block = block
        self.func = block.func
        t = t.detach()
        self.reversed = bool(t.numel() > 1 and t[0] > t[1])
        self.t_norm = -t if self.reversed else t  # torchdiffeq's increasing internal time
        self.is_tuple = not isinstance(y0, Tensor)
        self.shapes = [y.shape for y in y0] if self.is_tuple else [y0.shape]
        self.batch = self.shapes[0][0] if len(self.shapes[0]) else 1
        self.mask = mask
        self.phase = "forward"
        self.sampled_by: set[ODEFactorCollector] = set()
        self.nfe_forward = 0
        self.nfe_backward = 0
        name = _adjoint_callback_name(block.method)
        if name is not None:
            setattr(self, name, self._adjoint_step)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, t: Tensor, y: State) -> State:
        """``F(t, y)``, with masked-out samples frozen (their derivative is 0)."""
        f = self.func(t, y)
        if self.mask is None:
            return f
        m = self.mask
        if isinstance(f, Tensor):
            return f * m.reshape((-1,) + (1,) * (f.dim() - 1)).to(f.dtype)
        return tuple(v * m.reshape((-1,) + (1,) * (v.dim() - 1)).to(v.dtype) for v in f)

    def __call__(self, t: Tensor, y: State) -> State:
        if self.phase == "forward":
            self.nfe_forward += 1
            self.block._nfe_forward_total += 1
        else:
            self.nfe_backward += 1
            self.block._nfe_backward_total += 1
        return self.evaluate(t, y)

    # -- adjoint sampling ---------------------------------------------------------------------
    def unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        """The solver's (flattened, for tuple states) state -> tuple of state tensors."""
        if not self.is_tuple:
            return (flat,)
        out, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[start:start + n].reshape(shape))
            start += n
        return tuple(out)

    def original_time(self, t0: Tensor) -> Tensor:
        """Callback time (torchdiffeq's increasing internal time) -> the user's time."""
        return -t0 if self.reversed else t0

    def step_weight(self, t0: Tensor, dt: Tensor) -> Tensor:
        """Length of the adjoint step ``[t0 - dt, t0]`` clipped to its output interval.

        The adjoint integrates each interval ``(t_norm[i-1], t_norm[i]]`` downwards from
        ``t_norm[i]``; the solver's last step may run past ``t_norm[i-1]`` (it then
        interpolates), so the step is clipped there. Tensor ops only (no host sync).
        """
        tn = self.t_norm.to(t0.dtype)
        i = torch.searchsorted(tn, t0.reshape(1)).clamp_(1, tn.numel() - 1)
        lower = tn[i - 1].reshape(())
        return torch.minimum(dt.to(t0.dtype).abs(), t0 - lower).clamp_min(0)

    def _adjoint_step(self, t0: Tensor, aug_state: Sequence[Tensor], dt: Tensor) -> None:
        for collector in tuple(_ARMED.get(self.block, ())):
            collector._sample(self, t0, aug_state, dt)


class ODEBlock(nn.Module):
    """``x -> x(t1)`` for ``dx/dt = func(t, x)``, ``x(0) = x``, through ``odeint_adjoint``.

    Args:
        func: any ``nn.Module`` called as ``func(t, x)`` (``t`` a 0-dim tensor); its
            ``nn.Linear`` / ``nn.Conv2d`` layers are what Kronecker collection covers.
        t1: integration horizon (> 0), kept in the buffer ``t1`` (part of ``state_dict``).
        method, rtol, atol, options: passed to ``odeint_adjoint`` (forward and adjoint solve).
        learn_t1: make ``t1`` a control: graph-building forwards integrate to a leaf tensor
            (:attr:`t1_leaf`) whose gradient ``dL/dt1`` is :attr:`t1_grad` after ``backward``.
            ``t1`` is never a parameter, so no optimizer updates it by accident; see
            :class:`~ocnopt.ode.t1.IntegrationTimeController`.
        reverse: integrate from ``t1`` down to 0 instead (input at ``t1``, output at 0; the
            continuous-normalising-flow convention).
        adjoint_options: options of the adjoint solve only (e.g. ``{"norm": "seminorm"}``);
            default: ``options`` without its norm (torchdiffeq's rule).

    States may be tuples of tensors (the first one's dim 0 is the batch); the output then is a
    tuple. Counters: :attr:`nfe_forward` / :attr:`nfe_backward` for the last call (the latter
    complete once its backward ran), ``*_total`` since :meth:`reset_nfe`.
    """

    def __init__(
        self,
        func: nn.Module,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        options: dict[str, Any] | None = None,
        learn_t1: bool = False,
        *,
        reverse: bool = False,
        adjoint_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(f"func must be an nn.Module called as func(t, x), got "
                            f"{type(func).__name__}")
        solvers = _solvers()
        if method not in solvers:
            raise ValueError(f"invalid method={method!r}: allowed values are "
                             f"{', '.join(sorted(solvers))}")
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"invalid {name}={v!r}: allowed range is a finite float > 0")
        _check_t1(t1)
        self.func = func
        self.method = method
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.options = dict(options) if options is not None else None
        self.adjoint_options = dict(adjoint_options) if adjoint_options is not None else None
        self.learn_t1 = bool(learn_t1)
        self.reverse = bool(reverse)
        self.register_buffer("t1", torch.tensor(float(t1), dtype=torch.float64))
        self._t1_leaf: Tensor | None = None
        self._t1_key: tuple[int, int] | None = None
        self._last: _CallField | None = None
        self._nfe_forward_total = 0
        self._nfe_backward_total = 0

    def extra_repr(self) -> str:
        return (f"t1={float(self.t1):.4g}, method={self.method!r}, rtol={self.rtol:g}, "
                f"atol={self.atol:g}, learn_t1={self.learn_t1}, reverse={self.reverse}")

    # -- integration time ---------------------------------------------------------------------
    @property
    def t1_leaf(self) -> Tensor | None:
        """The leaf tensor graph-building forwards integrate to (``learn_t1`` only), else None.

        One leaf per value of ``t1``: repeated forwards share it, so its ``grad`` accumulates
        like a parameter's; it is replaced when the buffer changes (:meth:`set_t1`,
        ``load_state_dict``, ``.to()``).
        """
        if not self.learn_t1:
            return None
        key = (self.t1.data_ptr(), self.t1._version)
        leaf = self._t1_leaf
        if leaf is None or self._t1_key != key or leaf.dtype != self.t1.dtype:
            leaf = self.t1.detach().clone().requires_grad_(True)
            self._t1_leaf, self._t1_key = leaf, key
        return leaf

    @property
    def t1_grad(self) -> Tensor | None:
        """``dL/dt1`` accumulated by ``backward()`` since the leaf was made or its grad cleared."""
        leaf = self._t1_leaf
        if leaf is None or self._t1_key != (self.t1.data_ptr(), self.t1._version):
            return None
        return leaf.grad

    def clear_t1_grad(self) -> None:
        if self._t1_leaf is not None:
            self._t1_leaf.grad = None

    @torch.no_grad()
    def set_t1(self, value: float | Tensor) -> None:
        """Write the horizon (in place; a tensor value is not checked, to avoid a host sync)."""
        if not isinstance(value, Tensor):
            _check_t1(value)
        self.t1.copy_(value)

    def time_span(self) -> Tensor:
        """``[0, t1]`` (``[t1, 0]`` if ``reverse``); ``t1`` is :attr:`t1_leaf` when learning."""
        leaf = self.t1_leaf if torch.is_grad_enabled() else None
        t1 = self.t1 if leaf is None else leaf
        span = torch.stack([torch.zeros_like(t1), t1])
        return span.flip(0) if self.reverse else span

    # -- solving ------------------------------------------------------------------------------
    def integrate(self, y0: State, t: Tensor, mask: Tensor | None = None) -> State:
        """Solve from ``t[0]`` through the times ``t`` (monotone, ``(T,)``); returns the states
        at ``t`` stacked on a new dim 0 (per component for tuple states).

        ``mask``: optional bool ``(B,)``; samples where it is False are frozen (their field is
        multiplied by 0) and excluded from collected statistics. Used for sequences of
        different lengths (each one evolves only over its own observation interval).
        """
        from torchdiffeq import odeint_adjoint

        if mask is not None:
            batch = (y0 if isinstance(y0, Tensor) else y0[0]).shape[0]
            if mask.dtype != torch.bool or mask.shape != (batch,):
                raise ValueError(f"mask must be a bool tensor of shape ({batch},), got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
        field = _CallField(self, t, y0, mask)
        self._last = field
        params = tuple(p for p in self.func.parameters() if p.requires_grad)
        try:
            return odeint_adjoint(
                field, y0, t, rtol=self.rtol, atol=self.atol, method=self.method,
                options=self.options, adjoint_options=self._adjoint_options(field),
                adjoint_params=params)
        finally:
            field.phase = "backward"

    def _adjoint_options(self, field: _CallField) -> dict[str, Any] | None:
        """The adjoint solve's options; with an armed collector that asks for ``sample_dt``
        (adaptive solvers), ``step_t`` forces adjoint steps at the multiples of ``sample_dt``."""
        dts = [c.sample_dt for c in _ARMED.get(self, ()) if c.sample_dt is not None]
        dt = min(dts) if dts else None
        if dt is None or _adjoint_callback_name(self.method) != "callback_accept_step_adjoint":
            return self.adjoint_options
        if self.adjoint_options is not None:
            opts = dict(self.adjoint_options)
        else:  # torchdiffeq's default: the forward options without the norm
            opts = {k: v for k, v in (self.options or {}).items() if k != "norm"}
        tn = field.t_norm
        start = torch.ceil(tn[0] / dt) * dt
        opts["step_t"] = torch.arange(float(start), float(tn[-1]), dt, dtype=tn.dtype,
                                      device=tn.device)
        return opts

    def forward(self, x: State) -> State:
        sol = self.integrate(x, self.time_span())
        return sol[-1] if isinstance(sol, Tensor) else tuple(s[-1] for s in sol)

    @property
    def batch_size(self) -> int | None:
        """Batch size (dim 0 of the state) of the last call, None before the first."""
        return self._last.batch if self._last is not None else None

    # -- counters -----------------------------------------------------------------------------
    @property
    def nfe_forward(self) -> int:
        """Function evaluations of the last call's forward solve."""
        return self._last.nfe_forward if self._last is not None else 0

    @property
    def nfe_backward(self) -> int:
        """Function evaluations of the last call's adjoint solve (collection samples excluded)."""
        return self._last.nfe_backward if self._last is not None else 0

    @property
    def nfe_forward_total(self) -> int:
        return self._nfe_forward_total

    @property
    def nfe_backward_total(self) -> int:
        return self._nfe_backward_total

    def reset_nfe(self) -> None:
        self._nfe_forward_total = 0
        self._nfe_backward_total = 0


def _check_t1(t1: Any) -> None:
    if not (isinstance(t1, (int, float)) and not isinstance(t1, bool) and math.isfinite(t1)
            and t1 > 0):
        raise ValueError(f"invalid t1={t1!r}: allowed range is a finite float > 0")


def find_ode_blocks(model: nn.Module) -> dict[str, ODEBlock]:
    """Every :class:`ODEBlock` inside ``model`` (``model`` itself included), by module name.

    Blocks nested inside another block's ``func`` are not supported (ValueError).
    """
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, ODEBlock)}
    for name, block in blocks.items():
        inner = [n for n, m in block.func.named_modules() if isinstance(m, ODEBlock)]
        if inner:
            raise ValueError(f"ODE block {name!r} contains ODE block(s) {inner} in its func; "
                             "nested ODE blocks are not supported")
    return blocks
