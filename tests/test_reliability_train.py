"""Issue 12, training side: a damaged store is one line, and no run folder is left."""

from __future__ import annotations

import json

import numpy as np
from _fakestore import write_fake_store
from typer.testing import CliRunner

from training.cli import app

runner = CliRunner()


def test_train_on_a_damaged_store_is_one_line_and_leaves_no_run_folder(tmp_path):
    train = write_fake_store(tmp_path / "train.zarr", 6, (48, 48), seed=3)
    chunk = train / "masks" / "c" / "1" / "0" / "0"
    chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))
    run = tmp_path / "run"
    args = ["train", "-s", str(train), "-o", str(run), "--epochs", "1", "-q"]
    args += ["--set", "data.crop=32", "--set", "model={depth: 1, width: 4}"]
    args += ["--set", "num_threads=1", "--set", "data.num_workers=0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "train.zarr: sample 1 is damaged" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not run.exists()


def test_predict_replaces_only_its_own_unfinished_output(tmp_path):
    import pytest
    import zarr

    from training.predict import PREDICTION_MARKER, _claim_output

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a simgen prediction store; refusing"):
        _claim_output(user)
    assert (user / "notes.txt").read_text() == "keep"
    plain = tmp_path / "file.zarr"
    plain.write_text("x")
    with pytest.raises(ValueError, match="not a simgen prediction store"):
        _claim_output(plain)
    killed = tmp_path / "killed.zarr"
    zarr.open_group(str(killed), mode="w").attrs[PREDICTION_MARKER] = {"complete": False}
    _claim_output(killed)
    assert not killed.exists()
    done = tmp_path / "done.zarr"
    zarr.open_group(str(done), mode="w").attrs[PREDICTION_MARKER] = {"complete": True}
    with pytest.raises(ValueError, match="a finished prediction"):
        _claim_output(done)
    assert done.exists()


def test_os_errors_in_simgen_train_commands_are_one_line(tmp_path, capsys):
    import pytest
    import typer

    from training import cli

    @cli._clean_errors
    def command():
        (tmp_path / "metrics").write_text("a file")
        (tmp_path / "metrics").mkdir()  # --out on a plain file: FileExistsError

    with pytest.raises(typer.Exit) as exit_:
        command()
    assert exit_.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'metrics'}: File exists"


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch):
    from simgen import store
    from simgen.cli import app as simgen_app

    def denied(self):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(store.WriterLock, "__enter__", denied)
    monkeypatch.setattr("simgen.cli._calibration_for", lambda cfg: None)
    out = tmp_path / "ro" / "x.zarr"
    result = runner.invoke(
        simgen_app, ["generate", "-o", str(out), "--cluster", "none", "--n", "1"]
    )
    assert result.exit_code == 1, result.output
    assert "cannot write there" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_training_warns_when_the_validation_part_is_incomplete(tmp_path, caplog):
    import logging

    from training.config import AugmentConfig, DataConfig
    from training.data import build_datasets

    full = write_fake_store(tmp_path / "full.zarr", 8, (32, 32), seed=1)
    part = write_fake_store(tmp_path / "part.zarr", 8, (32, 32), seed=1, incomplete=(6, 7))
    with caplog.at_level(logging.WARNING, logger="training.data"):
        build_datasets(
            DataConfig(train_stores=(str(full),), val_fraction=0.25, crop=16), AugmentConfig(), 0
        )
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="training.data"):
        _, val = build_datasets(
            DataConfig(train_stores=(str(part),), val_fraction=0.25, crop=16), AugmentConfig(), 0
        )
    assert val is None
    (record,) = caplog.records
    assert "part.zarr: only 0 of the 2 samples of its validation part" in record.getMessage()
    assert "no validation" in record.getMessage()


def _train_args(train, run):
    args = ["train", "-s", str(train), "-o", str(run), "--epochs", "1", "-q"]
    args += ["--set", "data.crop=32", "--set", "model={depth: 1, width: 4}"]
    return args + ["--set", "num_threads=1", "--set", "data.num_workers=0"]


def test_train_writes_only_into_its_own_run_folder_and_one_writer_at_a_time(tmp_path):
    from simgen.store import WriterLock
    from training.train import RUN_MARKER

    train = write_fake_store(tmp_path / "train.zarr", 4, (48, 48), seed=2)
    user = tmp_path / "results"
    user.mkdir()
    (user / "config.yaml").write_text("mine")
    result = runner.invoke(app, _train_args(train, user))
    assert result.exit_code == 1, result.output
    assert "did not write" in result.output and "Traceback" not in result.output
    assert (user / "config.yaml").read_text() == "mine"
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml"]
    run = tmp_path / "run"
    with WriterLock(run):  # another writer (this process, alive) holds the run
        held = runner.invoke(app, _train_args(train, run))
    assert held.exit_code == 1, held.output
    assert "is being written by pid" in held.output
    assert len(held.output.strip().splitlines()) == 1, held.output
    ok = runner.invoke(app, _train_args(train, run))
    assert ok.exit_code == 0, ok.output
    assert (run / RUN_MARKER).is_file() and (run / "last.pt").is_file()
    assert not (tmp_path / "run.lock").exists()


def test_evaluate_out_replaces_only_its_own_output(tmp_path):
    train = write_fake_store(tmp_path / "train.zarr", 4, (48, 48), seed=2)
    run = tmp_path / "run"
    assert runner.invoke(app, _train_args(train, run)).exit_code == 0
    user = tmp_path / "report"
    user.mkdir()
    (user / "metrics.json").write_text("{}")
    bad = runner.invoke(app, ["evaluate", str(run), str(train), "--out", str(user), "-q"])
    assert bad.exit_code == 1, bad.output
    assert "did not write" in bad.output and (user / "metrics.json").read_text() == "{}"
    out = tmp_path / "eval"
    for _ in range(2):  # a second evaluation replaces the first one's files
        ok = runner.invoke(app, ["evaluate", str(run), str(train), "--out", str(out), "-q"])
        assert ok.exit_code == 0, ok.output
    marker = json.loads((out / ".simgen-evaluate.json").read_text())
    assert marker["finished"] is True and (out / "metrics.json").is_file()
