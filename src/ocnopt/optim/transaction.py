"""All-or-nothing optimizer steps.

A :class:`StepTransaction` collects everything one step changes and either commits all of it or
restores everything it touched:

* parameters are updated in place (the feedback pass must run the model with the new values of
  the earlier layers), each after one backup copy made on its first write (:meth:`touch`);
* optimizer state is never modified in place: the kernels return new entries, which are staged
  here and only written into ``optimizer.state`` by :meth:`commit`;
* module buffers that a forward pass updates (BatchNorm running statistics) are snapshotted when
  the transaction opens and restored by :meth:`rollback`;
* state kept outside ``optimizer.state`` (e.g. an ODE block's integration-time controller) is
  restored by callbacks registered with :meth:`on_rollback`, its tensors checked via
  :meth:`watch`;
* every staged floating-point tensor and every written parameter is checked for NaN/Inf by
  :meth:`all_finite` (one fused reduction per device), so no non-finite value is ever committed.

Cost: one copy of the parameters the step updates, and, transiently, a second copy of their
optimizer state (old entries are released at commit). The README's "Atomic steps" section
quotes the measured time.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepTransaction", "all_finite"]


_SMALL = 1 << 16  # tensors below this many elements are checked together (fewer ops)


@torch.no_grad()
def _extremes(t: Tensor) -> Tensor:
    e = torch.stack(torch.aminmax(t))
    return e if e.dtype == torch.float32 else e.float()


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True iff every element of every tensor is finite (one host sync).

    Exact (min/max, no overflow of large finite values, NaN-propagating): one ``aminmax`` per
    large tensor, one over the concatenation of the small ones.
    """
    small: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    extremes: list[Tensor] = []
    for t in tensors:
        if not t.numel() or not t.is_floating_point():
            continue
        if t.numel() < _SMALL:
            small.setdefault((t.device, t.dtype), []).append(t.reshape(-1))
        else:
            extremes.append(_extremes(t))
    for ts in small.values():
        extremes.append(_extremes(ts[0] if len(ts) == 1 else torch.cat(ts)))
    if not extremes:
        return True
    devices = {e.device for e in extremes}
    return all(bool(torch.isfinite(torch.cat([e for e in extremes if e.device == d])).all())
               for d in devices)


class StepTransaction:
    """Staged state, parameter backups and buffer snapshots of one optimizer step.

    Args:
        buffers: module buffers to restore on rollback (e.g. BatchNorm running statistics).
        atomic: ``False`` keeps the staging but drops backups, snapshots and checks (a
            measurement-only switch: what all-or-nothing steps cost).
    """

    def __init__(self, buffers: Iterable[Tensor] = (), atomic: bool = True) -> None:
        self.atomic = atomic
        self._buffers = [(b, b.detach().clone()) for b in buffers] if atomic else []
        self._backups: dict[Tensor, Tensor] = {}
        self.staged: dict[Any, dict[str, Any]] = {}
        self.grads: dict[Tensor, Tensor] = {}
        self._watch: list[Tensor] = []
        self._restore: list[Callable[[], None]] = []
        self._checked = 0

    # ---------------------------------------------------------------- writes
    def touch(self, param: Tensor) -> Tensor:
        """Back up ``param`` before its first in-place update in this step; returns it."""
        if self.atomic and param not in self._backups:
            self._backups[param] = param.detach().clone()
            self._watch.append(param)
        return param

    def stage(self, key: Any, entries: Mapping[str, Any]) -> None:
        """Stage new state entries of ``key`` (a parameter); they replace the old ones on commit."""
        self.staged.setdefault(key, {}).update(entries)
        self._watch.extend(v for v in entries.values() if isinstance(v, Tensor))

    def view(self, key: Any, state: Mapping[Any, Any]) -> ChainMap[str, Any]:
        """The state of ``key`` as it will be after commit (staged entries first)."""
        return ChainMap(self.staged.get(key, {}), state.get(key, {}))

    def watch(self, tensors: Iterable[Tensor]) -> None:
        """Check ``tensors`` (updated in place outside the staging) in :meth:`all_finite`."""
        self._watch.extend(tensors)

    def on_rollback(self, restore: Callable[[], None]) -> None:
        """Call ``restore`` on rollback, after the parameters and buffers are restored (not
        registered when not ``atomic``)."""
        if self.atomic:
            self._restore.append(restore)

    def set_grad(self, param: Tensor, grad: Tensor) -> None:
        """``param.grad = grad`` on commit (the direction the step used)."""
        self.grads[param] = grad

    # ---------------------------------------------------------------- outcome
    def all_finite(self) -> bool:
        """True iff every tensor staged or parameter written since the last call is finite.

        Parameters are checked with their values at the time of the call.
        """
        new, self._checked = self._watch[self._checked:], len(self._watch)
        return all_finite(new) if self.atomic else True

    def commit(self, state: Any) -> None:
        """Write the staged entries into ``state`` (a ``defaultdict(dict)`` keyed by parameter)
        and the staged gradients into ``.grad``."""
        for key, entries in self.staged.items():
            state[key].update(entries)
        for p, g in self.grads.items():
            p.grad = g
        self._release()

    @torch.no_grad()
    def rollback(self) -> None:
        """Restore every touched parameter and snapshotted buffer; drop the staged state."""
        for p, old in self._backups.items():
            p.copy_(old)
        for b, old in self._buffers:
            b.copy_(old)
        for restore in self._restore:
            restore()
        self._release()

    def _release(self) -> None:
        self._backups.clear()
        self._buffers.clear()
        self.staged.clear()
        self.grads.clear()
        self._watch.clear()
        self._restore.clear()
        self._checked = 0
