"""Small PNG plots (6x4 in, 100 dpi) of benchmark results, via matplotlib's Agg canvas.

Uses ``matplotlib.figure.Figure`` directly (no pyplot, no global backend switch, no GUI).
Files are named ``<experiment>__<what>.png``:

* ``acc_vs_step`` / ``acc_vs_time``: test accuracy vs optimizer step and vs training
  wall-clock seconds, mean over seeds with a +-1 std band (compare and vanishing experiments);
* ``robustness``: final test accuracy vs lr multiplier (log x), one line per optimizer;
* ``layer_norms``: per-layer update norm ``||u_t(after) - u_t(before)||`` vs step (log y), one
  panel per optimizer, one line per layer (vanishing experiments);
* ``train_loss``: training loss vs step (log y), mean over seeds (vanishing experiments);
* ``feedback_ablation``: heatmap of the accuracy difference feedback on - off over the lr x
  second-hyperparameter grid, one panel per base optimizer (ablation experiments);
* ``cost__vs_batch_size.png``: s/iter and extra peak memory against the batch size, log-log.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ocnopt.bench.outdir import atomic_write_bytes

__all__ = ["FIGSIZE", "DPI", "render_plots"]

log = logging.getLogger(__name__)

FIGSIZE = (6.0, 4.0)
DPI = 100


def _figure(nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically (a reader never sees half a file)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _stack(series: list[list[float | None]]) -> np.ndarray:
    """Pad ragged per-seed series with NaN into an array (seeds, max_len)."""
    n = max(len(s) for s in series)
    out = np.full((len(series), n), np.nan)
    for i, s in enumerate(series):
        out[i, : len(s)] = [np.nan if v is None else v for v in s]
    return out


def _mean_std(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise nan-mean and nan-std (all-NaN columns give NaN without warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(arr, axis=0)
        std = np.nanstd(arr, axis=0) if arr.shape[0] > 1 else np.zeros(arr.shape[1])
    return mean, std


def _final_runs(results: dict[str, Any], opt: dict[str, Any]) -> list[dict[str, Any]]:
    return [results["runs"][r["run_id"]] for r in opt["runs"]
            if math.isclose(r["lr_multiplier"], 1.0) and r["run_id"] in results["runs"]]


def _curves(results: dict[str, Any], exp: dict[str, Any], target: float | None,
            out_dir: Path) -> list[Path]:
    paths = []
    for xkey, xlabel, what in (("step", "optimizer step", "acc_vs_step"),
                               ("time_s", "training wall-clock (s)", "acc_vs_time")):
        fig, axes = _figure()
        ax = axes[0, 0]
        for opt in exp["optimizers"]:
            runs = _final_runs(results, opt)
            if not runs:
                continue
            acc = _stack([r["history"]["test_acc"] for r in runs])
            xs = _stack([r["history"][xkey] for r in runs])
            mean, std = _mean_std(acc)
            x, _ = _mean_std(xs)
            ok = ~np.isnan(mean) & ~np.isnan(x)
            ls = "-" if opt["family"] == "ocnopt" else ("--" if opt["family"] == "first-order"
                                                        else ":")
            (line,) = ax.plot(x[ok], mean[ok], ls, lw=1.2, label=f"{opt['name']} ({len(runs)})")
            ax.fill_between(x[ok], (mean - std)[ok], (mean + std)[ok], color=line.get_color(),
                            alpha=0.15, lw=0)
        if target is not None:
            ax.axhline(target, color="0.5", lw=0.8, ls="-.", label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{exp['name']}: test accuracy (mean +- std over seeds)", fontsize=9)
        lo = min((b for b in ax.get_ylim()), default=0.0)
        ax.set_ylim(max(lo, 0.0), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="lower right")
        paths.append(_save(fig, out_dir / f"{exp['name']}__{what}.png"))
    return paths


def _robustness(exp_summary: dict[str, Any], out_dir: Path) -> Path | None:
    rows = exp_summary["rows"]
    if not rows:
        return None
    fig, axes = _figure()
    ax = axes[0, 0]
    for r in rows:
        m = np.array([b["multiplier"] for b in r["by_multiplier"]], dtype=float)
        acc = np.array([np.nan if b["test_acc_mean"] is None else b["test_acc_mean"]
                        for b in r["by_multiplier"]])
        err = np.array([0.0 if b["test_acc_std"] is None else b["test_acc_std"]
                        for b in r["by_multiplier"]])
        ls = "-" if r["family"] == "ocnopt" else ("--" if r["family"] == "first-order" else ":")
        ax.errorbar(m, acc, yerr=err, fmt=ls + "o", ms=3, lw=1.2, capsize=2,
                    label=f"{r['optimizer']} (lr*={r['best_lr']:.3g})")
    ax.set_xscale("log")
    ax.set_xticks([b["multiplier"] for b in rows[0]["by_multiplier"]])
    ax.set_xticklabels([f"x{b['multiplier']:g}" for b in rows[0]["by_multiplier"]])
    ax.set_xlabel("lr multiplier (relative to each method's tuned lr)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{exp_summary['name']}: lr robustness", fontsize=9)
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower center")
    return _save(fig, out_dir / f"{exp_summary['name']}__robustness.png")


def _layer_norms(results: dict[str, Any], exp: dict[str, Any], out_dir: Path) -> Path | None:
    from matplotlib import colormaps

    panels = []
    for opt in exp["optimizers"]:
        runs = [r for r in _final_runs(results, opt) if r.get("layer_norms")]
        if runs:
            panels.append((opt["name"], runs))
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols)
    cmap = colormaps["viridis"]
    for k, (name, runs) in enumerate(panels):
        ax = axes[k // ncols, k % ncols]
        ln = runs[0]["layer_norms"]
        steps = np.array(ln["step"], dtype=float)
        n_layers = len(ln["layers"])
        for j in range(n_layers):
            arr = _stack([[row[j] for row in r["layer_norms"]["update_norm"]] for r in runs])
            mean, _ = _mean_std(arr)
            n = min(len(steps), len(mean))
            y = np.where(mean[:n] > 0, mean[:n], np.nan)
            ax.plot(steps[:n], y, lw=0.8, color=cmap(j / max(n_layers - 1, 1)),
                    label=f"L{j + 1}" if k == 0 else None)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    fig.suptitle(f"{exp['name']}: per-layer update norm vs step (L1 = input layer)", fontsize=8)
    fig.legend(fontsize=5, ncol=1, loc="center right")
    fig.subplots_adjust(right=0.9)
    return _save(fig, out_dir / f"{exp['name']}__layer_norms.png")


def _loss_curves(results: dict[str, Any], exp: dict[str, Any], out_dir: Path) -> Path | None:
    """Training loss (mean minibatch loss of each evaluation interval) against the step."""
    fig, axes = _figure()
    ax = axes[0, 0]
    drawn = False
    for opt in exp["optimizers"]:
        runs = _final_runs(results, opt)
        if not runs:
            continue
        loss = _stack([r["history"]["train_loss"] for r in runs])
        steps = _stack([r["history"]["step"] for r in runs])
        mean, std = _mean_std(loss)
        x, _ = _mean_std(steps)
        ok = ~np.isnan(mean) & ~np.isnan(x) & (mean > 0)
        ls = "-" if opt["family"] == "ocnopt" else "--"
        (line,) = ax.plot(x[ok], mean[ok], ls, lw=1.2, label=f"{opt['name']} ({len(runs)})")
        ax.fill_between(x[ok], np.maximum(mean - std, mean * 0.5)[ok], (mean + std)[ok],
                        color=line.get_color(), alpha=0.15, lw=0)
        drawn = True
    if not drawn:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss ({exp.get('loss', 'cross_entropy')})")
    ax.set_title(f"{exp['name']}: training loss (mean +- std over seeds)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, out_dir / f"{exp['name']}__train_loss.png")


def _ablation_heatmap(exp_summary: dict[str, Any], out_dir: Path) -> Path | None:
    """One panel per grid: mean accuracy difference (variant - base, points) over lr x value."""
    from matplotlib.colors import TwoSlopeNorm

    grids = [g for g in exp_summary.get("ablation") or [] if g["n_cells"]]
    if not grids:
        return None
    ncols = min(2, len(grids))
    nrows = math.ceil(len(grids) / ncols)
    fig, axes = _figure(nrows, ncols)
    fig.set_size_inches(FIGSIZE[0] * ncols / 1.4, FIGSIZE[1] * nrows / 1.3)
    diffs = [100 * c["diff_mean"] for g in grids for c in g["cells"]
             if c["diff_mean"] is not None]
    lim = max(max((abs(d) for d in diffs), default=1.0), 1e-3)
    norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    image = None
    for k, g in enumerate(grids):
        ax = axes[k // ncols, k % ncols]
        cell = {(c["value"], c["lr"]): c for c in g["cells"]}
        grid = np.full((len(g["values"]), len(g["lrs"])), np.nan)
        for i, v in enumerate(g["values"]):
            for j, lr in enumerate(g["lrs"]):
                c = cell.get((v, lr))
                if c is not None and c["diff_mean"] is not None:
                    grid[i, j] = 100 * c["diff_mean"]
                    dark = abs(grid[i, j]) > 0.6 * lim
                    ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
        image = ax.imshow(grid, cmap="RdBu", norm=norm, origin="lower", aspect="auto")
        ax.set_xticks(range(len(g["lrs"])), [f"{lr:g}" for lr in g["lrs"]], fontsize=6)
        ax.set_yticks(range(len(g["values"])), [f"{v:g}" for v in g["values"]], fontsize=6)
        ax.set_xlabel("learning rate", fontsize=7)
        ax.set_ylabel(g["param"], fontsize=7)
        ax.set_title(f"{g['variant']} - {g['base']}", fontsize=7)
    for k in range(len(grids), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, cax=fig.add_axes((0.83, 0.15, 0.02, 0.7)))
        bar.set_label("test accuracy difference (points), feedback on - off", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{exp_summary['name']}: feedback ablation (mean over seeds)", fontsize=8)
    fig.subplots_adjust(hspace=0.5, wspace=0.35, right=0.78)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")  # colorbar axes: no tight_layout
    path = out_dir / f"{exp_summary['name']}__feedback_ablation.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def _cost_plot(cost: dict[str, Any], out_dir: Path) -> Path | None:
    """Log-log s/iter and peak memory against the batch size, one line per optimizer."""
    rows = [r for r in cost["rows"] if r["s_per_iter"] is not None]
    if not rows:
        return None
    fig, axes = _figure(1, 2)
    fig.set_size_inches(FIGSIZE[0] * 1.6, FIGSIZE[1])
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        pts = sorted((r["batch_size"], r["s_per_iter"], r["peak_mem_mb"]) for r in rows
                     if r["optimizer"] == name)
        b = np.array([p[0] for p in pts], dtype=float)
        ls = "-" if name.startswith("ocnopt") else "--"
        axes[0, 0].plot(b, [p[1] for p in pts], ls + "o", ms=3, lw=1.2, label=name)
        mem = np.array([np.nan if p[2] is None or p[2] <= 0 else p[2] for p in pts])
        if not np.all(np.isnan(mem)):
            axes[0, 1].plot(b, mem, ls + "o", ms=3, lw=1.2, label=name)
    for ax, label in ((axes[0, 0], "s / iteration"), (axes[0, 1], "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"cost against the batch size ({cost['config']['model']} as on "
                 f"{cost['config']['dataset']}, {cost['device']})", fontsize=8)
    return _save(fig, out_dir / "cost__vs_batch_size.png")


def render_plots(results: dict[str, Any], summary: dict[str, Any], out_dir: str | Path
                 ) -> list[Path]:
    """Write every plot of ``results`` under ``out_dir``; returns the PNG paths."""
    out = Path(out_dir)
    paths: list[Path] = []
    for exp in results["experiments"]:
        if exp["status"] != "ok" or not (exp["optimizers"] or exp.get("ablation")):
            continue
        s = summary["experiments"][exp["name"]]
        try:
            if exp["kind"] in ("compare", "vanishing"):
                paths += _curves(results, exp, s.get("target_acc"), out)
            made: list[Path | None] = []
            if exp["kind"] == "robustness":
                made = [_robustness(s, out)]
            elif exp["kind"] == "vanishing":
                made = [_layer_norms(results, exp, out), _loss_curves(results, exp, out)]
            elif exp["kind"] == "ablation":
                made = [_ablation_heatmap(s, out)]
            paths += [p for p in made if p]
        except Exception:  # a plot must never lose the results
            log.exception("plotting %s failed", exp["name"])
    if summary.get("cost"):
        try:
            p = _cost_plot(summary["cost"], out)
            paths += [p] if p else []
        except Exception:
            log.exception("plotting the cost failed")
    return paths
