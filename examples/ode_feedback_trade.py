"""Feedback for layers after an ODE block: what re-integrating the block in the second pass costs
and what it gains, against open-loop updates for those layers (OCNOpt's default).

Timing-sensitive: run it on a quiet machine (it pins one thread)::

    python examples/ode_feedback_trade.py [--width 16] [--steps 120]

For ConvODENet on Fashion-MNIST (5k training subset, batch 128, dopri5 rtol = atol = 1e-3) and
the ODE-RNN on JapaneseVowels (batch 32; rk4, two steps per interval), as in ``ocnopt bench
--suite ode``, OCNOpt ``ekfac`` with momentum 0.9 in three modes:
``open loop`` (``feedback=False``), ``feedback, open loop after ODE`` (the default) and
``feedback through ODE`` (``ode={"feedback_after_ode": True}``: the second pass re-integrates
the block). Cost: process CPU time and NFE (forward solves) per step, medians of interleaved
rounds from the same weights and batches. Gain: test accuracy after ``--steps`` training steps
(same seed, data order and lr for every mode; mean of ``--seeds`` seeds; accuracy on the first
2,000 test samples).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import OCNOpt
from ocnopt.bench.ode_suite import build_ode_model, evaluate, load_task_data

MODES = {
    "open loop": dict(feedback=False),
    "feedback, open loop after ODE": dict(feedback=True),
    "feedback through ODE": dict(feedback=True, ode={"feedback_after_ode": True}),
}


def _optimizer(model: nn.Module, mode: str, lr: float) -> OCNOpt:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return OCNOpt(model, lr=lr, curvature="ekfac", momentum=0.9, feedback_clip=1.0,
                      **MODES[mode])


def _cases(width: int):
    img = load_task_data("fashion-mnist", "classify", 5000)
    ts = load_task_data("japanese-vowels", "classify", None)
    return {
        "ConvODENet Fashion-MNIST": (
            lambda: build_ode_model("convode", img, width=width), img, 128, 0.03),
        "ODE-RNN JapaneseVowels": (
            lambda: build_ode_model("odernn", ts, hidden=32), ts, 32, 0.1),
    }


def _accuracy(model: nn.Module, data) -> float:
    x, y = data.test.tensors
    return evaluate(model, "classify", x[:2000], y[:2000])[0]


def cost(build, data, batch: int, lr: float, rounds: int, steps: int) -> dict[str, tuple]:
    torch.manual_seed(0)
    base = build()
    x_all, y_all = data.train.tensors
    models = {m: copy.deepcopy(base) for m in MODES}
    opts = {m: _optimizer(models[m], m, lr) for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    nfe: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds + 1):  # round 0 is warm-up (first refreshes)
        for mode in MODES:
            model, opt = models[mode], opts[mode]
            block = model.ode
            n0, t0 = block.nfe_forward_total, time.process_time()
            for k in range(steps):
                i = ((r * steps + k) * batch) % (len(y_all) - batch)
                x, y = x_all[i:i + batch], y_all[i:i + batch]
                opt.step(lambda m=model, x=x, y=y: F.cross_entropy(m(x), y))
            if r:
                cpu[mode].append((time.process_time() - t0) / steps)
                nfe[mode].append((block.nfe_forward_total - n0) / steps)
    return {m: (statistics.median(cpu[m]), statistics.median(nfe[m])) for m in MODES}


def gain(build, data, batch: int, lr: float, steps: int, seeds: int) -> dict[str, float]:
    x_all, y_all = data.train.tensors
    out = {}
    for mode in MODES:
        accs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = build()
            opt = _optimizer(model, mode, lr)
            order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
            for k in range(steps):
                idx = order[(k * batch) % len(order):][:batch]
                x, y = x_all[idx], y_all[idx]
                opt.step(lambda m=model, x=x, y=y: F.cross_entropy(m(x), y))
            accs.append(_accuracy(model, data))
        out[mode] = statistics.fmean(accs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=60, help="training steps for the accuracy")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| model | mode | CPU ms/step | x open loop | NFE fwd/step | test acc |")
    print("|---|---|---|---|---|---|")
    for name, (build, data, batch, lr) in _cases(args.width).items():
        c = cost(build, data, batch, lr, args.rounds, steps=10)
        g = gain(build, data, batch, lr, args.steps, args.seeds)
        ref = c["open loop"][0]
        for mode in MODES:
            ms, n = c[mode]
            print(f"| {name} | {mode} | {1e3 * ms:.1f} | {ms / ref:.2f} | {n:.1f} | "
                  f"{g[mode]:.4f} |")


if __name__ == "__main__":
    main()
