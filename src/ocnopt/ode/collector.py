"""Time-integrated Kronecker factors of the layers inside ODE vector fields (SNOpt).

While an :class:`ODEFactorCollector` is active (``with``), every adjoint solve of the model's
:class:`~ocnopt.ode.block.ODEBlock` s is sampled once per solver step through torchdiffeq's
adjoint step callback: at the step's start ``(t_j, x(t_j), a(t_j))`` (the backward-reconstructed
state and the adjoint ``a = dL/dx`` of the batch-MEAN loss) the collector evaluates the vector
field once more and pulls ``a`` back to every layer's output with one vector-Jacobian product.
Only this deliberate evaluation is recorded (the layers also run at every solver stage: those
calls are ignored), and each sample is weighted by the solver step ``w_j = |dt_j|`` clipped to
the interval being integrated (left-point quadrature in the direction of the adjoint solve).

For a layer ``h = W z (+ b)`` with input rows ``z_r`` (``helper.input_outer``: ones column for
the bias, im2col rows for Conv2d) and output-cotangent rows ``g_r``, summing over samples ``j``,
active batch samples ``i`` and locations ``l`` (``r = (i, l)``)::

    N   = sum_j w_j * (#active rows at j)                    weighted row count
    W   = sum_j w_j * (#active samples at j) / B             integrated time per sample
    A   = sum_j w_j sum_r z_r z_r^T / N                      time-weighted mean of z z^T
    G   = W^2 * sum_j w_j sum_r (B g_r)(B g_r)^T / N         (B = state batch size)

``B g_r`` is the per-sample cotangent (the loss is a batch mean), and the factor ``W^2`` makes
``L * A (x) G`` (``L`` = locations per sample) the second moment of the per-sample gradient
``int (B g) z^T dt`` when ``z`` and ``g`` are independent and each is perfectly correlated in time.
That is the scale EKFAC's eigenvalue statistics ``B * (U_G^T grad U_A)^2`` assume, and it is
invariant under rescaling time (unlike SNOpt's ``grad_output * B * step_size``). Layers whose
input has no batch dim (time hyper-networks, input ``(1, 1)``) see the batch-summed cotangent
(an approximation, as in SNOpt).

Memory: per layer only the ``A`` and ``G`` accumulators and a few scalars, updated in place;
nothing grows with the number of solver steps or adjoint calls. Statistics accumulate over all
adjoint solves run while the collector is active (e.g. one per observation interval of an
ODE-RNN). While active, the collector is registered with its blocks in a process-wide weak
table (not on the modules); its module hooks exist only during its own deliberate evaluations.
Several collectors may be active on one block; each samples independently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ocnopt.layers import LayerHelper, helper_for
from ocnopt.ode.block import _ARMED, _adjoint_callback_name, _CallField, find_ode_blocks

__all__ = ["ODELayer", "ODEFactors", "ODEFactorCollector", "ode_layers"]


@dataclass(frozen=True)
class ODELayer:
    """A Kronecker-supported layer inside the vector field of an ODE block."""

    name: str
    module: nn.Module
    blocks: tuple[str, ...]  # names of the ODE blocks whose func contains it (usually one)
    helper: LayerHelper


def ode_layers(model: nn.Module) -> tuple[dict[nn.Module, ODELayer], list[str]]:
    """The ``nn.Linear`` / ``nn.Conv2d`` layers inside every ODE block's ``func``.

    Returns ``(layers, skipped)``: ``layers`` in registration order; ``skipped`` names the
    parametric modules without a Kronecker helper (with the reason). Such layers run many times
    per forward, so an optimizer must keep them out of per-forward capture and feedback.
    """
    names = {m: n for n, m in model.named_modules()}
    owners: dict[nn.Module, list[str]] = {}
    for bname, block in find_ode_blocks(model).items():
        for module in block.func.modules():
            if isinstance(getattr(module, "weight", None), Tensor):
                owners.setdefault(module, []).append(bname)  # a field may be shared by blocks
    layers: dict[nn.Module, ODELayer] = {}
    skipped: list[str] = []
    for module, blocks in owners.items():
        name = names[module]
        helper, reason = helper_for(module)
        if helper is None:
            skipped.append(f"{name} ({reason})")
        else:
            layers[module] = ODELayer(name, module, tuple(blocks), helper)
    return layers, skipped


@dataclass(frozen=True)
class ODEFactors:
    """Collected factors of one layer (see the module docstring for the exact scalings).

    ``A``: ``(d_in [+1], d_in [+1])``; ``G``: ``(d_out, d_out)``; ``batch_size``: ``B``;
    ``locations``: rows per sample ``L`` (output positions for Conv2d, 1 for Linear);
    ``time``: ``W`` (0-dim tensor, time units); ``samples``: adjoint steps in which it ran.
    """

    A: Tensor
    G: Tensor
    batch_size: int
    locations: float
    time: Tensor
    samples: int


@dataclass
class _Accumulator:
    a: Tensor
    g: Tensor
    a_rows: Tensor
    g_rows: Tensor
    time: Tensor
    samples: int = 0  # evaluations in which the layer ran
    g_seen: bool = False  # an output cotangent arrived
    batch_size: int = 1
    locations: float = 1.0


@dataclass
class _Eval:
    """The deliberate evaluation in progress (what the hooks may record)."""

    weight: Tensor  # clipped |dt|, 0-dim
    batch: int
    mask: Tensor | None
    ran: list[nn.Module] = field(default_factory=list)
    recording_g: bool = False


class ODEFactorCollector:
    """Collect :class:`ODEFactors` of ODE-internal layers during the adjoint solves.

    >>> with ODEFactorCollector(model) as col:
    ...     loss_fn(model(x), y).backward()
    >>> factors = col.factors()        # {module: ODEFactors}

    Args:
        model: the network; every :class:`ODEBlock` inside it is sampled.
        layers: optional subset of the ODE-internal modules to collect (default: all), or a
            mapping from those modules to the :class:`~ocnopt.layers.LayerHelper` whose
            conventions the factors follow (e.g. no ones column for a bias that is not trained).
        sample_dt: optional maximum spacing of the samples for adaptive solvers: solves whose
            forward runs inside the ``with`` get their adjoint steps forced onto the multiples of
            ``sample_dt`` (torchdiffeq's ``step_t``), at the price of extra adjoint solver steps
            (SNOpt samples a grid of 0.01). Default: the solver's own steps.
    """

    def __init__(self, model: nn.Module,
                 layers: Iterable[nn.Module] | Mapping[nn.Module, LayerHelper] | None = None,
                 sample_dt: float | None = None) -> None:
        if sample_dt is not None and not (isinstance(sample_dt, (int, float))
                                          and math.isfinite(sample_dt) and sample_dt > 0):
            raise ValueError(f"invalid sample_dt={sample_dt!r}: allowed range is None or a "
                             "finite float > 0")
        self.sample_dt = None if sample_dt is None else float(sample_dt)
        found, _ = ode_layers(model)
        if layers is not None:
            wanted = list(layers)
            missing = [m for m in wanted if m not in found]
            if missing:
                raise ValueError(f"{len(missing)} module(s) are not supported layers inside an "
                                 "ODE block's func")
            found = {m: found[m] for m in wanted}
            if isinstance(layers, Mapping):
                found = {m: dataclasses.replace(lay, helper=layers[m])
                         for m, lay in found.items()}
        self.layers = found
        self.blocks = list(find_ode_blocks(model).values())
        blind = [b.method for b in self.blocks if _adjoint_callback_name(b.method) is None]
        if blind:
            raise ValueError(f"method(s) {sorted(set(blind))} call no adjoint step callback; "
                             "collection needs a torchdiffeq fixed-grid or adaptive RK solver")
        self.calls = 0  # adjoint solves sampled
        self._acc: dict[nn.Module, _Accumulator] = {}
        self._eval: _Eval | None = None

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> ODEFactorCollector:
        if self.active:
            raise RuntimeError("this collector is already active")
        for block in self.blocks:
            _ARMED.setdefault(block, []).append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def active(self) -> bool:
        """Whether the collector is armed (samples the adjoint solves of its blocks)."""
        return any(self in _ARMED.get(b, ()) for b in self.blocks)

    def close(self) -> None:
        """Stop sampling: detach from the blocks (idempotent; the factors stay readable)."""
        for block in self.blocks:
            armed = _ARMED.get(block, [])
            if self in armed:
                armed.remove(self)
            if not armed:
                _ARMED.pop(block, None)
        self._eval = None

    def reset(self) -> None:
        """Forget everything collected so far (stays armed if it is)."""
        self._acc.clear()
        self.calls = 0

    # -- results ------------------------------------------------------------------------------
    def factors(self) -> dict[nn.Module, ODEFactors]:
        """Factors of every layer that was sampled (both ``A`` and ``G``) so far."""
        out: dict[nn.Module, ODEFactors] = {}
        for module, acc in self._acc.items():
            if not (acc.samples and acc.g_seen):
                continue
            a = acc.a / acc.a_rows
            g = acc.g * (acc.time.square() / acc.g_rows)
            out[module] = ODEFactors(a, g, acc.batch_size, acc.locations, acc.time.clone(),
                                     acc.samples)
        return out

    def retained_bytes(self) -> int:
        """Bytes of every tensor the collector holds (constant in the number of solver steps)."""
        return sum(t.numel() * t.element_size() for acc in self._acc.values()
                   for t in (acc.a, acc.g, acc.a_rows, acc.g_rows, acc.time))

    # -- sampling (called from the adjoint step callback) ----------------------------------
    def _sample(self, call: _CallField, t0: Tensor, aug_state: Sequence[Tensor],
                dt: Tensor) -> None:
        if self not in call.sampled_by:
            call.sampled_by.add(self)
            self.calls += 1
        weight = call.step_weight(t0, dt)
        ys = call.unflatten(aug_state[1])
        adj = call.unflatten(aug_state[2])
        t = call.original_time(t0).detach()
        ev = _Eval(weight, call.batch, call.mask)
        handles: list[RemovableHandle] = []
        with torch.enable_grad():
            leaves = tuple(y.detach().requires_grad_(True) for y in ys)
            self._eval = ev
            try:
                for module in self.layers:
                    handles.append(module.register_forward_pre_hook(self._pre_hook))
                    handles.append(module.register_forward_hook(self._post_hook))
                f = call.evaluate(t, leaves if call.is_tuple else leaves[0])
                fs = (f,) if isinstance(f, Tensor) else tuple(f)
                pairs = [(fk, ak) for fk, ak in zip(fs, adj, strict=True) if fk.requires_grad]
                anchors = [self._anchor(m) for m in ev.ran]
                inputs = [v for v in (*leaves, *anchors) if v is not None and v.requires_grad]
                if pairs and inputs:
                    ev.recording_g = True
                    torch.autograd.grad([p[0] for p in pairs], inputs,
                                        grad_outputs=[p[1] for p in pairs], allow_unused=True)
            finally:
                self._eval = None
                for h in handles:
                    h.remove()

    def _anchor(self, module: nn.Module) -> Tensor | None:
        """The cheapest parameter of ``module`` to differentiate (makes its output's hook fire)."""
        helper = self.layers[module].helper
        for p in (helper.bias, helper.weight):
            if p is not None and p.requires_grad:
                return p
        return None

    def _accumulator(self, module: nn.Module) -> _Accumulator:
        acc = self._acc.get(module)
        if acc is None:
            helper = self.layers[module].helper
            w = helper.weight
            d_in = w[0].numel() + int(helper.has_bias)
            z = w.new_zeros(())
            acc = _Accumulator(w.new_zeros(d_in, d_in), w.new_zeros(w.shape[0], w.shape[0]),
                               z.clone(), z.clone(), z.clone())
            self._acc[module] = acc
        return acc

    def _row_mask(self, ev: _Eval, n_in: int, rows: int) -> Tensor | None:
        """Per-row 0/1 weights for a batched layer under a sample mask (else None)."""
        if ev.mask is None or n_in != ev.batch:
            return None
        return ev.mask.repeat_interleave(rows // n_in)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        ev = self._eval
        if ev is None or ev.recording_g or not torch.is_grad_enabled():
            return
        x = args[0]
        helper = self.layers[module].helper
        acc = self._accumulator(module)
        n_in = x.shape[0] if x.dim() > 1 else 1
        per_sample = helper.rows_per_sample(x)
        keep = self._row_mask(ev, n_in, n_in * per_sample)
        outer, n = helper.input_outer(x.detach(), keep)
        w = ev.weight.to(outer.dtype)
        acc.a.add_(outer.mul_(w))
        acc.a_rows.add_(w * n)
        if module not in ev.ran:  # once per evaluation, even if the layer runs twice in it
            acc.time.add_(w if ev.mask is None else w * ev.mask.to(outer.dtype).mean())
            acc.samples += 1
            ev.ran.append(module)
        acc.batch_size = ev.batch
        acc.locations = float(per_sample)

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        ev = self._eval
        if (ev is None or ev.recording_g or not isinstance(output, Tensor)
                or not output.requires_grad):
            return
        acc = self._acc[module]
        helper = self.layers[module].helper
        n_in = output.shape[0] if output.dim() > 1 else 1

        def record(grad: Tensor) -> None:
            if not ev.recording_g:  # e.g. a divergence computed by autograd inside func
                return
            g = grad.detach()
            keep = self._row_mask(ev, n_in, int(n_in * acc.locations))
            outer, n = helper.output_moments(g, keep)
            w = ev.weight.to(outer.dtype)
            acc.g.add_(outer.mul_(w * ev.batch * ev.batch))
            acc.g_rows.add_(w * n)
            acc.g_seen = True

        output.register_hook(record)
