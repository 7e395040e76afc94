"""The DDPNOpt paper's own numbers, as data, and how our benchmark rows map onto them.

Source: DDPNOpt (Liu, Chen, Theodorou, "DDPNOpt: Differential Dynamic Programming Neural
Optimizer", ICLR 2021), Table 3, read from the first author's slide deck (public repository
ghliu/ghliu.github.io, commit 2f6dba8, ``assets/pdf/iclr-ddpnopt-slides.pdf``, slide 9):
test accuracy (%), mean over 10 random seeds. The runtime and vanishing-gradient numbers are
read by eye from slides of the same deck. These numbers are shown beside ours in the reports;
they are never a pass criterion of a test.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DDPNOPT_SOURCE",
    "DDPNOPT_TABLE",
    "METHODS",
    "PAPER_PROTOCOL",
    "PAPER_RUNTIME",
    "PAPER_SEEDS",
    "PAPER_VANISHING",
    "method_optimizer",
    "paper_row",
]

DDPNOPT_SOURCE = (
    "DDPNOpt (Liu, Chen, Theodorou, ICLR 2021), Table 3, from the first author's slides "
    "(ghliu/ghliu.github.io commit 2f6dba8, assets/pdf/iclr-ddpnopt-slides.pdf, slide 9); "
    "test accuracy (%), mean over 10 seeds")

#: The paper's seven methods (table columns), in its order.
METHODS = ("SGD-m", "RMSProp", "Adam", "EKFAC", "E-MSA", "vanilla DDP", "DDPNOpt")
#: Seeds behind every number of the table.
PAPER_SEEDS = 10

#: (net, data) -> accuracy (%) per method of :data:`METHODS`; ``None`` = N/A in the paper.
DDPNOPT_TABLE: dict[tuple[str, str], tuple[float | None, ...]] = {
    ("FCN", "WINE"): (94.35, 98.10, 98.13, 94.60, 93.56, 98.00, 98.18),
    ("FCN", "DIGITS"): (95.36, 94.33, 94.98, 95.24, 94.87, 91.68, 95.13),
    ("FCN", "MNIST"): (92.65, 91.89, 92.54, 92.73, 90.24, 90.42, 93.30),
    ("FCN", "F-MNIST"): (82.49, 83.87, 84.36, 84.12, 82.04, 81.98, 84.98),
    ("CNN", "MNIST"): (97.94, 98.05, 98.04, 98.02, 96.48, None, 98.09),
    ("CNN", "SVHN"): (89.00, 88.41, 87.76, 90.63, 79.45, None, 90.70),
    ("CNN", "CIFAR-10"): (71.26, 70.52, 70.04, 71.85, 61.42, None, 71.92),
}

#: What is known of the paper's protocol (algorithm.md section 8.1).
PAPER_PROTOCOL = (
    "FCN: 5 layers, hidden width 10-32, tanh on WINE/DIGITS, ReLU elsewhere, batch 8-32; CNN: "
    "4 conv 3x3x32 + 2 FC, batch 128; tuned lr; 10 seeds; full datasets. Epochs and the exact "
    "widths per dataset are not published. DDPNOpt's curvature: adaptive diagonal for FCNs, "
    "Gauss-Newton for CNNs.")

#: The runtime slide, read by eye (s/iter on MNIST, GPU): method -> (low, high).
PAPER_RUNTIME: dict[str, Any] = {
    "Adam": (0.05, 0.07), "EKFAC": (0.09, 0.12), "DDPNOpt": (0.09, 0.12), "E-MSA": (1.3, 1.9),
    "vanilla DDP": "0.4 -> 3 s/iter from batch 8 to 32",
    "memory": "DDPNOpt ~2.5 GB at batch 256; vanilla DDP 6 -> 50 GB",
}

#: The vanishing-gradient slide: sigmoid net (>= 9 layers) on DIGITS with the MMC loss.
PAPER_VANISHING = ("SGD-VGR and EKFAC stay at a training loss of ~9, DDPNOpt (second-order "
                   "variant) drops to ~7; its update norms are typically 5-10x larger")

# Which registry optimizer stands for a paper column. DDPNOpt's own curvature was the adaptive
# diagonal on FCNs and Gauss-Newton (here: EKFAC, a Kronecker Gauss-Newton) on CNNs.
_METHOD_OPTIMIZER = {"SGD-m": "sgd", "RMSProp": "rmsprop", "Adam": "adam", "EKFAC": "ekfac",
                     "E-MSA": "emsa", "vanilla DDP": "vanilla-ddp"}
_DDPNOPT_OPTIMIZER = {"FCN": "ocnopt-adam", "CNN": "ocnopt-ekfac"}


def method_optimizer(method: str, net: str) -> str:
    """Registry name standing for the paper's ``method`` column on network ``net``."""
    if method == "DDPNOpt":
        return _DDPNOPT_OPTIMIZER[net]
    if method not in _METHOD_OPTIMIZER:
        raise ValueError(f"unknown paper method {method!r}; valid: {', '.join(METHODS)}")
    return _METHOD_OPTIMIZER[method]


def paper_row(net: str, data: str) -> dict[str, float | None] | None:
    """``method -> accuracy (%)`` of the paper's row, ``None`` if the paper has no such row."""
    row = DDPNOPT_TABLE.get((net, data))
    return None if row is None else dict(zip(METHODS, row, strict=True))
