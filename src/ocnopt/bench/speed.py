"""Cost per step and memory of every curvature, with and without feedback, as ratios to Adam.

Protocol (issue "OCNOpt core", section 6): the 784-256-256-10 MLP and the small CNN at batch 128 on
28x28 inputs (synthetic N(0, 1) images and random labels: cost does not depend on the values).
Each configuration runs ``warmup`` steps, then ``steps`` timed steps, in ``rounds`` rounds that
visit all configurations round-robin (so slow phases of a shared machine hit every method alike).
``steps`` is a multiple of ``update_freq``, so the amortised factor updates and eigenbasis
refreshes are included at their true rate. ms/step is the median over rounds of each round's
mean; ``ratio_to_adam`` divides by ``torch.optim.Adam``'s ms/step measured in the same run.

Memory: ``state_mb`` is the exact size of the optimizer state tensors; ``peak_mem_mb`` is the peak
extra memory while training: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the increase of
the process's peak resident set (VmHWM) in a fresh subprocess per configuration (``--memory``).
Denormal floats are flushed to zero while measuring (``torch.set_flush_denormal``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ocnopt.bench.models import build_model
from ocnopt.bench.optimizers import OPTIMIZERS

__all__ = ["SpeedConfig", "default_configs", "image_data", "measure_rank_accuracy", "measure_speed",
           "run_speed_suite"]

log = logging.getLogger(__name__)

INPUT_SHAPE = (1, 28, 28)
SPEED_MODELS = ("mlp", "small-cnn")
_NUM_BATCHES = 32  # distinct synthetic batches cycled through (random labels: no overfitting)


@dataclass(frozen=True)
class SpeedConfig:
    """One optimizer configuration: a registry name or ``ocnopt`` with explicit options."""

    label: str
    optimizer: str  # registry name, or "ocnopt"
    options: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3


def default_configs(include_peers: bool = True) -> list[SpeedConfig]:
    """Adam (reference), SGD, every OCNOpt curvature with/without feedback (library defaults,
    i.e. ``max_rank=64``), EKFAC exact (``max_rank=None``) and ``max_rank=32``, and the peers."""
    cfgs = [SpeedConfig("adam", "adam"), SpeedConfig("sgd", "sgd", lr=0.01)]
    for curv in ("identity", "rmsprop", "adam", "kfac", "ekfac"):
        for fb in (False, True):
            cfgs.append(SpeedConfig(f"ocnopt-{curv}{'+fb' if fb else ''}", "ocnopt",
                                    dict(curvature=curv, feedback=fb), lr=1e-3))
    for rank in (None, 32):  # the exact form and a cheaper truncation than the default (64)
        for fb in (False, True):
            cfgs.append(SpeedConfig(f"ocnopt-ekfac-r{rank or 'exact'}{'+fb' if fb else ''}",
                                    "ocnopt", dict(curvature="ekfac", feedback=fb, max_rank=rank)))
    if include_peers:
        for name in ("soap", "shampoo", "singd"):
            if name in OPTIMIZERS and OPTIMIZERS[name].available()[0]:
                cfgs.append(SpeedConfig(name, name, lr=OPTIMIZERS[name].lr_grid[0]))
    return cfgs


def _build(cfg: SpeedConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, bool]:
    """Return (optimizer, closure_mode)."""
    from ocnopt import OCNOpt

    if cfg.optimizer == "ocnopt":
        return OCNOpt(model, lr=cfg.lr, **cfg.options), True
    spec = OPTIMIZERS[cfg.optimizer]
    return spec.build(model, cfg.lr, **cfg.options), spec.mode == "closure"


def _step_fn(cfg: SpeedConfig, model_name: str, batch: int, device: str, seed: int
             ) -> tuple[Callable[[int], None], torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model(model_name, input_shape=INPUT_SHAPE, num_classes=10).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt, closure_mode = _build(cfg, model)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(_NUM_BATCHES, batch, *INPUT_SHAPE, generator=g).to(device)
    ys = torch.randint(0, 10, (_NUM_BATCHES, batch), generator=g).to(device)

    def step(i: int) -> None:
        x, y = xs[i % _NUM_BATCHES], ys[i % _NUM_BATCHES]
        if closure_mode:
            opt.step(lambda: F.cross_entropy(model(x), y))
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return step, opt


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def state_megabytes(opt: torch.optim.Optimizer) -> float:
    """Exact size of all tensors held in ``opt.state`` (MB)."""
    total = 0

    def visit(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for u in v.values():
                visit(u)
        elif isinstance(v, (list, tuple)):
            for u in v:
                visit(u)

    visit(dict(opt.state))
    return total / 2**20


def measure_speed(
    model_name: str,
    configs: list[SpeedConfig],
    *,
    batch: int = 128,
    steps: int = 200,
    warmup: int = 5,
    rounds: int = 3,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """ms/step (and state memory) of each config on ``model_name``; see the module docstring."""
    runners = {}
    for cfg in configs:
        step, opt = _step_fn(cfg, model_name, batch, device, seed)
        for i in range(warmup):
            step(i)
        runners[cfg.label] = (step, opt)
    per_round: dict[str, list[float]] = {c.label: [] for c in configs}
    done = {c.label: warmup for c in configs}
    for r in range(rounds):
        for cfg in configs:
            step, _ = runners[cfg.label]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(done[cfg.label])
                done[cfg.label] += 1
            _sync(device)
            per_round[cfg.label].append(1000 * (time.perf_counter() - t0) / steps)
            if progress:
                progress(f"{model_name} round {r + 1}/{rounds} {cfg.label}")
    ms = {label: statistics.median(v) for label, v in per_round.items()}
    ref = ms.get("adam", math.nan)
    rows = []
    for cfg in configs:
        _, opt = runners[cfg.label]
        rows.append(dict(model=model_name, optimizer=cfg.label, batch=batch, device=device,
                         ms_per_step=round(ms[cfg.label], 4),
                         ms_rounds=[round(v, 4) for v in per_round[cfg.label]],
                         ratio_to_adam=round(ms[cfg.label] / ref, 4) if ref == ref else None,
                         state_mb=round(state_megabytes(opt), 4), peak_mem_mb=None,
                         options=cfg.options))
    return rows


def _peak_memory_subprocess(model_name: str, cfg: SpeedConfig, steps: int, batch: int) -> float:
    """Peak RSS increase (MB) of ``steps`` training steps in a fresh interpreter."""
    code = (
        "import json,sys,torch;from ocnopt.bench.speed import SpeedConfig,_step_fn;"
        "torch.set_num_threads(1);"
        "a=json.loads(sys.argv[1]);cfg=SpeedConfig(**a['cfg']);"
        "step,_=_step_fn(cfg,a['model'],a['batch'],'cpu',0);"
        "hwm=lambda:int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
        ".split()[1]);"
        "base=hwm();[step(i) for i in range(a['steps'])];print((hwm()-base)/1024)"
    )
    arg = json.dumps(dict(cfg=asdict(cfg), model=model_name, batch=batch, steps=steps))
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_speed_suite(out_dir: Path, device: str = "cpu", quick: bool = False,
                    memory: bool | None = None) -> list[dict[str, Any]]:
    """Measure both speed models; write ``speed.json`` into ``out_dir``; return the rows.

    ``quick``: fewer steps/rounds (a smoke run; refreshes are still included once).
    ``memory``: also measure CPU peak RSS per config in subprocesses (default: not quick).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # denormal gradients (near-zero losses) slow some CPU kernels by 10x+; they are not what
    # this benchmark measures
    torch.set_flush_denormal(True)
    steps, rounds = (100, 1) if quick else (200, 3)
    memory = (not quick) if memory is None else memory
    rows: list[dict[str, Any]] = []
    configs = default_configs()
    for model_name in SPEED_MODELS:
        log.info("speed: %s, %d configs, %d rounds x %d steps", model_name, len(configs),
                 rounds, steps)
        rows += measure_speed(model_name, configs, steps=steps, rounds=rounds, device=device,
                              progress=lambda msg: log.info("speed: %s", msg))
    if device.startswith("cuda"):
        for row in rows:  # peak allocator memory per config, measured separately
            torch.cuda.reset_peak_memory_stats()
            cfg = next(c for c in configs if c.label == row["optimizer"])
            step, _ = _step_fn(cfg, row["model"], 128, device, 0)
            for i in range(10):
                step(i)
            row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    elif memory:
        for row in rows:
            cfg = next(c for c in configs if c.label == row["optimizer"])
            row["peak_mem_mb"] = round(_peak_memory_subprocess(row["model"], cfg, 20, 128), 2)
    (out_dir / "speed.json").write_text(json.dumps(rows, indent=1))
    return rows


def image_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(X (n,1,28,28), y (n,), source)``: Fashion-MNIST or mnist5k when available, else noise."""
    from ocnopt.bench.data import DatasetUnavailableError, load_dataset

    for name in ("fashion-mnist", "mnist5k"):
        try:
            x, y = load_dataset(name).train.tensors
            return x[:n], y[:n], name
        except (DatasetUnavailableError, ImportError):
            continue
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *INPUT_SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g), \
        "synthetic"


def measure_rank_accuracy(
    model_name: str = "mlp", ranks: tuple[int, ...] = (64, 32, 16), *, steps: int = 300,
    batch: int = 128, seed: int = 0, update_freq: int = 100,
) -> list[dict[str, Any]]:
    """How close the truncated (``max_rank``) preconditioner is to the exact one.

    Trains with exact EKFAC for ``steps`` steps; every ``update_freq`` steps, for every layer,
    it preconditions the current gradient with KFAC scaling in (a) the exact eigenbases and
    (b) rank-``k`` bases, both freshly computed (``fresh``) and carried along by the
    warm-started refreshes the optimizer itself would do (``warm``), and reports the cosine
    similarity and relative error of (b) against (a). Returns one row per (checkpoint, layer, k).
    """
    from ocnopt import OCNOpt
    from ocnopt.curvature import Projection, kfac_scale, refresh_eigenbasis

    torch.manual_seed(seed)
    model = build_model(model_name, input_shape=INPUT_SHAPE, num_classes=10)
    x_all, y_all, source = image_data(steps * batch, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, lr=0.01, curvature="ekfac", feedback=False, momentum=0.9,
                     update_freq=update_freq)
    warm: dict[tuple[str, int, str], Any] = {}
    rows = []
    for i in range(steps):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(x_all)
        opt.step(lambda idx=idx: F.cross_entropy(model(x_all[idx]), y_all[idx]))
        if (i + 1) % update_freq:
            continue
        for lay in opt._layers.values():
            st = opt.state[lay.helper.weight]
            v = lay.helper.to_matrix(lay.helper.weight.grad, lay.helper.bias.grad
                                     if lay.helper.has_bias else None)
            exact_o, exact_i = refresh_eigenbasis(st["G"], None), refresh_eigenbasis(st["A"], None)
            ref = Projection(v, exact_o, exact_i).apply(
                kfac_scale(exact_o, exact_i, st["locations"], 0.05))
            for k in ranks:
                for kind in ("fresh", "warm"):
                    key = (lay.name, k, kind)
                    prev = warm.get(key) if kind == "warm" else None
                    bo = refresh_eigenbasis(st["G"], k, prev[0] if prev else None)
                    bi = refresh_eigenbasis(st["A"], k, prev[1] if prev else None)
                    if kind == "warm":
                        warm[key] = (bo, bi)
                    got = Projection(v, bo, bi).apply(kfac_scale(bo, bi, st["locations"], 0.05))
                    rows.append(dict(
                        model=model_name, data=source, step=i + 1, layer=lay.name,
                        shape=list(v.shape), rank=k, basis=kind,
                        cosine=round(float(F.cosine_similarity(got.flatten(), ref.flatten(),
                                                               dim=0)), 5),
                        rel_error=round(float((got - ref).norm() / ref.norm()), 5)))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of speed rows."""
    lines = ["| model | optimizer | ms/step | x Adam | state MB | peak MB |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['ms_per_step']:.2f} | "
                     f"{r['ratio_to_adam']:.2f} | {r['state_mb']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m ocnopt.bench.speed [--quick] [--out DIR]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/speed"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = run_speed_suite(args.out, args.device, args.quick,
                           memory=False if args.no_memory else None)
    print(format_table(rows))


if __name__ == "__main__":
    main()
