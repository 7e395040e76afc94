"""Hook plumbing. Every hook here is owned by a context manager or by an object with ``close()``.

* :class:`ForwardCapture` records, for each watched module call, its input, and (through tensor
  hooks installed on the call's output and input, which are safe with in-place activations) the
  gradients of the loss w.r.t. both, from whichever backward pass runs: the optimizer's own
  ``torch.autograd.grad`` or a ``loss.backward()`` inside the user's closure. Used as a ``with``
  block inside one step, or kept open (``active`` toggled) for the classic
  ``loss.backward(); opt.step()`` loop, where the optimizer owns it and closes it.
* :class:`FeedbackPass` calls back before each watched module runs in the second forward pass,
  and restores BatchNorm running statistics afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils.hooks import RemovableHandle

__all__ = ["LayerRecord", "ForwardCapture", "FeedbackPass", "FeedbackComplete",
           "batchnorm_buffers"]


def batchnorm_buffers(model: nn.Module) -> list[Tensor]:
    """The buffers a training-mode forward updates: BatchNorm running statistics and counts."""
    return [buf for m in model.modules() if isinstance(m, _BatchNorm)
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]


class FeedbackComplete(BaseException):  # noqa: N818 - a control-flow signal, like StopIteration
    """Raised from a feedback pre-hook once every layer is updated: the rest of the second
    forward pass (later parameter-free modules, the loss, a ``backward()`` in the closure) is
    skipped. A ``BaseException`` so that ``except Exception`` blocks in user closures do not
    swallow it; :class:`FeedbackPass` absorbs it on exit."""


@dataclass
class LayerRecord:
    """What one module saw during the first (graph-building) forward/backward pass.

    Per call ``c``: ``inputs[c]`` the input tensor, ``versions[c]`` its version counter then,
    ``grads[c]`` the loss gradient w.r.t. the output and ``input_grads[c]`` w.r.t. the input
    (``None`` until the backward reaches them, or if the input needs no gradient).
    ``visited``: set once the feedback pass updated the layer.
    """

    inputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)
    input_grads: list[Tensor | None] = field(default_factory=list)
    visited: bool = False

    @property
    def calls(self) -> int:
        return len(self.inputs)


class ForwardCapture:
    """Record inputs and gradients of ``modules`` while active.

    Hooks only act while ``active`` and gradients are enabled, so evaluation code is ignored.
    ``input_grads=False`` skips the input-gradient hooks (the curvature needs only outputs).
    ``fired`` becomes True when a backward pass reaches a recorded output.

    With ``global_hooks=True`` the hooks are process-wide module hooks that filter on
    ``modules``: nothing is stored on the modules themselves, so copies of the model
    (``copy.deepcopy``) never inherit them. The owner must call :meth:`close`.
    """

    def __init__(
        self, modules: Iterable[nn.Module], input_grads: bool = True, global_hooks: bool = False
    ) -> None:
        self.modules = list(modules)
        self.input_grads = input_grads
        self.global_hooks = global_hooks
        self.active = True
        self.fired = False
        self.records: dict[nn.Module, LayerRecord] = {}
        self.reset()
        self._handles: list[RemovableHandle] = []

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.records = {m: LayerRecord() for m in self.modules}
        self.fired = False

    def __enter__(self) -> ForwardCapture:
        try:
            if self.global_hooks:
                self._handles.append(register_module_forward_pre_hook(self._pre_hook))
                self._handles.append(register_module_forward_hook(self._post_hook))
            else:
                for m in self.modules:
                    self._handles.append(m.register_forward_pre_hook(self._pre_hook))
                    self._handles.append(m.register_forward_hook(self._post_hook))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (self.active and torch.is_grad_enabled()) or not args:
            return
        rec = self.records.get(module)
        x = args[0]
        if rec is None or not isinstance(x, Tensor):
            return
        idx = rec.calls
        rec.inputs.append(x)
        rec.versions.append(x._version)
        rec.grads.append(None)
        rec.input_grads.append(None)
        if self.input_grads and x.requires_grad:
            x.register_hook(self._storing(rec, "input_grads", idx))

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (self.active and torch.is_grad_enabled()) or not isinstance(output, Tensor):
            return
        rec = self.records.get(module)
        if rec is None or not output.requires_grad or not rec.inputs:
            return
        output.register_hook(self._storing(rec, "grads", rec.calls - 1))

    def _storing(self, rec: LayerRecord, key: str, idx: int) -> Callable[[Tensor], None]:
        """A tensor hook writing its gradient into ``rec.<key>[idx]``.  It holds the record and
        this object only weakly: the autograd graph owns the hook, and the record owns the
        graph's tensors (a strong reference would be a cycle through C++ that Python's garbage
        collector cannot free, leaking every step's activations)."""
        ref, owner = weakref.ref(rec), weakref.ref(self)

        def store(grad: Tensor) -> None:
            target, cap = ref(), owner()
            if target is not None:
                getattr(target, key)[idx] = grad.detach()
            if cap is not None:
                cap.fired = True

        return store


class FeedbackPass:
    """Call ``on_input(module, x_hat)`` before each watched module runs (second forward pass).

    When ``on_input`` returns True (all layers done) the forward is cut short with
    :class:`FeedbackComplete`, which the block absorbs.

    Run the model under ``torch.no_grad()`` inside the block. ``buffers`` (the BatchNorm running
    statistics, see :func:`batchnorm_buffers`) are snapshotted on entry and restored on exit, so
    the second pass never changes them.
    """

    def __init__(
        self,
        buffers: Iterable[Tensor],
        modules: Iterable[nn.Module],
        on_input: Callable[[nn.Module, Tensor], bool],
    ) -> None:
        self.buffers = list(buffers)
        self.modules = list(modules)
        self.on_input = on_input
        self._handles: list[RemovableHandle] = []
        self._bn_state: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> FeedbackPass:
        self._bn_state = [(buf, buf.detach().clone()) for buf in self.buffers]
        try:
            for m in self.modules:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> bool:
        self.close()
        return exc_type is FeedbackComplete

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        with torch.no_grad():
            for buf, saved in self._bn_state:
                buf.copy_(saved)
        self._bn_state.clear()

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], Tensor):
            return
        # the optimizer's arithmetic runs without autograd and in the parameters' dtype, even if
        # the closure enables grad (as Lightning's does) or autocast
        with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            done = self.on_input(module, args[0])
        if done:
            raise FeedbackComplete
