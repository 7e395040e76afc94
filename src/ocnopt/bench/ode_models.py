"""Neural-ODE benchmark models (SNOpt's experiments, algorithm.md section 8.3).

* :class:`ConvODENet`: SNOpt's image classifier (stem, one ODE block of two ConcatConv2d,
  global average pooling, one Linear), with a ``width`` option for CPU budgets.
* :class:`ODERNNClassifier`: an ODE-RNN for (variable-length, possibly irregular) time series:
  a GRU cell at the observations, an ODE between them, each sequence evolving only up to its
  own last observation.
* :class:`CNF`: an FFJORD-style continuous normalising flow, ``log p(x)`` with a Hutchinson
  (Rademacher) or exact trace of the vector field's Jacobian.

All need torchdiffeq (``pip install 'ocnopt[ode]'``). Weights use PyTorch's default
initialisation: a model is deterministic given ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ocnopt.ode import ConcatConv2d, ConcatSquashLinear, ODEBlock

__all__ = [
    "CNF",
    "CNFDynamics",
    "ConvODEFunc",
    "ConvODENet",
    "ODERNNClassifier",
    "ODERNNFunc",
    "cnf_field",
    "standard_normal_logprob",
]


class ConvODEFunc(nn.Module):
    """SNOpt's image vector field: ConcatConv2d(w+1 -> w, 3x3) - ReLU - ConcatConv2d(w+1 -> w)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = ConcatConv2d(width, width, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = ConcatConv2d(width, width, 3, 1, 1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.conv2(t, self.relu(self.conv1(t, x)))


class ConvODENet(nn.Module):
    """SNOpt's ConvODENet: ``(B, C, 28, 28) -> (B, num_classes)`` logits.

    Stem: conv 3x3 (no padding) - ReLU - conv 4x4 stride 2 (pad 1) - ReLU - conv 4x4 stride 2
    (pad 1), all without bias (28x28 -> 6x6); ODE block over ``[0, t1]``; ReLU; global average
    pooling (SNOpt's 6x6 AvgPool); Linear(width, num_classes). SNOpt uses ``width=64``.
    ``**ode`` (``t1, method, rtol, atol, options, learn_t1, adjoint_options``) goes to the block.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 64,
                 **ode: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, bias=False), nn.ReLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1, bias=False),
        )
        self.ode = ODEBlock(ConvODEFunc(width), **ode)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ode(self.stem(x)))


class ODERNNFunc(nn.Module):
    """SNOpt's time-series vector field: 4 ``Linear(h, h)`` with Tanh in between (autonomous)."""

    def __init__(self, hidden: int, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(hidden, hidden))
            if i < depth - 1:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        return self.net(h)


class ODERNNClassifier(nn.Module):
    """ODE-RNN classifier for sequences on a grid of observation times ``k * dt``.

    Input ``x``: ``(B, L, C + 1)``; the last channel is the observation indicator (1: the
    values at index ``k`` were observed; 0: padding or missing), the first ``C`` are the values
    (ignored where not observed). Starting from ``h = 0`` at ``t = 0``, for ``k = 0 .. L-1``:
    the hidden state evolves by the ODE over ``[(k-1) dt, k dt]`` (``k > 0``), then the GRU cell
    updates it where index ``k`` is observed. A sequence evolves only up to its own last
    observation (later intervals are masked: its state is frozen and collects no curvature
    statistics), so padding is never integrated. One ``odeint_adjoint`` call per interval.
    Output: logits ``(B, num_classes)`` from the final states.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 32, dt: float = 1.0,
                 depth: int = 4, **ode: Any) -> None:
        super().__init__()
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"invalid dt={dt!r}: allowed range is a finite float > 0")
        self.hidden = hidden
        self.dt = float(dt)
        self.ode = ODEBlock(ODERNNFunc(hidden, depth), **ode)
        self.cell = nn.GRUCell(channels, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        values, observed = x[..., :-1], x[..., -1] > 0.5
        batch, length = observed.shape
        index = torch.arange(length, device=x.device)
        last = torch.where(observed, index, -1).amax(1)  # last observation per sequence
        h = x.new_zeros(batch, self.hidden)
        steps = int(last.max()) + 1
        for k in range(steps):
            if k > 0:
                t = torch.tensor([(k - 1) * self.dt, k * self.dt], dtype=torch.float64,
                                 device=x.device)
                h = self.ode.integrate(h, t, mask=last >= k)[-1]
            h = torch.where(observed[:, k, None], self.cell(values[:, k], h), h)
        return self.out(h)


def cnf_field(dim: int, hidden: int = 64, layers: int = 3,
              activation: str = "softplus") -> nn.Module:
    """FFJORD's vector field ``net(t, z)``: ConcatSquashLinear layers with Softplus or Tanh."""
    acts = {"softplus": nn.Softplus, "tanh": nn.Tanh}
    if not (isinstance(layers, int) and layers >= 1):
        raise ValueError(f"invalid layers={layers!r}: allowed range is an int >= 1")
    if activation not in acts:
        raise ValueError(f"invalid activation={activation!r}: allowed values are "
                         f"{', '.join(acts)}")
    widths = [dim] + [hidden] * (layers - 1) + [dim]
    return _SquashNet([ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:],
                                                                  strict=True)], acts[activation])


class _SquashNet(nn.Module):
    def __init__(self, layers: list[ConcatSquashLinear], act: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.acts = nn.ModuleList(act() for _ in layers[:-1])

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for layer, act in zip(self.layers[:-1], self.acts, strict=True):
            z = act(layer(t, z))
        return self.layers[-1](t, z)


class CNFDynamics(nn.Module):
    """Augmented CNF field on ``(z, delta_logp)``: ``dz/dt = net(t, z)``,
    ``d delta_logp / dt = -tr(d net / dz)``.

    ``trace="hutchinson"``: ``e^T (dnet/dz) e`` with a Rademacher ``e`` drawn by
    :meth:`sample_noise` once per solve (the adjoint solve must see the same ``e``: do not run
    another forward between a forward and its backward); ``"exact"``: ``dim`` VJPs.
    """

    def __init__(self, net: nn.Module, trace: str = "hutchinson") -> None:
        super().__init__()
        if trace not in ("hutchinson", "exact"):
            raise ValueError(f"invalid trace={trace!r}: allowed values are hutchinson, exact")
        self.net = net
        self.trace = trace
        self.noise: Tensor | None = None

    def sample_noise(self, z: Tensor) -> None:
        self.noise = torch.randint(0, 2, z.shape, device=z.device).to(z.dtype).mul_(2).sub_(1)

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        graph = torch.is_grad_enabled()  # the adjoint solve differentiates through the trace
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            if self.trace == "exact":
                div = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                          for i in range(z.shape[1]))
            else:
                if self.noise is None or self.noise.shape != z.shape:
                    raise RuntimeError("CNFDynamics: call sample_noise(x) before the solve")
                e = self.noise
                div = (torch.autograd.grad(dz, z, e, create_graph=True)[0] * e).sum(1)
        neg = -div.reshape(-1, 1)
        if not graph:
            return dz.detach(), neg.detach()
        return dz, neg


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per sample, ``(B, d) -> (B,)``."""
    return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))


class CNF(nn.Module):
    """Continuous normalising flow: ``x -> log p(x)`` ``(B, d) -> (B,)`` in nats.

    Data live at ``t1``, the base ``N(0, I)`` at 0; the block integrates ``(x, 0)`` from ``t1``
    down to 0 (``reverse=True``) to ``(z0, delta)`` and ``log p(x) = log N(z0) - delta``.
    ``net`` defaults to :func:`cnf_field`. ``**ode`` goes to the block (defaults: dopri5 with
    ``rtol = atol = 1e-5``).
    """

    def __init__(self, dim: int, hidden: int = 64, layers: int = 3, activation: str = "softplus",
                 trace: str = "hutchinson", net: nn.Module | None = None, **ode: Any) -> None:
        super().__init__()
        ode = {"rtol": 1e-5, "atol": 1e-5, **ode}
        self.dynamics = CNFDynamics(net if net is not None else
                                    cnf_field(dim, hidden, layers, activation), trace)
        self.ode = ODEBlock(self.dynamics, reverse=True, **ode)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamics.trace == "hutchinson":
            self.dynamics.sample_noise(x)
        z0, delta = self.ode((x, x.new_zeros(x.shape[0], 1)))
        return standard_normal_logprob(z0) - delta[:, 0]
