"""The Neural-ODE suite: run records (NFE, t1, times), targets from hand-made runs, reports,
registration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("torchdiffeq")

from ocnopt.bench import ode_suite as S  # noqa: E402
from ocnopt.bench.data import DatasetSplits  # noqa: E402
from ocnopt.bench.suites import SUITES  # noqa: E402


def _images(n: int = 24) -> DatasetSplits:
    g = torch.Generator().manual_seed(0)

    def part(k):
        return TensorDataset(torch.randn(k, 1, 28, 28, generator=g),
                             torch.randint(0, 10, (k,), generator=g))

    return DatasetSplits("synthetic", part(n), part(8), part(8), (1, 28, 28), 10, "test", "")


def test_a_run_records_nfe_t1_and_its_curves():
    spec = S.RunSpec("t", "classify", "synthetic", "convode", "t1-feedback", "adam-open", 1e-2,
                     epochs=1.0, batch_size=8, eval_every=2,
                     model_options={"width": 2, "learn_t1": True, "method": "euler",
                                    "options": {"step_size": 0.25}},
                     subset=None, eval_subset=4,
                     optimizer_options={"ode": {"t1_update_freq": 1}})
    rec = S.train_ode_run(spec, _images())
    assert rec["status"] == "ok" and rec["steps"] == 3 == rec["steps_per_epoch"]
    # euler, 4 steps on [0, t1 = 1]: 4 evaluations forward; 4 adjoint steps and one
    # evaluation at t1 (for dL/dt1) backward
    f, b = rec["nfe_forward"], rec["nfe_backward"]
    assert (f[0], b[0]) == (4, 5) and len(f) == len(b) == 3
    h = rec["history"]
    assert h["step"] == [0, 2, 3] and h["nfe"] == [0, sum(f[:2] + b[:2]), sum(f + b)]
    assert h["time_s"] == sorted(h["time_s"]) and h["time_s"][-1] <= rec["train_time_s"] + 1e-5
    assert len(rec["t1"]) == 3 and len(set(rec["t1"])) == 3  # t1 moves every step here
    assert rec["final"]["test"] is not None and 0 <= rec["final"]["test"] <= 1
    again = S.train_ode_run(spec, _images())  # deterministic given the spec
    assert again["t1"] == rec["t1"] and again["train_loss"] == rec["train_loss"]


def test_density_evaluation_uses_the_exact_trace():
    from ocnopt.bench.ode_models import CNF

    torch.manual_seed(0)
    model = CNF(2, hidden=4, layers=2, method="euler", options={"step_size": 0.5})
    x = torch.randn(5, 2)
    nll, loss = S.evaluate(model, "density", x, torch.zeros(5, dtype=torch.long), batch=2)
    model.dynamics.trace = "exact"
    with torch.no_grad():
        want = float(-model(x).mean())
    assert nll == loss == pytest.approx(want, rel=1e-6)
    assert model.dynamics.trace == "exact"  # restored to what it was


def _run(test, time_s, final_test, nfe=None, cpu=None, t1=None, steps=None):
    n = len(test)
    return {"status": "ok", "history": {"test": test, "time_s": time_s,
                                        "cpu_s": cpu or time_s, "nfe": nfe or list(range(n)),
                                        "step": steps or list(range(n))},
            "train_time_s": time_s[-1], "train_cpu_s": (cpu or time_s)[-1],
            "final": {"test": final_test, "val": final_test}, "nfe_forward": [1] * n,
            "nfe_backward": [1] * n, "t1": t1, "train_loss": [1.0] * n, "steps": n,
            "steps_per_epoch": n, "ms_per_step": 1.0, "cpu_ms_per_step": 1.0}


def _task(name, kind, methods, target=True):
    return {"name": name, "kind": kind, "status": "ok", "target": target,
            "methods": [{"name": m, "run_id": f"{name}-{m}", "optimizer": m, "best_lr": 0.1,
                         "tuning": [{"lr": 0.1, "val": 0.5}]} for m in methods]}


def test_targets_are_measured_ratios():
    runs = {
        # Adam ends at 0.80 after 10 s; snopt gets there at 4 s (ratio 0.4) and ends higher
        "img-adam": _run([0.1, 0.5, 0.8], [0, 5, 10], 0.81),
        "img-snopt": _run([0.1, 0.85, 0.9], [0, 4, 9], 0.9),
        # a density set: at the common 6 s budget snopt's NLL is lower
        "flow-adam": _run([3.0, 2.0, 1.5], [0, 3, 6], 1.5),
        "flow-snopt": _run([3.0, 1.4, 1.3], [0, 4, 8], 1.3),
        "t1-fixed": _run([0.1, 0.5, 0.9], [0, 1, 2], 0.9, nfe=[0, 50, 100]),
        "t1-feedback": _run([0.1, 0.9, 0.9], [0, 1, 2], 0.9, nfe=[0, 40, 80], t1=[0.7, 0.6]),
        "t1-gradient": _run([0.1, 0.5, 0.9], [0, 1, 2], 0.9, nfe=[0, 60, 120], t1=[0.9, 0.9]),
    }
    ode = {"tasks": [_task("img", "classify", ["adam", "snopt"]),
                     _task("flow", "density", ["adam", "snopt"], target=False)],
           "runs": runs, "t1": {"t1": 1.0, "runs": {m: f"t1-{m}" for m in
                                                     ("fixed", "feedback", "gradient")}},
           "cost": [{"task": "img", "method": "snopt", "cpu_ratio_to_adam": 1.3,
                     "ratio_to_adam": 1.1, "cpu_ms_per_step": 5.0, "ms_per_step": 6.0,
                     "nfe_per_step": 40}],
           "memory": [{"method": "snopt", "gradient": "adjoint", "peak_mb": 100.0,
                       "peak_mb_4x": 104.0, "growth": 0.04, "solver_steps": 4}]}
    # the two runs' final curve values: nfe arrays above give the sums of nfe_forward/backward
    for r in runs.values():
        r["nfe_forward"] = [r["history"]["nfe"][-1] // 2]
        r["nfe_backward"] = [r["history"]["nfe"][-1] - r["history"]["nfe"][-1] // 2]
    got = {t["id"]: t for t in S.ode_targets(ode)}
    assert got["ode1"]["status"] == "PASS" and got["ode1"]["measured"] == pytest.approx(0.4)
    assert got["ode2"]["status"] == "PASS" and got["ode2"]["measured"] == pytest.approx(0.9 / 0.81)
    assert got["ode3"]["status"] == "PASS" and got["ode3"]["measured"] == pytest.approx(-0.1)
    assert got["ode4"]["status"] == "MISS" and got["ode4"]["measured"] == 1.3
    assert got["ode5"]["status"] == "PASS" and got["ode5"]["measured"] == 0.04
    # fixed t1 ends at 0.9 with 100 NFE; feedback reaches 0.9 at 40 NFE, gradient at 120
    assert got["ode6"]["status"] == "PASS" and got["ode6"]["measured"] == pytest.approx(0.4)
    assert got["ode7"]["status"] == "PASS" and got["ode7"]["measured"] == pytest.approx(1 / 3)
    slow = copy.deepcopy(ode)
    slow["runs"]["img-snopt"]["history"]["test"] = [0.1, 0.5, 0.79]
    slow["runs"]["t1-feedback"]["history"]["test"] = [0.1, 0.5, 0.8]
    got = {t["id"]: t for t in S.ode_targets(slow)}
    assert got["ode1"]["status"] == "MISS" and "never reached" in got["ode1"]["detail"]
    assert got["ode6"]["status"] == "MISS" and got["ode7"]["status"] == "MISS"
    text = S.format_ode(ode)
    assert "### img" in text and "### flow" in text and "learned t1" in text


def test_the_suites_are_registered_with_equal_lr_grids():
    assert SUITES["ode"].ode == "full" and SUITES["ode-quick"].ode == "quick"
    assert len({len(g) for g in S.LR_GRIDS.values()}) == 1
    for prof in S.PROFILES.values():
        for task in prof.tasks:
            assert set(task.methods) <= set(S.METHODS)
            assert task.tune_epochs <= task.epochs
