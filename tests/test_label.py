"""Labelling experimental images (training/label.py, ``simgen-train label``) end to end.

A small U-Net is trained once per session on a store made by the real generator
(incoherent model, WSe2, 128² px at 0.2 Å); the "experiments" are images of another seed
simulated at 0.16 Å/px (so labelling must resample and map positions back), written as
.tif, .npy, .emd and .dm3 files with and without a calibration.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage
from test_readers import dm3_bytes
from typer.testing import CliRunner

from simgen.experiment.readers import ExperimentImage
from structures import CHALCOGEN, METAL
from training.experiments.catalogue import read_columns_csv
from training.experiments.label import (
    OUTPUT_FILES,
    expand_inputs,
    label_image,
    model_pixel_size,
    quality_line,
    resample_image,
    sample_disks,
    to_original_px,
)
from training.metrics import match_columns

runner = CliRunner()
MATERIAL = "WSe2"
#: Generator settings shared by the training store and the experiments (clear images: the
#: test checks the labelling chain, not how far a 30-second network generalises).
SIM = {
    "simulation.model": "incoherent",
    "simulation.device": "cpu",
    "structure.material": MATERIAL,
    "acquisition.shot.lambda_counts": {"uniform": [30.0, 60.0]},
    "acquisition.contamination.rel": {"uniform": [0.0, 0.1]},
}
EXP_PIXEL_A = 0.16  # the experiments' pixel size; the network is trained at 0.2 Å


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _generate(cfg, out, calibration):
    from simgen.cluster import ClusterSpec
    from simgen.generation import generate

    generate(cfg, out, cluster=ClusterSpec("none"), calibration=calibration, progress=False)
    return out


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """``(config builder, calibration)``: the incoherent model calibrated once (PRISM, ~10 s)."""
    from simgen import store
    from simgen.api import cached_calibration
    from simgen.config import load_config
    from simgen.pipeline import calibration_request

    path = tmp_path_factory.mktemp("label_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMGEN_CACHE", str(path))
        base = load_config().with_overrides(SIM)
        key, compute = calibration_request(base)
        calibration = store.load_cached_calibration(key)
        if calibration is None:  # shipped, else computed
            calibration = cached_calibration(key, compute)
            store.save_calibration(key, calibration)
        yield (lambda **over: base.with_overrides(over)), calibration


@pytest.fixture(scope="session")
def experiment(sim, tmp_path_factory):
    """Two 256² WSe2 images at 0.16 Å/px (seed 11) and their true columns."""
    make_cfg, calibration = sim
    cfg = make_cfg(
        **{
            "dataset.n_samples": 2,
            "dataset.image_size": [256, 256],
            "dataset.seed": 11,
            "optics.pixel_size_A": EXP_PIXEL_A,
        }
    )
    root = zarr.open_group(
        str(_generate(cfg, tmp_path_factory.mktemp("exp") / "exp.zarr", calibration)), mode="r"
    )
    images, truth = [], []
    for i in range(2):
        o, n = int(root["columns/offset"][i]), int(root["columns/count"][i])
        images.append(np.asarray(root["images"][i], dtype=np.float32))
        truth.append(
            {k: np.asarray(root[f"columns/{k}"][o : o + n]) for k in ("x", "y", "class_id", "site")}
        )
    assert root.attrs["pixel_size_A"] == pytest.approx(EXP_PIXEL_A)
    return {"images": images, "truth": truth, "pixel_size_A": EXP_PIXEL_A}


@pytest.fixture(scope="session")
def model_dir(sim, tmp_path_factory):
    """A depth-2 U-Net trained 10 × 128 crops on 48 simulated images (~30 s on one core)."""
    from training.config import TrainConfig
    from training.train import train_model

    make_cfg, calibration = sim
    d = tmp_path_factory.mktemp("label_model")
    cfg = make_cfg(**{"dataset.n_samples": 48, "dataset.image_size": [128, 128]})
    train = _generate(cfg, d / "train.zarr", calibration)
    config = TrainConfig.from_dict(
        {
            "seed": 0,
            "epochs": 10,
            "val_every": 10,
            "progress": False,
            "num_threads": 1,
            "data": {
                "train_stores": [str(train)],
                "crop": 64,
                "batch_size": 16,
                "val_fraction": 0.1,
                "samples_per_epoch": 128,
            },
            "model": {"depth": 2, "width": 8},
            "optim": {"lr": 0.01},
        }
    )
    n = torch.get_num_threads()
    try:
        run = train_model(config, d / "run")
    finally:
        torch.set_num_threads(n)
    assert run.finished
    return run.out_dir


@pytest.fixture(scope="session")
def ensemble(model_dir):
    from training.predict import Ensemble

    return Ensemble.load(model_dir, "cpu")


def experiment_image(experiment, i, **changes) -> ExperimentImage:
    fields = {
        "data": experiment["images"][i],
        "pixel_size_A": experiment["pixel_size_A"],
        "pixel_size_source": "user",
        "pixel_size_uncertainty_A": None,
        "source": f"exp{i}",
        "frame": None,
    }
    fields.update(changes)
    return ExperimentImage(**fields)


def score(catalogue, truth, shape, pixel_size_A, *, radius_A=0.6, border_A=1.0):
    """Site detection F1 and sublattice accuracy of a catalogue against the true columns.

    Every labelled true column (class > 0: atoms and vacancy sites) and every catalogue row
    (detected columns and confirmed vacancies) farther than ``border_A`` from the edges
    count; pairs closer than ``radius_A`` match.
    """
    h, w = shape
    b = border_A / pixel_size_A

    def inside(x, y):
        return (x >= b) & (x <= w - 1 - b) & (y >= b) & (y <= h - 1 - b)

    keep_t = (truth["class_id"] > 0) & inside(truth["x"], truth["y"])
    keep_p = inside(catalogue.x_px, catalogue.y_px)
    t_xy = np.column_stack([truth["x"], truth["y"]])[keep_t]
    p_xy = catalogue.positions_px[keep_p]
    pi, ti, dist = match_columns(p_xy, t_xy, radius_A / pixel_size_A)
    precision, recall = len(pi) / len(p_xy), len(ti) / len(t_xy)
    f1 = 2 * precision * recall / (precision + recall)
    sites_ok = catalogue.site[keep_p][pi] == truth["site"][keep_t][ti]
    return {
        "f1": f1,
        "site_accuracy": float(np.mean(sites_ok)),
        "n_true": len(t_xy),
        "error_A": float(np.mean(dist)) * pixel_size_A,
    }


# ------------------------------------------------------------------------------ pieces


def test_resampling_maps_positions_back_exactly():
    y, x = np.mgrid[:90, :120]
    true = np.array([[31.3, 47.8], [80.2, 20.6]])  # (x, y) [px]
    img = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 2.5**2)) for cx, cy in true)
    for target in (0.2, 0.13, 0.31):  # original 0.16 Å/px: shrink and enlarge
        out, scale = resample_image(img, 0.16, target)
        assert out.shape == (round(90 * 0.16 / target), round(120 * 0.16 / target))
        assert scale == (out.shape[0] / 90, out.shape[1] / 120)
        halves = np.zeros(out.shape, int)  # left blob | right blob
        halves[:, : int(55 * scale[1])] = 1
        halves[:, int(55 * scale[1]) :] = 2
        com = np.array(ndimage.center_of_mass(out, halves, [1, 2]))[:, ::-1]
        np.testing.assert_allclose(to_original_px(com, scale), true, atol=0.01)
    same, scale = resample_image(img, 0.2, 0.2001)
    assert scale == (1.0, 1.0) and same.shape == img.shape
    with pytest.raises(ValueError, match="target_pixel_size_A"):
        resample_image(img, 0.2, 0.0)


def test_sample_disks_means_and_image_edges():
    maps = np.zeros((2, 20, 30))
    maps[1, 10, 10] = 9.0
    maps[0, :, 0] = 1.0
    got = sample_disks(maps, [[10.0, 10.0], [0.0, 5.0], [-50.0, 5.0]], radius_px=1.0)
    assert got[0, 1] == pytest.approx(9.0 / 5)  # centre and 4 neighbours
    assert got[1, 0] == pytest.approx(3 / 4)  # 4 of the 5 disk pixels inside the image
    assert got[2, 0] == pytest.approx(1.0)  # entirely outside: nearest pixel
    assert sample_disks(maps, np.zeros((0, 2)), 1.0).shape == (0, 2)


def test_expand_inputs_files_globs_and_folders(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.tif", "a/deep/y.dm4", "a/notes.txt", "b.npy", "c.PNG"):
        (tmp_path / name).write_bytes(b"")
    files, missing = expand_inputs(
        [
            tmp_path / "a",
            str(tmp_path / "*.npy"),
            tmp_path / "b.npy",  # again: kept once
            tmp_path / "a" / "notes.txt",  # named: kept, the reader will refuse it
            tmp_path / "nothing.tif",
            str(tmp_path / "*.mrc"),
        ]
    )
    names = [f.relative_to(tmp_path).as_posix() for f in files]
    assert names == ["a/deep/y.dm4", "a/x.tif", "b.npy", "a/notes.txt"]
    assert [m[1] for m in missing] == ["file not found", "pattern matches no file"]
    files, _ = expand_inputs([tmp_path])
    assert "c.PNG" in [f.name for f in files]


# ------------------------------------------------------------------------------ end to end


def test_labels_simulated_experiments(ensemble, experiment):
    assert model_pixel_size(ensemble) == pytest.approx(0.2)
    for i in range(2):
        im = experiment_image(experiment, i)
        res = label_image(im, ensemble, tile=128, overlap=32, tta=i == 0, material=MATERIAL)
        s = score(res.catalogue, experiment["truth"][i], im.shape, EXP_PIXEL_A)
        assert s["f1"] >= 0.95, s
        assert s["site_accuracy"] >= 0.99, s
        assert s["error_A"] < 0.15, s
        cat = res.catalogue
        assert cat.pixel_size_A == EXP_PIXEL_A  # positions in the original pixels and Å
        np.testing.assert_allclose(cat.x_A, cat.x_px * EXP_PIXEL_A)
        summary = res.summary
        assert summary["resampling"]["factor_yx"] == pytest.approx([0.8, 0.8], abs=0.003)
        assert summary["lattice"]["lattice_constant_measured_A"] == pytest.approx(3.282, rel=0.02)
        assert summary["settings"]["tta"] is (i == 0)
        assert summary["n_columns"] == res.n_columns == len(res.column_probs)
        # class probabilities and ensemble variance per detected column (one member: 0)
        det = cat.detected
        assert np.all((cat.probability[det] > 0) & (cat.probability[det] <= 1))
        np.testing.assert_array_equal(cat.variance[det], 0.0)
        # classes respect the sublattice; hosts dominate a lightly defective film
        names = np.array(cat.class_names)[cat.class_id]
        metal_classes = {"metal", "vac_M", "antisite_X1", "antisite_X2", "dopant_M"}
        assert set(names[cat.site == METAL]) <= metal_classes
        assert "metal" not in set(names[cat.site == CHALCOGEN])
        assert summary["classes"]["metal"]["count"] > 0.8 * summary["n_sites"]["metal"]


def test_background_removal_takes_out_a_strong_smooth_background(ensemble, experiment):
    img = experiment["images"][1]
    y, x = np.mgrid[: img.shape[0], : img.shape[1]]
    blob = np.exp(-((x - 90.0) ** 2 + (y - 160.0) ** 2) / (2 * 60.0**2))  # σ ≈ 10 Å
    dirty = img + float(img.mean()) * (3.0 * x / img.shape[1] + 8.0 * blob)
    im = experiment_image(experiment, 1, data=dirty.astype(np.float32))
    kwargs = {"tile": 128, "overlap": 32, "tta": False}
    res = label_image(im, ensemble, background_removal=True, **kwargs)
    s = score(res.catalogue, experiment["truth"][1], im.shape, EXP_PIXEL_A)
    assert s["f1"] >= 0.95 and s["site_accuracy"] >= 0.99, s
    assert res.summary["settings"]["background_removal"] is True
    assert res.summary["settings"]["background_sigma_A"] == 3.0
    try:  # without the removal the normalised lattice contrast is too weak in the blob
        plain = label_image(im, ensemble, **kwargs)
    except ValueError as err:
        assert "no 2H lattice" in str(err)
    else:
        assert score(plain.catalogue, experiment["truth"][1], im.shape, EXP_PIXEL_A)["f1"] < s["f1"]


def test_site_constraint_corrects_a_planted_wrong_class(ensemble, experiment):
    im = experiment_image(experiment, 0)
    base = label_image(im, ensemble, tile=128, overlap=32, tta=False)
    cat = base.catalogue
    h, w = im.shape
    interior = (
        cat.detected & (np.abs(cat.x_px - w / 2) < w / 4) & (np.abs(cat.y_px - h / 2) < h / 4)
    )
    names = list(cat.class_names)
    chal = np.flatnonzero(interior & (cat.class_id == names.index("chalcogen")))[0]
    metal = np.flatnonzero(interior & (cat.class_id == names.index("metal")))[0]
    fy, fx = base.scale
    plant = {  # column -> probabilities written over its blob (the network's "mistake")
        chal: {"metal": 0.6, "chalcogen": 0.35, "background": 0.05},
        metal: {"vac_X1": 0.6, "metal": 0.35, "background": 0.05},
    }

    class Planted:
        """The trained ensemble with the maps around two columns overwritten."""

        def __init__(self, inner):
            self.inner, self.scheme, self.infos = inner, inner.scheme, inner.infos
            self.config = inner.config

        def predict(self, image, **kwargs):
            mean, var = self.inner.predict(image, **kwargs)
            mean = mean.copy()
            yy, xx = np.mgrid[: mean.shape[1], : mean.shape[2]]
            for k, probs in plant.items():
                cx, cy = (cat.x_px[k] + 0.5) * fx - 0.5, (cat.y_px[k] + 0.5) * fy - 0.5
                disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= (0.8 / 0.2) ** 2
                mean[:, disk] = 0.0
                for name, p in probs.items():
                    mean[names.index(name), disk] = p
            return mean, var

    res = label_image(im, Planted(ensemble), tile=128, overlap=32, tta=False)
    new = res.catalogue
    for k, site, want in ((chal, CHALCOGEN, "chalcogen"), (metal, METAL, "metal")):
        j = int(np.argmin(np.hypot(new.x_px - cat.x_px[k], new.y_px - cat.y_px[k])))
        assert np.hypot(new.x_px[j] - cat.x_px[k], new.y_px[j] - cat.y_px[k]) < 0.5
        wrong = "metal" if want == "chalcogen" else "vac_X1"
        assert names[res.unconstrained_class[j]] == wrong  # what the network said
        assert new.site[j] == site and names[new.class_id[j]] == want  # the constraint's fix
        assert new.probability[j] == pytest.approx(1.0)  # the only allowed class with mass
    assert res.summary["constraint"]["changed"] >= 2


@pytest.mark.parametrize("support", [0.3, 0.0])
def test_empty_site_is_a_vacancy_only_when_the_network_supports_it(ensemble, experiment, support):
    im = experiment_image(experiment, 1)
    base = label_image(im, ensemble, tile=128, overlap=32, tta=False)
    cat = base.catalogue
    names = list(cat.class_names)
    h, w = im.shape
    centre = cat.detected & (np.abs(cat.x_px - w / 2) < w / 4) & (np.abs(cat.y_px - h / 2) < h / 4)
    k = np.flatnonzero(centre & (cat.class_id == names.index("metal")))[0]
    fy, fx = base.scale

    class Erased:
        """The ensemble with one metal column erased: background, or partly vac_M."""

        def __init__(self, inner):
            self.inner, self.scheme, self.infos = inner, inner.scheme, inner.infos
            self.config = inner.config

        def predict(self, image, **kwargs):
            mean, var = self.inner.predict(image, **kwargs)
            mean = mean.copy()
            yy, xx = np.mgrid[: mean.shape[1], : mean.shape[2]]
            cx, cy = (cat.x_px[k] + 0.5) * fx - 0.5, (cat.y_px[k] + 0.5) * fy - 0.5
            disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= (1.0 / 0.2) ** 2
            mean[:, disk] = 0.0
            mean[0, disk] = 1.0 - support
            mean[names.index("vac_M"), disk] = support
            return mean, var

    res = label_image(im, Erased(ensemble), tile=128, overlap=32, tta=False)
    new = res.catalogue
    d = np.hypot(new.x_px - cat.x_px[k], new.y_px - cat.y_px[k])
    assert not np.any(new.detected & (d < 1.0))  # the column is gone
    near = ~new.detected & (d < 1.0)
    empty = res.summary["empty_sites"]
    if support:
        assert near.sum() == 1 and new.site[near][0] == METAL
        assert names[new.class_id[near][0]] == "vac_M"
        assert new.probability[near][0] == pytest.approx(1.0)  # vac_M: the only metal class seen
        assert empty["confirmed"] >= 1
    else:
        assert near.sum() == 0  # found by the lattice, but nothing supports a vacancy
        assert empty["unconfirmed"] >= 1
        assert res.fit.empty_site[~res.empty_confirmed].tolist().count(METAL) >= 1


def test_label_image_refuses_bad_input(ensemble, experiment):
    im = experiment_image(experiment, 0)
    with pytest.raises(ValueError, match="ExperimentImage"):
        label_image(im.data, ensemble)
    with pytest.raises(ValueError, match="tile"):
        label_image(im, ensemble, tile=8)
    with pytest.raises(ValueError, match="overlap"):
        label_image(im, ensemble, tile=64, overlap=64)
    flat = experiment_image(experiment, 0, data=np.zeros((64, 64), np.float32), source="flat")
    with pytest.raises(ValueError, match=r"flat: the image is constant \(every pixel 0\)"):
        label_image(flat, ensemble, tta=False)  # a small network may see "columns" in it


class _Spots:
    """An ensemble that sees ``n`` columns at seeded random places (``n=0``: none at all)."""

    def __init__(self, inner, n):
        self.inner, self.scheme, self.infos, self.config = (
            inner, inner.scheme, inner.infos, inner.config,
        )  # fmt: skip
        self.n = n

    def predict(self, image, **kwargs):
        mean, var = self.inner.predict(image, **kwargs)
        mean = np.zeros_like(mean)
        mean[0] = 1.0
        rng = np.random.default_rng(3)
        yy, xx = np.mgrid[: mean.shape[1], : mean.shape[2]]
        for cy, cx, c in zip(
            rng.uniform(4, mean.shape[1] - 4, self.n),
            rng.uniform(4, mean.shape[2] - 4, self.n),
            rng.integers(1, mean.shape[0], self.n),
            strict=True,
        ):
            disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= 4.0
            mean[:, disk] = 0.0
            mean[c, disk] = 1.0
        return mean, var


def test_label_image_refuses_an_image_without_a_lattice(ensemble, experiment):
    im = experiment_image(experiment, 0, source="scattered")
    with pytest.raises(ValueError, match="scattered: no 2H lattice the model recognises"):
        label_image(im, _Spots(ensemble, 60), tile=128, overlap=32, tta=False)
    with pytest.raises(ValueError, match="scattered: 0 columns found; no lattice to label"):
        label_image(im, _Spots(ensemble, 0), tile=128, overlap=32, tta=False)


# ------------------------------------------------------------------------------ command line


def _write_files(folder, experiment):
    """Good and bad files of a microscopist's folder."""
    img0, img1 = experiment["images"]
    nm = EXP_PIXEL_A / 10
    (folder / "sub").mkdir(parents=True)
    tifffile.imwrite(
        folder / "scan0.tif",
        img0,
        imagej=True,
        resolution=(1 / nm, 1 / nm),
        metadata={"unit": "nm"},
    )
    (folder / "sub" / "scan0.dm3").write_bytes(dm3_bytes(img0, nm, "nm"))
    from rsciio.emd import file_writer

    axes = [
        {"name": n, "scale": nm, "offset": 0.0, "units": "nm", "size": 256, "navigate": False}
        for n in ("y", "x")
    ]
    meta = {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}}
    file_writer(
        str(folder / "scan1.emd"),
        {"data": img1, "axes": axes, "metadata": meta, "original_metadata": {}},
    )
    np.save(folder / "stack.npy", np.stack([img0, 1.1 * img0]))  # no calibration: FFT
    (folder / "corrupt.tif").write_bytes(b"this is not a TIFF file" * 20)
    np.save(folder / "sub" / "line.npy", np.arange(50.0))  # not an image
    noise = np.random.default_rng(0).poisson(10.0, (128, 128)).astype(np.float32)
    np.save(folder / "noise.npy", noise)  # no pixel size, no lattice to calibrate on
    tifffile.imwrite(  # calibrated, but no lattice for the network to label
        folder / "sub" / "noise.tif",
        noise,
        imagej=True,
        resolution=(1 / nm, 1 / nm),
        metadata={"unit": "nm"},
    )


def test_cli_labels_a_folder_and_reports_bad_files(model_dir, experiment, tmp_path):
    pytest.importorskip("h5py", reason="rosettasciio reads EMD (HDF5) through h5py")
    from training.cli import app

    data = tmp_path / "data"
    _write_files(data, experiment)
    out = tmp_path / "out"
    args = ["label", str(data), str(tmp_path / "missing.dm4"), "--model", str(model_dir)]
    args += ["-o", str(out), "--material", MATERIAL, "--tile", "128", "--no-tta", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    # one line per failure, naming the file and the reason; the others were labelled
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 5, result.stderr
    reasons = {
        "corrupt.tif": "unreadable or corrupt",
        "line.npy": "2-D image or a 3-D stack",
        "noise.npy": "FFT calibration failed",
        "missing.dm4": "file not found",
        "noise.tif": "no 2H lattice the model recognises",
    }
    for name, reason in reasons.items():
        assert any(name in line and reason in line for line in failed), (name, failed)
    lines = (out / "failures.txt").read_text().splitlines()
    assert sorted(lines) == sorted(line.removeprefix("failed: ") for line in failed)
    assert all(ln.count(str(tmp_path)) == 1 for ln in lines)  # the path once per line
    assert "labelled 5 image(s)" in result.stdout
    import csv

    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ok = {r["image"]: r for r in rows if r["status"] == "ok"}
    assert sorted(ok) == ["scan0-dm3", "scan0-tif", "scan1", "stack/frame_000", "stack/frame_001"]
    assert sum(r["status"] == "failed" for r in rows) == 5
    assert ok["stack/frame_001"]["pixel_size_source"] == "fft"
    assert float(ok["stack/frame_000"]["pixel_size_A"]) == pytest.approx(EXP_PIXEL_A, rel=0.02)
    assert float(ok["scan1"]["pixel_size_A"]) == pytest.approx(EXP_PIXEL_A, rel=1e-6)
    # quality: one console line per labelled image, columns in summary.csv
    quality_lines = [ln for ln in result.stderr.splitlines() if "; quality " in ln]
    assert len(quality_lines) == 5 and all("honeycomb" in ln for ln in quality_lines)
    for row in ok.values():
        assert row["quality_verdict"] in ("ok", "check", "poor")
        assert float(row["quality_honeycomb_consistency"]) >= 0.95
    assert float(ok["stack/frame_001"]["calibration_pixel_size_x_A"]) == pytest.approx(
        EXP_PIXEL_A, rel=0.01
    )
    for name, truth_i in (("scan0-tif", 0), ("scan0-dm3", 0), ("scan1", 1), ("stack/frame_001", 0)):
        for f in OUTPUT_FILES:
            assert (out / name / f).stat().st_size > 0, (name, f)
        cat = read_columns_csv(out / name / "columns.csv")
        p = float(ok[name]["pixel_size_A"])
        s = score(cat, experiment["truth"][truth_i], (256, 256), p)
        assert s["f1"] >= 0.95 and s["site_accuracy"] >= 0.99, (name, s)
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["n_columns"] == int(ok[name]["n_columns"]) == int(cat.detected.sum())
        assert summary["classes"]["vac_X1"]["per_cm2"] == pytest.approx(
            summary["classes"]["vac_X1"]["count"] / summary["area_nm2"] * 1e14
        )
    assert os.path.isdir(out / "stack" / "frame_000")


def test_cli_sums_frames_and_exits_zero_when_all_succeed(model_dir, experiment, tmp_path):
    from training.cli import app

    stack = tmp_path / "stack.npy"
    np.save(stack, np.stack([experiment["images"][0]] * 3))
    out = tmp_path / "out"
    args = ["label", str(stack), "-m", str(model_dir), "-o", str(out), "--pixel-size", "0.16"]
    result = runner.invoke(app, args + ["--sum-frames", "--tile", "128", "--no-tta", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "stack").iterdir()) == sorted(OUTPUT_FILES)
    assert (out / "failures.txt").read_text() == ""
    cat = read_columns_csv(out / "stack" / "columns.csv")
    assert score(cat, experiment["truth"][0], (256, 256), 0.16)["f1"] >= 0.95
    # a model that does not exist is one error line and exit code 1
    result = runner.invoke(app, ["label", str(stack), "-m", str(tmp_path / "nope"), "-o", str(out)])
    assert result.exit_code == 1 and "error: model not found" in result.stderr


# ------------------------------------------------- quality figures and scan distortion


def test_quality_figures_on_a_clean_image(ensemble, experiment):
    im = experiment_image(experiment, 0)
    res = label_image(im, ensemble, tile=128, overlap=32, tta=False, material=MATERIAL)
    q = res.summary["quality"]
    assert q["verdict"] == "ok", q
    assert q["honeycomb_consistency"] >= 0.98 and q["honeycomb_sites"] > 200
    assert q["sites_detected_fraction"] >= 0.95
    assert q["off_lattice_fraction"] <= 0.02
    lo, hi = q["train_contrast"]  # measured on the model's training store
    assert 0.8 < lo <= hi  # W/Se2 falls below 1 at 40 mrad inner angles (drawn)
    assert lo * 0.85 < q["contrast_metal_chalcogen"] < hi * 1.15
    assert q["ensemble_variance"] is None  # one member
    check = res.summary["intensity_check"]  # network-free: the site intensity histogram
    network = res.summary["classes"].get("vac_X1", {}).get("per_site", 0.0)
    assert check["n_sites"] > 100 and abs(check["vac_X1"] - network) < 0.03, (check, network)
    assert "intensity histogram" in quality_line("x", res.summary)


def test_quality_flags_an_image_whose_contrast_the_model_never_saw(ensemble, experiment):
    img = experiment["images"][0].astype(np.float64)
    # compress the bright end (a saturated detector / clipped 8-bit export): W columns dim
    squashed = np.minimum(img, np.percentile(img, 80)).astype(np.float32)
    im = experiment_image(experiment, 0, data=squashed)
    try:
        res = label_image(im, ensemble, tile=128, overlap=32, tta=False, material=MATERIAL)
    except ValueError as err:  # refusing is also an honest answer
        assert "lattice" in str(err)
        return
    q = res.summary["quality"]
    assert q["verdict"] != "ok"
    assert any("contrast" in r for r in q["reasons"]), q


def _distorted(experiment, i, anisotropy, shear):
    """The experiment image as a scan with a stretched, sheared slow axis, and where the true
    columns land in its pixels (x' = x + shear·y, y' = (1 + anisotropy)·y)."""
    img = experiment["images"][i].astype(np.float64)
    fwd = np.array([[1.0, shear], [0.0, 1.0 + anisotropy]])  # (x, y) true px -> scan px
    inv = np.linalg.inv(fwd)
    h, w = img.shape
    swap = np.array([[0, 1], [1, 0]])
    out = ndimage.affine_transform(
        img, swap @ inv @ swap, output_shape=(int(h * (1 + anisotropy)), w), order=3,
        mode="nearest",
    )  # fmt: skip
    t = experiment["truth"][i]
    xy = np.column_stack([t["x"], t["y"]]) @ fwd.T
    return out.astype(np.float32), {**t, "x": xy[:, 0], "y": xy[:, 1]}


def test_scan_distortion_is_corrected_and_positions_stay_in_file_pixels(ensemble, experiment):
    from simgen.experiment.calibration import calibrate_lattice, lattice_constant_of

    data, truth = _distorted(experiment, 1, anisotropy=0.07, shear=0.04)
    lattice = calibrate_lattice(data, lattice_constant_of(MATERIAL))
    assert lattice.pixel_size_A == pytest.approx(EXP_PIXEL_A, rel=0.005)
    assert lattice.anisotropy == pytest.approx(1 / 1.07 - 1, abs=0.01)  # 12 periods, edges
    im = experiment_image(experiment, 1, data=data, pixel_size_source="fft", lattice=lattice)
    res = label_image(im, ensemble, tile=128, overlap=32, tta=False, material=MATERIAL)
    assert res.summary["resampling"]["distortion_corrected"] is True
    s = score(res.catalogue, truth, data.shape, EXP_PIXEL_A)
    assert s["f1"] >= 0.95 and s["site_accuracy"] >= 0.99, s
    assert s["error_A"] < 0.15, s
    assert res.summary["quality"]["honeycomb_consistency"] >= 0.98
    # switched off, the image is labelled as scanned (the lattice fit absorbs 7 % by itself)
    plain = label_image(
        im, ensemble, tile=128, overlap=32, tta=False, material=MATERIAL,
        correct_distortion=False,
    )  # fmt: skip
    assert plain.summary["resampling"]["distortion_corrected"] is False
    assert plain.summary["resampling"]["factor_yx"] == pytest.approx([0.8, 0.8], abs=0.003)


def test_python_api_label_arrays_and_files(ensemble, experiment, tmp_path):
    import training

    img = experiment["images"][0]
    cat = training.label(img, ensemble, pixel_size_A=EXP_PIXEL_A, tta=False, tile=128,
                         overlap=32, as_frame=False)  # fmt: skip
    s = score(cat, experiment["truth"][0], img.shape, EXP_PIXEL_A)
    assert s["f1"] >= 0.95, s
    assert cat.summary["quality"]["verdict"] in ("ok", "check")
    # an array without a pixel size is FFT-calibrated when the material is named
    cat = training.label(img, ensemble, material=MATERIAL, tta=False, tile=128, overlap=32,
                         as_frame=False)  # fmt: skip
    assert cat.pixel_size_A == pytest.approx(EXP_PIXEL_A, rel=0.01)
    with pytest.raises(ValueError, match="pixel_size_A"):
        training.label(img, ensemble)
    with pytest.raises(ValueError, match="2-D"):
        training.label(np.stack([img, img]), ensemble, pixel_size_A=0.16)
    path = tmp_path / "stack.npy"
    np.save(path, np.stack([img, img]))
    with pytest.raises(ValueError, match="sum_frames=True"):
        training.label(path, ensemble, pixel_size_A=0.16)


def test_label_into_a_used_folder_replaces_only_its_own_outputs(model_dir, experiment, tmp_path):
    from training.cli import app

    first, second = tmp_path / "first.npy", tmp_path / "second.npy"
    np.save(first, experiment["images"][0])
    np.save(second, experiment["images"][1])
    out = tmp_path / "out"
    opts = ["-m", str(model_dir), "-o", str(out), "--pixel-size", "0.16", "--tile", "128"]
    opts += ["--no-tta", "-q"]
    assert runner.invoke(app, ["label", str(first), *opts]).exit_code == 0
    assert (out / "first").is_dir()
    result = runner.invoke(app, ["label", str(second), *opts])
    assert result.exit_code == 0, result.output
    with open(out / "summary.csv", newline="") as fh:
        listed = {r["image"] for r in csv.DictReader(fh)}
    folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert listed == folders == {"second"}  # no stale per-image folder left unlisted
    # a folder holding someone else's files is refused by name and left as it was
    user = tmp_path / "user"
    user.mkdir()
    (user / "first").mkdir()
    (user / "first" / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["label", str(first), *opts[:2], "-o", str(user), *opts[4:]])
    assert result.exit_code == 1, result.output
    assert "did not write" in result.stderr and str(user) in result.stderr
    assert (user / "first" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in user.rglob("*")) == ["first", "notes.txt"]


def test_an_image_too_big_for_memory_is_refused_alone_and_the_batch_goes_on(
    ensemble, experiment, tmp_path
):
    from training.experiments.label import label_files, label_memory_bytes

    small, big = tmp_path / "small.npy", tmp_path / "big.npy"
    np.save(small, experiment["images"][0])
    np.save(big, np.tile(experiment["images"][0], (4, 4)))
    n = len(ensemble.class_names)
    scale = 0.16 / model_pixel_size(ensemble)
    limit = (
        label_memory_bytes((256 * scale,) * 2, n) + label_memory_bytes((1024 * scale,) * 2, n)
    ) // 2
    lines = []
    run = label_files(
        [small, big], ensemble, tmp_path / "out", pixel_size_A=0.16, progress=False,
        echo=lines.append, tile=128, tta=False, max_memory_bytes=limit,
    )  # fmt: skip
    assert [r["image"] for r in run.labelled] == ["small"]
    assert len(run.failures) == 1
    what, reason = run.failures[0]
    assert what == str(big) and "GB of memory, over the limit" in reason
    assert not (tmp_path / "out" / "big").exists()


def test_adapt_pseudo_labels_only_sure_lattice_sites_and_reports_before_and_after(
    model_dir, experiment, tmp_path
):
    """``simgen-train adapt``: the sites the network is sure of (on the lattice, probability
    at the threshold) carry their class in the pseudo-label mask, the others are unlabelled
    (no loss); the adapted folder is a model; the report holds the quality figures and the
    simulated held-out F1 before and after, and the exit code follows the F1 rule."""
    from training.adapt import REPORT, AdaptSettings, pseudo_image
    from training.cli import app
    from training.predict import Ensemble
    from training.stores import open_store

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"exp{i}.npy")
        np.save(paths[-1], experiment["images"][i])
    out = tmp_path / "adapted"
    args = ["adapt", str(model_dir), *map(str, paths), "-o", str(out), "--pixel-size", "0.16"]
    args += ["--rounds", "1", "--epochs", "1", "--min-probability", "0.8", "--min-kept", "0.2"]
    args += ["--set", "data.samples_per_epoch=32", "-q"]
    result = runner.invoke(app, args)
    assert (out / REPORT).is_file(), result.output
    report = json.loads((out / REPORT).read_text())
    assert result.exit_code == (0 if report["f1_ok"] else 1), result.output
    assert "before: simulated held-out macro F1" in result.output and "after:" in result.output
    assert set(report["images_before"]) == set(report["images_after"]) == {"exp0", "exp1"}
    assert json.loads((out / ".simgen-adapt").read_text())["finished"] is True
    assert report["images_before"]["exp0"]["verdict"] in ("ok", "check", "poor")
    assert 0 < report["f1_before"]["mean"] <= 1 and 0 <= report["f1_after"]["mean"] <= 1
    assert Ensemble.load(out, "cpu").class_names == Ensemble.load(model_dir, "cpu").class_names
    # the pseudo-label mask of exp0 (resampled 0.16 -> 0.2 Å/px) at every site: the sure
    # sites by the network's probability before the site constraint
    result = label_image(experiment_image(experiment, 0), Ensemble.load(model_dir, "cpu"),
                         tta=False)  # fmt: skip
    settings = AdaptSettings(min_probability=0.8, min_kept=0.2)
    sample = pseudo_image("exp0", result, settings).sample
    want, cat = sample.class_id, result.catalogue
    assert 0 < np.sum(want == 255) < len(want)  # some sure, some not
    n_det = len(result.column_probs)
    constrained_only = (cat.probability[:n_det] >= 0.8) & (want[:n_det] == 255)
    assert constrained_only.any()  # renormalised over the allowed classes they would pass
    human = out / "round_1" / "human_labels.zarr"
    assert open_store(human).train_only  # trained on, never validated on
    mask = np.asarray(zarr.open_group(str(human))["masks"][0])
    f = 0.16 / 0.2
    rows = np.round((cat.y_px + 0.5) * f - 0.5).astype(int)
    cols = np.round((cat.x_px + 0.5) * f - 0.5).astype(int)
    inside = (rows >= 0) & (rows < 204) & (cols >= 0) & (cols < 204)
    np.testing.assert_array_equal(mask[rows[inside], cols[inside]], want[inside])
    # bad input: one line, exit 1, nothing written
    bad = runner.invoke(app, ["adapt", str(model_dir), str(tmp_path / "nope.tif"), "-o",
                              str(tmp_path / "x")])  # fmt: skip
    assert bad.exit_code == 1 and "nope.tif: file not found" in bad.stderr
    assert not (tmp_path / "x").exists()
    if not torch.cuda.is_available():
        bad = runner.invoke(app, ["adapt", str(model_dir), str(paths[0]), "-o",
                                  str(tmp_path / "x"), "--device", "cuda"])  # fmt: skip
        assert bad.exit_code == 1 and "cuda" in bad.stderr.lower()
        assert not (tmp_path / "x").exists()


def test_pseudo_labels_keep_sure_sites_on_the_lattice():
    from training.adapt import pseudo_labels

    got = pseudo_labels(
        site=[0, 1, -1, 1, 0],
        class_id=[1, 2, 2, 3, 4],
        probability=[0.95, 0.89, 0.99, float("nan"), 0.9],
        min_probability=0.9,
    )
    assert got.tolist() == [1, 255, 255, 255, 4]
    with pytest.raises(ValueError, match="one value per site"):
        pseudo_labels([0], [1, 2], [0.9], 0.9)
