"""Per-step cost of the game-feedback machinery (``ocnopt.feedback``) on a small ResNet.

Timing only (random inputs of Fashion-MNIST's shape; no accuracy is measured)::

    python examples/game_feedback_cost.py [--batch 128] [--reps 15] [--threads 1]

The network is a CIFAR-style ResNet-20 (three stages of three torchvision-style BasicBlocks,
16/32/64 channels, BatchNorm, 1x1-conv+BN downsampling skips) on 1x28x28 inputs.  Measured
(medians of the process CPU time over ``--reps`` interleaved repetitions):

* the reference step: ``OCNOpt(curvature="identity")`` with today's (Markovian) feedback;
* each piece the game feedback adds to such a step: recording the first forward (module hooks
  and the in-place guard), the graph analysis, the node hooks in the backward, observing the
  second forward, and the per-layer feedback sums (``markov`` / ``nash``) in it;
* the cooperative stage solves (per-sample Gram matrices and the joint system) of the two
  downsampling blocks.

The last column relates each piece to the reference step; their sum estimates the overhead of a
``nash`` step over today's step (the ``nash`` target is at most 1.1x).
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
from ocnopt.feedback import GameFeedback, joint_weights, output_inner, per_sample_gram
from ocnopt.hooks import FeedbackPass, ForwardCapture
from ocnopt.layers import helper_for


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


def median_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median CPU time (ms) of each function, repetitions interleaved (after one warm-up).

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
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet20()
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    params = [p for p in model.parameters() if p.requires_grad]
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm parameters: open-loop fallback warning
        opt = OCNOpt(model, lr=0.0, curvature="identity")  # lr 0: the model stays fixed

    games = {info: GameFeedback(model, layers, info) for info in ("markov", "nash",
                                                                  "cooperative")}

    def first(info: str) -> Tensor:
        with games[info].record(), torch.enable_grad():
            return closure()

    def prepared(info: str) -> Tensor:
        loss = first(info)
        games[info].prepare(loss)
        return loss

    def backward_plain() -> None:
        torch.autograd.grad(closure(), params)

    def backward_collect(info: str) -> None:
        loss = prepared(info)
        with games[info].collect():
            torch.autograd.grad(loss, params)

    def second(info: str | None) -> None:
        game = games[info] if info else None
        players = [p.call.module for p in game.plan.players] if game else []

        def on_input(module: nn.Module, x_hat: Tensor) -> bool:
            game.feedback(module, x_hat)
            return False

        with torch.no_grad():
            if game is None:
                closure()
            else:
                with game.observe(), FeedbackPass([], players, on_input):
                    closure()

    for info in games:  # partials for the second-pass measurements
        backward_collect(info)
    nash = games["nash"]
    with ForwardCapture(layers) as cap, torch.enable_grad():
        loss = closure()
    torch.autograd.grad(loss, params)
    coop = games["cooperative"]
    groups = [[coop.plan.players[i].call.module for i in g] for g in coop.plan.groups]

    outputs = {p.call.module: p.call.outputs[0].value() for p in coop.plan.players}

    def cooperative_solves() -> None:
        for members in groups:
            recs = [cap.records[m] for m in members]
            grams = [per_sample_gram(helper_for(m)[0], r.inputs[0], r.grads[0])
                     for m, r in zip(members, recs, strict=True)]
            inner = [output_inner(r.grads[0], outputs[m]) for m, r in zip(members, recs,
                                                                          strict=True)]
            joint_weights(grams, inner, torch.ones(args.batch), 0.1, 1.0)

    t = median_ms({
        "step": lambda: opt.step(closure),
        "fwd": lambda: closure(),
        "fwd_rec": lambda: first("nash"),
        "fwd_rec_plan": lambda: prepared("nash"),
        "bwd": backward_plain,
        "bwd_collect": lambda: backward_collect("nash"),
        "fwd_rec_plan_markov": lambda: prepared("markov"),
        "bwd_collect_markov": lambda: backward_collect("markov"),
        "p2": lambda: second(None),
        "p2_markov": lambda: second("markov"),
        "p2_nash": lambda: second("nash"),
        "coop": cooperative_solves,
    }, args.reps)
    step = t["step"]
    backward = t["bwd"] - t["fwd"]  # the backward alone

    def hooks(info: str) -> float:  # node-hook overhead in the backward
        suffix = "" if info == "nash" else "_markov"
        return t[f"bwd_collect{suffix}"] - t[f"fwd_rec_plan{suffix}"] - backward

    rows = [
        ("reference: OCNOpt identity step (Markovian feedback)", step),
        ("record the first forward (hooks, in-place guard)", t["fwd_rec"] - t["fwd"]),
        ("graph analysis (analyse)", t["fwd_rec_plan"] - t["fwd_rec"]),
        ("node hooks in the backward (nash)", hooks("nash")),
        ("second pass: observe + feedback sums, markov", t["p2_markov"] - t["p2"]),
        ("second pass: observe + feedback sums, nash", t["p2_nash"] - t["p2"]),
        (f"cooperative solves ({len(groups)} groups)", t["coop"]),
    ]
    extra_nash = t["fwd_rec_plan"] - t["fwd"] + hooks("nash") + rows[5][1]
    extra_markov = t["fwd_rec_plan_markov"] - t["fwd"] + hooks("markov") + rows[4][1]
    n_terms = sum(len(p.terms) for p in nash.plan.players)
    print(f"ResNet-20, batch {args.batch}, {args.threads} thread(s), torch "
          f"{torch.__version__}; {len(nash.plan.players)} layers, {n_terms} nash cut terms; "
          f"medians of {args.reps}")
    print("| piece | ms | / reference step |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / step:.3f} |")
    print(f"| **nash total added** | {extra_nash:.2f} | {extra_nash / step:.3f} |")
    print(f"| markov (own partials) total added | {extra_markov:.2f} | {extra_markov / step:.3f} |")
    print(f"estimated nash step / today's step: {(step + extra_nash) / step:.3f}; "
          f"nash / markov (both on the game machinery): "
          f"{(step + extra_nash) / (step + extra_markov):.3f}")


if __name__ == "__main__":
    main()
