"""Game-theoretic feedback terms for one optimizer step (the integration point of the optimizer).

Use, per step (``docs/game-theory.md`` has the derivation)::

    game = GameFeedback(model, layers, information="nash")
    with game.record(), torch.enable_grad():      # first pass
        loss = closure()                          # (a loss.backward() in here is intercepted:
    game.prepare(loss)                            #  prepare + collect around it)
    with game.collect():                          # the ONE backward of the step
        grads = torch.autograd.grad(loss, ...)
    with game.observe(players), torch.no_grad():  # second pass; in each layer's pre-hook:
        closure()                                 #   s = game.feedback(layer, x_hat)
    game.release()                                # drop the step's tensors

``feedback(layer, x_hat)`` is the per-sample sum over the layer's cut tensors ``c`` of
``<dL/dc_i, c_hat_i - c_i>`` (``L`` the batch-MEAN loss, so ``B`` times this is in units of a
sample's own loss), plus, under ``"cooperative"``, the effect ``r_m,i / B`` of the
already-decided updates of group members that have not run yet (reported with
:meth:`report_update`).  A cooperative group decides at its first member (:meth:`group`); its
later members are already updated when they run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ocnopt.feedback.policy import feedback_terms
from ocnopt.feedback.record import Observer, Recorder
from ocnopt.feedback.structure import INFORMATION, CutTerm, GamePlan, PlayerPlan, analyse

__all__ = ["GameFeedback"]


class GameFeedback:
    """Per-step structure, partial gradients and second-pass feedback terms.

    Args:
        model: the network (every submodule is hooked in the first pass).
        layers: the Linear/Conv2d layers that get feedback (each called once per forward to be
            a player); may be reassigned between steps.
        information: ``"markov"``, ``"nash"`` or ``"cooperative"``.
        batch_dim: the sample axis of a tensor seen by the module of that name (default 0).
    """

    def __init__(self, model: nn.Module, layers: Collection[nn.Module],
                 information: str = "nash",
                 batch_dim: Callable[[str], int] | None = None) -> None:
        if information not in INFORMATION:
            raise ValueError(f"unknown information {information!r}; valid: "
                             f"{', '.join(INFORMATION)}")
        self.model, self.layers, self.information = model, set(layers), information
        self.batch_dim = batch_dim or (lambda name: 0)
        self.recorder: Recorder | None = None
        self.plan: GamePlan | None = None
        #: why this step's game terms are unusable (set when the closure's backward could not
        #: be handled; the caller falls back), else None
        self.broken: str | None = None
        self._player: dict[nn.Module, PlayerPlan] = {}
        self._partial: dict[int, Tensor] = {}
        self._observer: Observer | None = None
        self._groups: dict[nn.Module, tuple[nn.Module, ...]] = {}
        self._pending: dict[nn.Module, Tensor] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ first pass
    @contextmanager
    def record(self) -> Iterator[Recorder]:
        """Record the first forward pass (module calls, edges, in-place-protected values).

        A ``backward()`` run inside the block (the closure's ``loss.backward()``, also
        ``scaler.scale(loss).backward()``) is intercepted: :meth:`prepare` and :meth:`collect`
        run around it.  A second one, or one on several tensors, sets :attr:`broken`.
        """
        self.plan, self.broken = None, None
        self.recorder = Recorder(self.model, self.layers, on_backward=self._intercept)
        with self.recorder:
            yield self.recorder

    def _intercept(self, tensors: Any, run: Callable[[], Any]) -> Any:
        loss = tensors[0] if isinstance(tensors, (tuple, list)) and len(tensors) == 1 \
            else tensors
        if self.plan is not None:
            self.broken = "the closure called backward() more than once"
        elif not isinstance(loss, Tensor) or loss.numel() != 1 or loss.grad_fn is None:
            self.broken = "the closure's backward() was not on one scalar loss with a graph"
        else:
            self.prepare(loss)
            with self.collect():
                return run()
        return run()

    def prepare(self, loss: Tensor) -> GamePlan:
        """Analyse the graph of ``loss``; warns once per layer whose cut falls back."""
        if self.recorder is None:
            raise RuntimeError("prepare() needs the first pass run inside record()")
        self.plan = analyse(loss, self.recorder.calls, self.layers, self.information)
        self._player = {p.call.module: p for p in self.plan.players}
        self._partial.clear()
        self._pending.clear()
        self._groups.clear()
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

    def partials(self) -> list[Tensor]:
        """Every captured partial gradient (for finiteness checks)."""
        return list(self._partial.values())

    def unscale(self, factor: float) -> None:
        """Multiply every partial gradient by ``factor`` (undo a loss scale)."""
        done: dict[int, Tensor] = {}
        for k, v in self._partial.items():
            if id(v) not in done:
                done[id(v)] = v * factor
            self._partial[k] = done[id(v)]

    # ------------------------------------------------------------------ second pass
    @contextmanager
    def observe(self, players: Iterable[nn.Module] | None = None) -> Iterator[None]:
        """Observe the cut tensors again during the second forward pass run inside the block.

        ``players``: the layers that will be updated in this pass (default: every player);
        cooperative groups are formed among them only.
        """
        plan = self._need_plan()
        assert self.recorder is not None
        active = set(self._player) if players is None else set(players) & set(self._player)
        self._groups = {}
        for g in plan.groups:
            members = tuple(m for i in g if (m := plan.players[i].call.module) in active)
            if len(members) > 1:
                for m in members:
                    self._groups[m] = members if m is members[0] else ()
        wanted = [t.seen for p in plan.players if p.call.module in active
                  for t in p.terms if not t.own]
        self._observer = Observer(self.recorder.calls, wanted)
        try:
            with self._observer:
                yield
        finally:
            self._observer = None

    def group(self, module: nn.Module) -> tuple[nn.Module, ...]:
        """Who decides when ``module`` is about to run (inside :meth:`observe`): ``(module,)``
        for a lone player, all members (execution order) for a cooperative group's first
        member, ``()`` for a later member (decided with its group) or a non-player."""
        if module not in self._player:
            return ()
        return self._groups.get(module, (module,))

    def report_update(self, module: nn.Module, effect: Tensor) -> None:
        """Record ``r_i = <q_i, delta theta>`` (``(B,)``, in units of sample i's own loss) of a
        group member updated before it runs (``ocnopt.feedback.cooperative.update_effect`` of
        the applied change); the players in between see it as feedback."""
        self._pending[module] = effect

    def feedback(self, module: nn.Module, x_hat: Tensor) -> Tensor | None:
        """Per-sample feedback ``(B,)`` of a player about to run with input ``x_hat``:
        ``sum_c <dL/dc_i, c_hat_i - c_i>`` over its cut (``L`` the batch-mean loss), plus
        ``r_m,i / B`` of pending group updates; ``None`` when the player has no term."""
        p = self._player[module]
        bd = self.batch_dim(p.call.name)
        batch = x_hat.shape[bd]
        s: Tensor | None = None
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
            tbd = bd if term.own else self._batch_dim_of(term)
            if term.own or tbd != 0:
                part = feedback_terms([grad], [new - nominal], tbd)
            else:  # one batched dot product per sample, no elementwise temporary
                diff = (new - nominal).reshape(batch, 1, -1)
                part = torch.bmm(diff.to(grad.dtype), grad.reshape(batch, -1, 1)).view(batch)
            s = part if s is None else s + part
        start = p.call.start_seq
        for other, effect in self._pending.items():
            if self._player[other].call.start_seq > start:
                part = effect / batch
                s = part if s is None else s + part
        return s

    def release(self) -> None:
        """Drop every reference to the step's tensors (call when the step is done)."""
        self.recorder, self.plan, self._observer = None, None, None
        self._player.clear()
        self._partial.clear()
        self._pending.clear()
        self._groups.clear()

    def _batch_dim_of(self, term: CutTerm) -> int:
        """The sample axis of a cut tensor: that of the module that saw it."""
        assert self.recorder is not None
        return self.batch_dim(self.recorder.calls[term.seen.call].name)

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
