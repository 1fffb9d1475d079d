"""Acquisition chain: noise statistics, scan distortion with labels, contamination spectrum,
determinism and validation. Test images are rendered lattices (simgen.check.synthetic_lattice),
not simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simgen import acquisition as acq
from simgen.acquisition import (
    DRAWN_PARAM_NAMES,
    PARAM_NAMES,
    AcquisitionConfig,
    add_shot_noise,
    apply_acquisition,
    apply_detector,
    contamination_background,
    distort_scan,
    map_positions,
    modulate_current,
    required_padding_px,
    scan_displacement,
    shot_counts_per_unit,
    smooth_background,
)
from simgen.acquisition.scan import bilinear, bilinear_gradient
from simgen.backend import gpu_available
from simgen.check import check_labels, synthetic_lattice

P = 0.2  # pixel size [Å]
SHAPE = (256, 256)

#: Everything off: a base on which single imperfections are switched on.
QUIET = {
    "drift": {"vx_A_per_s": 0.0, "vy_A_per_s": 0.0, "nonlinear_A": 0.0},
    "jitter": {"line_x_A": 0.0, "line_y_A": 0.0, "pixel_A": 0.0},
    "current": {"drift_rel": 0.0, "line_rel": 0.0},
    "contamination": {"rel": 0.0},
    "shot": {"mode": "none"},
    "detector": {"read_noise": 0.0},
}


def quiet(**stages) -> AcquisitionConfig:
    data = {k: dict(v) for k, v in QUIET.items()}
    for stage, values in stages.items():
        data.setdefault(stage, {}).update(values)
    return AcquisitionConfig.from_dict(data)


def lattice_for(cfg, shape=SHAPE, rotation_deg=7.0):
    pad = required_padding_px(cfg, shape, P)
    lat = synthetic_lattice(
        (shape[0] + 2 * pad, shape[1] + 2 * pad),
        pixel_size_A=P,
        rotation_deg=rotation_deg,
        origin_px=(3.3, 7.1),
    )
    return lat, pad


def base_params(**over) -> dict:
    params = quiet().draw(0)
    params.update(over)
    return params


# ----------------------------------------------------------------------------- config
def test_config_round_trip_and_draw_names():
    cfg = AcquisitionConfig()
    assert AcquisitionConfig.from_yaml(cfg.to_yaml()) == cfg
    drawn = cfg.draw(np.random.default_rng(1))
    assert tuple(drawn) == DRAWN_PARAM_NAMES
    assert all(isinstance(v, float) for v in drawn.values())
    assert "drift_vx_A_per_s" in drawn
    assert PARAM_NAMES[: len(DRAWN_PARAM_NAMES)] == DRAWN_PARAM_NAMES
    # the shot mode's unused values are NaN, the used ones finite
    assert math.isnan(drawn["shot_probe_current_pA"]) and drawn["shot_lambda_counts"] >= 5


def test_draw_per_field_streams_are_independent():
    a = quiet().draw(3)
    b = quiet(jitter={"line_x_A": {"uniform": [0, 0.1]}}).draw(3)
    assert b["jitter_line_x_A"] > 0
    assert {k: v for k, v in a.items() if k != "jitter_line_x_A"} == {
        k: v for k, v in b.items() if k != "jitter_line_x_A"
    }


def test_normal_draws_are_clipped_to_their_bounds():
    cfg = quiet(drift={"vx_A_per_s": {"normal": [0.0, 1.0]}})
    vx = np.array([cfg.draw(s)["drift_vx_A_per_s"] for s in range(2000)])
    assert np.abs(vx).max() <= 4.0
    assert 0.9 < vx.std() < 1.1


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"jitter": {"line_x_A": -0.1}}, "jitter.line_x_A"),
        ({"shot": {"mode": "poisson"}}, "shot.mode"),
        ({"current": {"line_rel": 0.5}}, "current.line_rel"),
        ({"detector": {"bits": 12}}, "detector.bits"),
        ({"detector": {"read_noise_mode": "adu"}}, "detector.read_noise_mode"),
        ({"detector": {"saturation": -1.0}}, "detector.saturation"),
        ({"drift": {"nonlinear_time_s": 0.0}}, "drift.nonlinear_time_s"),
        ({"contamination": {"cutoff_A": {"uniform": [-1, 5]}}}, "contamination.cutoff_A"),
        ({"drift": {"vx_A_per_s": [0, 1]}}, "drift.vx_A_per_s"),
        ({"scan": {"dwell": 3}}, "scan.dwell"),
        ({"scan": {"label_sigma_A": 0}}, "scan.label_sigma_A"),
        ({"shot": {"detector_efficiency": 1.5}}, "shot.detector_efficiency"),
        ({"shot": {"lambda_counts": {"choice": ["a", "b"]}}}, "shot.lambda_counts"),
    ],
)
def test_bad_config_names_the_field(data, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        AcquisitionConfig.from_dict(data)


def test_bad_arguments_name_the_parameter():
    lat, pad = lattice_for(quiet(drift={"vx_A_per_s": 0.5}), shape=(64, 64))
    params = base_params(drift_vx_A_per_s=200.0)
    with pytest.raises(ValueError, match="pad"):
        distort_scan(lat.image, (64, 64), pad, params, pixel_size_A=P, rng=0)
    with pytest.raises(ValueError, match="ideal"):
        distort_scan(lat.image, (60, 64), pad, params, pixel_size_A=P, rng=0)
    with pytest.raises(ValueError, match="pixel_size_A"):
        distort_scan(lat.image, (64, 64), pad, params, pixel_size_A=0.0, rng=0)
    with pytest.raises(ValueError, match="drift_vy_A_per_s"):
        distort_scan(
            lat.image,
            (64, 64),
            pad,
            {k: v for k, v in params.items() if k != "drift_vy_A_per_s"},
            pixel_size_A=P,
            rng=0,
        )
    img = np.ones((8, 8))
    with pytest.raises(ValueError, match="bits"):
        apply_detector(img, base_params(), rng=0, bits=12)
    with pytest.raises(ValueError, match="mode"):
        add_shot_noise(img, base_params(), rng=0, mode="gauss")
    with pytest.raises(ValueError, match="detector_gain"):
        apply_detector(img, base_params(detector_gain=0.0), rng=0)
    with pytest.raises(ValueError, match="params"):
        apply_acquisition(
            lat.image, lat.rows, lat.cols, pad=pad, pixel_size_A=P, rng=0, params={"x": 1.0}
        )


# ----------------------------------------------------------------------------- shot noise
@pytest.mark.parametrize("lam", [5.0, 20.0, 80.0])
def test_poisson_mean_and_variance_at_lambda(lam):
    lat = synthetic_lattice((256, 256), pixel_size_A=P, background=0.05)
    params = base_params(shot_lambda_counts=lam)
    counts = add_shot_noise(lat.image, params, rng=11, mode="lambda")
    mu = lat.image * lam / lat.image.mean()
    assert counts.dtype == np.float32 and np.all(counts == np.rint(counts))
    assert counts.mean() == pytest.approx(lam, rel=0.02)
    # per-pixel variance / mean of a Poisson variable is 1
    ratio = np.sum((counts - mu) ** 2) / np.sum(mu)
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_physical_dose_gives_documented_counts():
    params = base_params(
        shot_probe_current_pA=30.0, shot_detector_efficiency=0.5, scan_dwell_time_us=20.0
    )
    image = np.full((256, 256), 0.02)
    k = shot_counts_per_unit(image, params, mode="dose")
    electrons = 30e-12 * 20e-6 / 1.602176634e-19  # 3745.05 e- per pixel in the probe
    assert k == pytest.approx(electrons * 0.5, rel=1e-12)
    counts = add_shot_noise(image, params, rng=2, mode="dose")
    assert counts.mean() == pytest.approx(0.02 * electrons * 0.5, rel=0.01)  # 37.45 counts
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.05)


def test_no_shot_noise_for_lambda_zero_or_mode_none():
    img = np.linspace(0.1, 1.0, 64).reshape(8, 8)
    same = add_shot_noise(img, base_params(shot_lambda_counts=0.0), rng=0, mode="lambda")
    np.testing.assert_array_equal(same, img.astype(np.float32))
    same = add_shot_noise(img, base_params(shot_lambda_counts=10.0), rng=0, mode="none")
    np.testing.assert_array_equal(same, img.astype(np.float32))
    assert AcquisitionConfig.from_dict({"shot": {"lambda_counts": None}}).draw(0)[
        "shot_lambda_counts"
    ] == (0.0)


# ----------------------------------------------------------------------------- detector
@pytest.mark.parametrize(("mode", "value", "gain"), [("counts", 2.5, 1.0), ("relative", 0.1, 3.0)])
def test_gaussian_read_noise_sigma_recovered(mode, value, gain):
    image = np.full((256, 256), 40.0)
    params = base_params(detector_read_noise=value, detector_gain=gain, detector_offset=7.0)
    out = apply_detector(image, params, rng=5, read_noise_mode=mode)
    sigma = value if mode == "counts" else value * 40.0
    assert out.std() == pytest.approx(gain * sigma, rel=0.05)
    assert out.mean() == pytest.approx(gain * 40.0 + 7.0, rel=0.01)


def test_quantisation_and_saturation():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 300, (128, 128))
    params = base_params(detector_read_noise=0.0, detector_gain=1.0, detector_offset=-10.0)
    q = apply_detector(image, params, rng=0, bits=8)
    assert np.all(q == np.rint(q)) and q.min() == 0 and q.max() == 255
    np.testing.assert_array_equal(q, np.clip(np.rint(image - 10.0), 0, 255).astype(np.float32))
    s = apply_detector(image, params, rng=0, saturation=200.0)
    assert s.max() == 200.0
    assert np.mean(s == 200.0) == pytest.approx(np.mean(image - 10.0 >= 200.0), abs=1e-12)
    q16 = apply_detector(image * 1000, params, rng=0, bits=16)
    assert q16.max() == 65535


# ----------------------------------------------------------------------------- scan distortion
SCAN_CASES = {
    "linear": {"drift": {"vx_A_per_s": 0.6, "vy_A_per_s": -0.4}},
    "nonlinear": {"drift": {"nonlinear_A": 0.3, "nonlinear_time_s": 0.05}},
    "line_jitter": {"jitter": {"line_x_A": 0.06, "line_y_A": 0.02}},
    "pixel_jitter": {"jitter": {"pixel_A": 0.02}},
    "all": {
        "drift": {
            "vx_A_per_s": {"normal": [0, 0.3]},
            "vy_A_per_s": {"normal": [0, 0.3]},
            "nonlinear_A": 0.1,
            "nonlinear_time_s": 0.2,
        },
        "jitter": {"line_x_A": 0.05, "pixel_A": 0.01},
    },
}


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_labels_sit_on_image_maxima_after_distortion(case):
    cfg = quiet(**SCAN_CASES[case])
    lat, pad = lattice_for(cfg)
    out = apply_acquisition(lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=4)
    ins = out.inside
    report = check_labels(out.noise_free, out.rows[ins], out.cols[ins])
    assert report.n_labels > 400
    assert report.fraction_within(0.5) >= 0.99, str(report)
    assert report.median_px < 0.15, str(report)
    # the distortion is real: the image differs from the undistorted field
    crop = lat.image[pad:-pad, pad:-pad]
    assert np.abs(out.noise_free - crop).max() > 0.05 * crop.max()


def test_linear_drift_labels_match_the_analytic_inverse():
    vx, vy, dwell, fly = 0.7, -0.5, 20.0, 500.0
    h, w = SHAPE
    params = base_params(drift_vx_A_per_s=vx, drift_vy_A_per_s=vy)
    pad = required_padding_px(params, SHAPE, P)
    ideal = np.zeros((h + 2 * pad, w + 2 * pad))
    _, mapping = distort_scan(ideal, SHAPE, pad, params, pixel_size_A=P, rng=0)
    rng = np.random.default_rng(1)
    q = rng.uniform(pad, pad + h - 1, (200, 2))
    rows, cols, inside = map_positions(q[:, 0], q[:, 1], mapping)
    # p(r, c) = (r, c) + v·(r·L + c·d − T/2)/p  is affine: solve it exactly
    line, d = (w * dwell + fly) * 1e-6, dwell * 1e-6
    t_half = ((h - 1) * line + (w - 1) * d) / 2
    a = np.array([[1 + vy * line / P, vy * d / P], [vx * line / P, 1 + vx * d / P]])
    rhs = np.stack([q[:, 0] - pad + vy * t_half / P, q[:, 1] - pad + vx * t_half / P])
    exact = np.linalg.solve(a, rhs)
    np.testing.assert_allclose(rows, exact[0], atol=1e-6)
    np.testing.assert_allclose(cols, exact[1], atol=1e-6)
    on_field = (exact[0] >= -0.5) & (exact[0] < h - 0.5) & (exact[1] >= -0.5)
    np.testing.assert_array_equal(inside, on_field & (exact[1] < w - 0.5))


def test_line_jitter_labels_in_closed_form_equal_the_pixel_sum():
    # line jitter is constant along each line: the closed form along the line (a Gaussian
    # integral) must give what summing the window's pixels gives, up to that window's cut
    # at 4 sigma + max jitter; the pixel sum must not depend on its chunk size
    from simgen.acquisition.scan import _jitter_centroid

    params = base_params(drift_vx_A_per_s=0.3, jitter_line_x_A=0.06, jitter_line_y_A=0.03)
    pad = required_padding_px(params, SHAPE, P)
    ideal = np.zeros((SHAPE[0] + 2 * pad, SHAPE[1] + 2 * pad))
    _, mapping = distort_scan(ideal, SHAPE, pad, params, pixel_size_A=P, rng=4)
    q = np.random.default_rng(3).uniform(pad - 3, pad + SHAPE[0] + 2, (257, 2))
    r0, c0 = q[:, 0] - pad, q[:, 1] - pad
    closed = _jitter_centroid(r0, c0, r0, c0, mapping, 64, per_line=True)
    summed = _jitter_centroid(r0, c0, r0, c0, mapping, 1000, per_line=False)
    np.testing.assert_allclose(closed[0], summed[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(closed[1], summed[1], rtol=0, atol=1e-4)
    assert np.abs(closed[1] - c0).max() > 0.05  # the jitter moved the labels
    chunked = _jitter_centroid(r0, c0, r0, c0, mapping, 7, per_line=False)
    for x, y in zip(chunked, summed, strict=True):
        np.testing.assert_array_equal(x, y)


def test_smooth_map_labels_invert_the_forward_map():
    params = base_params(drift_nonlinear_A=0.3, drift_nonlinear_time_s=0.1, drift_vx_A_per_s=0.4)
    pad = required_padding_px(params, SHAPE, P)
    ideal = np.zeros((SHAPE[0] + 2 * pad, SHAPE[1] + 2 * pad))
    _, mapping = distort_scan(ideal, SHAPE, pad, params, pixel_size_A=P, rng=8)
    q = np.random.default_rng(2).uniform(pad + 5, pad + SHAPE[0] - 6, (300, 2))
    rows, cols, _ = map_positions(q[:, 0], q[:, 1], mapping)
    fwd_r = rows + pad + bilinear(mapping.dy_px, rows, cols)
    fwd_c = cols + pad + bilinear(mapping.dx_px, rows, cols)
    np.testing.assert_allclose(fwd_r, q[:, 0], atol=1e-6)
    np.testing.assert_allclose(fwd_c, q[:, 1], atol=1e-6)


def test_x_and_y_distortions_are_independent():
    params = base_params(
        drift_nonlinear_A=0.2,
        drift_nonlinear_time_s=0.001,
        jitter_line_x_A=0.05,
        jitter_line_y_A=0.05,
        jitter_pixel_A=0.01,
    )
    dx, dy = scan_displacement((1024, 64), params, pixel_size_A=P, rng=123)
    assert not np.allclose(dx, dy)
    assert abs(np.corrcoef(dx.ravel(), dy.ravel())[0, 1]) < 0.15
    line_x, line_y = dx.mean(axis=1), dy.mean(axis=1)
    assert abs(np.corrcoef(line_x, line_y)[0, 1]) < 0.15
    # over seeds the x–y correlation of the non-linear path averages to zero
    only_nl = base_params(drift_nonlinear_A=0.2, drift_nonlinear_time_s=0.002)
    corr = []
    for seed in range(20):
        dx, dy = scan_displacement((128, 64), only_nl, pixel_size_A=P, rng=seed)
        corr.append(np.corrcoef(dx.ravel(), dy.ravel())[0, 1])
    assert abs(np.mean(corr)) < 0.1


def test_displacement_statistics_match_parameters():
    amp, jit = 0.2, 0.05
    params = base_params(drift_nonlinear_A=amp, drift_nonlinear_time_s=0.02)
    dx, dy = scan_displacement((512, 128), params, pixel_size_A=P, rng=9)
    assert np.std(dx) == pytest.approx(amp, rel=0.2) and np.std(dy) == pytest.approx(amp, rel=0.2)
    params = base_params(jitter_line_x_A=jit)
    dx, dy = scan_displacement((1024, 8), params, pixel_size_A=P, rng=9)
    assert np.all(dx == dx[:, :1]) and not dy.any()  # one offset per line, x only
    assert np.std(dx[:, 0]) == pytest.approx(jit, rel=0.1)


def test_required_padding_covers_every_draw():
    cfg = quiet(
        drift={
            "vx_A_per_s": {"normal": [0.0, 0.5]},
            "vy_A_per_s": {"uniform": [-1.0, 1.0]},
            "nonlinear_A": {"uniform": [0, 0.2]},
            "nonlinear_time_s": 0.05,
        },
        jitter={"line_x_A": 0.1, "pixel_A": 0.05},
    )
    shape = (64, 64)
    pad = required_padding_px(cfg, shape, P)
    for seed in range(100):
        params = cfg.draw(seed)
        assert required_padding_px(params, shape, P) <= pad
        dx, dy = scan_displacement(shape, params, pixel_size_A=P, rng=seed)
        assert max(np.abs(dx).max(), np.abs(dy).max()) / P <= pad - acq.SPLINE_GUARD_PX


def test_identity_scan_is_a_crop():
    lat, pad = lattice_for(quiet(), shape=(64, 64))
    out = apply_acquisition(lat.image, lat.rows, lat.cols, quiet(), pad=pad, pixel_size_A=P, rng=0)
    np.testing.assert_array_equal(out.noise_free, lat.image[pad:-pad, pad:-pad].astype(np.float32))
    np.testing.assert_allclose(out.rows, lat.rows - pad, atol=1e-9)
    np.testing.assert_allclose(out.cols, lat.cols - pad, atol=1e-9)


def test_columns_leaving_the_field_are_flagged():
    lat, pad = lattice_for(quiet(drift={"vx_A_per_s": 1.0}), shape=(64, 64))
    cfg = quiet(drift={"vx_A_per_s": 1.0})
    out = apply_acquisition(lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=0)
    h, w = out.image.shape
    expect = (out.rows >= -0.5) & (out.rows < h - 0.5) & (out.cols >= -0.5) & (out.cols < w - 0.5)
    np.testing.assert_array_equal(out.inside, expect)
    assert 0 < out.inside.sum() < len(lat.rows)


# ----------------------------------------------------------------------------- current
def test_per_line_current_fluctuation():
    image = np.ones((1024, 32))
    out = modulate_current(image, base_params(current_line_rel=0.03), rng=1)
    assert np.all(out == out[:, :1])  # constant along a line
    assert np.std(out[:, 0]) == pytest.approx(0.03, rel=0.1)
    params = base_params(current_drift_rel=0.05, current_drift_time_s=0.01)
    slow = [modulate_current(image, params, rng=s) for s in range(10)]
    assert np.mean([np.std(x) for x in slow]) == pytest.approx(0.05, rel=0.1)
    assert np.abs(np.diff(slow[0], axis=1)).max() < 1e-3  # slow: smooth within a line


# ----------------------------------------------------------------------------- contamination
def _power_fraction_below(field: np.ndarray, cutoff_A: float) -> float:
    h, w = field.shape
    win = np.hanning(h)[:, None] * np.hanning(w)[None, :]
    power = np.abs(np.fft.fft2((field - field.mean()) * win)) ** 2
    k = np.hypot(np.fft.fftfreq(h, P)[:, None], np.fft.fftfreq(w, P)[None, :])
    return float(power[k <= 1 / cutoff_A].sum() / power.sum())


@pytest.mark.parametrize(("cutoff", "exponent"), [(20.0, 0.0), (20.0, 2.5), (8.0, 1.0)])
def test_contamination_power_lies_below_the_cutoff(cutoff, exponent):
    field = smooth_background((256, 256), cutoff, exponent, pixel_size_A=P, rng=3)
    assert field.mean() == pytest.approx(0.0, abs=1e-12)
    assert field.std() == pytest.approx(1.0, rel=1e-9)
    assert _power_fraction_below(field, cutoff) >= 0.9


def test_contamination_amplitude_and_blobs():
    params = base_params(contamination_rel=0.4, contamination_cutoff_A=20.0)
    bg = contamination_background((200, 300), params, pixel_size_A=P, rng=1, lattice_std=2.0)
    assert bg.field.min() == pytest.approx(0.0, abs=1e-12)
    assert bg.field.std() == pytest.approx(0.4 * 2.0, rel=1e-9) and bg.n_blobs == 0
    area_nm2 = 200 * 300 * P * P / 100
    params.update(contamination_blob_density_per_nm2=2.0, contamination_blob_rel=1.0)
    n = [
        contamination_background((200, 300), params, pixel_size_A=P, rng=s, lattice_std=1.0).n_blobs
        for s in range(20)
    ]
    assert np.mean(n) == pytest.approx(2.0 * area_nm2, rel=0.2)
    bg = contamination_background((200, 300), params, pixel_size_A=P, rng=1, lattice_std=1.0)
    assert bg.field.min() >= 0.0 and bg.field.max() > 0.5


# ----------------------------------------------------------------------------- the chain
def test_same_seed_is_bit_identical_and_params_replay():
    cfg = AcquisitionConfig.from_dict({"contamination": {"blob_density_per_nm2": 1.0}})
    lat, pad = lattice_for(cfg, shape=(96, 96))
    run = lambda rng, **kw: apply_acquisition(  # noqa: E731
        lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=rng, **kw
    )
    a, b, c = run(42), run(42), run(43)
    for name in ("image", "noise_free", "rows", "cols", "inside"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.params.keys() == b.params.keys() == set(PARAM_NAMES)
    assert all(a.params[k] == b.params[k] or math.isnan(a.params[k]) for k in PARAM_NAMES)
    assert not np.array_equal(a.image, c.image)
    replay = run(42, params=a.params)
    np.testing.assert_array_equal(replay.image, a.image)


def test_sample_order_independence():
    cfg = AcquisitionConfig()
    lat, pad = lattice_for(cfg, shape=(64, 64))

    def sample(i):
        rng = np.random.default_rng([7, i])
        return apply_acquisition(
            lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=rng
        )

    alone = sample(3)
    for i in (0, 1, 2):
        sample(i)
    np.testing.assert_array_equal(sample(3).image, alone.image)


def test_full_chain_outputs_and_stages():
    cfg = AcquisitionConfig.from_dict({"detector": {"bits": 16, "gain": 10.0}})
    lat, pad = lattice_for(cfg, shape=(128, 128))
    out = apply_acquisition(
        lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=0, keep_stages=True
    )
    assert out.image.shape == out.noise_free.shape == (128, 128)
    assert out.image.dtype == out.noise_free.dtype == np.float32
    assert set(out.stages) == {"ideal", "contamination", "scan", "current", "shot", "detector"}
    assert out.params["shot_mean_counts"] == pytest.approx(out.params["shot_lambda_counts"])
    assert out.image.mean() == pytest.approx(10 * out.params["shot_lambda_counts"], rel=0.05)
    assert np.all(out.image == np.rint(out.image))
    report = check_labels(out.noise_free, out.rows[out.inside], out.cols[out.inside])
    assert report.fraction_within(0.5) >= 0.99, str(report)


@pytest.mark.slow
def test_default_chain_offsets_over_many_seeds():
    cfg = AcquisitionConfig()
    lat, pad = lattice_for(cfg, shape=(512, 512))
    worst = []
    for seed in range(10):
        out = apply_acquisition(
            lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=seed
        )
        report = check_labels(out.noise_free, out.rows[out.inside], out.cols[out.inside])
        worst.append(report.fraction_within(0.5))
    assert min(worst) >= 0.99


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_matches_cpu():
    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA device")
    from simgen.backend import to_device, to_numpy

    cfg = AcquisitionConfig.from_dict({"shot": {"lambda_counts": 50.0}})
    lat, pad = lattice_for(cfg, shape=(256, 256))
    cpu = apply_acquisition(lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=1)
    gpu = apply_acquisition(
        to_device(lat.image, "gpu"), lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=1
    )
    # host-drawn parts are identical: parameters, scan path, labels, noise-free image
    assert gpu.params.keys() == cpu.params.keys()
    for k, v in cpu.params.items():
        assert gpu.params[k] == pytest.approx(v, rel=1e-6, nan_ok=True)
    np.testing.assert_array_equal(gpu.rows, cpu.rows)
    scale = float(np.abs(cpu.noise_free).max())
    np.testing.assert_allclose(to_numpy(gpu.noise_free), cpu.noise_free, atol=1e-4 * scale)
    # device-drawn noise: same distribution, not the same realisation
    g, c = to_numpy(gpu.image), cpu.image
    assert g.mean() == pytest.approx(c.mean(), rel=0.01)
    assert (g - to_numpy(gpu.noise_free) * cpu.params["shot_counts_per_unit"]).var() == (
        pytest.approx((c - cpu.noise_free * cpu.params["shot_counts_per_unit"]).var(), rel=0.05)
    )


def test_read_noise_in_counts_is_not_applied_without_shot_noise():
    # λ = 0 is an unlimited dose: counts-mode read noise would otherwise bury a
    # relative-unit image (the "no noise" bin of a sweep would be the noisiest).
    cfg = AcquisitionConfig.from_dict(
        {"shot": {"lambda_counts": 0.0}, "detector": {"read_noise": 1.0}}
    )
    lat, pad = lattice_for(cfg)
    args = (lat.image, lat.rows, lat.cols)
    out = apply_acquisition(*args, cfg, pad=pad, pixel_size_A=P, rng=3)
    np.testing.assert_array_equal(out.image, out.noise_free)
    assert out.params["detector_read_noise"] == 0.0
    rel = AcquisitionConfig.from_dict(
        {
            "shot": {"lambda_counts": 0.0},
            "detector": {"read_noise": 0.05, "read_noise_mode": "relative"},
        }
    )
    out = apply_acquisition(*args, rel, pad=pad, pixel_size_A=P, rng=3)
    resid = np.asarray(out.image) - np.asarray(out.noise_free)
    assert resid.std() == pytest.approx(0.05 * float(np.mean(out.noise_free)), rel=0.05)


# -- detector response and display-contrast export (sim-to-real) -------------------------
def _two_level_image():
    """Bright 'metal' and dimmer 'chalcogen' peaks on a dark background."""
    img = np.full((64, 64), 2.0)
    img[8:56:8, 8:56:8] = 30.0  # metal columns
    img[12:56:8, 12:56:8] = 20.0  # chalcogen columns
    return img


@pytest.mark.parametrize("gamma", [0.7, 1.4])
def test_detector_gamma_moves_the_metal_chalcogen_contrast_and_keeps_the_mean(gamma):
    img = _two_level_image()
    params = {"detector_gain": 1.0, "detector_offset": 0.0, "detector_read_noise": 0.0}
    linear = acq.apply_detector(img, params, rng=0)
    bent = acq.apply_detector(img, {**params, "detector_gamma": gamma}, rng=0)
    np.testing.assert_array_equal(linear, img.astype(np.float32))
    ratio = bent[8, 8] / bent[12, 12]
    assert ratio == pytest.approx(1.5**gamma, rel=1e-5)
    assert (ratio < 1.5) == (gamma < 1)
    assert float(np.mean(np.abs(bent))) > 0
    m = float(np.mean(img))
    np.testing.assert_allclose(acq.detector_response(np.full(4, m), gamma), m)


def test_display_export_clips_the_tails_and_stretches_onto_8_bit():
    rng = np.random.default_rng(3)
    img = rng.normal(100.0, 10.0, (128, 128))
    out = acq.display_export(img, 1.0, 2.0, bits=8)
    assert out.min() == 0 and out.max() == 255
    assert np.array_equal(out, np.rint(out))
    assert np.mean(out == 0) == pytest.approx(0.01, abs=0.002)
    assert np.mean(out == 255) == pytest.approx(0.02, abs=0.002)
    order = np.argsort(img.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # monotone: no contrast inverted
    assert set(np.unique(acq.display_export(np.ones((4, 4)), 0, 0))) == {128.0}
    with pytest.raises(ValueError, match="below 100"):
        acq.display_export(img, 60, 50)


def test_detector_export_settings_are_drawn_stored_and_validated():
    cfg = acq.AcquisitionConfig.from_dict(
        {
            "detector": {
                "gamma": {"uniform": [0.8, 1.25]},
                "stretch_low_percent": {"uniform": [0, 1]},
                "stretch_high_percent": {"uniform": [0, 1]},
                "export_bits": 8,
            }
        }
    )
    names = acq.AcquisitionConfig.param_names()
    for name in ("detector_gamma", "detector_stretch_low_percent", "detector_stretch_high_percent"):
        assert name in names
    # the new draws come last: every earlier parameter keeps its value
    plain = acq.AcquisitionConfig().draw(7)
    drawn = cfg.draw(7)
    for name in plain:
        if not name.startswith(("detector_gamma", "detector_stretch")):
            assert drawn[name] == pytest.approx(plain[name], nan_ok=True), name
    assert 0.8 <= drawn["detector_gamma"] <= 1.25
    ideal = np.random.default_rng(0).random((80, 80)) * 0.05 + 0.01
    out = acq.apply_acquisition(ideal, [40.0], [40.0], cfg, pad=8, pixel_size_A=0.2, rng=1)
    assert out.image.max() <= 255 and np.array_equal(out.image, np.rint(out.image))
    assert 0.8 <= out.params["detector_gamma"] <= 1.25  # stored with the sample
    assert 0 <= out.params["detector_stretch_high_percent"] <= 1
    for bad, match in (
        ({"export_bits": 12}, "export_bits"),
        ({"gamma": 0.0}, "gamma"),
        ({"stretch_high_percent": 50}, "<= 49"),
    ):
        with pytest.raises(ValueError, match=match):
            acq.AcquisitionConfig.from_dict({"detector": bad})


def test_the_compiled_cubic_spline_equals_scipy_map_coordinates():
    from scipy import ndimage

    from simgen.acquisition.interpolate import sample_cubic

    rng = np.random.default_rng(5)
    image = ndimage.gaussian_filter(rng.random((70, 90)), 1.5) + rng.random((70, 90)) * 0.1
    rows = rng.uniform(1.0, 68.0, (40, 50))
    cols = rng.uniform(1.0, 88.0, (40, 50))
    ours = sample_cubic(image, rows, cols)
    ref = ndimage.map_coordinates(image, [rows, cols], order=3, mode="nearest", prefilter=True)
    assert ours.dtype == np.float64 and ours.shape == rows.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13 * np.abs(ref).max())
    # on the grid the spline interpolates the image
    r, c = np.meshgrid(np.arange(2, 60), np.arange(2, 80), indexing="ij")
    np.testing.assert_allclose(sample_cubic(image, r * 1.0, c * 1.0), image[r, c], atol=1e-12)
    with pytest.raises(ValueError, match="1 px inside"):
        sample_cubic(image, rows - 0.5, cols)


def test_bilinear_gradient_is_the_interpolants_slope():
    rng = np.random.default_rng(2)
    field = rng.random((9, 11))
    r, c = rng.uniform(-1.0, 9.5, 300), rng.uniform(-1.0, 11.5, 300)
    # inside a cell the interpolant is bilinear: a tiny finite difference is exact
    r = np.floor(r) + np.clip(r - np.floor(r), 0.01, 0.99)
    c = np.floor(c) + np.clip(c - np.floor(c), 0.01, 0.99)
    d_r, d_c = bilinear_gradient(field, r, c)
    e = 1e-6
    np.testing.assert_allclose(
        d_r, (bilinear(field, r + e, c) - bilinear(field, r - e, c)) / (2 * e), atol=1e-8
    )
    np.testing.assert_allclose(
        d_c, (bilinear(field, r, c + e) - bilinear(field, r, c - e)) / (2 * e), atol=1e-8
    )
    plane = 0.3 * np.arange(9)[:, None] - 0.7 * np.arange(11)[None, :]
    d_r, d_c = bilinear_gradient(plane, r, c)
    np.testing.assert_allclose(d_r, 0.3) and np.testing.assert_allclose(d_c, -0.7)


def test_tail_percentiles_equal_numpys():
    from simgen.acquisition.detector import tail_percentiles

    rng = np.random.default_rng(0)
    cases = [(1, 0.0, 100.0), (7, 10.0, 90.0), (4000, 0.33, 99.8), (262_144, 0.33, 99.83),
             (262_144, 0.0, 100.0), (100_000, 2.5, 60.0), (50_000, 0.01, 99.99)]  # fmt: skip
    for n, lo, hi in cases:
        for a in (rng.gamma(2.0, 3.0, n), np.round(rng.gamma(2.0, 3.0, n))):  # ties too
            ref = np.percentile(a, [lo, hi])
            assert tail_percentiles(a, lo, hi) == (ref[0], ref[1]), (n, lo, hi)


@pytest.mark.parametrize("lam", [0.0, 0.3, 4.0, 18.0, 29.9, 55.0, 300.0])
def test_poisson_counts_follow_the_poisson_law(lam):
    # inversion up to lambda = 30, NumPy's sampler above: both must be Poisson
    from scipy import stats

    from simgen.acquisition.counting import poisson_counts

    n = 200_000
    counts = poisson_counts(np.full((400, 500), lam), np.random.default_rng(11))
    assert counts.shape == (400, 500) and counts.dtype == np.float64
    counts = counts.ravel()
    assert np.all(counts == np.rint(counts)) and counts.min() >= 0
    assert abs(counts.mean() - lam) <= 5 * math.sqrt(max(lam, 1e-12) / n) + 1e-12
    if lam == 0:
        assert counts.max() == 0
    else:
        assert abs(counts.var() / lam - 1) <= 5 * math.sqrt(2 / n) * (1 + 1 / math.sqrt(lam))
        k = np.arange(int(lam + 10 * math.sqrt(lam) + 10))
        expected = n * stats.poisson.pmf(k, lam)
        seen = np.bincount(counts.astype(np.int64), minlength=k.size)[: k.size]
        ok = expected >= 50  # chi-square over the well-filled bins
        chi2 = float((((seen - expected) ** 2) / expected)[ok].sum())
        assert stats.chi2.sf(chi2, max(int(ok.sum()) - 1, 1)) > 1e-4
    again = poisson_counts(np.full((400, 500), lam), np.random.default_rng(11)).ravel()
    np.testing.assert_array_equal(counts, again)  # the generator fixes the draws


def test_poisson_counts_mix_inverted_and_sampled_pixels_and_refuse_bad_means():
    from simgen.acquisition.counting import INVERSION_MAX_LAMBDA, poisson_counts

    lam = np.tile([2.0, INVERSION_MAX_LAMBDA + 10.0], 50_000)
    counts = poisson_counts(lam, np.random.default_rng(3))
    for m in (2.0, INVERSION_MAX_LAMBDA + 10.0):
        part = counts[lam == m]
        assert abs(part.mean() - m) < 5 * math.sqrt(m / part.size)
    with pytest.raises(ValueError, match="finite and >= 0"):
        poisson_counts(np.array([1.0, -0.5]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        poisson_counts(np.array([np.nan]), np.random.default_rng(0))


def test_poisson_inversion_never_runs_off_for_a_uniform_next_to_one():
    from simgen.acquisition.counting import _RECIPROCALS, _invert

    lam = np.array([0.5, 5.0, 29.9])
    out = np.empty(3)
    _invert(lam, np.exp(-lam), np.full(3, 1.0 - 2.0**-53), _RECIPROCALS, 30.0, out)
    assert np.all(out <= lam + 10 * np.sqrt(lam) + 10), out  # the tail, not the cap
