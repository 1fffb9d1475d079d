"""Shared pieces of the acquisition stages: constants, parameter access, input checks,
scan timing and smooth random functions of time."""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping

import numpy as np

from simgen.backend import get_scipy_module
from simgen.distributions import as_rng

ELEMENTARY_CHARGE_C = 1.602176634e-19
"""Elementary charge [C]."""

CLIP_SIGMA = 4.0
"""Every Gaussian random component (drift path, jitter, current) is clipped at ±4σ so the
largest displacement is bounded and :func:`required_padding_px` is a guarantee."""

SPLINE_GUARD_PX = 8
"""Extra padding beyond the largest displacement: cubic-spline interpolation needs 2 px,
and the spline prefilter's boundary condition decays as 0.268^n, i.e. below 3e-5 at 8 px."""


def param_value(params: Mapping[str, float], name: str) -> float:
    try:
        value = float(params[name])
    except KeyError:
        raise ValueError(f"params: missing {name!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"params: {name} must be a number, got {params[name]!r}") from None
    return value


def nonneg_param(params: Mapping[str, float], name: str) -> float:
    value = param_value(params, name)
    if not value >= 0:
        raise ValueError(f"params: {name} must be >= 0, got {value}")
    return value


def ndimage_of(x):
    """``scipy.ndimage`` or ``cupyx.scipy.ndimage`` for the array ``x``."""
    return importlib.import_module(get_scipy_module(x).__name__ + ".ndimage")


def check_image(image, name: str = "image"):
    if getattr(image, "ndim", None) != 2:
        raise ValueError(f"{name}: expected a 2-D array [H, W], got shape {np.shape(image)}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {image.shape}")


def check_pixel_size(pixel_size_A: float) -> float:
    if not (isinstance(pixel_size_A, int | float) and pixel_size_A > 0):
        raise ValueError(f"pixel_size_A: must be > 0 Å, got {pixel_size_A!r}")
    return float(pixel_size_A)


def check_shape(shape, name: str = "out_shape") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (H, W), got {shape!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name}: must be positive, got {shape!r}")
    return h, w


# ---------------------------------------------------------------------------------------
# timing and smooth random functions of time
# ---------------------------------------------------------------------------------------
def pixel_times_s(shape, dwell_time_us: float, flyback_time_us: float) -> np.ndarray:
    """Time at which the probe is at each pixel of a raster scan.

    Lines are scanned left to right, top to bottom; each line takes ``W·dwell + flyback``.

    Parameters
    ----------
    shape : (int, int)
        Recorded image shape ``(H, W)``.
    dwell_time_us, flyback_time_us : float
        Dwell time per pixel and line flyback time [µs].

    Returns
    -------
    ndarray of float64, shape (H, W)
        ``t(r, c) = r·(W·dwell + flyback) + c·dwell`` [s].
    """
    h, w = check_shape(shape, "shape")
    dwell, fly = dwell_time_us * 1e-6, flyback_time_us * 1e-6
    line = w * dwell + fly
    return np.arange(h, dtype=np.float64)[:, None] * line + np.arange(w)[None, :] * dwell


def frame_time_s(shape, dwell_time_us: float, flyback_time_us: float) -> float:
    """Time from the first to the last pixel of the frame [s] (see :func:`pixel_times_s`)."""
    h, w = check_shape(shape, "shape")
    dwell, fly = dwell_time_us * 1e-6, flyback_time_us * 1e-6
    return (h - 1) * (w * dwell + fly) + (w - 1) * dwell


def _gaussian_kernel_norm(sigma: float, truncate: float = 4.0) -> float:
    """Root of the sum of squares of scipy's normalised Gaussian kernel of ``sigma``."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2) if sigma > 0 else (x == 0).astype(np.float64)
    k /= k.sum()
    return float(np.sqrt(np.sum(k * k)))


def smooth_path(times_s: np.ndarray, corr_time_s: float, n_paths: int, rng) -> np.ndarray:
    """Unit-variance Gaussian random functions of time, evaluated at ``times_s``.

    White noise on a time grid of step ``τ/16`` (at most 2^20 steps across the span) is
    filtered with a Gaussian of standard deviation ``τ`` and divided by the kernel's root
    sum of squares, which gives unit variance and the autocorrelation
    ``exp(−Δt²/(4τ²))``; values are clipped at ±4 and interpolated linearly to the times.
    The grid extends 4τ beyond the times so its ends carry no edge effect.

    Returns
    -------
    ndarray, shape (n_paths, *times_s.shape)
    """
    rng = as_rng(rng)
    t = np.asarray(times_s, dtype=np.float64)
    tau = float(corr_time_s)
    t0, t1 = float(t.min()), float(t.max())
    span = (t1 - t0) + 8.0 * tau
    dt = max(tau / 16.0, span / 2**20)
    n = int(math.ceil(span / dt)) + 1
    grid = (t0 - 4.0 * tau) + dt * np.arange(n)
    white = rng.standard_normal((n_paths, n))
    sigma = tau / dt
    from scipy.ndimage import gaussian_filter1d

    path = gaussian_filter1d(white, sigma, axis=-1, mode="reflect", truncate=4.0)
    path /= _gaussian_kernel_norm(sigma)
    np.clip(path, -CLIP_SIGMA, CLIP_SIGMA, out=path)
    from simgen.acquisition.interpolate import interp_paths  # np.interp, all paths at once

    return interp_paths(t, grid, path)


def clipped_normal(rng, shape) -> np.ndarray:
    return np.clip(rng.standard_normal(shape), -CLIP_SIGMA, CLIP_SIGMA)


def device_generator(xp, rng):
    """A generator drawing on ``xp``'s device, seeded from the host ``rng``."""
    rng = as_rng(rng)
    if xp is np:
        return rng
    seed = int(rng.integers(0, 2**63 - 1))  # pragma: no cover - GPU only
    return xp.random.RandomState(seed)  # pragma: no cover - GPU only
