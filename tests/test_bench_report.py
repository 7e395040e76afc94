"""Benchmark report: statistics, time-to-target, issue-3 targets, schema validation, outputs."""

from __future__ import annotations

import copy
import json
import struct

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from ocnopt.bench.report import (  # noqa: E402
    compute_targets,
    format_tables,
    render,
    summarise,
    time_to_target,
    validate_results,
)
from ocnopt.bench.runner import run_suite  # noqa: E402
from ocnopt.bench.suites import Experiment, Suite  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    exp = Experiment("digits", "fcn", ("sgd", "adam", "ocnopt-identity"), epochs=1,
                     batch_size=32, subset=96, eval_every=1, num_threads=1)
    suite = Suite("t", "tiny", (exp,), seeds=2, lr_tuning=False)
    return out, run_suite(suite, out, progress=False)


# --------------------------------------------------------------------------- statistics


def _run(test_acc, time_s, final_acc=None, diverged=False, loss=0.5):
    return {"history": {"time_s": time_s, "test_acc": test_acc},
            "final": {"test_acc": final_acc if final_acc is not None else test_acc[-1],
                      "train_loss": None if diverged else loss, "val_acc": 0.5},
            "diverged": diverged, "ms_per_step": 2.0, "train_time_s": time_s[-1],
            "peak_mem_mb": None, "layer_norms": None}


def test_time_to_target():
    run = _run([0.1, 0.5, 0.8, 0.9], [0.0, 1.0, 2.0, 3.0])
    assert time_to_target(run, 0.8) == 2.0
    assert time_to_target(run, 0.85) == 3.0
    assert time_to_target(run, 0.95) is None
    assert time_to_target(run, None) is None


def _results(rows: dict[str, list[dict]]) -> dict:
    """Raw results with one compare experiment; ``rows``: optimizer -> run records."""
    runs, opts = {}, []
    fam = {"sgd": "first-order", "adam": "first-order", "ocnopt-adam": "ocnopt"}
    for name, recs in rows.items():
        refs = []
        for i, r in enumerate(recs):
            rid = f"{name}-{i}"
            runs[rid] = r
            refs.append({"run_id": rid, "seed": i, "lr": 0.1, "lr_multiplier": 1.0})
        opts.append({"name": name, "family": fam[name], "best_lr": 0.1, "runs": refs})
    exp = {"name": "d-fcn", "kind": "compare", "dataset": "d", "model": "fcn", "status": "ok",
           "skip_reason": None, "optimizers": opts}
    return {"experiments": [exp], "runs": runs}


def test_summarise_statistics_and_ttt():
    res = _results({
        "sgd": [_run([0.1, 0.8, 0.90], [0, 1, 2]), _run([0.1, 0.7, 0.80], [0, 1, 2])],
        "adam": [_run([0.1, 0.95, 0.92], [0, 1, 2]), _run([0.1, 0.93, 0.90], [0, 2, 4])],
        "ocnopt-adam": [_run([0.1, 0.95, 0.95], [0, 3, 6]),
                        _run([0.1, 0.1, 0.1], [0, 1, 2], diverged=True)],
    })
    s = summarise(res)["experiments"]["d-fcn"]
    rows = {r["optimizer"]: r for r in s["rows"]}
    assert s["target_acc"] == pytest.approx(0.99 * 0.91)
    assert rows["sgd"]["test_acc_mean"] == pytest.approx(0.85)
    assert rows["sgd"]["test_acc_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert rows["adam"]["ttt_s"] == pytest.approx((1 + 2) / 2) and rows["adam"]["ttt_reached"] \
        == "2/2"
    assert rows["sgd"]["ttt_s"] is None and rows["sgd"]["ttt_reached"] == "0/2"
    # one diverged seed: accuracy counts (at its recorded chance level), loss does not
    assert rows["ocnopt-adam"]["n_diverged"] == 1
    assert rows["ocnopt-adam"]["test_acc_mean"] == pytest.approx((0.95 + 0.1) / 2)
    assert rows["ocnopt-adam"]["train_loss_mean"] == pytest.approx(0.5)
    assert rows["ocnopt-adam"]["ttt_s"] is None and rows["ocnopt-adam"]["ttt_reached"] == "1/2"


# --------------------------------------------------------------------------- targets


def _row(name, family, acc=None, ttt=None, worst=None):
    return {"optimizer": name, "family": family, "test_acc_mean": acc, "ttt_s": ttt,
            "ttt_reached": None if ttt is None else "3/3", "worst_acc": worst}


def _summary(*exps):
    return {"experiments": {e["name"]: e for e in exps}}


def _exp(name, kind, rows, dataset="digits", model="fcn", status="ok"):
    return {"name": name, "kind": kind, "dataset": dataset, "model": model, "status": status,
            "skip_reason": None if status == "ok" else "no data", "target_acc": 0.9,
            "rows": rows}


def _by(targets, tid):
    return [t for t in targets if t["id"] == tid]


def test_target_a_accuracy_vs_first_order():
    fo = [_row("sgd", "first-order", 0.90), _row("adam", "first-order", 0.95)]
    win = _exp("w", "compare", [*fo, _row("ocnopt-adam", "ocnopt", 0.96),
                                _row("ocnopt-ekfac", "ocnopt", 0.80)])
    tie = _exp("t", "compare", [*fo, _row("ocnopt-adam", "ocnopt", 0.95)])
    lose = _exp("l", "compare", [*fo, _row("ocnopt-adam", "ocnopt", 0.94),
                                 _row("ekfac", "second-order", 0.99)])
    gone = _exp("g", "compare", [], status="skipped")
    t = {x["experiment"]: x for x in _by(compute_targets(_summary(win, tie, lose, gone), None),
                                         "a")}
    assert t["w"]["status"] == "PASS" and t["w"]["measured"] == pytest.approx(0.96 / 0.95)
    assert "ocnopt-adam" in t["w"]["detail"] and "adam 0.9500" in t["w"]["detail"]
    assert t["t"]["status"] == "PASS"  # ">=": equal accuracy passes
    assert t["l"]["status"] == "MISS" and t["l"]["measured"] == pytest.approx(0.94 / 0.95)
    assert t["g"]["status"] == "N/A"


def test_target_b_time_to_target_fashion_cnn():
    def fm(ocn_ttt, adam_ttt=10.0):
        return _exp("fashion-mnist-cnn", "compare",
                    [_row("adam", "first-order", 0.9, ttt=adam_ttt),
                     _row("ocnopt-ekfac", "ocnopt", 0.9, ttt=ocn_ttt)],
                    dataset="fashion-mnist", model="cnn")

    (t,) = _by(compute_targets(_summary(fm(6.0)), None), "b")
    assert t["status"] == "PASS" and t["measured"] == pytest.approx(0.6)
    (t,) = _by(compute_targets(_summary(fm(8.0)), None), "b")
    assert t["status"] == "MISS" and t["measured"] == pytest.approx(0.8)
    (t,) = _by(compute_targets(_summary(fm(None)), None), "b")
    assert t["status"] == "MISS"  # OCNOpt never reached the target
    (t,) = _by(compute_targets(_summary(fm(5.0, adam_ttt=None)), None), "b")
    assert t["status"] == "N/A"
    (t,) = _by(compute_targets(_summary(_exp("digits-fcn", "compare", [])), None), "b")
    assert t["status"] == "N/A" and "not in this run" in t["detail"]


def test_target_c_robustness_worst_case():
    def rob(ocn_worst):
        return _exp("r", "robustness", [_row("sgd", "first-order", worst=0.30),
                                        _row("adam", "first-order", worst=0.60),
                                        _row("ocnopt-adam", "ocnopt", worst=ocn_worst)])

    (t,) = _by(compute_targets(_summary(rob(0.7)), None), "c")
    assert t["status"] == "PASS" and t["measured"] == pytest.approx(0.7 / 0.6)
    (t,) = _by(compute_targets(_summary(rob(0.6)), None), "c")
    assert t["status"] == "MISS"  # must be strictly higher
    (t,) = _by(compute_targets(_summary(rob(0.5)), None), "c")
    assert t["status"] == "MISS" and "sgd 0.3000, adam 0.6000" in t["detail"]


def test_target_d_speed_vs_peers():
    speed = [
        {"model": "mlp", "optimizer": "adam", "ms_per_step": 1.0},
        {"model": "mlp", "optimizer": "ocnopt-identity", "ms_per_step": 1.5},
        {"model": "mlp", "optimizer": "ocnopt-ekfac+fb", "ms_per_step": 2.5},
        {"model": "mlp", "optimizer": "ocnopt-kfac+fb", "ms_per_step": 9.0},
        {"model": "mlp", "optimizer": "soap", "ms_per_step": 5.0},
        {"model": "mlp", "optimizer": "shampoo", "ms_per_step": 2.0},
        {"model": "cnn", "optimizer": "ocnopt-x", "ms_per_step": 3.0},
        {"model": "cnn", "optimizer": "ocnopt-y", "ms_per_step": 4.0},
        {"model": "cnn", "optimizer": "singd", "ms_per_step": 3.5},
    ]
    t = {(x["experiment"], x["detail"].split(" vs ")[1].split()[0]): x
         for x in _by(compute_targets(_summary(), speed), "d")}
    # default configuration (ekfac + feedback) is the reference where measured
    assert t[("speed:mlp", "soap")]["status"] == "PASS"
    assert t[("speed:mlp", "soap")]["measured"] == pytest.approx(0.5)
    assert t[("speed:mlp", "shampoo")]["status"] == "MISS"
    # otherwise the slowest OCNOpt row (conservative)
    assert t[("speed:cnn", "singd")]["status"] == "MISS"
    assert t[("speed:cnn", "singd")]["measured"] == pytest.approx(4.0 / 3.5)
    (na,) = _by(compute_targets(_summary(), speed[:4]), "d")
    assert na["status"] == "N/A" and "peers" in na["detail"]
    (na,) = _by(compute_targets(_summary(), None), "d")
    assert na["status"] == "N/A"


# --------------------------------------------------------------------------- schema + files


def test_schema_accepts_real_results_and_rejects_broken(smoke):
    out, res = smoke
    stored = json.loads((out / "results.json").read_text())
    assert stored["schema_version"] == 1 and stored["complete"] is True
    assert validate_results(stored) == []
    bad = copy.deepcopy(stored)
    del bad["meta"]["device"]
    assert any("meta.device" in e for e in validate_results(bad))
    bad = copy.deepcopy(stored)
    rid = next(iter(bad["runs"]))
    bad["runs"][rid]["final"]["test_acc"] = "0.9"
    assert any("final.test_acc" in e for e in validate_results(bad))
    bad = copy.deepcopy(stored)
    bad["runs"][rid]["history"]["test_acc"].append(0.5)
    assert any("different lengths" in e for e in validate_results(bad))
    bad = copy.deepcopy(stored)
    del bad["runs"][rid]
    assert any("not in $.runs" in e for e in validate_results(bad))
    bad = copy.deepcopy(stored)
    bad["schema_version"] = 99
    assert validate_results(bad)
    bad = copy.deepcopy(stored)
    bad["runs"][rid]["train_time_s"] = float("nan")
    assert validate_results(bad)


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_render_writes_report_csv_and_small_plots(smoke):
    out, res = smoke
    text, paths = render(res, out)
    names = {p.name for p in paths}
    assert {"results.json", "results.csv", "report.md", "digits-fcn__acc_vs_step.png",
            "digits-fcn__acc_vs_time.png"} <= names
    for p in paths:
        if p.suffix == ".png":
            assert _png_size(p) == (600, 400) and p.stat().st_size < 150_000
    md = (out / "report.md").read_text()
    assert "## Protocol" in md and "99%" in md and "## Targets" in md
    assert "plots/digits-fcn__acc_vs_step.png" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("experiment,kind,dataset") and len(csv_lines) == 1 + 3
    stored = json.loads((out / "results.json").read_text())
    assert {t["id"] for t in stored["targets"]} == {"a", "b", "c", "d"}
    assert validate_results(stored) == []
    for opt in ("sgd", "adam", "ocnopt-identity"):
        assert opt in text
    assert "PASS" in text or "MISS" in text


def test_format_tables_robustness_and_vanishing():
    summary = {"experiments": {
        "r": {"name": "r", "kind": "robustness", "status": "ok", "target_acc": None, "rows": [
            {"optimizer": "sgd", "family": "first-order", "best_lr": 0.1, "worst_acc": 0.3,
             "worst_multiplier": 10.0, "by_multiplier": [
                 {"multiplier": 1.0, "lr": 0.1, "n_runs": 2, "n_diverged": 0,
                  "test_acc_mean": 0.9, "test_acc_std": 0.01},
                 {"multiplier": 10.0, "lr": 1.0, "n_runs": 2, "n_diverged": 1,
                  "test_acc_mean": 0.3, "test_acc_std": 0.2}]}]},
    }}
    text = format_tables({"complete": False}, summary, compute_targets(summary, None))
    assert "x10" in text and "0.3000" in text and "1/4" in text
    assert "partial results" in text
