"""The game suite: its networks, registry entries, lr reuse across experiments, targets."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from ocnopt import OCNOpt  # noqa: E402
from ocnopt.bench.game_models import BasicBlock, Inception  # noqa: E402
from ocnopt.bench.game_report import STRUCTURES, game_targets  # noqa: E402
from ocnopt.bench.models import MODELS, build_model  # noqa: E402
from ocnopt.bench.optimizers import OPTIMIZERS  # noqa: E402
from ocnopt.bench.report import validate_results  # noqa: E402
from ocnopt.bench.runner import run_suite  # noqa: E402
from ocnopt.bench.suites import (  # noqa: E402
    GAME_OPTIMIZERS,
    Experiment,
    Suite,
    apply_overrides,
    get_suite,
)
from ocnopt.feedback import GameFeedback  # noqa: E402


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("name", ["resnet", "inception"])
def test_game_models_build_and_are_registered(name: str) -> None:
    assert name in MODELS
    torch.manual_seed(0)
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist")
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="image"):
        build_model(name, input_shape=(784,), num_classes=10)


@pytest.mark.parametrize("name,blocks,groups", [("resnet", 3, [2, 2]),
                                                ("inception", 2, [3, 3])])
def test_game_models_have_the_intended_structure(name: str, blocks: int, groups: list[int]
                                                 ) -> None:
    """ResNet: three BasicBlocks, the last two with a downsample conv that reads the block
    input with conv1 (a cooperative pair); inception: two modules whose three conv branch heads
    read the module input (a group of three); every layer's cut is observable."""
    torch.manual_seed(0)
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10)
    kind = BasicBlock if name == "resnet" else Inception
    assert sum(isinstance(m, kind) for m in model.modules()) == blocks
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    game = GameFeedback(model, _convs(model), "cooperative")
    with game.record(), torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unobservable cut tensor
        plan = game.prepare(loss)
    assert sorted(len(g) for g in plan.groups) == groups
    assert any(len(p.terms) > 1 for p in plan.players)  # skips / finished branches wait


@pytest.mark.parametrize("name", ["resnet", "inception"])
@pytest.mark.parametrize("information", ["markov", "nash", "cooperative"])
def test_game_models_train_under_every_structure(name: str, information: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=(1, 12, 12), num_classes=3)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm parameters: open-loop fallback
        opt = OCNOpt(model, lr=0.05, curvature="ekfac", momentum=0.9, feedback_clip=1.0,
                     information=information, factor_update_freq=1, update_freq=2)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            opt.step(lambda: F.cross_entropy(model(x), y))
    assert opt.skipped_steps == 0
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < first


def test_game_suite_definition() -> None:
    suite = get_suite("game")
    assert [e.name for e in suite.experiments] == [
        "mnist5k-resnet", "fashion-mnist-resnet", "mnist5k-inception", "fashion-mnist-inception"]
    assert suite.seeds >= 3 and suite.lr_tuning
    for e in suite.experiments:
        assert e.optimizers == GAME_OPTIMIZERS and e.num_threads == 1
        assert e.lr_from == (None if e.dataset == "mnist5k" else f"mnist5k-{e.model}")
        assert e.subset is None  # the full training splits
    for info, name in STRUCTURES.items():
        assert name in GAME_OPTIMIZERS
        opt = OPTIMIZERS[name].build(nn.Linear(2, 2), 0.1)
        assert opt.information == info and opt.curvature == "ekfac"


def test_lr_from_reuses_the_tuned_lr_and_is_dropped_when_its_source_is_renamed(tmp_path
                                                                                 ) -> None:
    common = dict(epochs=1, batch_size=32, subset=96, eval_every=2, num_threads=1)
    first = Experiment("digits", "fcn", ("sgd",), **common)
    second = Experiment("digits", "deep-sigmoid", ("sgd",), lr_from="digits-fcn", **common)
    res = run_suite(Suite("t", "tiny", (first, second), seeds=1), tmp_path, progress=False)
    tuned, reused = (e["optimizers"][0] for e in res["experiments"])
    assert tuned["lr_source"] == "tuned" and len(tuned["tuning"]) == 4
    assert reused["tuning"] == [] and reused["best_lr"] == tuned["best_lr"]
    assert reused["lr_source"] == "tuned on digits-fcn"
    assert not res["experiments"][1]["lr_tuning"]
    run = res["runs"][reused["runs"][0]["run_id"]]
    assert run["cpu_ms_per_step"] > 0
    assert validate_results(json.loads((tmp_path / "results.json").read_text())) == []
    renamed = apply_overrides(Suite("t", "tiny", (first, second)), datasets=["wine"])
    assert [e.lr_from for e in renamed.experiments] == [None, "wine-fcn"]
    alone = apply_overrides(Suite("t", "tiny", (first, second)), models=["deep-sigmoid"])
    assert [(e.name, e.lr_from) for e in alone.experiments] == [("digits-deep-sigmoid", None)]
    with pytest.raises(ValueError, match="lr_from"):
        dataclasses.replace(first, kind="robustness", lr_from="x")


def _row(name: str, acc: float, std: float | None, cpu: float | None, wall: float) -> dict:
    return {"optimizer": name, "test_acc_mean": acc, "test_acc_std": std,
            "cpu_ms_per_step": cpu, "ms_per_step": wall}


def test_game_targets_are_measured_ratios() -> None:
    rows = [_row("ekfac", 0.80, 0.010, 30.0, 40.0),
            _row(STRUCTURES["markov"], 0.84, 0.008, 60.0, 80.0),
            _row(STRUCTURES["nash"], 0.85, 0.005, 63.0, 90.0),
            _row(STRUCTURES["cooperative"], 0.83, 0.004, 90.0, 120.0)]
    summary = {"experiments": {
        "e": {"name": "e", "kind": "compare", "status": "ok", "rows": rows},
        "other": {"name": "other", "kind": "compare", "status": "ok",
                  "rows": [_row("sgd", 0.5, 0.1, 1.0, 1.0)]}}}
    got = {(t["id"], t["target"].split()[0]): t for t in game_targets(summary)}
    assert {t["experiment"] for t in got.values()} == {"e"}
    assert got[("g1", "nash")]["status"] == "PASS"
    assert got[("g1", "nash")]["measured"] == pytest.approx(0.85 / 0.84)
    assert got[("g1", "cooperative")]["status"] == "MISS"
    assert got[("g2", "nash")]["measured"] == pytest.approx(1.05)  # CPU time decides
    assert got[("g2", "nash")]["status"] == "PASS" and "wall-clock ratio 1.125" in \
        got[("g2", "nash")]["detail"]
    assert got[("g3", "nash")]["status"] == "PASS"
    assert got[("g3", "nash")]["measured"] == pytest.approx(0.5)
    rows[2] = _row(STRUCTURES["nash"], 0.85, None, None, 90.0)
    status = {(t["id"]): t["status"] for t in game_targets(summary) if t["id"] != "g1"}
    assert status == {"g2": "N/A", "g3": "N/A"}
