"""Hooks for the game feedback, always context-managed (no hook outlives its ``with`` block).

* :class:`Recorder` (first pass, grad enabled): every module call of the model with the tensors
  it saw (positional inputs, returned tensors) and their autograd edges, the autograd sequence
  counter at each call's start, and copies of values that an in-place operation is about to
  overwrite while a watched layer may still need them (e.g. the block output before
  ``out += identity`` in a torchvision BasicBlock).
  A ``backward()`` called inside the recorded block is handed to a callback (the game sets up
  its partial-gradient hooks around it).
* :class:`Observer` (second pass, no grad): the tensors the same module calls see again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ocnopt.feedback.structure import ModuleCall, Seen, edge_of

__all__ = ["Recorder", "Observer"]

# Tensor methods that overwrite their first argument without a trailing-underscore name.
_INPLACE_DUNDER = frozenset({
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
    "__imatmul__", "__setitem__",
})


def _sequence_counter() -> int:
    """The sequence number autograd gives the next node it creates (this thread)."""
    return torch._C._autograd._get_sequence_nr()


def _plain_torch() -> torch._C.DisableTorchFunction:
    """Inside the recorder's own hooks: tensor attribute reads skip the in-place guard (a torch
    function mode makes each of them a Python call)."""
    return torch._C.DisableTorchFunction()


def _tensors(value: Any) -> list[Tensor | None]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v if isinstance(v, Tensor) else None for v in value]
    return []


_BACKWARD = (Tensor.backward, torch.autograd.backward)


class _InPlaceGuard(TorchFunctionMode):
    """Copies a recorded tensor just before an in-place operation overwrites it, if a watched
    layer started when or after the tensor was seen (only then can a cut still need the old
    value: a tensor's readers all run before it is overwritten).  Hands ``backward()`` calls
    to the recorder (the mode is inactive while the backward runs)."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _BACKWARD and self.recorder.on_backward is not None and args:
            return self.recorder.on_backward(args[0], lambda: func(*args, **kwargs))
        name = getattr(func, "__name__", "")
        if kwargs.get("inplace") or name in _INPLACE_DUNDER or (
                name.endswith("_") and not name.endswith("__")):
            if args and isinstance(args[0], Tensor):
                self.recorder._before_mutation(args[0])
        for t in _tensors(kwargs.get("out")):
            if t is not None:
                self.recorder._before_mutation(t)
        return func(*args, **kwargs)


class Recorder:
    """Record the module calls of ``model`` while the block is active (first pass).

    Args:
        model: the network; every submodule (containers included) is hooked.
        watched: the layers whose start makes earlier tensors worth saving before an in-place
            overwrite (the candidate players).
        on_backward: called as ``on_backward(tensors, run)`` instead of a ``backward()`` run
            inside the block (``tensors``: its first argument; ``run()`` runs the backward).
    Hooks act only while gradients are enabled.  ``calls`` lists the calls in start order.
    """

    def __init__(self, model: nn.Module, watched: Collection[nn.Module],
                 on_backward: Callable[[Any, Callable[[], Any]], Any] | None = None) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.watched = set(watched)
        self.on_backward = on_backward
        self.calls: list[ModuleCall] = []
        self._counts: dict[nn.Module, int] = {}
        self._open: dict[nn.Module, list[int]] = {}
        self._by_id: dict[int, list[Seen]] = {}
        self._event = 0
        self._last_watched_start = -1
        self._handles: list[RemovableHandle] = []
        self._guard: _InPlaceGuard | None = None

    def __enter__(self) -> Recorder:
        try:
            for m in self.names:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook))
                self._handles.append(m.register_forward_hook(self._post_hook))
            self._guard = _InPlaceGuard(self)
            self._guard.__enter__()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._guard is not None:
            self._guard.__exit__(None, None, None)
            self._guard = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._by_id.clear()

    def _see(self, call: int, role: str, values: Iterable[Tensor | None]) -> list[Seen]:
        out = []
        for pos, t in enumerate(values):
            edge = None if t is None else edge_of(t)
            if edge is None:
                continue
            s = Seen(call, role, pos, self._event, t, t._version, edge)
            self._by_id.setdefault(id(t), []).append(s)
            out.append(s)
        return out

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not torch.is_grad_enabled():
            return
        with _plain_torch():
            self._record_start(module, args)

    def _record_start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._event += 1
        idx = len(self.calls)
        call = ModuleCall(module, self.names.get(module, ""), self._counts.get(module, 0),
                          _sequence_counter(), self._event)
        self._counts[module] = call.index + 1
        self.calls.append(call)
        self._open.setdefault(module, []).append(idx)
        call.inputs = self._see(idx, "input", [a if isinstance(a, Tensor) else None
                                               for a in args])
        if args and isinstance(args[0], Tensor):
            call.arg0, call.arg0_version = args[0], args[0]._version
        if module in self.watched:
            self._last_watched_start = self._event

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self._open.get(module)
        if not torch.is_grad_enabled() or not stack:
            return
        self._event += 1
        idx = stack.pop()
        call = self.calls[idx]
        call.end_event = self._event
        with _plain_torch():
            call.outputs = self._see(idx, "output", _tensors(output))

    def _before_mutation(self, t: Tensor) -> None:
        for s in self._by_id.get(id(t), ()):
            if (s.saved is None and s.tensor is t and s.version == t._version
                    and self._last_watched_start >= s.event):
                s.saved = t.detach().clone()


class Observer:
    """Capture, in the second pass, the tensors that the first pass saw at ``wanted``.

    A first-pass :class:`Seen` is identified by (module, call index, role, position); the
    second pass must call the modules in the same order.  ``get(seen)`` returns the second-pass
    tensor, checking that it was not modified in place since it was captured.
    """

    def __init__(self, calls: list[ModuleCall], wanted: Iterable[Seen]) -> None:
        self._keys: dict[tuple[nn.Module, int, str, int], Seen] = {}
        for s in wanted:
            c = calls[s.call]
            self._keys[(c.module, c.index, s.role, s.position)] = s
        self.modules = {k[0] for k in self._keys}
        self._counts: dict[nn.Module, int] = {}
        self._open: dict[nn.Module, list[int]] = {}
        self._got: dict[int, tuple[Tensor, int]] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Observer:
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

    def _capture(self, module: nn.Module, index: int, role: str, values: list) -> None:
        for pos, t in enumerate(values):
            s = self._keys.get((module, index, role, pos))
            if s is not None and isinstance(t, Tensor):
                self._got[id(s)] = (t, t._version)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        index = self._counts.get(module, 0)
        self._counts[module] = index + 1
        self._open.setdefault(module, []).append(index)
        self._capture(module, index, "input", list(args))

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self._open.get(module)
        if stack:
            self._capture(module, stack.pop(), "output", _tensors(output))

    def get(self, seen: Seen) -> Tensor | None:
        """The second-pass tensor at ``seen`` (``None`` if not captured or since modified)."""
        got = self._got.get(id(seen))
        if got is None or got[0]._version != got[1]:
            return None
        return got[0]
