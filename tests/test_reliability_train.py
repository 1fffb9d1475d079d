"""Issue 12, training side: a damaged store is one line, and no run folder is left."""

from __future__ import annotations

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
