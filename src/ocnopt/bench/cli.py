"""The ``ocnopt`` command line: ``bench``, ``list`` and ``report`` (argparse).

``ocnopt bench`` with no arguments runs the ``quick`` suite (DIGITS, < 2 min on 2 cores) and
prints the results table and the paths of the report and plots. Messages go through ``logging``
(stderr), progress bars through tqdm (stderr); only the final tables go to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import ocnopt
from ocnopt.bench.data import DATASETS, DatasetError, DatasetUnavailableError, available_datasets
from ocnopt.bench.models import MODELS
from ocnopt.bench.optimizers import OPTIMIZERS
from ocnopt.bench.outdir import BenchError, check_writable, output_lock
from ocnopt.bench.runner import default_lr, load_results, run_suite
from ocnopt.bench.suites import SUITES, apply_overrides, get_suite

__all__ = ["build_parser", "main"]

log = logging.getLogger("ocnopt.bench.cli")


def _names(values: list[str] | None) -> list[str] | None:
    """Flatten repeated and comma-separated option values; ``None`` if not given."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _canon(names: list[str] | None, valid: Sequence[str], what: str) -> list[str] | None:
    if names is None:
        return None
    out = []
    for n in names:
        key = n.lower().replace("_", "-")
        key = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}.get(key, key)
        if key not in valid:
            raise BenchError(f"unknown {what} {n!r}; valid: {', '.join(valid)}")
        out.append(key)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``ocnopt`` console script."""
    p = argparse.ArgumentParser(
        prog="ocnopt", description="OCNOpt benchmark suite: train, compare, report.")
    p.add_argument("--version", action="version",
                   version=f"ocnopt {ocnopt.__version__} (torch {torch.__version__})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser(
        "bench", help="run a benchmark suite (default: quick)",
        description="Run a benchmark suite and print its results table. Suites: "
        + "; ".join(f"{n}: {s.description}" for n, s in SUITES.items()))
    b.add_argument("--suite", default="quick", choices=list(SUITES),
                   help="suite to run (default: quick)")
    b.add_argument("--dataset", action="append", metavar="NAME",
                   help=f"override the suite's datasets (repeat or comma-separate): "
                        f"{', '.join(DATASETS)}")
    b.add_argument("--model", action="append", metavar="NAME",
                   help=f"override the suite's models: {', '.join(MODELS)}")
    b.add_argument("--optimizers", action="append", metavar="A,B,C",
                   help=f"override the suite's optimizers: {', '.join(OPTIMIZERS)}")
    b.add_argument("--seeds", type=int, help="number of seeds at the best lr")
    b.add_argument("--epochs", type=int, help="epochs per run")
    b.add_argument("--batch-size", type=int, help="minibatch size")
    b.add_argument("--subset", type=int, help="cap the training split at N samples")
    b.add_argument("--out", type=Path, help="output folder (default: results/<suite>)")
    b.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    b.add_argument("--resume", action="store_true",
                   help="reuse finished runs in OUT/runs (an interrupted suite continues)")
    b.add_argument("--data-dir", type=Path, help="folder with the file-based datasets in "
                   "torchvision's layouts (raw idx files of Fashion-MNIST/MNIST/KMNIST, "
                   "cifar-10-batches-py/, SVHN's train_32x32.mat/test_32x32.mat); when given, "
                   "it is the only place searched and must exist")
    b.add_argument("--no-verify-data", action="store_true",
                   help="accept files that are not the datasets' official releases (skips the "
                        "size/checksum identity checks; format checks still apply)")
    b.add_argument("--lr-grid", action=argparse.BooleanOptionalAction, default=None,
                   help="tune lr on the validation split over each optimizer's grid "
                        "(default: the suite's setting; off = middle of the grid)")
    b.add_argument("--threads", type=int, help="torch threads (default: per experiment)")
    b.add_argument("--nproc", type=int, metavar="N",
                   help="run the multi-process speed measurement on N ranks under torchrun "
                        "(gloo on CPU, nccl on CUDA; ocnopt.bench.dist_speed) instead of a suite")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    ls = sub.add_parser("list", help="datasets, models, optimizers and suites, with availability")
    ls.add_argument("--data-dir", type=Path, help="also look for idx datasets here")

    r = sub.add_parser("report", help="re-render tables, CSV, report.md and plots of a results "
                       "folder")
    r.add_argument("dir", type=Path, help="folder holding results.json")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _print_outputs(text: str, paths: list[Path]) -> None:
    print(text)
    print()
    for path in paths:
        print(f"wrote {path}")


def _run_nproc(args: argparse.Namespace) -> int:
    """``ocnopt bench --nproc N``: the distributed speed measurement under torchrun."""
    import socket
    import subprocess

    if args.nproc < 1:
        raise BenchError(f"--nproc must be >= 1, got {args.nproc}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = args.out if args.out is not None else Path("results") / "dist-speed"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
           "ocnopt.bench.dist_speed", "--out", str(out), "--device", args.device]
    log.info("running %s", " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def _cmd_bench(args: argparse.Namespace) -> int:
    from ocnopt.bench import report

    if args.nproc is not None:
        return _run_nproc(args)
    suite = get_suite(args.suite)
    datasets = _canon(_names(args.dataset), list(DATASETS), "dataset")
    models = _canon(_names(args.model), list(MODELS), "model")
    opts = _names(args.optimizers)
    if opts is not None:
        unknown = [o for o in opts if o not in OPTIMIZERS]
        if unknown:
            raise BenchError(f"unknown optimizer(s) {', '.join(unknown)}; registered: "
                             f"{', '.join(OPTIMIZERS)}")
    for name in ("seeds", "epochs", "batch_size", "subset", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    try:
        suite = apply_overrides(
            suite, datasets=datasets, models=models, optimizers=opts, seeds=args.seeds,
            epochs=args.epochs, batch_size=args.batch_size, subset=args.subset,
            lr_tuning=args.lr_grid, num_threads=args.threads)
    except ValueError as exc:
        raise BenchError(str(exc)) from exc
    out = args.out if args.out is not None else Path("results") / suite.name
    if args.data_dir is not None and not args.data_dir.is_dir():
        what = "is not a directory" if args.data_dir.exists() else "does not exist"
        raise BenchError(f"--data-dir {args.data_dir} {what}")
    check_writable(out)
    t0 = time.perf_counter()
    log.info("suite %s -> %s (device %s%s)", suite.name, out, args.device,
             ", resume" if args.resume else "")
    from tqdm.contrib.logging import logging_redirect_tqdm

    with output_lock(out), logging_redirect_tqdm(loggers=[logging.getLogger("ocnopt")]):
        results = run_suite(suite, out, device=args.device, resume=args.resume,
                            data_dir=args.data_dir, strict_data=datasets is not None,
                            verify_data=not args.no_verify_data, progress=not args.no_progress)
        text, paths = report.render(results, out, plots=not args.no_plots)
    log.info("suite %s finished in %.1f s", suite.name, time.perf_counter() - t0)
    _print_outputs(text, paths)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ocnopt.bench import report

    results = load_results(args.dir)
    errors = report.validate_results(results)
    if errors:
        raise BenchError(f"{args.dir}/results.json does not match the schema: "
                         + "; ".join(errors[:5]))
    text, paths = report.render(results, args.dir, plots=not args.no_plots)
    _print_outputs(text, paths)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    lines = ["datasets:"]
    for name, (ok, detail) in available_datasets(args.data_dir).items():
        lines.append(f"  {name:14s} {'available' if ok else 'MISSING  '}  {DATASETS[name]}")
        lines.append(textwrap.fill(f"{'source' if ok else 'how to get it'}: {detail}",
                                   width=100, initial_indent=" " * 17,
                                   subsequent_indent=" " * 19, break_on_hyphens=False,
                                   break_long_words=False))
    lines.append("models:")
    lines += [f"  {n:14s} {d}" for n, d in MODELS.items()]
    lines.append("optimizers:")
    for name, spec in OPTIMIZERS.items():
        ok, why = spec.available()
        grid = ", ".join(f"{v:g}" for v in spec.lr_grid)
        state = "available" if ok else "MISSING  "
        lines.append(f"  {name:16s} {state}  [{spec.family}] {spec.description}")
        extra = f"lr grid {grid} (default {default_lr(spec):g})"
        if spec.tiny_only:
            extra += "; tiny networks only"
        if not ok:
            extra += f"; {why}"
        lines.append(f"  {'':16s} {extra}")
    lines.append("suites:")
    lines += [f"  {n:14s} {s.description}" for n, s in SUITES.items()]
    speed = importlib.util.find_spec("ocnopt.bench.speed") is not None
    why = "available" if speed else "MISSING: module ocnopt.bench.speed not installed"
    lines.append(f"  (speed measurements: {why})")
    print("\n".join(lines))
    return 0


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the *current* ``sys.stderr`` (which tests and tqdm may swap)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("ocnopt")
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
        root.addHandler(handler)
        root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ocnopt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"bench": _cmd_bench, "list": _cmd_list, "report": _cmd_report}
    try:
        return handlers[args.command](args)
    except (BenchError, DatasetUnavailableError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or "the output folder"
        log.error("interrupted: finished runs are kept in %s/runs; continue with --resume", out)
        return 130


if __name__ == "__main__":
    sys.exit(main())
