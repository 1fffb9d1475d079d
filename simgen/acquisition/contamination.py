"""Stage 1: contamination, a smooth background (and blobs) added to the ideal image."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from simgen.acquisition.base import (
    check_pixel_size,
    check_shape,
    nonneg_param,
    param_value,
)
from simgen.distributions import as_rng


# ---------------------------------------------------------------------------------------
# stage 1: contamination
# ---------------------------------------------------------------------------------------
def _cubic_weights(x: np.ndarray, n: int) -> np.ndarray:
    """Keys cubic-convolution (a = −0.5) interpolation matrix: values at ``x`` from ``n``
    samples at 0..n−1 (``x`` must lie in [1, n − 3])."""
    i0 = np.floor(x).astype(np.intp)
    f = x - i0
    out = np.zeros((x.size, n), dtype=np.float64)
    a = -0.5
    for k, d in zip((-1, 0, 1, 2), (1 + f, f, 1 - f, 2 - f), strict=True):
        ad = np.abs(d)
        wgt = np.where(
            ad <= 1,
            (a + 2) * ad**3 - (a + 3) * ad**2 + 1,
            a * ad**3 - 5 * a * ad**2 + 8 * a * ad - 4 * a,
        )
        np.add.at(out, (np.arange(x.size), i0 + k), wgt)
    return out


def smooth_background(
    shape, cutoff_A: float, exponent: float, *, pixel_size_A: float, rng
) -> np.ndarray:
    """Zero-mean, unit-rms smooth random field with a power-law spectrum and a cut-off.

    The power spectrum is ``P(k) ∝ (k² + k0²)^(−β/2)·T(k)²`` with ``k0`` the inverse of the
    generating grid's size (keeps the k → 0 divergence finite) and a taper ``T`` equal to 1
    below ``kc/2``, falling as cos² to 0 at ``kc = 1/cutoff_A`` and 0 beyond, so (up to
    interpolation leakage of well under 1%) all power lies below the cut-off. The field is
    synthesised by FFT on a coarse grid of spacing ``max(p, cutoff/4)`` twice the image's
    size (the crop is not periodic), then interpolated to the pixels with cubic
    convolution, and normalised to zero mean and unit rms over the image.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(H, W)``.
    cutoff_A : float
        Cut-off length [Å].
    exponent : float
        Spectral exponent β (0 = white below the cut-off; 2–3 typical of thickness
        variations).
    pixel_size_A : float
        Pixel size [Å].
    rng : Generator, int or SeedSequence

    Returns
    -------
    ndarray of float64, shape (H, W), on the host
    """
    h, w = check_shape(shape, "shape")
    p = check_pixel_size(pixel_size_A)
    if not cutoff_A > 0:
        raise ValueError(f"cutoff_A: must be > 0, got {cutoff_A}")
    if not exponent >= 0:
        raise ValueError(f"exponent: must be >= 0, got {exponent}")
    rng = as_rng(rng)
    s = max(p, cutoff_A / 4.0)
    nr = int(math.ceil((h - 1) * p / s)) + 4
    nc = int(math.ceil((w - 1) * p / s)) + 4
    gr, gc = 2 * nr, 2 * nc
    ky = np.fft.fftfreq(gr, d=s)[:, None]
    kx = np.fft.rfftfreq(gc, d=s)[None, :]
    k = np.hypot(ky, kx)
    kc = 1.0 / cutoff_A
    k0 = 1.0 / (max(gr, gc) * s)
    amp = (k * k + k0 * k0) ** (-exponent / 4.0)
    taper = np.where(
        k <= kc / 2, 1.0, np.where(k >= kc, 0.0, np.cos(np.pi * (k - kc / 2) / kc) ** 2)
    )
    amp *= taper
    amp[0, 0] = 0.0
    noise = rng.standard_normal((gr, gc))
    coarse = np.fft.irfft2(np.fft.rfft2(noise) * amp, s=(gr, gc))[:nr, :nc]
    br = _cubic_weights(1.0 + np.arange(h) * p / s, nr)
    bc = _cubic_weights(1.0 + np.arange(w) * p / s, nc)
    fine = br @ coarse @ bc.T
    fine -= fine.mean()
    std = fine.std()
    return fine / std if std > 0 else fine


class Background(NamedTuple):
    """Contamination background of one sample (host array) and the blob count drawn."""

    field: np.ndarray
    n_blobs: int


def contamination_background(
    shape,
    params: Mapping[str, float],
    *,
    pixel_size_A: float,
    rng,
    lattice_std: float,
) -> Background:
    """Non-negative contamination background in units of the ideal image.

    ``B = rel·s·(g − min g) + blob_rel·s·Σ blobs`` with ``s = lattice_std``, ``g`` from
    :func:`smooth_background` (so the smooth part has rms ``rel·s`` and is 0 at its cleanest
    spot), and blobs: a Poisson number (mean ``density × area``) of soft-edged disks of
    radius 0.6–1.4 × ``blob_radius_A`` at uniform positions, filled with an amorphous
    speckle (white noise smoothed over 0.8 Å, 50% contrast).

    Parameters
    ----------
    shape : (int, int)
        Shape of the (padded) ideal image.
    params : mapping
        Needs ``contamination_rel, contamination_cutoff_A, contamination_exponent,
        contamination_blob_density_per_nm2, contamination_blob_radius_A,
        contamination_blob_rel``.
    pixel_size_A : float
        Pixel size [Å].
    rng : Generator, int or SeedSequence
        Two children: smooth field, blobs.
    lattice_std : float
        The lattice signal: standard deviation of the ideal image.

    Returns
    -------
    Background
    """
    h, w = check_shape(shape, "shape")
    p = check_pixel_size(pixel_size_A)
    rel = nonneg_param(params, "contamination_rel")
    density = nonneg_param(params, "contamination_blob_density_per_nm2")
    blob_rel = nonneg_param(params, "contamination_blob_rel")
    r_field, r_blob = as_rng(rng).spawn(2)
    out = np.zeros((h, w), dtype=np.float64)
    if rel > 0 and lattice_std > 0:
        g = smooth_background(
            (h, w),
            param_value(params, "contamination_cutoff_A"),
            param_value(params, "contamination_exponent"),
            pixel_size_A=p,
            rng=r_field,
        )
        out += rel * lattice_std * (g - g.min())
    n_blobs = 0
    if density > 0 and blob_rel > 0 and lattice_std > 0:
        radius = param_value(params, "contamination_blob_radius_A")
        if not radius > 0:
            raise ValueError(f"params: contamination_blob_radius_A must be > 0, got {radius}")
        area_nm2 = h * w * p * p / 100.0
        n_blobs = int(min(r_blob.poisson(density * area_nm2), 100_000))
        if n_blobs:
            cy = r_blob.uniform(-0.5, h - 0.5, n_blobs)
            cx = r_blob.uniform(-0.5, w - 0.5, n_blobs)
            rad = radius / p * r_blob.uniform(0.6, 1.4, n_blobs)
            from scipy.ndimage import gaussian_filter

            speckle = gaussian_filter(r_blob.standard_normal((h, w)), 0.8 / p)
            speckle /= max(float(speckle.std()), 1e-12)
            cover = np.zeros((h, w), dtype=np.float64)
            for y0, x0, rb in zip(cy, cx, rad, strict=True):
                edge = 0.2 * rb
                reach = rb + 4 * edge
                r0, r1 = max(int(y0 - reach), 0), min(int(y0 + reach) + 2, h)
                c0, c1 = max(int(x0 - reach), 0), min(int(x0 + reach) + 2, w)
                if r0 >= r1 or c0 >= c1:
                    continue
                yy = np.arange(r0, r1)[:, None] - y0
                xx = np.arange(c0, c1)[None, :] - x0
                d = np.sqrt(yy * yy + xx * xx)
                cover[r0:r1, c0:c1] += 0.5 * (1.0 - np.tanh((d - rb) / edge))
            np.clip(cover, 0.0, 1.0, out=cover)
            out += blob_rel * lattice_std * cover * np.clip(1.0 + 0.5 * speckle, 0.0, None)
    return Background(out, n_blobs)
