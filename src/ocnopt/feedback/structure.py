"""Game structure of a network, read from the autograd graph of one forward pass (pure functions).

Terms (see ``docs/game-theory.md``):

* an *edge* ``(node, output_nr)`` of the autograd graph is one value of one tensor (an in-place
  operation makes a new edge); it is *produced* by ``node`` and *consumed* by every node listing
  it in ``next_functions``;
* autograd numbers the nodes it creates in creation order (``Node._sequence_nr()``); a module
  call that starts when the counter reads ``s`` creates nodes numbered ``>= s``;
* the *cut* of a player (a Linear/Conv2d call) starting at ``s`` is every edge produced by a node
  numbered ``< s`` and consumed by a node numbered ``>= s``: its own input, skip tensors, finished
  sibling branches.  Parameters and other graph leaves are not state and never in a cut;
* the *partial gradient* of a cut edge for that player is the sum of the gradients its consumers
  numbered ``>= s`` send back along it: the derivative of the loss along the paths from the edge
  that do not pass through another cut edge.  ``Node.register_hook`` sees those per-slot
  gradients (``grad_inputs``) during the ordinary backward pass, so one backward gives all
  partials; when every consumer counts, the partial is the whole gradient of the edge, which a
  ``Node.register_prehook`` on its producer sees already summed;
* a cut edge is *observable* when a module saw it as an input or output before the player
  started: the second (no-grad) forward pass can then observe its new value at the same place.

Everything here works on plain records (:class:`ModuleCall`, :class:`Seen`) and the loss tensor;
the hooks that produce the records live in :mod:`ocnopt.feedback.record`.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.autograd.graph import Node

__all__ = [
    "INFORMATION",
    "Edge",
    "Seen",
    "ModuleCall",
    "CutTerm",
    "PlayerPlan",
    "GamePlan",
    "edge_of",
    "analyse",
]

#: Information structures: ``markov`` (own input only), ``nash`` (whole cut),
#: ``cooperative`` (whole cut; players reading the same tensor decide jointly).
INFORMATION = ("markov", "nash", "cooperative")

#: ``(producing node, output_nr)``: one value of one tensor in the autograd graph.
Edge = tuple[Node, int]


def edge_of(t: Tensor) -> Edge | None:
    """The autograd edge holding the current value of ``t``; ``None`` for tensors without a
    ``grad_fn`` (constants, and graph leaves such as parameters, which are never state)."""
    fn = t.grad_fn
    return None if fn is None else (fn, t.output_nr)


@dataclass
class Seen:
    """A tensor as a module call saw it in the first pass.

    Attributes:
        call: index of the :class:`ModuleCall` in the record list.
        role: ``"input"`` (positional argument ``position``) or ``"output"`` (``position``-th
            tensor of the returned value).
        event: global order of the hook that saw it (calls' ``start_event``/``end_event`` use
            the same counter).
        tensor: the tensor object; ``version``: its ``_version`` when seen; ``edge``: its edge.
        saved: a copy of the value, made when the object was modified in place while it may
            still be needed (see :mod:`ocnopt.feedback.record`).
    """

    call: int
    role: str
    position: int
    event: int
    tensor: Tensor
    version: int
    edge: Edge
    saved: Tensor | None = None

    def value(self) -> Tensor | None:
        """The value as seen, or ``None`` if it was modified in place and not saved."""
        if self.saved is not None:
            return self.saved
        return self.tensor if self.tensor._version == self.version else None


@dataclass
class ModuleCall:
    """One call of one module in the first pass.

    ``index``: the module's call count before this call; ``start_seq``: the autograd sequence
    counter at the pre-hook; ``start_event`` / ``end_event``: hook order of the pre/post hooks;
    ``inputs`` / ``outputs``: the tensors with an autograd edge it saw; ``arg0``: its first
    positional argument if a tensor (with or without an edge: players reading the same data
    tensor are parallel branches too) and ``arg0_version`` its version then.
    """

    module: nn.Module
    name: str
    index: int
    start_seq: int
    start_event: int
    end_event: int = -1
    inputs: list[Seen] = field(default_factory=list)
    outputs: list[Seen] = field(default_factory=list)
    arg0: Tensor | None = None
    arg0_version: int = 0


@dataclass
class CutTerm:
    """One cut edge of one player.

    ``seen``: where the first pass saw it and the second pass observes it again;
    ``consumers``: the ``(node, slot)`` pairs whose back-propagated gradients sum to the partial
    gradient; ``total``: they are all the edge's consumers (the partial is the edge's gradient);
    ``own``: the player's own input.
    """

    edge: Edge
    seen: Seen
    consumers: tuple[tuple[Node, int], ...]
    total: bool
    own: bool


@dataclass
class PlayerPlan:
    """A player (a call of a single-call Linear/Conv2d layer) and its feedback terms.

    ``terms``: the observable cut terms used under the plan's information structure (own input
    first, then in production order); ``dropped``: descriptions of the cut edges left out
    because the second pass cannot observe them (not seen by a module before the layer started,
    or modified in place and not saved); the layer keeps its remaining (at worst Markovian)
    terms.
    """

    call: ModuleCall
    terms: list[CutTerm]
    dropped: list[str]


@dataclass
class GamePlan:
    """Result of :func:`analyse`.

    Attributes:
        players: players in execution order.
        groups: cooperative groups (indices into ``players``, execution order; each of size
            >= 2, sharing the same input edge); empty unless ``information="cooperative"``.
        node_hooks: consumer node -> input slots whose gradients the backward must capture
            (partials over some of an edge's consumers).
        prehooks: producer node -> output numbers whose whole gradient it must capture.
    """

    information: str
    players: list[PlayerPlan]
    groups: list[tuple[int, ...]]
    node_hooks: dict[Node, set[int]]
    prehooks: dict[Node, set[int]]

    def warnings(self) -> list[str]:
        """One line per player with dropped cut terms (for a warning naming the layers)."""
        return [f"{p.call.name}: {', '.join(p.dropped)}" for p in self.players if p.dropped]


def _walk(root: Node) -> dict[Edge, list[tuple[int, Node, int]]]:
    """Consumers of every edge reachable from ``root``: ``edge -> [(seq, node, slot)]``."""
    consumers: dict[Edge, list[tuple[int, Node, int]]] = {}
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        seq = node._sequence_nr()
        for slot, (prod, nr) in enumerate(node.next_functions):
            if prod is None:
                continue
            consumers.setdefault((prod, nr), []).append((seq, node, slot))
            if prod not in seen:
                seen.add(prod)
                stack.append(prod)
    return consumers


def _describe(calls: Sequence[ModuleCall], seen: Seen | None, edge: Edge) -> str:
    if seen is None:
        return f"output of {edge[0].name()} (not seen by any module before the layer)"
    c = calls[seen.call]
    return (f"{seen.role} {seen.position} of {c.name or type(c.module).__name__} (modified in "
            "place, value lost)")


def analyse(
    loss: Tensor,
    calls: Sequence[ModuleCall],
    players: Collection[nn.Module],
    information: str = "nash",
) -> GamePlan:
    """Cut terms, partial-gradient consumers and cooperative groups of every player.

    Args:
        loss: the scalar loss of the first pass (its graph not yet freed).
        calls: the first pass's module calls in start order (every module that may show a cut
            tensor, players included).
        players: the Linear/Conv2d modules that get feedback; a module called more than once is
            not a player (it is an ordinary operation of the graph).
        information: ``"markov"``, ``"nash"`` or ``"cooperative"``.

    Returns:
        the plan. Cost: one walk over the graph and one bisection per edge.
    """
    if information not in INFORMATION:
        raise ValueError(f"unknown information {information!r}; valid: {', '.join(INFORMATION)}")
    if loss.grad_fn is None:
        raise ValueError("the loss has no autograd graph (was it computed under no_grad?)")
    counts: dict[nn.Module, int] = {}
    for c in calls:
        counts[c.module] = counts.get(c.module, 0) + 1
    pcalls = [c for c in calls if c.module in players and counts[c.module] == 1]
    pcalls.sort(key=lambda c: c.start_seq)
    starts = [c.start_seq for c in pcalls]
    consumers = _walk(loss.grad_fn)
    # where each edge was seen, in hook order
    where: dict[Edge, list[Seen]] = {}
    for c in calls:
        for s in (*c.inputs, *c.outputs):
            where.setdefault(s.edge, []).append(s)
    for lst in where.values():
        lst.sort(key=lambda s: s.event)
    own_edge = [next((s.edge for s in c.inputs if s.position == 0), None) for c in pcalls]
    terms: list[list[CutTerm]] = [[] for _ in pcalls]
    dropped: list[list[str]] = [[] for _ in pcalls]
    for edge, cons in consumers.items():
        produced = edge[0]._sequence_nr()
        cons.sort(key=lambda x: x[0])
        last = cons[-1][0]
        lo = bisect.bisect_right(starts, produced)  # first player starting after production
        hi = bisect.bisect_right(starts, last)  # players starting at/before the last consumer
        for p in range(lo, hi):
            own = edge == own_edge[p]
            if information == "markov" and not own:
                continue
            call = pcalls[p]
            first = bisect.bisect_left([x[0] for x in cons], call.start_seq)
            slots = tuple((node, slot) for _, node, slot in cons[first:])
            total = first == 0
            earlier = [s for s in where.get(edge, ()) if s.event <= call.start_event]
            seen = next((s for s in reversed(earlier) if s.value() is not None), None)
            if seen is None:
                dropped[p].append(_describe(calls, earlier[-1] if earlier else None, edge))
            else:
                terms[p].append(CutTerm(edge, seen, slots, total, own))
    plans = []
    for p, call in enumerate(pcalls):
        terms[p].sort(key=lambda term: (not term.own, term.edge[0]._sequence_nr()))
        plans.append(PlayerPlan(call, terms[p], dropped[p]))
    groups: list[tuple[int, ...]] = []
    if information == "cooperative":
        by_input: dict[object, list[int]] = {}
        for p, (call, e) in enumerate(zip(pcalls, own_edge, strict=True)):
            key = e if e is not None else (
                None if call.arg0 is None else (id(call.arg0), call.arg0_version))
            if key is not None:
                by_input.setdefault(key, []).append(p)
        groups = sorted(tuple(g) for g in by_input.values() if len(g) > 1)
    node_hooks: dict[Node, set[int]] = {}
    prehooks: dict[Node, set[int]] = {}
    for plan in plans:
        for term in plan.terms:
            if term.total:
                prehooks.setdefault(term.edge[0], set()).add(term.edge[1])
            else:
                for node, slot in term.consumers:
                    node_hooks.setdefault(node, set()).add(slot)
    return GamePlan(information, plans, groups, node_hooks, prehooks)
