"""Game-theoretic feedback terms for one optimizer step (the integration point of the optimizer).

Use, per step (``docs/game-theory.md`` has the derivation)::

    game = GameFeedback(model, layers, information="nash")
    with game.record(), torch.enable_grad():      # first pass
        loss = closure()
    game.prepare(loss)                            # graph analysis (before the backward)
    with game.collect():                          # the ONE backward of the step
        grads = torch.autograd.grad(loss, ...)
    with game.observe(), torch.no_grad():         # second pass; in each layer's pre-hook:
        closure()                                 #   s = beta * game.feedback(layer, x_hat)
    game.release()                                # drop the step's tensors

``feedback(layer, x_hat)`` is the per-sample sum over the layer's cut tensors ``c`` of
``<dl_i/dc, c_hat_i - c_i>`` (``dl_i/dc`` the partial gradient of sample i's own loss), plus, under
``"cooperative"``, the effect ``r_m,i`` of the already-decided updates of group members that
have not run yet (reported with :meth:`report_update`).  A cooperative group decides at its
first member (:meth:`group`); its later members are already updated when they run.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ocnopt.feedback.record import Observer, Recorder
from ocnopt.feedback.structure import INFORMATION, CutTerm, GamePlan, PlayerPlan, analyse

__all__ = ["GameFeedback"]


class GameFeedback:
    """Per-step structure, partial gradients and second-pass feedback terms.

    Args:
        model: the network (every submodule is hooked in the first pass).
        layers: the Linear/Conv2d layers that get feedback (each called once per forward to be
            a player).
        information: ``"markov"``, ``"nash"`` or ``"cooperative"``.
    """

    def __init__(self, model: nn.Module, layers: Collection[nn.Module],
                 information: str = "nash") -> None:
        if information not in INFORMATION:
            raise ValueError(f"unknown information {information!r}; valid: "
                             f"{', '.join(INFORMATION)}")
        self.model, self.layers, self.information = model, set(layers), information
        self.recorder: Recorder | None = None
        self.plan: GamePlan | None = None
        self._player: dict[nn.Module, PlayerPlan] = {}
        self._partial: dict[int, Tensor] = {}
        self._observer: Observer | None = None
        self._pending: dict[nn.Module, Tensor] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ first pass
    @contextmanager
    def record(self) -> Iterator[Recorder]:
        """Record the first forward pass (module calls, edges, in-place-protected values)."""
        self.recorder = Recorder(self.model, self.layers)
        with self.recorder:
            yield self.recorder

    def prepare(self, loss: Tensor) -> GamePlan:
        """Analyse the graph of ``loss``; warns once per layer whose cut falls back."""
        if self.recorder is None:
            raise RuntimeError("prepare() needs the first pass run inside record()")
        self.plan = analyse(loss, self.recorder.calls, self.layers, self.information)
        self._player = {p.call.module: p for p in self.plan.players}
        self._partial.clear()
        self._pending.clear()
        for line in self.plan.warnings():
            name = line.split(":", 1)[0]
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"game feedback: cut tensors that the second pass cannot observe "
                              f"are left out of the layer's feedback: {line}", RuntimeWarning,
                              stacklevel=2)
        return self.plan

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Capture the partial gradients during the backward run inside the block."""
        plan = self._need_plan()
        got: dict[tuple[str, int, int], Tensor] = {}
        handles = []

        def node_hook(node: torch.autograd.graph.Node, slots: set[int]):
            def hook(grad_inputs, grad_outputs):
                for s in slots:
                    if grad_inputs[s] is not None:
                        got[("in", id(node), s)] = grad_inputs[s].detach()
            return hook

        def prehook(node: torch.autograd.graph.Node, nrs: set[int]):
            def hook(grad_outputs):
                for nr in nrs:
                    if grad_outputs[nr] is not None:
                        got[("out", id(node), nr)] = grad_outputs[nr].detach()
            return hook

        try:
            for node, slots in plan.node_hooks.items():
                handles.append(node.register_hook(node_hook(node, slots)))
            for node, nrs in plan.prehooks.items():
                handles.append(node.register_prehook(prehook(node, nrs)))
            yield
        finally:
            for h in handles:
                h.remove()
        sums: dict[tuple, Tensor | None] = {}
        self._partial.clear()
        for p in plan.players:
            for term in p.terms:
                key = ((("out", id(term.edge[0]), term.edge[1]),) if term.total else
                       tuple(("in", id(n), s) for n, s in term.consumers))
                if key not in sums:
                    parts = [got[k] for k in key if k in got]
                    sums[key] = sum(parts[1:], parts[0]) if parts else None
                if sums[key] is not None:
                    self._partial[id(term)] = sums[key]

    def partial(self, term: CutTerm) -> Tensor | None:
        """Partial gradient of the batch-MEAN loss w.r.t. a cut tensor (after :meth:`collect`)."""
        return self._partial.get(id(term))

    # ------------------------------------------------------------------ second pass
    @contextmanager
    def observe(self) -> Iterator[None]:
        """Observe the cut tensors again during the second forward pass run inside the block."""
        plan = self._need_plan()
        assert self.recorder is not None
        wanted = [t.seen for p in plan.players for t in p.terms if not t.own]
        self._observer = Observer(self.recorder.calls, wanted)
        try:
            with self._observer:
                yield
        finally:
            self._observer = None

    def group(self, module: nn.Module) -> tuple[nn.Module, ...]:
        """Who decides when ``module`` is about to run: ``(module,)`` for a lone player, all
        members (execution order) for a cooperative group's first member, ``()`` for a later
        member (decided with its group) or a non-player."""
        plan = self._need_plan()
        p = self._player.get(module)
        if p is None:
            return ()
        for g in plan.groups:
            members = tuple(plan.players[i].call.module for i in g)
            if module in members:
                return members if members[0] is module else ()
        return (module,)

    def report_update(self, module: nn.Module, effect: Tensor) -> None:
        """Record ``r_i = <q_i, delta theta>`` of a group member updated before it runs
        (``ocnopt.feedback.cooperative.update_effect``); later players see it as feedback."""
        self._pending[module] = effect

    def feedback(self, module: nn.Module, x_hat: Tensor) -> Tensor:
        """Per-sample feedback ``(B,)`` of a player about to run with input ``x_hat``:
        ``sum_c <dl_i/dc, c_hat_i - c_i>`` over its cut, plus pending group updates."""
        p = self._player[module]
        batch = x_hat.shape[0]
        s = x_hat.new_zeros(batch)
        for term in p.terms:
            grad = self._partial.get(id(term))
            if grad is None:
                continue
            nominal = term.seen.value()
            new = x_hat if term.own else self._observed(term)
            if new is None or nominal is None:
                self._warn_missing(p, term)
                continue
            if new.shape != nominal.shape:
                raise RuntimeError(
                    f"layer {p.call.name!r}: a cut tensor has shape {tuple(new.shape)} in the "
                    f"second pass and {tuple(nominal.shape)} in the first; the closure must "
                    "re-evaluate the same batch")
            diff = (new - nominal).reshape(batch, 1, -1)
            s += torch.bmm(diff, grad.reshape(batch, -1, 1)).view(batch) * batch
        start = p.call.start_seq
        for other, effect in self._pending.items():
            if self._player[other].call.start_seq > start:
                s += effect
        return s

    def release(self) -> None:
        """Drop every reference to the step's tensors (call when the step is done)."""
        self.recorder, self.plan, self._observer = None, None, None
        self._player.clear()
        self._partial.clear()
        self._pending.clear()

    def _observed(self, term: CutTerm) -> Tensor | None:
        return None if self._observer is None else self._observer.get(term.seen)

    def _warn_missing(self, p: PlayerPlan, term: CutTerm) -> None:
        key = f"missing:{p.call.name}"
        if key not in self._warned and self.recorder is not None:
            self._warned.add(key)
            where = self.recorder.calls[term.seen.call].name
            warnings.warn(f"game feedback: layer {p.call.name!r} could not observe a cut tensor "
                          f"({term.seen.role} {term.seen.position} of {where!r}) in the second "
                          "pass (different control flow, or modified in place); term skipped",
                          RuntimeWarning, stacklevel=3)

    def _need_plan(self) -> GamePlan:
        if self.plan is None:
            raise RuntimeError("call prepare(loss) after the first pass first")
        return self.plan
