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

The last column relates each piece to the reference step.  The reference step already computes
the own-input sums, so a ``nash`` step adds the recording, the analysis, the hooks and the
skip-term part of the second pass (the ``nash`` target is at most 1.1x).
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
from ocnopt.feedback import (
    GameFeedback,
    analyse,
    joint_weights,
    output_inner,
    per_sample_gram,
)
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


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of ``a - b`` (pairs cancel slow drifts of the machine)."""
    return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True))


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

    def game(info: str) -> GameFeedback:
        return GameFeedback(model, layers, info)

    timed = {info: game(info) for info in ("markov", "nash")}  # first pass and backward
    ready = {info: game(info) for info in ("markov", "nash", "cooperative")}  # second pass

    def first_pass(g: GameFeedback | None, collect: bool) -> None:
        if g is None:
            torch.autograd.grad(closure(), params)
            return
        with g.record(), torch.enable_grad():
            loss = closure()
        g.prepare(loss)
        if collect:
            with g.collect():
                torch.autograd.grad(loss, params)
        else:
            torch.autograd.grad(loss, params)

    def second_pass(g: GameFeedback | None) -> None:
        if g is None:
            with torch.no_grad():
                closure()
            return

        def on_input(module: nn.Module, x_hat: Tensor) -> bool:
            g.feedback(module, x_hat)
            return False

        with torch.no_grad(), g.observe(), FeedbackPass([], [p.call.module for p in
                                                              g.plan.players], on_input):
            closure()

    for g in ready.values():
        first_pass(g, collect=True)
    nash, coop = ready["nash"], ready["cooperative"]
    with ForwardCapture(layers) as cap, torch.enable_grad():
        loss = closure()
    torch.autograd.grad(loss, params)
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

    probe = game("nash")
    with probe.record(), torch.enable_grad():
        recorded = closure()
    t = cpu_ms({
        "step": lambda: opt.step(closure),
        "plain": lambda: first_pass(None, False),
        "rec_plan_nash": lambda: first_pass(timed["nash"], False),
        "rec_plan_collect_nash": lambda: first_pass(timed["nash"], True),
        "rec_plan_collect_markov": lambda: first_pass(timed["markov"], True),
        "analyse": lambda: analyse(recorded, probe.recorder.calls, set(layers), "nash"),
        "p2": lambda: second_pass(None),
        "p2_markov": lambda: second_pass(ready["markov"]),
        "p2_nash": lambda: second_pass(ready["nash"]),
        "coop": cooperative_solves,
    }, args.reps)
    step = statistics.median(t["step"])
    rows = [
        ("reference: OCNOpt identity step (Markovian feedback)", step),
        ("first pass: recording (hooks, in-place guard) + analysis",
         paired(t, "rec_plan_nash", "plain")),
        ("  of which the graph analysis", statistics.median(t["analyse"])),
        ("partial-gradient hooks in the backward",
         paired(t, "rec_plan_collect_nash", "rec_plan_nash")),
        ("second pass: observation + skip-term sums", paired(t, "p2_nash", "p2_markov")),
        ("(own-input sums, part of the reference step too)", paired(t, "p2_markov", "p2")),
        (f"cooperative solves ({len(groups)} groups)", statistics.median(t["coop"])),
    ]
    extra_nash = paired(t, "rec_plan_collect_nash", "plain") + rows[4][1]
    extra_markov = paired(t, "rec_plan_collect_markov", "plain")
    n_terms = sum(len(p.terms) for p in nash.plan.players)
    print(f"ResNet-20, batch {args.batch}, {args.threads} thread(s), torch "
          f"{torch.__version__}; {len(nash.plan.players)} layers, {n_terms} nash cut terms; "
          f"medians of {args.reps} (differences: medians of paired differences), CPU time")
    print("| piece | ms | / reference step |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / step:.3f} |")
    print(f"| **nash: added to the reference step** | {extra_nash:.2f} | "
          f"{extra_nash / step:.3f} |")
    print(f"| markov on the game machinery: added | {extra_markov:.2f} | "
          f"{extra_markov / step:.3f} |")
    print(f"estimated nash step / reference step: {(step + extra_nash) / step:.3f}; "
          f"nash / markov, both on the game machinery: "
          f"{(step + extra_nash) / (step + extra_markov):.3f}")


if __name__ == "__main__":
    main()
