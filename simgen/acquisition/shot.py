"""Stage 4: Poisson shot noise of the detected electrons."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from simgen.acquisition.base import (
    ELEMENTARY_CHARGE_C,
    check_image,
    device_generator,
    nonneg_param,
    param_value,
)
from simgen.acquisition.config import (
    SHOT_MODES,
)
from simgen.backend import get_array_module
from simgen.distributions import as_rng


def shot_counts_per_unit(image, params: Mapping[str, float], *, mode: str = "lambda") -> float:
    """Expected detected electrons per unit of the (ideal-units) image.

    * ``lambda``: ``λ / mean(image)`` so the expected count at the image mean is λ.
    * ``dose``: ``I·τ/e × efficiency``, e.g. 30 pA × 20 µs / 1.602e-19 C = 3745 electrons
      per pixel in the probe; with the image in units of the fraction of the beam the
      detector collects, a pixel of value 0.02 then expects 74.9 counts.
    * ``none``, or λ = 0: NaN (no shot noise).

    Parameters
    ----------
    image : ndarray (NumPy or CuPy)
        Noise-free recorded image in ideal units.
    params : mapping
        ``shot_lambda_counts`` (lambda) or ``shot_probe_current_pA``,
        ``shot_detector_efficiency`` and ``scan_dwell_time_us`` (dose).
    mode : {"lambda", "dose", "none"}

    Returns
    -------
    float
    """
    if mode not in SHOT_MODES:
        raise ValueError(f"mode: expected one of {SHOT_MODES}, got {mode!r}")
    if mode == "none":
        return math.nan
    if mode == "lambda":
        lam = param_value(params, "shot_lambda_counts")
        if math.isnan(lam) or lam == 0:
            return math.nan
        if lam < 0:
            raise ValueError(f"params: shot_lambda_counts must be >= 0, got {lam}")
        mean = float(get_array_module(image).mean(image))
        if not mean > 0:
            raise ValueError(f"image: mean must be > 0 for lambda shot noise, got {mean}")
        return lam / mean
    current = nonneg_param(params, "shot_probe_current_pA")
    eff = nonneg_param(params, "shot_detector_efficiency")
    dwell = nonneg_param(params, "scan_dwell_time_us")
    if eff > 1:
        raise ValueError(f"params: shot_detector_efficiency must be <= 1, got {eff}")
    electrons = current * 1e-12 * dwell * 1e-6 / ELEMENTARY_CHARGE_C
    return electrons * eff if electrons * eff > 0 else math.nan


def add_shot_noise(image, params: Mapping[str, float], *, rng, mode: str = "lambda"):
    """Poisson counting noise: ``n ~ Poisson(max(image, 0) × k)``, ``k`` from
    :func:`shot_counts_per_unit`.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), shape (H, W)
        Noise-free recorded image in ideal units (fraction of the beam collected).
    params : mapping
        See :func:`shot_counts_per_unit`.
    rng : Generator, int or SeedSequence
        On the CPU :func:`simgen.acquisition.counting.poisson_counts` (inversion of the
        CDF up to λ = 30, NumPy's sampler above); on a GPU CuPy's generator.
    mode : {"lambda", "dose", "none"}

    Returns
    -------
    ndarray of float32
        Counts (integers stored as float); a float32 copy of ``image`` when there is no shot
        noise (mode ``none`` or λ = 0).
    """
    check_image(image)
    xp = get_array_module(image)
    k = shot_counts_per_unit(image, params, mode=mode)
    if math.isnan(k):
        return xp.asarray(image, dtype=xp.float32).copy()
    lam = xp.maximum(xp.asarray(image, dtype=xp.float64) * k, 0.0)
    if xp is np:  # inversion for the usual counts (simgen.acquisition.counting)
        from simgen.acquisition.counting import poisson_counts

        return poisson_counts(lam, as_rng(rng)).astype(np.float32)
    counts = device_generator(xp, rng).poisson(lam)  # pragma: no cover - GPU only
    return counts.astype(xp.float32)  # pragma: no cover - GPU only
