"""Early eigenbasis refreshes: accuracy and cost of ``early_refresh`` (on by default).

EKFAC (momentum 0.9, lr 0.01, max_rank 64) on the Fashion-MNIST MLP 784-256-256-10, batch 128,
one epoch of a 20k-image subset (156 steps), 3 seeds: held-out accuracy (5k test images) after
10, 25, 50, 100 and 156 steps with refreshes at steps 0, 1, 2, 4, ..., 64, 100 (early) and at
0 and 100 only; plus the process CPU time of the whole epoch. Run:
``python examples/refresh_schedule.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from ocnopt import OCNOpt
from ocnopt.bench.data import load_dataset
from ocnopt.bench.models import build_model

CHECKPOINTS = (10, 25, 50, 100, 156)


def run(early: bool, seed: int, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor,
        yt: torch.Tensor) -> tuple[list[float], float]:
    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, lr=0.01, curvature="ekfac", momentum=0.9, early_refresh=early)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    accs, cpu = [], 0.0
    for step in range(1, CHECKPOINTS[-1] + 1):
        idx = order[(step - 1) * 128: step * 128]
        c0 = time.process_time()
        opt.step(lambda idx=idx: F.cross_entropy(model(x[idx]), y[idx]))
        cpu += time.process_time() - c0
        if step in CHECKPOINTS:
            with torch.no_grad():
                accs.append(float((model(xt).argmax(1) == yt).float().mean()))
    return accs, cpu


def main() -> None:
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist")
    x, y = data.train.tensors
    xt, yt = data.test.tensors
    x, y, xt, yt = x[:20000], y[:20000], xt[:5000], yt[:5000]
    print("| refreshes | " + " | ".join(f"acc @{c}" for c in CHECKPOINTS) + " | CPU s/epoch |")
    print("|---|" + "---|" * (len(CHECKPOINTS) + 1))
    for early in (False, True):
        runs = [run(early, s, x, y, xt, yt) for s in range(3)]
        cells = [f"{statistics.mean(a[i] for a, _ in runs):.4f} +- "
                 f"{statistics.stdev(a[i] for a, _ in runs):.4f}" for i in range(len(CHECKPOINTS))]
        cpu = statistics.mean(c for _, c in runs)
        label = ("0,1,2,4,...,64,100 (early_refresh=True)" if early
                 else "0,100 (early_refresh=False)")
        print(f"| {label} | " + " | ".join(cells) + f" | {cpu:.2f} |")


if __name__ == "__main__":
    main()
