"""Summaries, targets and output files (JSON, CSV, Markdown) of a benchmark suite.

:func:`summarise` turns the raw ``results.json`` content (experiments + run records) into
per-optimizer statistics; :func:`compute_targets` evaluates the benchmark's targets as measured
ratios with PASS / MISS / N/A; :func:`render` writes ``results.json`` (with the
summary), ``results.csv``, ``speed.csv``, ``report.md`` and the plots; :func:`format_tables` is
the text the CLI prints. Nothing here trains.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ocnopt.bench.game_report import game_targets
from ocnopt.bench.outdir import atomic_write_text, output_lock, write_json
from ocnopt.bench.paper import DDPNOPT_SOURCE, PAPER_PROTOCOL
from ocnopt.bench.paper_report import (
    ablation_summary,
    ablation_tables,
    cost_summary,
    cost_table,
    paper_detail_table,
    paper_summary,
    paper_table,
    paper_targets,
)
from ocnopt.bench.schema import validate_results
from ocnopt.bench.suites import FIRST_ORDER
from ocnopt.bench.tables import fmt, make_target, md_table, mean_or_none, pm, std_or_none

__all__ = [
    "PROTOCOL",
    "TTT_FRACTION",
    "compute_targets",
    "format_tables",
    "render",
    "summarise",
    "time_to_target",
    "validate_results",
]

log = logging.getLogger(__name__)

#: Target accuracy = this fraction of the best first-order method's final mean test accuracy.
TTT_FRACTION = 0.99
#: Target (b): OCNOpt's time-to-target must be at most this multiple of Adam's.
TTT_RATIO_MAX = 0.7

PROTOCOL = """\
* **Data**: fixed train/val/test splits of `ocnopt.bench.data` (documented there); no downloads.
* **Seeds**: `torch.manual_seed(seed)` before building the model; the training DataLoader
  shuffles with `torch.Generator().manual_seed(seed)`.
* **lr tuning**: each optimizer trains once (seed 0) per value of its registry `lr_grid`; the lr
  with the highest final *validation* accuracy is kept (ties: lower final train loss; diverged
  runs rank last). Without tuning (`--no-lr-grid`) the lr is the lower middle of the grid.
* **Final runs**: seeds 0..N-1 at the best lr (robustness: at best lr x each multiplier). Runs
  are content-addressed, so the seed-0 final run is the tuning run at that lr (selected on val,
  reported on test).
* **Metrics**: test accuracy / final train loss are mean +- sample std over seeds; final train
  loss is the mean minibatch loss of the last epoch. Test evaluation runs before training,
  every `eval_every` steps and after every epoch (val: before training and after every epoch);
  evaluation is excluded from the clock;
  `time_s` counts batch fetch + optimizer step only. ms/step is the median step time (mean of
  the per-seed medians); CPU ms/step likewise with the process CPU time of a step. Peak memory
  is `torch.cuda.max_memory_allocated` on CUDA, n/a on CPU.
* **Time to target (TTT)**: target = 99% of the best first-order method's (sgd/rmsprop/adam)
  final mean test accuracy in the same experiment; a run's TTT is the training clock at the
  first evaluation reaching it; a method's TTT is the mean over seeds and only defined when
  every seed reached the target (otherwise `-` with the count that did).
* **Divergence**: a run whose parameters become non-finite (or with 20 consecutive non-finite
  losses) is stopped and marked diverged; its final accuracy counts as chance (1/classes) and
  its train loss is excluded from the mean. `last_finite` in the run file keeps the last
  finite evaluation.
* **Targets** are printed as measured ratios with PASS / MISS / N/A; nothing is tuned to hide a
  MISS.
"""


# --------------------------------------------------------------------------- statistics






def time_to_target(run: dict[str, Any], target: float | None) -> float | None:
    """Training seconds until the run's test accuracy first reaches ``target`` (``None``: never)."""
    if target is None:
        return None
    h = run["history"]
    for t, acc in zip(h["time_s"], h["test_acc"], strict=True):
        if acc is not None and acc >= target:
            return float(t)
    return None


def _runs_of(results: dict[str, Any], opt: dict[str, Any], mult: float = 1.0
             ) -> list[dict[str, Any]]:
    out = []
    for r in opt["runs"]:
        if math.isclose(r["lr_multiplier"], mult) and r["run_id"] in results["runs"]:
            out.append(results["runs"][r["run_id"]])
    return out


def _row(opt: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "optimizer": opt["name"],
        "family": opt["family"],
        "best_lr": opt["best_lr"],
        "n_runs": len(runs),
        "n_diverged": sum(bool(r["diverged"]) for r in runs),
        "test_acc_mean": mean_or_none([r["final"]["test_acc"] for r in runs]),
        "test_acc_std": std_or_none([r["final"]["test_acc"] for r in runs]),
        "train_loss_mean": mean_or_none([r["final"]["train_loss"] for r in runs]),
        "train_loss_std": std_or_none([r["final"]["train_loss"] for r in runs]),
        "val_acc_mean": mean_or_none([r["final"]["val_acc"] for r in runs]),
        "ms_per_step": mean_or_none([r["ms_per_step"] for r in runs]),
        "cpu_ms_per_step": mean_or_none([r.get("cpu_ms_per_step") for r in runs]),
        "train_time_s": mean_or_none([r["train_time_s"] for r in runs]),
        "peak_mem_mb": mean_or_none([r["peak_mem_mb"] for r in runs]),
        "ttt_s": None,
        "ttt_reached": None,
    }


def _layer_norm_means(runs: list[dict[str, Any]], key: str) -> list[float | None] | None:
    per_run = []
    for r in runs:
        ln = r.get("layer_norms")
        if not ln or not ln[key]:
            continue
        cols = list(zip(*ln[key], strict=True))
        per_run.append([mean_or_none(list(c)) for c in cols])
    if not per_run:
        return None
    return [mean_or_none(list(v)) for v in zip(*per_run, strict=True)]


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per-experiment statistics (``{"experiments": {name: ...}}``) from raw results."""
    out: dict[str, Any] = {}
    for exp in results["experiments"]:
        s: dict[str, Any] = {"name": exp["name"], "kind": exp["kind"], "dataset": exp["dataset"],
                             "model": exp["model"], "status": exp["status"],
                             "skip_reason": exp["skip_reason"], "target_acc": None, "rows": [],
                             "loss": exp.get("loss", "cross_entropy"), "paper": None,
                             "ablation": None}
        out[exp["name"]] = s
        if exp.get("paper"):  # also for a skipped row: the paper's numbers are still shown
            s["paper"] = paper_summary(exp, [])
        if exp["status"] != "ok":
            continue
        if exp["kind"] == "ablation":
            s["ablation"] = ablation_summary(exp, results["runs"])
            continue
        if exp["kind"] == "robustness":
            for opt in exp["optimizers"]:
                by_m = []
                for m in exp["lr_multipliers"]:
                    runs = _runs_of(results, opt, m)
                    accs = [r["final"]["test_acc"] for r in runs]
                    by_m.append({"multiplier": m, "lr": opt["best_lr"] * m, "n_runs": len(runs),
                                 "n_diverged": sum(bool(r["diverged"]) for r in runs),
                                 "test_acc_mean": mean_or_none(accs),
                                 "test_acc_std": std_or_none(accs)})
                valid = [b for b in by_m if b["test_acc_mean"] is not None]
                worst = min(valid, key=lambda b: b["test_acc_mean"]) if valid else None
                s["rows"].append({
                    "optimizer": opt["name"], "family": opt["family"], "best_lr": opt["best_lr"],
                    "by_multiplier": by_m,
                    "worst_acc": worst["test_acc_mean"] if worst else None,
                    "worst_multiplier": worst["multiplier"] if worst else None,
                })
            continue
        rows = []
        for opt in exp["optimizers"]:
            runs = _runs_of(results, opt)
            row = _row(opt, runs)
            if exp["kind"] == "vanishing":
                row["layer_update_norm"] = _layer_norm_means(runs, "update_norm")
                row["layer_grad_norm"] = _layer_norm_means(runs, "grad_norm")
            rows.append((row, runs))
        fo = [r["test_acc_mean"] for r, _ in rows
              if r["optimizer"] in FIRST_ORDER and r["test_acc_mean"] is not None]
        # time-to-target only for compare experiments (in vanishing ones nothing may learn)
        target = TTT_FRACTION * max(fo) if fo and exp["kind"] == "compare" else None
        s["target_acc"] = target
        for row, runs in rows:
            if target is not None and runs:
                ttts = [time_to_target(r, target) for r in runs]
                reached = [t for t in ttts if t is not None]
                row["ttt_reached"] = f"{len(reached)}/{len(runs)}"
                row["ttt_s"] = mean_or_none(reached) if len(reached) == len(runs) else None
            s["rows"].append(row)
        if exp.get("paper"):
            s["paper"] = paper_summary(exp, s["rows"])
    return {"experiments": out}


# --------------------------------------------------------------------------- targets




def _best(rows: list[dict[str, Any]], key: str, pred: Callable[[dict[str, Any]], bool],
          lower: bool = False) -> dict[str, Any] | None:
    cand = [r for r in rows if pred(r) and r.get(key) is not None]
    if not cand:
        return None
    return (min if lower else max)(cand, key=lambda r: r[key])


def _is_ocn(r: dict[str, Any]) -> bool:
    return r.get("family") == "ocnopt" or str(r["optimizer"]).startswith("ocnopt")


_PEER_NAMES = ("soap", "shampoo", "singd")
#: Speed rows standing for "OCNOpt" in target (d), in order of preference: the default
#: configuration ``OCNOpt(model)`` = ekfac curvature with feedback.
SPEED_REFERENCE = ("ocnopt-ekfac+fb", "ocnopt-ekfac-rfull+fb")


def _speed_reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The OCNOpt speed row compared with the peers: the default configuration when measured,
    else the slowest OCNOpt row (conservative)."""
    by_name = {str(r["optimizer"]).lower(): r for r in rows}
    for name in SPEED_REFERENCE:
        if name in by_name:
            return by_name[name]
    return max(rows, key=lambda r: r["ms_per_step"])


def compute_targets(summary: dict[str, Any], speed: list[dict[str, Any]] | None,
                    peer_names: Sequence[str] = _PEER_NAMES) -> list[dict[str, Any]]:
    """Evaluate the benchmark targets (a)-(d) from a :func:`summarise` result and speed rows.

    (a) best OCNOpt variant's mean final test acc / best first-order's, per compare experiment,
    PASS if >= 1; (b) best OCNOpt variant's time-to-target / Adam's on Fashion-MNIST CNN, PASS if
    <= 0.7; (c) best OCNOpt variant's worst mean accuracy over the robustness lr grid / the larger
    of Adam's and SGD's, PASS if > 1; (d) per speed model and external peer: ms/step of the
    default OCNOpt configuration (ekfac + feedback, :data:`SPEED_REFERENCE`; else the slowest
    OCNOpt row) / the peer's, PASS if <= 1. A target that was not measured is N/A with the
    reason; it is never dropped.
    """
    exps = summary["experiments"]
    out: list[dict[str, Any]] = []
    what_a = "OCNOpt final test acc >= best first-order (sgd/rmsprop/adam)"
    compare = [e for e in exps.values() if e["kind"] == "compare"]
    for e in compare:
        if e["status"] != "ok":
            out.append(make_target("a", what_a, "N/A", experiment=e["name"],
                               detail=f"experiment skipped: {e['skip_reason']}"))
            continue
        ocn = _best(e["rows"], "test_acc_mean", _is_ocn)
        fo = _best(e["rows"], "test_acc_mean", lambda r: r["optimizer"] in FIRST_ORDER)
        if ocn is None or fo is None:
            out.append(make_target("a", what_a, "N/A", experiment=e["name"],
                               detail="needs an OCNOpt variant and a first-order baseline"))
            continue
        ratio = ocn["test_acc_mean"] / fo["test_acc_mean"] if fo["test_acc_mean"] else None
        ok = ocn["test_acc_mean"] >= fo["test_acc_mean"]
        out.append(make_target(
            "a", what_a, "PASS" if ok else "MISS", experiment=e["name"], measured=ratio,
            threshold=1.0, comparison=">=",
            detail=(f"{ocn['optimizer']} {ocn['test_acc_mean']:.4f} vs {fo['optimizer']} "
                    f"{fo['test_acc_mean']:.4f}")))
    if not compare:
        out.append(make_target("a", what_a, "N/A", detail="no compare experiment in this suite"))

    what_b = f"OCNOpt time-to-target <= {TTT_RATIO_MAX}x Adam's on Fashion-MNIST CNN"
    fm = [e for e in compare if e["dataset"] == "fashion-mnist" and e["model"] == "cnn"]
    for e in fm:
        adam = next((r for r in e["rows"] if r["optimizer"] == "adam"), None)
        if e["status"] != "ok":
            out.append(make_target("b", what_b, "N/A", experiment=e["name"],
                               detail=f"experiment skipped: {e['skip_reason']}"))
        elif adam is None or adam["ttt_s"] is None:
            out.append(make_target("b", what_b, "N/A", experiment=e["name"],
                               detail="Adam did not run or did not reach the target in every seed"))
        else:
            ocn = _best(e["rows"], "ttt_s", _is_ocn, lower=True)
            if ocn is None:
                reached = ", ".join(f"{r['optimizer']} {r['ttt_reached']}" for r in e["rows"]
                                    if _is_ocn(r))
                out.append(make_target("b", what_b, "MISS", experiment=e["name"],
                                   threshold=TTT_RATIO_MAX, comparison="<=",
                                   detail=f"no OCNOpt variant reached the target in every seed "
                                          f"({reached or 'none ran'})"))
            else:
                ratio = ocn["ttt_s"] / adam["ttt_s"] if adam["ttt_s"] > 0 else math.inf
                out.append(make_target(
                    "b", what_b, "PASS" if ratio <= TTT_RATIO_MAX else "MISS",
                    experiment=e["name"], measured=ratio if math.isfinite(ratio) else None,
                    threshold=TTT_RATIO_MAX, comparison="<=",
                    detail=f"{ocn['optimizer']} {ocn['ttt_s']:.2f}s vs adam {adam['ttt_s']:.2f}s"
                           f" (target acc {e['target_acc']:.4f})"))
    if not fm:
        out.append(make_target("b", what_b, "N/A", detail="Fashion-MNIST CNN not in this run"))

    what_c = "OCNOpt worst acc over the lr grid > Adam's and SGD's"
    rob = [e for e in exps.values() if e["kind"] == "robustness"]
    for e in rob:
        if e["status"] != "ok":
            out.append(make_target("c", what_c, "N/A", experiment=e["name"],
                               detail=f"experiment skipped: {e['skip_reason']}"))
            continue
        ocn = _best(e["rows"], "worst_acc", _is_ocn)
        base = [r for r in e["rows"] if r["optimizer"] in ("adam", "sgd")
                and r["worst_acc"] is not None]
        if ocn is None or not base:
            out.append(make_target("c", what_c, "N/A", experiment=e["name"],
                               detail="needs an OCNOpt variant and adam or sgd"))
            continue
        ref = max(base, key=lambda r: r["worst_acc"])
        ratio = ocn["worst_acc"] / ref["worst_acc"] if ref["worst_acc"] > 0 else math.inf
        others = ", ".join(f"{r['optimizer']} {r['worst_acc']:.4f}" for r in base)
        out.append(make_target(
            "c", what_c, "PASS" if ocn["worst_acc"] > ref["worst_acc"] else "MISS",
            experiment=e["name"], measured=ratio if math.isfinite(ratio) else None,
            threshold=1.0, comparison=">",
            detail=f"{ocn['optimizer']} {ocn['worst_acc']:.4f} vs {others}"))
    if not rob:
        out.append(make_target("c", what_c, "N/A", detail="no robustness experiment in this run"))

    what_d = "OCNOpt ms/step <= every external second-order peer's"
    if not speed:
        out.append(make_target("d", what_d, "N/A", detail="speed suite not run"))
    else:
        models = list(dict.fromkeys(r["model"] for r in speed))
        any_peer = False
        for model in models:
            rows = [r for r in speed if r["model"] == model and r.get("ms_per_step") is not None]
            ocn = [r for r in rows if str(r["optimizer"]).lower().startswith("ocnopt")]
            peers = [r for r in rows if str(r["optimizer"]).lower() in peer_names]
            if not peers:
                continue
            any_peer = True
            if not ocn:
                out.append(make_target("d", what_d, "N/A", experiment=f"speed:{model}",
                                   detail="no OCNOpt row measured"))
                continue
            ref = _speed_reference(ocn)
            lo = min(r["ms_per_step"] for r in ocn)
            hi = max(r["ms_per_step"] for r in ocn)
            for p in peers:
                ratio = ref["ms_per_step"] / p["ms_per_step"]
                out.append(make_target(
                    "d", what_d, "PASS" if ratio <= 1.0 else "MISS",
                    experiment=f"speed:{model}", measured=ratio, threshold=1.0,
                    comparison="<=",
                    detail=f"{ref['optimizer']} {ref['ms_per_step']:.2f} ms vs {p['optimizer']} "
                           f"{p['ms_per_step']:.2f} ms (all {len(ocn)} OCNOpt rows: "
                           f"{lo:.2f}..{hi:.2f} ms)"))
        if not any_peer:
            out.append(make_target("d", what_d, "N/A",
                               detail="no external peer measured (pip install 'ocnopt[peers]')"))
    return out


# --------------------------------------------------------------------------- formatting








def _experiment_table(s: dict[str, Any]) -> str:
    if s["status"] != "ok":
        return f"skipped: {s['skip_reason']}"
    if s["kind"] == "ablation":
        return ablation_tables(s["ablation"] or [])
    if s["kind"] == "robustness":
        mults = [b["multiplier"] for b in s["rows"][0]["by_multiplier"]] if s["rows"] else []
        header = ["optimizer", "best lr", *[f"x{m:g}" for m in mults], "worst", "diverged"]
        rows = []
        for r in s["rows"]:
            div = sum(b["n_diverged"] for b in r["by_multiplier"])
            n = sum(b["n_runs"] for b in r["by_multiplier"])
            rows.append([r["optimizer"], f"{r['best_lr']:.3g}",
                         *[fmt(b["test_acc_mean"]) for b in r["by_multiplier"]],
                         fmt(r["worst_acc"]), f"{div}/{n}"])
        return md_table(header, rows)
    header = ["optimizer", "best lr", "test acc", "train loss", "ms/step", "TTT s", "diverged"]
    if s["kind"] == "vanishing":
        header += ["|du| first", "|du| last", "first/last"]
    cpu = any(r.get("cpu_ms_per_step") is not None for r in s["rows"])
    if cpu:
        header.insert(5, "CPU ms/step")
    mem = any(r["peak_mem_mb"] is not None for r in s["rows"])
    if mem:
        header.append("peak MB")
    rows = []
    for r in s["rows"]:
        ttt = fmt(r["ttt_s"], ".2f") if r["ttt_s"] is not None else (
            f"- ({r['ttt_reached']})" if r["ttt_reached"] else "-")
        row = [r["optimizer"], f"{r['best_lr']:.3g}", pm(r["test_acc_mean"], r["test_acc_std"]),
               pm(r["train_loss_mean"], r["train_loss_std"]), fmt(r["ms_per_step"], ".2f"),
               ttt, f"{r['n_diverged']}/{r['n_runs']}"]
        if cpu:
            row.insert(5, fmt(r.get("cpu_ms_per_step"), ".2f"))
        if s["kind"] == "vanishing":
            un = r.get("layer_update_norm") or [None]
            first, last = un[0], un[-1]
            ratio = first / last if first is not None and last else None
            row += [fmt(first, ".2e"), fmt(last, ".2e"), fmt(ratio, ".3g")]
        if mem:
            row.append(fmt(r["peak_mem_mb"], ".1f"))
        rows.append(row)
    return md_table(header, rows)


def _targets_table(targets: list[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        thr = f"{t['comparison']} {t['threshold']:g}" if t["threshold"] is not None else "-"
        rows.append([t["id"], t["experiment"] or "-", t["target"], fmt(t["measured"], ".3f"), thr,
                     t["status"], t["detail"]])
    return md_table(["", "experiment", "target", "ratio", "need", "status", "detail"], rows)


def _speed_table(speed: list[dict[str, Any]]) -> str:
    rows = [[r["model"], r["optimizer"], fmt(r.get("ms_per_step"), ".2f"),
             fmt(r.get("ratio_to_adam"), ".2f"), fmt(r.get("peak_mem_mb"), ".1f"),
             fmt(r.get("state_mb"), ".2f")] for r in speed]
    return md_table(["model", "optimizer", "ms/step", "x Adam", "peak MB", "state MB"], rows)


def format_tables(results: dict[str, Any], summary: dict[str, Any],
                  targets: list[dict[str, Any]]) -> str:
    """The plain-text (Markdown) tables the CLI prints: one per experiment, speed, targets."""
    parts = []
    skipped = {e["name"]: e.get("skipped_optimizers", []) for e in results.get("experiments", [])}
    for name, s in summary["experiments"].items():
        head = f"## {name} ({s['kind']})"
        if s.get("target_acc") is not None:
            head += f"  target acc = {s['target_acc']:.4f}"
        parts += [head, _experiment_table(s)]
        if s.get("paper") and s["status"] == "ok":
            parts += ["", f"paper row {s['paper']['net']} {s['paper']['data']} (accuracy %):",
                      paper_detail_table(s["paper"])]
        parts += [f"skipped {o['name']}: {o['reason']}" for o in skipped.get(name, [])]
        parts.append("")
    table = paper_table(summary)
    if table:
        parts += ["## the paper's table beside ours (DDPNOpt, test accuracy %)", table, ""]
    if summary.get("cost"):
        parts += ["## cost per iteration against the batch size (s/iter, x Adam, peak MiB)",
                  cost_table(summary["cost"]), ""]
    if results.get("speed"):
        parts += ["## speed", _speed_table(results["speed"]), ""]
    elif results.get("speed_error"):
        parts += ["## speed", f"not run: {results['speed_error']}", ""]
    if results.get("ode"):  # the Neural-ODE suite (ocnopt.bench.ode_suite)
        from ocnopt.bench.ode_suite import format_ode

        parts += ["## Neural ODEs", format_ode(results["ode"]), ""]
    parts += ["## targets", _targets_table(targets)]
    if not results.get("complete", True):
        parts.append("\nNOTE: the suite did not finish; these are partial results "
                     "(finish with --resume).")
    return "\n".join(parts)


def _markdown(results: dict[str, Any], summary: dict[str, Any], targets: list[dict[str, Any]],
              plots: list[Path], out_dir: Path) -> str:
    meta = results["meta"]
    suite = results["suite"]
    lines = [
        f"# OCNOpt benchmark: suite `{suite['name']}`", "",
        f"{suite['description']}", "",
        f"* command: `{meta['command']}`",
        f"* started: {meta['started_at']}, finished: {meta.get('finished_at') or 'not finished'}"
        f", wall time {fmt(meta.get('wall_time_s'), '.1f')} s",
        f"* machine: {meta.get('platform')}, {meta.get('processor')}, {meta.get('cpu_count')} "
        f"CPUs, device `{meta['device']}`"
        + (f" ({meta['cuda_device']})" if meta.get("cuda_device") else ""),
        f"* torch {meta['torch_version']}, Python {meta.get('python_version')}; runs trained "
        f"{meta['runs_trained']}, reused {meta['runs_reused']}; seeds {suite['seeds']}, "
        f"lr tuning {'on' if suite['lr_tuning'] else 'off'}",
        "", "## Protocol", "", PROTOCOL, "## Targets", "", _targets_table(targets), "",
    ]
    table = paper_table(summary)
    if table:
        lines += ["## The paper's table beside ours", "",
                  f"Paper: {DDPNOPT_SOURCE}. Its protocol, as far as known: {PAPER_PROTOCOL} "
                  "Accuracy in %; `diff` = ours - paper; ranks among the paper's seven methods "
                  "that have a number (ours: that ran); the last column lists where our budget "
                  "differs from the paper's.", "", table, ""]
    by_exp: dict[str, list[Path]] = {}
    for p in plots:
        by_exp.setdefault(p.stem.rsplit("__", 1)[0], []).append(p)
    for exp in results["experiments"]:
        s = summary["experiments"][exp["name"]]
        lines += [f"## {exp['name']} ({exp['kind']})", ""]
        if exp.get("data"):
            d = exp["data"]
            lines.append(f"{d['source']}; train/val/test {d['sizes']}; {d['notes']}")
            lines.append(f"model `{exp['model']}` {exp['model_options'] or ''}, batch "
                         f"{exp['batch_size']}, {exp['epochs']} epochs"
                         + (f", target acc {s['target_acc']:.4f}" if s.get("target_acc") else ""))
            lines.append("")
        lines += [_experiment_table(s), ""]
        if s.get("paper") and s["status"] == "ok":
            lines += [f"Paper row {s['paper']['net']} {s['paper']['data']} (accuracy %):", "",
                      paper_detail_table(s["paper"]), ""]
        note = _KIND_NOTES.get(exp["kind"] if exp["kind"] != "vanishing"
                               else f"vanishing-{s['loss']}")
        if note:
            lines += [note, ""]
        if exp["optimizers"] and exp["lr_tuning"]:
            tune = [[o["name"], ", ".join(f"{t['lr']:.3g}: {t['val_acc']:.3f}"
                                          + (" (div)" if t["diverged"] else "")
                                          for t in o["tuning"])] for o in exp["optimizers"]]
            lines += ["lr tuning (final val acc per lr):", "", md_table(["optimizer", "grid"],
                                                                         tune), ""]
        for o in exp["skipped_optimizers"]:
            lines.append(f"* skipped `{o['name']}`: {o['reason']}")
        for p in by_exp.get(exp["name"], []):
            lines.append(f"![{p.stem}]({p.relative_to(out_dir).as_posix()})")
        lines.append("")
    if summary.get("cost"):
        cs = summary["cost"]
        lines += ["## Cost per iteration against the batch size", "", _COST_NOTE.format(
            model=cs["config"]["model"], dataset=cs["config"]["dataset"],
            shape=tuple(cs["config"]["input_shape"]), device=cs["device"],
            threads=cs["num_threads"]), "", cost_table(cs), ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})"
                  for p in by_exp.get("cost", [])]
        lines.append("")
    if results.get("speed"):
        lines += ["## Speed", "", _speed_table(results["speed"]), ""]
    elif results.get("speed_error"):
        lines += ["## Speed", "", f"not run: {results['speed_error']}", ""]
    if results.get("ode"):  # the Neural-ODE suite (ocnopt.bench.ode_suite)
        from ocnopt.bench.ode_suite import ode_markdown

        lines += [ode_markdown(results["ode"], [p for p in plots if p.stem.startswith("ode-")],
                               out_dir)]
    return "\n".join(lines) + "\n"


_COST_NOTE = (
    "`{model}` as on {dataset} (input {shape}), synthetic data, device `{device}`, {threads} "
    "torch thread(s). Each cell: median s/iter over interleaved rounds (x Adam at the same "
    "batch size), and the extra peak memory of training steps (CUDA: max_memory_allocated; "
    "CPU: peak RSS growth in a fresh process). `skipped`: a step took longer than the limit at "
    "a smaller batch size. Timing-sensitive: only meaningful on a quiet machine.")


_KIND_NOTES = {
    "robustness": (
        "Columns x<m>: final test accuracy (mean over seeds) at lr = tuned lr x m; `worst` is the "
        "minimum over the multipliers; diverged runs count at chance level."),
    "ablation": (
        "Feedback ablation: every cell trains the base optimizer (feedback off) and its OCNOpt "
        "variant (feedback on, all else equal) at that lr and second hyperparameter with the "
        "same seeds, no lr tuning; cells show the paired test-accuracy difference variant - "
        "base. Diverged runs count at chance level."),
    "vanishing-mmc": (
        "Deep sigmoid network trained with the Max-Mahalanobis Center loss as in DDPNOpt's Fig. "
        "6 (fixed class centers of squared norm 10 with pairwise inner products -10/(C-1); loss "
        "= ||z - mu_y||^2 / 2, so a collapsed network sits at 5; prediction = nearest center). "
        "`|du|` is the per-layer update norm averaged over the recorded steps and seeds (first "
        "= input layer); `sgd-vgr` is SGD with Pascanu et al.'s gradient-norm-preserving "
        "regulariser (ocnopt.bench.vgr)."),
    "vanishing-cross_entropy": (
        "Deep sigmoid network trained with cross-entropy (DDPNOpt's Fig. 6 used the MMC loss and "
        "reports that with cross-entropy no method escapes vanishing gradients). `|du|` is the "
        "per-layer update norm ||(W,b) after - before|| averaged over the recorded steps and "
        "seeds (first = input layer); gradient norms are recorded in the run files where "
        "`.grad` exists (torch.optim; OCNOpt's feedback pass computes no layer `.grad`)."),
}

_CSV_FIELDS = ["experiment", "kind", "dataset", "model", "optimizer", "family", "lr",
               "lr_multiplier", "n_runs", "n_diverged", "test_acc_mean", "test_acc_std",
               "train_loss_mean", "train_loss_std", "val_acc_mean", "ms_per_step", "ttt_s",
               "ttt_reached", "peak_mem_mb"]


def _csv_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in summary["experiments"].values():
        base = {"experiment": s["name"], "kind": s["kind"], "dataset": s["dataset"],
                "model": s["model"]}
        for r in s["rows"]:
            if s["kind"] == "robustness":
                for b in r["by_multiplier"]:
                    rows.append({**base, "optimizer": r["optimizer"], "family": r["family"],
                                 "lr": b["lr"], "lr_multiplier": b["multiplier"],
                                 "n_runs": b["n_runs"], "n_diverged": b["n_diverged"],
                                 "test_acc_mean": b["test_acc_mean"],
                                 "test_acc_std": b["test_acc_std"]})
            else:
                rows.append({**base, **{k: r.get(k) for k in _CSV_FIELDS if k in r},
                             "lr": r["best_lr"], "lr_multiplier": 1.0})
    return rows


def _csv_text(rows: list[dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def render(results: dict[str, Any], out_dir: str | Path, *, plots: bool = True
           ) -> tuple[str, list[Path]]:
    """Write summary+targets into ``results.json``, plus CSV, ``report.md`` and plots.

    Every file is written atomically while holding the output folder's lock. Returns
    ``(text of the tables, paths written)``.
    """
    from ocnopt.bench import plots as plotting

    out = Path(out_dir)
    summary = summarise(results)
    summary["cost"] = cost_summary(results.get("cost"))
    targets = compute_targets(summary, results.get("speed"))
    targets += paper_targets(summary, summary["cost"])
    targets += game_targets(summary)
    if results.get("ode"):  # the Neural-ODE suite (ocnopt.bench.ode_suite)
        from ocnopt.bench import ode_suite

        targets += ode_suite.ode_targets(results["ode"])
    results = {**results, "summary": summary, "targets": targets}
    written: list[Path] = []
    with output_lock(out):
        pngs = plotting.render_plots(results, summary, out / "plots") if plots else []
        if plots and results.get("ode"):
            from ocnopt.bench.ode_suite import ode_plots

            pngs += ode_plots(results["ode"], out / "plots")
        write_json(out / "results.json", results)
        written.append(out / "results.json")
        atomic_write_text(out / "results.csv", _csv_text(_csv_rows(summary), _CSV_FIELDS))
        written.append(out / "results.csv")
        if results.get("speed"):
            keys = list(dict.fromkeys(k for r in results["speed"] for k in r))
            atomic_write_text(out / "speed.csv", _csv_text(results["speed"], keys))
            written.append(out / "speed.csv")
        if results.get("ode"):
            from ocnopt.bench.ode_suite import ode_rows

            rows = ode_rows(results["ode"])
            keys = list(dict.fromkeys(k for r in rows for k in r))
            atomic_write_text(out / "ode.csv", _csv_text(rows, keys))
            written.append(out / "ode.csv")
        atomic_write_text(out / "report.md", _markdown(results, summary, targets, pngs, out))
        written.append(out / "report.md")
    written += pngs
    return format_tables(results, summary, targets), written
