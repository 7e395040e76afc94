"""Cost per step and memory of every curvature, with and without feedback, as ratios to Adam.

Protocol: the 784-256-256-10 MLP (``mlp``), the same MLP with two 1024-wide hidden layers
(``mlp-wide``) and the small CNN (``small-cnn``, run in ``channels_last`` memory format, model
and data) at batch 128 on 28x28 inputs (synthetic N(0, 1) images and random labels: cost does
not depend on the values), one thread. Every configuration first runs ``warmup`` steps (by
default one refresh period, so the early eigenbasis refreshes are behind it), then ``rounds``
rounds in which each configuration in turn runs a chunk of ``steps`` steps (a multiple of
``update_freq``: the amortised factor updates and refreshes are included at their true
rate). Per round the chunk's ms/step is divided by Adam's in the same round (paired ratios, so
load drift on a shared machine cancels); a configuration's ``ratio_to_adam`` is the median of
its paired ratios and ``ms_per_step`` the median of its chunks. ``cpu_ms_per_step`` is process
CPU time (``time.process_time``), less sensitive to other processes than wall-clock.

``ocnopt-ekfac+fb (no atomicity)`` runs the same step without the transaction's parameter
backups and finiteness checks (a measurement-only switch): its difference to
``ocnopt-ekfac+fb`` is what all-or-nothing steps cost.

Memory: ``state_mb`` is the exact size of the optimizer state tensors; ``peak_mem_mb`` is the
peak extra memory of 20 training steps (which include a factor update and refresh) above a
forward+backward baseline without any optimizer: on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the process's peak resident set (VmHWM) in a fresh subprocess per configuration.
Denormal floats are flushed to zero while measuring (``torch.set_flush_denormal``).
"""

from __future__ import annotations

import argparse
import json
import logging
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
           "run_speed_suite", "speed_targets"]

log = logging.getLogger(__name__)

INPUT_SHAPE = (1, 28, 28)
#: name -> (registry model, build options, channels_last)
SPEED_MODELS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "mlp": ("mlp", {}, False),
    "small-cnn": ("small-cnn", {}, True),
    "mlp-wide": ("mlp", {"hidden": (1024, 1024)}, False),
}
_NUM_BATCHES = 32  # distinct synthetic batches cycled through (random labels: no overfitting)
NO_ATOMICITY = "ocnopt-ekfac+fb (no atomicity)"


@dataclass(frozen=True)
class SpeedConfig:
    """One optimizer configuration: a registry name or ``ocnopt`` with explicit options."""

    label: str
    optimizer: str  # registry name, or "ocnopt"
    options: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    atomic: bool = True


def default_configs(include_peers: bool = True) -> list[SpeedConfig]:
    """Adam (reference), SGD, every OCNOpt curvature with/without feedback (library defaults,
    i.e. ``max_rank=64``), EKFAC exact (``max_rank=None``) and ``max_rank=32``, EKFAC+feedback
    without atomicity, and the peers."""
    cfgs = [SpeedConfig("adam", "adam"), SpeedConfig("sgd", "sgd", lr=0.01)]
    for curv in ("identity", "rmsprop", "adam", "kfac", "ekfac"):
        for fb in (False, True):
            cfgs.append(SpeedConfig(f"ocnopt-{curv}{'+fb' if fb else ''}", "ocnopt",
                                    dict(curvature=curv, feedback=fb), lr=1e-3))
    cfgs.append(SpeedConfig(NO_ATOMICITY, "ocnopt", dict(curvature="ekfac", feedback=True),
                            atomic=False))
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
        opt = OCNOpt(model, lr=cfg.lr, **cfg.options)
        opt._atomic = cfg.atomic
        return opt, True
    spec = OPTIMIZERS[cfg.optimizer]
    return spec.build(model, cfg.lr, **cfg.options), spec.mode == "closure"


def _model(model_name: str, device: str) -> tuple[nn.Module, bool]:
    name, options, channels_last = SPEED_MODELS[model_name]
    model = build_model(name, input_shape=INPUT_SHAPE, num_classes=10, **options).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


def _step_fn(cfg: SpeedConfig | None, model_name: str, batch: int, device: str, seed: int
             ) -> tuple[Callable[[int], None], torch.optim.Optimizer | None]:
    """One training step of ``cfg`` (``None``: forward + backward only, the memory baseline)."""
    torch.manual_seed(seed)
    model, channels_last = _model(model_name, device)
    opt, closure_mode = None, False
    if cfg is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt, closure_mode = _build(cfg, model)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(_NUM_BATCHES, batch, *INPUT_SHAPE, generator=g).to(device)
    ys = torch.randint(0, 10, (_NUM_BATCHES, batch), generator=g).to(device)
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]

    def step(i: int) -> None:
        x, y = xs[i % _NUM_BATCHES], ys[i % _NUM_BATCHES]
        if opt is None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        elif closure_mode:
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
    steps: int = 100,
    warmup: int = 100,
    rounds: int = 3,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """ms/step, paired ratios to Adam and state memory of each config; see the module doc."""
    runners = {}
    for cfg in configs:
        step, opt = _step_fn(cfg, model_name, batch, device, seed)
        for i in range(warmup):
            step(i)
        runners[cfg.label] = (step, opt)
    wall: dict[str, list[float]] = {c.label: [] for c in configs}
    cpu: dict[str, list[float]] = {c.label: [] for c in configs}
    done = {c.label: warmup for c in configs}
    for r in range(rounds):
        for cfg in configs:
            step, _ = runners[cfg.label]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(done[cfg.label])
                done[cfg.label] += 1
            _sync(device)
            wall[cfg.label].append(1000 * (time.perf_counter() - t0) / steps)
            cpu[cfg.label].append(1000 * (time.process_time() - c0) / steps)
            if progress:
                progress(f"{model_name} round {r + 1}/{rounds} {cfg.label}")
    ref = wall.get("adam")
    rows = []
    for cfg in configs:
        _, opt = runners[cfg.label]
        ratios = ([w / a for w, a in zip(wall[cfg.label], ref, strict=True)]
                  if ref is not None else [])
        rows.append(dict(
            model=model_name, optimizer=cfg.label, batch=batch, device=device,
            ms_per_step=round(statistics.median(wall[cfg.label]), 4),
            cpu_ms_per_step=round(statistics.median(cpu[cfg.label]), 4),
            ms_rounds=[round(v, 4) for v in wall[cfg.label]],
            ratio_to_adam=round(statistics.median(ratios), 4) if ratios else None,
            ratio_rounds=[round(v, 4) for v in ratios],
            state_mb=round(state_megabytes(opt), 4) if opt is not None else None,
            peak_mem_mb=None, options=cfg.options))
    return rows


def _peak_memory_subprocess(model_name: str, cfg: SpeedConfig | None, steps: int,
                            batch: int) -> float:
    """Peak RSS increase (MB) of ``steps`` training steps in a fresh interpreter."""
    code = (
        "import json,sys,torch;from ocnopt.bench.speed import SpeedConfig,_step_fn;"
        "torch.set_num_threads(1);"
        "a=json.loads(sys.argv[1]);cfg=None if a['cfg'] is None else SpeedConfig(**a['cfg']);"
        "step,_=_step_fn(cfg,a['model'],a['batch'],'cpu',0);"
        "hwm=lambda:int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
        ".split()[1]);"
        "base=hwm();[step(i) for i in range(a['steps'])];print((hwm()-base)/1024)"
    )
    arg = json.dumps(dict(cfg=None if cfg is None else asdict(cfg), model=model_name,
                          batch=batch, steps=steps))
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_memory_cuda(model_name: str, cfg: SpeedConfig | None, steps: int, batch: int,
                      device: str) -> float:
    torch.cuda.empty_cache()
    step, _ = _step_fn(cfg, model_name, batch, device, 0)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


#: Per-step cost targets: (model, config, reference config, maximum ratio).
COST_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("mlp", "ocnopt-ekfac", "adam", 1.25),
    ("small-cnn", "ocnopt-ekfac", "adam", 1.25),
    ("mlp-wide", "ocnopt-ekfac", "adam", 1.4),
    ("mlp", "ocnopt-ekfac+fb", "ocnopt-ekfac", 1.15),
    ("mlp-wide", "ocnopt-ekfac+fb", "ocnopt-ekfac", 1.15),
    ("small-cnn", "ocnopt-ekfac+fb", "ocnopt-ekfac", 1.3),
)


def speed_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step cost targets as measured ratios (paired per round), PASS/MISS/N/A; and the
    memory target: EKFAC's peak extra memory below 1.5x Adam's (factor updates add < 50%)."""
    by = {(r["model"], r["optimizer"]): r for r in rows}
    out = []
    for model, cfg, ref, limit in COST_TARGETS:
        a, b = by.get((model, cfg)), by.get((model, ref))
        if a is None or b is None or not a.get("ratio_rounds") or not b.get("ratio_rounds"):
            out.append(dict(model=model, target=f"{cfg} / {ref} <= {limit}", measured=None,
                            status="N/A"))
            continue
        ratio = statistics.median(x / y for x, y in zip(a["ratio_rounds"], b["ratio_rounds"],
                                                         strict=True))
        out.append(dict(model=model, target=f"{cfg} / {ref} <= {limit}",
                        measured=round(ratio, 3), status="PASS" if ratio <= limit else "MISS"))
    for model in dict.fromkeys(r["model"] for r in rows):
        a, b = by.get((model, "ocnopt-ekfac")), by.get((model, "adam"))
        if a and b and a.get("peak_mem_mb") is not None and b.get("peak_mem_mb"):
            ratio = a["peak_mem_mb"] / b["peak_mem_mb"]
            out.append(dict(model=model, target="ocnopt-ekfac peak / adam peak <= 1.5",
                            measured=round(ratio, 3), status="PASS" if ratio <= 1.5 else "MISS"))
    return out


def run_speed_suite(out_dir: Path, device: str = "cpu", quick: bool = False,
                    memory: bool | None = None) -> list[dict[str, Any]]:
    """Measure the speed models; write ``speed.json`` and ``speed_targets.md`` into
    ``out_dir``; return the rows.

    ``quick``: fewer steps and rounds (a smoke run; refreshes are still included once).
    ``memory``: also measure peak memory per config (default: not quick).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # denormal gradients (near-zero losses) slow some CPU kernels by 10x+; they are not what
    # this benchmark measures
    torch.set_flush_denormal(True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps, rounds, warmup = (100, 1, 5) if quick else (100, 3, 100)
    memory = (not quick) if memory is None else memory
    rows: list[dict[str, Any]] = []
    configs = default_configs()
    try:
        for model_name in SPEED_MODELS:
            log.info("speed: %s, %d configs, %d rounds x %d steps", model_name, len(configs),
                     rounds, steps)
            rows += measure_speed(model_name, configs, steps=steps, rounds=rounds,
                                  warmup=warmup, device=device,
                                  progress=lambda msg: log.info("speed: %s", msg))
        if memory:
            for model_name in SPEED_MODELS:
                if device.startswith("cuda"):
                    base = _peak_memory_cuda(model_name, None, 20, 128, device)
                else:
                    base = _peak_memory_subprocess(model_name, None, 20, 128)
                for row in rows:
                    if row["model"] != model_name:
                        continue
                    cfg = next(c for c in configs if c.label == row["optimizer"])
                    peak = (_peak_memory_cuda(model_name, cfg, 20, 128, device)
                            if device.startswith("cuda")
                            else _peak_memory_subprocess(model_name, cfg, 20, 128))
                    row["peak_mem_mb"] = round(peak - base, 2)
                    row["baseline_mem_mb"] = round(base, 2)
    finally:
        torch.set_num_threads(old_threads)
    (out_dir / "speed.json").write_text(json.dumps(rows, indent=1))
    targets = speed_targets(rows)
    (out_dir / "speed_targets.md").write_text(format_targets(targets) + "\n")
    log.info("speed targets:\n%s", format_targets(targets))
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
    lines = ["| model | optimizer | ms/step | CPU ms/step | x Adam (paired) | state MB | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        state = "-" if r["state_mb"] is None else f"{r['state_mb']:.2f}"
        ratio = "-" if r["ratio_to_adam"] is None else f"{r['ratio_to_adam']:.2f}"
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['ms_per_step']:.2f} | "
                     f"{r['cpu_ms_per_step']:.2f} | {ratio} | {state} | {peak} |")
    return "\n".join(lines)


def format_targets(targets: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`speed_targets`."""
    lines = ["| model | target | measured | status |", "|---|---|---:|---|"]
    for t in targets:
        m = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        lines.append(f"| {t['model']} | {t['target']} | {m} | {t['status']} |")
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
    print()
    print(format_targets(speed_targets(rows)))


if __name__ == "__main__":
    main()
