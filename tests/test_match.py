"""simgen match: the figures it measures, the values it recovers from an image of known
acquisition, the CLI, and (developers only, slow) the real WSe2 images."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from simgen.cli import app
from simgen.config import load_config
from simgen.match import (
    MatchError,
    centred_config,
    line_jitter_A,
    line_noise,
    match,
    measure_image,
    measure_tiles,
    smoothing_correlation_curve,
)

P = 0.1  # Å/px of the test images
BASE = {
    "structure.material": "WSe2",
    "structure.dopant": "V",
    "optics.pixel_size_A": P,
    "dataset.image_size": [192, 192],
}


@cache
def wse2_grid():
    """The shipped WSe2+V detector grid (80 kV, 30 mrad): no calibration runs."""
    from simgen.api import cached_calibration
    from simgen.incoherent import calibration_from_dict
    from simgen.pipeline import calibration_request

    cfg = load_config().with_overrides(
        {
            **BASE,
            "optics.haadf_inner_mrad": {"uniform": [40.0, 120.0]},
            "optics.haadf_outer_mrad": {"uniform": [150.0, 250.0]},
        }
    )
    key, compute = calibration_request(cfg)

    def refuse(message):  # told before any reference simulation would run
        raise AssertionError(f"the WSe2+V grid should be shipped: {message}")

    return calibration_from_dict(cached_calibration(key, compute, announce=refuse))


KNOWN = {  # the acquisition of the "experimental" test image
    "optics.haadf_inner_mrad": 70.0,
    "optics.haadf_outer_mrad": 200.0,
    "optics.source_size_A": 0.6,
    "acquisition.shot.lambda_counts": 8.0,
    "acquisition.detector.smoothing_px": 0.8,
    "acquisition.detector.gamma": 1.0,
    "acquisition.detector.export_bits": 8,
    "acquisition.detector.stretch_low_percent": 0.2,
    "acquisition.detector.stretch_high_percent": 0.2,
    "acquisition.jitter.line_x_A": 0.0,
}


@cache
def known_image(size: int = 384):
    """A simulated WSe2 export of known acquisition, standing in for a real image."""
    from simgen.pipeline import make_sample

    cfg = centred_config(
        load_config().with_overrides(
            {**BASE, **KNOWN, "dataset.image_size": [size, size], "dataset.seed": 7}
        )
    )
    cal = wse2_grid().at_detector(70.0, 200.0).to_dict()
    return make_sample(cfg, 0, calibration=cal)


def test_measured_contrast_matches_the_ground_truth_sites():
    """The network-free lattice (peaks + sublattice fit) finds the columns the simulation
    placed and reads the same contrast as the ground-truth sites do."""
    from simgen.experiment.quality import contrast_ratio, host_classes
    from structures import CHALCOGEN, METAL

    s = known_image()
    figures, sites = measure_image(s.image, P, "WSe2")
    cid, site = np.asarray(s.columns["class_id"]), np.asarray(s.columns["site"])
    hosts = host_classes(cid, site)
    xy = np.column_stack([s.columns["x"], s.columns["y"]])
    metal = xy[(site == METAL) & (cid == hosts[METAL])]
    chalc = xy[(site == CHALCOGEN) & (cid == hosts[CHALCOGEN])]
    truth = contrast_ratio(s.image, metal, chalc, figures.bond_length_px)
    assert abs(figures.contrast / truth - 1) < 0.03
    assert figures.n_metal > 0.8 * len(metal)
    assert figures.eight_bit and 0.1 < figures.clip_low_percent < 0.4
    assert figures.noise_correlation > 0.2  # smoothed by 0.8 px: not white
    assert np.median(sites.metal) > np.median(sites.chalcogen) > np.median(sites.hollow)


def test_line_noise_and_jitter_estimators_recover_known_values():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:512, 0:512] * P
    lattice = 2 + np.cos(2 * np.pi * xx / 2.84) * np.cos(2 * np.pi * yy / 3.28)
    gains = 1 + 0.02 * rng.standard_normal(512)
    assert line_noise(lattice * gains[:, None]) == pytest.approx(0.02, rel=0.15)
    assert line_noise(lattice) < 0.002
    shifts = 0.05 * rng.standard_normal(512)  # Å per line along x
    shifted = 2 + np.cos(2 * np.pi * (xx + shifts[:, None]) / 2.84) * np.cos(2 * np.pi * yy / 3.28)
    assert line_jitter_A(shifted, P) == pytest.approx(0.05, rel=0.2)
    assert line_jitter_A(lattice, P) < 0.005


def test_noise_correlation_grows_with_the_export_smoothing():
    curve, level = smoothing_correlation_curve()
    assert curve[0] < 0 and np.all(np.diff(curve) >= 0) and curve[-1] > 0.6
    assert level[0] == 1 and np.all(np.diff(level) < 0)


def test_detector_smoothing_correlates_the_noise():
    from simgen.acquisition import apply_detector

    flat = np.full((128, 128), 100.0)
    params = {"detector_gain": 1.0, "detector_offset": 0.0, "detector_read_noise": 5.0}
    plain = apply_detector(flat, params, rng=1)
    smooth = apply_detector(flat, {**params, "detector_smoothing_px": 1.0}, rng=1)
    assert smooth.std() < 0.5 * plain.std()
    assert abs(smooth.mean() - plain.mean()) < 0.5
    with pytest.raises(ValueError, match="detector_smoothing_px must be >= 0"):
        apply_detector(flat, {**params, "detector_smoothing_px": -1.0}, rng=1)


def test_match_recovers_the_acquisition_of_a_known_image():
    """Matched from its figures alone, the config reproduces the image's contrast and noise,
    and the values behind them come out near the ones the image was made with."""
    image = known_image().image
    target, _ = measure_tiles(image, P, "WSe2", (192, 192))
    base = load_config().with_overrides(BASE)
    result = match(target, base, wse2_grid(), material="WSe2", n_check=3, rounds=3)
    agree = result.agreement()
    assert abs(agree["contrast"][2]) < 0.05
    assert abs(agree["noise_level"][2]) < 0.20
    m = result.matched
    assert abs(m.inner_mrad - 70.0) < 8.0  # the crossing on the base angle's side
    assert 8.0 / 1.6 < m.lambda_counts < 8.0 * 1.6
    assert abs(m.smoothing_px - 0.8) < 0.25
    assert 0.1 < m.stretch_low_percent < 0.4
    assert m.gamma == 1.0 and not m.notes
    cfg = result.config  # distributions about the matched values, validated
    lo, hi = cfg.optics.haadf_inner_mrad.bounds()
    assert lo < m.inner_mrad < hi and cfg.structure.material.to_config() == "WSe2"
    assert cfg.acquisition.detector.export_bits == 8


def test_match_refuses_an_image_without_a_lattice():
    noise = np.random.default_rng(0).normal(100, 10, (128, 128))
    with pytest.raises(MatchError):
        measure_image(ndimage.gaussian_filter(noise, 8), P, "WSe2")
    with pytest.raises(MatchError, match="too few pixels"):
        measure_image(noise, 1.2, "WSe2")


def test_cli_match_writes_a_config_that_generates(tmp_path):
    image = tmp_path / "experiment.npy"
    np.save(image, known_image().image)
    out, report = tmp_path / "matched.yaml", tmp_path / "match.png"
    runner = CliRunner()
    args = ["match", str(image), "-m", "WSe2", "--pixel-size", str(P), "-o", str(out)]
    sets = ["--set", "structure.dopant=V", "--set", "dataset.image_size=[192, 192]"]
    res = runner.invoke(app, [*args, *sets, "--report", str(report), "--samples", "2"])
    assert res.exit_code == 0, res.output
    assert "contrast" in res.output and f"wrote {out}" in res.output
    cfg = load_config(out)
    assert cfg.structure.material.to_config() == "WSe2"
    assert cfg.optics.pixel_size_A.kind == "fixed"
    assert math.isclose(cfg.optics.pixel_size_A.args[0], P, rel_tol=0.02)
    # one microscope, one detector: the shipped config's drawn outer angle is pinned
    assert cfg.optics.haadf_outer_mrad.to_config() == 200.0
    assert cfg.optics.haadf_inner_mrad.bounds()[1] - cfg.optics.haadf_inner_mrad.bounds()[0] < 40
    assert report.stat().st_size > 10_000
    text = out.read_text()
    assert text.startswith("# simgen match") and f"simgen generate -c {out}" in text

    # a session of two images (equal names in two folders): one line each, one config
    for sub in ("day1", "day2"):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "scan.npy", known_image().image)
    session = tmp_path / "session.yaml"
    res = runner.invoke(
        app,
        [
            *("match", str(tmp_path / "day1"), str(tmp_path / "day2"), "-m", "WSe2"),
            *("--pixel-size", str(P), "-o", str(session), *sets, "--samples", "1"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if "scan.npy" in line and "/" in line]
    assert len(rows) >= 2 and "1 image" not in session.read_text().splitlines()[0]
    assert "2 image(s)" in session.read_text().splitlines()[0]
    load_config(session)

    # bad input: one line, exit 1, nothing written
    missing = tmp_path / "none.tif"
    out2 = tmp_path / "other.yaml"
    res = runner.invoke(app, ["match", str(missing), "-m", "WSe2", "-o", str(out2)])
    assert res.exit_code == 1 and "file not found" in res.output and not out2.exists()
    res = runner.invoke(
        app, ["match", str(image), "--set", "structure.material={choice: [MoS2, WSe2]}"]
    )
    assert res.exit_code == 1 and "draws several materials" in res.output
    res = runner.invoke(app, ["match", str(image), "-m", "WSe2", "-o", str(tmp_path / "no/x.yaml")])
    assert res.exit_code == 1 and "its folder does not exist" in res.output
    flat = tmp_path / "flat.npy"
    np.save(flat, np.full((128, 128), 5.0))
    out3 = tmp_path / "flat.yaml"
    res = runner.invoke(
        app, ["match", str(flat), "-m", "WSe2", "--pixel-size", "0.1", "-o", str(out3)]
    )
    assert res.exit_code == 1 and "no image could be measured" in res.output
    assert not out3.exists()


REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "real" / "wse2_80kV_adf"


@pytest.mark.slow  # the default suite never reads ../shared/real/
def test_real_series_match_within_tolerance_and_differ():
    """One image of each real WSe2 series (developers only; else skipped): contrast within
    5 %, noise within 20 %, and the two series get different configs."""
    from simgen.experiment.readers import read_image

    files = [next(iter(sorted(REAL.glob(f"* {s}*.tif"))), None) for s in ("13", "78")]
    if None in files:
        pytest.skip("no ../shared/real/wse2_80kV_adf (development data, not shipped)")
    base = load_config().with_overrides({"structure.material": "WSe2", "structure.dopant": "V"})
    matched = []
    for f in files:
        (im,) = read_image(f, material="WSe2")
        target, _ = measure_tiles(im.data, im.pixel_size_A, "WSe2", (256, 256))
        result = match(target, base, wse2_grid(), material="WSe2")
        agree = result.agreement()
        assert abs(agree["contrast"][2]) < 0.05 and abs(agree["noise_level"][2]) < 0.20
        matched.append(result.matched)
    a, b = matched
    assert abs(a.stretch_low_percent - b.stretch_low_percent) > 5.0  # 7xxx clip ~20 % dark
    assert abs(a.smoothing_px - b.smoothing_px) > 0.2  # 13xx exports are smoothed


def test_a_session_config_spans_every_image_match():
    from simgen.match import Matched, matched_overrides

    one = Matched(
        pixel_size_A=0.096, inner_mrad=60.0, lambda_counts=2.0, source_size_A=0.8,
        line_jitter_A=0.0, line_current_rel=0.0, contamination_rel=0.05,
        current_drift_rel=0.01, stretch_low_percent=0.1, stretch_high_percent=0.1,
        smoothing_px=0.8, gamma=1.0,
    )  # fmt: skip
    two = Matched(**{**one.values(), "inner_mrad": 80.0, "gamma": 2.0, "stretch_low_percent": 20.0})
    fixed = matched_overrides(one, widths=False)
    assert (
        fixed["optics.haadf_inner_mrad"] == 60.0 and fixed["acquisition.shot.lambda_counts"] == 2.0
    )
    both = matched_overrides([one, two], widths=True)
    assert both["optics.haadf_inner_mrad"] == {"uniform": [52.0, 88.0]}
    lo, hi = both["acquisition.detector.gamma"]["uniform"]
    assert lo < 1.0 and hi > 2.0
    assert both["acquisition.detector.stretch_low_percent"]["uniform"][1] == 25.0
    assert both["acquisition.jitter.line_x_A"] == 0.0  # nothing to draw
    cfg = load_config().with_overrides(both)  # a valid config
    assert cfg.acquisition.detector.export_bits == 8
    with pytest.raises(ValueError, match="fixed values need one match"):
        matched_overrides([one, two], widths=False)
    floating = matched_overrides(Matched(**{**one.values(), "eight_bit": False}), widths=True)
    assert floating["acquisition.detector.export_bits"] is None  # a float image: no export
    assert floating["acquisition.detector.stretch_low_percent"] == 0.0
    assert both["acquisition.contamination.rel"]["uniform"][1] >= 0.07  # smallest width 0.02


def test_drift_from_the_fft_distortion_reproduces_the_drift():
    """A linear drift simulated, measured back through the FFT calibration's anisotropy and
    shear, and converted by drift_from_distortion: same velocities, same signs."""
    from simgen.experiment.calibration import calibrate_lattice, lattice_constant_of
    from simgen.match import drift_from_distortion
    from simgen.pipeline import make_sample

    vx, vy = 0.4, -0.6  # Å/s
    cfg = centred_config(
        load_config().with_overrides(
            {
                **BASE,
                "dataset.image_size": [384, 384],
                "optics.haadf_inner_mrad": 70.0,
                "acquisition.drift.vx_A_per_s": vx,
                "acquisition.drift.vy_A_per_s": vy,
                "acquisition.drift.nonlinear_A": 0.0,
                "acquisition.jitter.line_x_A": 0.0,
                "acquisition.shot.lambda_counts": 200.0,
                "structure.defects": {},
            }
        )
    )
    sample = make_sample(cfg, 0, calibration=wse2_grid().at_detector(70.0, 200.0).to_dict())
    cal = calibrate_lattice(sample.image, lattice_constant_of("WSe2"), nominal_pixel_size_A=P)
    line_time_s = (384 * 20.0 + 500.0) * 1e-6  # the default scan timing
    got_vx, got_vy = drift_from_distortion(cal.anisotropy, cal.shear, P, line_time_s)
    assert got_vy == pytest.approx(vy, rel=0.25)
    assert got_vx == pytest.approx(vx, rel=0.35)
