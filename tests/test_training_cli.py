"""The ``simgen-train`` Typer CLI (training/cli.py) through typer.testing.CliRunner."""

import json

import pytest
import zarr
from _fakestore import write_fake_store
from typer.testing import CliRunner

from training.cli import app
from training.config import TrainConfig

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    train = write_fake_store(d / "train.zarr", 12, (48, 48), seed=3)
    test = write_fake_store(d / "test.zarr", 3, (48, 48), seed=4)
    cfg = d / "cfg.yaml"
    result = runner.invoke(app, ["config", "init", str(cfg)])
    assert result.exit_code == 0, result.output
    run = d / "run"
    args = [
        "train",
        "-c",
        str(cfg),
        "-s",
        str(train),
        "-o",
        str(run),
        "--epochs",
        "2",
        "-q",
        "--set",
        "data.crop=32",
        "--set",
        "model={depth: 1, width: 4}",
        "--set",
        "data.val_fraction=0.25",
        "--set",
        "num_threads=1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"dir": d, "train": train, "test": test, "cfg": cfg, "run": run, "args": args}


def test_config_init_writes_annotated_default(setup):
    text = setup["cfg"].read_text()
    assert "# Side of the random square training crops" in text
    assert TrainConfig.load(setup["cfg"]) == TrainConfig()
    again = runner.invoke(app, ["config", "init", str(setup["cfg"])])
    assert again.exit_code == 1 and "exists" in again.output
    check = runner.invoke(app, ["config", "check", str(setup["cfg"])])
    assert check.exit_code == 0 and "crop: 128" in check.output


def test_train_writes_run_and_applies_overrides(setup):
    run = setup["run"]
    cfg = TrainConfig.load(run / "config.yaml")
    assert cfg.epochs == 2 and cfg.data.crop == 32 and cfg.model.depth == 1
    assert cfg.data.train_stores == (str(setup["train"]),) and not cfg.progress
    assert (run / "best.pt").is_file() and (run / "history.csv").is_file()
    again = runner.invoke(app, setup["args"])
    assert again.exit_code == 1 and "already holds a run" in again.output
    resumed = runner.invoke(app, [*setup["args"], "--resume"])
    assert resumed.exit_code == 0 and "done" in resumed.output


def test_evaluate_and_predict_commands(setup):
    out = setup["dir"] / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(setup["run"]),
            str(setup["test"]),
            "-o",
            str(out),
            "-q",
            "--radius",
            "0.8",
            "--range",
            "0:2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "detection precision" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and metrics["settings"]["radius_A"] == 0.8
    assert (out / "confusion.png").is_file()
    pred = setup["dir"] / "pred.zarr"
    result = runner.invoke(
        app,
        [
            "predict",
            str(setup["run"] / "last.pt"),
            str(setup["test"]),
            "-o",
            str(pred),
            "-q",
            "--probabilities",
        ],
    )
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(pred), mode="r")["probability"].shape == (3, 6, 48, 48)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "-o", "{d}/r", "-s", "{d}/missing.zarr"], "store not found"),
        (["train", "-o", "{d}/r", "-s", "{d}/v2.zarr", "-q"], "schema_version 2"),
        (["train", "-o", "{d}/r", "-s", "{train}", "--set", "optim.lr=-1"], "lr: must be > 0"),
        (["train", "-o", "{d}/r", "-s", "{train}", "--set", "data.crops=3"], "unknown key"),
        (["train", "-o", "{d}/r", "-c", "{d}/nope.yaml"], "config file not found"),
        (["train", "-o", "{d}/r"], "no training store"),
        (["evaluate", "{run}", "{d}/other.zarr", "-q"], "label scheme mismatch"),
        (["evaluate", "{d}/nothing", "{test}", "-q"], "model not found"),
        (["evaluate", "{run}", "{test}", "--range", "3"], "START:STOP"),
        (["predict", "{run}", "{d}/missing.zarr", "-o", "{d}/p.zarr"], "store not found"),
        (["evaluate", "{run}", "{d}/coarse.zarr", "-q"], "0.6 Å/px, but the model was trained"),
        (["predict", "{run}", "{d}/coarse.zarr", "-o", "{d}/p.zarr"], "trained at 0.3 Å/px"),
    ],
)
def test_bad_input_one_line_error_nonzero_exit(setup, args, message):
    d = setup["dir"]
    if not (d / "v2.zarr").exists():
        write_fake_store(d / "v2.zarr", 2, (48, 48), schema_version=2)
        write_fake_store(d / "coarse.zarr", 2, (48, 48), pixel_size_A=0.6)  # model: 0.3
        write_fake_store(
            d / "other.zarr",
            2,
            (48, 48),
            scheme={"ids": [1, 2], "names": ["M", "X2"]},
            defect_rate=0.0,
        )
    fmt = {"d": d, "train": setup["train"], "test": setup["test"], "run": setup["run"]}
    result = runner.invoke(app, [a.format(**fmt) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "evaluate", "predict", "config"):
        assert cmd in result.output
