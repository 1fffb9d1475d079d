"""Stage 5: detector electronics (read noise, gain, offset, saturation, quantisation)."""

from __future__ import annotations

from collections.abc import Mapping

from simgen.acquisition.base import (
    check_image,
    device_generator,
    nonneg_param,
    param_value,
)
from simgen.acquisition.config import (
    READ_NOISE_MODES,
)
from simgen.backend import get_array_module


def apply_detector(
    image,
    params: Mapping[str, float],
    *,
    rng,
    read_noise_mode: str = "counts",
    saturation: float | None = None,
    bits: int | None = None,
):
    """Detector electronics: ``y = gain·(n + σ·N(0, 1)) + offset``, saturation, quantisation.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), shape (H, W)
        Counts (or ideal units without shot noise).
    params : mapping
        ``detector_gain`` (output units per count), ``detector_offset``,
        ``detector_read_noise`` (σ in counts, or relative to the image mean).
    rng : Generator, int or SeedSequence
        Drawn on the image's device.
    read_noise_mode : {"counts", "relative"}
        ``relative``: σ = read_noise × mean(image).
    saturation : float or None
        Output values above it are set to it.
    bits : {None, 8, 16}
        Round and clip to ``[0, 2^bits − 1]``.

    Returns
    -------
    ndarray of float32
    """
    check_image(image)
    if read_noise_mode not in READ_NOISE_MODES:
        raise ValueError(
            f"read_noise_mode: expected one of {READ_NOISE_MODES}, got {read_noise_mode!r}"
        )
    if bits is not None and bits not in (8, 16):
        raise ValueError(f"bits: expected None, 8 or 16, got {bits!r}")
    if saturation is not None and not saturation > 0:
        raise ValueError(f"saturation: must be > 0 or None, got {saturation!r}")
    xp = get_array_module(image)
    gain = param_value(params, "detector_gain")
    if not gain > 0:
        raise ValueError(f"params: detector_gain must be > 0, got {gain}")
    offset = param_value(params, "detector_offset")
    sigma = nonneg_param(params, "detector_read_noise")
    y = xp.asarray(image, dtype=xp.float64)
    if read_noise_mode == "relative":
        sigma = sigma * float(xp.mean(y))
    if sigma > 0:
        y = y + sigma * device_generator(xp, rng).standard_normal(y.shape)
    y = gain * y + offset
    if saturation is not None:
        y = xp.minimum(y, float(saturation))
    if bits is not None:
        y = xp.clip(xp.rint(y), 0.0, float(2**bits - 1))
    return y.astype(xp.float32)
