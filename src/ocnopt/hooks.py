"""Hook plumbing, always context-managed: no hook outlives the ``with`` block.

* :class:`ForwardCapture` records, for each watched module, its first-pass inputs and (through
  tensor hooks installed on its outputs, which are safe with in-place activations) the gradient
  of the loss w.r.t. its outputs.
* :class:`FeedbackPass` calls back before each watched module runs in the second forward pass,
  and restores BatchNorm running statistics afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

__all__ = ["LayerRecord", "ForwardCapture", "FeedbackPass", "FeedbackComplete"]


class FeedbackComplete(BaseException):  # noqa: N818 - a control-flow signal, like StopIteration
    """Raised from a feedback pre-hook once every layer is updated: the rest of the second
    forward pass (later parameter-free modules, the loss) is skipped. A ``BaseException`` so
    that ``except Exception`` blocks in user closures do not swallow it; :class:`FeedbackPass`
    absorbs it on exit."""


@dataclass
class LayerRecord:
    """What one module saw during the first (graph-building) forward/backward pass.

    ``inputs[c]`` / ``grads[c]``: input tensor and batch-mean loss gradient w.r.t. the output for
    the module's ``c``-th call. ``input_grad``: gradient w.r.t. ``inputs[0]`` (filled by the
    optimizer when the feedback needs it). ``visited``: set once the feedback pass updated it.
    """

    inputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)
    input_grad: Tensor | None = None
    visited: bool = False

    @property
    def calls(self) -> int:
        return len(self.inputs)


class ForwardCapture:
    """Record inputs and output gradients of ``modules`` while the block is active.

    Hooks only act while gradients are enabled, so evaluation code inside the block is ignored.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.records: dict[nn.Module, LayerRecord] = {m: LayerRecord() for m in self.modules}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ForwardCapture:
        try:
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
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return
        rec = self.records[module]
        rec.inputs.append(args[0])
        rec.versions.append(args[0]._version)
        rec.grads.append(None)

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        rec = self.records[module]
        if not output.requires_grad or not rec.inputs:
            return
        idx = rec.calls - 1

        def store(grad: Tensor) -> None:
            rec.grads[idx] = grad.detach()

        output.register_hook(store)


class FeedbackPass:
    """Call ``on_input(module, x_hat)`` before each watched module runs (second forward pass).

    When ``on_input`` returns True (all layers done) the forward is cut short with
    :class:`FeedbackComplete`, which the block absorbs.

    Run the model under ``torch.no_grad()`` inside the block. The running statistics (and
    ``num_batches_tracked``) of the BatchNorm modules ``batchnorms`` are snapshotted on entry
    and restored on exit.
    """

    def __init__(
        self,
        batchnorms: Iterable[_BatchNorm],
        modules: Iterable[nn.Module],
        on_input: Callable[[nn.Module, Tensor], bool],
    ) -> None:
        self.batchnorms = list(batchnorms)
        self.modules = list(modules)
        self.on_input = on_input
        self._handles: list[RemovableHandle] = []
        self._bn_state: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> FeedbackPass:
        for m in self.batchnorms:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    self._bn_state.append((buf, buf.detach().clone()))
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
        if args and isinstance(args[0], Tensor) and self.on_input(module, args[0]):
            raise FeedbackComplete
