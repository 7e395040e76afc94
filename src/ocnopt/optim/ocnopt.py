"""The OCNOpt optimizer: a curvature-preconditioned step with a layer-wise feedback policy.

Per step (``step(closure)`` with ``feedback=True``)::

    first pass   loss = closure(); backward for the layers' output gradients g_t and input
                 gradients p_t (weight gradients of Linear/Conv2d layers are NOT computed here)
    curvature    Kronecker factors / eigenbases updated on schedule
    open loop    parameters without a layer helper (and layers run more than once) are updated
    second pass  closure() again under no_grad, same dropout masks; just before layer t runs:
                   s_i = feedback_scale * <B p_t_i, xhat_t_i - x_t_i>
                   d_t = sum_i (1 + s_i) q_t_i      (= G^T diag(1+s) A: one weight gradient)
                   u_t <- u_t - lr * M^-1 (d_t + weight decay)   via the base optimizer's rule

``d_t`` replaces the gradient everywhere in the base optimizer (moments, second-moment
statistics, EKFAC eigenvalues), so ``feedback_scale=0`` is exactly the base optimizer and the
first pass needs no weight gradients (one extra forward + one weight gradient per layer).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from ocnopt.curvature.kronecker import (
    Eigenbasis,
    Projection,
    ekfac_init,
    kfac_scale,
    refresh_eigenbasis,
    rows_factor,
)
from ocnopt.hooks import FeedbackPass, ForwardCapture, LayerRecord
from ocnopt.layers import LayerHelper, helper_for
from ocnopt.optim.functional import adam_update, momentum_update, rmsprop_update, sgd_update

__all__ = ["OCNOpt", "CURVATURES"]

log = logging.getLogger(__name__)

CURVATURES = ("identity", "rmsprop", "adam", "kfac", "ekfac")
_KRONECKER = ("kfac", "ekfac")
_GLOBAL = "ocnopt"  # key of the optimizer-wide counters in ``self.state``


@dataclass
class _Layer:
    name: str
    helper: LayerHelper
    group: dict[str, Any]


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: allowed range is {allowed}")


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the allowed range for every invalid hyperparameter."""
    r = _is_real
    _check("lr", group["lr"], r(group["lr"]) and group["lr"] >= 0, "a finite float >= 0")
    fs = group["feedback_scale"]
    _check("feedback_scale", fs, r(fs) and fs >= 0, "a finite float >= 0")
    fc = group["feedback_clip"]
    _check("feedback_clip", fc, fc is None or (r(fc) and fc >= 0), "None or a finite float >= 0")
    m = group["momentum"]
    _check("momentum", m, r(m) and 0 <= m < 1, "0 <= momentum < 1")
    dp = group["dampening"]
    _check("dampening", dp, r(dp) and 0 <= dp <= 1, "0 <= dampening <= 1")
    if group["nesterov"] and (m <= 0 or dp != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
    wd = group["weight_decay"]
    _check("weight_decay", wd, r(wd) and wd >= 0, "a finite float >= 0")
    a = group["alpha"]
    _check("alpha", a, r(a) and 0 <= a <= 1, "0 <= alpha <= 1")
    betas = group["betas"]
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        r(b) and 0 <= b < 1 for b in betas
    )
    _check("betas", betas, ok, "a pair (beta1, beta2) with 0 <= beta < 1")
    _check("eps", group["eps"], r(group["eps"]) and group["eps"] >= 0, "a finite float >= 0")
    dm = group["damping"]
    _check("damping", dm, r(dm) and dm > 0, "a finite float > 0")
    fd = group["factor_decay"]
    _check("factor_decay", fd, r(fd) and 0 <= fd < 1, "0 <= factor_decay < 1")
    ed = group["eigenvalue_decay"]
    _check("eigenvalue_decay", ed, r(ed) and 0 <= ed < 1, "0 <= eigenvalue_decay < 1")
    mr = group["max_rank"]
    _check("max_rank", mr, mr is None or (isinstance(mr, int) and mr >= 1), "None or an int >= 1")
    fl = group["fallback_lr"]
    _check("fallback_lr", fl, fl is None or (r(fl) and fl >= 0), "None or a finite float >= 0")


class _RngReplay:
    """Replays the global RNG state of the first pass (same dropout masks) in the second pass."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self.devices = cuda_devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in cuda_devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(s, d)
            yield


class OCNOpt(Optimizer):
    """Optimal-control-theoretic second-order optimizer with layer-wise feedback (DDPNOpt/OCNOpt).

    Args:
        model: the network; its ``nn.Linear`` and ``nn.Conv2d`` (groups=1, zero padding) layers
            get the feedback policy and, for ``kfac``/``ekfac``, Kronecker curvature.
        lr: learning rate (in ``param_groups``; works with ``torch.optim.lr_scheduler``).
        curvature: base curvature ``M``: ``"identity"`` (SGD), ``"rmsprop"``, ``"adam"``,
            ``"kfac"``, ``"ekfac"`` (EKFAC with running-average eigenvalues, as in SNOpt).
        feedback: apply the layer-wise feedback policy (needs ``step(closure)``).
        feedback_scale: ``beta`` scaling the feedback term (0 = base optimizer exactly). With
            SGD-style momentum the feedback term enters the momentum buffer scaled by
            ``(1 - momentum) / (1 - dampening)`` so that its accumulated gain is one.
        feedback_clip: optional trust region on the feedback: each per-sample term ``s_i`` is
            clamped to ``[-clip, clip]`` (``clip=1`` keeps every sample weight ``1 + s_i`` in
            ``[0, 2]``). ``None`` (default) is the exact DDP formula.
        momentum, dampening, nesterov: ``torch.optim.SGD`` momentum, used by identity, kfac and
            ekfac; rmsprop uses ``momentum`` as ``torch.optim.RMSprop`` does; must be 0 for adam.
        weight_decay: L2 coefficient ``gamma`` added to the direction (preconditioned for
            kfac/ekfac); ``decoupled_weight_decay=True`` gives AdamW for ``curvature="adam"``.
        alpha, centered: ``torch.optim.RMSprop`` settings. betas, amsgrad: ``torch.optim.Adam``.
        eps: epsilon of rmsprop/adam and of the adam-style fallback.
        damping: Tikhonov damping added to the Kronecker eigenvalues (kfac/ekfac).
        factor_decay: EMA decay of the Kronecker factors A, G.
        eigenvalue_decay: EMA decay ``alpha`` of EKFAC's projected second moments (SNOpt 0.75).
        max_rank: keep the top ``max_rank`` eigenvectors of every Kronecker factor wider than
            that, with an isotropic remainder and warm-started refreshes (default 64: factors
            up to 64 wide are exact; wide layers cost ``O(k d_out d_in)`` per step instead of
            ``O((d_out + d_in) d_out d_in)``); ``None`` = exact eigenbases everywhere.
        factor_update_freq: steps between Kronecker factor updates (needs captured activations).
        update_freq: steps between eigenbasis refreshes (and EKFAC eigenvalue resets).
        fallback_lr: learning rate of the adam-style diagonal used for parameters that are not
            Kronecker-factored under kfac/ekfac (default: ``lr``).
        params: optional iterable of parameters or param-group dicts (all from ``model``);
            default: every parameter of ``model`` that requires grad.

    ``step(closure)``: ``closure()`` evaluates the model on the current minibatch and returns
    the batch-MEAN loss without calling ``backward()``; with feedback it is called twice (the
    second time under ``no_grad``, with the first call's RNG state). Without feedback the
    classic ``loss.backward(); opt.step()`` loop also works (kfac/ekfac then need the forward
    and backward inside ``with opt.capture():``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        curvature: str = "ekfac",
        feedback: bool = True,
        feedback_scale: float = 1.0,
        *,
        feedback_clip: float | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        alpha: float = 0.99,
        centered: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = False,
        damping: float = 0.05,
        factor_decay: float = 0.95,
        eigenvalue_decay: float = 0.75,
        max_rank: int | None = 64,
        factor_update_freq: int = 10,
        update_freq: int = 100,
        fallback_lr: float | None = None,
        params: Iterable[Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"OCNOpt needs the model (nn.Module) first, got {type(model).__name__}")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")
        for name, v in (("factor_update_freq", factor_update_freq), ("update_freq", update_freq)):
            _check(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "int >= 1")
        if curvature == "adam" and momentum != 0:
            raise ValueError("momentum must be 0 for curvature='adam' (use betas); got "
                             f"{momentum!r}")
        self.model = model
        self.curvature = curvature
        self.feedback = bool(feedback)
        self.factor_update_freq = factor_update_freq
        self.update_freq = update_freq
        defaults = dict(
            lr=lr, feedback_scale=feedback_scale, feedback_clip=feedback_clip, momentum=momentum,
            dampening=dampening,
            nesterov=nesterov, weight_decay=weight_decay, alpha=alpha, centered=centered,
            betas=tuple(betas), eps=eps, amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay, damping=damping,
            factor_decay=factor_decay, eigenvalue_decay=eigenvalue_decay, max_rank=max_rank,
            fallback_lr=fallback_lr,
        )
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._initialised = False
        super().__init__(params, defaults)
        self.state[_GLOBAL] = {"step": 0, "skipped_steps": 0, "nonfinite_feedback": 0,
                               "eigh_failures": 0}
        self._in_skip_burst = False
        self._pending: dict[nn.Module, LayerRecord] | None = None
        self._records: dict[nn.Module, LayerRecord] = {}
        self._feedback_left = 0  # layers still to update in the running feedback pass
        self._warned: set[str] = set()
        self._build_layers()
        self._initialised = True

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        if getattr(self, "_initialised", False):
            self._build_layers()

    def _build_layers(self) -> None:
        group_of: dict[Tensor, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                group_of[p] = group
        names = {p: n for n, p in self.model.named_parameters()}
        unknown = [p for p in group_of if p not in names]
        if unknown:
            raise ValueError(f"{len(unknown)} optimized parameter(s) do not belong to the model")
        self._layers: dict[nn.Module, _Layer] = {}
        claimed: dict[Tensor, nn.Module] = {}
        unsupported: list[str] = []
        for mname, module in self.model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or weight not in group_of:
                continue
            helper, reason = helper_for(module)
            if helper is None:
                if isinstance(module, (nn.Linear, nn.Conv2d)) or "Conv" in type(module).__name__:
                    unsupported.append(f"{mname or type(module).__name__} ({reason})")
                continue
            tensors = [helper.weight] + ([helper.bias] if helper.has_bias else [])
            if any(t in claimed for t in tensors):
                other = next(claimed[t] for t in tensors if t in claimed)
                self._layers.pop(other, None)
                unsupported.append(f"{mname} (shares parameters with another layer)")
                continue
            group = group_of[helper.weight]
            if helper.has_bias and helper.bias in group_of and group_of[helper.bias] is not group:
                raise ValueError(f"layer {mname!r}: weight and bias must share a param group")
            for t in tensors:
                claimed[t] = module
            self._layers[module] = _Layer(mname, helper, group)
        self._layer_params = {t for lay in self._layers.values()
                              for t in (lay.helper.weight, lay.helper.bias) if t is not None}
        self._other_params = [p for p in group_of if p not in self._layer_params]
        self._group_of = group_of
        self._bn_modules = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        self._devices = sorted({p.device.index or 0 for p in group_of if p.device.type == "cuda"})
        kron = self.curvature in _KRONECKER
        if unsupported:
            self._warn_once("unsupported", "modules without a Kronecker/feedback helper: "
                            + "; ".join(unsupported), stacklevel=4)
        if self._other_params and (kron or self.feedback):
            how = " and ".join(s for s, on in (
                ("use the adam-style diagonal curvature", kron),
                ("get open-loop updates (no layer-wise feedback)", self.feedback)) if on)
            listed = ", ".join(names[p] for p in self._other_params)
            self._warn_once("fallback", f"parameters outside supported Linear/Conv2d layers {how}:"
                            f" {listed}", stacklevel=4)

    def _warn_once(self, key: str, msg: str, stacklevel: int = 3) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
            log.info(msg)  # the RuntimeWarning is the user-facing channel

    # ------------------------------------------------------------------ public helpers
    @property
    def num_steps(self) -> int:
        """Number of applied (not skipped) steps."""
        return int(self.state[_GLOBAL]["step"])

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because the loss or a gradient was NaN/Inf."""
        return int(self.state[_GLOBAL]["skipped_steps"])

    @property
    def layer_names(self) -> list[str]:
        """Names of the modules that get feedback / Kronecker curvature, in registration order."""
        return [lay.name for lay in self._layers.values()]

    def _factors_due(self) -> bool:
        if self.curvature not in _KRONECKER or not self._layers:
            return False
        k = self.state[_GLOBAL]["step"]
        return k % self.factor_update_freq == 0 or k % self.update_freq == 0 or any(
            "in_vectors" not in self.state[lay.helper.weight] for lay in self._layers.values())

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record layer activations/gradients for the classic ``backward(); step()`` loop.

        Only needed for ``kfac``/``ekfac`` without a closure; a no-op on steps that do not
        update the Kronecker factors. Hooks are removed when the block exits.
        """
        if not self._factors_due():
            yield
            return
        with ForwardCapture(self._layers) as cap:
            yield
        self._pending = cap.records

    # ------------------------------------------------------------------ step
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None
    ) -> Tensor | None:
        """Perform one optimization step; returns the (first-pass) loss of ``closure``."""
        try:
            if closure is None:
                return self._step_from_grads()
            return self._step_with_closure(closure)
        finally:
            self._records = {}
            self._pending = None

    def _step_from_grads(self) -> None:
        if self.feedback and self._layers:
            raise RuntimeError(
                "feedback=True needs opt.step(closure) (closure returns the loss WITHOUT calling "
                "backward); use feedback=False for the classic loss.backward(); opt.step() loop")
        records = self._pending or {}
        if self._factors_due() and not records:
            raise RuntimeError(
                f"curvature={self.curvature!r} needs layer statistics on this step: call "
                "opt.step(closure), or run forward and backward inside `with opt.capture():`")
        grads = {p: p.grad for p in self._group_of if p.grad is not None}
        if not self._all_finite(list(grads.values()), records):
            return None
        with torch.no_grad():
            if records:
                self._update_curvature(records)
            self._open_loop(grads, self._other_params + list(self._layer_params))
            self.state[_GLOBAL]["step"] += 1
        return None

    def _step_with_closure(self, closure: Callable[[], Tensor]) -> Tensor:
        feedback = self.feedback and bool(self._layers)
        factors_due = self._factors_due()
        watch = list(self._layers) if (feedback or factors_due) else []
        rng = _RngReplay(self._devices) if feedback else None
        with ForwardCapture(watch) as cap, torch.enable_grad():
            loss = closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError("closure must return the scalar batch-mean loss tensor "
                                "(without calling backward())")
            targets, roles = self._grad_targets(cap.records, feedback)
            grads = torch.autograd.grad(loss, targets, allow_unused=True) if targets else ()
        records = cap.records
        param_grads: dict[Tensor, Tensor] = {}
        input_grads: dict[int, Tensor] = {}
        anchors: list[Tensor] = []
        for t, role, gr in zip(targets, roles, grads, strict=True):
            if gr is None:
                continue
            if role == "param":
                param_grads[t] = gr
            elif role == "input":
                input_grads[id(t)] = gr
            else:
                anchors.append(gr)
        checks = [loss.detach(), *param_grads.values(), *input_grads.values(), *anchors]
        if not self._all_finite(checks, records):
            return loss.detach()
        self._records = records
        with torch.no_grad():
            if factors_due:
                self._update_curvature(records)
            for p, gr in param_grads.items():
                p.grad = gr
            if not feedback:
                self._open_loop(param_grads, list(self._group_of))
            else:
                multi = [m for m, r in records.items() if r.calls > 1]
                for m in multi:
                    self._warn_once(f"multi:{self._layers[m].name}",
                                    f"layer {self._layers[m].name!r} ran {records[m].calls} times "
                                    "in one forward; it gets the open-loop update (no feedback)")
                open_params = self._other_params + [
                    t for m in multi for t in (self._layers[m].helper.weight,
                                               self._layers[m].helper.bias) if t is not None]
                self._open_loop(param_grads, open_params)
                for rec in records.values():
                    if rec.calls == 1 and id(rec.inputs[0]) in input_grads:
                        rec.input_grad = input_grads[id(rec.inputs[0])]
                single = [m for m, r in records.items() if r.calls == 1]
                self._feedback_left = sum(records[m].grads[0] is not None for m in single)
                assert rng is not None
                with FeedbackPass(self._bn_modules, single, self._feedback_input), rng.replay():
                    closure()
                for m in single:
                    rec = records[m]
                    if not rec.visited and rec.grads[0] is not None:
                        lay = self._layers[m]
                        self._warn_once(f"unvisited:{lay.name}", f"layer {lay.name!r} did not run "
                                        "in the feedback pass; it gets the open-loop update")
                        dw, db = lay.helper.weight_grad(rec.inputs[0], rec.grads[0], None)
                        self._update_layer(lay, dw, db)
            self.state[_GLOBAL]["step"] += 1
        return loss.detach()

    def _grad_targets(
        self, records: dict[nn.Module, LayerRecord], feedback: bool
    ) -> tuple[list[Tensor], list[str]]:
        """Tensors to differentiate in the first pass, and their roles ("param"/"input")."""
        if not feedback:
            ps = [p for p in self._group_of if p.requires_grad]
            return ps, ["param"] * len(ps)
        targets: list[Tensor] = [p for p in self._other_params if p.requires_grad]
        roles = ["param"] * len(targets)
        seen: set[int] = set()
        for m, rec in records.items():
            helper = self._layers[m].helper
            if rec.calls == 0:
                continue
            if rec.calls > 1:
                extra = [helper.weight] + ([helper.bias] if helper.has_bias else [])
                targets += extra
                roles += ["param"] * len(extra)
                continue
            x = rec.inputs[0]
            if x.requires_grad:
                if id(x) not in seen:  # p_t: needed for the feedback; also makes g_t flow
                    seen.add(id(x))
                    targets.append(x)
                    roles.append("input")
            else:  # data input: request the cheapest parameter gradient so g_t is computed
                targets.append(helper.bias if helper.has_bias else helper.weight)
                roles.append("anchor")
        return targets, roles

    def _all_finite(self, tensors: list[Tensor], records: dict[nn.Module, LayerRecord]) -> bool:
        """True if everything is finite; otherwise count/warn the skipped step.

        One reduction per tensor: NaN/Inf propagate into its sum (a finite tensor whose sum
        overflows float range also counts as non-finite; such a step would be destructive).
        """
        for rec in records.values():
            tensors = tensors + [g for g in rec.grads if g is not None]
        ok = not tensors or bool(torch.isfinite(torch.stack([t.sum() for t in tensors]).sum()))
        g = self.state[_GLOBAL]
        if ok:
            self._in_skip_burst = False
            return True
        g["skipped_steps"] += 1
        if not self._in_skip_burst:
            msg = (f"OCNOpt: non-finite loss or gradient at step {g['step']}; step skipped "
                   f"(parameters and optimizer state unchanged; {g['skipped_steps']} skipped "
                   "so far)")
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            log.info(msg)  # the RuntimeWarning is the user-facing channel
        self._in_skip_burst = True
        return False

    # ------------------------------------------------------------------ feedback pass
    def _feedback_input(self, module: nn.Module, x_hat: Tensor) -> bool:
        """Update ``module`` from its second-pass input; True once every layer is updated."""
        rec = self._records.get(module)
        if rec is None or rec.calls != 1 or rec.visited or rec.grads[0] is None:
            return False
        rec.visited = True
        self._feedback_left -= 1
        lay = self._layers[module]
        x = rec.inputs[0]
        if x._version != rec.versions[0]:
            raise RuntimeError(f"the input of layer {lay.name!r} was modified in place after the "
                               "layer ran; the feedback needs the first-pass input")
        w = None
        if rec.input_grad is not None:
            if x_hat.shape != x.shape:
                raise RuntimeError(
                    f"layer {lay.name!r}: input shape {tuple(x_hat.shape)} in the feedback pass "
                    f"differs from {tuple(x.shape)}; the closure must re-evaluate the same batch")
            batch = x.shape[0]
            beta = lay.group["feedback_scale"] * self._momentum_gain_correction(lay.group)
            s = (rec.input_grad * (x_hat - x)).reshape(batch, -1).sum(1).mul_(beta * batch)
            bad = ~torch.isfinite(s)
            if bool(bad.any()):
                self.state[_GLOBAL]["nonfinite_feedback"] += int(bad.sum())
                self._warn_once("nonfinite_feedback", "non-finite feedback terms s_i were "
                                "replaced by 0 (those samples get the open-loop weight)")
                s = torch.where(bad, torch.zeros_like(s), s)
            clip = lay.group["feedback_clip"]
            if clip is not None:
                s = s.clamp_(-clip, clip)
            w = s.add_(1.0)
        dw, db = lay.helper.weight_grad(x, rec.grads[0], w)
        self._update_layer(lay, dw, db)
        return self._feedback_left == 0

    def _momentum_gain_correction(self, group: dict[str, Any]) -> float:
        """``(1 - momentum) / (1 - dampening)`` for accumulating (SGD/RMSprop) momentum, else 1.

        A momentum buffer applies each direction with a total gain ``(1 - dampening) /
        (1 - momentum)`` over the following steps, while the observed ``dx`` already contains
        the upstream layers' momentum. Scaling the feedback term by the inverse gain makes its
        accumulated effect that of one application, as in momentum-free DDP (without it the
        corrections pile up roughly ``1/(1 - momentum)``-fold and training diverges). Adam's first
        moment is a normalised EMA and needs no correction.
        """
        mu, damp = group["momentum"], group["dampening"]
        if mu == 0 or self.curvature == "adam" or damp >= 1:
            return 1.0
        if self.curvature == "rmsprop":
            return 1.0 - mu
        return (1.0 - mu) / (1.0 - damp)

    # ------------------------------------------------------------------ updates
    def _open_loop(self, grads: dict[Tensor, Tensor], params: list[Tensor]) -> None:
        """Open-loop updates of ``params`` from their gradients (layers as a whole)."""
        wanted = set(params)
        for lay in self._layers.values():
            w, b = lay.helper.weight, lay.helper.bias
            if w in wanted and w in grads:
                self._update_layer(lay, grads[w], grads.get(b) if b is not None else None)
        for p in params:
            if p not in self._layer_params and p in grads:
                self._diag_update(p, grads[p], self._group_of[p], fallback=True)

    def _diag_update(self, p: Tensor, d: Tensor, group: dict[str, Any], fallback: bool) -> None:
        state = self.state[p]
        curv, lr = self.curvature, group["lr"]
        if curv in _KRONECKER and fallback:  # parameters outside Kronecker layers
            curv = "adam"
            if group["fallback_lr"] is not None:
                lr = group["fallback_lr"]
        if curv == "identity":
            sgd_update(p, d, state, lr=lr, momentum=group["momentum"],
                       dampening=group["dampening"], nesterov=group["nesterov"],
                       weight_decay=group["weight_decay"])
        elif curv == "rmsprop":
            rmsprop_update(p, d, state, lr=lr, alpha=group["alpha"], eps=group["eps"],
                           weight_decay=group["weight_decay"], momentum=group["momentum"],
                           centered=group["centered"])
        else:
            adam_update(p, d, state, lr=lr, betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                        decoupled_weight_decay=group["decoupled_weight_decay"])

    def _update_layer(self, lay: _Layer, dw: Tensor, db: Tensor | None) -> None:
        helper, group = lay.helper, lay.group
        w, b = helper.weight, helper.bias
        w.grad = dw
        if b is not None and db is not None:
            b.grad = db
        if self.curvature not in _KRONECKER:
            self._diag_update(w, dw, group, fallback=False)
            if b is not None and db is not None:
                self._diag_update(b, db, group, fallback=False)
            return
        wd = group["weight_decay"]
        if wd != 0:
            dw = dw.add(w, alpha=wd)
            db = db.add(b, alpha=wd) if (b is not None and db is not None) else db
        st = self.state[w]
        out, inp = self._bases(st, helper)
        proj = Projection(helper.to_matrix(dw, db), out, inp)
        if self.curvature == "ekfac":
            if "m2" not in st:
                st["m2"] = ekfac_init(out, inp, st.get("locations", 1.0))
            alpha = group["eigenvalue_decay"]
            m2 = st["m2"]
            m2.mul_(alpha).add_(proj.second_moments(), alpha=(1 - alpha) * st.get("batch_size", 1))
            scale = (m2 + group["damping"]).reciprocal_()
        else:
            scale = kfac_scale(out, inp, st.get("locations", 1.0), group["damping"])
        pw, pb = helper.from_matrix(proj.apply(scale))
        kw = dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                  nesterov=group["nesterov"])
        momentum_update(w, pw, st, **kw)
        if b is not None and pb is not None:
            momentum_update(b, pb, self.state[b], **kw)

    # ------------------------------------------------------------------ curvature
    @staticmethod
    def _bases(st: dict[str, Any], helper: LayerHelper) -> tuple[Eigenbasis, Eigenbasis]:
        if "in_vectors" not in st:  # never refreshed: damping-only preconditioning
            w = helper.weight
            d_in = w[0].numel() + int(helper.has_bias)
            return Eigenbasis.identity(w.shape[0], w), Eigenbasis.identity(d_in, w)
        return (Eigenbasis(st["out_vectors"], st["out_values"], st["out_rest"]),
                Eigenbasis(st["in_vectors"], st["in_values"], st["in_rest"]))

    def _update_curvature(self, records: dict[nn.Module, LayerRecord]) -> None:
        """Update Kronecker factors (EMA) and refresh eigenbases when due."""
        if self.curvature not in _KRONECKER or not records:
            return
        k = self.state[_GLOBAL]["step"]
        for m, rec in records.items():
            if rec.calls == 0 or any(g is None for g in rec.grads):
                continue
            lay = self._layers[m]
            st = self.state[lay.helper.weight]
            batch = rec.inputs[0].shape[0]
            a = torch.cat([lay.helper.input_rows(x.detach()) for x in rec.inputs])
            gr = torch.cat([lay.helper.output_rows(g) for g in rec.grads if g is not None])
            fa, fg = rows_factor(a), rows_factor(gr, scale=float(batch))
            rho = lay.group["factor_decay"]
            if "A" in st:
                st["A"].mul_(rho).add_(fa, alpha=1 - rho)
                st["G"].mul_(rho).add_(fg, alpha=1 - rho)
            else:
                st["A"], st["G"] = fa, fg
            st["batch_size"] = batch
            st["locations"] = a.shape[0] / (batch * rec.calls)
            if k % self.update_freq == 0 or "in_vectors" not in st:
                self._refresh(lay, st)

    def _refresh(self, lay: _Layer, st: dict[str, Any]) -> None:
        rank = lay.group["max_rank"]
        new = []
        for side, f in (("in", st["A"]), ("out", st["G"])):
            prev = None
            if f"{side}_vectors" in st:
                prev = Eigenbasis(st[f"{side}_vectors"], st[f"{side}_values"], st[f"{side}_rest"])
            basis = refresh_eigenbasis(f, rank, prev)
            if basis is None:
                self.state[_GLOBAL]["eigh_failures"] += 1
                self._warn_once(f"eigh:{lay.name}", f"layer {lay.name!r}: eigendecomposition of "
                                f"the {side}put factor failed; keeping the last good basis")
                basis = prev if prev is not None else Eigenbasis.identity(f.shape[0], f)
            new.append((side, basis))
        for side, basis in new:
            st[f"{side}_vectors"], st[f"{side}_values"], st[f"{side}_rest"] = (
                basis.vectors, basis.values, basis.rest)
        if self.curvature == "ekfac":
            out, inp = self._bases(st, lay.helper)
            st["m2"] = ekfac_init(out, inp, st["locations"])

    # ------------------------------------------------------------------ checkpointing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        glob = state_dict["state"].get(_GLOBAL)
        self.state[_GLOBAL] = dict(glob) if glob is not None else {
            "step": 0, "skipped_steps": 0, "nonfinite_feedback": 0, "eigh_failures": 0}
        self._build_layers()
