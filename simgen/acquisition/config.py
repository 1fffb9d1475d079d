"""Settings of every acquisition stage and of the whole chain (:class:`AcquisitionConfig`).

The stage configs are listed in the order their parameters are drawn (which fixes the
stream of random numbers per sample; do not reorder), not the order the chain applies them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from simgen.configbase import Config
from simgen.distributions import Distribution, as_rng

SHOT_MODES = ("none", "lambda", "dose")
READ_NOISE_MODES = ("counts", "relative")


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
        if self.mode not in SHOT_MODES:
            raise ValueError(f"mode: expected one of {SHOT_MODES}, got {self.mode!r}")
        lam = self.lambda_counts
        if lam is None or (isinstance(lam, Distribution) and lam.args == (None,)):
            object.__setattr__(self, "lambda_counts", _fixed(0.0))  # λ = None means none
        super().__post_init__()


@dataclass(frozen=True)
class DetectorConfig(_StageConfig):
    """Detector electronics and the file export: read noise, response, gain, offset,
    saturation, quantisation, display-contrast export.

    The output is ``y = gain·R(n + σ·N(0, 1)) + offset`` with ``n`` the shot-noise counts
    and ``R(x) = m·sign(x)·|x/m|^γ`` the detector's non-linear response about the image
    mean ``m`` (γ = 1: linear), then clipped at ``saturation`` and, when ``bits`` is set,
    rounded and clipped to ``[0, 2^bits − 1]``. With ``export_bits`` the result is then
    written as a microscope program exports an image with its display contrast: the
    ``stretch_low_percent`` and ``stretch_high_percent`` tails clipped, the rest stretched
    onto ``[0, 2^export_bits − 1]`` and rounded (an 8-bit TIFF "as displayed").

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
    gamma : Distribution
        Exponent γ of the detector response (1: linear; < 1 compresses bright columns,
        lowering the metal/chalcogen contrast; > 1 raises it).
    stretch_low_percent, stretch_high_percent : Distribution
        Percent of the darkest and brightest pixels clipped by the export [%].
    export_bits : {None, 8, 16}
        Export with display contrast to unsigned integers of this many bits (None: the
        detector output as it is).
    smoothing_px : Distribution
        Standard deviation [px] of a Gaussian smoothing of the recorded image before the
        response and export (0: none): images that were filtered or upsampled after the
        acquisition have spatially correlated noise (``simgen match`` measures it).
    """

    _PREFIX: ClassVar[str] = "detector"
    # new fields go last: each drawn field has its own random stream, spawned in this order
    _LIMITS: ClassVar[dict] = {
        "gain": (1e-12, None),
        "offset": (None, None),
        "read_noise": (0.0, None),
        "gamma": (0.2, 5.0),
        "stretch_low_percent": (0.0, 49.0),
        "stretch_high_percent": (0.0, 49.0),
        "smoothing_px": (0.0, 10.0),
    }

    gain: Distribution = _fixed(1.0)
    offset: Distribution = _fixed(0.0)
    read_noise: Distribution = _dist("uniform", 0.0, 1.0)
    read_noise_mode: str = "counts"
    saturation: float | None = None
    bits: int | None = None
    gamma: Distribution = _fixed(1.0)
    stretch_low_percent: Distribution = _fixed(0.0)
    stretch_high_percent: Distribution = _fixed(0.0)
    export_bits: int | None = None
    smoothing_px: Distribution = _fixed(0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.read_noise_mode not in READ_NOISE_MODES:
            raise ValueError(
                f"read_noise_mode: expected one of {READ_NOISE_MODES}, got {self.read_noise_mode!r}"
            )
        if self.saturation is not None and not (
            isinstance(self.saturation, int | float) and self.saturation > 0
        ):
            raise ValueError(f"saturation: must be a number > 0 or null, got {self.saturation!r}")
        if self.bits is not None and self.bits not in (8, 16):
            raise ValueError(f"bits: expected null, 8 or 16, got {self.bits!r}")
        if self.export_bits is not None and self.export_bits not in (8, 16):
            raise ValueError(f"export_bits: expected null, 8 or 16, got {self.export_bits!r}")


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


def as_config(config) -> AcquisitionConfig:
    if config is None:
        return AcquisitionConfig()
    if isinstance(config, AcquisitionConfig):
        return config
    if isinstance(config, Mapping):
        return AcquisitionConfig.from_dict(dict(config))
    raise ValueError(f"config: expected an AcquisitionConfig or a mapping, got {type(config)}")
