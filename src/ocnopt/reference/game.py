"""Brute-force float64 augmented-state DDP on tiny non-Markovian networks (the game oracle).

A network is written as a :class:`Program`: its operations in execution order, each reading
named values and producing one.  The *players* are the ``nn.Linear`` / ``nn.Conv2d`` operations
(one call each); player ``t`` acts at *stage* ``t``, which runs from its operation up to the next
player's.  The *cut* of player ``t`` is every value produced before its operation (the network
input included; it never moves) and read by an operation at or after it: its own input, skip
tensors, finished sibling branches waiting for a concatenation.

The augmented state ``z_t`` of one sample is the cut of ``t`` plus the *pending controls*:
parameters already chosen at an earlier stage whose operation has not run yet (only the
``"cooperative"`` information structure has them).  The augmented dynamics
``z_{t+1} = F_t(z_t, theta_decided_at_t)`` are Markovian; everything below is the DDP of
``ocnopt.reference.ddp`` applied to them, with explicit per-sample Jacobians of ``F_t``:

* value gradients (backprop on ``z``): ``V^T = grad phi``, ``V^t = F_z^T V^{t+1}``, so that the
  component of ``V^t`` for a cut value ``c`` is the partial derivative of the sample's loss
  along the paths from ``c`` that do not pass through another cut value;
* Gauss-Newton with a rank-one value Hessian per sample, ``V_zz = beta V_z V_z^T``
  (``beta = feedback_scale``), so ``Q_theta z = F_theta^T V_zz F_z``, formed as a matrix;
* the curvature of each player's own block is a fixed ``M`` (identity, an SPD matrix or a positive
  diagonal) divided by the learning rate; weight decay ``gamma`` adds ``gamma theta``.

Information structures (who decides when, and what a decision sees):

* ``"nash"``: every player decides at its own stage from the deviation of its whole cut;
* ``"markov"``: the same, but a player sees only the deviation of its own input (``Q_theta z``
  restricted to that component): the Markovian step of a plain chain;
* ``"cooperative"``: players reading the same value (parallel branches) form a group that decides
  jointly at the stage of its first member, from that stage's deviation, with the cross terms
  ``Q_theta_n theta_m = (1/B) sum_i F_theta_n^T V_zz F_theta_m`` in the stage's quadratic model
  (the stage system is solved densely); members acting later are pending controls for the
  players in between.  If the joint quadratic model is not positive definite its stationary point
  is no minimiser: the cross terms of that group are dropped (logged as a warning).

Batch convention as ``closed_loop_gn_step``: the cost is ``(1/B) sum_i phi_i + sum (gamma/2)
||theta||^2``; the update of the players decided at stage ``t`` is
``-(k + sum_i K_i dz_i)`` with ``k = H^{-1} g``, ``K_i = H^{-1} Q_theta z^(i) / B``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian
from torch.func import functional_call

from .ddp import Policy
from .model import LossSpec, Stage, _flat_modules, loss_derivatives, per_sample_loss

__all__ = [
    "INFORMATION",
    "Op",
    "Program",
    "Component",
    "StagePolicy",
    "AugmentedGame",
    "sequential_program",
    "game_step",
]

logger = logging.getLogger(__name__)

#: The information structures of the game (see the module docstring).
INFORMATION = ("markov", "nash", "cooperative")


@dataclass(frozen=True)
class Op:
    """One operation: ``output = fn(*inputs)``, or ``output = layer(inputs[0])`` for a player.

    Values are batched tensors (batch first).  ``fn`` must act on each sample independently
    (e.g. BatchNorm in eval mode, not in training mode).
    """

    output: str
    inputs: tuple[str, ...]
    fn: Callable[..., Tensor] | None = None
    layer: nn.Module | None = None


@dataclass(frozen=True)
class Program:
    """A network as operations in execution order; ``input`` and ``output`` name values."""

    input: str
    ops: tuple[Op, ...]
    output: str

    def run(self, x: Tensor) -> dict[str, Tensor]:
        """Every value of the program on the batch ``x`` (current module parameters)."""
        vals = {self.input: x}
        for op in self.ops:
            args = [vals[n] for n in op.inputs]
            vals[op.output] = op.layer(args[0]) if op.layer is not None else op.fn(*args)
        return vals


class Component(NamedTuple):
    """One block of the augmented state: a cut ``"value"`` (key: its name) or a pending
    ``"control"`` (key: the player index); ``shape`` is per sample."""

    kind: str
    key: str | int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class StagePolicy:
    """The update chosen at one stage.

    Attributes:
        players: indices of the players deciding here; their controls are concatenated in this
            order in ``policy.k`` / ``policy.K``.
        policy: ``du = -(k + sum_i K[i] @ (z_hat_i - z_i))`` on the stage's augmented state.
        cross_terms_dropped: True when the cooperative stage system was not positive definite.
    """

    players: tuple[int, ...]
    policy: Policy
    cross_terms_dropped: bool = False


def sequential_program(model: nn.Module) -> Program:
    """The program of a (nested) ``nn.Sequential``: one operation per leaf module."""
    ops = []
    prev = "x"
    for i, m in enumerate(_flat_modules(model)):
        player = isinstance(m, (nn.Linear, nn.Conv2d))
        ops.append(Op(f"v{i}", (prev,), fn=None if player else m, layer=m if player else None))
        prev = f"v{i}"
    return Program("x", tuple(ops), prev)


def _check_program(program: Program) -> None:
    known = {program.input}
    for op in program.ops:
        missing = [n for n in op.inputs if n not in known]
        if missing:
            raise ValueError(f"operation {op.output!r} reads undefined value(s) {missing}")
        if op.output in known:
            raise ValueError(f"value {op.output!r} is produced twice")
        if (op.fn is None) == (op.layer is None):
            raise ValueError(f"operation {op.output!r} needs exactly one of fn / layer")
        if op.layer is not None:
            if not isinstance(op.layer, (nn.Linear, nn.Conv2d)) or len(op.inputs) != 1:
                raise ValueError(f"player {op.output!r} must be an nn.Linear / nn.Conv2d "
                                 "reading one value")
            if op.layer.weight.dtype != torch.float64:
                raise TypeError(f"player {op.output!r}: the oracle works in float64 only")
        known.add(op.output)
    if program.output not in known:
        raise ValueError(f"the program never produces its output {program.output!r}")
    layers = [op.layer for op in program.ops if op.layer is not None]
    if len({id(m) for m in layers}) != len(layers):
        raise ValueError("a player module appears twice (reused modules are not players)")
    if not layers:
        raise ValueError("the program has no player (nn.Linear / nn.Conv2d operation)")


class AugmentedGame:
    """Augmented-state DDP of one minibatch under one information structure (brute force).

    Args:
        program: the network (float64).
        X: the minibatch input ``(B, ...)``.
        information: ``"markov"``, ``"nash"`` or ``"cooperative"``.
    The nominal trajectory is evaluated at construction, with the current parameters.
    """

    def __init__(self, program: Program, X: Tensor, information: str = "nash") -> None:
        if information not in INFORMATION:
            raise ValueError(f"unknown information {information!r}; valid: "
                             f"{', '.join(INFORMATION)}")
        if X.dtype != torch.float64:
            raise TypeError(f"the oracle works in float64 only, got inputs of dtype {X.dtype}")
        _check_program(program)
        self.program, self.X, self.information = program, X, information
        ops = program.ops
        self.op_of = [o for o, op in enumerate(ops) if op.layer is not None]  # player -> op
        self.T = len(self.op_of)
        with torch.no_grad():
            self.nominal = program.run(X)
        self.stages = [
            Stage(t, ops[o].layer, (), tuple(self.nominal[ops[o].inputs[0]].shape[1:]),
                  tuple(self.nominal[ops[o].output].shape[1:]))
            for t, o in enumerate(self.op_of)
        ]
        self.u_nominal = [st.get_u() for st in self.stages]
        produced = {program.input: -1} | {op.output: o for o, op in enumerate(ops)}
        last_read: dict[str, int] = {}
        for o, op in enumerate(ops):
            for n in op.inputs:
                last_read[n] = o
        self.cut = [
            [n for n, p in produced.items() if p < o_t and last_read.get(n, -1) >= o_t]
            for o_t in self.op_of
        ]
        own = [ops[o].inputs[0] for o in self.op_of]
        if information == "cooperative":
            first: dict[str, int] = {}
            for t, n in enumerate(own):
                first.setdefault(n, t)
            self.decide_at = [first[n] for n in own]
        else:
            self.decide_at = list(range(self.T))
        self.decided = [tuple(m for m in range(self.T) if self.decide_at[m] == t)
                        for t in range(self.T)]
        self.components: list[list[Component]] = []
        for t in range(self.T):
            comps = [Component("value", n, tuple(self.nominal[n].shape[1:])) for n in self.cut[t]]
            comps += [Component("control", m, (self.stages[m].n_u,))
                      for m in range(self.T) if self.decide_at[m] < t <= m]
            self.components.append(comps)
        out = program.output
        self.components.append([Component("value", out, tuple(self.nominal[out].shape[1:]))])
        self.own_input = own
        self._jac: dict[tuple[int, int], tuple[Tensor, tuple[Tensor, ...]]] = {}
        self.z_nominal = [self.state(t, self.nominal, self.u_nominal) for t in range(self.T + 1)]

    # ------------------------------------------------------------------ state
    def state(self, t: int, values: Mapping[str, Tensor], controls: list[Tensor]) -> Tensor:
        """Flattened batch state ``(B, n_z)`` of stage ``t`` (``t = T``: the network output).

        ``controls[m]`` is the value of player ``m``'s control (used for pending controls).
        """
        B = self.X.shape[0]
        parts = [values[c.key].reshape(B, -1) if c.kind == "value"
                 else controls[c.key].expand(B, -1) for c in self.components[t]]
        return torch.cat(parts, dim=1) if parts else self.X.new_zeros(B, 0)

    def _unflatten(self, t: int, z: Tensor) -> tuple[dict[str, Tensor], dict[int, Tensor]]:
        vals: dict[str, Tensor] = {}
        ctrl: dict[int, Tensor] = {}
        for c, piece in zip(self.components[t], z.split([c.size for c in self.components[t]]),
                            strict=True):
            if c.kind == "value":
                vals[c.key] = piece.view(1, *c.shape)
            else:
                ctrl[c.key] = piece
        return vals, ctrl

    def stage_map(self, t: int, z: Tensor, *thetas: Tensor) -> Tensor:
        """Augmented dynamics of ONE sample: ``z_{t+1} = F_t(z_t, thetas)`` (differentiable).

        Args:
            z: ``(n_z_t,)``; thetas: the controls of ``self.decided[t]``, in that order.
        """
        vals, ctrl = self._unflatten(t, z)
        ctrl.update(zip(self.decided[t], thetas, strict=True))
        end = self.op_of[t + 1] if t + 1 < self.T else len(self.program.ops)
        for o in range(self.op_of[t], end):
            op = self.program.ops[o]
            args = [vals[n] for n in op.inputs]
            if op.layer is None:
                vals[op.output] = op.fn(*args)
            else:
                st = self.stages[t]
                vals[op.output] = functional_call(op.layer, st.unpack(ctrl[t]), (args[0],))
        parts = [vals[c.key].reshape(-1) if c.kind == "value" else ctrl[c.key]
                 for c in self.components[t + 1]]
        return torch.cat(parts)

    def _jacobians(self, t: int, i: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Explicit Jacobians of ``F_t`` for sample ``i``: ``F_z`` and ``F_theta`` per decider
        (at the nominal point; computed once)."""
        if (t, i) not in self._jac:
            z = self.z_nominal[t][i]
            thetas = tuple(self.u_nominal[m] for m in self.decided[t])
            with torch.enable_grad():
                jac = jacobian(lambda zz, *th: self.stage_map(t, zz, *th), (z, *thetas))
            self._jac[(t, i)] = (jac[0], tuple(jac[1:]))
        return self._jac[(t, i)]

    def loss_to_go(self, t: int, z: Tensor, y: Tensor, loss: LossSpec) -> Tensor:
        """Sample loss as a function of the stage-``t`` state (nominal controls decided later)."""
        for s in range(t, self.T):
            z = self.stage_map(s, z, *(self.u_nominal[m] for m in self.decided[s]))
        return per_sample_loss(loss)(z, y)

    # ------------------------------------------------------------------ backward
    def value_gradients(self, Y: Tensor, loss: LossSpec) -> list[Tensor]:
        """``[V^0, ..., V^T]``, ``V^t`` of shape ``(B, n_z_t)``: per-sample gradients of the
        sample's own loss w.r.t. the augmented state, by the explicit recursion
        ``V^t = F_z^T V^{t+1}``."""
        B = self.X.shape[0]
        out = self.z_nominal[self.T]
        V = [torch.stack([loss_derivatives(loss, out[i], Y[i])[0] for i in range(B)])]
        for t in reversed(range(self.T)):
            V.insert(0, torch.stack([self._jacobians(t, i)[0].T @ V[0][i] for i in range(B)]))
        return V

    def policies(
        self,
        Y: Tensor,
        loss: LossSpec,
        lr: float,
        feedback_scale: float = 1.0,
        weight_decay: float = 0.0,
        curvature: Mapping[nn.Module, Tensor] | None = None,
    ) -> list[StagePolicy | None]:
        """The policy of every stage (``None`` where nobody decides).

        Args:
            curvature: per player module, ``M`` as an ``(m, m)`` SPD matrix or an ``(m,)``
                positive diagonal, in the ``Stage.get_u`` layout; missing modules use identity.
        """
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        B = self.X.shape[0]
        beta = float(feedback_scale)
        V = self.value_gradients(Y, loss)
        result: list[StagePolicy | None] = []
        for t in range(self.T):
            dec = self.decided[t]
            if not dec:
                result.append(None)
                continue
            sizes = [self.stages[m].n_u for m in dec]
            n_z = self.z_nominal[t].shape[1]
            mask = torch.ones(n_z, dtype=torch.float64)
            if self.information == "markov":
                mask.zero_()
                offset = 0
                for c in self.components[t]:
                    if c.kind == "value" and c.key == self.own_input[t]:
                        mask[offset:offset + c.size] = 1.0
                    offset += c.size
            g = torch.zeros(sum(sizes), dtype=torch.float64)
            cross = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
            Qtz = torch.zeros(B, sum(sizes), n_z, dtype=torch.float64)
            for i in range(B):
                Fz, Fth = self._jacobians(t, i)
                v = V[t + 1][i]
                Vzz = beta * torch.outer(v, v)
                Fu = torch.cat(Fth, dim=1)  # (n', sum m)
                g += Fu.T @ v / B
                Qtz[i] = Fu.T @ Vzz @ (Fz * mask) / B
                cross += Fu.T @ Vzz @ Fu / B
            g += weight_decay * torch.cat([self.u_nominal[m] for m in dec])
            H = torch.zeros_like(cross)
            blocks = torch.tensor(sizes).cumsum(0).tolist()
            starts = [0] + blocks[:-1]
            for m, a, b in zip(dec, starts, blocks, strict=True):
                H[a:b, a:b] = _curvature(curvature, self.stages[m]) / lr
            dropped = False
            if len(dec) > 1:
                off = cross.clone()
                for a, b in zip(starts, blocks, strict=True):
                    off[a:b, a:b] = 0.0
                joint = H + off
                if torch.linalg.eigvalsh(0.5 * (joint + joint.T))[0] > 0:
                    H = joint
                else:
                    dropped = True
                    names = [self.program.ops[self.op_of[m]].output for m in dec]
                    logger.warning("cooperative stage %s: the joint quadratic model is not "
                                   "positive definite; cross terms dropped", names)
            k = torch.linalg.solve(H, g)
            K = torch.linalg.solve(H, Qtz)
            result.append(StagePolicy(dec, Policy(k=k, K=K, x_nominal=self.z_nominal[t]),
                                      dropped))
        return result

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward_update(self, policies: list[StagePolicy | None]) -> dict[str, Tensor]:
        """Closed-loop second pass: update each stage's deciders from the observed deviation of
        its augmented state, then run it with the new parameters.  Updates the modules in place
        and returns every value of the new trajectory."""
        if len(policies) != self.T:
            raise ValueError(f"got {len(policies)} policies for {self.T} stages")
        vals = {self.program.input: self.X}
        for o, op in enumerate(self.program.ops):
            if op.layer is not None:
                t = self.op_of.index(o)
                sp = policies[t]
                if sp is not None:
                    controls = [st.get_u() for st in self.stages]
                    dz = self.state(t, vals, controls) - sp.policy.x_nominal
                    du = -(sp.policy.k + torch.einsum("bmn,bn->m", sp.policy.K, dz))
                    for m, piece in zip(sp.players,
                                        du.split([self.stages[m].n_u for m in sp.players]),
                                        strict=True):
                        self.stages[m].set_u(self.u_nominal[m] + piece)
            args = [vals[n] for n in op.inputs]
            vals[op.output] = op.layer(args[0]) if op.layer is not None else op.fn(*args)
        return vals


def _curvature(curvature: Mapping[nn.Module, Tensor] | None, st: Stage) -> Tensor:
    m = st.n_u
    M = None if curvature is None else curvature.get(st.module)
    if M is None:
        return torch.eye(m, dtype=torch.float64)
    if M.shape == (m,):
        if not bool((M > 0).all()):
            raise ValueError(f"diagonal curvature of player {st.index} must be positive")
        return torch.diag(M.to(torch.float64))
    if M.shape != (m, m):
        raise ValueError(f"curvature of player {st.index} must be ({m},) or ({m}, {m}), got "
                         f"{tuple(M.shape)}")
    M = M.to(torch.float64)
    if not torch.allclose(M, M.T) or torch.linalg.eigvalsh(M)[0] <= 0:
        raise ValueError(f"curvature of player {st.index} must be symmetric positive definite")
    return M


def game_step(
    program: Program,
    X: Tensor,
    Y: Tensor,
    loss: LossSpec,
    lr: float,
    information: str = "nash",
    feedback_scale: float = 1.0,
    weight_decay: float = 0.0,
    curvature: Mapping[nn.Module, Tensor] | None = None,
) -> list[StagePolicy | None]:
    """One closed-loop game step (backward on the augmented states, then the second pass);
    updates the program's modules in place and returns the stage policies."""
    game = AugmentedGame(program, X, information)
    pols = game.policies(Y, loss, lr, feedback_scale, weight_decay, curvature)
    game.forward_update(pols)
    return pols
