"""Benchmark suites as data: which experiments run, on what, with which optimizers.

A :class:`Suite` is a tuple of :class:`Experiment` s plus protocol switches (number of seeds,
learning-rate tuning, speed measurement). The runner (:mod:`ocnopt.bench.runner`) interprets
them; nothing here trains anything. :func:`apply_overrides` implements the command-line
overrides (``--dataset/--model/--optimizers/--seeds/--epochs/...``).

Experiment kinds
----------------
* ``compare``: tune lr on the validation split (1 seed), then ``seeds`` runs at the best lr.
  With ``paper`` set, the report puts the paper's number for that row beside ours.
* ``robustness``: tune as above, then ``seeds`` runs at ``best_lr * m`` for every multiplier.
* ``vanishing``: like ``compare`` but records per-layer update/gradient norms every
  ``norm_every`` steps (meant for the deep-sigmoid network; ``loss="mmc"`` as in DDPNOpt).
* ``ablation``: the feedback ablation: for every :class:`AblationGrid`, the base optimizer
  (feedback off) and its OCNOpt variant (feedback on, all else equal) at every lr x second
  hyperparameter of the grid, ``seeds`` seeds each, no tuning.

A suite may also measure the cost per iteration against the batch size (:class:`CostConfig`,
measured by :mod:`ocnopt.bench.cost`), or run a Neural-ODE profile (``ode``: a profile name of
:mod:`ocnopt.bench.ode_suite`, which owns its protocol).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AblationGrid",
    "CostConfig",
    "FIRST_ORDER",
    "GAME_OPTIMIZERS",
    "KINDS",
    "ROBUSTNESS_MULTIPLIERS",
    "SUITES",
    "Experiment",
    "Suite",
    "apply_overrides",
    "get_suite",
]

KINDS = ("compare", "robustness", "vanishing", "ablation")
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
class AblationGrid:
    """One panel of the feedback ablation: ``base`` (registry name, feedback off) against
    ``variant`` (the same optimizer with the feedback on, all else equal) at every ``lrs`` x
    ``values`` of ``param`` (``momentum``, or ``beta1`` = Adam's first beta with beta2 0.999)."""

    base: str
    variant: str
    param: str
    values: tuple[float, ...]
    lrs: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.param not in ("momentum", "beta1"):
            raise ValueError(f"ablation param must be 'momentum' or 'beta1', got {self.param!r}")
        if not self.values or not self.lrs:
            raise ValueError("an ablation grid needs at least one value and one lr")

    def options(self, value: float) -> dict[str, Any]:
        """Optimizer keyword arguments setting ``param`` to ``value`` (JSON-ready)."""
        if self.param == "beta1":
            return {"betas": [float(value), 0.999]}
        return {"momentum": float(value)}


@dataclass(frozen=True)
class CostConfig:
    """Cost per iteration against the batch size (:mod:`ocnopt.bench.cost`).

    Synthetic N(0, 1) inputs of ``input_shape`` and random labels (cost does not depend on
    the values) through ``build_model(model, dataset=dataset)``; every optimizer in
    ``optimizers`` at every batch size: ``warmup`` untimed steps, then ``rounds`` interleaved
    rounds of ``steps`` timed steps (median of the rounds' mean s/iter). Larger batches of a
    method are skipped once its step takes more than ``max_step_s`` seconds. ``memory``:
    measure peak memory (a fresh subprocess per point on CPU). ``num_threads``: torch threads
    while measuring (``None``: leave as is).
    """

    optimizers: tuple[str, ...]
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    model: str = "fcn"
    dataset: str = "digits"
    input_shape: tuple[int, ...] = (64,)
    num_classes: int = 10
    steps: int = 20
    warmup: int = 3
    rounds: int = 3
    max_step_s: float = 30.0
    memory: bool = True
    num_threads: int | None = 1


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
        loss: ``cross_entropy`` or ``mmc`` (:mod:`ocnopt.bench.losses`).
        seeds: seeds at the best lr for this experiment (``None``: the suite's).
        paper: ``(net, data)`` key of the paper's table (:mod:`ocnopt.bench.paper`) this row
            reproduces, e.g. ``("FCN", "MNIST")``.
        ablation: the grids of an ``ablation`` experiment.
        lr_from: name of an earlier experiment of the suite whose tuned lr (per optimizer) this
            one reuses instead of tuning its own (the default lr where that one has none).
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
    loss: str = "cross_entropy"
    seeds: int | None = None
    paper: tuple[str, str] | None = None
    ablation: tuple[AblationGrid, ...] = ()
    lr_from: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown experiment kind {self.kind!r}; valid: {', '.join(KINDS)}")
        for name in ("epochs", "batch_size", "norm_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if (self.kind == "ablation") != bool(self.ablation):
            raise ValueError("an ablation experiment needs ablation grids, and only it has them")
        if self.lr_from is not None and self.kind not in ("compare", "vanishing"):
            raise ValueError(f"lr_from applies to compare and vanishing experiments, not "
                             f"{self.kind!r}")

    @property
    def name(self) -> str:
        """Unique name, e.g. ``digits-fcn``, ``digits-fcn-robustness`` or
        ``digits-deep-sigmoid-mmc-vanishing``."""
        base = f"{self.dataset}-{self.model}"
        if self.loss != "cross_entropy":
            base += f"-{self.loss}"
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
    cost: CostConfig | None = None
    ode: str | None = None  # a profile of ocnopt.bench.ode_suite

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

# ---------------------------------------------------------------- the DDPNOpt paper's experiments
# The paper's seven methods; DDPNOpt's column is ocnopt-adam on FCNs (adaptive diagonal) and
# ocnopt-ekfac on CNNs (Gauss-Newton), and the other OCNOpt variant runs beside it. vanilla-ddp
# is tiny_only: it runs where the network fits (WINE) and is reported as skipped elsewhere.
_PAPER_BASELINES = ("sgd", "rmsprop", "adam", "ekfac", "emsa", "vanilla-ddp")
_DDPNOPT_FCN = _PAPER_BASELINES + ("ocnopt-adam", "ocnopt-ekfac")
_DDPNOPT_CNN = _PAPER_BASELINES + ("ocnopt-ekfac", "ocnopt-adam")
_VANISHING_MMC = ("sgd", "sgd-vgr", "ekfac", "ocnopt-identity", "ocnopt-adam", "ocnopt-ekfac")
_ABLATION_GRIDS = (
    AblationGrid("sgd-open", "ocnopt-identity", "momentum", (0.0, 0.5, 0.9),
                 (0.01, 0.03, 0.1, 0.3, 1.0)),
    AblationGrid("rmsprop-open", "ocnopt-rmsprop", "momentum", (0.0, 0.5, 0.9),
                 (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
    AblationGrid("adam-open", "ocnopt-adam", "beta1", (0.0, 0.5, 0.9),
                 (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
    AblationGrid("ekfac", "ocnopt-ekfac", "momentum", (0.0, 0.5, 0.9),
                 (1e-3, 3e-3, 1e-2, 3e-2, 0.1)),
)
_COST_OPTIMIZERS = ("adam", "ekfac", "ocnopt-adam", "ocnopt-ekfac", "emsa", "vanilla-ddp")

# ---------------------------------------------------------------- the game-theoretic feedback
#: The information structures on one base curvature (EKFAC) beside its feedback-off version and
#: two first-order baselines.
GAME_OPTIMIZERS = ("sgd", "adam", "ekfac", "ocnopt-ekfac-markov", "ocnopt-ekfac-nash",
                   "ocnopt-ekfac-cooperative")
#: Budget (2 shared CPU cores, one thread, about an hour; about 42 min of CPU time measured
#: per step): the networks have 12k-20k parameters and a stride-2 stem (their blocks see 14x14
#: maps and smaller); lr is tuned on mnist5k's validation split (4 epochs) and reused for one
#: epoch of the full Fashion-MNIST (430 steps).
GAME_EXPERIMENTS = tuple(
    exp for model in ("resnet", "inception") for exp in (
        Experiment("mnist5k", model, GAME_OPTIMIZERS, epochs=4, batch_size=128, eval_every=12,
                   num_threads=1),
        Experiment("fashion-mnist", model, GAME_OPTIMIZERS, epochs=1, batch_size=128,
                   eval_every=108, num_threads=1, lr_from=f"mnist5k-{model}"),
    ))


def _paper_fcn(dataset: str, paper: str, **kw: Any) -> Experiment:
    base: dict[str, Any] = dict(dataset=dataset, model="fcn", optimizers=_DDPNOPT_FCN,
                                epochs=20, batch_size=32, num_threads=1, seeds=10,
                                paper=("FCN", paper))
    return Experiment(**{**base, **kw})


def _paper_cnn(dataset: str, paper: str, **kw: Any) -> Experiment:
    base: dict[str, Any] = dict(dataset=dataset, model="cnn", optimizers=_DDPNOPT_CNN,
                                epochs=10, batch_size=128, seeds=3, paper=("CNN", paper))
    return Experiment(**{**base, **kw})


#: Every row of the paper's table this benchmark can run: offline first, then the rows that
#: need --data-dir (skipped, with how to get the data, when it is absent).
DDPNOPT_TABLE_ROWS = (
    _paper_fcn("wine", "WINE", batch_size=8),
    _paper_fcn("digits", "DIGITS"),
    _paper_fcn("mnist5k", "MNIST"),
    _paper_fcn("fashion-mnist", "F-MNIST", epochs=5, seeds=5),
    _paper_cnn("mnist5k", "MNIST"),
    _paper_cnn("fashion-mnist", "F-MNIST", subset=5000, eval_subset=2000),
    _paper_fcn("mnist", "MNIST", epochs=10, seeds=5),
    _paper_cnn("mnist", "MNIST"),
    _paper_cnn("svhn", "SVHN"),
    _paper_cnn("cifar10", "CIFAR-10", epochs=20),
)
DDPNOPT_VANISHING = Experiment(
    "digits", "deep-sigmoid", _VANISHING_MMC, epochs=30, batch_size=32, kind="vanishing",
    loss="mmc", eval_every=10, norm_every=5, num_threads=1, seeds=10)
DDPNOPT_ABLATION = Experiment(
    "digits", "fcn", (), epochs=10, batch_size=32, kind="ablation", ablation=_ABLATION_GRIDS,
    num_threads=1, seeds=10)
DDPNOPT_COST = CostConfig(_COST_OPTIMIZERS)

_QUICK_GRIDS = tuple(dataclasses.replace(g, values=g.values[1:], lrs=g.lrs[1:4:2])
                     for g in _ABLATION_GRIDS)
DDPNOPT_QUICK = (
    _paper_fcn("wine", "WINE", batch_size=8, epochs=2, seeds=2),
    _paper_fcn("digits", "DIGITS", epochs=2, seeds=2),
    _paper_fcn("mnist5k", "MNIST", epochs=1, seeds=2, subset=300),
    dataclasses.replace(DDPNOPT_VANISHING, epochs=3, seeds=2),
    dataclasses.replace(DDPNOPT_ABLATION, epochs=2, seeds=2, ablation=_QUICK_GRIDS),
)

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
            "ddpnopt",
            "the DDPNOpt paper's experiments: every row of its accuracy table that runs here "
            "(WINE/DIGITS/mnist5k/Fashion-MNIST FCN, mnist5k CNN; MNIST, SVHN, CIFAR-10 with "
            "--data-dir; Fashion-MNIST CNN without a paper number) with the paper's seven "
            "methods beside its numbers, vanishing gradients with the MMC loss, the feedback "
            "ablation over an lr x momentum grid, and the cost against the batch size (hours on "
            "2 CPU cores; see docs/ddpnopt-reproduction.md)",
            (*DDPNOPT_TABLE_ROWS, DDPNOPT_VANISHING, DDPNOPT_ABLATION), seeds=10,
            cost=DDPNOPT_COST,
        ),
        Suite("ddpnopt-table", "the DDPNOpt suite's accuracy-table rows only",
              DDPNOPT_TABLE_ROWS, seeds=10),
        Suite("ddpnopt-vanishing", "the DDPNOpt suite's vanishing-gradient experiment (deep "
              "sigmoid net, MMC loss, DIGITS)", (DDPNOPT_VANISHING,), seeds=10),
        Suite("ddpnopt-ablation", "the DDPNOpt suite's feedback ablation over lr x momentum "
              "(or beta1) grids on the DIGITS FCN", (DDPNOPT_ABLATION,), seeds=10),
        Suite("ddpnopt-cost", "the DDPNOpt suite's cost per iteration and memory against the "
              "batch size (8..256, DIGITS FCN)", (), seeds=1, lr_tuning=False,
              cost=DDPNOPT_COST),
        Suite(
            "ddpnopt-quick",
            "a few-minute smoke version of 'ddpnopt': WINE/DIGITS/mnist5k FCN rows (1-2 "
            "epochs, 2 seeds, lr not tuned), vanishing (3 epochs), a 2x2 ablation grid per "
            "base, cost at batch 8 and 32",
            DDPNOPT_QUICK, seeds=2, lr_tuning=False,
            cost=dataclasses.replace(DDPNOPT_COST, batch_sizes=(8, 32), steps=3, rounds=1,
                                     max_step_s=5.0),
        ),
        # ---- Neural ODEs (SNOpt): ocnopt.bench.ode_suite owns these profiles' protocol
        Suite("ode", "Neural ODEs (SNOpt): ConvODENet (width 16) on full Fashion-MNIST and the "
              "MNIST 5k subset, the ODE-RNN on JapaneseVowels and BasicMotions, the CNF on four "
              "2-D densities and the breast-cancer table; lr tuned on val, one seed; NFE and t1 "
              "over training, learned t1, cost and memory (budget about 75 min on 2 shared CPU "
              "cores, one torch thread)", (), seeds=1, ode="full"),
        Suite("ode-quick", "a one-minute smoke version of 'ode'", (), seeds=1, ode="quick"),
        Suite(
            "game",
            "the game-theoretic feedback on non-Markovian nets: a small ResNet (BasicBlocks, "
            "BatchNorm, in-place residual sums, 1x1-conv downsample) and a small inception-style "
            "CNN on mnist5k (4 epochs, lr tuned on val) and the full Fashion-MNIST (1 epoch, "
            "mnist5k's lr; Debian dataset-fashion-mnist or --data-dir); SGD, Adam, EKFAC and "
            "OCNOpt-EKFAC with information markov / nash / cooperative; batch 128, 3 seeds, one "
            "thread (about an hour on 2 shared CPU cores)",
            GAME_EXPERIMENTS, seeds=3,
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
            if (ds, mo) != (exp.dataset, exp.model):
                changes["paper"] = None  # no longer the paper's row
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
            if seeds is not None:
                changes["seeds"] = None  # the suite-wide override wins
            if exp.lr_from is not None:  # the source experiment under the same override
                src = next((e for e in suite.experiments if e.name == exp.lr_from), None)
                changes["lr_from"] = None if src is None else dataclasses.replace(
                    src, dataset=ds if datasets else src.dataset,
                    model=mo if models else src.model).name
            new = dataclasses.replace(exp, **changes)
            exps.setdefault(new.name, new)
    kept: list[Experiment] = []
    for new in exps.values():  # lr_from must name another experiment that runs before it
        if new.lr_from is not None and new.lr_from not in {e.name for e in kept}:
            new = dataclasses.replace(new, lr_from=None)
        kept.append(new)
    return dataclasses.replace(
        suite,
        experiments=tuple(kept),
        seeds=suite.seeds if seeds is None else seeds,
        lr_tuning=suite.lr_tuning if lr_tuning is None else lr_tuning,
    )
