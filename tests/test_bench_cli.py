"""The ``ocnopt`` command line: bench / list / report smoke tests and error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from ocnopt.bench import data, runner  # noqa: E402
from ocnopt.bench.cli import main  # noqa: E402
from ocnopt.bench.optimizers import OPTIMIZERS, OptimizerSpec  # noqa: E402
from ocnopt.bench.report import validate_results  # noqa: E402

TINY = ["--subset", "96", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One finished tiny bench run through the CLI (shared by the read-only tests)."""
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--suite", "quick", "--epochs", "1", "--seeds", "1", "--optimizers",
               "sgd,ocnopt-identity", "--no-lr-grid", "--out", str(out), *TINY])
    assert rc == 0
    return out


def test_bench_smoke_outputs(bench_dir, capsys):
    res = json.loads((bench_dir / "results.json").read_text())
    assert validate_results(res) == []
    assert res["suite"]["name"] == "quick" and res["suite"]["seeds"] == 1
    (exp,) = res["experiments"]
    assert [o["name"] for o in exp["optimizers"]] == ["sgd", "ocnopt-identity"]
    assert exp["epochs"] == 1 and exp["subset"] == 96
    assert len(list((bench_dir / "runs").glob("*.json"))) == 2
    for f in ("results.csv", "report.md", "plots/digits-fcn__acc_vs_step.png",
              "plots/digits-fcn__acc_vs_time.png"):
        assert (bench_dir / f).is_file(), f


def test_bench_prints_table_and_paths(tmp_path, capsys):
    rc = main(["bench", "--suite", "smoke", "--seeds", "1", "--no-lr-grid", "--no-plots",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| optimizer" in out and "ocnopt-identity" in out and "## targets" in out
    assert f"wrote {tmp_path / 'report.md'}" in out
    assert "[INFO]" not in out  # log messages go to stderr, only the tables to stdout


def test_report_rerenders(bench_dir, capsys):
    (bench_dir / "report.md").unlink()
    png = bench_dir / "plots" / "digits-fcn__acc_vs_step.png"
    png.unlink()
    capsys.readouterr()
    assert main(["report", str(bench_dir)]) == 0
    out = capsys.readouterr().out
    assert (bench_dir / "report.md").is_file() and png.is_file()
    assert "ocnopt-identity" in out and "wrote" in out
    assert validate_results(json.loads((bench_dir / "results.json").read_text())) == []


def test_report_errors_cleanly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no results.json" in err and "Traceback" not in err
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 1}))
    assert main(["report", str(tmp_path)]) == 2
    assert "schema" in capsys.readouterr().err


def test_resume_via_cli(tmp_path, monkeypatch, capsys):
    args = ["bench", "--suite", "smoke", "--seeds", "2", "--no-lr-grid", "--no-plots",
            "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 4
    runs[0].unlink()
    (tmp_path / "results.json").unlink()
    trained: list[str] = []
    real = runner.train_run
    monkeypatch.setattr(runner, "train_run", lambda cfg, d, **kw: (
        trained.append(cfg.run_id()), real(cfg, d, **kw))[1])
    assert main([*args, "--resume"]) == 0
    assert trained == [runs[0].stem]
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["runs_trained"] == 1 and meta["runs_reused"] == 3


def test_interrupt_exit_code(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_run", boom)
    rc = main(["bench", "--suite", "smoke", "--out", str(tmp_path), "--no-progress"])
    assert rc == 130 and "--resume" in capsys.readouterr().err


def test_list_shows_availability(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setitem(OPTIMIZERS, "fake-peer", OptimizerSpec(
        "fake-peer", "a peer that is not installed", lambda m, lr: None, (0.1,), family="peer",
        requires=("ocnopt_no_such_module_xyz",)))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    digits = next(ln for ln in lines if ln.strip().startswith("digits "))
    assert "available" in digits
    fm = lines.index(next(ln for ln in lines if ln.strip().startswith("fashion-mnist ")))
    block = " ".join(" ".join(lines[fm + 1:fm + 8]).split())  # the wrapped how-to
    assert "MISSING" in lines[fm] and "apt-get install dataset-fashion-mnist" in block
    peer = lines.index(next(ln for ln in lines if ln.strip().startswith("fake-peer ")))
    assert "MISSING" in lines[peer] and "ocnopt_no_such_module_xyz" in lines[peer + 1]
    for section in ("datasets:", "models:", "optimizers:", "suites:"):
        assert section in lines
    for name in ("quick", "wine", "full", "robustness", "vanishing", "speed", "deep-sigmoid"):
        assert name in out


def test_missing_dataset_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["bench", "--dataset", "fashion-mnist", "--data-dir", str(empty), "--out",
               str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err
    assert "Traceback" not in err


def test_missing_dataset_subprocess_has_no_traceback(tmp_path):
    """The real console entry point: non-zero exit, how-to on stderr, no traceback."""
    code = ("import sys; from pathlib import Path; from ocnopt.bench import data; "
            "data.FASHION_MNIST_DEBIAN_DIR = Path(sys.argv[1]); "
            "from ocnopt.bench.cli import main; sys.exit(main(sys.argv[2:]))")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "absent"), "bench", "--dataset",
         "fashion-mnist", "--data-dir", str(empty), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": ""})
    assert proc.returncode == 2, proc.stderr
    assert "dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--optimizers", "sgd,nope", "--out", str(tmp_path)]) == 2
    assert "unknown optimizer" in capsys.readouterr().err
    assert main(["bench", "--dataset", "cifar", "--out", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["bench", "--seeds", "0", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "nope"])


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["list", "--help"],
                                  ["report", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: ocnopt" in capsys.readouterr().out


def test_speed_suite_missing_module_exits_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ocnopt.bench.speed", None)
    rc = main(["bench", "--suite", "speed", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "ocnopt.bench.speed" in err and "Traceback" not in err


def test_speed_rows_in_report(tmp_path, monkeypatch, capsys):
    rows = [{"model": "mlp", "optimizer": o, "ms_per_step": ms, "ratio_to_adam": ms / 1.0,
             "peak_mem_mb": None, "state_mb": 0.1}
            for o, ms in (("adam", 1.0), ("ocnopt-ekfac+fb", 1.8), ("soap", 3.0))]
    fake = type(sys)("ocnopt.bench.speed")
    fake.run_speed_suite = lambda out_dir, device, quick: rows  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ocnopt.bench.speed", fake)
    assert main(["bench", "--suite", "speed", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "## speed" in out and "ocnopt-ekfac+fb" in out and "| d " in out and "PASS" in out
    assert (tmp_path / "speed.csv").read_text().startswith("model,optimizer,ms_per_step")
    assert Path(tmp_path / "report.md").read_text().count("## Speed") == 1


def test_version_flag_prints_the_package_and_torch_versions(capsys):
    import torch

    import ocnopt

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"ocnopt {ocnopt.__version__}" in out and torch.__version__ in out
