"""Stage 3: probe-current variation during the frame."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from simgen.acquisition.base import (
    check_image,
    clipped_normal,
    nonneg_param,
    param_value,
    pixel_times_s,
    smooth_path,
)
from simgen.backend import get_array_module
from simgen.distributions import as_rng


# ---------------------------------------------------------------------------------------
# stage 3: probe current
# ---------------------------------------------------------------------------------------
def modulate_current(image, params: Mapping[str, float], *, rng):
    """Multiply the recorded signal by the probe current's variation during the frame.

    ``I(r, c) → I(r, c)·(1 + a_d·n(t(r, c)))·(1 + a_l·ε_r)`` with ``n`` a unit-variance
    smooth random path of correlation time ``current_drift_time_s`` (slow emission/gain
    drift), ``ε_r`` one standard normal per scan line (per-line current fluctuation), both
    clipped at ±4σ. It acts on the expected signal, before shot noise.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), shape (H, W)
        Recorded noise-free image.
    params : mapping
        Needs ``current_drift_rel, current_drift_time_s, current_line_rel`` and the scan
        timing ``scan_dwell_time_us, scan_flyback_time_us``.
    rng : Generator, int or SeedSequence

    Returns
    -------
    ndarray of float64, same shape and device as ``image`` (a new array)
    """
    check_image(image)
    xp = get_array_module(image)
    a_d = nonneg_param(params, "current_drift_rel")
    a_l = nonneg_param(params, "current_line_rel")
    if a_d > 0.2 or a_l > 0.2:
        raise ValueError(
            f"params: current_drift_rel and current_line_rel must be <= 0.2, got {a_d}, {a_l}"
        )
    r_drift, r_line = as_rng(rng).spawn(2)
    h, w = image.shape
    factor = np.ones((h, w), dtype=np.float64)
    if a_d > 0:
        tau = param_value(params, "current_drift_time_s")
        if not tau > 0:
            raise ValueError(f"params: current_drift_time_s must be > 0, got {tau}")
        t = pixel_times_s(
            (h, w),
            param_value(params, "scan_dwell_time_us"),
            param_value(params, "scan_flyback_time_us"),
        )
        factor *= 1.0 + a_d * smooth_path(t, tau, 1, r_drift)[0]
    if a_l > 0:
        factor *= (1.0 + a_l * clipped_normal(r_line, h))[:, None]
    return xp.asarray(image, dtype=xp.float64) * xp.asarray(factor)
