"""Benchmark suites as data: which experiments run, on what, with which optimizers.

A :class:`Suite` is a tuple of :class:`Experiment` s plus protocol switches (number of seeds,
learning-rate tuning, speed measurement). The runner (:mod:`ocnopt.bench.runner`) interprets
them; nothing here trains anything. :func:`apply_overrides` implements the command-line
overrides (``--dataset/--model/--optimizers/--seeds/--epochs/...``).

Experiment kinds
----------------
* ``compare``: tune lr on the validation split (1 seed), then ``seeds`` runs at the best lr.
* ``robustness``: tune as above, then ``seeds`` runs at ``best_lr * m`` for every multiplier.
* ``vanishing``: like ``compare`` but records per-layer update/gradient norms every
  ``norm_every`` steps (meant for the deep-sigmoid network).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FIRST_ORDER",
    "KINDS",
    "ROBUSTNESS_MULTIPLIERS",
    "SUITES",
    "Experiment",
    "Suite",
    "apply_overrides",
    "get_suite",
]

KINDS = ("compare", "robustness", "vanishing")
#: The first-order baselines that define the time-to-target accuracy.
FIRST_ORDER = ("sgd", "rmsprop", "adam")
#: lr multipliers of the robustness sweep (applied to each method's tuned lr).
ROBUSTNESS_MULTIPLIERS = (0.1, 0.3, 1.0, 3.0, 10.0)

_CORE = ("sgd", "adam", "rmsprop", "kfac", "ekfac", "ocnopt-identity", "ocnopt-adam",
         "ocnopt-ekfac")
_OC = ("emsa", "vanilla-ddp")
_PEERS = ("soap", "shampoo", "singd")
_VANISHING = ("sgd", "adam", "ekfac", "ocnopt-identity", "ocnopt-adam", "ocnopt-ekfac")


@dataclass(frozen=True)
class Experiment:
    """One dataset/model combination trained with several optimizers.

    Attributes:
        dataset, model: names accepted by ``load_dataset`` / ``build_model``.
        optimizers: registry names; unregistered or unavailable ones are skipped (and reported).
        epochs, batch_size: training length and minibatch size.
        kind: ``compare`` | ``robustness`` | ``vanishing``.
        model_options: extra ``build_model`` keyword arguments.
        subset: cap on the training split (fixed stratified sample), ``None`` = all.
        eval_subset: evaluate on the first N samples of the fixed val/test splits (cheaper
            learning curves for the image sets), ``None`` = all.
        eval_every: also evaluate every this many steps (epoch ends are always evaluated).
        norm_every: record per-layer norms every this many steps (vanishing only).
        lr_multipliers: robustness grid, relative to the tuned lr.
        num_threads: ``torch.set_num_threads`` during the experiment (``None``: leave as is);
            1 is fastest for the tiny networks, where intra-op threads only add overhead.
    """

    dataset: str
    model: str
    optimizers: tuple[str, ...]
    epochs: int
    batch_size: int
    kind: str = "compare"
    model_options: dict[str, Any] = field(default_factory=dict)
    subset: int | None = None
    eval_subset: int | None = None
    eval_every: int | None = None
    norm_every: int = 5
    lr_multipliers: tuple[float, ...] = ROBUSTNESS_MULTIPLIERS
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown experiment kind {self.kind!r}; valid: {', '.join(KINDS)}")
        for name in ("epochs", "batch_size", "norm_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def name(self) -> str:
        """Unique name, e.g. ``digits-fcn`` or ``digits-fcn-robustness``."""
        base = f"{self.dataset}-{self.model}"
        return base if self.kind == "compare" else f"{base}-{self.kind}"


@dataclass(frozen=True)
class Suite:
    """A named list of experiments plus protocol switches."""

    name: str
    description: str
    experiments: tuple[Experiment, ...] = ()
    seeds: int = 3
    lr_tuning: bool = True
    speed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used in ``results.json``)."""
        d = dataclasses.asdict(self)
        d["experiments"] = [{"name": e.name, **dataclasses.asdict(e)} for e in self.experiments]
        return d


def _digits_fcn(**kw: Any) -> Experiment:
    base: dict[str, Any] = dict(dataset="digits", model="fcn", optimizers=_CORE, epochs=15,
                                batch_size=32, eval_every=10, num_threads=1)
    return Experiment(**{**base, **kw})


def _wine_fcn(**kw: Any) -> Experiment:
    base: dict[str, Any] = dict(dataset="wine", model="fcn", optimizers=_CORE + _OC, epochs=15,
                                batch_size=12, eval_every=5, num_threads=1)
    return Experiment(**{**base, **kw})


_FULL_OPTS = _CORE + _OC + _PEERS


def _fashion_fcn(**kw: Any) -> Experiment:
    base: dict[str, Any] = dict(dataset="fashion-mnist", model="fcn", optimizers=_CORE,
                                epochs=3, batch_size=32, subset=10000, eval_subset=2000,
                                eval_every=100, num_threads=1)
    return Experiment(**{**base, **kw})


def _fashion_cnn(**kw: Any) -> Experiment:
    base: dict[str, Any] = dict(dataset="fashion-mnist", model="cnn", optimizers=_CORE,
                                epochs=3, batch_size=128, subset=5000, eval_subset=2000,
                                eval_every=13)
    return Experiment(**{**base, **kw})

SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "quick",
            "DIGITS FCN (tanh, width 32), batch 32, 8 optimizers + the external peers when "
            "installed, lr tuned on val, 3 seeds (the default; about 1 min on 2 cores)",
            (_digits_fcn(optimizers=_CORE + _PEERS),),
        ),
        Suite(
            "wine",
            "WINE FCN (tanh, width 10), batch 12, incl. the optimal-control baselines (E-MSA, "
            "vanilla DDP) when registered",
            (_wine_fcn(),),
        ),
        Suite(
            "robustness",
            "DIGITS FCN: final accuracy over lr = best x {0.1, 0.3, 1, 3, 10} per method",
            (_digits_fcn(kind="robustness"),),
        ),
        Suite(
            "vanishing",
            "deep sigmoid net (10 x 32) on DIGITS: per-layer update norms and accuracy",
            (_digits_fcn(model="deep-sigmoid", kind="vanishing", optimizers=_VANISHING,
                         epochs=15),),
        ),
        Suite(
            "fashion",
            "Fashion-MNIST (Debian dataset-fashion-mnist or --data-dir): FCN (10k train "
            "subset, batch 32) and the paper's CNN (5k subset, batch 128), 8 optimizers, lr "
            "tuned, 3 seeds, curves on 2k val/test samples (about 20 min on 2 CPU cores)",
            (_fashion_fcn(), _fashion_cnn()),
        ),
        Suite("speed", "ms/step and memory of each curvature vs Adam (ocnopt.bench.speed)",
              (), seeds=1, lr_tuning=False, speed=True),
        Suite(
            "full",
            "DIGITS+WINE FCN, Fashion-MNIST FCN+CNN (as in 'fashion'), mnist5k FCN, all "
            "optimizers incl. available peers, 3 seeds, robustness, vanishing, speed (hours on "
            "2 CPU cores; meant for --device cuda)",
            (
                _digits_fcn(optimizers=_FULL_OPTS, epochs=20),
                _wine_fcn(optimizers=_FULL_OPTS),
                _fashion_fcn(optimizers=_FULL_OPTS),
                _fashion_cnn(optimizers=_FULL_OPTS),
                Experiment("mnist5k", "fcn", _FULL_OPTS, epochs=15, batch_size=32,
                           eval_every=20, num_threads=1),
                _digits_fcn(optimizers=_FULL_OPTS, epochs=20, kind="robustness"),
                _digits_fcn(model="deep-sigmoid", kind="vanishing", optimizers=_VANISHING,
                            epochs=30),
            ),
            seeds=3,
            speed=True,
        ),
        Suite(
            "smoke",
            "tiny CI check: DIGITS FCN on 128 training samples, 1 epoch, sgd + ocnopt-identity",
            (_digits_fcn(optimizers=("sgd", "ocnopt-identity"), epochs=1, subset=128,
                         eval_every=2),),
            seeds=2,
        ),
    )
}


def get_suite(name: str) -> Suite:
    """The suite called ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid: {', '.join(SUITES)}")
    return SUITES[name]


def apply_overrides(
    suite: Suite,
    *,
    datasets: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
    seeds: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    subset: int | None = None,
    lr_tuning: bool | None = None,
    num_threads: int | None = None,
) -> Suite:
    """Return ``suite`` with command-line overrides applied (``None`` = keep the suite's value).

    ``datasets``/``models`` replace every experiment's dataset/model (the product of both when
    several are given; duplicates by name are dropped). The other fields replace the values of
    every experiment. A suite without experiments (``speed``) gains none.
    """
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    exps: dict[str, Experiment] = {}
    for exp in suite.experiments:
        for ds, mo in itertools.product(datasets or [exp.dataset], models or [exp.model]):
            changes: dict[str, Any] = {"dataset": ds, "model": mo}
            if mo != exp.model:
                changes["model_options"] = {}
            if optimizers is not None:
                changes["optimizers"] = tuple(optimizers)
            if epochs is not None:
                changes["epochs"] = epochs
            if batch_size is not None:
                changes["batch_size"] = batch_size
            if subset is not None:
                changes["subset"] = subset
            if num_threads is not None:
                changes["num_threads"] = num_threads
            new = dataclasses.replace(exp, **changes)
            exps.setdefault(new.name, new)
    return dataclasses.replace(
        suite,
        experiments=tuple(exps.values()),
        seeds=suite.seeds if seeds is None else seeds,
        lr_tuning=suite.lr_tuning if lr_tuning is None else lr_tuning,
    )
