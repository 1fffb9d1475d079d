"""Noise studies (training/noise_study.py, ``simgen-train noise-study``) on tiny sweeps.

The sweeps are real simgen stores (incoherent model, 64² px, a fixed calibration so no
PRISM run is needed), written the way ``simgen sweep`` writes them; the models are tiny
U-Nets trained for two epochs.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from _fakestore import write_fake_store
from conftest import ONE_MICROSCOPE
from typer.testing import CliRunner

from training.cli import app
from training.evaluate import evaluate_stores
from training.noise_study import (
    NoiseStudyConfig,
    defect_classes,
    load_study_config,
    macro_f1,
    read_results_csv,
    run_noise_study,
    study_yaml,
)

runner = CliRunner()
SMALL = {
    **ONE_MICROSCOPE,
    "dataset.image_size": [64, 64],
    "simulation.model": "incoherent",
    "simulation.device": "cpu",
    "acquisition.detector.read_noise": 0.0,
}
#: A tiny training recipe (seconds per model on one core).
TINY = [
    "train.epochs=2",
    "train.num_threads=1",
    "train.model={depth: 1, width: 4}",
    "train.data.crop=32",
    "train.data.batch_size=4",
    "train.data.val_fraction=0.34",
    "train.val_every=1",
]


def _sweep(directory, *, seed, n, bins, toy_calibration, gaussian=None):
    """What ``simgen sweep --cluster none`` does, with a given calibration."""
    from simgen.cluster import ClusterSpec
    from simgen.config import load_config
    from simgen.generation import generate
    from simgen.sweep import plan_sweep, write_manifest

    base = load_config().with_overrides({**SMALL, "dataset.n_samples": n, "dataset.seed": seed})
    if gaussian is None:
        plan = plan_sweep(base, noise_lambda="0-80", bins=bins)
    else:
        plan = plan_sweep(base, gaussian_sigma=gaussian, bins=bins)
    directory.mkdir(parents=True)
    for entry in plan:
        generate(
            entry.config,
            directory / f"{entry.name}.zarr",
            cluster=ClusterSpec("none"),
            calibration=toy_calibration.to_dict(),
            progress=False,
        )
    write_manifest(directory, plan)
    return directory


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, toy_calibration):
    """Training sweep (seed 0: λ 0 and 20–40, 6 samples) and test sweep (seed 1: 3 bins × 3)."""
    d = tmp_path_factory.mktemp("noise")
    train = _sweep(d / "train", seed=0, n=6, bins="0,20-40", toy_calibration=toy_calibration)
    test = _sweep(d / "test", seed=1, n=3, bins="0,5-20,40-80", toy_calibration=toy_calibration)
    return {"dir": d, "train": train, "test": test}


@pytest.fixture(scope="module")
def study(sweeps, one_thread):
    """One study through the CLI: config file + --set + the test sweep folder as extra set."""
    d = sweeps["dir"]
    cfg = d / "study.yaml"
    result = runner.invoke(app, ["noise-study", "--write-config", str(cfg), "--set", TINY[0]])
    assert result.exit_code == 0, result.output
    out = d / "study"
    args = ["noise-study", str(sweeps["train"]), "--test", str(sweeps["test"]), "-c", str(cfg)]
    args += ["-o", str(out), "-q", "--extra-store", str(sweeps["test"])]
    for item in TINY:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "args": args, "output": result.output, "cfg": cfg}


def test_study_writes_the_report(study, sweeps):
    out = study["out"]
    assert "2 model(s) trained, 0 reused; 8 evaluation(s) computed, 0 reused" in study["output"]
    rows = read_results_csv(out / "results.csv")
    assert [(r["train_bin"], r["test_bin"]) for r in rows] == [
        (b, t)
        for b in ("lambda0", "lambda20-40")
        for t in ("lambda0", "lambda5-20", "lambda40-80", "extra-test")
    ]
    row = rows[1]
    assert row["test_kind"] == "sweep" and row["n_images"] == 3
    assert (row["train_lambda_low"], row["train_lambda_high"]) == (0.0, 0.0)
    assert (row["test_lambda_low"], row["test_lambda_high"]) == (5.0, 20.0)
    assert row["train_sigma_low"] is None
    assert rows[3]["test_kind"] == "extra" and rows[3]["n_images"] == 9
    for key in ("detection_precision", "detection_recall", "detection_f1", "macro_defect_f1"):
        assert key in row
    assert {"f1_metal", "f1_chalcogen", "f1_vac_X1", "f1_dopant_M"} <= set(row)
    for name in ("heatmap_detection_f1", "heatmap_macro_defect_f1", "f1_vs_lambda"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:4] == b"\x89PNG" and len(png) < 200_000
    summary = (out / "summary.md").read_text()
    assert "## Best training bin per test set" in summary
    for label in ("λ 0 (none)", "λ 5–20", "λ 40–80", "extra: test", "mean over the test sweep"):
        assert f"| {label} | **" in summary
    assert "`vac_X1`, `vac_X2`, `vac_M`" in summary
    info = json.loads((out / "study.json").read_text())
    assert info["trained"] == ["lambda0", "lambda20-40"] and len(info["evaluated"]) == 8
    saved = NoiseStudyConfig.load(out / "study.yaml")
    assert saved.train.epochs == 2 and saved.extra_stores == (str(sweeps["test"]),)
    assert "model 2/2 lambda20-40: training" in (out / "study.log").read_text()


def test_csv_matches_separate_evaluations(study, sweeps):
    out = study["out"]
    rows = read_results_csv(out / "results.csv")
    tests = {p.stem: [str(p)] for p in sorted(sweeps["test"].glob("*.zarr"))}
    tests["extra-test"] = sorted(str(p) for p in sweeps["test"].glob("*.zarr"))
    names = defect_classes(["background", "metal", "chalcogen", "vac_X1", "vac_X2", "vac_M"])
    for row in rows:
        ref = evaluate_stores(out / "models" / row["train_bin"], tests[row["test_bin"]])
        det = ref["detection"]
        assert row["n_images"] == ref["n_images"]
        for key in ("precision", "recall", "f1"):
            assert row[f"detection_{key}"] == pytest.approx(det[key], rel=1e-12, abs=0)
        for name, c in ref["classes"].items():
            assert row[f"f1_{name}"] == (None if c["f1"] is None else pytest.approx(c["f1"]))
        assert row["macro_f1"] == pytest.approx(macro_f1(ref["classes"]))
        expected = macro_f1(ref["classes"], names)
        assert row["macro_defect_f1"] == (None if expected is None else pytest.approx(expected))


def test_rerun_reuses_models_and_evaluations(study, sweeps, tmp_path, one_thread):
    out = tmp_path / "study"
    shutil.copytree(study["out"], out)
    args = [a if a != str(study["out"]) else str(out) for a in study["args"]]
    files = sorted([*out.glob("models/*/*.pt"), *out.glob("evaluations/*/*.json")])
    assert len(files) == 4 + 8
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    csv_before = (out / "results.csv").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "0 model(s) trained, 2 reused; 0 evaluation(s) computed, 8 reused" in again.output
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert (out / "results.csv").read_text() == csv_before
    assert "lambda0: done, reused" in (out / "study.log").read_text()

    # a missing evaluation is redone alone; a missing model is retrained alone
    (out / "evaluations" / "lambda0" / "lambda5-20.json").unlink()
    shutil.rmtree(out / "models" / "lambda20-40")
    cfg = load_study_config(
        study["cfg"],
        TINY,
        train_sweep=str(sweeps["train"]),
        test_sweep=str(sweeps["test"]),
        extra_stores=[str(sweeps["test"])],
        **{"train.progress": False},
    )
    result = run_noise_study(cfg, out)
    assert result.trained == ["lambda20-40"] and result.reused_models == ["lambda0"]
    assert ("lambda0", "lambda5-20") in result.evaluated
    assert {b for b, _ in result.evaluated} <= {"lambda0", "lambda20-40"}
    assert all(b == "lambda20-40" for b, t in result.evaluated if t != "lambda5-20")
    assert len(result.reused_evaluations) == 3
    assert mtimes[out / "models" / "lambda0" / "best.pt"] == (
        (out / "models" / "lambda0" / "best.pt").stat().st_mtime_ns
    )


def _bad_sweeps(d, sweeps):
    """Directories and configs that a study must refuse, with the expected message."""
    (d / "empty").mkdir()
    (d / "empty" / "sweep.json").write_text(json.dumps({"paired": True, "stores": []}))
    (d / "nomanifest").mkdir()
    other = d / "other"
    other.mkdir()
    write_fake_store(other / "fake.zarr", 3, (32, 32), seed=1)  # another label scheme
    (other / "sweep.json").write_text(
        json.dumps({"stores": [{"name": "fake", "path": "fake.zarr", "levels": {}}]})
    )
    train, test = str(sweeps["train"]), str(sweeps["test"])
    return [
        ([str(d / "missing"), "--test", test], "train_sweep: directory not found"),
        ([str(d / "empty"), "--test", test], "lists no stores"),
        ([train, "--test", str(d / "nomanifest")], "has no sweep.json"),
        ([train, "--test", str(other)], "label scheme mismatch"),
        ([train, "--test", train], "has dataset seed 0, like the training stores"),
        ([train], "test_sweep: give the test sweep directory"),
        ([train, "--test", test, "--set", "train_bins=[lambda9]"], "unknown bin 'lambda9'"),
        ([train, "--test", test, "--extra-store", str(d / "nope")], "extra store not found"),
        ([train, "--test", test, "--set", "train.data.train_stores=[x.zarr]"], "leave them empty"),
        ([train, "--test", test, "--set", "evaluate.method=nearest"], "method: expected one of"),
        ([train, "--test", test, "--set", "colour=red"], "unknown key colour"),
    ]


def test_bad_input_is_one_line_error(sweeps, tmp_path):
    for args, message in _bad_sweeps(tmp_path, sweeps):
        result = runner.invoke(app, ["noise-study", *args, "-o", str(tmp_path / "out")])
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
        assert message in lines[0], (args, lines[0])
    assert not (tmp_path / "out" / "models").exists()


def test_defect_classes_and_macro_f1_per_scheme():
    from structures.columns import get_scheme

    assert defect_classes(get_scheme("defects").names) == [
        "vac_X1",
        "vac_X2",
        "vac_M",
        "sub_X1",
        "sub_X2",
        "antisite_X1",
        "antisite_X2",
        "dopant_M",
    ]
    assert defect_classes(get_scheme("atoms").names) == []
    assert defect_classes(get_scheme("composition").names) == [
        "S",
        "Se",
        "Te",
        "vac_M",
        "vac_X",
        "other",
    ]
    custom = get_scheme({"name": "v", "by": "defect", "classes": {"vac": ["vac_X1", "vac_X2"]}})
    assert defect_classes(custom.names) == ["vac"]
    classes = {
        "metal": {"f1": 0.9, "support": 10},
        "vac_X1": {"f1": 0.5, "support": 4},
        "vac_X2": {"f1": None, "support": 2},  # true columns, none found: counts as 0
        "vac_M": {"f1": None, "support": 0},  # absent from the test set: left out
    }
    assert macro_f1(classes, ["vac_X1", "vac_X2", "vac_M"]) == pytest.approx(0.25)
    assert macro_f1(classes) == pytest.approx((0.9 + 0.5) / 3)
    assert macro_f1(classes, ["vac_M"]) is None


def test_study_config_round_trip_and_overrides(tmp_path):
    cfg = load_study_config(
        None,
        ["train.epochs=7", "evaluate.sample_range=[0, 4]", "report.select_by=detection_f1"],
        train_sweep="a",
        test_sweep="b",
    )
    assert cfg.train.epochs == 7 and cfg.evaluate.sample_range == (0, 4)
    assert NoiseStudyConfig.from_yaml(study_yaml(cfg)) == cfg
    path = tmp_path / "s.yaml"
    path.write_text(study_yaml(cfg))
    again = load_study_config(path, ["test_bins=[lambda0]"])
    assert again.test_bins == ("lambda0",) and again.train.epochs == 7
    with pytest.raises(ValueError, match="report.select_by"):
        load_study_config(None, ["report.select_by=precision"])
    with pytest.raises(ValueError, match="train.epochs"):
        load_study_config(None, ["train.epochs=0"])


@pytest.mark.slow
def test_gaussian_sweep_with_ensembles(tmp_path, toy_calibration, one_thread):
    """σ bins, two-member ensembles, a partially trained model resumed, the σ line plot."""
    from training.noise_study import bin_train_config, read_sweep
    from training.train import train_ensemble

    train = _sweep(
        tmp_path / "train",
        seed=0,
        n=6,
        bins="0,1-2",
        toy_calibration=toy_calibration,
        gaussian="0-2",
    )
    test = _sweep(
        tmp_path / "test",
        seed=1,
        n=3,
        bins="0,0.5,2",
        toy_calibration=toy_calibration,
        gaussian="0-2",
    )
    cfg = load_study_config(
        None, [*TINY, "train.members=2"], train_sweep=str(train), test_sweep=str(test)
    )
    out = tmp_path / "study"
    first = read_sweep(train)[0]
    train_ensemble(bin_train_config(cfg.train, first), out / "models" / first.name, stop_after=1)
    result = run_noise_study(cfg, out)
    assert result.trained == ["sigma0", "sigma1-2"]
    assert "resuming" in (out / "study.log").read_text()
    assert (out / "f1_vs_sigma.png").is_file()
    rows = read_results_csv(out / "results.csv")
    assert len(rows) == 6 and rows[0]["train_sigma_high"] == 0.0
    assert run_noise_study(cfg, out).evaluated == []


def test_repeats_intervals_and_the_same_results_twice(sweeps, tmp_path, one_thread):
    """Two repeats per bin: different seeds, mean ± sd and intervals per cell, a verdict
    on the best bin; the same study run again elsewhere writes byte-identical CSVs."""
    args = [str(sweeps["train"]), "--test", str(sweeps["test"]), "--repeats", "2", "-q"]
    args += ["--set", "test_bins=[lambda0, lambda40-80]", "--set", "report.bootstrap=200"]
    for item in TINY:
        args += ["--set", item]
    outputs = []
    for name in ("a", "b"):
        result = runner.invoke(app, ["noise-study", *args, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        outputs.append(tmp_path / name)
    a, b = outputs
    assert "4 model(s) trained, 0 reused; 8 evaluation(s) computed" in result.output
    for name in ("results.csv", "repeats.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert sorted(p.relative_to(a).as_posix() for p in a.glob("models/*/*/best.pt")) == [
        f"models/{b_}/repeat_{k:02d}/best.pt" for b_ in ("lambda0", "lambda20-40") for k in (0, 1)
    ]
    per_model = read_results_csv(a / "repeats.csv")
    assert len(per_model) == 8
    assert {(r["train_bin"], r["seed"]) for r in per_model} == {
        (b_, s) for b_ in ("lambda0", "lambda20-40") for s in (0.0, 1.0)
    }
    rows = read_results_csv(a / "results.csv")
    assert len(rows) == 4 and all(r["n_repeats"] == 2 for r in rows)
    for row in rows:
        reps = [
            r
            for r in per_model
            if (r["train_bin"], r["test_bin"]) == (row["train_bin"], row["test_bin"])
        ]
        values = [r["detection_f1"] for r in reps]
        assert row["detection_f1"] == pytest.approx(sum(values) / 2)
        assert row["detection_f1_sd"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        lo, hi = row["detection_f1_ci_low"], row["detection_f1_ci_high"]
        assert 0 <= lo <= hi <= 1
        assert lo - 1e-9 <= row["detection_f1"] <= hi + 1e-9 or lo == hi
    summary = (a / "summary.md").read_text()
    assert "**Over the test sweep: " in summary
    assert ("separated from" in summary) or ("no clear winner" in summary)
    assert " ± " in summary and "paired" in summary


def test_a_damaged_test_store_is_one_line_naming_store_and_sample(study, sweeps, tmp_path):
    """Store reads of the study go through the integrity-checked readers."""
    test = tmp_path / "test"
    shutil.copytree(sweeps["test"], test)
    out = tmp_path / "study"
    shutil.copytree(study["out"], out)
    shutil.rmtree(out / "evaluations")  # a moved store keeps its fingerprint: rescore
    args = [a if a != str(study["out"]) else str(out) for a in study["args"]]
    args = [a if a != str(sweeps["test"]) else str(test) for a in args]
    chunk = test / "lambda5-20.zarr" / "images" / "c" / "1" / "0" / "0"
    chunk.write_bytes(b"\x00" * len(chunk.read_bytes()))
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a codec error
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert "lambda5-20.zarr: sample 1 is damaged (images" in lines[-1], lines[-1]
    # damaged completion flags: refused before any work, naming the store
    flags = test / "lambda40-80.zarr" / "complete" / "c" / "0"
    flags.write_bytes(b"garbage" * 3)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(
        r"lambda40-80\.zarr: the complete flag of sample \d+ is damaged", lines[0]
    )


def test_store_fingerprint_reads_through_the_checked_reader(sweeps, tmp_path):
    from training.noise_study import store_fingerprint
    from training.stores import StoreError

    store = tmp_path / "s.zarr"
    shutil.copytree(sweeps["test"] / "lambda0.zarr", store)
    before = store_fingerprint(store)
    assert before == store_fingerprint(sweeps["test"] / "lambda0.zarr")  # moved: same
    (store / "complete" / "c" / "0").write_bytes(b"not a chunk")
    with pytest.raises(StoreError, match=r"s\.zarr: the complete flag of sample \d+ is damaged"):
        store_fingerprint(store)


def test_sweep_plans_a_lambda_sigma_grid():
    from simgen.config import load_config
    from simgen.sweep import plan_sweep

    base = load_config().with_overrides(SMALL)
    plan = plan_sweep(
        base,
        noise_lambda="5-40",
        gaussian_sigma="0-0.1",
        bins="5-20,20-40",
        sigma_bins="0,0.05-0.1",
    )
    assert [e.name for e in plan] == [
        "lambda5-20_sigma0",
        "lambda5-20_sigma0.05-0.1",
        "lambda20-40_sigma0",
        "lambda20-40_sigma0.05-0.1",
    ]
    assert plan[1].levels == {"lambda": [5.0, 20.0], "sigma": [0.05, 0.1]}
    acq = plan[1].config.acquisition
    assert acq.detector.read_noise_mode == "relative"
    assert plan[1].config.dataset.seed == plan[2].config.dataset.seed  # paired
    with pytest.raises(ValueError, match="--sigma-bins"):
        plan_sweep(base, gaussian_sigma="0-0.1", sigma_bins="0,0.1")


def _grid_bins(prefix=""):
    from training.noise_study import NoiseBin

    return [
        NoiseBin(f"{prefix}l{lam}_s{sig}", (), {"lambda": [lam, lam], "sigma": [sig, sig]})
        for lam in (10.0, 30.0)
        for sig in (0.0, 0.1)
    ]


def test_grid_report_has_per_axis_heatmaps_and_a_2d_map(tmp_path):
    """Report of a λ × σ study from made-up scores: the per-axis matrices average the other
    axis, the 2-D map holds each training bin's mean over the test sweep."""
    from training.noise_study import (
        StudyPlan,
        StudyResult,
        axis_matrix,
        grid_matrix,
        write_report,
    )

    train, test = _grid_bins(), _grid_bins("t")
    plan = StudyPlan(train, test, ["background", "metal", "vac_M"], ["vac_M"], {})

    def score(b, t):  # better when the training noise matches the test noise
        return (
            1.0
            - abs(b.levels["lambda"][0] - t.levels["lambda"][0]) / 100
            - abs(b.levels["sigma"][0] - t.levels["sigma"][0])
        )

    rows = [
        {"train_bin": b.name, "test_bin": t.name, "test_kind": "sweep", "n_images": 4,
         "detection_f1": score(b, t), "macro_defect_f1": score(b, t) - 0.1}
        for b in train
        for t in test
    ]  # fmt: skip
    m, rl, cl = axis_matrix(rows, plan, "detection_f1", "lambda")
    assert rl == cl == ["λ 10", "λ 30"]
    # training λ 10 on test λ 30: mean over training σ {0, 0.1} × test σ {0, 0.1}
    assert m[0, 1] == pytest.approx(1.0 - 0.2 - (0 + 0.1 + 0.1 + 0) / 4)
    g, lo, hi, lam, sig = grid_matrix(rows, plan, "macro_defect_f1")
    assert lam == ["λ 10", "λ 30"] and sig == ["σ 0", "σ 0.1"]
    assert g[1, 0] == pytest.approx(sum(score(train[2], t) - 0.1 for t in test) / 4)
    out = tmp_path / "report"
    out.mkdir()
    cfg = NoiseStudyConfig(train_sweep="a", test_sweep="b")
    files = write_report(StudyResult(out, plan, rows=rows), cfg)
    for key in (
        "heatmap_lambda_detection_f1",
        "heatmap_sigma_macro_defect_f1",
        "map_lambda_sigma_macro_defect_f1",
    ):
        assert files[key].read_bytes()[:4] == b"\x89PNG", key
    assert "map_lambda_sigma_macro_defect_f1.png" in (out / "summary.md").read_text()
