"""Feedback stability: exact vs clipped feedback, and the momentum-gain correction.

Reproduces the "Feedback stability" numbers of the README (about 3 minutes on 2 CPU cores)::

    python examples/feedback_stability.py

Part 1: 5-layer tanh FCN on DIGITS, batch 32, 10 epochs: open loop vs exact feedback vs
``feedback_clip=1`` for several curvatures / learning rates (seed 0).
Part 2: the 784-256-256-10 MLP on Fashion-MNIST (20k images, one epoch), EKFAC lr 0.01 with
momentum 0.9: feedback with the momentum-gain correction (the library's behaviour) vs without it.
Without the correction the feedback enters the momentum buffer with gain 1/(1 - 0.9) = 10,
which is exactly ``feedback_scale=10`` with the correction in place.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import OCNOpt
from ocnopt.bench.data import DatasetUnavailableError, load_dataset
from ocnopt.bench.models import build_model


def train(model: nn.Module, opt: OCNOpt, x: torch.Tensor, y: torch.Tensor, epochs: int,
          batch: int, limit: int | None = None) -> None:
    g = torch.Generator().manual_seed(0)
    n = len(x) if limit is None else min(limit, len(x))
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)[:n]
        for i in range(0, n - batch + 1, batch):
            idx = perm[i : i + batch]
            opt.step(lambda idx=idx: F.cross_entropy(model(x[idx]), y[idx]))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def part1() -> None:
    d = load_dataset("digits")
    (x, y), (xt, yt) = d.train.tensors, d.test.tensors
    print("DIGITS, 5-layer tanh FCN, 10 epochs: test accuracy")
    print("| curvature | lr | open loop | exact feedback | feedback_clip=1 |")
    print("|---|---|---|---|---|")
    for curv, lr, mom in [("identity", 0.1, 0.9), ("identity", 0.3, 0.9), ("kfac", 0.005, 0.9),
                          ("kfac", 0.02, 0.9), ("ekfac", 0.01, 0.9), ("ekfac", 0.05, 0.9),
                          ("adam", 0.003, 0.0), ("adam", 0.01, 0.0)]:
        row = []
        for fb, clip in ((False, None), (True, None), (True, 1.0)):
            torch.manual_seed(0)
            model = build_model("fcn", input_shape=(64,), num_classes=10, dataset="digits")
            kw = {"momentum": mom} if curv != "adam" else {}
            opt = OCNOpt(model, lr=lr, curvature=curv, feedback=fb, feedback_clip=clip, **kw)
            train(model, opt, x, y, epochs=10, batch=32)
            row.append(f"{accuracy(model, xt, yt):.3f}")
        print(f"| {curv} (momentum {mom}) | {lr} | " + " | ".join(row) + " |", flush=True)


def part2() -> None:
    try:
        d = load_dataset("fashion-mnist")
    except DatasetUnavailableError as err:
        print(f"part 2 skipped: {err}")
        return
    (x, y), (xt, yt) = d.train.tensors, d.test.tensors
    print("\nFashion-MNIST MLP, EKFAC lr 0.01, momentum 0.9, 1 epoch on 20k images")
    print("| feedback | test accuracy |")
    print("|---|---|")
    for label, kw in [("off", dict(feedback=False)),
                      ("on, momentum-gain corrected (library)", dict(feedback=True)),
                      ("on, uncorrected (= feedback_scale 10)",
                       dict(feedback=True, feedback_scale=10.0))]:
        torch.manual_seed(0)
        model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
        opt = OCNOpt(model, lr=0.01, curvature="ekfac", momentum=0.9, **kw)
        train(model, opt, x, y, epochs=1, batch=128, limit=20000)
        print(f"| {label} | {accuracy(model, xt, yt):.3f} |", flush=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    part1()
    part2()
