"""Communication of one OCNOpt optimizer across the ranks of a process group.

Everything OCNOpt sends, per step (``B`` = local batch, ``P`` = world size):

* the open-loop gradients of parameters outside feedback layers: one bucketed all-reduce
  (mean) after the first pass;
* each feedback layer's closed-loop direction ``d_t`` (weight and bias): one all-reduce per
  layer in the second pass, before preconditioning (the per-sample weights ``s_i`` stay local);
* on factor-update steps, each Kronecker layer's batch factors ``A``, ``G``: one bucketed
  all-reduce (mean) before they enter their running averages;
* on refresh steps, the eigenbases: each layer's decomposition is computed by ONE rank
  (:func:`assign_work`) and broadcast, so a refresh's cost per rank falls with ``P``;
* two one-element all-reduces (MIN of a "finite" flag) at the step's two checkpoints, so a
  non-finite value on any rank makes every rank skip the step together.

With a single process every operation is the identity.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Communicator", "assign_work", "find_process_group"]


def find_process_group(model: nn.Module, process_group: Any = None) -> Any:
    """The process group OCNOpt communicates over, or ``None`` for a single process.

    An explicit ``process_group`` wins; else a ``DistributedDataParallel`` model's group; else
    the default group when ``torch.distributed`` is initialised with more than one rank.
    """
    if process_group is not None:
        return process_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(model, "process_group", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and group is not None:
        return group
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def assign_work(costs: Sequence[tuple[Hashable, float]], world_size: int) -> dict[Hashable, int]:
    """Greedy longest-processing-time assignment of work items to ranks (plain data).

    ``costs``: ``(item, cost)`` pairs in a deterministic order (every rank computes the same
    assignment). Items are placed, largest first, on the least-loaded rank; ties go to the
    lowest rank and, among equal costs, the earlier item.
    """
    loads = [0.0] * world_size
    out: dict[Hashable, int] = {}
    order = sorted(range(len(costs)), key=lambda i: (-costs[i][1], i))
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        out[costs[i][0]] = rank
        loads[rank] += costs[i][1]
    return out


class Communicator:
    """Collectives of one optimizer over ``group`` (``None``: a single process, no-ops)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.bytes = {"gradients": 0, "directions": 0, "factors": 0, "bases": 0, "flags": 0}

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def mean_(self, tensors: Sequence[Tensor], kind: str) -> None:
        """Average ``tensors`` in place across ranks (one all-reduce per dtype and device)."""
        if not self.active or not tensors:
            return
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.device, t.dtype), []).append(t)
        for ts in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in ts]) if len(ts) > 1 else ts[0].reshape(-1)
            flat = flat.contiguous()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
            self.bytes[kind] += flat.numel() * flat.element_size()
            offset = 0
            for t in ts:
                n = t.numel()
                if len(ts) > 1 or flat.data_ptr() != t.data_ptr():
                    t.copy_(flat[offset:offset + n].view_as(t))
                offset += n

    def all_true(self, flag: bool, device: torch.device | None = None) -> bool:
        """``flag`` AND-ed over every rank (a collective: every rank must call it)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        self.bytes["flags"] += t.element_size()
        return bool(t.item() > 0)

    def broadcast_bases(self, new: dict[str, Tensor] | None, src: int, like: Tensor,
                        keys: Sequence[str]) -> dict[str, Tensor]:
        """Rank ``src``'s eigenbases ``new`` (vectors ``(d, k)``, values ``(k,)``, a 0-d rest per
        side, under ``keys``) on every rank; other ranks pass ``None``."""
        if not self.active:
            assert new is not None
            return new
        ranks = torch.zeros(len(keys) // 3, dtype=torch.int64)
        dims = torch.zeros(len(keys) // 3, dtype=torch.int64)
        if new is not None:
            for i in range(len(keys) // 3):
                dims[i], ranks[i] = new[keys[3 * i]].shape
        header = torch.cat([dims, ranks]).to(like.device)
        dist.broadcast(header, src=self._global_rank(src), group=self.group)
        n = len(keys) // 3
        if new is None:
            new = {}
            for i in range(n):
                d, k = int(header[i]), int(header[n + i])
                new[keys[3 * i]] = like.new_empty(d, k)
                new[keys[3 * i + 1]] = like.new_empty(k)
                new[keys[3 * i + 2]] = like.new_empty(())
        self.broadcast_([new[k].contiguous() if not new[k].is_contiguous() else new[k]
                         for k in keys], src, "bases")
        return new

    def broadcast_(self, tensors: Sequence[Tensor], src: int, kind: str) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s (group rank)."""
        if not self.active or not tensors:
            return
        for t in tensors:
            dist.broadcast(t, src=self._global_rank(src), group=self.group)
            self.bytes[kind] += t.numel() * t.element_size()
