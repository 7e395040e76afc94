"""Step time and communication volume of OCNOpt on several processes (``ocnopt bench --nproc``).

Run under ``torchrun`` (``ocnopt bench --nproc N`` does it: gloo on CPU, nccl on CUDA, on
127.0.0.1). Each rank trains the speed suite's MLP and small CNN (channels_last) on its share of
a global batch of 128, with the model wrapped in ``DistributedDataParallel``: Adam (DDP's own
gradient all-reduce) and OCNOpt EKFAC without and with feedback (OCNOpt's own communication).
Rank 0 prints ms/step (median of ``rounds`` chunks of ``steps`` steps after ``warmup``, the
chunks interleaved across optimizers) and, for OCNOpt, the bytes each rank sends per step by
kind (gradients, directions, factors and bases amortised over the run), and writes
``dist_speed.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ocnopt import OCNOpt
from ocnopt.bench.speed import INPUT_SHAPE, _model

__all__ = ["main", "measure"]

log = logging.getLogger(__name__)
CONFIGS = ("adam", "ocnopt-ekfac", "ocnopt-ekfac+fb")


def measure(model_name: str, device: str, global_batch: int = 128, steps: int = 50,
            warmup: int = 100, rounds: int = 3) -> list[dict[str, Any]]:
    """Per-config rows (identical on every rank except the timings)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
    local = global_batch // world
    g = torch.Generator().manual_seed(100 + rank)
    xs = torch.randn(16, local, *INPUT_SHAPE, generator=g).to(device)
    ys = torch.randint(0, 10, (16, local), generator=g).to(device)
    runners = {}
    for label in CONFIGS:
        torch.manual_seed(0)
        model, channels_last = _model(model_name, device)
        x_all = ([x.contiguous(memory_format=torch.channels_last) for x in xs]
                 if channels_last else list(xs))
        ddp = nn.parallel.DistributedDataParallel(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt: Any = (torch.optim.Adam(ddp.parameters(), lr=1e-3) if label == "adam" else
                        OCNOpt(ddp, lr=1e-3, curvature="ekfac", feedback=label.endswith("+fb")))

        def step(i: int, ddp: nn.Module = ddp, opt: Any = opt, label: str = label,
                 x_all: list[torch.Tensor] = x_all) -> None:
            x, y = x_all[i % 16], ys[i % 16]
            if label == "adam":
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
            else:
                opt.step(lambda: F.cross_entropy(ddp(x), y))

        for i in range(warmup):
            step(i)
        if label != "adam":
            opt._comm.bytes = dict.fromkeys(opt._comm.bytes, 0)
        runners[label] = (step, opt)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    done = dict.fromkeys(CONFIGS, warmup)
    for _ in range(rounds):
        for label in CONFIGS:
            step, _ = runners[label]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(done[label])
                done[label] += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[label].append(1000 * (time.perf_counter() - t0) / steps)
    rows = []
    for label in CONFIGS:
        _, opt = runners[label]
        sent = ({k: round(v / (rounds * steps)) for k, v in opt._comm.bytes.items()}
                if label != "adam" else None)
        rows.append(dict(model=model_name, optimizer=label, world_size=world,
                         local_batch=local, ms_per_step=round(statistics.median(times[label]), 3),
                         ms_rounds=[round(t, 3) for t in times[label]], bytes_per_step=sent))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Entry point under torchrun: ``python -m ocnopt.bench.dist_speed --out DIR``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/dist-speed"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        rows = []
        for model_name in ("mlp", "small-cnn"):
            rows += measure(model_name, args.device, steps=args.steps, rounds=args.rounds)
        if dist.get_rank() == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"dist_speed_{dist.get_world_size()}.json").write_text(
                json.dumps(rows, indent=1))
            print(format_rows(rows))
    finally:
        dist.destroy_process_group()


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure` rows."""
    lines = ["| model | ranks | optimizer | local batch | ms/step | bytes/step per rank "
             "(gradients / directions / factors / bases / flags) |", "|---|---:|---|---:|---:|---|"]
    for r in rows:
        b = r["bytes_per_step"]
        sent = "-" if b is None else " / ".join(str(b[k]) for k in (
            "gradients", "directions", "factors", "bases", "flags"))
        lines.append(f"| {r['model']} | {r['world_size']} | {r['optimizer']} | "
                     f"{r['local_batch']} | {r['ms_per_step']:.2f} | {sent} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
