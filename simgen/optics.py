"""Probe-forming optics of the microscope and the HAADF probe intensity.

:class:`OpticsConfig` holds every optical parameter as a
:class:`~simgen.distributions.Distribution` (fixed, or drawn per sample); its
:meth:`OpticsConfig.draw` returns the values of one sample as a flat ``dict`` of floats,
the form :func:`simgen.simulation.simulate` takes and the store records per sample.

Conventions (all lengths in Å, angles of the beam in mrad, azimuths in degrees):

* Aberrations are abTEM's polar coefficients (Krivanek notation):
  ``chi(k) = 2 pi / lambda * (1/2 a^2 (C10 + C12 cos 2(phi - phi12))
  + 1/3 a^3 (C21 cos(phi - phi21) + C23 cos 3(phi - phi23)) + 1/4 a^4 C30 + 1/6 a^6 C50)``
  with ``a`` the scattering angle. ``C10 = -defocus``; ``C30`` is Cs. The azimuths
  ``phi12, phi21, phi23`` are given in degrees here and converted to radians for abTEM.
* ``source_size_A`` is the FWHM of the Gaussian image of the source in the specimen plane
  (Kirkland's ``incostem``/``autostem`` convention); it blurs the probe intensity.
* ``focal_spread_A`` is the standard deviation of the Gaussian spread of defocus
  (chromatic aberration × energy spread); the probe intensity is averaged over it with a
  Gauss–Hermite quadrature. abTEM's ``CTF(focal_spread=...)`` is the 1/e half-width,
  ``sqrt(2)`` times this value.

:func:`probe_intensity` returns ``|P(r)|^2`` of abTEM's aberrated probe on a grid that the
caller chooses, averaged over focal spread and blurred by the source size; it is the
kernel of the incoherent model in :mod:`simgen.simulation`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from simgen.backend import get_array_module, resolve_device
from simgen.configbase import Config
from simgen.distributions import Distribution

__all__ = [
    "FWHM_TO_SIGMA",
    "OPTICS_KEYS",
    "OpticsConfig",
    "STEM_LEARNING_PRESET",
    "abtem_aberrations",
    "focal_quadrature",
    "geometric_blur_A",
    "ideal_optics",
    "nyquist_sampling_A",
    "optics_values",
    "probe_intensity",
    "wavelength_A",
]

# (field name, lowest allowed value, highest allowed value); None = unbounded.
_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "energy_kV": (1.0, 1000.0),
    "semiangle_mrad": (1.0, 200.0),
    "C10_A": (None, None),
    "C12_A": (None, None),
    "phi12_deg": (None, None),
    "C21_A": (None, None),
    "phi21_deg": (None, None),
    "C23_A": (None, None),
    "phi23_deg": (None, None),
    "C30_A": (None, None),
    "C50_A": (None, None),
    "source_size_A": (0.0, 5.0),
    "focal_spread_A": (0.0, 500.0),
    "haadf_inner_mrad": (0.0, 1000.0),
    "haadf_outer_mrad": (0.0, 1000.0),
    "pixel_size_A": (1e-3, 5.0),
    # last: a field added here must not change the draws of the fields before it
    "z_exponent_shift": (-1.0, 1.5),
}

#: Names of the values :meth:`OpticsConfig.draw` returns, in draw order.
OPTICS_KEYS: tuple[str, ...] = tuple(_LIMITS)

_MM = 1e7  # Å per mm

#: Standard deviation of a Gaussian per unit FWHM, ``1 / (2 sqrt(2 ln 2))``.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _fixed(value: float) -> Distribution:
    return Distribution("fixed", (float(value),))


@dataclasses.dataclass(frozen=True)
class OpticsConfig(Config):
    """Optical parameters of one STEM acquisition, each fixed or drawn per sample.

    Every field accepts a number (fixed) or a distribution mapping such as
    ``{"normal": [0, 10]}``, ``{"uniform": [a, b]}`` or ``{"loguniform": [a, b]}`` (see
    :mod:`simgen.distributions`). Normal draws are clipped to the field's valid range.

    Parameters
    ----------
    energy_kV : Distribution
        Acceleration voltage [kV] (default 80; TMDs are imaged at 60–80 kV).
    semiangle_mrad : Distribution
        Convergence semi-angle of the probe-forming aperture [mrad] (default 30).
    C10_A : Distribution
        C10 = −defocus [Å] (default 0).
    C12_A, phi12_deg : Distribution
        Twofold astigmatism magnitude [Å] and azimuth [deg].
    C21_A, phi21_deg : Distribution
        Axial coma magnitude [Å] and azimuth [deg].
    C23_A, phi23_deg : Distribution
        Threefold astigmatism magnitude [Å] and azimuth [deg].
    C30_A : Distribution
        Spherical aberration Cs [Å] (1 mm = 1e7 Å).
    C50_A : Distribution
        Fifth-order spherical aberration [Å].
    source_size_A : Distribution
        FWHM of the effective source in the specimen plane [Å] (default 0.5).
    focal_spread_A : Distribution
        Standard deviation of the defocus spread [Å] (default 0).
    haadf_inner_mrad, haadf_outer_mrad : Distribution
        Inner and outer collection semi-angles of the annular detector [mrad]
        (default 60–200).
    pixel_size_A : Distribution
        Scan step = image pixel size [Å/px] (default 0.2).
    z_exponent_shift : Distribution
        Change ``δ`` of the Z exponent of HAADF contrast (default 0: the calibrated
        physics). The incoherent model scales each atom's scattering by
        ``(Z / 42) ** δ`` (:meth:`simgen.incoherent.Calibration.with_z_exponent_shift`):
        ``δ > 0`` brightens the metal against the chalcogen (δ ≈ 0.75 gives the Z² point-sum
        model's W/Se₂ contrast of 2.4 instead of 1.3), while the ratio of one to two
        chalcogen atoms stays that of the physics. A contrast augmentation beyond real
        detector geometries, for models that must survive another simulator or microscope.
        The abTEM models (``prism``, ``multislice``) take it as a factor ``(Z/42)^(δ/2)`` on
        each element's projected potential (:func:`simgen.transmission.
        z_exponent_potential_scale`; about 0.6 of the incoherent model's contrast change in
        WSe2). In [−1, 1.5].
    """

    energy_kV: Distribution = _fixed(80.0)
    semiangle_mrad: Distribution = _fixed(30.0)
    C10_A: Distribution = _fixed(0.0)
    C12_A: Distribution = _fixed(0.0)
    phi12_deg: Distribution = _fixed(0.0)
    C21_A: Distribution = _fixed(0.0)
    phi21_deg: Distribution = _fixed(0.0)
    C23_A: Distribution = _fixed(0.0)
    phi23_deg: Distribution = _fixed(0.0)
    C30_A: Distribution = _fixed(0.0)
    C50_A: Distribution = _fixed(0.0)
    source_size_A: Distribution = _fixed(0.5)
    focal_spread_A: Distribution = _fixed(0.0)
    haadf_inner_mrad: Distribution = _fixed(60.0)
    haadf_outer_mrad: Distribution = _fixed(200.0)
    pixel_size_A: Distribution = _fixed(0.2)
    z_exponent_shift: Distribution = _fixed(0.0)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Distribution):
                object.__setattr__(self, f.name, Distribution.parse(value, f.name))
        for name, (low, high) in _LIMITS.items():
            dist: Distribution = getattr(self, name)
            if dist.kind == "choice" and not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in dist.args
            ):
                raise ValueError(f"{name}: choices must be numbers, got {dist.to_config()}")
            if dist.kind == "fixed" and (
                isinstance(dist.args[0], bool) or not isinstance(dist.args[0], int | float)
            ):
                raise ValueError(f"{name}: expected a number, got {dist.args[0]!r}")
            dist.check_range(name, low, high)
        inner_hi = self._upper("haadf_inner_mrad")
        outer_lo = self._lower("haadf_outer_mrad")
        if not inner_hi < outer_lo:
            raise ValueError(
                "haadf_inner_mrad: the inner angle must stay below haadf_outer_mrad, got "
                f"inner {self.haadf_inner_mrad.to_config()} and outer "
                f"{self.haadf_outer_mrad.to_config()}"
            )

    # -- helpers ----------------------------------------------------------------------
    def _lower(self, name: str) -> float:
        d: Distribution = getattr(self, name)
        return d.args[0] if d.kind == "normal" else d.bounds()[0]

    def _upper(self, name: str) -> float:
        d: Distribution = getattr(self, name)
        return d.args[0] if d.kind == "normal" else d.bounds()[1]

    def draw(self, rng=None) -> dict[str, float]:
        """Draw the values of one sample.

        Parameters
        ----------
        rng : Generator, int, SeedSequence or None
            Random source; fixed fields consume no random numbers.

        Returns
        -------
        dict
            ``{name: float}`` for every name in :data:`OPTICS_KEYS`.
        """
        from simgen.distributions import as_rng

        rng = as_rng(rng)
        out: dict[str, float] = {}
        for name, (low, high) in _LIMITS.items():
            if name == "haadf_outer_mrad":
                low = out["haadf_inner_mrad"] + 1e-6
            if name in ("energy_kV", "semiangle_mrad", "pixel_size_A"):
                low = max(low or 0.0, 1e-6)
            out[name] = float(getattr(self, name).draw(rng, low=low, high=high))
        return out

    def nominal(self) -> dict[str, float]:
        """Centre values (fixed value, mean, mid-range, geometric mean, first choice)."""
        return {name: float(getattr(self, name).centre()) for name in _LIMITS}

    @classmethod
    def stem_learning(cls) -> OpticsConfig:
        """Ranges of Lee et al.'s public ``stem-learning`` generator (see REFERENCE.md).

        80 kV, 25.2 mrad, ADF 63–200 mrad, 0.2074 Å pixels; per image (normal draws,
        ``mean ± std``): Cs 0.0003 ± 0.0005 mm, defocus 0 ± 10 Å, C12 1e-6 ± 1e-6 mm,
        C21 = 3 × (10e-6 ± 20e-6) mm, C23 25e-6 ± 50e-6 mm, source size 1.0 ± 0.05 Å FWHM.
        Azimuths as in its ``params.py``: C12 and C21 uniform; the Cartesian angle of C23
        normal(90°, 7.5°), i.e. ``phi23`` normal(30°, 2.5°) in polar form.
        """
        return cls.from_dict(STEM_LEARNING_PRESET)


#: The :meth:`OpticsConfig.stem_learning` preset as a plain mapping (YAML-ready).
STEM_LEARNING_PRESET: dict[str, Any] = {
    "energy_kV": 80.0,
    "semiangle_mrad": 25.2,
    "C10_A": {"normal": [0.0, 10.0]},
    "C12_A": {"normal": [1e-6 * _MM, 1e-6 * _MM]},
    "phi12_deg": {"uniform": [0.0, 180.0]},
    "C21_A": {"normal": [3 * 10e-6 * _MM, 3 * 20e-6 * _MM]},
    "phi21_deg": {"uniform": [0.0, 360.0]},
    "C23_A": {"normal": [25e-6 * _MM, 50e-6 * _MM]},
    "phi23_deg": {"normal": [30.0, 2.5]},
    "C30_A": {"normal": [0.0003 * _MM, 0.0005 * _MM]},
    "C50_A": 0.0,
    "source_size_A": {"normal": [1.0, 0.05]},
    "focal_spread_A": 0.0,
    "haadf_inner_mrad": 63.0,
    "haadf_outer_mrad": 200.0,
    "pixel_size_A": 0.2074,
}


# -- plain functions of drawn values ---------------------------------------------------
def optics_values(optics: Mapping[str, float] | OpticsConfig | None, rng=None) -> dict:
    """Complete a mapping of optics values with the defaults and check it.

    Parameters
    ----------
    optics : mapping, OpticsConfig or None
        Drawn values (``OpticsConfig.draw`` output, possibly partial), or a config to
        draw from with ``rng``; None means the defaults.
    rng : Generator, int or None
        Used only when ``optics`` is an :class:`OpticsConfig`.

    Returns
    -------
    dict
        Every key of :data:`OPTICS_KEYS` as a float.
    """
    if isinstance(optics, OpticsConfig):
        return optics.draw(rng)
    values = OpticsConfig().nominal()
    if optics is None:
        return values
    if not isinstance(optics, Mapping):
        raise ValueError(f"optics: expected a mapping or OpticsConfig, got {type(optics)!r}")
    unknown = sorted(set(optics) - set(values))
    if unknown:
        raise ValueError(f"optics: unknown key {unknown[0]!r}; valid keys: {', '.join(values)}")
    for key, value in optics.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"optics.{key}: expected a number, got {value!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"optics.{key}: expected a finite number, got {value!r}")
        low, high = _LIMITS[key]
        if (low is not None and v < low) or (high is not None and v > high):
            raise ValueError(f"optics.{key}: {v} outside the valid range [{low}, {high}]")
        values[key] = v
    for key in ("energy_kV", "semiangle_mrad", "pixel_size_A"):
        if values[key] <= 0:
            raise ValueError(f"optics.{key}: must be > 0, got {values[key]}")
    if not values["haadf_inner_mrad"] < values["haadf_outer_mrad"]:
        raise ValueError(
            f"optics.haadf_inner_mrad: must be < haadf_outer_mrad, got "
            f"{values['haadf_inner_mrad']} >= {values['haadf_outer_mrad']}"
        )
    return values


def ideal_optics(optics: Mapping[str, float] | OpticsConfig | None = None, **values) -> dict:
    """:func:`optics_values` (a config's nominal values) with an ideal probe: every
    aberration, the source size and the focal spread zero.

    Parameters
    ----------
    optics : mapping, OpticsConfig or None
        Optics values or a config (its :meth:`OpticsConfig.nominal` values); None: defaults.
    **values
        Values to set, e.g. ``energy_kV=60.0``.
    """
    base = optics.nominal() if isinstance(optics, OpticsConfig) else dict(optics or {})
    out = optics_values({**base, **values})
    for key in out:
        if key.startswith(("C", "phi")) or key in ("source_size_A", "focal_spread_A"):
            out[key] = 0.0
    return out


def wavelength_A(energy_kV: float) -> float:
    """Relativistic electron wavelength [Å] for an acceleration voltage [kV]."""
    from abtem.core.energy import energy2wavelength

    return float(energy2wavelength(float(energy_kV) * 1e3))


def nyquist_sampling_A(optics: Mapping[str, float]) -> float:
    """Coarsest scan step [Å] that samples a HAADF image without aliasing.

    The probe intensity is band-limited to ``2 alpha / lambda``, so the Nyquist step is
    ``lambda / (4 alpha)`` (0.348 Å at 80 kV, 30 mrad).
    """
    return wavelength_A(optics["energy_kV"]) / (4.0 * optics["semiangle_mrad"] * 1e-3)


def abtem_aberrations(optics: Mapping[str, float], *, dC10_A: float = 0.0) -> dict:
    """Polar aberration coefficients in abTEM's units (Å and radians).

    Parameters
    ----------
    optics : mapping
        Drawn optics values (``C10_A``... ``phi23_deg``).
    dC10_A : float
        Added to C10 [Å] (a focal-spread quadrature node).
    """
    return {
        "C10": float(optics["C10_A"] + dC10_A),
        "C12": float(optics["C12_A"]),
        "phi12": math.radians(optics["phi12_deg"]),
        "C21": float(optics["C21_A"]),
        "phi21": math.radians(optics["phi21_deg"]),
        "C23": float(optics["C23_A"]),
        "phi23": math.radians(optics["phi23_deg"]),
        "C30": float(optics["C30_A"]),
        "C50": float(optics["C50_A"]),
    }


def focal_quadrature(focal_spread_A: float, points: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Hermite nodes [Å] and weights (sum 1) for a Gaussian defocus spread.

    Parameters
    ----------
    focal_spread_A : float
        Standard deviation of the defocus distribution [Å]; 0 gives one node.
    points : int
        Number of nodes (exact for polynomials of degree ``2 points - 1``).
    """
    if focal_spread_A < 0:
        raise ValueError(f"focal_spread_A: must be >= 0, got {focal_spread_A}")
    if points < 1:
        raise ValueError(f"focal_points: must be >= 1, got {points}")
    if focal_spread_A == 0 or points == 1:
        return np.zeros(1), np.ones(1)
    x, w = np.polynomial.hermite_e.hermegauss(points)
    return x * focal_spread_A, w / w.sum()


def geometric_blur_A(optics: Mapping[str, float]) -> float:
    """Upper bound of the geometric ray displacement [Å] at the aperture edge.

    ``|grad W|`` at ``a = alpha`` summed term by term (``W = chi lambda / 2 pi``), plus
    three standard deviations of focal spread; used to size probe grids.
    """
    a = optics["semiangle_mrad"] * 1e-3
    return (
        (abs(optics["C10_A"]) + 3 * optics["focal_spread_A"] + abs(optics["C12_A"])) * a
        + (abs(optics["C21_A"]) + abs(optics["C23_A"])) * a**2
        + abs(optics["C30_A"]) * a**3
        + abs(optics["C50_A"]) * a**5
    )


def probe_radius_A(optics: Mapping[str, float], base_A: float = 6.0) -> float:
    """Half-width [Å] of the box holding the probe intensity kernel.

    ``base_A`` covers the diffraction-limited core and several Airy rings; the
    aberration blur and four standard deviations of the source are added.
    """
    sigma_src = optics["source_size_A"] / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return base_A + 1.5 * geometric_blur_A(optics) + 4.0 * sigma_src


def probe_intensity(
    optics: Mapping[str, float],
    *,
    sampling_A: float,
    gpts: int | tuple[int, int],
    focal_points: int = 7,
    source: bool = True,
    device: str = "cpu",
):
    """Probe intensity ``|P(r)|^2`` of abTEM's aberrated probe on a periodic grid.

    The probe is centred on grid point ``(gpts[0] // 2, gpts[1] // 2)`` (array layout
    ``[x, y]`` like abTEM), averaged over the focal spread with a Gauss–Hermite quadrature
    and, when ``source`` is True, convolved with the Gaussian source image (FWHM
    ``source_size_A``) in Fourier space. Intensity outside the box folds back into it
    (periodic grid), so the total is conserved: ``sum(I) * sampling_A**2 == 1``.

    Parameters
    ----------
    optics : mapping
        Drawn optics values (see :func:`optics_values`).
    sampling_A : float
        Grid step [Å]; must resolve the probe intensity band limit
        (``<= nyquist_sampling_A(optics)``).
    gpts : int or (int, int)
        Grid points along x and y (even numbers).
    focal_points : int
        Gauss–Hermite nodes for the focal spread.
    source : bool
        Apply the source-size blur.
    device : str
        ``cpu``, ``gpu`` or ``auto``; the result is a NumPy or CuPy array.

    Returns
    -------
    ndarray, float32 [gpts_x, gpts_y]
        Intensity per unit area [1/Å²].
    """
    return probe_intensities(
        optics,
        (0.0,),
        sampling_A=sampling_A,
        gpts=gpts,
        focal_points=focal_points,
        source=source,
        device=device,
    )[0]


def probe_intensities(
    optics: Mapping[str, float],
    defocus_shifts_A,
    *,
    sampling_A: float,
    gpts: int | tuple[int, int],
    focal_points: int = 7,
    source: bool = True,
    device: str = "cpu",
):
    """:func:`probe_intensity` of the probe refocused by each shift (``C10 + dz``), built by
    abTEM in one ensemble (each member equals its own build bit for bit; one build's
    overhead instead of several).

    Parameters
    ----------
    optics : mapping
        Drawn optics values (see :func:`optics_values`).
    defocus_shifts_A : sequence of float
        Shifts ``dz`` [Å] added to ``C10_A``.
    sampling_A, gpts, focal_points, source, device
        As :func:`probe_intensity`.

    Returns
    -------
    ndarray, float32 [len(defocus_shifts_A), gpts_x, gpts_y]
        One intensity per shift [1/Å²].
    """
    import abtem
    from abtem.distributions import from_values

    optics = optics_values(optics)
    device = resolve_device(device)
    shifts = np.atleast_1d(np.asarray(defocus_shifts_A, dtype=np.float64))
    if shifts.ndim != 1 or shifts.size == 0 or not np.all(np.isfinite(shifts)):
        raise ValueError(f"defocus_shifts_A: expected finite values, got {defocus_shifts_A!r}")
    if isinstance(gpts, int | np.integer):
        gpts = (int(gpts), int(gpts))
    gpts = (int(gpts[0]), int(gpts[1]))
    if any(n % 2 for n in gpts) or min(gpts) < 4:
        raise ValueError(f"gpts: expected even numbers >= 4, got {gpts}")
    if not sampling_A > 0:
        raise ValueError(f"sampling_A: must be > 0, got {sampling_A}")
    if sampling_A > nyquist_sampling_A(optics) * (1 + 1e-9):
        raise ValueError(
            f"sampling_A: {sampling_A} Å aliases the probe intensity; use <= "
            f"{nyquist_sampling_A(optics):.4f} Å (Nyquist for these optics)"
        )
    nodes, weights = focal_quadrature(optics["focal_spread_A"], focal_points)
    aberrations = abtem_aberrations(optics)
    c10 = aberrations["C10"]
    if len(nodes) > 1 or shifts.size > 1:
        values = (c10 + shifts[:, None] + nodes[None, :]).ravel()
        members = np.tile(weights, shifts.size) / shifts.size
        aberrations["C10"] = from_values(values, members)
    elif shifts[0] != 0:
        aberrations["C10"] = c10 + float(shifts[0])
    # abTEM's default FFTW backend plans every new grid shape (~0.1 s each); the probe box
    # changes with the drawn aberrations, so NumPy's FFT (no planning) is faster here.
    with warnings.catch_warnings(), abtem.config.set({"fft": "numpy"}):
        warnings.filterwarnings("ignore", module="abtem")
        probe = abtem.Probe(
            energy=optics["energy_kV"] * 1e3,
            semiangle_cutoff=optics["semiangle_mrad"],
            gpts=gpts,
            sampling=sampling_A,
            aberrations=aberrations,
            device=device,
        )
        wave = probe.build(lazy=False).array
    xp = get_array_module(wave)
    intensity = (wave.real**2 + wave.imag**2).astype(xp.float32)
    intensity = intensity.reshape(shifts.size, len(nodes), *gpts)
    if len(nodes) > 1:
        w = xp.asarray(weights, dtype=xp.float32)[:, None, None]
        intensity = xp.stack([(member * w).sum(axis=0) for member in intensity])
    else:
        intensity = intensity[:, 0]
    out = []
    for member in intensity:
        member = member / (member.sum() * sampling_A**2)
        if source and optics["source_size_A"] > 0:
            sigma = optics["source_size_A"] / (2.0 * math.sqrt(2.0 * math.log(2.0)))
            kx = xp.fft.fftfreq(gpts[0], d=sampling_A).astype(xp.float32)
            ky = xp.fft.rfftfreq(gpts[1], d=sampling_A).astype(xp.float32)
            env = xp.exp(-2.0 * math.pi**2 * sigma**2 * (kx[:, None] ** 2 + ky[None, :] ** 2))
            member = xp.fft.irfft2(xp.fft.rfft2(member) * env, s=gpts).astype(xp.float32)
        out.append(member)
    return xp.stack(out)
