"""Benchmark runner: training loop metrics, seeding, divergence, skipping, tuning, resume, speed."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from ocnopt.bench import runner  # noqa: E402
from ocnopt.bench.data import load_dataset  # noqa: E402
from ocnopt.bench.optimizers import OPTIMIZERS, OptimizerSpec  # noqa: E402
from ocnopt.bench.report import validate_results  # noqa: E402
from ocnopt.bench.runner import RunConfig, run_suite, train_run  # noqa: E402
from ocnopt.bench.suites import Experiment, Suite, apply_overrides, get_suite  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", subset=96)


def _cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", model="fcn", optimizer="sgd", lr=0.1, seed=0, epochs=2,
                batch_size=32, subset=96, eval_every=2)
    return RunConfig(**{**base, **kw})


def _suite(optimizers=("sgd", "ocnopt-identity"), seeds=2, kind="compare", lr_tuning=True,
           **kw) -> Suite:
    exp = Experiment("digits", kw.pop("model", "fcn"), tuple(optimizers), epochs=1,
                     batch_size=32, subset=96, eval_every=2, num_threads=1, kind=kind, **kw)
    return Suite("t", "tiny test suite", (exp,), seeds=seeds, lr_tuning=lr_tuning)


class _NaNAfter(torch.optim.SGD):
    """SGD whose parameters turn NaN at its 2nd step (a deterministic divergence)."""

    def step(self, closure=None):  # type: ignore[override]
        out = super().step(closure)
        self.n = getattr(self, "n", 0) + 1
        if self.n == 2:
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(float("nan"))
        return out


@pytest.fixture
def fake_specs(monkeypatch):
    specs = {
        "nan-after-2": OptimizerSpec("nan-after-2", "diverges at step 2",
                                     lambda m, lr, **kw: _NaNAfter(m.parameters(), lr=lr),
                                     (0.1,)),
        "needs-missing": OptimizerSpec("needs-missing", "needs an absent module",
                                       lambda m, lr, **kw: None, (0.1,), family="peer",
                                       requires=("ocnopt_no_such_module_xyz",)),
        "tiny-closure": OptimizerSpec("tiny-closure", "tiny nets only", lambda m, lr, **kw: None,
                                      (0.1,), mode="closure", tiny_only=True),
    }
    for k, v in specs.items():
        monkeypatch.setitem(OPTIMIZERS, k, v)
    return specs


# --------------------------------------------------------------------------- one run


def test_run_id_is_content_addressed():
    a, b = _cfg(), _cfg()
    assert a.run_id() == b.run_id()
    assert a.run_id() != _cfg(lr=0.3).run_id()
    assert a.run_id() != _cfg(seed=1).run_id()
    assert a.run_id() != _cfg(device="cuda").run_id()
    assert a.run_id().startswith("digits-fcn-sgd-lr0.1-s0-")


def test_train_run_records_protocol(digits):
    rec = train_run(_cfg(), digits, progress=False)
    h = rec["history"]
    spe = math.ceil(96 / 32)
    assert rec["steps_per_epoch"] == spe and rec["steps"] == 2 * spe
    assert len({len(v) for v in h.values()}) == 1
    # before training, every 2 steps (not at epoch ends twice), after every epoch
    assert h["step"] == [0, 2, 3, 4, 6]
    assert h["time_s"][0] == 0 and all(b >= a for a, b in zip(h["time_s"], h["time_s"][1:],
                                                                       strict=False))
    assert h["train_loss"][0] is None and all(v is not None for v in h["train_loss"][1:])
    assert h["val_acc"][1] is None and h["val_acc"][2] is not None  # val only at epoch ends
    assert rec["final"]["test_acc"] == h["test_acc"][-1]
    assert rec["ms_per_step"] > 0 and rec["peak_mem_mb"] is None  # CPU: no sound peak memory
    assert rec["status"] == "ok" and not rec["diverged"]
    json.dumps(rec, allow_nan=False)


def test_train_run_is_seeded(digits):
    a = train_run(_cfg(optimizer="ocnopt-identity"), digits, progress=False)
    b = train_run(_cfg(optimizer="ocnopt-identity"), digits, progress=False)
    c = train_run(_cfg(optimizer="ocnopt-identity", seed=1), digits, progress=False)
    for key in ("train_loss", "test_acc", "test_loss"):
        assert a["history"][key] == b["history"][key]
    assert a["history"]["train_loss"] != c["history"]["train_loss"]


def test_divergence_is_recorded_not_raised(digits, fake_specs):
    rec = train_run(_cfg(optimizer="nan-after-2", epochs=3), digits, progress=False)
    assert rec["diverged"] and rec["status"] == "diverged"
    assert rec["diverged_at_step"] == 3  # the first NaN loss comes one step after the NaN params
    assert rec["final"]["test_acc"] == pytest.approx(0.1)  # chance level, 10 classes
    assert rec["final"]["train_loss"] is None
    assert rec["last_finite"] == {"step": 0, "val_acc": rec["history"]["val_acc"][0],
                                  "test_acc": rec["history"]["test_acc"][0]}
    assert rec["steps"] == 3 < 3 * 3  # stopped early
    json.dumps(rec, allow_nan=False)


def test_vanishing_records_layer_norms(digits):
    rec = train_run(_cfg(model="deep-sigmoid", norm_every=1, epochs=1), digits, progress=False)
    ln = rec["layer_norms"]
    assert len(ln["layers"]) == 10 and ln["step"] == [1, 2, 3]
    assert all(len(row) == 10 for row in ln["update_norm"])
    assert all(v is not None and v > 0 for row in ln["update_norm"] for v in row)
    # vanishing: the first layer moves much less than the last under SGD
    assert ln["update_norm"][-1][0] < ln["update_norm"][-1][-1]


# --------------------------------------------------------------------------- suites


def test_tuning_reuses_seed0_and_picks_best_val(tmp_path):
    res = run_suite(_suite(optimizers=("sgd",), seeds=3), tmp_path, progress=False)
    (opt,) = res["experiments"][0]["optimizers"]
    grid = OPTIMIZERS["sgd"].lr_grid
    assert [t["lr"] for t in opt["tuning"]] == list(grid)
    best = max(opt["tuning"], key=lambda t: (t["val_acc"], -t["train_loss"]))
    assert opt["best_lr"] == best["lr"] and opt["lr_source"] == "tuned"
    assert opt["runs"][0]["run_id"] == best["run_id"]  # the seed-0 run is the tuning run
    assert res["meta"]["runs_trained"] == len(grid) + 3 - 1
    assert len(list((tmp_path / "runs").glob("*.json"))) == len(grid) + 2
    assert validate_results(json.loads((tmp_path / "results.json").read_text())) == []


def test_no_lr_grid_uses_default_lr(tmp_path):
    res = run_suite(_suite(optimizers=("adam",), seeds=1, lr_tuning=False), tmp_path,
                    progress=False)
    (opt,) = res["experiments"][0]["optimizers"]
    assert opt["tuning"] == [] and opt["lr_source"] == "default"
    assert opt["best_lr"] == 1e-3 == runner.default_lr(OPTIMIZERS["adam"])
    assert res["meta"]["runs_trained"] == 1


def test_robustness_runs_every_multiplier(tmp_path):
    suite = _suite(optimizers=("sgd",), seeds=1, kind="robustness", lr_tuning=False,
                   lr_multipliers=(0.1, 1.0, 10.0))
    res = run_suite(suite, tmp_path, progress=False)
    runs = res["experiments"][0]["optimizers"][0]["runs"]
    assert [r["lr_multiplier"] for r in runs] == [0.1, 1.0, 10.0]
    assert [r["lr"] for r in runs] == pytest.approx([0.003, 0.03, 0.3])


def test_unavailable_and_tiny_only_are_skipped(tmp_path, fake_specs):
    suite = _suite(optimizers=("sgd", "needs-missing", "tiny-closure", "not-registered",
                               "nan-after-2"), seeds=1, lr_tuning=False)
    res = run_suite(suite, tmp_path, progress=False)
    exp = res["experiments"][0]
    skipped = {s["name"]: s["reason"] for s in exp["skipped_optimizers"]}
    assert "ocnopt_no_such_module_xyz" in skipped["needs-missing"]
    assert "tiny networks only" in skipped["tiny-closure"]
    assert "not registered" in skipped["not-registered"]
    ran = [o["name"] for o in exp["optimizers"]]
    assert ran == ["sgd", "nan-after-2"]  # the diverging run did not stop the suite
    div = res["runs"][exp["optimizers"][1]["runs"][0]["run_id"]]
    assert div["diverged"]
    assert validate_results(json.loads((tmp_path / "results.json").read_text())) == []


def test_missing_dataset_skips_in_suite_but_fails_when_strict(tmp_path, monkeypatch):
    from ocnopt.bench import data

    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-such-dir")
    suite = apply_overrides(_suite(), datasets=["fashion-mnist"])
    res = run_suite(suite, tmp_path / "a", data_dir=tmp_path, progress=False)
    exp = res["experiments"][0]
    assert exp["status"] == "skipped" and "apt-get install dataset-fashion-mnist" in \
        exp["skip_reason"]
    with pytest.raises(runner.BenchError, match="dataset-fashion-mnist"):
        run_suite(suite, tmp_path / "b", data_dir=tmp_path, strict_data=True, progress=False)


def test_resume_trains_only_missing_runs(tmp_path, monkeypatch):
    suite = _suite()
    first = run_suite(suite, tmp_path, progress=False)
    n = first["meta"]["runs_trained"]
    assert n == 2 * (4 + 2 - 1)
    files = sorted((tmp_path / "runs").glob("*.json"))
    victim = files[3]
    victim.unlink()
    (tmp_path / "results.json").unlink()
    calls: list[str] = []
    real = runner.train_run

    def counting(cfg, data, **kw):
        calls.append(cfg.run_id())
        return real(cfg, data, **kw)

    monkeypatch.setattr(runner, "train_run", counting)
    again = run_suite(suite, tmp_path, resume=True, progress=False)
    assert calls == [victim.stem]
    assert again["meta"]["runs_trained"] == 1 and again["meta"]["runs_reused"] == n - 1
    for rid, rec in first["runs"].items():  # training is deterministic on CPU
        assert again["runs"][rid]["final"] == rec["final"]
    calls.clear()
    run_suite(suite, tmp_path, resume=False, progress=False)
    assert len(calls) == n  # without --resume everything is trained again


def test_interrupted_suite_resumes(tmp_path, monkeypatch):
    suite = _suite(optimizers=("sgd",), seeds=2)
    real = runner.train_run
    calls: list[str] = []

    def flaky(cfg, data, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(cfg.run_id())
        return real(cfg, data, **kw)

    monkeypatch.setattr(runner, "train_run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, tmp_path, progress=False)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    monkeypatch.setattr(runner, "train_run", lambda cfg, data, **kw: (
        calls.append(cfg.run_id()), real(cfg, data, **kw))[1])
    res = run_suite(suite, tmp_path, resume=True, progress=False)
    assert res["meta"]["runs_reused"] == 2 and res["meta"]["runs_trained"] == 3
    assert len(set(calls)) == len(calls) == 5


# --------------------------------------------------------------------------- speed


def test_speed_missing_module_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ocnopt.bench.speed", None)
    with pytest.raises(runner.SpeedUnavailableError, match="ocnopt.bench.speed"):
        run_suite(get_suite("speed"), tmp_path, progress=False)
    # inside a larger suite it is recorded, not fatal
    suite = Suite("t", "x", _suite(seeds=1, lr_tuning=False).experiments, seeds=1,
                  lr_tuning=False, speed=True)
    res = run_suite(suite, tmp_path, progress=False)
    assert res["speed"] is None and "ocnopt.bench.speed" in res["speed_error"]


def test_speed_rows_are_collected(tmp_path, monkeypatch):
    seen = {}

    def run_speed_suite(out_dir: Path, device: str, quick: bool):
        seen.update(out_dir=out_dir, device=device, quick=quick)
        return [{"model": "mlp", "optimizer": "adam", "ms_per_step": 1.0, "ratio_to_adam": 1.0,
                 "peak_mem_mb": None, "state_mb": 0.5}]

    monkeypatch.setitem(sys.modules, "ocnopt.bench.speed",
                        types.SimpleNamespace(run_speed_suite=run_speed_suite))
    res = run_suite(get_suite("speed"), tmp_path, progress=False)
    assert res["speed"][0]["ms_per_step"] == 1.0 and res["complete"]
    assert seen == {"out_dir": tmp_path, "device": "cpu", "quick": False}
    assert validate_results(json.loads((tmp_path / "results.json").read_text())) == []


def test_overrides_and_suite_definitions():
    quick = get_suite("quick")
    (exp,) = quick.experiments
    assert (exp.dataset, exp.model, exp.batch_size) == ("digits", "fcn", 32)
    assert {"sgd", "adam", "rmsprop", "kfac", "ekfac", "ocnopt-identity", "ocnopt-adam",
            "ocnopt-ekfac", "soap", "shampoo", "singd"} == set(exp.optimizers)
    s = apply_overrides(quick, datasets=["digits", "wine"], models=["fcn"], seeds=1, epochs=2,
                        optimizers=["sgd"], lr_tuning=False)
    assert [e.name for e in s.experiments] == ["digits-fcn", "wine-fcn"]
    assert all(e.epochs == 2 and e.optimizers == ("sgd",) for e in s.experiments)
    assert s.seeds == 1 and not s.lr_tuning
    assert get_suite("full").speed and {e.kind for e in get_suite("full").experiments} == {
        "compare", "robustness", "vanishing"}
    with pytest.raises(ValueError, match="valid"):
        get_suite("nope")
    with pytest.raises(ValueError, match="kind"):
        Experiment("digits", "fcn", ("sgd",), 1, 32, kind="bogus")
