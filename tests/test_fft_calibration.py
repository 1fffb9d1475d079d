"""FFT calibration under what real acquisitions do: low dose, contamination, scan jitter,
anisotropy and shear, any rotation, lattice periods of 10-40 px; and refusals.

Images are rendered by ``test_lattice.render_haadf`` (Gaussian columns, Σ Z^1.7: not simgen's
simulator), then distorted here. The default suite runs a few fast cases; the ``slow`` set
sweeps the whole grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from test_lattice import lattice_constant, render_haadf

from simgen.experiment.calibration import CalibrationError, calibrate_lattice


def stressed_image(
    material, period_px, rotation_deg, lam, *, anisotropy, shear_deg, contamination=0.3,
    jitter_px=0.3, size=384, seed=0,
):  # fmt: skip
    """A rendered image with the lattice period ``period_px`` along the fast scan (x), the
    slow scan stretched by ``1 + anisotropy`` and sheared by ``shear_deg``, per-line jitter,
    an additive smooth contamination of relative amplitude ``contamination`` and Poisson noise
    of ``lam`` counts at the mean. Returns the image and the true fast-scan pixel size [Å]."""
    pixel = lattice_constant(material) / period_px
    t = math.tan(math.radians(shear_deg))
    mid = size / 2

    def distort(col, row):
        return col + t * (row - mid), mid + (row - mid) * (1 + anisotropy)

    img, *_ = render_haadf(material, pixel, (size, size), rotation_deg, dose=1e6, distort=distort)
    rng = np.random.default_rng(seed)
    img = img / img.mean()
    if jitter_px:
        shifts = rng.normal(0.0, jitter_px, size)
        img = np.stack(
            [ndimage.shift(r, s, mode="nearest") for r, s in zip(img, shifts, strict=True)]
        )
    if contamination:
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 16)
        img = np.clip(img + field / field.std() * contamination, 0, None)
    return rng.poisson(img / img.mean() * lam).astype(np.float32), pixel


def check(material, period, rotation, lam, anisotropy, shear_deg, size=384, seed=0):
    img, pixel = stressed_image(
        material, period, rotation, lam, anisotropy=anisotropy, shear_deg=shear_deg,
        size=size, seed=seed,
    )  # fmt: skip
    cal = calibrate_lattice(img, lattice_constant(material))
    assert abs(cal.pixel_size_A / pixel - 1) < 0.01, cal
    # rows are stretched by (1 + anisotropy): p_y = p_x / (1 + anisotropy)
    assert abs(cal.anisotropy - (1 / (1 + anisotropy) - 1)) < 0.01, cal
    assert abs(cal.shear - (-math.tan(math.radians(shear_deg)))) < 0.015, cal
    assert 0 < cal.uncertainty_A < 0.02 * cal.pixel_size_A  # halves of a small image differ
    return cal


@pytest.mark.parametrize(
    "material, period, rotation, lam, anisotropy, shear_deg",
    [
        ("MoS2", 12.0, 7.0, 2, 0.05, 3.0),  # λ = 2, fine lattice
        ("WSe2", 24.0, 41.0, 5, -0.05, -3.0),
        ("MoTe2", 36.0, 58.0, 20, 0.05, 0.0),  # coarse lattice, 10 periods in the image
    ],
)
def test_stress_fast(material, period, rotation, lam, anisotropy, shear_deg):
    check(material, period, rotation, lam, anisotropy, shear_deg)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_stress_grid(seed):
    rng = np.random.default_rng(seed)
    material = ("MoS2", "WSe2", "MoTe2", "WS2", "MoSe2")[seed % 5]
    check(
        material,
        period=float(rng.uniform(10, 40)),
        rotation=float(rng.uniform(0, 60)),
        lam=(2, 5, 20)[seed % 3],
        anisotropy=float(rng.choice([-0.05, 0.05])),
        shear_deg=float(rng.choice([-3.0, 3.0])),
        size=512,
        seed=seed,
    )


def _refuse(img, a=3.16):
    with pytest.raises(CalibrationError) as info:
        calibrate_lattice(img, a)
    message = str(info.value)
    assert "\n" not in message and ("hexagonal" in message or "lattice" in message)


def test_refuses_noise_vacuum_and_amorphous():
    rng = np.random.default_rng(3)
    _refuse(rng.poisson(3.0, (384, 384)).astype(np.float32))  # noise only
    vacuum = rng.poisson(0.05, (384, 384)).astype(np.float32)
    _refuse(vacuum + ndimage.gaussian_filter(rng.standard_normal((384, 384)), 40))
    # amorphous: random (non-periodic) atoms at the density of a monolayer, 4 px apart
    pts = rng.uniform(0, 384, (384 * 384 // 30, 2))
    img = np.zeros((384, 384))
    np.add.at(img, (pts[:, 1].astype(int), pts[:, 0].astype(int)), 1.0)
    _refuse(rng.poisson(ndimage.gaussian_filter(img, 2.0) * 40).astype(np.float32))


def test_refuses_a_square_lattice_at_any_period():
    yy, xx = np.mgrid[:384, :384]
    rng = np.random.default_rng(0)
    for period in (9.0, 17.0, 31.0):
        for angle in (0.0, 20.0):
            t = math.radians(angle)
            u, v = xx * math.cos(t) + yy * math.sin(t), -xx * math.sin(t) + yy * math.cos(t)
            square = 2 + np.cos(2 * np.pi * u / period) + np.cos(2 * np.pi * v / period)
            _refuse(rng.poisson(square * 10).astype(np.float32))


def test_nominal_pixel_size_restricts_the_search():
    img, pixel = stressed_image("WSe2", 20.0, 11.0, 10, anisotropy=0.0, shear_deg=0.0)
    cal = calibrate_lattice(img, lattice_constant("WSe2"), nominal_pixel_size_A=pixel * 1.1)
    assert abs(cal.pixel_size_A / pixel - 1) < 0.005
    # a nominal pixel size 2x or √3x off points at the {200} or {110} ring: the {100} ring
    # inside it is still found, never a wrong pixel size
    for wrong in (2.0, math.sqrt(3)):
        cal = calibrate_lattice(img, lattice_constant("WSe2"), nominal_pixel_size_A=pixel * wrong)
        assert abs(cal.pixel_size_A / pixel - 1) < 0.005
    with pytest.raises(ValueError, match="nominal_pixel_size_A"):
        calibrate_lattice(img, 3.28, nominal_pixel_size_A=-1.0)
