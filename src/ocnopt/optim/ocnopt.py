"""The OCNOpt optimizer: a curvature-preconditioned step with a layer-wise feedback policy.

The class is the orchestrator: validation, param groups, checkpoints and the order of a step.
The math lives elsewhere: per-tensor kernels in :mod:`ocnopt.optim.functional`, Kronecker
curvature in :mod:`ocnopt.curvature`, per-layer factor rows and weight gradients in
:mod:`ocnopt.layers`, the feedback weights in :mod:`ocnopt.feedback`, hooks in
:mod:`ocnopt.hooks`, all-or-nothing bookkeeping in :mod:`ocnopt.optim.transaction`.

A step with ``feedback=True`` (``step(closure)``)::

    first pass   loss = closure(); one backward for the layers' output gradients g_t and input
                 gradients p_t (OCNOpt's own autograd.grad, or the closure's loss.backward())
    curvature    Kronecker factors / eigenbases updated on each layer's schedule
    open loop    parameters without feedback (outside Linear/Conv2d layers, shared, ...) updated
    second pass  closure() again under no_grad, same dropout masks; just before layer t runs:
                   s_i = feedback_scale * <B p_t_i, xhat_t_i - x_t_i>
                   d_t = sum_i (1 + s_i) q_t_i      (= G^T diag(1+s) A / B: one weight gradient)
                   u_t <- u_t - lr * M^-1 (d_t + weight decay)   via the base optimizer's rule
    commit       only if every new parameter, state tensor and factor is finite; otherwise (or
                 on any exception) everything is restored bitwise and the step is counted.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ocnopt.curvature.layer_state import BASIS_KEYS, KRONECKER, refresh_due
from ocnopt.curvature.layer_state import STATE_KEYS as KRONECKER_STATE_KEYS
from ocnopt.distributed import Communicator, assign_work, find_process_group
from ocnopt.feedback import (
    INFORMATION,
    GameFeedback,
    Member,
    cooperative_weights,
    feedback_terms,
    momentum_gain_correction,
    sample_weights,
    step_model,
    update_effect,
)
from ocnopt.hooks import FeedbackPass, ForwardCapture, LayerRecord, batchnorm_buffers
from ocnopt.layers import LayerHelper, helper_for
from ocnopt.ode.collector import ODEFactors
from ocnopt.ode.driver import ODEDriver, ODEOptions
from ocnopt.optim.config import (
    ALL_KEYS,
    COMMON_DEFAULTS,
    CURVATURES,
    GRAFTS,
    check,
    coerce_group,
    curvature_defaults,
    validate_group,
)
from ocnopt.optim.functional import (
    STATE_KEYS,
    adam_update,
    ema_update,
    momentum_update,
    rms_normalize,
    rmsprop_update,
    sgd_update,
)
from ocnopt.optim.transaction import StepTransaction, all_finite

__all__ = ["OCNOpt", "CURVATURES", "SKIP_WARN_EVERY"]

log = logging.getLogger(__name__)

#: While every step is being skipped, the skip warning is repeated every this many skips.
SKIP_WARN_EVERY = 100
_FORMAT = 2  # version of the "ocnopt" entry of state_dict()
_BASE_RULE = {"identity": "sgd", "rmsprop": "rmsprop", "adam": "adam", "kfac": "sgd",
              "ekfac": "sgd"}


@dataclass
class _Layer:
    """A Linear/Conv2d layer that gets the feedback policy (and Kronecker curvature)."""

    name: str
    helper: LayerHelper
    wgroup: dict[str, Any]
    bgroup: dict[str, Any] | None

    @property
    def params(self) -> list[Tensor]:
        h = self.helper
        return [h.weight] + ([h.bias] if h.bias is not None else [])


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


class _Skip(Exception):  # noqa: N818 - internal control flow
    """A step is abandoned (everything rolled back); ``reason`` is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _FirstPass:
    loss: Any  # what the closure returned (tensor or float)
    param_grads: dict[Tensor, Tensor]
    records: dict[nn.Module, LayerRecord]
    game: GameFeedback | None = None  # the step's game feedback (None: Markovian fallback)


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
        weight_decay: L2 coefficient ``gamma`` added to the direction (preconditioned for
            kfac/ekfac); ``decoupled_weight_decay=True`` gives AdamW for ``curvature="adam"``.
        information: what each layer's feedback sees on non-Markovian networks (residual
            blocks, parallel branches; ``docs/game-theory.md``): ``"nash"`` (default) its whole
            augmented state, i.e. its input and every earlier tensor still read after it starts
            (skips, finished branches); ``"markov"`` its input only, with the partial gradient
            through the readers at or after it; ``"cooperative"`` as ``nash``, and layers reading
            the same tensor decide jointly at the first of them, with the cross terms of their
            stage model (exact for identity curvature; other curvatures solve with ``M`` as it
            stands before the step). The structure is read from the autograd graph of each
            first pass. On plain feed-forward networks all three are the same step.
        maximize: maximise the objective instead (every curvature, feedback included).
        foreach: accepted for torch.optim compatibility (``None``/``True``/``False``).
        batch_dim: the sample axis of the layers' inputs and outputs: an int for every layer
            (default 0), or a mapping from module-name prefixes to ints (the longest matching
            prefix wins, other layers use 0), e.g. ``{"encoder": 1}`` when an encoder of
            ``batch_first=False`` modules works on ``(sequence, batch, features)`` while the
            head after pooling sees ``(batch, features)``.
        ode: settings for models with :class:`~ocnopt.ode.ODEBlock` s, an
            :class:`~ocnopt.ode.driver.ODEOptions` or a dict of its fields (feedback after ODE
            blocks, adjoint sampling, the integration-time controller of ``learn_t1`` blocks).

    Layers inside ODE blocks' vector fields (they run at every solver stage) get open-loop
    updates, never the feedback: ``kfac``/``ekfac`` precondition them with time-integrated
    Kronecker factors collected during the adjoint solve (SNOpt), the diagonal curvatures with
    their torch rule; ``learn_t1`` blocks get their ``t1`` updated by SNOpt's feedback policy
    after the parameters, in the same all-or-nothing step (:mod:`ocnopt.ode.driver`).

    Curvature settings (each curvature takes only its own; others raise ``ValueError``):

    * ``identity``: ``momentum``, ``dampening``, ``nesterov`` (``torch.optim.SGD``).
    * ``rmsprop``: ``alpha``, ``eps``, ``momentum``, ``centered`` (``torch.optim.RMSprop``).
    * ``adam``: ``betas``, ``eps``, ``amsgrad``, ``decoupled_weight_decay`` (``Adam``/``AdamW``).
    * ``kfac``/``ekfac``: SGD momentum on the preconditioned direction (``momentum``,
      ``dampening``, ``nesterov``); ``damping`` (Tikhonov term added to the Kronecker
      eigenvalues), ``factor_decay`` (EMA of the factors A, G), ``eigenvalue_decay`` (ekfac:
      EMA of the projected second moments, SNOpt's 0.75), ``max_rank`` (top eigenvectors kept
      per factor wider than that, with an isotropic remainder; ``None`` = exact);
      ``fallback_lr``/``fallback_betas``/``fallback_eps``: the Adam used for parameters outside
      Kronecker-factored layers (``fallback_lr=None`` means ``lr``).

    ``graft="adam"`` (kfac/ekfac): Adam grafting. Each layer's preconditioned direction is
    rescaled to the norm of Adam's normalised direction ``d / (sqrt(v_hat) + eps)`` for the same
    layer, and Adam's bias-corrected first moment (``betas[0]``) replaces the SGD momentum: the
    step has the Kronecker direction and Adam's magnitude, so Adam's learning rates transfer.
    The settings are then ``betas``, ``eps`` (also used by the fallback Adam) instead of
    ``momentum``, ``dampening``, ``nesterov``, ``fallback_betas``, ``fallback_eps``.

    Schedules (optimizer-wide): ``factor_update_freq`` (steps between Kronecker factor
    updates), ``update_freq`` (steps between eigenbasis refreshes) and ``early_refresh``
    (also refresh, with fresh factors, at steps 1, 2, 4, ... below ``update_freq``).

    Multi-process: with a ``DistributedDataParallel`` model (or the bare module while
    ``torch.distributed`` is initialised with several ranks, or an explicit ``process_group``)
    each rank runs the step on its local batch and OCNOpt communicates itself
    (:mod:`ocnopt.distributed`): gradients of open-loop parameters and each feedback layer's
    direction are averaged, Kronecker factors are averaged before they enter their running
    averages, each layer's eigendecomposition is computed by one rank and broadcast, and a
    non-finite value on any rank skips the step on all; every replica applies the same update,
    equal to one process on the concatenated batch. DDP's own gradient reduction is switched off
    (``no_sync``) inside ``step(closure)``.

    ``params``: optional iterable of parameters or param-group dicts (all from ``model``);
    default: every parameter of ``model`` that requires grad.

    ``step(closure)``: ``closure()`` evaluates the model on the current minibatch and returns
    the batch-MEAN loss, either without calling ``backward()`` (OCNOpt differentiates it) or
    after calling it (the torch convention of ``LBFGS``); with feedback it is called twice, the
    second time under ``no_grad`` with the first call's RNG state, and cut short (before the
    loss and any ``backward()``) once the last layer is updated. ``step()`` without a closure
    is the open-loop step of the classic ``loss.backward(); opt.step()`` loop (Kronecker
    statistics are recorded by hooks that live as long as the optimizer; :meth:`close`
    removes them).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        curvature: str = "ekfac",
        feedback: bool = True,
        feedback_scale: float = 1.0,
        *,
        factor_update_freq: int = 10,
        update_freq: int = 100,
        early_refresh: bool = True,
        graft: str | None = None,
        information: str = "nash",
        batch_dim: int | Mapping[str, int] = 0,
        params: Iterable[Any] | None = None,
        ode: ODEOptions | Mapping[str, Any] | None = None,
        process_group: Any = None,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"OCNOpt needs the model (nn.Module) first, got {type(model).__name__}")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")
        for name, v in (("factor_update_freq", factor_update_freq), ("update_freq", update_freq)):
            check(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "int >= 1")
        _check_batch_dim(batch_dim)
        if information not in INFORMATION:
            raise ValueError(f"unknown information {information!r}; valid: "
                             f"{', '.join(INFORMATION)}")
        if graft not in GRAFTS or (graft is not None and curvature not in KRONECKER):
            raise ValueError(f"invalid graft={graft!r}: allowed are None, or 'adam' with a "
                             "Kronecker curvature ('kfac', 'ekfac')")
        own = {**COMMON_DEFAULTS, **curvature_defaults(curvature, graft)}
        for key in hyperparameters:
            if key not in ALL_KEYS:
                raise TypeError(f"OCNOpt got an unexpected keyword argument {key!r}")
            if key not in own:
                what = f"curvature={curvature!r}" + (f", graft={graft!r}" if graft else "")
                raise ValueError(f"{key!r} is not a setting of {what}; it takes: "
                                 f"{', '.join(sorted(own))}")
        defaults = {**own, **hyperparameters, "lr": lr, "feedback_scale": feedback_scale}
        self.model = model
        self.curvature = curvature
        self.feedback = bool(feedback)
        self.factor_update_freq = factor_update_freq
        self.update_freq = update_freq
        check("early_refresh", early_refresh, isinstance(early_refresh, bool), "True or False")
        self.early_refresh = early_refresh
        self.batch_dim = batch_dim
        self.graft = graft
        self.information = information
        self._game = GameFeedback(model, (), information, partial(_batch_dim_of, batch_dim))
        self._rule = _BASE_RULE[curvature]
        self._kron = KRONECKER.get(curvature)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._initialised = False
        super().__init__(params, defaults)
        self._counters: dict[str, Any] = {
            "step": 0, "skipped_steps": 0, "skip_reasons": Counter(), "nonfinite_feedback": 0,
            "eigh_failures": 0}
        self._skip_burst = 0
        self._warned: set[str] = set()
        self._records: dict[nn.Module, LayerRecord] = {}
        self._txn: StepTransaction | None = None
        self._feedback_left = 0
        self._step_game: GameFeedback | None = None
        self._nonfinite_s: list[Tensor] = []
        self._stats: ForwardCapture | None = None
        self._atomic = True  # measurement-only switch (see ocnopt.bench.speed)
        self._ode = ODEDriver(model, ODEOptions.of(ode), self._kron is not None)
        self._ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self._comm = Communicator(find_process_group(model, process_group))
        if self._comm.active and information == "cooperative" and feedback:
            warnings.warn("information='cooperative' on several ranks: each rank solves its "
                          "groups' joint stage model over its own samples (the cross-rank "
                          "sample pairs of the Gram matrices are left out); 'nash' and "
                          "'markov' are exact", RuntimeWarning, stacklevel=2)
        self._after_ode: set[nn.Module] = set()
        self._check_model()
        self._build_layers()
        self._initialised = True

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for p in param_group["params"] if isinstance(param_group.get("params"), (list, tuple)) \
                else []:
            self._check_param(p)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            extra = set(group) - set(self.defaults) - {"params", "param_names"}
            if extra:
                raise ValueError(f"param group keys {sorted(extra)} are not settings of "
                                 f"curvature={self.curvature!r}")
            coerce_group(group)
            validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        if self._initialised:
            self._build_layers()

    @staticmethod
    def _check_param(p: Any) -> None:
        if isinstance(p, Tensor) and p.is_complex():
            raise ValueError("OCNOpt does not support complex parameters (the curvatures and "
                             "the feedback assume real ones); view them as real with "
                             "torch.view_as_real or keep them in a torch.optim optimizer")

    def _check_model(self) -> None:
        """Refuse what cannot be trained correctly, before anything moves."""
        optimized = {p for g in self.param_groups for p in g["params"]}
        for name, m in self.model.named_modules():
            if getattr(m, "sparse", False) is True and getattr(m, "weight", None) in optimized:
                raise ValueError(f"module {name!r} produces sparse gradients (sparse=True), which "
                                 "OCNOpt does not support; construct it with sparse=False")
        if self.feedback and hasattr(self.model, "_orig_mod"):
            raise ValueError("torch.compile(model) with feedback=True is not supported: the "
                             "feedback pass hooks every layer between compiled regions; pass "
                             "the uncompiled model (compile its submodules instead) or use "
                             "feedback=False")
        if self.feedback and isinstance(self.batch_dim, int) and self.batch_dim == 0:
            seq_first = [n for n, m in self.model.named_modules()
                         if getattr(m, "batch_first", True) is False]
            if seq_first:
                self._warn_once("batch_first", "modules with batch_first=False: "
                                + ", ".join(seq_first) + "; their layer inputs are "
                                "(sequence, batch, ...) but the feedback takes dim 0 as the "
                                "sample axis: pass batch_dim (e.g. {'<encoder name>': 1})",
                                stacklevel=4)

    def _build_layers(self) -> None:
        group_of: dict[Tensor, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                group_of[p] = group
        names = {p: n for n, p in self.model.named_parameters()}
        unknown = [p for p in group_of if p not in names]
        if unknown:
            raise ValueError(f"{len(unknown)} optimized parameter(s) do not belong to the model")
        # parameters of two distinct modules (weight tying), not a module registered twice
        uses = Counter(id(p) for m in self.model.modules() for p in m.parameters(recurse=False))
        functional_owners = {id(m) for mha in self.model.modules()
                             if isinstance(mha, nn.MultiheadAttention) for m in mha.children()}
        self._layers: dict[nn.Module, _Layer] = {}
        self._ode_layers: dict[nn.Module, _Layer] = {}  # inside ODE fields: open loop only
        unsupported: list[str] = []
        for mname, module in self.model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or weight not in group_of:
                continue
            bias = getattr(module, "bias", None)
            train_bias = isinstance(bias, Tensor) and bias in group_of and bias.requires_grad
            label = mname or type(module).__name__
            in_ode = module in self._ode.candidates  # ODE states are batch-first
            helper, reason = helper_for(module, train_bias,
                                        0 if in_ode else _batch_dim_of(self.batch_dim, mname))
            if helper is None:
                if isinstance(module, (nn.Linear, nn.Conv2d)) or "Conv" in type(module).__name__:
                    unsupported.append(f"{label} ({reason})")
                continue
            if not weight.requires_grad:
                continue
            if id(module) in functional_owners:
                unsupported.append(f"{label} (its weights are used functionally by "
                                   "nn.MultiheadAttention; its forward never runs)")
                continue
            if any(uses[id(t)] > 1 for t in (weight, bias) if isinstance(t, Tensor)):
                unsupported.append(f"{label} (its parameters are shared with another module)")
                continue
            bgroup = group_of[bias] if train_bias else None
            wgroup = group_of[weight]
            if bgroup is not None and bgroup["maximize"] != wgroup["maximize"]:
                raise ValueError(f"layer {label!r}: weight and bias must agree on maximize")
            (self._ode_layers if in_ode else self._layers)[module] = _Layer(label, helper, wgroup,
                                                                            bgroup)
        self._layer_of = {t: lay for lay in (*self._layers.values(), *self._ode_layers.values())
                          for t in lay.params}
        self._layer_params = set(self._layer_of)
        self._other_params = [p for p in group_of if p not in self._layer_params]
        self._group_of = group_of
        self._param_names = names
        self._bn_buffers = batchnorm_buffers(self.model)
        self._devices = sorted({p.device.index or 0 for p in group_of if p.device.type == "cuda"})
        if unsupported:
            self._warn_once("unsupported", "modules without the Kronecker/feedback path: "
                            + "; ".join(unsupported), stacklevel=4)
        kron = self._kron is not None
        if self._other_params and (kron or self.feedback):
            how = " and ".join(s for s, on in (
                ("use the adam-style diagonal curvature (fallback_lr)", kron),
                ("get open-loop updates (no layer-wise feedback)", self.feedback)) if on)
            listed = ", ".join(names[p] for p in self._other_params)
            self._warn_once("fallback", f"parameters outside supported Linear/Conv2d layers {how}:"
                            f" {listed}", stacklevel=4)
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if kron and self._layers:  # statistics for the classic backward(); step() loop
            self._stats = ForwardCapture(self._layers, input_grads=False,
                                         global_hooks=True).__enter__()
            self._stats.active = any(self._factors_due(lay) for lay in self._layers.values())
            self._finalizer = weakref.finalize(self, self._stats.close)
        self._ode.use({m: lay.helper for m, lay in self._ode_layers.items()})
        self._ode.arm(self._ode_due())  # the classic loop's collector (see ocnopt.ode.driver)
        if self._ode_layers and getattr(self, "_ode_finalizer", None) is None:
            self._ode_finalizer = weakref.finalize(self, self._ode.disarm)

    def close(self) -> None:
        """Remove the statistics hooks of the classic loop (kfac/ekfac) and disarm its ODE
        factor collection; idempotent."""
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        self._ode.disarm()

    def _warn_once(self, key: str, msg: str, stacklevel: int = 3) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)

    # ------------------------------------------------------------------ public helpers
    @property
    def num_steps(self) -> int:
        """Number of applied (not skipped) steps."""
        return int(self._counters["step"])

    @property
    def skipped_steps(self) -> int:
        """Number of skipped steps (all reasons; see :attr:`skip_reasons`)."""
        return int(self._counters["skipped_steps"])

    @property
    def skip_reasons(self) -> dict[str, int]:
        """Skipped steps per reason: ``nonfinite_loss``, ``nonfinite_gradient``,
        ``nonfinite_factor``, ``nonfinite_update`` (a new parameter or state entry),
        ``exception`` (the closure raised), ``grad_scaler`` (the AMP scaler found inf)."""
        return dict(self._counters["skip_reasons"])

    @property
    def diagnostics(self) -> dict[str, Any]:
        """Counters: applied/skipped steps, skip reasons, non-finite feedback terms replaced
        by 0, failed eigendecompositions."""
        c = dict(self._counters)
        c["skip_reasons"] = dict(c["skip_reasons"])
        return c

    @property
    def layer_names(self) -> list[str]:
        """Names of the modules that get feedback / Kronecker curvature, in registration order."""
        return [lay.name for lay in self._layers.values()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._stats is not None:
            self._stats.reset()
        self._ode.zero_grad()

    # ------------------------------------------------------------------ schedules
    def _factors_due(self, lay: _Layer) -> bool:
        st = self.state.get(lay.helper.weight, {})
        k = st.get("kron_step", 0)
        return k % self.factor_update_freq == 0 or refresh_due(
            k, self.update_freq, "in_vectors" in st, self.early_refresh)

    def _ode_due(self) -> list[nn.Module]:
        """The ODE layers whose time-integrated factors the next step collects."""
        if self._kron is None:
            return []
        return [m for m, lay in self._ode_layers.items() if self._factors_due(lay)]

    # ------------------------------------------------------------------ step
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, grad_scaler: Any = None
    ) -> Any:
        """Perform one optimization step; returns the (first-pass) loss of ``closure``.

        ``grad_scaler`` is passed by ``torch.amp.GradScaler.step`` (do not pass it yourself).
        """
        if closure is None:
            return self._classic_step(grad_scaler)
        return self._closure_step(closure, grad_scaler)

    # ..................................................................... classic loop
    def _classic_step(self, scaler: Any) -> None:
        grads = {p: p.grad for p in self._group_of if p.grad is not None}
        if not grads:
            return None
        if any(g.is_sparse for g in grads.values()):
            raise ValueError("OCNOpt does not support sparse gradients (nothing was updated)")
        if self.feedback and self._layers:
            self._warn_once("classic_feedback", "feedback=True needs opt.step(closure); "
                            "step() without a closure takes the open-loop step")
        inv_scale = 1.0
        if scaler is not None:
            found = scaler._found_inf_per_device(self)
            if not found:
                scaler.unscale_(self)  # unscales p.grad in place, records its inf checks
                found = scaler._found_inf_per_device(self)
            if not self._comm.all_true(not sum(float(v) for v in found.values())):
                self._skip("grad_scaler")
                self._end_step()  # this batch's statistics must not reach the next step
                return None
            inv_scale = 1.0 / float(scaler.get_scale())
        records = ({m: r for m, r in self._stats.records.items() if r.calls}
                   if self._stats is not None else {})
        ode_factors = self._ode.take()
        txn = StepTransaction(atomic=self._atomic)
        try:
            with torch.no_grad():
                if self._comm.active and self._ddp is None:  # DDP averaged them already
                    for p in self._group_of:
                        if p.requires_grad and p not in grads:
                            grads[p] = torch.zeros_like(p)
                    self._comm.mean_([grads[p] for p in self._group_of if p in grads],
                                     "gradients")
                if not self._comm.all_true(not self._atomic or all_finite(grads.values())):
                    raise _Skip("nonfinite_gradient")
                self._update_curvature(records, txn, inv_scale)
                self._update_ode_curvature(ode_factors, txn, inv_scale)
                if not self._comm.all_true(txn.all_finite()):
                    raise _Skip("nonfinite_factor")
                self._refresh([*records, *ode_factors], txn)
                self._ode.observe(grads, inv_scale, txn)
                self._open_loop(grads, self._other_params + list(self._layer_params), txn)
                self._ode.update_t1()
                if not self._comm.all_true(txn.all_finite()):
                    raise _Skip("nonfinite_update")
                self._commit(txn)
        except _Skip as skip:
            txn.rollback()
            self._skip(skip.reason)
        except BaseException:
            txn.rollback()
            self._count_skip("exception")
            raise
        finally:
            self._end_step()
        return None

    # ..................................................................... closure loop
    def _closure_step(self, closure: Callable[[], Any], scaler: Any) -> Any:
        feedback = self.feedback and bool(self._layers)
        due = [m for m, lay in self._layers.items() if self._kron and self._factors_due(lay)]
        ode_due = self._ode_due()
        watch = list(self._layers) if (feedback or due) else []
        rng = _RngReplay(self._devices) if feedback else None
        txn = StepTransaction(self._bn_buffers, self._atomic)
        self._txn = txn
        if self._stats is not None:
            self._stats.active = False
        loss: Any = None
        try:
            with self._ode.first_pass(ode_due, watch if feedback else []) as ode, \
                    self._no_sync():
                first = self._first_pass(closure, watch, feedback, scaler)
            loss = first.loss
            inv_scale = 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0
            with torch.no_grad():
                self._check_first_pass(first)
                self._reduce_grads(first, feedback)
                self._update_curvature({m: first.records[m] for m in due if m in first.records},
                                       txn, 1.0)
                self._update_ode_curvature(ode.factors, txn, inv_scale)
                if not self._comm.all_true(txn.all_finite()):
                    raise _Skip("nonfinite_factor")
                self._refresh([*due, *ode.factors], txn)
                self._ode.observe(first.param_grads, inv_scale, txn)
                if feedback:
                    self._after_ode = ode.after
                    self._feedback_step(closure, first, rng, txn)
                else:
                    self._open_loop(first.param_grads, list(self._group_of), txn)
                self._ode.update_t1()
                if not self._comm.all_true(txn.all_finite()):
                    raise _Skip("nonfinite_update")
                if scaler is not None:
                    self._record_scaler_inf(scaler, False)
                self._commit(txn)
        except _Skip as skip:
            txn.rollback()
            reason = skip.reason
            if scaler is not None and reason != "nonfinite_update":
                self._record_scaler_inf(scaler, True)
                reason = "grad_scaler"  # routine under AMP: the scaler lowers its scale
            self._skip(reason)
        except BaseException:
            txn.rollback()
            self._count_skip("exception")
            raise
        finally:
            self._end_step()
        return loss.detach() if isinstance(loss, Tensor) else loss

    def _check_first_pass(self, first: _FirstPass) -> None:
        """Skip the step on a non-finite loss or first-pass gradient (nothing has moved yet)."""
        if not self._atomic:
            return
        loss = first.loss
        reason = None
        captured = [g for rec in first.records.values() for g in rec.grads + rec.input_grads
                    if g is not None] + (first.game.partials() if first.game is not None else [])
        if not all_finite([loss if isinstance(loss, Tensor) else torch.tensor(float(loss))]):
            reason = "nonfinite_loss"
        elif not all_finite([*first.param_grads.values(), *captured]):
            reason = "nonfinite_gradient"
        if not self._comm.all_true(reason is None):  # every rank skips together
            raise _Skip(reason or "nonfinite_on_another_rank")

    @contextmanager
    def _no_sync(self) -> Iterator[None]:
        """DDP's gradient reduction off: OCNOpt reduces what it needs itself."""
        with self._ddp.no_sync() if self._ddp is not None else nullcontext():
            yield

    def _reduce_grads(self, first: _FirstPass, feedback: bool) -> None:
        """Average the first pass's open-loop gradients (and dL/dt1) across ranks: every
        non-feedback parameter, with zeros where a rank has none (as DDP does)."""
        if not self._comm.active:
            return
        skip = {p for m, r in first.records.items() if feedback and m in self._layers
                and r.calls == 1 for p in self._layers[m].params}
        for leaf in self._ode.t1_targets():
            if leaf not in first.param_grads and leaf.grad is not None:
                first.param_grads[leaf] = leaf.grad
        order = [p for p in (*self._group_of, *self._ode.t1_targets())
                 if p.requires_grad and p not in skip]
        for p in order:
            if p not in first.param_grads:
                first.param_grads[p] = torch.zeros_like(p)
        self._comm.mean_([first.param_grads[p] for p in order], "gradients")

    def _end_step(self) -> None:
        self._game.release()
        self._step_game = None
        self._records = {}
        self._txn = None
        self._nonfinite_s = []
        if self._stats is not None:
            self._stats.reset()
            self._stats.active = any(self._factors_due(lay) for lay in self._layers.values())
        self._after_ode = set()
        self._ode.end_step()
        self._ode.arm(self._ode_due())

    def _grad_signature(self) -> list[Any]:
        """The current ``.grad`` objects (held, so their ids cannot be reused) and versions."""
        return [(p.grad, p.grad._version) if p.grad is not None else None
                for p in self._group_of]

    def _first_pass(
        self, closure: Callable[[], Any], watch: list[nn.Module], feedback: bool, scaler: Any
    ) -> _FirstPass:
        """Run the closure with gradients on and collect everything the step needs."""
        before = self._grad_signature()
        scale = 1.0
        if scaler is not None:
            if scaler._per_optimizer_states[id(self)]["found_inf_per_device"]:
                raise RuntimeError("do not call scaler.unscale_(optimizer) inside or before a "
                                   "closure step: OCNOpt unscales itself (clip with "
                                   "max_grad_norm)")
            scale = float(scaler.get_scale())
        game = self._game if feedback else None
        if game is not None:
            game.layers = set(watch)
        with ForwardCapture(watch, input_grads=feedback) as cap, torch.enable_grad():
            with game.record() if game is not None else nullcontext():
                out = closure()  # a backward() in here runs inside game.collect()
            after = self._grad_signature()
            user_backward = cap.fired or any(
                a is not b and (a is None or b is None or a[0] is not b[0] or a[1] != b[1])
                for a, b in zip(before, after, strict=True))
            if user_backward:  # torch convention: the closure called loss.backward()
                param_grads = {p: p.grad for p in self._group_of if p.grad is not None}
            else:
                loss = self._loss_tensor(out)
                targets, roles = self._grad_targets(cap.records, feedback)
                scaled = loss * scale if scale != 1.0 else loss
                with _collecting(game, loss):
                    grads = (torch.autograd.grad(scaled, targets, allow_unused=True) if targets
                             else ())
                param_grads = {t: g for t, r, g in zip(targets, roles, grads, strict=True)
                               if r == "param" and g is not None}
        del before, after
        if any(g.is_sparse for g in param_grads.values()):
            raise ValueError("OCNOpt does not support sparse gradients (nothing was updated)")
        records = {m: r for m, r in cap.records.items() if r.calls}
        if game is not None and (game.plan is None or game.broken is not None):
            reason = game.broken or "the closure ran backward() where OCNOpt could not hook it"
            self._warn_once(f"game:{reason}", f"game feedback unavailable for this step "
                            f"({reason}): each layer's feedback uses its own input with the total "
                            "gradient (the Markovian step)", stacklevel=5)
            game = None
        if scale != 1.0:
            inv = 1.0 / scale
            param_grads = {p: g * inv for p, g in param_grads.items()}
            for rec in records.values():
                rec.grads = [None if g is None else g * inv for g in rec.grads]
                rec.input_grads = [None if g is None else g * inv for g in rec.input_grads]
            if game is not None:
                game.unscale(inv)
        return _FirstPass(out, param_grads, records, game)

    @staticmethod
    def _loss_tensor(out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the closure returned {type(out).__name__} without calling backward(): return "
                "the scalar batch-mean loss tensor (OCNOpt differentiates it), or call "
                "loss.backward() inside the closure (torch convention)")
        if out.numel() != 1:
            raise ValueError(f"the closure must return the scalar batch-mean loss; got shape "
                             f"{tuple(out.shape)}")
        if not out.requires_grad:
            raise ValueError("the closure returned a loss that does not require grad (detached, "
                             "or computed under torch.no_grad()): OCNOpt cannot differentiate it")
        return out

    def _grad_targets(
        self, records: dict[nn.Module, LayerRecord], feedback: bool
    ) -> tuple[list[Tensor], list[str]]:
        """Tensors to differentiate in the first pass, and their roles.

        ``param``: parameters updated open loop from their gradient. ``flow``: layer inputs (or,
        for a data input, the cheapest parameter of the layer) requested only so that the
        backward reaches every layer and fires its gradient hooks.
        """
        # dL/dt1 of learn_t1 blocks: read by the ODE driver, in no param group
        t1 = self._ode.t1_targets()
        if not feedback:
            ps = [p for p in self._group_of if p.requires_grad] + t1
            return ps, ["param"] * len(ps)
        targets: list[Tensor] = [p for p in self._other_params if p.requires_grad] + t1
        targets += [p for lay in self._ode_layers.values() for p in lay.params]
        roles = ["param"] * len(targets)
        seen: set[int] = set()
        for m, lay in self._layers.items():
            rec = records[m]
            if rec.calls != 1:  # not run (weights used elsewhere?) or run several times
                targets += lay.params
                roles += ["param"] * len(lay.params)
                continue
            x = rec.inputs[0]
            flow = x if x.requires_grad else lay.params[-1]
            if id(flow) not in seen:
                seen.add(id(flow))
                targets.append(flow)
                roles.append("flow")
        return targets, roles

    def _record_scaler_inf(self, scaler: Any, found: bool) -> None:
        """Tell the AMP scaler whether this closure step found inf/NaN (it backs off on it)."""
        dev = next(iter(self._group_of)).device
        state = scaler._per_optimizer_states[id(self)]
        state["found_inf_per_device"] = {dev: torch.full((), float(found), device=dev)}

    # ..................................................................... skipping
    def _count_skip(self, reason: str) -> None:
        self._counters["skipped_steps"] += 1
        self._counters["skip_reasons"][reason] += 1

    def _skip(self, reason: str) -> None:
        """Count a skipped step; warn at the start of a burst and every SKIP_WARN_EVERY skips."""
        self._count_skip(reason)
        if reason == "grad_scaler":  # routine under AMP: the scaler lowers its scale
            return
        self._skip_burst += 1
        if self._skip_burst == 1 or self._skip_burst % SKIP_WARN_EVERY == 0:
            c = self._counters
            msg = (f"OCNOpt: step skipped ({reason.replace('_', ' ')}) at step {c['step']}: "
                   f"parameters and optimizer state unchanged; {c['skipped_steps']} skipped so "
                   f"far, {self._skip_burst} in a row")
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            log.info(msg)  # the RuntimeWarning is the user-facing channel

    def _commit(self, txn: StepTransaction) -> None:
        txn.commit(self.state)
        if self._nonfinite_s:
            n = int(torch.stack(self._nonfinite_s).sum())
            if n:
                self._counters["nonfinite_feedback"] += n
                self._warn_once("nonfinite_feedback", "non-finite feedback terms s_i were "
                                "replaced by 0 (those samples got the open-loop weight); "
                                "see opt.diagnostics['nonfinite_feedback']", stacklevel=4)
        self._counters["step"] += 1
        self._skip_burst = 0

    # ------------------------------------------------------------------ feedback pass
    def _feedback_step(
        self, closure: Callable[[], Any], first: _FirstPass, rng: _RngReplay | None,
        txn: StepTransaction,
    ) -> None:
        records = first.records
        open_params = list(self._other_params) + [p for lay in self._ode_layers.values()
                                                  for p in lay.params]
        single: list[nn.Module] = []
        after_ode: list[nn.Module] = []  # open loop: the second pass stops before ODE blocks
        for m, lay in self._layers.items():
            rec = records.get(m)
            if rec is None or rec.calls != 1:
                if rec is not None:
                    self._warn_once(f"multi:{lay.name}",
                                    f"layer {lay.name!r} ran {rec.calls} times in one forward; "
                                    "it gets the open-loop update (no feedback)")
                elif any(p in first.param_grads for p in lay.params):
                    self._warn_once(f"functional:{lay.name}",
                                    f"layer {lay.name!r} has gradients but its forward never ran "
                                    "(weights used functionally?); it gets the open-loop update")
                open_params += lay.params
            elif rec.grads[0] is not None:
                (after_ode if m in self._after_ode else single).append(m)
        self._open_loop(first.param_grads, open_params, txn)
        for m in after_ode:
            rec = records[m]
            dw, db = self._direction(self._layers[m], rec.inputs[0], rec.grads[0], None)  # type: ignore[arg-type]
            self._apply_layer(self._layers[m], dw, db, txn)
        self._records = records
        self._feedback_left = len(single)
        self._step_game = first.game
        if single:
            assert rng is not None
            observe = first.game.observe(single) if first.game is not None else nullcontext()
            with FeedbackPass(self._bn_buffers, single, self._feedback_input), observe, \
                    rng.replay(), self._no_sync():
                closure()
        for m in single:
            rec = records[m]
            if not rec.visited:
                lay = self._layers[m]
                self._warn_once(f"unvisited:{lay.name}", f"layer {lay.name!r} did not run in "
                                "the feedback pass; it gets the open-loop update")
                dw, db = self._direction(lay, rec.inputs[0], rec.grads[0], None)  # type: ignore[arg-type]
                self._apply_layer(lay, dw, db, txn)

    def _direction(self, lay: _Layer, x: Tensor, g: Tensor, w: Tensor | None
                   ) -> tuple[Tensor, Tensor | None]:
        """The layer's (re-weighted) weight gradient, averaged across ranks."""
        dw, db = lay.helper.weight_grad(x, g, w)
        self._comm.mean_([dw] if db is None else [dw, db], "directions")
        return dw, db

    def _feedback_input(self, module: nn.Module, x_hat: Tensor) -> bool:
        """Update ``module`` (with its cooperative group, if it leads one) from its second-pass
        input; True once every layer is updated."""
        rec = self._records.get(module)
        if rec is None or rec.calls != 1 or rec.visited or rec.grads[0] is None:
            return False
        game = self._step_game
        members = (game.group(module) if game is not None else ()) or (module,)
        lay = self._layers[module]
        x, g, p = rec.inputs[0], rec.grads[0], rec.input_grads[0]
        for m in members:
            r = self._records[m]
            if r.inputs[0]._version != r.versions[0]:
                raise RuntimeError(f"the input of layer {self._layers[m].name!r} was modified in "
                                   "place after the layer ran; the feedback needs the first-pass "
                                   "input")
        if (game is not None or p is not None) and x_hat.shape != x.shape:
            raise RuntimeError(
                f"layer {lay.name!r}: input shape {tuple(x_hat.shape)} in the feedback pass "
                f"differs from {tuple(x.shape)}; the closure must re-evaluate the same batch")
        if game is not None:
            s = game.feedback(module, x_hat)
        else:
            s = None if p is None else feedback_terms([p], [x_hat - x], lay.helper.batch_dim)
        assert self._txn is not None
        if len(members) > 1:
            self._decide_group(members, s, self._txn)
        else:
            w = None if s is None else self._sample_weights(lay, s, x)
            dw, db = self._direction(lay, x, g, w)  # type: ignore[arg-type]
            self._apply_layer(lay, dw, db, self._txn)
        for m in members:
            self._records[m].visited = True
        self._feedback_left -= len(members)
        return self._feedback_left == 0

    def _feedback_gain(self, lay: _Layer) -> tuple[float, float]:
        """``(sign * feedback_scale, momentum-gain correction)`` of a layer's feedback terms."""
        group = lay.wgroup
        gain = momentum_gain_correction("adam" if self.graft else self._rule,
                                        group.get("momentum", 0.0), group.get("dampening", 0.0))
        return (-1.0 if group["maximize"] else 1.0) * group["feedback_scale"], gain

    def _sample_weights(self, lay: _Layer, s: Tensor, x: Tensor) -> Tensor:
        """``1 + clip(sign * beta * gain * B * s)`` (non-finite terms counted and zeroed)."""
        beta, gain = self._feedback_gain(lay)
        w, bad = sample_weights(s, scale=beta * gain * lay.helper.batch_size(x),
                                clip=lay.wgroup["feedback_clip"])
        self._nonfinite_s.append(bad)
        return w

    def _decide_group(self, members: tuple[nn.Module, ...], s: Tensor | None,
                      txn: StepTransaction) -> None:
        """A cooperative group decides at its first member: joint sample weights, then every
        member is updated; the effect of each later member's applied change is reported to the
        game (the players running in between see it as feedback)."""
        game = self._step_game
        assert game is not None
        lays = [self._layers[m] for m in members]
        recs = [self._records[m] for m in members]
        x = recs[0].inputs[0]
        weights = self._joint_weights(members, lays, recs, s, txn)
        if weights is None:  # lone weights (no cross terms)
            weights = [None if s is None else self._sample_weights(lay, s, x) for lay in lays]
        for k, (m, lay, rec, w) in enumerate(zip(members, lays, recs, weights, strict=True)):
            before = [q.detach().clone() for q in lay.params] if k else []
            dw, db = self._direction(lay, rec.inputs[0], rec.grads[0], w)  # type: ignore[arg-type]
            self._apply_layer(lay, dw, db, txn)
            if k:
                change = [q.detach() - b for q, b in zip(lay.params, before, strict=True)]
                game.report_update(m, update_effect(m, rec.inputs[0], rec.grads[0],  # type: ignore[arg-type]
                                                    change[0], change[1] if len(change) > 1
                                                    else None))

    def _joint_weights(self, members: tuple[nn.Module, ...], lays: list[_Layer],
                       recs: list[LayerRecord], s: Tensor | None, txn: StepTransaction
                       ) -> list[Tensor] | None:
        """Sample weights of a cooperative group's joint minimiser, or None where its cross
        terms are left out: ``feedback_scale`` 0, members with different feedback settings or
        a sample axis other than 0, Adam grafting, no curvature state yet (RMSprop/Adam before
        their first step), or a stage model that is not positive definite (warned)."""
        beta, gain = self._feedback_gain(lays[0])
        clip = lays[0].wgroup["feedback_clip"]
        if beta == 0 or self.graft is not None or not all(
                self._feedback_gain(lay) == (beta, gain) and lay.wgroup["feedback_clip"] == clip
                and lay.helper.batch_dim == 0 for lay in lays):
            return None
        models = [step_model(self.curvature, lay.helper,
                             (txn.view(lay.helper.weight, self.state),
                              None if lay.helper.bias is None else
                              txn.view(lay.helper.bias, self.state)),
                             (lay.wgroup, lay.bgroup), self._kron) for lay in lays]
        if any(m is None for m in models):
            return None
        weight = lays[0].helper.weight
        batch = recs[0].inputs[0].shape[0]
        bad0 = None
        if s is None:
            w0 = torch.ones(batch, dtype=weight.dtype, device=weight.device)
        else:  # momentum-free stage model: the gain correction applies to the result
            w0, bad0 = sample_weights(s.to(weight.dtype), scale=beta * batch, clip=None)
        joint, ok = cooperative_weights(
            [Member(m, lay.helper, r.inputs[0], r.grads[0], sm)  # type: ignore[arg-type]
             for m, lay, r, sm in zip(members, lays, recs, models, strict=True)],
            w0, abs(beta), maximize=beta < 0)
        if not ok:
            names = ", ".join(lay.name for lay in lays)
            self._warn_once(f"coop:{names}", f"cooperative group ({names}): the stage's joint "
                            "quadratic model is not positive definite; its cross terms are "
                            "dropped at such steps", stacklevel=7)
            return None
        if bad0 is not None:
            self._nonfinite_s.append(bad0)
        weights = []
        for w in joint:
            w, bad = sample_weights(w - 1, scale=gain, clip=clip)
            self._nonfinite_s.append(bad)
            weights.append(w)
        return weights

    # ------------------------------------------------------------------ updates
    def _open_loop(self, grads: Mapping[Tensor, Tensor], params: list[Tensor],
                   txn: StepTransaction) -> None:
        """Open-loop updates of ``params`` from their loss gradients (layers as a whole; the
        other parameters per param group, in one foreach sweep unless ``foreach=False``)."""
        wanted = set(params)
        for lay in (*self._layers.values(), *self._ode_layers.values()):
            w, b = lay.helper.weight, lay.helper.bias
            if w in wanted and w in grads:
                self._apply_layer(lay, grads[w], grads.get(b) if b is not None else None, txn)
        by_group: dict[int, list[Tensor]] = {}
        for p in params:
            if p not in self._layer_params and p in grads:
                by_group.setdefault(id(self._group_of[p]), []).append(p)
        for ps in by_group.values():
            group = self._group_of[ps[0]]
            ds = []
            for p in ps:
                txn.set_grad(p, grads[p])
                ds.append(_clip(-grads[p] if group["maximize"] else grads[p],
                                group["max_grad_norm"]))
            if group["foreach"] is False:
                for p, d in zip(ps, ds, strict=True):
                    self._rule_update([p], [d], txn, self._kron is not None)
            else:
                self._rule_update(ps, ds, txn, self._kron is not None)

    def _rule_update(self, ps: list[Tensor], ds: list[Tensor], txn: StepTransaction,
                     fallback: bool) -> None:
        """Apply the per-tensor rule to parameters ``ps`` of ONE param group with descent
        directions ``ds``."""
        group = self._group_of[ps[0]]
        views = [txn.view(p, self.state) for p in ps]
        for p in ps:
            txn.touch(p)
        if fallback:  # parameters outside Kronecker layers: Adam
            lr = group["fallback_lr"] if group["fallback_lr"] is not None else group["lr"]
            new = adam_update(ps, ds, views, lr=lr,
                              betas=group.get("fallback_betas", group.get("betas")),
                              eps=group.get("fallback_eps", group.get("eps")),
                              weight_decay=group["weight_decay"], amsgrad=False,
                              decoupled_weight_decay=False)
        elif self._rule == "sgd":
            new = sgd_update(ps, ds, views, lr=group["lr"], momentum=group["momentum"],
                             dampening=group["dampening"], nesterov=group["nesterov"],
                             weight_decay=group["weight_decay"])
        elif self._rule == "rmsprop":
            new = rmsprop_update(ps, ds, views, lr=group["lr"], alpha=group["alpha"],
                                 eps=group["eps"], weight_decay=group["weight_decay"],
                                 momentum=group["momentum"], centered=group["centered"])
        else:
            new = adam_update(ps, ds, views, lr=group["lr"], betas=group["betas"],
                              eps=group["eps"], weight_decay=group["weight_decay"],
                              amsgrad=group["amsgrad"],
                              decoupled_weight_decay=group["decoupled_weight_decay"])
        for p, entries in zip(ps, new, strict=True):
            txn.stage(p, entries)

    def _apply_layer(self, lay: _Layer, dw: Tensor, db: Tensor | None,
                     txn: StepTransaction) -> None:
        """Update one layer from its loss-gradient direction (weight- and bias-shaped)."""
        helper = lay.helper
        w, b = helper.weight, helper.bias
        wg, bg = lay.wgroup, lay.bgroup
        txn.set_grad(w, dw)
        if b is not None and db is not None:
            txn.set_grad(b, db)
        if wg["maximize"]:
            dw, db = -dw, (None if db is None else -db)
        if wg["max_grad_norm"] is not None:
            dw, db = _clip_pair(dw, db, wg["max_grad_norm"])
        if self._kron is None:
            self._rule_update([w], [dw], txn, fallback=False)
            if b is not None and db is not None:
                self._rule_update([b], [db], txn, fallback=False)
            return
        if wg["weight_decay"] != 0:
            dw = dw.add(w, alpha=wg["weight_decay"])
        if b is not None and db is not None and bg is not None and bg["weight_decay"] != 0:
            db = db.add(b, alpha=bg["weight_decay"])
        view = txn.view(w, self.state)
        pm, entries = self._kron.precondition(view, helper.to_matrix(dw, db), wg)
        entries["kron_step"] = view.get("kron_step", 0) + 1
        txn.stage(w, entries)
        if self.graft is not None:
            self._graft_update(lay, [dw] if db is None else [dw, db], pm, txn)
            return
        pw, pb = helper.from_matrix(pm)
        for p, d, g in ((w, pw, wg), (b, pb, bg)):
            if p is None or d is None or g is None:
                continue
            txn.touch(p)
            txn.stage(p, momentum_update([p], [d], [txn.view(p, self.state)], lr=g["lr"],
                                         momentum=g["momentum"], dampening=g["dampening"],
                                         nesterov=g["nesterov"])[0])

    def _graft_update(self, lay: _Layer, ds: list[Tensor], pm: Tensor,
                      txn: StepTransaction) -> None:
        """Adam grafting: ``pm`` rescaled to the norm of Adam's normalised direction of the
        layer's directions ``ds`` (weight[, bias]), then Adam's first-moment update."""
        params = lay.params[:len(ds)]
        groups = [lay.wgroup, lay.bgroup if lay.bgroup is not None else lay.wgroup][:len(ds)]
        views = [txn.view(p, self.state) for p in params]
        normed, second = [], []
        for d, g, v in zip(ds, groups, views, strict=True):
            n, st = rms_normalize([d], [v], beta2=g["betas"][1], eps=g["eps"])
            normed += n
            second += st
        target = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(n)
                                                      for n in normed]))
        pm = pm * (target / torch.linalg.vector_norm(pm).clamp_min(1e-30))
        directions = lay.helper.from_matrix(pm)
        for p, d, g, v, st in zip(params, directions, groups, views, second, strict=False):
            txn.touch(p)
            txn.stage(p, st)
            txn.stage(p, ema_update([p], [d], [v], [st["step"]], lr=g["lr"],
                                    beta1=g["betas"][0])[0])

    # ------------------------------------------------------------------ curvature
    def _update_curvature(self, records: Mapping[nn.Module, LayerRecord], txn: StepTransaction,
                          inv_scale: float) -> None:
        """Stage new Kronecker factors for the recorded layers whose statistics are due (the
        batch factors averaged across ranks first; ``B`` is the global batch)."""
        if self._kron is None:
            return
        todo = []
        for m, rec in records.items():
            lay = self._layers[m]
            if rec.calls == 0 or any(g is None for g in rec.grads) or not self._factors_due(lay):
                continue
            batch = lay.helper.batch_size(rec.inputs[0])
            fa, rows = lay.helper.input_factor([x.detach() for x in rec.inputs])
            fg = lay.helper.output_factor(rec.grads, batch)  # type: ignore[arg-type]
            if inv_scale != 1.0:
                fg = fg.mul_(inv_scale * inv_scale)
            todo.append((lay, fa, fg, rows, batch, rec.calls))
        self._comm.mean_([f for t in todo for f in t[1:3]], "factors")
        world = self._comm.world_size
        for lay, fa, fg, rows, batch, calls in todo:
            w = lay.helper.weight
            txn.stage(w, self._kron.factor_entries(txn.view(w, self.state), fa, fg, rows * world,
                                                   batch * world, calls,
                                                   lay.wgroup["factor_decay"]))

    def _update_ode_curvature(self, factors: Mapping[nn.Module, ODEFactors],
                              txn: StepTransaction, inv_scale: float) -> None:
        """Stage new factors of ODE layers from their time-integrated statistics (collected in
        the adjoint solves; ``inv_scale`` undoes an AMP loss scale in ``G``)."""
        todo = []
        for m, fac in factors.items():
            fg = fac.G * (inv_scale * inv_scale) if inv_scale != 1.0 else fac.G.clone()
            todo.append((self._ode_layers[m], fac.A.clone(), fg, fac))
        self._comm.mean_([f for t in todo for f in t[1:3]], "factors")
        world = self._comm.world_size
        for lay, fa, fg, fac in todo:
            w = lay.helper.weight
            batch = fac.batch_size * world
            rows = round(fac.locations * batch)  # factor_entries: rows / (B * calls)
            txn.stage(w, self._kron.factor_entries(  # type: ignore[union-attr]
                txn.view(w, self.state), fa, fg, rows, batch, 1, lay.wgroup["factor_decay"]))

    def _refresh(self, modules: list[nn.Module], txn: StepTransaction) -> None:
        """Refresh the eigenbases of the layers whose refresh is due (after new factors). With
        several ranks each layer's decomposition runs on one rank (balanced by cost) and is
        broadcast."""
        assert self._kron is not None or not modules
        due = []
        for m in modules:
            lay = self._layers[m] if m in self._layers else self._ode_layers[m]
            view = txn.view(lay.helper.weight, self.state)
            if "A" in view and refresh_due(view.get("kron_step", 0), self.update_freq,
                                           "in_vectors" in view, self.early_refresh):
                due.append((lay, view))
        owners = assign_work([(i, float(v["A"].shape[0] ** 3 + v["G"].shape[0] ** 3))
                              for i, (_, v) in enumerate(due)], self._comm.world_size)
        for i, (lay, view) in enumerate(due):
            new = None
            if owners[i] == self._comm.rank:
                new, failed = self._kron.eigenbases(view, lay.wgroup["max_rank"])  # type: ignore[union-attr]
                for side in failed:
                    self._counters["eigh_failures"] += 1
                    self._warn_once(f"eigh:{lay.name}", f"layer {lay.name!r}: eigendecomposition "
                                    f"of the {side} factor failed; keeping the last good basis")
            new = self._comm.broadcast_bases(new, owners[i], view["A"], BASIS_KEYS)
            txn.stage(lay.helper.weight, self._kron.from_bases(view, new))  # type: ignore[union-attr]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        counters = self.diagnostics
        sd["ocnopt"] = {"format": _FORMAT, "curvature": self.curvature, "counters": counters,
                        "ode": self._ode.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of an OCNOpt with the same curvature and parameters.

        Everything is validated first (curvature, param-group keys and hyperparameter ranges,
        state keys and tensor shapes, the integration-time controllers of ``learn_t1`` ODE
        blocks); a ``ValueError`` leaves the optimizer unchanged.
        """
        self._validate_state_dict(state_dict)
        meta = state_dict.get("ocnopt")
        sd = {k: v for k, v in state_dict.items() if k != "ocnopt"}
        super().load_state_dict(sd)
        if meta is not None:
            c = dict(meta["counters"])
            c["skip_reasons"] = Counter(c.get("skip_reasons", {}))
            self._counters.update(c)
            if "ode" in meta:
                self._ode.load_state_dict(meta["ode"])
        self._build_layers()

    def _validate_state_dict(self, sd: Any) -> None:
        if not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd):
            raise ValueError("not an optimizer state dict (needs 'state' and 'param_groups')")
        meta = sd.get("ocnopt")
        if meta is not None:
            if not isinstance(meta, dict) or meta.get("curvature") != self.curvature:
                got = meta.get("curvature") if isinstance(meta, dict) else meta
                raise ValueError(f"state dict of an OCNOpt with curvature={got!r} cannot be "
                                 f"loaded into curvature={self.curvature!r}")
            if "ode" in meta or self._ode.controllers:
                self._ode.check_state(meta.get("ode"))
        saved = sd["param_groups"]
        if not isinstance(saved, list) or len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        ids: list[Any] = []
        for i, (old, new) in enumerate(zip(saved, self.param_groups, strict=True)):
            if not isinstance(old, dict) or len(old.get("params", ())) != len(new["params"]):
                raise ValueError(f"param group {i}: different number of parameters")
            missing = sorted(set(self.defaults) - set(old))
            if missing:
                raise ValueError(f"param group {i} lacks {', '.join(missing)}: not a state dict "
                                 f"of an OCNOpt with curvature={self.curvature!r}")
            probe = {k: v for k, v in old.items() if k != "params"}
            coerce_group(probe)
            try:
                validate_group(probe)
            except ValueError as exc:
                raise ValueError(f"param group {i} of the loaded state dict: {exc}") from exc
            ids += list(old["params"])
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params, strict=True))
        state = sd["state"]
        if not isinstance(state, dict):
            raise ValueError("'state' must be a dict keyed by parameter ids")
        for pid, entries in state.items():
            if pid not in by_id or not isinstance(entries, dict):
                raise ValueError(f"state entry {pid!r} matches no parameter")
            self._validate_param_state(by_id[pid], entries)

    def _validate_param_state(self, p: Tensor, entries: dict[str, Any]) -> None:
        name = self._param_names.get(p, "?")
        lay = self._layer_of.get(p)
        if self._kron is not None and lay is None:
            allowed = STATE_KEYS["adam"]
        elif self._kron is not None:
            allowed = STATE_KEYS["sgd" if self.graft is None else "graft"] | (
                KRONECKER_STATE_KEYS if p is lay.helper.weight else frozenset())
        else:
            allowed = STATE_KEYS[self._rule]
        extra = sorted(set(entries) - allowed)
        if extra:
            raise ValueError(f"state of {name!r} has {', '.join(extra)}, which "
                             f"curvature={self.curvature!r} does not keep there")
        for key, v in entries.items():
            if key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                       "square_avg", "grad_avg"):
                if not isinstance(v, Tensor) or v.shape != p.shape:
                    raise ValueError(f"state {key!r} of {name!r} must have the parameter's "
                                     f"shape {tuple(p.shape)}, got "
                                     f"{tuple(v.shape) if isinstance(v, Tensor) else type(v)}")
        if lay is not None and p is lay.helper.weight and "A" in entries:
            d_in = lay.helper.weight[0].numel() + int(lay.helper.has_bias)
            d_out = lay.helper.weight.shape[0]
            for key, d in (("A", d_in), ("G", d_out)):
                v = entries.get(key)
                if not isinstance(v, Tensor) or v.shape != (d, d):
                    raise ValueError(f"Kronecker factor {key} of {name!r} must be {d}x{d}")

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_stats", "_finalizer", "_txn", "_records", "_ode_finalizer"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._stats = None
        self._txn = None
        self._records = {}
        self._comm = Communicator(None)  # a copy does not communicate
        if "model" in state:
            self._build_layers()


def _collecting(game: GameFeedback | None, loss: Tensor) -> AbstractContextManager[Any]:
    """Around OCNOpt's own backward: the game's graph analysis and partial-gradient hooks."""
    if game is None:
        return nullcontext()
    game.prepare(loss)
    return game.collect()


def _clip(d: Tensor, max_norm: float | None) -> Tensor:
    """``d`` rescaled to norm <= ``max_norm`` (no host sync); unchanged if ``max_norm`` is None."""
    if max_norm is None:
        return d
    return d * (max_norm / (torch.linalg.vector_norm(d) + 1e-6)).clamp(max=1.0)


def _clip_pair(dw: Tensor, db: Tensor | None, max_norm: float) -> tuple[Tensor, Tensor | None]:
    """A layer's (weight, bias) direction rescaled jointly to norm <= ``max_norm``."""
    sq = dw.square().sum() + (db.square().sum() if db is not None else 0.0)
    c = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return dw * c, (None if db is None else db * c)


def _check_batch_dim(batch_dim: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ok = is_int(batch_dim) or (isinstance(batch_dim, Mapping) and all(
        isinstance(k, str) and is_int(v) for k, v in batch_dim.items()))
    check("batch_dim", batch_dim, ok, "an int or a mapping from module-name prefixes to ints")


def _batch_dim_of(batch_dim: int | Mapping[str, int], name: str) -> int:
    """The sample axis of layer ``name`` (longest matching prefix of a mapping, else 0)."""
    if isinstance(batch_dim, int):
        return batch_dim
    best, dim = -1, 0
    for prefix, d in batch_dim.items():
        if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
            best, dim = len(prefix), d
    return dim
