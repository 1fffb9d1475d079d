"""Optics configuration and the probe intensity (simgen.optics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simgen import backend
from simgen.optics import (
    OPTICS_KEYS,
    STEM_LEARNING_PRESET,
    OpticsConfig,
    focal_quadrature,
    nyquist_sampling_A,
    optics_values,
    probe_intensities,
    probe_intensity,
    wavelength_A,
)

N, P = 192, 0.1  # probe grid: 19.2 Å box at 0.1 Å


def _probe(**optics):
    return probe_intensity(optics_values(optics), sampling_A=P, gpts=N).astype(np.float64)


def _moments(img):
    """Centroid [Å] and covariance [Å²] of an intensity on the probe grid ([x, y] layout)."""
    c = (np.arange(N) - N // 2) * P
    x, y = np.meshgrid(c, c, indexing="ij")
    w = img / img.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    cov = np.array(
        [
            [(w * (x - mx) ** 2).sum(), (w * (x - mx) * (y - my)).sum()],
            [(w * (x - mx) * (y - my)).sum(), (w * (y - my) ** 2).sum()],
        ]
    )
    return np.array([mx, my]), cov


def _r50(img):
    """Radius [Å] of the circle (about the grid centre) holding half the intensity."""
    c = (np.arange(N) - N // 2) * P
    x, y = np.meshgrid(c, c, indexing="ij")
    r = np.hypot(x, y).ravel()
    order = np.argsort(r)
    cum = np.cumsum(img.ravel()[order])
    return float(r[order][np.searchsorted(cum / cum[-1], 0.5)])


def _fwhm_area(img):
    """Area [Å²] above half the maximum: a robust width of the central disc."""
    return float((img >= 0.5 * img.max()).sum() * P * P)


# -- configuration ----------------------------------------------------------------------
def test_defaults_are_the_documented_nominal_optics():
    values = OpticsConfig().draw(0)
    assert tuple(values) == OPTICS_KEYS
    assert values["energy_kV"] == 80.0 and values["semiangle_mrad"] == 30.0
    assert (values["haadf_inner_mrad"], values["haadf_outer_mrad"]) == (60.0, 200.0)
    assert all(isinstance(v, float) for v in values.values())


def test_draws_follow_distributions_and_seed():
    cfg = OpticsConfig.from_dict(
        {
            "C10_A": {"uniform": [-20, 20]},
            "C30_A": {"normal": [0.0, 5000.0]},
            "source_size_A": {"loguniform": [0.3, 1.0]},
            "focal_spread_A": {"normal": [0.0, 30.0]},
        }
    )
    draws = [cfg.draw(np.random.default_rng([7, i])) for i in range(200)]
    c10 = np.array([d["C10_A"] for d in draws])
    src = np.array([d["source_size_A"] for d in draws])
    assert c10.min() >= -20 and c10.max() <= 20 and c10.std() > 5
    assert src.min() >= 0.3 and src.max() <= 1.0
    # normals are clipped to the valid range: focal spread >= 0
    assert min(d["focal_spread_A"] for d in draws) >= 0.0
    assert cfg.draw(np.random.default_rng([7, 3])) == draws[3]
    assert cfg.draw(1) != cfg.draw(2)


def test_round_trip_and_plain_numbers():
    cfg = OpticsConfig(energy_kV=60, C10_A={"normal": [0, 10]})
    assert cfg.energy_kV.args == (60,)
    again = OpticsConfig.from_yaml(cfg.to_yaml())
    assert again == cfg
    assert again.replace(semiangle_mrad=25).semiangle_mrad.args == (25,)


def test_stem_learning_preset():
    cfg = OpticsConfig.stem_learning()
    assert cfg.to_dict()["semiangle_mrad"] == 25.2
    assert STEM_LEARNING_PRESET["haadf_inner_mrad"] == 63.0
    draws = [cfg.draw(i) for i in range(300)]
    cs_mm = np.array([d["C30_A"] for d in draws]) / 1e7
    assert abs(cs_mm.mean() - 0.0003) < 0.0001 and abs(cs_mm.std() - 0.0005) < 0.0001
    phi23 = np.array([d["phi23_deg"] for d in draws])
    assert abs(phi23.mean() - 30.0) < 0.5
    src = np.array([d["source_size_A"] for d in draws])
    assert abs(src.mean() - 1.0) < 0.02
    # the drawn values are valid simulation input
    optics_values(draws[0])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"energy_kV": -80}, "energy_kV"),
        ({"semiangle_mrad": 0}, "semiangle_mrad"),
        ({"haadf_inner_mrad": 200, "haadf_outer_mrad": 100}, "haadf_inner_mrad"),
        ({"haadf_inner_mrad": {"uniform": [50, 120]}, "haadf_outer_mrad": 100}, "haadf_inner"),
        ({"source_size_A": -0.1}, "source_size_A"),
        ({"focal_spread_A": {"uniform": [-5, 5]}}, "focal_spread_A"),
        ({"pixel_size_A": 0}, "pixel_size_A"),
        ({"C10_A": "large"}, "C10_A"),
        ({"C10_A": {"gamma": [1, 2]}}, "C10_A"),
        ({"defocus": 10}, "defocus"),
    ],
)
def test_invalid_optics_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        OpticsConfig.from_dict(changes)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"energy_kV": 0}, "energy_kV"),
        ({"haadf_inner_mrad": 250}, "haadf_inner_mrad"),
        ({"defocus_A": 3}, "defocus_A"),
        ({"C23_A": float("nan")}, "C23_A"),
        ({"C23_A": "x"}, "C23_A"),
    ],
)
def test_optics_values_checks_drawn_values(values, field):
    with pytest.raises(ValueError, match=field):
        optics_values(values)


def test_wavelength_and_nyquist():
    assert wavelength_A(80) == pytest.approx(0.041757, rel=1e-4)
    assert wavelength_A(300) == pytest.approx(0.019687, rel=1e-4)
    assert nyquist_sampling_A(optics_values({})) == pytest.approx(0.0418 / 0.12, rel=2e-3)


def test_focal_quadrature_moments():
    nodes, weights = focal_quadrature(30.0, 7)
    assert weights.sum() == pytest.approx(1.0)
    assert (weights * nodes).sum() == pytest.approx(0.0, abs=1e-9)
    assert (weights * nodes**2).sum() == pytest.approx(900.0)
    assert focal_quadrature(0.0)[0].tolist() == [0.0]


# -- probe intensity --------------------------------------------------------------------
def test_ideal_probe_is_normalised_centred_airy():
    img = _probe(source_size_A=0.0)
    assert img.sum() * P * P == pytest.approx(1.0, rel=1e-5)
    assert np.unravel_index(img.argmax(), img.shape) == (N // 2, N // 2)
    centre, cov = _moments(img)
    assert np.allclose(centre, 0.0, atol=1e-3)
    # Airy disc FWHM = 0.514 lambda / alpha = 0.716 Å at 80 kV, 30 mrad
    fwhm = 2.0 * math.sqrt(_fwhm_area(img) / math.pi)
    assert fwhm == pytest.approx(0.514 * wavelength_A(80) / 0.030, rel=0.08)


def test_defocus_widens_the_probe_symmetrically():
    base = _probe(source_size_A=0.0)
    over = _probe(source_size_A=0.0, C10_A=50.0)
    under = _probe(source_size_A=0.0, C10_A=-50.0)
    # half the intensity within 0.36 Å in focus, 0.91 Å at 50 Å defocus
    assert _r50(over) > 2.0 * _r50(base)
    assert _r50(_probe(source_size_A=0.0, C10_A=20.0)) > 1.1 * _r50(base)
    assert over.max() < 0.4 * base.max()
    # without odd aberrations |P|^2 does not depend on the sign of the defocus
    assert np.allclose(over, under, atol=1e-4 * base.max())


def test_coma_shifts_the_centroid_along_its_azimuth():
    alpha = 0.030
    for phi in (0.0, 90.0, 30.0):
        img = _probe(source_size_A=0.0, C21_A=1500.0, phi21_deg=phi)
        centre, _ = _moments(img)
        expected = 1500.0 * alpha**2 / 3.0  # <grad W> over the aperture = C21 alpha^2 / 3
        assert np.hypot(*centre) == pytest.approx(expected, rel=0.15)
        assert math.degrees(math.atan2(centre[1], centre[0])) == pytest.approx(phi, abs=3.0)


def test_threefold_astigmatism_reshapes_without_shifting():
    base = _probe(source_size_A=0.0)
    img = _probe(source_size_A=0.0, C23_A=1000.0, phi23_deg=10.0)
    assert np.abs(img - base).max() > 0.2 * base.max()
    centre, _ = _moments(img)
    assert np.hypot(*centre) < 0.02  # threefold symmetric: no centroid shift


def test_twofold_astigmatism_with_defocus_elongates_along_its_azimuth():
    # geometric optics: W = C10 a^2 / 2 + C12 (ax^2 - ay^2) / 2 sends rays to
    # ((C10 + C12) ax, (C10 - C12) ay): with C10 C12 > 0 the spot is long along phi12
    img = _probe(source_size_A=0.0, C10_A=30.0, C12_A=30.0, phi12_deg=0.0)
    _, cov = _moments(img)
    rotated = _probe(source_size_A=0.0, C10_A=30.0, C12_A=30.0, phi12_deg=90.0)
    _, cov_r = _moments(rotated)
    assert cov[0, 0] > 2.0 * cov[1, 1]
    assert cov[0, 0] == pytest.approx(cov_r[1, 1], rel=0.02)
    assert cov[1, 1] == pytest.approx(cov_r[0, 0], rel=0.02)
    # in focus, astigmatism alone gives equal second moments along x and y
    _, cov0 = _moments(_probe(source_size_A=0.0, C12_A=30.0))
    assert cov0[0, 0] == pytest.approx(cov0[1, 1], rel=0.02)


def test_source_size_is_a_gaussian_blur():
    base = _probe(source_size_A=0.0)
    blurred = _probe(source_size_A=1.0)
    assert blurred.sum() == pytest.approx(base.sum(), rel=1e-4)
    assert blurred.max() < 0.7 * base.max()
    sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    # a Gaussian blur adds sigma^2 to the variance of the central part; compare the
    # half-maximum areas of blurred ideal probe and a directly blurred copy
    c = (np.arange(N) - N // 2) * P
    x, y = np.meshgrid(c, c, indexing="ij")
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    direct = np.real(np.fft.ifft2(np.fft.fft2(base) * np.fft.fft2(np.fft.ifftshift(g))))
    direct *= base.sum() / direct.sum()
    assert np.allclose(blurred, direct, atol=2e-3 * blurred.max())


def test_focal_spread_averages_over_defocus():
    base = _probe(source_size_A=0.0)
    spread = _probe(source_size_A=0.0, focal_spread_A=40.0)
    assert spread.max() < 0.9 * base.max()
    assert spread.sum() == pytest.approx(base.sum(), rel=1e-4)


@pytest.mark.parametrize("focal_spread_A", [0.0, 30.0])
def test_refocused_probes_built_together_equal_their_own_builds(focal_spread_A):
    # one abTEM ensemble for several defocus shifts: each member bit for bit its own build
    optics = optics_values({"C10_A": 8.0, "C12_A": 3.0, "C23_A": 150.0, "phi23_deg": 40.0,
                            "source_size_A": 0.6, "focal_spread_A": focal_spread_A})  # fmt: skip
    shifts = (0.0, -1.6, 1.6)
    together = probe_intensities(optics, shifts, sampling_A=0.2, gpts=64, focal_points=5)
    assert together.shape == (3, 64, 64) and together.dtype == np.float32
    for dz, member in zip(shifts, together, strict=True):
        alone = probe_intensity(
            {**optics, "C10_A": optics["C10_A"] + dz}, sampling_A=0.2, gpts=64, focal_points=5
        )
        np.testing.assert_array_equal(member, alone)
    assert not np.array_equal(together[1], together[2])  # defocus of either sign differs
    with pytest.raises(ValueError, match="defocus_shifts_A"):
        probe_intensities(optics, [], sampling_A=0.2, gpts=64)


def test_probe_rejects_aliasing_grids():
    with pytest.raises(ValueError, match="sampling_A"):
        probe_intensity(optics_values({}), sampling_A=0.5, gpts=64)
    with pytest.raises(ValueError, match="gpts"):
        probe_intensity(optics_values({}), sampling_A=0.1, gpts=63)


@pytest.mark.gpu
def test_probe_on_gpu_matches_cpu():
    if not backend.gpu_available():
        pytest.skip("no CuPy / CUDA device")
    opt = optics_values({"C10_A": 15.0, "C23_A": 300.0, "focal_spread_A": 20.0})
    cpu = probe_intensity(opt, sampling_A=P, gpts=N)
    gpu = probe_intensity(opt, sampling_A=P, gpts=N, device="gpu")
    assert backend.device_of(gpu) == "gpu"
    assert np.allclose(backend.to_numpy(gpu), cpu, rtol=1e-4, atol=1e-6 * cpu.max())
