"""The whole acquisition chain: :func:`apply_acquisition` runs stages 1 to 5 in order."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from simgen.acquisition.base import (
    check_image,
    check_pixel_size,
    check_shape,
    frame_time_s,
)
from simgen.acquisition.config import (
    DRAWN_PARAM_NAMES,
    PARAM_NAMES,
    as_config,
)
from simgen.acquisition.contamination import contamination_background
from simgen.acquisition.current import modulate_current
from simgen.acquisition.detector import apply_detector
from simgen.acquisition.scan import ScanMapping, distort_scan, map_positions
from simgen.acquisition.shot import add_shot_noise, shot_counts_per_unit
from simgen.backend import get_array_module
from simgen.distributions import as_rng


# ---------------------------------------------------------------------------------------
# the chain
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Acquired:
    """One recorded sample and its moved labels.

    Attributes
    ----------
    image : ndarray of float32, shape (H, W)
        Recorded image after every imperfection: counts × gain + offset with shot noise,
        ideal units (× gain + offset) without.
    noise_free : ndarray of float32, shape (H, W)
        The distorted image before shot and detector noise (contamination, scan and current
        applied), in ideal units; what :func:`simgen.check.check_labels` looks at.
    rows, cols : ndarray of float64, shape (N,)
        Column positions in recorded-image pixels, aligned with the input positions.
    inside : ndarray of bool, shape (N,)
        Column lies on the recorded field.
    params : dict of str to float
        Every drawn and derived value (keys :data:`PARAM_NAMES`).
    mapping : ScanMapping
        The probe path.
    stages : dict of str to ndarray or None
        With ``keep_stages=True``: ``ideal`` (cropped to the recorded field),
        ``contamination`` (ideal + background, cropped), ``scan``, ``current``, ``shot``,
        ``detector``.
    """

    image: Any
    noise_free: Any
    rows: np.ndarray
    cols: np.ndarray
    inside: np.ndarray
    params: dict
    mapping: ScanMapping
    stages: dict | None = None


# Kept as one function (~84 lines of code): it is the chain itself, stage after stage in
# physical order, so that the order (and the rng children) is visible in one place.
def apply_acquisition(
    ideal,
    rows,
    cols,
    config=None,
    *,
    pad: int,
    pixel_size_A: float,
    rng,
    out_shape=None,
    params: Mapping[str, float] | None = None,
    keep_stages: bool = False,
) -> Acquired:
    """Run the whole acquisition chain on one ideal image and move its column labels.

    Order: contamination (added to the padded ideal image) → scan distortion → probe
    current → shot noise → detector. ``rng`` is split into six children (parameters,
    contamination, scan, current, shot, detector), so replaying stored ``params`` with the
    same seed reproduces the sample bit for bit, and each stage's draws do not depend on
    the others' settings.

    Parameters
    ----------
    ideal : ndarray (NumPy or CuPy), shape (H + 2·pad, W + 2·pad)
        Ideal image, in units of the fraction of the beam the detector collects.
    rows, cols : array_like, shape (N,)
        Column positions in ``ideal``'s pixels (row = y, col = x; sub-pixel).
    config : AcquisitionConfig, mapping or None
        Settings and distributions (None: defaults).
    pad : int
        Padding of ``ideal`` on each side [px] (:func:`required_padding_px`).
    pixel_size_A : float
        Pixel size [Å].
    rng : Generator, int or SeedSequence
        E.g. ``np.random.default_rng([seed, i])`` for sample i.
    out_shape : (int, int), optional
        Recorded shape; default ``ideal.shape − 2·pad``.
    params : mapping, optional
        Values to use instead of drawing (keys :data:`DRAWN_PARAM_NAMES`, e.g. read back
        from a store); derived values are recomputed.
    keep_stages : bool
        Also return every intermediate image (for figures).

    Returns
    -------
    Acquired
    """
    cfg = as_config(config)
    check_image(ideal, "ideal")
    p = check_pixel_size(pixel_size_A)
    if isinstance(pad, bool) or not isinstance(pad, int | np.integer) or pad < 0:
        raise ValueError(f"pad: expected an integer >= 0, got {pad!r}")
    pad = int(pad)
    if out_shape is None:
        out_shape = (ideal.shape[0] - 2 * pad, ideal.shape[1] - 2 * pad)
    h, w = check_shape(out_shape)
    xp = get_array_module(ideal)
    rng = as_rng(rng)
    r_params, r_cont, r_scan, r_cur, r_shot, r_det = rng.spawn(6)
    if params is None:
        values = cfg.draw(r_params)
    else:
        missing = [k for k in DRAWN_PARAM_NAMES if k not in params]
        if missing:
            raise ValueError(f"params: missing {missing[0]!r} (and {len(missing) - 1} more)")
        values = {k: float(params[k]) for k in DRAWN_PARAM_NAMES}

    ideal64 = xp.asarray(ideal, dtype=xp.float64)
    bg = contamination_background(
        ideal.shape, values, pixel_size_A=p, rng=r_cont, lattice_std=float(xp.std(ideal64))
    )
    specimen = ideal64 + xp.asarray(bg.field) if bg.field.any() else ideal64
    recorded, mapping = distort_scan(
        specimen,
        (h, w),
        pad,
        values,
        pixel_size_A=p,
        rng=r_scan,
        label_sigma_A=cfg.scan.label_sigma_A,
    )
    current = modulate_current(recorded, values, rng=r_cur)
    k = shot_counts_per_unit(current, values, mode=cfg.shot.mode)
    counts = add_shot_noise(current, values, rng=r_shot, mode=cfg.shot.mode)
    det = cfg.detector
    if math.isnan(k) and det.read_noise_mode == "counts":
        # No shot noise means an unlimited dose: the image is not in counts, and read noise
        # given in counts is negligible against an unlimited signal. Applying it to the
        # relative-unit image would bury the lattice (use read_noise_mode: relative for
        # Gaussian noise on shot-noise-free images).
        values["detector_read_noise"] = 0.0
    image = apply_detector(
        counts,
        values,
        rng=r_det,
        read_noise_mode=det.read_noise_mode,
        saturation=det.saturation,
        bits=det.bits,
        export_bits=det.export_bits,
    )
    rows_out, cols_out, inside = map_positions(rows, cols, mapping)

    values["scan_frame_time_s"] = frame_time_s(
        (h, w), values["scan_dwell_time_us"], values["scan_flyback_time_us"]
    )
    values["scan_max_shift_A"] = mapping.max_shift_px() * p
    values["contamination_n_blobs"] = float(bg.n_blobs)
    values["shot_counts_per_unit"] = float(k)
    values["shot_mean_counts"] = float(k * float(xp.mean(current))) if not math.isnan(k) else k
    values = {name: float(values[name]) for name in PARAM_NAMES}

    stages = None
    if keep_stages:
        crop = (slice(pad, pad + h), slice(pad, pad + w))
        stages = {
            "ideal": ideal64[crop].astype(xp.float32),
            "contamination": specimen[crop].astype(xp.float32),
            "scan": recorded.astype(xp.float32),
            "current": current.astype(xp.float32),
            "shot": counts,
            "detector": image,
        }
    return Acquired(
        image=image,
        noise_free=current.astype(xp.float32),
        rows=rows_out,
        cols=cols_out,
        inside=inside,
        params=values,
        mapping=mapping,
        stages=stages,
    )
