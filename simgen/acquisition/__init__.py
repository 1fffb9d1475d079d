"""Acquisition imperfections of a HAADF-STEM image, with labels that follow the scan.

The chain turns an *ideal* image (the signal the detector would give, per probe position,
in units of the fraction of the incident beam it collects, as abTEM gives) into a recorded
image, and moves the column labels with it. One module per stage, in the physical order
the chain applies them:

1. **Contamination** (``contamination``, :func:`contamination_background`): a smooth
   non-negative background with a power-law spectrum cut off at a length in Å, plus
   optional amorphous blobs. It belongs to the specimen, so it is added to the ideal
   image *before* the scan and is distorted with the lattice.
2. **Scan distortion** (``scan``, :func:`distort_scan`): the probe visits
   ``p(t) = raster + v·(t − T/2) + nonlinear(t) + line jitter + pixel jitter`` and the
   recorded pixel (r, c) samples the ideal image at ``p(t(r, c))``. Column labels are
   mapped through the same path by :func:`map_positions`.
3. **Probe current** (``current``, :func:`modulate_current`): slow drift of the beam
   current and per-line fluctuations multiply the expected signal. The result is the *noise-free*
   recorded image (what the checker in :mod:`simgen.check` looks at).
4. **Shot noise** (``shot``, :func:`add_shot_noise`): Poisson counting of the detected
   electrons, parameterised by λ (expected counts at the image mean) or by the physical dose.
5. **Detector** (``detector``, :func:`apply_detector`): Gaussian read noise, gain,
   offset, optional saturation and quantisation to 8 or 16 bit.

:func:`apply_acquisition` (``chain``) runs them all; ``config`` holds every stage's
settings and ``base`` what the stages share (parameter access, checks, scan timing). Every
stage is a pure function ``f(image, params, *, rng, ...)`` on NumPy or CuPy arrays,
where ``params`` is the flat mapping of per-sample values drawn by
:meth:`AcquisitionConfig.draw` (names in :data:`PARAM_NAMES`; they become per-sample
arrays ``params/<name>`` in the store).

Geometry follows ``docs/architecture.md``: images are ``[H, W] = [rows (y), cols (x)]``
and pixel (r, c) is the probe position ``(x0 + c·p, y0 + r·p)``. The ideal image is
simulated ``pad`` pixels larger than the recorded one on every side (same pixel size
``p``), so its pixel (i, j) is the probe position ``(x0 + (j − pad)·p, y0 + (i − pad)·p)``;
:func:`required_padding_px` says how large ``pad`` must be.

Devices: the scan path, the contamination field and the current modulation are drawn on
the host with NumPy (they are small, and the labels then do not depend on the device);
shot and read noise are drawn on the image's device. For the same seed the CPU and GPU
paths therefore give the same parameters, labels and noise-free image (to floating-point
rounding) and the same noise *distribution*, not the same noise realisation.
"""

from simgen.acquisition.base import (
    CLIP_SIGMA,
    ELEMENTARY_CHARGE_C,
    SPLINE_GUARD_PX,
    frame_time_s,
    pixel_times_s,
)
from simgen.acquisition.chain import Acquired, apply_acquisition
from simgen.acquisition.config import (
    DERIVED_PARAM_NAMES,
    DRAWN_PARAM_NAMES,
    PARAM_NAMES,
    AcquisitionConfig,
    ContaminationConfig,
    CurrentConfig,
    DetectorConfig,
    DriftConfig,
    JitterConfig,
    ScanConfig,
    ShotNoiseConfig,
)
from simgen.acquisition.contamination import (
    Background,
    contamination_background,
    smooth_background,
)
from simgen.acquisition.current import modulate_current
from simgen.acquisition.detector import apply_detector, detector_response, display_export
from simgen.acquisition.scan import (
    ScanMapping,
    distort_scan,
    map_positions,
    required_padding_px,
    scan_displacement,
)
from simgen.acquisition.shot import add_shot_noise, shot_counts_per_unit

__all__ = [
    "CLIP_SIGMA",
    "SPLINE_GUARD_PX",
    "DERIVED_PARAM_NAMES",
    "DRAWN_PARAM_NAMES",
    "ELEMENTARY_CHARGE_C",
    "PARAM_NAMES",
    "AcquisitionConfig",
    "Acquired",
    "Background",
    "ContaminationConfig",
    "CurrentConfig",
    "DetectorConfig",
    "DriftConfig",
    "JitterConfig",
    "ScanConfig",
    "ScanMapping",
    "ShotNoiseConfig",
    "add_shot_noise",
    "apply_acquisition",
    "apply_detector",
    "detector_response",
    "display_export",
    "contamination_background",
    "distort_scan",
    "frame_time_s",
    "map_positions",
    "modulate_current",
    "pixel_times_s",
    "required_padding_px",
    "scan_displacement",
    "shot_counts_per_unit",
    "smooth_background",
]
