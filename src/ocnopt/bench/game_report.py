"""Targets of the game suite (``ocnopt bench --suite game``) as measured ratios.

Per experiment that trained OCNOpt-EKFAC under the three information structures:

* ``g1``: final mean test accuracy of ``nash`` and of ``cooperative`` / ``markov``, need >= 1;
* ``g2``: step time of ``nash`` / ``markov``, need <= 1.1, judged on the process CPU time per
  step (mean over seeds of each run's median; less sensitive to other processes on a shared
  machine), with the wall-clock ratio beside it;
* ``g3``: seed spread (sample std of the final test accuracy) of ``nash`` / that of its base
  optimizer (EKFAC, the same curvature without feedback), need <= 1.
"""

from __future__ import annotations

from typing import Any

from ocnopt.bench.tables import make_target

__all__ = ["BASE", "STRUCTURES", "TIME_RATIO_MAX", "game_targets"]

#: The base optimizer and the registry names of its three information structures.
BASE = "ekfac"
STRUCTURES = {info: f"ocnopt-ekfac-{info}" for info in ("markov", "nash", "cooperative")}
#: g2: nash may cost at most this multiple of markov per step.
TIME_RATIO_MAX = 1.1


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def game_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The game targets of every experiment in ``summary`` (:func:`ocnopt.bench.report.
    summarise`) that ran the markov and nash variants; ``[]`` when none did."""
    out: list[dict[str, Any]] = []
    for e in summary["experiments"].values():
        if e["kind"] != "compare" or e["status"] != "ok":
            continue
        rows = {r["optimizer"]: r for r in e["rows"]}
        markov, nash = rows.get(STRUCTURES["markov"]), rows.get(STRUCTURES["nash"])
        if markov is None or nash is None:
            continue
        name = e["name"]
        for info in ("nash", "cooperative"):
            what = f"{info} test acc >= markov's"
            row = rows.get(STRUCTURES[info])
            ratio = None if row is None else _ratio(row["test_acc_mean"], markov["test_acc_mean"])
            if ratio is None:
                out.append(make_target("g1", what, "N/A", experiment=name,
                                       detail=f"{STRUCTURES[info]} or markov has no accuracy"))
                continue
            out.append(make_target(
                "g1", what, "PASS" if ratio >= 1.0 else "MISS", experiment=name,
                measured=ratio, threshold=1.0, comparison=">=",
                detail=f"{row['test_acc_mean']:.4f} vs markov {markov['test_acc_mean']:.4f}"))
        what = f"nash step time <= {TIME_RATIO_MAX}x markov's (process CPU time)"
        cpu = _ratio(nash.get("cpu_ms_per_step"), markov.get("cpu_ms_per_step"))
        wall = _ratio(nash.get("ms_per_step"), markov.get("ms_per_step"))
        if cpu is None:
            out.append(make_target("g2", what, "N/A", experiment=name,
                                   detail="no CPU time per step recorded"))
        else:
            out.append(make_target(
                "g2", what, "PASS" if cpu <= TIME_RATIO_MAX else "MISS", experiment=name,
                measured=cpu, threshold=TIME_RATIO_MAX, comparison="<=",
                detail=f"CPU {nash['cpu_ms_per_step']:.1f} vs {markov['cpu_ms_per_step']:.1f} "
                       f"ms; wall-clock ratio {wall:.3f}" if wall is not None else ""))
        what = f"nash seed spread <= {BASE}'s (std of the final test acc)"
        base = rows.get(BASE)
        if base is None or base["test_acc_std"] is None or nash["test_acc_std"] is None:
            out.append(make_target("g3", what, "N/A", experiment=name,
                                   detail=f"needs {BASE} and at least two seeds of each"))
            continue
        spread = _ratio(nash["test_acc_std"], base["test_acc_std"])
        ok = nash["test_acc_std"] <= base["test_acc_std"]
        out.append(make_target(
            "g3", what, "PASS" if ok else "MISS", experiment=name, measured=spread,
            threshold=1.0, comparison="<=",
            detail=f"std {nash['test_acc_std']:.4f} vs {BASE} {base['test_acc_std']:.4f}"))
    return out
