"""Datasets end to end: determinism across workers, SIGKILL + resume, sweeps, CLI errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from conftest import ONE_MICROSCOPE
from typer.testing import CliRunner

from simgen import store
from simgen.api import cached_calibration
from simgen.cli import app
from simgen.cluster import ClusterSpec
from simgen.config import load_config
from simgen.generation import generate, stores_identical
from simgen.pipeline import calibration_request, make_sample

runner = CliRunner()
SMALL = {
    **ONE_MICROSCOPE,
    "dataset.n_samples": 4,
    "dataset.image_size": [64, 64],
    "simulation.model": "incoherent",
    "simulation.device": "cpu",
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A calibration cache shared by the tests (the calibration runs PRISM once, ~10 s)."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMGEN_CACHE", str(path))
        cfg = load_config().with_overrides(SMALL)
        key, compute = calibration_request(cfg)
        if store.load_cached_calibration(key) is None:  # shipped, else computed
            store.save_calibration(key, cached_calibration(key, compute))
        yield path


@pytest.fixture
def small_cfg(cache_dir, monkeypatch):
    monkeypatch.setenv("SIMGEN_CACHE", str(cache_dir))
    return load_config().with_overrides(SMALL)


@pytest.fixture
def calibration(small_cfg):
    key, _ = calibration_request(small_cfg)
    return store.load_cached_calibration(key)


def test_sample_depends_only_on_seed_and_index(small_cfg, calibration):
    a = make_sample(small_cfg, 3, calibration=calibration)
    make_sample(small_cfg, 1, calibration=calibration)  # other work in between
    b = make_sample(small_cfg, 3, calibration=calibration)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    c = make_sample(small_cfg.with_overrides({"dataset.seed": 1}), 3, calibration=calibration)
    assert not np.array_equal(a.image, c.image)


def test_one_and_two_workers_give_identical_stores(small_cfg, calibration, tmp_path):
    generate(
        small_cfg,
        tmp_path / "serial.zarr",
        cluster=ClusterSpec("none"),
        calibration=calibration,
        progress=False,
    )
    generate(  # two tasks of two samples, one per worker, written concurrently
        small_cfg.with_overrides({"dataset.samples_per_task": 2}),
        tmp_path / "two.zarr",
        cluster=ClusterSpec("local", workers=2),
        calibration=calibration,
        progress=False,
    )
    assert stores_identical(tmp_path / "serial.zarr", tmp_path / "two.zarr")
    assert store.samples_per_task(store.open_store(tmp_path / "serial.zarr")) == 16  # > n
    root = zarr.open_group(str(tmp_path / "two.zarr"), mode="r")  # plain zarr reads it
    assert root["complete"][:].all() and root["images"].shape == (4, 64, 64)
    assert np.isfinite(root["params/shot_lambda_counts"][:]).all()


def test_resume_computes_only_unfinished_samples(small_cfg, calibration, tmp_path):
    out = tmp_path / "s.zarr"
    cfg = small_cfg.with_overrides({"dataset.samples_per_task": 2})  # 2 tasks of 2
    r1 = generate(
        cfg,
        out,
        cluster=ClusterSpec("none"),
        calibration=calibration,
        progress=False,
        stop_after=1,
    )
    assert r1.computed == 2
    assert store.samples_per_task(store.open_store(out)) == 2
    # resumed after the calibration changed (an upgrade, a recalibration): the store's own
    # calibration makes the rest, so the store is still the uninterrupted one
    changed = {
        **calibration,
        "weights_A2": {e: 2 * w for e, w in calibration["weights_A2"].items()},
    }
    r2 = generate(cfg, out, cluster=ClusterSpec("none"), calibration=changed, progress=False)
    assert (r2.computed, r2.skipped) == (2, 2)
    generate(  # the automatic task size (all 4 in one task): the same samples
        small_cfg,
        tmp_path / "ref.zarr",
        cluster=ClusterSpec("none"),
        calibration=calibration,
        progress=False,
    )
    assert stores_identical(out, tmp_path / "ref.zarr")
    other = cfg.with_overrides({"dataset.seed": 9})
    with pytest.raises(store.StoreError, match="different config"):
        generate(other, out, cluster=ClusterSpec("none"), calibration=calibration, progress=False)


def test_sigkill_then_resume_gives_the_uninterrupted_store(
    small_cfg, calibration, tmp_path, cache_dir
):
    n = 12
    # tasks of 4: the kill lands between finished tasks
    cfg = small_cfg.with_overrides({"dataset.n_samples": n, "dataset.samples_per_task": 4})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.to_yaml())
    out = tmp_path / "killed.zarr"
    cmd = [
        sys.executable,
        "-m",
        "simgen",
        "generate",
        "-c",
        str(cfg_file),
        "-o",
        str(out),
        "--cluster",
        "none",
    ]
    env = {**os.environ, "SIMGEN_CACHE": str(cache_dir)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(zarr.open_group(str(out), mode="r")["complete"][:].sum())
        except Exception:  # store not created yet
            done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = int(zarr.open_group(str(out), mode="r")["complete"][:].sum())
    assert 0 < partial < n, "the run must be killed mid-way for this test to mean anything"
    result = runner.invoke(
        app, ["generate", "-c", str(cfg_file), "-o", str(out), "--cluster", "none"]
    )
    assert result.exit_code == 0, result.output
    assert f"{n - partial} samples computed" in result.output
    generate(
        cfg,
        tmp_path / "ref.zarr",
        cluster=ClusterSpec("none"),
        calibration=calibration,
        progress=False,
    )
    assert stores_identical(out, tmp_path / "ref.zarr")


def test_sweep_is_paired(small_cfg, tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(
        app,
        [
            "sweep",
            "--noise-lambda",
            "5-80",
            "--points",
            "2",
            "--n",
            "2",
            "--size",
            "64",
            "--set",
            "simulation.model=incoherent",
            "--set",
            "simulation.device=cpu",
            "--cluster",
            "none",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    a = store.open_store(out / "lambda5.zarr")
    b = store.open_store(out / "lambda80.zarr")
    assert a["params/shot_lambda_counts"][0] == 5 and b["params/shot_lambda_counts"][0] == 80
    for name in a.attrs["param_names"]:  # everything but the noise is identical
        if name.startswith("shot_"):
            continue
        np.testing.assert_array_equal(a[f"params/{name}"][:], b[f"params/{name}"][:])
    for i in range(2):
        ca, cb = store.read_columns(a, i), store.read_columns(b, i)
        np.testing.assert_array_equal(ca["x"], cb["x"])
        np.testing.assert_array_equal(ca["class_id"], cb["class_id"])
        np.testing.assert_array_equal(a["masks"][i], b["masks"][i])
    ia, ib = np.asarray(a["images"][0]), np.asarray(b["images"][0])
    assert not np.array_equal(ia, ib)
    # same underlying image: high correlation once normalised; more counts -> less noise
    assert np.corrcoef(ia.ravel(), ib.ravel())[0, 1] > 0.5
    assert (out / "sweep.json").is_file()


def test_inspect_preview_and_structure_file(small_cfg, tmp_path):
    import ase.io
    from ase.build import mx2

    cell = mx2("MoS2", a=3.16, thickness=3.17, vacuum=5.0)
    cell_file = tmp_path / "cell.cif"
    ase.io.write(cell_file, cell)
    out = tmp_path / "file.zarr"
    result = runner.invoke(
        app,
        [
            "generate",
            "--structure",
            str(cell_file),
            "--n",
            "2",
            "--size",
            "64",
            "--model",
            "incoherent",
            "--device",
            "cpu",
            "--cluster",
            "none",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    root = store.open_store(out)
    cols = store.read_columns(root, 0)
    assert len(cols["x"]) > 25 and set(np.unique(cols["class_id"])) == {1, 2}
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "2/2 samples complete" in result.output
    result = runner.invoke(app, ["check", str(out), "-i", "1"])
    assert result.exit_code == 0, result.output
    assert "reproduced bit for bit: True" in result.output and "100.00% within" in result.output
    result = runner.invoke(app, ["preview", str(out), "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 10_000
    result = runner.invoke(
        app,
        [
            "structure",
            "WSe2",
            "--fov",
            "30",
            "--defect",
            "vac_X1=0.1",
            "-o",
            str(tmp_path / "c.xyz"),
        ],
    )
    assert result.exit_code == 0 and ase.io.read(tmp_path / "c.xyz").get_chemical_symbols()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "optics.energy_kV=-80"], "energy_kV"),
        (["--set", "optics.semiangle=30"], "unknown key optics.semiangle"),
        (["--set", "structure.material=MoXx2"], "structure.material"),
        (["--set", "structure.defects={vac_X1: 1.5}"], "structure.defects.vac_X1"),
        (["--set", "structure.defects={holes: 0.1}"], "unknown defect kind"),
        (["--set", "dataset.n_samples=0"], "dataset.n_samples"),
        (["--set", "dataset.image_size=[8, 8]"], "dataset.image_size"),
        (["--set", "labels.scheme=nonsense"], "labels.scheme"),
        (["--set", "labels.disk_radius_A=-1"], "labels.disk_radius_A"),
        (["--set", "simulation.model=magic"], "simulation.model"),
        (["--set", "acquisition.shot.lambda_counts=-5"], "lambda_counts"),
        (["--set", "acquisition.drift.vx_A_per_s={uniform: [1, 0]}"], "vx_A_per_s"),
        (["--set", "nonsense.key=1"], "unknown key nonsense.key"),
        (["--set", "optics.haadf_inner_mrad=250"], "haadf"),
        (["--noise-lambda", "20-5"], "--noise-lambda"),
        (["--structure", "/no/such/file.xyz"], "structure.file"),
        (["--config", "/no/such/config.yaml"], "config file not found"),
        (["--device", "gpu"], "gpu"),
    ],
)
def test_bad_input_is_a_one_line_error_before_any_work(args, message, tmp_path, small_cfg):
    out = tmp_path / "never.zarr"
    result = runner.invoke(app, ["generate", "-o", str(out), "--cluster", "none", *args])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not out.exists()


def test_drawn_detector_changes_the_column_contrast(cache_dir, monkeypatch):
    """With drawn detector angles each sample is rendered with its own detector's
    calibration (a shipped grid): a high inner angle darkens S2 against Mo, and the
    drawn angles are stored with the sample."""
    from simgen.api import calibration_for
    from simgen.pipeline import make_sample_params

    monkeypatch.setenv("SIMGEN_CACHE", str(cache_dir))
    cfg = load_config().with_overrides(
        {
            **SMALL,
            "optics.haadf_inner_mrad": {"uniform": [40.0, 120.0]},
            "optics.haadf_outer_mrad": {"uniform": [150.0, 250.0]},
            "acquisition.contamination.rel": 0.0,
            "acquisition.contamination.blob_density_per_nm2": 0.0,
        }
    )
    grid = calibration_for(cfg)
    assert grid["kind"] == "detector_grid"
    inner = [make_sample_params(cfg, i)["haadf_inner_mrad"] for i in range(12)]
    low, high = int(np.argmin(inner)), int(np.argmax(inner))
    assert inner[low] < 60 and inner[high] > 100

    def s2_over_mo(index):
        s = make_sample(cfg, index, calibration=grid)
        assert s.params["haadf_inner_mrad"] == inner[index]
        from conftest import peak_values

        c = s.columns
        values = peak_values(s.noise_free, c["y"], c["x"])
        metal = (c["n_atoms"] == 1) & (np.asarray(c["site"]) == 0)  # structures' METAL
        full_x = c["n_atoms"] == 2
        return values[full_x].mean() / values[metal].mean()

    assert s2_over_mo(high) < 0.9 * s2_over_mo(low)


def test_a_store_from_before_tasks_grouped_samples_resumes_one_sample_per_task(
    small_cfg, calibration, tmp_path
):
    """Stores written before ``dataset.samples_per_task`` existed have one chunk per sample
    and no such key in their config: today's code resumes them (the key read at its
    default), one sample per task as their chunks require, and gives the same samples."""
    out = tmp_path / "old.zarr"
    old = small_cfg.with_overrides({"dataset.samples_per_task": 1})
    generate(
        old, out, cluster=ClusterSpec("none"), calibration=calibration, progress=False,
        stop_after=1,
    )  # fmt: skip
    root = zarr.open_group(str(out), mode="r+")
    config = dict(root.attrs["config"])
    config["dataset"] = {k: v for k, v in config["dataset"].items() if k != "samples_per_task"}
    root.attrs["config"] = config  # as written before the key existed
    assert store.samples_per_task(store.open_store(out)) == 1
    r = generate(small_cfg, out, cluster=ClusterSpec("none"), calibration=calibration,
                 progress=False)  # fmt: skip
    assert (r.computed, r.skipped) == (3, 1)
    generate(small_cfg, tmp_path / "ref.zarr", cluster=ClusterSpec("none"),
             calibration=calibration, progress=False)  # fmt: skip
    assert stores_identical(out, tmp_path / "ref.zarr")


def test_a_store_of_another_sample_version_is_not_resumed_and_its_labels_are_checked(
    small_cfg, calibration, tmp_path
):
    """A store records the sample arithmetic's version: today's code does not mix its own
    samples into an older store (they could differ in the last digits), and ``check``
    checks such a store's labels against the recomputed noise-free images without
    comparing the recorded images (other noise draws)."""
    from simgen.pipeline import SAMPLE_VERSION

    out = tmp_path / "old.zarr"
    generate(small_cfg, out, cluster=ClusterSpec("none"), calibration=calibration,
             progress=False, stop_after=1)  # fmt: skip
    root = zarr.open_group(str(out), mode="r+")
    assert root.attrs["sample_version"] == SAMPLE_VERSION
    del root.attrs["sample_version"]  # as written before the version was recorded: 1
    flags = store.complete_flags(store.open_store(out)).copy()
    with pytest.raises(
        store.StoreError, match=f"sample version 1; this simgen makes version {SAMPLE_VERSION}"
    ):
        generate(small_cfg, out, cluster=ClusterSpec("none"), calibration=calibration,
                 progress=False)  # fmt: skip
    np.testing.assert_array_equal(store.complete_flags(store.open_store(out)), flags)
    result = runner.invoke(app, ["check", str(out), "-i", "0"])
    assert result.exit_code == 0, result.output
    assert "made by sample version 1" in result.output and "not compared" in result.output
    assert "100.00% within" in result.output and "bit for bit" not in result.output
