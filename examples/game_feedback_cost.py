"""Per-step cost of the information structures of OCNOpt's feedback on a small ResNet.

Timing only (random inputs of Fashion-MNIST's shape; no accuracy is measured)::

    python examples/game_feedback_cost.py [--batch 128] [--reps 15] [--threads 1]

The network is a CIFAR-style ResNet-20 (three stages of three torchvision-style BasicBlocks,
16/32/64 channels, BatchNorm, 1x1-conv+BN downsampling skips) on 1x28x28 inputs; the optimizer
is ``OCNOpt(curvature=...)`` with ``lr=0`` (the model stays fixed, so every repetition does the
same work).  Configurations, run interleaved, process CPU time per step:

* ``open loop``: ``feedback=False`` (one forward and backward);
* ``fallback``: the Markovian step without the game machinery (own input, total gradient),
  which OCNOpt takes when a closure's ``backward()`` cannot be hooked;
* ``markov``, ``nash``, ``cooperative``: ``information=...``.

Ratios are medians of per-repetition ratios (pairs cancel slow drifts of a shared machine).
The target is ``nash / markov <= 1.1``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt import OCNOpt


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def resnet20() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU(inplace=True)]
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(3):
            layers.append(BasicBlock(cin, width, 2 if block == 0 and stage > 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def cpu_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """CPU time (ms) of each function per repetition, repetitions interleaved (one warm-up).

    CPU time of this process rather than wall time: on a shared machine it does not count the
    time other processes hold the cores (with one thread it equals wall time on a quiet one).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(1e3 * (time.process_time() - t0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curvature", default="identity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet20()
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))

    def closure() -> Tensor:
        return F.cross_entropy(model(x), y)

    def step(opt: OCNOpt, hookable: bool = True) -> Callable[[], object]:
        def unhookable() -> Tensor:  # the closure's backward runs where no hook can see it
            loss = closure()
            if torch.is_grad_enabled():
                opt.zero_grad()
                with torch._C.DisableTorchFunction():
                    loss.backward()
            return loss
        return lambda: opt.step(closure if hookable else unhookable)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm parameters (open loop); the fallback note
        kw = dict(lr=0.0, curvature=args.curvature)
        fns = {"open loop": step(OCNOpt(model, feedback=False, **kw)),
               "fallback": step(OCNOpt(model, **kw), hookable=False)}
        for info in ("markov", "nash", "cooperative"):
            fns[info] = step(OCNOpt(model, information=info, **kw))
        t = cpu_ms(fns, args.reps)
    print(f"ResNet-20, batch {args.batch}, {args.threads} thread(s), curvature "
          f"{args.curvature}, torch {torch.__version__}; medians of {args.reps} repetitions "
          "(process CPU time)")
    print("| step | ms | / markov | / fallback |\n|---|---|---|---|")
    for name, ms in t.items():
        rel = [statistics.median(a / b for a, b in zip(ms, t[ref], strict=True))
               for ref in ("markov", "fallback")]
        print(f"| {name} | {statistics.median(ms):.1f} | {rel[0]:.3f} | {rel[1]:.3f} |")


if __name__ == "__main__":
    main()
