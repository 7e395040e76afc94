"""Benchmark protocol: training loop, metrics, lr tuning, seeds, resume.

Protocol (also written into ``report.md`` and ``docs/results-schema.md``)
------------------------------------------------------------------------
* Data: the fixed splits of :func:`ocnopt.bench.data.load_dataset` (train / val / test).
* Seeding: ``torch.manual_seed(seed)`` right before the model is built; the training
  ``DataLoader`` shuffles with its own ``torch.Generator().manual_seed(seed)``.
* lr tuning: every optimizer trains once (seed 0) per value of its registry ``lr_grid``; the lr
  with the highest final *validation* accuracy wins (ties: lower final train loss; diverged runs
  rank last). Without tuning the default lr is ``lr_grid[(len - 1) // 2]``. An experiment with
  ``lr_from`` reuses the lr an earlier experiment of the suite chose for each optimizer.
* Final runs: seeds ``0 .. seeds-1`` at the best lr (robustness: at ``best_lr * m`` for every
  multiplier ``m``). Runs are content-addressed (:meth:`RunConfig.run_id`), so the seed-0 run at
  the best lr IS the tuning run at that lr (trained once, selected on val, reported on test).
* Metrics per run: evaluation (eval mode, no grad) of test loss/accuracy before training, every
  ``eval_every`` steps and after every epoch, of val loss/accuracy before training and after
  every epoch (``null`` in between); ``time_s`` is training wall-clock only
  (batch fetch + step; evaluation excluded); ``ms_per_step`` is the median step time (CUDA
  synchronised), ``cpu_ms_per_step`` the median process CPU time of a step; final train loss =
  mean minibatch loss of the last epoch; peak memory = ``torch.cuda.max_memory_allocated`` on
  CUDA, ``null`` on CPU.
* Divergence: a non-finite minibatch loss is counted; the run is marked ``diverged`` and stopped
  when the parameters become non-finite or ``DIVERGE_PATIENCE`` consecutive losses are
  non-finite. A diverged run's final accuracy is chance level ``1/num_classes`` (its final
  parameters are unusable); ``last_finite`` keeps the last evaluation before divergence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from ocnopt.bench.data import DatasetError, DatasetSplits, DatasetUnavailableError, load_dataset
from ocnopt.bench.losses import BenchLoss, get_loss
from ocnopt.bench.models import build_model, count_parameters
from ocnopt.bench.optimizers import OPTIMIZERS, OptimizerSpec, get_optimizer, train_step
from ocnopt.bench.outdir import BenchError, check_writable, output_lock, write_json
from ocnopt.bench.schema import SCHEMA_VERSION, validate_run
from ocnopt.bench.suites import CostConfig, Experiment, Suite

__all__ = [
    "DIVERGE_PATIENCE",
    "SCHEMA_VERSION",
    "TINY_MAX_PARAMS",
    "BenchError",
    "RunConfig",
    "SpeedUnavailableError",
    "default_lr",
    "load_results",
    "run_cost",
    "run_speed",
    "run_suite",
    "train_run",
    "write_json",
]

log = logging.getLogger(__name__)

#: Consecutive non-finite minibatch losses after which a run counts as diverged.
DIVERGE_PATIENCE = 20
#: ``tiny_only`` optimizers (exact vanilla DDP) run only on models with at most this many params.
TINY_MAX_PARAMS = 2000
_CONV_MODELS = ("cnn", "small-cnn")


class SpeedUnavailableError(BenchError):
    """``ocnopt.bench.speed`` is not part of this installation."""


def default_lr(spec: OptimizerSpec) -> float:
    """The lr used without tuning: the middle (lower middle) of the spec's ``lr_grid``."""
    return float(spec.lr_grid[(len(spec.lr_grid) - 1) // 2])


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run (its hash is the run id)."""

    dataset: str
    model: str
    optimizer: str
    lr: float
    seed: int
    epochs: int
    batch_size: int
    model_options: dict[str, Any] = field(default_factory=dict)
    subset: int | None = None
    eval_every: int | None = None
    norm_every: int | None = None
    device: str = "cpu"
    eval_subset: int | None = None
    loss: str = "cross_entropy"
    optimizer_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists), equal to what a run file stores."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def run_id(self) -> str:
        """Readable, content-addressed id, e.g. ``digits-fcn-adam-lr0.001-s0-1a2b3c4d``."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
        return f"{self.dataset}-{self.model}-{self.optimizer}-lr{self.lr:.3g}-s{self.seed}-{digest}"


# --------------------------------------------------------------------------- helpers


def _finite_or_none(v: float | None) -> float | None:
    """``v`` as a float, or ``None`` when missing or non-finite (JSON has no NaN)."""
    return None if v is None or not math.isfinite(v) else float(v)


def load_results(out_dir: Path) -> dict[str, Any]:
    """Read ``out_dir/results.json``; ``BenchError`` if missing or unreadable."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise BenchError(f"no results.json in {out_dir} (run `ocnopt bench --out {out_dir}` "
                         "first, or add --resume to finish an interrupted suite)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON
        raise BenchError(f"{path} is not readable JSON: {exc}") from None


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def _evaluate(model: nn.Module, ds: TensorDataset, dev: torch.device, loss: BenchLoss,
              batch: int = 2048) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``ds`` in eval mode."""
    was_training = model.training
    model.eval()
    x_all, y_all = ds.tensors
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y_all), batch):
        x, y = x_all[i:i + batch].to(dev), y_all[i:i + batch].to(dev)
        out = model(x)
        loss_sum += float(loss.sum(out, y))
        correct += int((loss.predict(out) == y).sum())
    model.train(was_training)
    n = len(y_all)
    if n == 0:
        raise ValueError("cannot evaluate on an empty split")
    return loss_sum / n, correct / n


def _output_width(model: nn.Module, data: DatasetSplits, dev: torch.device) -> int:
    """Width ``D`` of the model's output (B, D), from one training sample."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = int(model(data.train.tensors[0][:1].to(dev)).shape[1])
    model.train(was_training)
    return width


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _layer_params(m: nn.Module) -> list[Tensor]:
    return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]


# --------------------------------------------------------------------------- one run


def train_run(cfg: RunConfig, data: DatasetSplits, *, progress: bool = True) -> dict[str, Any]:
    """Train one run and return its JSON-ready record (see ``docs/results-schema.md``)."""
    spec = get_optimizer(cfg.optimizer)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes,
                        dataset=data.name, **cfg.model_options).to(dev)
    loss_fn = get_loss(cfg.loss, data.num_classes, _output_width(model, data, dev))
    opt = spec.build(model, cfg.lr, **{**spec.options, **cfg.optimizer_options})
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = BatchSampler(RandomSampler(data.train, generator=gen), cfg.batch_size,
                           drop_last=False)
    loader = DataLoader(data.train, sampler=sampler, batch_size=None)
    steps_per_epoch = len(sampler)
    chance = 1.0 / data.num_classes

    hist: dict[str, list[Any]] = {k: [] for k in (
        "step", "epoch", "time_s", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")}
    layers = _norm_layers(model) if cfg.norm_every else []
    norms: dict[str, Any] | None = None
    if cfg.norm_every:
        norms = {"layers": [n for n, _ in layers], "step": [], "update_norm": [],
                 "grad_norm": []}

    step, clock, interval_losses = 0, 0.0, []
    step_times: list[float] = []
    step_cpu: list[float] = []
    nonfinite, consecutive = 0, 0
    diverged_at: int | None = None
    last_finite: dict[str, Any] | None = None
    epoch_losses: list[float] = []

    def record_eval(with_val: bool = True) -> None:
        nonlocal last_finite
        vl, va = _evaluate(model, data.val, dev, loss_fn) if with_val else (None, None)
        tl, ta = _evaluate(model, data.test, dev, loss_fn)
        finite = [v for v in interval_losses if math.isfinite(v)]
        hist["step"].append(step)
        hist["epoch"].append(round(step / max(steps_per_epoch, 1), 4))
        hist["time_s"].append(round(clock, 6))
        hist["train_loss"].append(statistics.fmean(finite) if finite else None)
        hist["val_loss"].append(_finite_or_none(vl))  # None between epoch ends
        hist["val_acc"].append(va)
        hist["test_loss"].append(_finite_or_none(tl))
        hist["test_acc"].append(ta)
        interval_losses.clear()
        if math.isfinite(tl) and (vl is None or math.isfinite(vl)):
            last_finite = {"step": step, "val_acc": va, "test_acc": ta}

    model.train()
    record_eval()
    from tqdm.auto import tqdm

    epochs_bar = tqdm(range(cfg.epochs), desc=f"  {cfg.optimizer} lr={cfg.lr:.3g} s{cfg.seed}",
                      unit="ep", leave=False, file=sys.stderr,
                      disable=None if progress else True)
    for _epoch in epochs_bar:
        epoch_losses = []
        it = iter(loader)
        while True:
            t_fetch = time.perf_counter()
            try:
                xb, yb = next(it)
            except StopIteration:
                break
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            t_fetch = time.perf_counter() - t_fetch
            record_norms = norms is not None and step % cfg.norm_every == 0  # type: ignore[operator]
            before = ([[p.detach().clone() for p in _layer_params(m)] for _, m in layers]
                      if record_norms else [])
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = train_step(opt, spec, model, xb, yb, loss_fn)
            lv = float(loss)  # synchronises on CUDA
            dt = time.perf_counter() - t0
            step_cpu.append(time.process_time() - c0)
            step += 1
            clock += t_fetch + dt
            step_times.append(dt)
            if record_norms and norms is not None:
                upd, grd = [], []
                with torch.no_grad():
                    for (_, m), old in zip(layers, before, strict=True):
                        ps = _layer_params(m)
                        upd.append(_finite_or_none(math.sqrt(sum(
                            float((p - o).pow(2).sum()) for p, o in zip(ps, old, strict=True)))))
                        gs = [p.grad for p in ps]
                        grd.append(None if any(g is None for g in gs) else _finite_or_none(
                            math.sqrt(sum(float(g.pow(2).sum()) for g in gs))))  # type: ignore[union-attr]
                norms["step"].append(step)
                norms["update_norm"].append(upd)
                norms["grad_norm"].append(grd)
            interval_losses.append(lv)
            epoch_losses.append(lv)
            if math.isfinite(lv):
                consecutive = 0
            else:
                nonfinite += 1
                consecutive += 1
                if consecutive >= DIVERGE_PATIENCE or not _params_finite(model):
                    diverged_at = step
                    break
            if cfg.eval_every and step % cfg.eval_every == 0 and step % steps_per_epoch:
                record_eval(with_val=False)
        if diverged_at is not None:
            record_eval()
            break
        record_eval()
        if not _params_finite(model):
            diverged_at = step
            break
    epochs_bar.close()

    diverged = diverged_at is not None
    finite_epoch = [v for v in epoch_losses if math.isfinite(v)]
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None
    final = {
        "train_loss": None if diverged or not finite_epoch else statistics.fmean(finite_epoch),
        "val_acc": chance if diverged else hist["val_acc"][-1],
        "test_acc": chance if diverged else hist["test_acc"][-1],
        "val_loss": None if diverged else hist["val_loss"][-1],
        "test_loss": None if diverged else hist["test_loss"][-1],
    }
    extra = getattr(opt, "skipped_steps", None)
    return {
        "run_id": cfg.run_id(),
        "config": cfg.to_dict(),
        "status": "diverged" if diverged else "ok",
        "diverged": diverged,
        "diverged_at_step": diverged_at,
        "nonfinite_steps": nonfinite,
        "optimizer_skipped_steps": int(extra) if isinstance(extra, int) else None,
        "chance_acc": chance,
        "last_finite": last_finite,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "train_time_s": clock,
        "ms_per_step": 1e3 * statistics.median(step_times) if step_times else None,
        "cpu_ms_per_step": 1e3 * statistics.median(step_cpu) if step_cpu else None,
        "peak_mem_mb": peak,
        "final": final,
        "history": hist,
        "layer_norms": norms,
        "num_params": count_parameters(model),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- speed


def run_speed(out_dir: Path, device: str, quick: bool) -> list[dict[str, Any]]:
    """Delegate to ``ocnopt.bench.speed.run_speed_suite`` (imported lazily)."""
    try:
        mod = importlib.import_module("ocnopt.bench.speed")
    except ModuleNotFoundError as exc:
        if exc.name in ("ocnopt.bench.speed", "ocnopt.bench"):
            raise SpeedUnavailableError(
                "the speed suite needs the module ocnopt.bench.speed (run_speed_suite), which "
                "is not part of this installation yet") from exc
        raise
    rows = mod.run_speed_suite(out_dir=Path(out_dir), device=device, quick=quick)
    return [dict(r) for r in rows]


# --------------------------------------------------------------------------- run files


def _reusable_record(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The finished record of ``cfg`` stored in ``path``, or ``None`` when there is none.

    Anything unusable there (unreadable, not UTF-8, not JSON, not a run record, a directory,
    the record of another configuration) is treated as missing, with a warning naming the file,
    so that ``--resume`` trains that run again instead of aborting the suite.
    """
    if not os.path.lexists(path):
        return None
    try:
        rec = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON
        log.warning("unreadable run file %s (%s): training this run again", path, exc)
        return None
    errors = validate_run(rec)
    if errors:
        log.warning("malformed run file %s (%s): training this run again", path,
                    "; ".join(errors[:3]))
        return None
    if rec["config"] != cfg.to_dict() or rec["run_id"] != cfg.run_id():
        log.warning("run file %s holds another configuration: training this run again", path)
        return None
    return rec


def _move_aside_if_directory(path: Path) -> None:
    """A directory where a run file belongs would make the write fail: rename it (kept)."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f"{path.name}.not-a-run-file-{os.getpid()}-{int(time.time())}")
        path.rename(aside)
        log.warning("%s was a directory, not a run file: moved it to %s", path, aside)


def run_cost(cfg: CostConfig, device: str) -> dict[str, Any]:
    """Cost per iteration against the batch size (:mod:`ocnopt.bench.cost`), JSON-ready."""
    from ocnopt.bench.cost import measure_cost

    log.info("cost: %d optimizers x %d batch sizes", len(cfg.optimizers), len(cfg.batch_sizes))
    with _threads(cfg.num_threads):
        torch.set_flush_denormal(True)  # denormals slow some CPU kernels; not what is measured
        try:
            rows = measure_cost(cfg, device, progress=lambda m: log.info("cost: %s", m))
        finally:
            torch.set_flush_denormal(False)
    return {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "device": device,
            "num_threads": torch.get_num_threads() if cfg.num_threads is None
            else cfg.num_threads, "rows": rows}


# --------------------------------------------------------------------------- suites


class _SuiteRun:
    """State of one suite execution: run store, dataset cache, counters, progress bar."""

    def __init__(self, suite: Suite, out_dir: Path, *, device: str, resume: bool,
                 data_dir: str | Path | None, strict_data: bool, verify_data: bool,
                 progress: bool) -> None:
        from tqdm.auto import tqdm

        self.suite, self.out_dir, self.device = suite, Path(out_dir), device
        self.resume, self.data_dir, self.strict = resume, data_dir, strict_data
        self.progress, self.verify_data = progress, verify_data
        self.runs_dir = self.out_dir / "runs"
        self.records: dict[str, dict[str, Any]] = {}
        self.trained: list[str] = []
        self.reused: list[str] = []
        self._data: dict[tuple[Any, ...], DatasetSplits] = {}
        self.best_lrs: dict[tuple[str, str], float] = {}  # (experiment, optimizer) -> tuned lr
        self.bar = tqdm(total=0, desc=f"{suite.name} runs", unit="run", file=sys.stderr,
                        disable=not progress, dynamic_ncols=True)

    # ---- runs
    def run(self, cfg: RunConfig, data: DatasetSplits) -> dict[str, Any]:
        rid = cfg.run_id()
        if rid in self.records:  # e.g. the seed-0 final run = the tuning run at the best lr
            self.bar.update(1)
            return self.records[rid]
        path = self.runs_dir / f"{rid}.json"
        rec = _reusable_record(path, cfg) if self.resume else None
        if rec is not None:
            self.reused.append(rid)
        else:
            self.bar.set_postfix_str(f"{cfg.dataset}/{cfg.model} {cfg.optimizer} "
                                     f"lr={cfg.lr:.3g} s{cfg.seed}", refresh=False)
            rec = train_run(cfg, data, progress=self.progress)
            _move_aside_if_directory(path)
            write_json(path, rec)
            self.trained.append(rid)
            if rec["diverged"]:
                log.info("run %s diverged at step %s", rid, rec["diverged_at_step"])
        self.bar.update(1)
        self.records[rid] = rec
        return rec

    # ---- data
    def _data_key(self, exp: Experiment) -> tuple[Any, ...]:
        flatten = False if exp.model in _CONV_MODELS else None
        return (exp.dataset, flatten, exp.subset, exp.eval_subset)

    def data(self, exp: Experiment) -> DatasetSplits:
        """The experiment's dataset (only the most recent one is kept in memory)."""
        key = self._data_key(exp)
        if key not in self._data:
            dataset, flatten, subset, eval_subset = key
            data = load_dataset(dataset, data_dir=self.data_dir, flatten=flatten, subset=subset,
                                verify=self.verify_data)
            if eval_subset is not None:  # first N of the fixed val/test splits
                data = dataclasses.replace(
                    data, val=TensorDataset(*(t[:eval_subset] for t in data.val.tensors)),
                    test=TensorDataset(*(t[:eval_subset] for t in data.test.tensors)))
            self._data = {key: data}
        return self._data[key]

    def preflight(self) -> None:
        """Load every experiment's dataset once before anything trains, so that files which are
        there but unusable (incomplete, corrupt, another dataset's, an empty split) stop the
        suite at once instead of after hours; missing datasets are handled per experiment."""
        seen: set[tuple[Any, ...]] = set()
        for exp in self.suite.experiments:
            if self._data_key(exp) in seen:
                continue
            seen.add(self._data_key(exp))
            try:
                self.data(exp)
            except DatasetError as exc:
                raise BenchError(f"{exp.name}: {exc}") from None
            except (DatasetUnavailableError, ValueError):
                continue  # reported by experiment(): skipped, or an error under strict_data

    # ---- experiments
    def _resolve(self, exp: Experiment, data: DatasetSplits
                 ) -> tuple[list[OptimizerSpec], list[dict[str, str]]]:
        specs, skipped = [], []
        n_params: int | None = None
        for name in exp.optimizers:
            spec = OPTIMIZERS.get(name)
            if spec is None:
                skipped.append({"name": name, "reason": "not registered in this installation"})
                continue
            ok, why = spec.available()
            if not ok:
                skipped.append({"name": name, "reason": why})
                continue
            if spec.tiny_only:
                if n_params is None:
                    n_params = count_parameters(build_model(
                        exp.model, input_shape=data.input_shape, num_classes=data.num_classes,
                        dataset=data.name, **exp.model_options))
                if n_params > TINY_MAX_PARAMS:
                    skipped.append({"name": name, "reason": (
                        f"tiny networks only (model has {n_params} parameters > "
                        f"{TINY_MAX_PARAMS})")})
                    continue
            specs.append(spec)
        for s in skipped:
            log.info("%s: skipping optimizer %s: %s", exp.name, s["name"], s["reason"])
        return specs, skipped

    def _cfg(self, exp: Experiment, opt: str, lr: float, seed: int,
             options: dict[str, Any] | None = None) -> RunConfig:
        return RunConfig(
            dataset=exp.dataset, model=exp.model, optimizer=opt, lr=float(lr), seed=seed,
            epochs=exp.epochs, batch_size=exp.batch_size, model_options=dict(exp.model_options),
            subset=exp.subset, eval_every=exp.eval_every,
            norm_every=exp.norm_every if exp.kind == "vanishing" else None, device=self.device,
            eval_subset=exp.eval_subset, loss=exp.loss, optimizer_options=dict(options or {}))

    def _seeds(self, exp: Experiment) -> int:
        return exp.seeds if exp.seeds is not None else self.suite.seeds

    def experiment(self, exp: Experiment) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": exp.name, "kind": exp.kind, "dataset": exp.dataset, "model": exp.model,
            "model_options": dict(exp.model_options), "epochs": exp.epochs,
            "batch_size": exp.batch_size, "subset": exp.subset, "eval_every": exp.eval_every,
            "eval_subset": exp.eval_subset, "loss": exp.loss,
            "paper": list(exp.paper) if exp.paper else None,
            "num_threads": exp.num_threads, "seeds": list(range(self._seeds(exp))),
            "lr_tuning": self._tunes(exp),
            "lr_multipliers": list(exp.lr_multipliers) if exp.kind == "robustness" else None,
            "status": "ok", "skip_reason": None, "data": None, "skipped_optimizers": [],
            "optimizers": [], "ablation": None,
        }
        try:
            data = self.data(exp)
        except DatasetError as exc:
            raise BenchError(f"{exp.name}: {exc}") from None
        except (DatasetUnavailableError, ValueError) as exc:
            if self.strict:
                raise BenchError(f"{exp.name}: {exc}") from exc
            log.warning("%s: skipped: %s", exp.name, exc)
            entry.update(status="skipped", skip_reason=str(exc))
            return entry
        entry["data"] = {"name": data.name, "source": data.source, "notes": data.notes,
                         "sizes": list(data.sizes), "input_shape": list(data.input_shape),
                         "num_classes": data.num_classes}
        if exp.kind == "ablation":
            with _threads(exp.num_threads):
                entry["ablation"], entry["skipped_optimizers"] = self._ablation(exp, data)
            return entry
        specs, entry["skipped_optimizers"] = self._resolve(exp, data)
        n_mult = len(exp.lr_multipliers) if exp.kind == "robustness" else 1
        for spec in specs:  # run() calls this experiment will make (some are cache hits)
            self.bar.total += (len(spec.lr_grid) if self._tunes(exp) else 0) + \
                n_mult * self._seeds(exp)
        self.bar.refresh()
        log.info("%s: %d optimizers, %d seeds, %d epochs", exp.name, len(specs),
                 self._seeds(exp), exp.epochs)
        with _threads(exp.num_threads):
            for spec in specs:
                entry["optimizers"].append(self._optimizer(exp, spec, data))
        return entry

    def _tunes(self, exp: Experiment) -> bool:
        return self.suite.lr_tuning and exp.kind != "ablation" and exp.lr_from is None

    def _optimizer(self, exp: Experiment, spec: OptimizerSpec,
                   data: DatasetSplits) -> dict[str, Any]:
        tuning: list[dict[str, Any]] = []
        lr_source = "tuned" if self.suite.lr_tuning else "default"
        if exp.lr_from is not None:
            reused = self.best_lrs.get((exp.lr_from, spec.name))
            best_lr = default_lr(spec) if reused is None else reused
            lr_source = (f"default ({exp.lr_from} has none)" if reused is None else
                         f"{lr_source} on {exp.lr_from}")
        elif self.suite.lr_tuning:
            for lr in spec.lr_grid:
                rec = self.run(self._cfg(exp, spec.name, lr, 0), data)
                tuning.append({"lr": float(lr), "run_id": rec["run_id"],
                               "val_acc": rec["final"]["val_acc"],
                               "train_loss": rec["final"]["train_loss"],
                               "diverged": rec["diverged"]})

            def key(t: dict[str, Any]) -> tuple[float, float]:
                if t["diverged"]:
                    return (-math.inf, -math.inf)
                loss = t["train_loss"] if t["train_loss"] is not None else math.inf
                return (t["val_acc"], -loss)

            best_lr = max(tuning, key=key)["lr"]
        else:
            best_lr = default_lr(spec)
        self.best_lrs[(exp.name, spec.name)] = best_lr
        mults = list(exp.lr_multipliers) if exp.kind == "robustness" else [1.0]
        runs = []
        for m in mults:
            for seed in range(self._seeds(exp)):
                rec = self.run(self._cfg(exp, spec.name, best_lr * m, seed), data)
                runs.append({"run_id": rec["run_id"], "seed": seed, "lr": best_lr * m,
                             "lr_multiplier": m})
        return {"name": spec.name, "family": spec.family, "description": spec.description,
                "mode": spec.mode, "lr_grid": [float(v) for v in spec.lr_grid],
                "best_lr": best_lr, "lr_source": lr_source,
                "tuning": tuning, "runs": runs}

    def _ablation(self, exp: Experiment, data: DatasetSplits
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Every grid: base and variant at every (lr, value), seeds 0..n-1; no tuning."""
        grids, skipped = [], []
        n_seeds = self._seeds(exp)
        for grid in exp.ablation:
            missing = [n for n in (grid.base, grid.variant)
                       if n not in OPTIMIZERS or not OPTIMIZERS[n].available()[0]]
            if missing:
                skipped += [{"name": n, "reason": "not available in this installation"}
                            for n in missing]
                continue
            self.bar.total += 2 * len(grid.lrs) * len(grid.values) * n_seeds
            self.bar.refresh()
            cells = []
            for value in grid.values:
                for lr in grid.lrs:
                    ids = {}
                    for role, name in (("base", grid.base), ("variant", grid.variant)):
                        ids[role] = [self.run(self._cfg(exp, name, lr, seed,
                                                        grid.options(value)), data)["run_id"]
                                     for seed in range(n_seeds)]
                    cells.append({"lr": float(lr), "value": float(value),
                                  "base_runs": ids["base"], "variant_runs": ids["variant"]})
            grids.append({"base": grid.base, "variant": grid.variant, "param": grid.param,
                          "values": [float(v) for v in grid.values],
                          "lrs": [float(v) for v in grid.lrs], "cells": cells})
        return grids, skipped


def _meta(suite: Suite, device: str, data_dir: str | Path | None) -> dict[str, Any]:
    return {
        "command": " ".join(["ocnopt", *sys.argv[1:]]) if sys.argv else "ocnopt",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished_at": None,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "data_dir": None if data_dir is None else str(data_dir),
        "runs_trained": 0,
        "runs_reused": 0,
        "wall_time_s": None,
    }


def run_suite(
    suite: Suite,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    data_dir: str | Path | None = None,
    strict_data: bool = False,
    verify_data: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``suite``; write ``runs/*.json`` and ``results.json`` under ``out_dir``; return results.

    ``resume`` reuses finished run files (same config hash; unusable files are trained again);
    without it every run is trained again and its file overwritten. ``strict_data`` turns a
    missing dataset or an incompatible dataset/model pair into an error instead of a skipped
    experiment; files that are there but unusable are always an error, raised before anything
    trains (``verify_data``: check the official checksums, see ``load_dataset``).
    ``results.json`` is rewritten after every experiment with ``complete: false`` until the
    suite has finished. The output folder is checked for writability first and locked while
    the suite runs (:func:`ocnopt.bench.outdir.output_lock`).
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {device} requested but torch.cuda.is_available() is False")
    out = Path(out_dir)
    check_writable(out)
    with output_lock(out):
        return _run_suite_locked(suite, out, device=device, resume=resume, data_dir=data_dir,
                                 strict_data=strict_data, verify_data=verify_data,
                                 progress=progress)


def _run_suite_locked(suite: Suite, out: Path, *, device: str, resume: bool,
                      data_dir: str | Path | None, strict_data: bool, verify_data: bool,
                      progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    state = _SuiteRun(suite, out, device=device, resume=resume, data_dir=data_dir,
                      strict_data=strict_data, verify_data=verify_data, progress=progress)
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "complete": False, "suite": suite.to_dict(),
        "meta": _meta(suite, device, data_dir), "experiments": [], "runs": state.records,
        "speed": None, "speed_error": None, "cost": None, "ode": None,
    }

    def save() -> None:
        results["meta"].update(runs_trained=len(state.trained), runs_reused=len(state.reused),
                               wall_time_s=time.perf_counter() - t0)
        write_json(out / "results.json", results)

    try:
        state.preflight()
        for exp in suite.experiments:
            results["experiments"].append(state.experiment(exp))
            save()
        if suite.speed:
            try:
                results["speed"] = run_speed(out, device, quick=False)
            except SpeedUnavailableError as exc:
                if not suite.experiments:
                    raise
                log.warning("speed suite skipped: %s", exc)
                results["speed_error"] = str(exc)
        if suite.cost is not None:
            results["cost"] = run_cost(suite.cost, device)
            save()
        if suite.ode is not None:  # the Neural-ODE suite (CPU; ocnopt.bench.ode_suite)
            from ocnopt.bench.ode_suite import run_ode_suite

            results["ode"] = run_ode_suite(suite.ode, out, resume=resume, progress=progress)
            save()
    finally:
        state.bar.close()
    results["complete"] = True
    results["meta"]["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    log.info("suite %s: %d runs trained, %d reused from %s", suite.name, len(state.trained),
             len(state.reused), state.runs_dir)
    return results
