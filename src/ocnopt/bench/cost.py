"""Cost per iteration and peak memory against the batch size (DDPNOpt's runtime figure).

For a :class:`~ocnopt.bench.suites.CostConfig`: the model ``build_model(cfg.model,
dataset=cfg.dataset)`` on synthetic N(0, 1) inputs with random labels (the cost does not depend
on the values), every optimizer of ``cfg.optimizers`` at every batch size.

* **s/iter**: per batch size, each optimizer first takes ``warmup`` untimed steps (just one
  if it takes over a second). That first step also sizes the measurement: a method whose
  step takes longer than ``cfg.max_step_s`` is timed on that step alone and skipped at every
  larger batch size. Then ``rounds`` rounds visit the optimizers in turn (so a slow phase of
  a shared machine hits all of them alike), each timing ``steps`` steps (fewer for slow
  methods: about 10 s per round at most). s/iter is the median over rounds of each round's
  mean; CUDA is synchronised around every timed block.
* **peak memory** (MiB), the extra memory a training step needs beyond the built model,
  optimizer and data: on CUDA ``torch.cuda.max_memory_allocated()`` minus the allocation
  before the first step; on CPU the growth of the peak resident set (``VmHWM`` in
  ``/proc/self/status``, Linux) over ``min(steps, 3)`` steps in a fresh interpreter per point,
  so allocator caches of other points do not hide it. ``None`` where not measurable.

Timing numbers are only meaningful on a quiet machine; the report says so.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ocnopt.bench.models import build_model
from ocnopt.bench.optimizers import OPTIMIZERS, train_step
from ocnopt.bench.suites import CostConfig

__all__ = ["measure_cost", "peak_memory_mb"]

log = logging.getLogger(__name__)

_ROUND_BUDGET_S = 10.0  # at most about this long per timed block of a slow method
_N_BATCHES = 8  # distinct synthetic batches cycled through


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _make_step(cfg: CostConfig, optimizer: str, batch: int, device: str, seed: int = 0
               ) -> Callable[[int], None]:
    """Build model, optimizer and synthetic data; return ``step(i)`` (one training step)."""
    spec = OPTIMIZERS[optimizer]
    torch.manual_seed(seed)
    model = build_model(cfg.model, input_shape=cfg.input_shape, num_classes=cfg.num_classes,
                        dataset=cfg.dataset).to(device)
    opt = spec.build(model, spec.lr_grid[(len(spec.lr_grid) - 1) // 2], **spec.options)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(_N_BATCHES, batch, *cfg.input_shape, generator=g).to(device)
    ys = torch.randint(0, cfg.num_classes, (_N_BATCHES, batch), generator=g).to(device)
    loss_fn = nn.functional.cross_entropy

    def step(i: int) -> None:
        train_step(opt, spec, model, xs[i % _N_BATCHES], ys[i % _N_BATCHES], loss_fn)

    return step


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_memory_mb(cfg: CostConfig, optimizer: str, batch: int, device: str,
                   steps: int = 3) -> float | None:
    """Extra peak memory (MiB) of ``steps`` training steps (see the module docstring)."""
    if device.startswith("cuda"):
        step = _make_step(cfg, optimizer, batch, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _vm_hwm_mb() is None:
        return None
    arg = json.dumps({"cfg": asdict(cfg), "optimizer": optimizer, "batch": batch,
                      "steps": steps})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", "from ocnopt.bench.cost import _child; _child()",
                          arg], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        log.warning("cost: memory of %s at batch %d not measured: %s", optimizer, batch,
                    out.stderr.strip().splitlines()[-1:] or out.returncode)
        return None
    return float(out.stdout.strip().splitlines()[-1])


def _child() -> None:
    """Entry point of the memory subprocess: prints the peak RSS growth (MiB)."""
    a = json.loads(sys.argv[1])
    cfg_d = a["cfg"]
    cfg = CostConfig(**{**cfg_d, **{k: tuple(cfg_d[k]) for k in
                                    ("optimizers", "batch_sizes", "input_shape")}})
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    step = _make_step(cfg, a["optimizer"], a["batch"], "cpu")
    base = _vm_hwm_mb()
    for i in range(a["steps"]):
        step(i)
    print(_vm_hwm_mb() - base)  # type: ignore[operator]


def measure_cost(cfg: CostConfig, device: str = "cpu",
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per (optimizer, batch size): ``s_per_iter``, ``s_rounds``, ``steps``,
    ``peak_mem_mb``, ``status`` (``ok`` / ``skipped``) and ``reason``."""
    unknown = [o for o in cfg.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(OPTIMIZERS)}")
    too_slow: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for batch in cfg.batch_sizes:
        steps_of: dict[str, Callable[[int], None]] = {}
        n_steps: dict[str, int] = {}
        done: dict[str, int] = {}
        per_round: dict[str, list[float]] = {}
        for name in cfg.optimizers:
            if name in too_slow:
                continue
            step = _make_step(cfg, name, batch, device)
            _sync(device)
            t0 = time.perf_counter()
            step(0)
            _sync(device)
            first = time.perf_counter() - t0
            warmup = cfg.warmup if first < 1.0 else 1  # slow methods: their first step suffices
            for i in range(1, warmup):
                step(i)
            done[name] = max(warmup, 1)
            if first > cfg.max_step_s:
                too_slow[name] = (f"a step took {first:.1f} s > {cfg.max_step_s:g} s at batch "
                                  f"{batch}")
                per_round[name] = [first]
                n_steps[name] = 1
                continue
            steps_of[name] = step
            per_round[name] = []
            n_steps[name] = max(1, min(cfg.steps, int(_ROUND_BUDGET_S / max(first, 1e-9))))
        for r in range(cfg.rounds):
            for name, step in steps_of.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(n_steps[name]):
                    step(done[name])
                    done[name] += 1
                _sync(device)
                per_round[name].append((time.perf_counter() - t0) / n_steps[name])
            if progress:
                progress(f"batch {batch}: round {r + 1}/{cfg.rounds}")
        for name in cfg.optimizers:
            if name not in per_round:
                rows.append({"optimizer": name, "batch_size": batch, "s_per_iter": None,
                             "s_rounds": [], "steps": 0, "peak_mem_mb": None,
                             "status": "skipped", "reason": too_slow[name]})
                continue
            mem = (peak_memory_mb(cfg, name, batch, device, steps=min(3, n_steps[name]))
                   if cfg.memory and name in steps_of else None)
            rows.append({"optimizer": name, "batch_size": batch,
                         "s_per_iter": statistics.median(per_round[name]),
                         "s_rounds": per_round[name],
                         "steps": n_steps[name] * len(per_round[name]),
                         "peak_mem_mb": mem, "status": "ok",
                         "reason": too_slow.get(name, "")})
    return rows
