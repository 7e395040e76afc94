"""The benchmark command line under faults: concurrent writers, malformed run files, wrong or
missing data folders, another dataset's files, empty splits, a read-only or full output folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from ocnopt.bench import data, outdir, runner  # noqa: E402
from ocnopt.bench.cli import main  # noqa: E402
from ocnopt.bench.data import DatasetError, load_dataset  # noqa: E402
from ocnopt.bench.schema import validate_results  # noqa: E402
from ocnopt.bench.suites import Experiment, Suite  # noqa: E402
from tests.test_bench_data import make_idx_tree, write_idx  # noqa: E402

SMOKE = ["bench", "--suite", "smoke", "--seeds", "1", "--no-lr-grid", "--no-plots",
         "--no-progress"]


@pytest.fixture
def count_training(monkeypatch):
    """Record the run ids trained (training itself still happens)."""
    calls: list[str] = []
    real = runner.train_run

    def counting(cfg, d, **kw):
        calls.append(cfg.run_id())
        return real(cfg, d, **kw)

    monkeypatch.setattr(runner, "train_run", counting)
    return calls


def _tiny_suite(dataset: str = "digits", seeds: int = 2) -> Suite:
    exp = Experiment(dataset, "fcn", ("sgd",), epochs=1, batch_size=32, subset=96, num_threads=1)
    return Suite("t", "tiny", (exp,), seeds=seeds, lr_tuning=False)


# --------------------------------------------------------------------------- concurrent writers


def test_second_writer_on_the_same_out_fails_fast_naming_the_holder(tmp_path, capsys,
                                                                   count_training):
    out = tmp_path / "out"
    code = ("import sys, time; from pathlib import Path; from ocnopt.bench.outdir import "
            "output_lock\nwith output_lock(Path(sys.argv[1]), command='ocnopt bench --suite A'):"
            "\n    print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main([*SMOKE, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and count_training == []
        assert "in use by another ocnopt process" in err and f"pid {holder.pid}" in err
        assert "ocnopt bench --suite A" in err and "Traceback" not in err
        assert not (out / "results.json").exists()
        assert main(["report", str(out)]) == 2  # the report re-renderer is a writer too
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: no stale lock after a crash
    assert main([*SMOKE, "--out", str(out)]) == 0
    assert count_training and (out / "results.json").is_file()


def test_atomic_writes_use_unique_temporary_files(tmp_path, monkeypatch):
    sources: list[str] = []
    real = os.replace

    def recording(src, dst):
        sources.append(str(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    target = tmp_path / "results.json"
    outdir.write_json(target, {"a": 1})
    outdir.write_json(target, {"a": 2})
    assert len(set(sources)) == 2 and all(Path(s).parent == tmp_path for s in sources)
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp left over


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    outdir.write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        outdir.write_json(target, {"a": float("nan")})  # strict JSON refuses NaN
    with pytest.raises(ZeroDivisionError):
        outdir.atomic_write_bytes(target, bytes(1 // 0))
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --------------------------------------------------------------------------- malformed run files


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _missing_key(p: Path) -> None:
    rec = json.loads(p.read_text())
    del rec["final"]
    p.write_text(json.dumps(rec))


def _directory(p: Path) -> None:
    p.unlink()
    (p / "inside").mkdir(parents=True)


def _other_config(p: Path) -> None:
    rec = json.loads(p.read_text())
    rec["config"]["lr"] = 123.0
    p.write_text(json.dumps(rec))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda p: p.write_text("[1, 2, 3]"), id="wrong-json-type"),
    pytest.param(lambda p: p.write_text('"a string"'), id="json-string"),
    pytest.param(_missing_key, id="missing-key"),
    pytest.param(lambda p: p.write_bytes(b'{"run_id": "\xff\xfe"}'), id="bad-utf8"),
    pytest.param(_directory, id="directory"),
    pytest.param(_truncate, id="truncated"),
    pytest.param(lambda p: p.write_text(""), id="empty"),
    pytest.param(_other_config, id="other-config"),
])
def test_resume_retrains_a_malformed_run_file(tmp_path, count_training, caplog, damage):
    suite = _tiny_suite()
    runner.run_suite(suite, tmp_path, progress=False)
    victim = sorted((tmp_path / "runs").glob("*.json"))[0]
    damage(victim)
    count_training.clear()
    with caplog.at_level(logging.WARNING, logger="ocnopt.bench.runner"):
        res = runner.run_suite(suite, tmp_path, resume=True, progress=False)
    assert count_training == [victim.stem]
    assert res["complete"] and res["meta"]["runs_reused"] == 1
    assert any(str(victim) in r.getMessage() for r in caplog.records)
    assert victim.is_file() and json.loads(victim.read_text())["run_id"] == victim.stem
    assert validate_results(json.loads((tmp_path / "results.json").read_text())) == []


# --------------------------------------------------------------------------- data folders


def test_nonexistent_data_dir_is_an_error_not_a_fallback(tmp_path, capsys, count_training):
    rc = main([*SMOKE, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and count_training == []
    assert "--data-dir" in err and "does not exist" in err and "Traceback" not in err


def test_data_dir_lacking_a_file_stops_the_suite_before_training(tmp_path, count_training):
    make_idx_tree(tmp_path / "data" / "MNIST" / "raw")
    (tmp_path / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").unlink()
    suite = Suite("t", "x", (_tiny_suite().experiments[0],
                             Experiment("mnist", "fcn", ("sgd",), 1, 32, num_threads=1)),
                  seeds=1, lr_tuning=False)
    with pytest.raises(runner.BenchError, match="lacks t10k-images-idx3-ubyte"):
        runner.run_suite(suite, tmp_path / "o", data_dir=tmp_path / "data", progress=False)
    assert count_training == []  # found before the digits experiment trained


def _mnist_like_tree(folder: Path) -> None:
    """Standard-shaped idx files with MNIST's published label counts and pixel mean."""
    rng = np.random.default_rng(0)
    for part, n in (("train", 60000), ("t10k", 10000)):
        counts = data.MNIST_LABEL_COUNTS["train" if part == "train" else "test"]
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), counts))
        images = (rng.random((n, 28, 28)) < 0.1307).astype(np.uint8) * 255
        write_idx(folder / f"{part}-images-idx3-ubyte", images, gz=False)
        write_idx(folder / f"{part}-labels-idx1-ubyte", labels, gz=False)


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist-like")
    _mnist_like_tree(root / "MNIST" / "raw")
    return root


def test_mnist_content_under_the_fashion_name_is_detected(tmp_path, mnist_like):
    (tmp_path / "FashionMNIST").symlink_to(mnist_like / "MNIST", target_is_directory=True)
    with pytest.raises(DatasetError, match="not the official Fashion-MNIST.*look like MNIST"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    # the content test itself accepts them as MNIST, and --no-verify-data accepts anything
    assert load_dataset("mnist", data_dir=mnist_like, subset=10).sizes == (10, 5000, 10000)
    assert load_dataset("fashion-mnist", data_dir=tmp_path, verify=False).sizes[1] == 5000


def test_fashion_files_under_the_mnist_name_are_detected(tmp_path):
    deb = Path(data.FASHION_MNIST_DEBIAN_DIR)
    if not (deb / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist not installed")
    (tmp_path / "MNIST").symlink_to(deb, target_is_directory=True)
    with pytest.raises(DatasetError, match="not the official MNIST.*they are Fashion-MNIST"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="are Fashion-MNIST, not KMNIST"):
        load_dataset("kmnist", data_dir=tmp_path / "MNIST")
    assert "(verified)" in load_dataset("fashion-mnist").notes  # the real release verifies


def test_small_files_are_not_the_official_release(tmp_path):
    make_idx_tree(tmp_path / "MNIST" / "raw")
    with pytest.raises(DatasetError, match="not the official mnist files"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("n_train,n_test,split", [(60, 0, "test"), (11, 5, "val")])
def test_empty_split_is_an_error(tmp_path, capsys, count_training, n_train, n_test, split):
    make_idx_tree(tmp_path / "d" / "MNIST" / "raw", n_train=n_train, n_test=n_test)
    with pytest.raises(DatasetError, match=f"the {split} split is empty"):
        load_dataset("mnist", data_dir=tmp_path / "d", verify=False)
    rc = main([*SMOKE, "--dataset", "mnist", "--data-dir", str(tmp_path / "d"),
               "--no-verify-data", "--out", str(tmp_path / "o")])
    assert rc == 2 and count_training == []
    assert f"the {split} split is empty" in capsys.readouterr().err


# --------------------------------------------------------------------------- output folder


def _make_read_only(folder: Path) -> bool:
    """Make ``folder`` unwritable for this process; False if this machine cannot."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    # root ignores permission bits; the immutable attribute stops root too (ext4 and others)
    ok = shutil.which("chattr") and subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    return bool(ok)


def _undo_read_only(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_read_only_out_fails_early_with_one_line(tmp_path, capsys, count_training):
    ro = tmp_path / "ro"
    if not _make_read_only(ro):
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    try:
        rc = main([*SMOKE, "--out", str(ro / "results")])
        rc_direct = main([*SMOKE, "--out", str(ro)])
    finally:
        _undo_read_only(ro)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == rc_direct == 2 and count_training == []
    assert len(err) == 2 and all("not writable" in line for line in err)


def test_full_out_fails_early_with_one_line(tmp_path, monkeypatch, capsys, count_training):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outdir.shutil, "disk_usage",
                        lambda p: usage._replace(free=3 * 2**20))
    rc = main([*SMOKE, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and count_training == []
    assert len(err) == 1 and "full" in err[0] and "3.0 MiB free" in err[0]
