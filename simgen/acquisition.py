"""Acquisition imperfections of a HAADF-STEM image, with labels that follow the scan.

The chain turns an *ideal* image (the signal the detector would give, per probe position,
in units of the fraction of the incident beam it collects, as abTEM gives) into a recorded
image, and moves the column labels with it. The stages run in this physical order:

1. **Contamination** (:func:`contamination_background`): a smooth non-negative background
   with a power-law spectrum cut off at a length in Å, plus optional amorphous blobs. It
   belongs to the specimen, so it is added to the ideal image *before* the scan and is
   distorted with the lattice.
2. **Scan distortion** (:func:`distort_scan`): the probe visits
   ``p(t) = raster + v·(t − T/2) + nonlinear(t) + line jitter + pixel jitter`` and the
   recorded pixel (r, c) samples the ideal image at ``p(t(r, c))``. Column labels are
   mapped through the same path by :func:`map_positions`.
3. **Probe current** (:func:`modulate_current`): slow drift of the beam current and
   per-line fluctuations multiply the expected signal. The result is the *noise-free*
   recorded image (what the checker in :mod:`simgen.check` looks at).
4. **Shot noise** (:func:`add_shot_noise`): Poisson counting of the detected electrons,
   parameterised by λ (expected counts at the image mean) or by the physical dose.
5. **Detector** (:func:`apply_detector`): Gaussian read noise, gain, offset, optional
   saturation and quantisation to 8 or 16 bit.

:func:`apply_acquisition` runs them all. Every stage is a pure function
``f(image, params, *, rng, ...)`` on NumPy or CuPy arrays, where ``params`` is the flat
mapping of per-sample values drawn by :meth:`AcquisitionConfig.draw` (names in
:data:`PARAM_NAMES`; they become per-sample arrays ``params/<name>`` in the store).

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

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from simgen.backend import get_array_module, get_scipy_module, to_numpy
from simgen.configbase import Config
from simgen.distributions import Distribution, as_rng

__all__ = [
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
    "add_contamination",
    "add_shot_noise",
    "apply_acquisition",
    "apply_detector",
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

ELEMENTARY_CHARGE_C = 1.602176634e-19
"""Elementary charge [C]."""

CLIP_SIGMA = 4.0
"""Every Gaussian random component (drift path, jitter, current) is clipped at ±4σ so the
largest displacement is bounded and :func:`required_padding_px` is a guarantee."""

SPLINE_GUARD_PX = 8
"""Extra padding beyond the largest displacement: cubic-spline interpolation needs 2 px,
and the spline prefilter's boundary condition decays as 0.268^n, i.e. below 3e-5 at 8 px."""

_SHOT_MODES = ("none", "lambda", "dose")
_READ_NOISE_MODES = ("counts", "relative")


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
def _dist(kind: str, *args) -> Distribution:
    return Distribution(kind, tuple(args))


def _fixed(value: float) -> Distribution:
    return Distribution("fixed", (value,))


@dataclass(frozen=True)
class _StageConfig(Config):
    """Base of the stage configs: coerces numbers to Distributions and checks ranges.

    ``_PREFIX`` makes the flat parameter name ``f"{_PREFIX}_{field}"``; ``_LIMITS`` gives the
    closed range ``(low, high)`` (``None`` = unbounded) every drawn value must lie in.
    """

    _PREFIX: ClassVar[str] = ""
    _LIMITS: ClassVar[dict[str, tuple[float | None, float | None]]] = {}

    def __post_init__(self):
        for name, (low, high) in self._LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            dist = Distribution.parse(value, name)
            if dist.kind == "choice" and not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in dist.args
            ):
                raise ValueError(f"{name}: choice options must be numbers, got {list(dist.args)}")
            if dist.kind == "fixed" and (
                isinstance(dist.args[0], bool) or not isinstance(dist.args[0], int | float)
            ):
                raise ValueError(f"{name}: expected a number, got {dist.args[0]!r}")
            if not all(math.isfinite(float(a)) for a in dist.args):
                raise ValueError(f"{name}: values must be finite, got {dist.to_config()}")
            dist.check_range(name, low, high)
            object.__setattr__(self, name, dist)

    def value_bounds(self, name: str) -> tuple[float, float]:
        """Smallest and largest value a draw of ``name`` can give (after clipping)."""
        dist = getattr(self, name)
        lo, hi = (float(v) for v in dist.bounds())
        low, high = self._LIMITS[name]
        if low is not None:
            lo, hi = max(lo, low), max(hi, low)
        if high is not None:
            lo, hi = min(lo, high), min(hi, high)
        return lo, hi

    def draw_one(self, name: str, rng) -> float:
        """Draw the value of field ``name``, clipped to its bounds (normals are clipped)."""
        lo, hi = self.value_bounds(name)
        return float(getattr(self, name).draw(rng, low=lo, high=hi))

    @classmethod
    def drawn_fields(cls) -> tuple[str, ...]:
        return tuple(cls._LIMITS)


@dataclass(frozen=True)
class ScanConfig(_StageConfig):
    """Scan timing and how labels are placed.

    Parameters
    ----------
    dwell_time_us : Distribution
        Dwell time per pixel [µs].
    flyback_time_us : Distribution
        Line flyback time (probe return and settling between lines) [µs].
    label_sigma_A : float
        Width [Å] of the Gaussian column used to place labels in the recorded image (see
        :func:`map_positions`); about the HAADF column width at 60–80 kV.
    """

    _PREFIX: ClassVar[str] = "scan"
    _LIMITS: ClassVar[dict] = {"dwell_time_us": (1e-3, 1e6), "flyback_time_us": (0.0, 1e7)}

    dwell_time_us: Distribution = _fixed(20.0)
    flyback_time_us: Distribution = _fixed(500.0)
    label_sigma_A: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.label_sigma_A, int | float) and self.label_sigma_A > 0):
            raise ValueError(f"label_sigma_A: must be > 0 Å, got {self.label_sigma_A!r}")


@dataclass(frozen=True)
class DriftConfig(_StageConfig):
    """Specimen drift relative to the scan.

    Parameters
    ----------
    vx_A_per_s, vy_A_per_s : Distribution
        Linear drift velocity [Å/s]. Displacement is ``v·(t − T/2)`` (T the frame time), so
        the frame's centre is where the nominal field of view says.
    nonlinear_A : Distribution
        Rms amplitude of the non-linear drift path [Å], drawn independently for x and y.
    nonlinear_time_s : Distribution
        Correlation time τ [s] of the non-linear path (autocorrelation exp(−Δt²/4τ²)).
    """

    _PREFIX: ClassVar[str] = "drift"
    _LIMITS: ClassVar[dict] = {
        "vx_A_per_s": (None, None),
        "vy_A_per_s": (None, None),
        "nonlinear_A": (0.0, None),
        "nonlinear_time_s": (1e-6, None),
    }

    vx_A_per_s: Distribution = _dist("normal", 0.0, 0.2)
    vy_A_per_s: Distribution = _dist("normal", 0.0, 0.2)
    nonlinear_A: Distribution = _dist("uniform", 0.0, 0.1)
    nonlinear_time_s: Distribution = _dist("loguniform", 0.1, 1.0)


@dataclass(frozen=True)
class JitterConfig(_StageConfig):
    """Scan jitter: per-line offsets and optional per-pixel jitter.

    Parameters
    ----------
    line_x_A, line_y_A : Distribution
        Rms of the per-scan-line probe offset along x (fast scan) and y [Å].
    pixel_A : Distribution
        Rms of an independent per-pixel probe offset (x and y) [Å].
    """

    _PREFIX: ClassVar[str] = "jitter"
    _LIMITS: ClassVar[dict] = {
        "line_x_A": (0.0, None),
        "line_y_A": (0.0, None),
        "pixel_A": (0.0, None),
    }

    line_x_A: Distribution = _dist("uniform", 0.0, 0.08)
    line_y_A: Distribution = _fixed(0.0)
    pixel_A: Distribution = _fixed(0.0)


@dataclass(frozen=True)
class CurrentConfig(_StageConfig):
    """Probe-current variation during the frame.

    Parameters
    ----------
    drift_rel : Distribution
        Rms relative amplitude of the slow current (gain) drift, a smooth random function
        of time.
    drift_time_s : Distribution
        Correlation time of the slow drift [s].
    line_rel : Distribution
        Rms relative per-line current fluctuation.
    """

    _PREFIX: ClassVar[str] = "current"
    _LIMITS: ClassVar[dict] = {
        "drift_rel": (0.0, 0.2),
        "drift_time_s": (1e-6, None),
        "line_rel": (0.0, 0.2),
    }

    drift_rel: Distribution = _dist("uniform", 0.0, 0.05)
    drift_time_s: Distribution = _fixed(2.0)
    line_rel: Distribution = _dist("uniform", 0.0, 0.02)


@dataclass(frozen=True)
class ContaminationConfig(_StageConfig):
    """Low-frequency contamination background.

    Parameters
    ----------
    rel : Distribution
        Rms of the smooth background relative to the lattice signal (the standard deviation
        of the ideal image). 0 disables it.
    cutoff_A : Distribution
        Cut-off length [Å]: the background has no power at spatial frequencies above
        ``1/cutoff_A``.
    exponent : Distribution
        Power-law exponent β of the power spectrum ``P(k) ∝ (k² + k0²)^(−β/2)``.
    blob_density_per_nm2 : Distribution
        Mean number of amorphous blobs per nm² (Poisson). 0 disables them.
    blob_radius_A : Distribution
        Mean blob radius [Å] (each blob's radius is drawn in 0.6–1.4 × this).
    blob_rel : Distribution
        Blob height relative to the lattice signal.
    """

    _PREFIX: ClassVar[str] = "contamination"
    _LIMITS: ClassVar[dict] = {
        "rel": (0.0, None),
        "cutoff_A": (1e-3, None),
        "exponent": (0.0, 8.0),
        "blob_density_per_nm2": (0.0, None),
        "blob_radius_A": (0.1, None),
        "blob_rel": (0.0, None),
    }

    rel: Distribution = _dist("uniform", 0.0, 0.3)
    cutoff_A: Distribution = _dist("uniform", 15.0, 40.0)
    exponent: Distribution = _fixed(2.5)
    blob_density_per_nm2: Distribution = _fixed(0.0)
    blob_radius_A: Distribution = _fixed(8.0)
    blob_rel: Distribution = _fixed(0.5)


@dataclass(frozen=True)
class ShotNoiseConfig(_StageConfig):
    """Poisson counting noise.

    Parameters
    ----------
    mode : {"lambda", "dose", "none"}
        ``lambda``: expected counts per pixel at the image mean are ``lambda_counts`` (a
        noise study's λ). ``dose``: expected counts are ``image × I·τ/e × efficiency``
        with the probe current ``I``, the dwell time ``τ`` (``scan.dwell_time_us``) and the
        ideal image in units of the fraction of the beam the detector collects.
        ``none``: no shot noise (the image stays in the ideal image's units).
    lambda_counts : Distribution
        λ [counts per pixel at the image mean]; 0 means no shot noise for that sample.
    probe_current_pA : Distribution
        Probe current [pA] (``dose`` mode).
    detector_efficiency : Distribution
        Probability that an electron reaching the detector is counted (``dose`` mode).
    """

    _PREFIX: ClassVar[str] = "shot"
    _LIMITS: ClassVar[dict] = {
        "lambda_counts": (0.0, None),
        "probe_current_pA": (0.0, None),
        "detector_efficiency": (0.0, 1.0),
    }

    mode: str = "lambda"
    lambda_counts: Distribution = _dist("uniform", 5.0, 20.0)
    probe_current_pA: Distribution = _fixed(30.0)
    detector_efficiency: Distribution = _fixed(1.0)

    def __post_init__(self):
        if self.mode not in _SHOT_MODES:
            raise ValueError(f"mode: expected one of {_SHOT_MODES}, got {self.mode!r}")
        lam = self.lambda_counts
        if lam is None or (isinstance(lam, Distribution) and lam.args == (None,)):
            object.__setattr__(self, "lambda_counts", _fixed(0.0))  # λ = None means none
        super().__post_init__()


@dataclass(frozen=True)
class DetectorConfig(_StageConfig):
    """Detector electronics: read noise, gain, offset, saturation, quantisation.

    The output is ``y = gain·(n + σ·N(0, 1)) + offset`` with ``n`` the shot-noise counts,
    then clipped at ``saturation`` and, when ``bits`` is set, rounded and clipped to
    ``[0, 2^bits − 1]``.

    Parameters
    ----------
    gain : Distribution
        Output units per count.
    offset : Distribution
        Output offset (output units).
    read_noise : Distribution
        Read-noise σ, in counts (``read_noise_mode="counts"``) or relative to the image
        mean (``"relative"``, 2DIP-Net's Gaussian noise).
    read_noise_mode : {"counts", "relative"}
        ``counts``: σ in electron counts; without shot noise (λ = 0, unlimited dose) it is
        not applied, and the stored ``detector_read_noise`` is 0. ``relative``: σ as a
        fraction of the image mean, applied in any case.
    saturation : float or None
        Largest output value (output units), None for none.
    bits : {None, 8, 16}
        Quantise to unsigned integers of this many bits.
    """

    _PREFIX: ClassVar[str] = "detector"
    _LIMITS: ClassVar[dict] = {
        "gain": (1e-12, None),
        "offset": (None, None),
        "read_noise": (0.0, None),
    }

    gain: Distribution = _fixed(1.0)
    offset: Distribution = _fixed(0.0)
    read_noise: Distribution = _dist("uniform", 0.0, 1.0)
    read_noise_mode: str = "counts"
    saturation: float | None = None
    bits: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.read_noise_mode not in _READ_NOISE_MODES:
            raise ValueError(
                f"read_noise_mode: expected one of {_READ_NOISE_MODES}, got "
                f"{self.read_noise_mode!r}"
            )
        if self.saturation is not None and not (
            isinstance(self.saturation, int | float) and self.saturation > 0
        ):
            raise ValueError(f"saturation: must be a number > 0 or null, got {self.saturation!r}")
        if self.bits is not None and self.bits not in (8, 16):
            raise ValueError(f"bits: expected null, 8 or 16, got {self.bits!r}")


_STAGES: tuple[tuple[str, type[_StageConfig]], ...] = (
    ("scan", ScanConfig),
    ("drift", DriftConfig),
    ("jitter", JitterConfig),
    ("current", CurrentConfig),
    ("contamination", ContaminationConfig),
    ("shot", ShotNoiseConfig),
    ("detector", DetectorConfig),
)

DRAWN_PARAM_NAMES: tuple[str, ...] = tuple(
    f"{cls._PREFIX}_{name}" for _, cls in _STAGES for name in cls.drawn_fields()
)
"""Flat names of the per-sample values :meth:`AcquisitionConfig.draw` returns."""

DERIVED_PARAM_NAMES: tuple[str, ...] = (
    "scan_frame_time_s",
    "scan_max_shift_A",
    "contamination_n_blobs",
    "shot_counts_per_unit",
    "shot_mean_counts",
)
"""Flat names of the per-sample values :func:`apply_acquisition` adds: the frame time [s],
the largest probe displacement from the raster [Å], the number of blobs drawn, the
expected counts per unit of the ideal image and the expected counts at the image mean
(NaN without shot noise)."""

PARAM_NAMES: tuple[str, ...] = DRAWN_PARAM_NAMES + DERIVED_PARAM_NAMES
"""Every name in :attr:`Acquired.params`, in a stable order."""


@dataclass(frozen=True)
class AcquisitionConfig(Config):
    """All acquisition imperfections; each numeric field is fixed or drawn per sample.

    In YAML::

        acquisition:
          drift: {vx_A_per_s: {normal: [0, 0.3]}, nonlinear_A: 0.05}
          jitter: {line_x_A: {uniform: [0, 0.1]}}
          shot: {mode: dose, probe_current_pA: {normal: [30, 1]}}
          detector: {read_noise: 0.5, bits: 16}

    A stage is switched off by zero amplitudes (or ``shot.mode: none``).
    """

    scan: ScanConfig = field(default_factory=ScanConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    current: CurrentConfig = field(default_factory=CurrentConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    shot: ShotNoiseConfig = field(default_factory=ShotNoiseConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        for name, cls in _STAGES:
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls.from_dict(value, _prefix=name))
            elif not isinstance(value, cls):
                raise ValueError(f"{name}: expected a {cls.__name__} or a mapping")

    @staticmethod
    def param_names() -> tuple[str, ...]:
        """Every flat parameter name a sample reports (drawn, then derived)."""
        return PARAM_NAMES

    def _unused(self) -> set[str]:
        mode = self.shot.mode
        if mode == "lambda":
            return {"shot_probe_current_pA", "shot_detector_efficiency"}
        if mode == "dose":
            return {"shot_lambda_counts"}
        return {"shot_lambda_counts", "shot_probe_current_pA", "shot_detector_efficiency"}

    def draw(self, rng) -> dict[str, float]:
        """Draw one sample's values.

        Each parameter uses its own child generator (spawned in the order of
        :data:`DRAWN_PARAM_NAMES`), so changing one field from fixed to drawn leaves every
        other draw unchanged. Values the shot-noise mode does not use are NaN.

        Parameters
        ----------
        rng : Generator, int, SeedSequence or None

        Returns
        -------
        dict of str to float
            Keys :data:`DRAWN_PARAM_NAMES`.
        """
        children = iter(as_rng(rng).spawn(len(DRAWN_PARAM_NAMES)))
        unused = self._unused()
        out: dict[str, float] = {}
        for stage, _cls in _STAGES:
            cfg = getattr(self, stage)
            for name in cfg.drawn_fields():
                flat = f"{cfg._PREFIX}_{name}"
                child = next(children)
                out[flat] = math.nan if flat in unused else cfg.draw_one(name, child)
        return out

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Smallest and largest value of every drawn parameter."""
        out = {}
        for stage, _cls in _STAGES:
            cfg = getattr(self, stage)
            for name in cfg.drawn_fields():
                out[f"{cfg._PREFIX}_{name}"] = cfg.value_bounds(name)
        return out


def _as_config(config) -> AcquisitionConfig:
    if config is None:
        return AcquisitionConfig()
    if isinstance(config, AcquisitionConfig):
        return config
    if isinstance(config, Mapping):
        return AcquisitionConfig.from_dict(dict(config))
    raise ValueError(f"config: expected an AcquisitionConfig or a mapping, got {type(config)}")


def _get(params: Mapping[str, float], name: str) -> float:
    try:
        value = float(params[name])
    except KeyError:
        raise ValueError(f"params: missing {name!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"params: {name} must be a number, got {params[name]!r}") from None
    return value


def _get_nonneg(params: Mapping[str, float], name: str) -> float:
    value = _get(params, name)
    if not value >= 0:
        raise ValueError(f"params: {name} must be >= 0, got {value}")
    return value


def _ndimage(x):
    """``scipy.ndimage`` or ``cupyx.scipy.ndimage`` for the array ``x``."""
    return importlib.import_module(get_scipy_module(x).__name__ + ".ndimage")


def _check_image(image, name: str = "image"):
    if getattr(image, "ndim", None) != 2:
        raise ValueError(f"{name}: expected a 2-D array [H, W], got shape {np.shape(image)}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {image.shape}")


def _check_pixel_size(pixel_size_A: float) -> float:
    if not (isinstance(pixel_size_A, int | float) and pixel_size_A > 0):
        raise ValueError(f"pixel_size_A: must be > 0 Å, got {pixel_size_A!r}")
    return float(pixel_size_A)


def _check_shape(shape, name: str = "out_shape") -> tuple[int, int]:
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
    h, w = _check_shape(shape, "shape")
    dwell, fly = dwell_time_us * 1e-6, flyback_time_us * 1e-6
    line = w * dwell + fly
    return np.arange(h, dtype=np.float64)[:, None] * line + np.arange(w)[None, :] * dwell


def frame_time_s(shape, dwell_time_us: float, flyback_time_us: float) -> float:
    """Time from the first to the last pixel of the frame [s] (see :func:`pixel_times_s`)."""
    h, w = _check_shape(shape, "shape")
    dwell, fly = dwell_time_us * 1e-6, flyback_time_us * 1e-6
    return (h - 1) * (w * dwell + fly) + (w - 1) * dwell


def _gaussian_kernel_norm(sigma: float, truncate: float = 4.0) -> float:
    """Root of the sum of squares of scipy's normalised Gaussian kernel of ``sigma``."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2) if sigma > 0 else (x == 0).astype(np.float64)
    k /= k.sum()
    return float(np.sqrt(np.sum(k * k)))


def _smooth_path(times_s: np.ndarray, corr_time_s: float, n_paths: int, rng) -> np.ndarray:
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
    flat = t.ravel()
    return np.stack([np.interp(flat, grid, p).reshape(t.shape) for p in path])


def _clipped_normal(rng, shape) -> np.ndarray:
    return np.clip(rng.standard_normal(shape), -CLIP_SIGMA, CLIP_SIGMA)


# ---------------------------------------------------------------------------------------
# stage 2: scan distortion
# ---------------------------------------------------------------------------------------
def _scan_components(out_shape, params: Mapping[str, float], rng):
    """Smooth (drift) and jitter parts of the probe displacement [Å]: (sx, sy, jx, jy)."""
    h, w = _check_shape(out_shape)
    dwell = _get(params, "scan_dwell_time_us")
    fly = _get_nonneg(params, "scan_flyback_time_us")
    if not dwell > 0:
        raise ValueError(f"params: scan_dwell_time_us must be > 0, got {dwell}")
    vx, vy = _get(params, "drift_vx_A_per_s"), _get(params, "drift_vy_A_per_s")
    nl_amp = _get_nonneg(params, "drift_nonlinear_A")
    nl_tau = _get(params, "drift_nonlinear_time_s")
    lx, ly = _get_nonneg(params, "jitter_line_x_A"), _get_nonneg(params, "jitter_line_y_A")
    jp = _get_nonneg(params, "jitter_pixel_A")
    if nl_amp > 0 and not nl_tau > 0:
        raise ValueError(f"params: drift_nonlinear_time_s must be > 0, got {nl_tau}")

    r_nl, r_line, r_pix = as_rng(rng).spawn(3)
    t = pixel_times_s((h, w), dwell, fly)
    tc = t - t[-1, -1] / 2.0
    sx = vx * tc
    sy = vy * tc
    if nl_amp > 0:
        path = _smooth_path(t, nl_tau, 2, r_nl)
        sx += nl_amp * path[0]
        sy += nl_amp * path[1]
    jx = np.zeros((h, w))
    jy = np.zeros((h, w))
    if lx > 0 or ly > 0:
        lines = _clipped_normal(r_line, (2, h))
        jx += lx * lines[0][:, None]
        jy += ly * lines[1][:, None]
    if jp > 0:
        pix = _clipped_normal(r_pix, (2, h, w))
        jx += jp * pix[0]
        jy += jp * pix[1]
    return sx, sy, jx, jy


def scan_displacement(
    out_shape, params: Mapping[str, float], *, pixel_size_A: float, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Displacement of the probe from the nominal raster at every recorded pixel.

    ``d(r, c) = v·(t − T/2) + A·n(t) + line(r) + pixel(r, c)`` with ``t = t(r, c)`` from
    :func:`pixel_times_s`, ``T`` the frame time, ``n`` a unit-variance smooth random path
    (autocorrelation ``exp(−Δt²/4τ²)``), ``line`` per-line offsets and ``pixel`` per-pixel
    offsets. The x and y components of every random term are drawn independently (abTEM
    1.0's seeded scan noise draws the same for both). Every Gaussian term is clipped at
    ±4σ.

    Parameters
    ----------
    out_shape : (int, int)
        Recorded image shape ``(H, W)``.
    params : mapping
        Needs ``scan_dwell_time_us, scan_flyback_time_us, drift_vx_A_per_s,
        drift_vy_A_per_s, drift_nonlinear_A, drift_nonlinear_time_s, jitter_line_x_A,
        jitter_line_y_A, jitter_pixel_A``.
    pixel_size_A : float
        Pixel size [Å] (only validated here; the result is in Å).
    rng : Generator, int or SeedSequence
        Three children are spawned: non-linear path, line jitter, pixel jitter.

    Returns
    -------
    dx_A, dy_A : ndarray of float64, shape (H, W)
        Probe displacement along x (columns) and y (rows) [Å].
    """
    _check_pixel_size(pixel_size_A)
    sx, sy, jx, jy = _scan_components(out_shape, params, rng)
    return sx + jx, sy + jy


def _max_shift_A(values: Mapping[str, float], shape) -> float:
    """Bound of |displacement| [Å] for the given (largest) parameter values."""
    t_frame = frame_time_s(shape, values["scan_dwell_time_us"], values["scan_flyback_time_us"])
    common = CLIP_SIGMA * (values["drift_nonlinear_A"] + values["jitter_pixel_A"])
    bx = abs(values["drift_vx_A_per_s"]) * t_frame / 2 + CLIP_SIGMA * values["jitter_line_x_A"]
    by = abs(values["drift_vy_A_per_s"]) * t_frame / 2 + CLIP_SIGMA * values["jitter_line_y_A"]
    return max(bx, by) + common


_SCAN_KEYS = (
    "scan_dwell_time_us",
    "scan_flyback_time_us",
    "drift_vx_A_per_s",
    "drift_vy_A_per_s",
    "drift_nonlinear_A",
    "jitter_line_x_A",
    "jitter_line_y_A",
    "jitter_pixel_A",
)


def required_padding_px(config_or_params, shape, pixel_size_A: float) -> int:
    """Padding [px] the ideal image needs on each side for the scan distortion.

    The bound is ``max over x, y of |v|·T/2 + 4·(nonlinear + line jitter + pixel jitter)``
    (every Gaussian term is clipped at 4σ, so this is a guarantee), in pixels, rounded up,
    plus :data:`SPLINE_GUARD_PX` for the cubic spline.

    Parameters
    ----------
    config_or_params : AcquisitionConfig, mapping of config, or mapping of drawn values
        With a config the bound covers every value its distributions can draw (normals are
        clipped at ±4σ); with one sample's values (keys as :data:`DRAWN_PARAM_NAMES`) it is
        that sample's bound.
    shape : (int, int)
        Recorded image shape ``(H, W)``.
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    int
    """
    shape = _check_shape(shape, "shape")
    p = _check_pixel_size(pixel_size_A)
    if isinstance(config_or_params, Mapping) and "scan_dwell_time_us" in config_or_params:
        values = {k: _get(config_or_params, k) for k in _SCAN_KEYS}
    else:
        bounds = _as_config(config_or_params).bounds()
        values = {k: max(abs(bounds[k][0]), abs(bounds[k][1])) for k in _SCAN_KEYS}
    return int(math.ceil(_max_shift_A(values, shape) / p - 1e-9)) + SPLINE_GUARD_PX


@dataclass(frozen=True)
class ScanMapping:
    """The probe path of one recorded frame: recorded pixel → position in the ideal image.

    Recorded pixel (r, c) sampled the ideal image at row ``r + pad + dy_px[r, c]`` and
    column ``c + pad + dx_px[r, c]``, where the displacement is the sum of a smooth part
    (linear and non-linear drift, continuous in time) and a jitter part (per-line and
    per-pixel offsets, discontinuous between lines).

    Attributes
    ----------
    smooth_dx_px, smooth_dy_px : ndarray of float64, shape (H, W)
        Drift part of the probe displacement along x (columns) and y (rows) [px], host.
    jitter_dx_px, jitter_dy_px : ndarray of float64, shape (H, W)
        Jitter part [px], host.
    pad : int
        Padding of the ideal image on each side [px].
    pixel_size_A : float
        Pixel size [Å].
    label_sigma_A : float
        Width [Å] of the Gaussian column used by :func:`map_positions`.
    """

    smooth_dx_px: np.ndarray
    smooth_dy_px: np.ndarray
    jitter_dx_px: np.ndarray
    jitter_dy_px: np.ndarray
    pad: int
    pixel_size_A: float
    label_sigma_A: float = 0.5

    @property
    def dx_px(self) -> np.ndarray:
        """Total displacement along x [px]."""
        return self.smooth_dx_px + self.jitter_dx_px

    @property
    def dy_px(self) -> np.ndarray:
        """Total displacement along y [px]."""
        return self.smooth_dy_px + self.jitter_dy_px

    @property
    def out_shape(self) -> tuple[int, int]:
        return tuple(self.smooth_dx_px.shape)

    @property
    def has_jitter(self) -> bool:
        return bool(self.jitter_dx_px.any() or self.jitter_dy_px.any())

    def max_shift_px(self) -> float:
        """Largest probe displacement from the raster [px]."""
        return float(max(np.abs(self.dx_px).max(), np.abs(self.dy_px).max()))


def distort_scan(
    ideal,
    out_shape,
    pad: int,
    params: Mapping[str, float],
    *,
    pixel_size_A: float,
    rng,
    label_sigma_A: float = 0.5,
):
    """Record the ideal image along the distorted probe path.

    Recorded pixel (r, c) is the ideal image interpolated (cubic spline,
    ``map_coordinates`` order 3) at the probe's true position, the raster position plus
    :func:`scan_displacement`. The ideal image must extend ``pad`` pixels beyond the
    recorded field on each side, and ``pad`` must exceed the largest displacement by 2 px,
    so nothing wraps or is extrapolated (:func:`required_padding_px` adds a wider margin).

    Parameters
    ----------
    ideal : ndarray (NumPy or CuPy), shape (H + 2·pad, W + 2·pad)
        Ideal image; its pixel (i, j) is the probe position (x0 + (j − pad)·p,
        y0 + (i − pad)·p).
    out_shape : (int, int)
        Recorded image shape ``(H, W)``.
    pad : int
        Padding of ``ideal`` on each side [px].
    params : mapping
        Drawn values (see :func:`scan_displacement`).
    pixel_size_A : float
        Pixel size [Å] of both images.
    rng : Generator, int or SeedSequence
    label_sigma_A : float
        Stored in the mapping for :func:`map_positions` [Å].

    Returns
    -------
    recorded : ndarray, shape (H, W), float64, on the device of ``ideal``
    mapping : ScanMapping

    Raises
    ------
    ValueError
        If shapes disagree or ``pad`` is too small for this sample's displacement.
    """
    _check_image(ideal, "ideal")
    h, w = _check_shape(out_shape)
    p = _check_pixel_size(pixel_size_A)
    if isinstance(pad, bool) or not isinstance(pad, int | np.integer) or pad < 0:
        raise ValueError(f"pad: expected an integer >= 0, got {pad!r}")
    pad = int(pad)
    if tuple(ideal.shape) != (h + 2 * pad, w + 2 * pad):
        raise ValueError(
            f"ideal: shape {tuple(ideal.shape)} != out_shape + 2·pad = {(h + 2 * pad, w + 2 * pad)}"
        )
    if not label_sigma_A > 0:
        raise ValueError(f"label_sigma_A: must be > 0 Å, got {label_sigma_A!r}")
    xp = get_array_module(ideal)
    sx, sy, jx, jy = _scan_components((h, w), params, rng)
    mapping = ScanMapping(sx / p, sy / p, jx / p, jy / p, pad, p, float(label_sigma_A))
    shift = mapping.max_shift_px()
    if shift == 0.0:
        recorded = xp.asarray(ideal[pad : pad + h, pad : pad + w], dtype=xp.float64).copy()
        return recorded, mapping
    if shift > pad - 2:
        need = int(math.ceil(shift)) + SPLINE_GUARD_PX
        raise ValueError(
            f"pad: {pad} px is too small for this sample's scan displacement of {shift:.2f} px "
            f"(use required_padding_px; at least {need} px recommended)"
        )
    rows = np.arange(h, dtype=np.float64)[:, None] + pad + mapping.dy_px
    cols = np.arange(w, dtype=np.float64)[None, :] + pad + mapping.dx_px
    coords = xp.asarray(np.stack([rows, cols]))
    recorded = _ndimage(ideal).map_coordinates(
        xp.asarray(ideal, dtype=xp.float64), coords, order=3, mode="nearest", prefilter=True
    )
    return recorded, mapping


def _bilinear(field: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``field`` at (r, c), extrapolated linearly from the edge
    cells beyond the grid."""
    h, w = field.shape
    r0 = np.clip(np.floor(r).astype(np.intp), 0, max(h - 2, 0))
    c0 = np.clip(np.floor(c).astype(np.intp), 0, max(w - 2, 0))
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    fr = r - r0 if h > 1 else np.zeros_like(r)
    fc = c - c0 if w > 1 else np.zeros_like(c)
    top = field[r0, c0] * (1 - fc) + field[r0, c1] * fc
    bot = field[r1, c0] * (1 - fc) + field[r1, c1] * fc
    return top * (1 - fr) + bot * fr


def map_positions(rows_ideal, cols_ideal, mapping: ScanMapping, *, chunk: int = 2048):
    """Where columns of the ideal image appear in the recorded image.

    The probe path is ``p(r, c) = (r, c) + pad + s(r, c) + j(r, c)`` with ``s`` the smooth
    drift part and ``j`` the jitter part of the displacement (:class:`ScanMapping`).

    1. *Drift only*: the label is the exact solution of ``(r, c) + pad + s(r, c) = q``
       for the column at ideal-image position ``q``, found by fixed-point iteration
       ``(r, c) ← q − pad − s(r, c)`` on the bilinearly interpolated field (it contracts
       by ``|∇s|``, ≪ 1 for any realistic drift; 10 iterations). This is where the
       column's centre is sampled, i.e. the maximum of its distorted image.
    2. *With jitter* the map is discontinuous between lines (and between pixels): a column
       appears on several lines at slightly different x, and no single point maps to q.
       The label is then the intensity-weighted centre of a Gaussian column of width
       ``σ = mapping.label_sigma_A`` seen through the path,
       ``Σ w·(r, c) / Σ w`` with ``w = exp(−|p(r, c) − q|² / 2σ²)`` over the recorded pixels
       within ``4σ + max|j|``, where the drift part is replaced by its first-order Taylor
       expansion about the solution of step 1. The centre is thus the average over the
       lines that cross the column, weighted by how much of the column each line sees —
       what a peak finder (after smoothing over about a line) or a network sees — and it
       reduces to step 1 exactly when the jitter is zero. Windows reaching beyond the
       frame use the edge lines' jitter, so labels near the edges are not pulled inwards.

    Parameters
    ----------
    rows_ideal, cols_ideal : array_like of float, shape (N,)
        Column positions in ideal-image pixels (sub-pixel; row = y, col = x).
    mapping : ScanMapping
        From :func:`distort_scan`.
    chunk : int
        Columns processed at once in step 2 (memory ~ chunk·(10σ/p)²·8 bytes per array).

    Returns
    -------
    rows, cols : ndarray of float64, shape (N,)
        Positions in recorded-image pixels (NumPy, or CuPy when the inputs are CuPy).
    inside : ndarray of bool, shape (N,)
        The column lies on the recorded field (``−0.5 ≤ row < H − 0.5`` and likewise for
        col, i.e. within the area of the recorded pixels).
    """
    xp = get_array_module(rows_ideal)
    rq = np.asarray(to_numpy(rows_ideal), dtype=np.float64).ravel()
    cq = np.asarray(to_numpy(cols_ideal), dtype=np.float64).ravel()
    if rq.shape != cq.shape:
        raise ValueError(f"cols_ideal: shape {cq.shape} differs from rows_ideal {rq.shape}")
    if not (np.all(np.isfinite(rq)) and np.all(np.isfinite(cq))):
        raise ValueError("rows_ideal: positions must be finite")
    h, w = mapping.out_shape
    sdx, sdy = mapping.smooth_dx_px, mapping.smooth_dy_px
    rn, cn = rq - mapping.pad, cq - mapping.pad
    # 1. exact inverse of the smooth (drift) map
    rows, cols = rn.copy(), cn.copy()
    for _ in range(10):
        rows = rn - _bilinear(sdy, rows, cols)
        cols = cn - _bilinear(sdx, rows, cols)
    if mapping.has_jitter and rows.size:
        rows, cols = _jitter_centroid(rows, cols, rn, cn, mapping, max(int(chunk), 1))
    inside = (rows >= -0.5) & (rows < h - 0.5) & (cols >= -0.5) & (cols < w - 0.5)
    if xp is not np:  # pragma: no cover - GPU only
        return xp.asarray(rows), xp.asarray(cols), xp.asarray(inside)
    return rows, cols, inside


def _jitter_centroid(r0, c0, rn, cn, mapping: ScanMapping, chunk: int):
    """Step 2 of :func:`map_positions`: intensity-weighted centres with jitter."""
    h, w = mapping.out_shape
    sdx, sdy = mapping.smooth_dx_px, mapping.smooth_dy_px
    jdx, jdy = mapping.jitter_dx_px.ravel(), mapping.jitter_dy_px.ravel()
    # Jacobian of the smooth part at the drift-only solution (central differences)
    e = 0.5
    gyr = (_bilinear(sdy, r0 + e, c0) - _bilinear(sdy, r0 - e, c0)) / (2 * e)
    gyc = (_bilinear(sdy, r0, c0 + e) - _bilinear(sdy, r0, c0 - e)) / (2 * e)
    gxr = (_bilinear(sdx, r0 + e, c0) - _bilinear(sdx, r0 - e, c0)) / (2 * e)
    gxc = (_bilinear(sdx, r0, c0 + e) - _bilinear(sdx, r0, c0 - e)) / (2 * e)
    sig = mapping.label_sigma_A / mapping.pixel_size_A
    jmax = float(max(np.abs(jdx).max(), np.abs(jdy).max()))
    half = int(math.ceil(4.0 * sig + jmax))
    offs = np.arange(-half, half + 1)
    rows, cols = np.empty_like(r0), np.empty_like(c0)
    for s in range(0, r0.size, chunk):
        sl = slice(s, s + chunk)
        rc, cc0 = r0[sl], c0[sl]
        rr = np.rint(rc).astype(np.intp)[:, None] + offs  # (n, m)
        cc = np.rint(cc0).astype(np.intp)[:, None] + offs
        flat = np.clip(rr, 0, h - 1)[:, :, None] * w + np.clip(cc, 0, w - 1)[:, None, :]
        du = (rr - rc[:, None])[:, :, None]  # row offset from the drift-only solution
        dv = (cc - cc0[:, None])[:, None, :]
        ey = jdy.take(flat)
        ey += du * (1 + gyr[sl, None, None]) + dv * gyc[sl, None, None]
        ex = jdx.take(flat)
        ex += du * gxr[sl, None, None] + dv * (1 + gxc[sl, None, None])
        ey *= ey
        ex *= ex
        ey += ex
        ey *= -0.5 / (sig * sig)
        wgt = np.exp(ey, out=ey)
        tot = wgt.sum(axis=(1, 2))
        ok = tot > 1e-12
        safe = np.where(ok, tot, 1.0)
        r_new = np.einsum("nij,ni->n", wgt, rr.astype(np.float64)) / safe
        c_new = np.einsum("nij,nj->n", wgt, cc.astype(np.float64)) / safe
        rows[sl] = np.where(ok, r_new, rc)
        cols[sl] = np.where(ok, c_new, cc0)
    return rows, cols


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
    _check_image(image)
    xp = get_array_module(image)
    a_d = _get_nonneg(params, "current_drift_rel")
    a_l = _get_nonneg(params, "current_line_rel")
    if a_d > 0.2 or a_l > 0.2:
        raise ValueError(
            f"params: current_drift_rel and current_line_rel must be <= 0.2, got {a_d}, {a_l}"
        )
    r_drift, r_line = as_rng(rng).spawn(2)
    h, w = image.shape
    factor = np.ones((h, w), dtype=np.float64)
    if a_d > 0:
        tau = _get(params, "current_drift_time_s")
        if not tau > 0:
            raise ValueError(f"params: current_drift_time_s must be > 0, got {tau}")
        t = pixel_times_s(
            (h, w), _get(params, "scan_dwell_time_us"), _get(params, "scan_flyback_time_us")
        )
        factor *= 1.0 + a_d * _smooth_path(t, tau, 1, r_drift)[0]
    if a_l > 0:
        factor *= (1.0 + a_l * _clipped_normal(r_line, h))[:, None]
    return xp.asarray(image, dtype=xp.float64) * xp.asarray(factor)


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
    h, w = _check_shape(shape, "shape")
    p = _check_pixel_size(pixel_size_A)
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
    h, w = _check_shape(shape, "shape")
    p = _check_pixel_size(pixel_size_A)
    rel = _get_nonneg(params, "contamination_rel")
    density = _get_nonneg(params, "contamination_blob_density_per_nm2")
    blob_rel = _get_nonneg(params, "contamination_blob_rel")
    r_field, r_blob = as_rng(rng).spawn(2)
    out = np.zeros((h, w), dtype=np.float64)
    if rel > 0 and lattice_std > 0:
        g = smooth_background(
            (h, w),
            _get(params, "contamination_cutoff_A"),
            _get(params, "contamination_exponent"),
            pixel_size_A=p,
            rng=r_field,
        )
        out += rel * lattice_std * (g - g.min())
    n_blobs = 0
    if density > 0 and blob_rel > 0 and lattice_std > 0:
        radius = _get(params, "contamination_blob_radius_A")
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


def add_contamination(image, params: Mapping[str, float], *, pixel_size_A: float, rng):
    """Add the contamination background of :func:`contamination_background` to ``image``.

    The lattice signal is the standard deviation of ``image``.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), shape (H, W)
        Ideal image (the padded one, in the chain).
    params : mapping
        See :func:`contamination_background`.
    pixel_size_A : float
        Pixel size [Å].
    rng : Generator, int or SeedSequence

    Returns
    -------
    ndarray, float64, same shape and device as ``image``
    """
    _check_image(image)
    xp = get_array_module(image)
    bg = contamination_background(
        image.shape, params, pixel_size_A=pixel_size_A, rng=rng, lattice_std=float(xp.std(image))
    )
    return xp.asarray(image, dtype=xp.float64) + xp.asarray(bg.field)


# ---------------------------------------------------------------------------------------
# stages 4 and 5: shot noise, detector
# ---------------------------------------------------------------------------------------
def _device_generator(xp, rng):
    """A generator drawing on ``xp``'s device, seeded from the host ``rng``."""
    rng = as_rng(rng)
    if xp is np:
        return rng
    seed = int(rng.integers(0, 2**63 - 1))  # pragma: no cover - GPU only
    return xp.random.RandomState(seed)  # pragma: no cover - GPU only


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
    if mode not in _SHOT_MODES:
        raise ValueError(f"mode: expected one of {_SHOT_MODES}, got {mode!r}")
    if mode == "none":
        return math.nan
    if mode == "lambda":
        lam = _get(params, "shot_lambda_counts")
        if math.isnan(lam) or lam == 0:
            return math.nan
        if lam < 0:
            raise ValueError(f"params: shot_lambda_counts must be >= 0, got {lam}")
        mean = float(get_array_module(image).mean(image))
        if not mean > 0:
            raise ValueError(f"image: mean must be > 0 for lambda shot noise, got {mean}")
        return lam / mean
    current = _get_nonneg(params, "shot_probe_current_pA")
    eff = _get_nonneg(params, "shot_detector_efficiency")
    dwell = _get_nonneg(params, "scan_dwell_time_us")
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
        Drawn on the image's device (CuPy's generator on a GPU).
    mode : {"lambda", "dose", "none"}

    Returns
    -------
    ndarray of float32
        Counts (integers stored as float); a float32 copy of ``image`` when there is no shot
        noise (mode ``none`` or λ = 0).
    """
    _check_image(image)
    xp = get_array_module(image)
    k = shot_counts_per_unit(image, params, mode=mode)
    if math.isnan(k):
        return xp.asarray(image, dtype=xp.float32).copy()
    lam = xp.maximum(xp.asarray(image, dtype=xp.float64) * k, 0.0)
    counts = _device_generator(xp, rng).poisson(lam)
    return counts.astype(xp.float32)


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
    _check_image(image)
    if read_noise_mode not in _READ_NOISE_MODES:
        raise ValueError(
            f"read_noise_mode: expected one of {_READ_NOISE_MODES}, got {read_noise_mode!r}"
        )
    if bits is not None and bits not in (8, 16):
        raise ValueError(f"bits: expected None, 8 or 16, got {bits!r}")
    if saturation is not None and not saturation > 0:
        raise ValueError(f"saturation: must be > 0 or None, got {saturation!r}")
    xp = get_array_module(image)
    gain = _get(params, "detector_gain")
    if not gain > 0:
        raise ValueError(f"params: detector_gain must be > 0, got {gain}")
    offset = _get(params, "detector_offset")
    sigma = _get_nonneg(params, "detector_read_noise")
    y = xp.asarray(image, dtype=xp.float64)
    if read_noise_mode == "relative":
        sigma = sigma * float(xp.mean(y))
    if sigma > 0:
        y = y + sigma * _device_generator(xp, rng).standard_normal(y.shape)
    y = gain * y + offset
    if saturation is not None:
        y = xp.minimum(y, float(saturation))
    if bits is not None:
        y = xp.clip(xp.rint(y), 0.0, float(2**bits - 1))
    return y.astype(xp.float32)


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
    cfg = _as_config(config)
    _check_image(ideal, "ideal")
    p = _check_pixel_size(pixel_size_A)
    if isinstance(pad, bool) or not isinstance(pad, int | np.integer) or pad < 0:
        raise ValueError(f"pad: expected an integer >= 0, got {pad!r}")
    pad = int(pad)
    if out_shape is None:
        out_shape = (ideal.shape[0] - 2 * pad, ideal.shape[1] - 2 * pad)
    h, w = _check_shape(out_shape)
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
