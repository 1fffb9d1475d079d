"""The incoherent HAADF model and its calibration parameters.

``I(r) = b + sum_(j, e) |P|^2 * [A_je G_(sigma_e) + n_je sum_k t_ek G_(s_ek)](r - r_j)``
(sums over columns j, elements e and tails k)
with ``A_je = n_je * w_e * kappa_e ** (n_j - 1)``: the probe intensity ``|P|^2`` of abTEM's
aberrated probe (focal-spread average, source-size blur) convolved with one Gaussian peak
per (column, element), plus two broad tails (k = 1, 2) of weight ``t_ek`` per atom and
width ``s_ek = sqrt(sigma_e^2 + tau_k^2)`` (the signal a column sends to its surroundings:
probe intensity channelled into neighbouring columns and scattered back out). Without
tails, empty sites and hexagon centres read 6–14 % low against converged multislice; with
one tail width (calibration version 2) the vacancy-site/hexagon-centre contrasts were
still off by up to 5 % (W vacancy in WSe2 +4.9 %, Mo vacancy in MoS2 −2.5 %), with two
(version 3, a narrow tau_1 ≈ 0.4 Å and a broad tau_2 ≈ 1.2 Å) within 2 %. The
per-element numbers (``w_e``, ``kappa_e``, ``sigma_e``, ``t_ek``, the tail widths, ``b``)
are a :class:`Calibration`, fitted by :mod:`simgen.calibrate` to PRISM/multislice images.

This module holds the model alone: :class:`Calibration` (numbers, key, dict round trip),
:func:`column_peaks` (columns -> Gaussian peaks), :class:`IncoherentRenderer` (one probe
kernel, many renders) and :func:`render_incoherent` (one image). :mod:`simgen.simulation`
calls it for ``model="incoherent"``, :mod:`simgen.calibrate` fits it; it imports neither.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simgen.backend import get_array_module, get_scipy_submodule, resolve_device, to_numpy
from simgen.optics import (
    FWHM_TO_SIGMA,
    focal_quadrature,
    nyquist_sampling_A,
    optics_values,
    probe_intensities,
    probe_radius_A,
    wavelength_A,
)

__all__ = [
    "CALIBRATION_RTOL",
    "CALIBRATION_VERSION",
    "MAX_WIDTH_A",
    "NYQUIST_FRACTION",
    "Calibration",
    "DetectorGrid",
    "IncoherentRenderer",
    "canonical_elements",
    "check_calibration",
    "calibration_from_dict",
    "column_peaks",
    "detector_grid_key",
    "detector_grid_nodes",
    "periodic_images",
    "pointsum_calibration",
    "render_incoherent",
]

#: The incoherent model's grid step is at most this fraction of the Nyquist step.
NYQUIST_FRACTION = 0.9

#: Largest object-peak width [Å] the incoherent model accepts (sizes its FFT padding).
MAX_WIDTH_A = 0.5

#: Calibration optics may differ from the simulated ones by this relative amount.
CALIBRATION_RTOL = 0.02


#: Bumped whenever the model or the fit changes what a calibration means (2: tails;
#: 3: a second, broader tail and an isolated-defect reference cell).
CALIBRATION_VERSION = 3

#: Versions :meth:`Calibration.from_dict` still reads (a version-2 calibration is a
#: version-3 one without the second tail: stores made with it stay checkable and
#: resumable with their own calibration).
READABLE_VERSIONS = (2, 3)

#: Atomic number whose scattering :meth:`Calibration.with_z_exponent_shift` leaves
#: unchanged (Mo: the middle of the TMD elements, so an image's mean stays about the same).
Z_EXPONENT_REFERENCE = 42

#: Largest tail width [Å] of the model (the tail is applied in Fourier space).
MAX_TAIL_WIDTH_A = 2.0


_OPTICS_FIELDS = ("energy_kV", "semiangle_mrad", "haadf_inner_mrad", "haadf_outer_mrad")

#: Fields of one entry of :attr:`Calibration.defocus_fits`.
_DEFOCUS_FIELDS = (
    "C10_A",
    "weights_A2",
    "kappa",
    "widths_A",
    "tails_A2",
    "tail_width_A",
    "tails2_A2",
    "tail2_width_A",
    "background",
)


def atomic_number(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


def canonical_elements(elements: Sequence[str]) -> tuple[str, ...]:
    from ase.data import atomic_numbers

    els = tuple(dict.fromkeys(str(e) for e in elements))
    bad = [e for e in els if e not in atomic_numbers]
    if bad:
        raise ValueError(f"elements: unknown element symbol {bad[0]!r}")
    if not els:
        raise ValueError("elements: give at least one element")
    return tuple(sorted(els, key=atomic_number))


def key_number(value: float) -> float:
    return float(f"{float(value):.6g}")


@dataclass(frozen=True)
class Calibration:
    """Per-element weights, channelling factors and widths of the incoherent model.

    Parameters
    ----------
    elements : tuple of str
        Calibrated elements, by atomic number.
    weights_A2 : dict
        ``w_e`` [Å²]: HAADF cross-section of a lone atom (single-atom column).
    kappa : dict
        ``kappa_e``: factor applied to each atom of ``e`` in a column of ``n`` atoms,
        ``kappa_e ** (n - 1)``.
    widths_A : dict
        ``sigma_e`` [Å]: standard deviation of the object peak.
    background : float
        Constant background (fraction of the beam).
    tails_A2 : dict, optional
        ``t_e1`` [Å²]: weight of the first (narrower) tail per atom of ``e`` (default 0:
        no tail).
    tail_width_A : float
        Extra Gaussian width of the first tails [Å] (``s_e = sqrt(sigma_e^2 + tau_1^2)``).
    tails2_A2 : dict, optional
        ``t_e2`` [Å²]: weight of the second (broader) tail (default 0: none, as in
        calibration version 2).
    tail2_width_A : float
        Extra Gaussian width of the second tails [Å].
    defocus_fits : tuple of dict, optional
        The same parameters fitted at other defoci: each ``{"C10_A": c, "weights_A2",
        "kappa", "widths_A", "tails_A2", "tail_width_A", "tails2_A2", "tail2_width_A",
        "background"}``.
        :meth:`at_defocus` interpolates them (the main fields are the ``C10 = 0`` fit).
    energy_kV, semiangle_mrad, haadf_inner_mrad, haadf_outer_mrad : float
        The optics the calibration holds for.
    reference : dict
        How the reference image was made (``model`` and its numerical settings, the cell).
    fit : dict
        Fit quality (``correlation``, ``rms_relative``, ``n_pixels``...); not in the key.
    """

    elements: tuple[str, ...]
    weights_A2: dict[str, float]
    kappa: dict[str, float]
    widths_A: dict[str, float]
    background: float
    energy_kV: float
    semiangle_mrad: float
    haadf_inner_mrad: float
    haadf_outer_mrad: float
    reference: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    tails_A2: dict[str, float] | None = None
    tail_width_A: float = 0.0
    defocus_fits: tuple = ()
    tails2_A2: dict[str, float] | None = None
    tail2_width_A: float = 0.0
    version: int = CALIBRATION_VERSION

    def __post_init__(self):
        els = canonical_elements(self.elements)
        object.__setattr__(self, "elements", els)
        if self.version not in READABLE_VERSIONS:
            raise ValueError(
                f"calibration: version {self.version} is not one of {READABLE_VERSIONS}; "
                "recalibrate"
            )
        for name in ("tails_A2", "tails2_A2"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, dict.fromkeys(els, 0.0))
        for name in ("tail_width_A", "tail2_width_A"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= MAX_TAIL_WIDTH_A:
                raise ValueError(f"{name}: expected 0..{MAX_TAIL_WIDTH_A} Å, got {v}")
            object.__setattr__(self, name, v)
        if self.version < 3 and any(v != 0 for v in self.tails2_A2.values()):
            raise ValueError(f"tails2_A2: calibration version {self.version} has no second tail")
        fits = tuple(
            {k: (dict(v) if isinstance(v, Mapping) else float(v)) for k, v in f.items()}
            for f in (self.defocus_fits or ())
        )
        fits = tuple(  # version-2 entries have no second tail
            {"tails2_A2": dict.fromkeys(els, 0.0), "tail2_width_A": 0.0, **f} for f in fits
        )
        for f in fits:
            missing = [n for n in _DEFOCUS_FIELDS if n not in f]
            if missing:
                raise ValueError(f"defocus_fits: an entry lacks {missing[0]!r}")
        object.__setattr__(self, "defocus_fits", tuple(sorted(fits, key=lambda f: f["C10_A"])))
        for name in ("weights_A2", "kappa", "widths_A", "tails_A2", "tails2_A2"):
            table = getattr(self, name)
            if not isinstance(table, Mapping):
                raise ValueError(f"{name}: expected a mapping element -> number")
            missing = [e for e in els if e not in table]
            if missing:
                raise ValueError(f"{name}: no value for element {missing[0]!r}")
            values = {e: float(table[e]) for e in els}
            if not all(math.isfinite(v) for v in values.values()):
                raise ValueError(f"{name}: values must be finite, got {values}")
            object.__setattr__(self, name, values)
        for e, v in self.widths_A.items():
            if not 0.0 <= v <= MAX_WIDTH_A:
                raise ValueError(f"widths_A: {e} width {v} outside [0, {MAX_WIDTH_A}] Å")
        for e, v in self.kappa.items():
            if not v > 0:
                raise ValueError(f"kappa: {e} factor must be > 0, got {v}")
        for name in _OPTICS_FIELDS:
            v = float(getattr(self, name))
            if not v > 0 and name != "haadf_inner_mrad":
                raise ValueError(f"{name}: must be > 0, got {v}")
            object.__setattr__(self, name, v)
        if not self.haadf_inner_mrad < self.haadf_outer_mrad:
            raise ValueError("haadf_inner_mrad: must be < haadf_outer_mrad")
        object.__setattr__(self, "background", float(self.background))

    # -- identity -----------------------------------------------------------------------
    def dependencies(self) -> dict:
        """Everything the calibration depends on (what :attr:`key` hashes)."""
        ref = {k: self.reference[k] for k in sorted(self.reference) if k != "seconds"}
        return {
            "version": self.version,
            "energy_kV": key_number(self.energy_kV),
            "semiangle_mrad": key_number(self.semiangle_mrad),
            "haadf_inner_mrad": key_number(self.haadf_inner_mrad),
            "haadf_outer_mrad": key_number(self.haadf_outer_mrad),
            "elements": list(self.elements),
            "reference": json.loads(json.dumps(ref, sort_keys=True, default=str)),
        }

    def at_defocus(self, C10_A: float) -> Calibration:  # noqa: N803 - the optics' name
        """The parameters at defocus ``C10_A`` [Å]: piecewise-linear between the fitted
        defoci (this calibration's own fit at 0 among them), constant beyond them."""
        if not self.defocus_fits:
            return self
        nodes = sorted(
            [*self.defocus_fits, {"C10_A": 0.0, **self._parameters()}],
            key=lambda f: f["C10_A"],
        )
        cs = np.array([f["C10_A"] for f in nodes])
        c = float(np.clip(C10_A, cs[0], cs[-1]))
        j = int(np.clip(np.searchsorted(cs, c) - 1, 0, len(cs) - 2))
        u = 0.0 if cs[j + 1] == cs[j] else (c - cs[j]) / (cs[j + 1] - cs[j])
        lo, hi = nodes[j], nodes[j + 1]

        def mix(name):
            if isinstance(lo[name], Mapping):
                return {e: (1 - u) * lo[name][e] + u * hi[name][e] for e in self.elements}
            return (1 - u) * lo[name] + u * hi[name]

        return dataclasses.replace(
            self, **{n: mix(n) for n in _DEFOCUS_FIELDS if n != "C10_A"}, defocus_fits=()
        )

    def with_z_exponent_shift(self, shift: float) -> Calibration:
        """The model with every element's scattering scaled by ``(Z / 42) ** shift``.

        HAADF contrast goes roughly as ``Z ** n`` with ``n`` between about 1.5 and 2
        depending on the detector; ``shift`` changes ``n`` for the lone-atom weights and
        both tails (at every fitted defocus), leaving channelling, widths and background
        as calibrated. Not a physics of any one microscope: a contrast augmentation
        (``optics.z_exponent_shift``). ``shift = 0`` returns this calibration.

        Parameters
        ----------
        shift : float
            Change of the Z exponent (dimensionless).

        Returns
        -------
        Calibration
            With ``reference["z_exponent_shift"]`` recorded (its key differs). A simulation
            records the unshifted calibration and the shift among its optics values.
        """
        shift = float(shift)
        if shift == 0.0:
            return self
        if not math.isfinite(shift):
            raise ValueError(f"z_exponent_shift: expected a finite number, got {shift}")
        factor = {e: (atomic_number(e) / Z_EXPONENT_REFERENCE) ** shift for e in self.elements}

        def scaled(table):
            return {e: float(table[e]) * factor[e] for e in self.elements}

        fits = tuple({**f, **{n: scaled(f[n]) for n in _LOG_FIELDS}} for f in self.defocus_fits)
        return dataclasses.replace(
            self,
            **{n: scaled(getattr(self, n)) for n in _LOG_FIELDS},
            defocus_fits=fits,
            reference={**self.reference, "z_exponent_shift": shift},
        )

    def _parameters(self) -> dict:
        return {n: getattr(self, n) for n in _DEFOCUS_FIELDS if n != "C10_A"}

    @property
    def has_tails(self) -> bool:
        return bool(self.tail_terms())

    def tail_terms(self) -> list[tuple[dict[str, float], float]]:
        """The model's tails in use, as ``(weights_A2 per element, extra width_A)``."""
        terms = [(self.tails_A2, self.tail_width_A), (self.tails2_A2, self.tail2_width_A)]
        return [(t, w) for t, w in terms if w > 0 and any(v != 0 for v in t.values())]

    @property
    def key(self) -> str:
        """Stable, file-name-safe identifier of the calibration's dependencies.

        ``<model>-<E>kV-<alpha>mrad-<inner>-<outer>mrad-<elements>-<hash>``, the hash over
        :meth:`dependencies` (energy, semi-angle, detector, elements, reference model and
        its numerical settings, calibration version).
        """
        deps = self.dependencies()
        digest = hashlib.sha1(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:12]
        model = str(self.reference.get("model", "unknown"))
        return (
            f"{model}-{deps['energy_kV']:g}kV-{deps['semiangle_mrad']:g}mrad-"
            f"{deps['haadf_inner_mrad']:g}-{deps['haadf_outer_mrad']:g}mrad-"
            f"{''.join(self.elements)}-{digest}"
        )

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON/YAML-ready mapping (includes ``key`` for reference)."""
        return {
            "version": self.version,
            "key": self.key,
            "elements": list(self.elements),
            "weights_A2": dict(self.weights_A2),
            "kappa": dict(self.kappa),
            "widths_A": dict(self.widths_A),
            "background": self.background,
            "tails_A2": dict(self.tails_A2),
            "tail_width_A": self.tail_width_A,
            "tails2_A2": dict(self.tails2_A2),
            "tail2_width_A": self.tail2_width_A,
            "defocus_fits": [dict(f) for f in self.defocus_fits],
            "energy_kV": self.energy_kV,
            "semiangle_mrad": self.semiangle_mrad,
            "haadf_inner_mrad": self.haadf_inner_mrad,
            "haadf_outer_mrad": self.haadf_outer_mrad,
            "reference": json.loads(json.dumps(self.reference, default=str)),
            "fit": json.loads(json.dumps(self.fit, default=str)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; refuses versions other than :data:`READABLE_VERSIONS`."""
        if not isinstance(data, Mapping):
            raise ValueError(f"calibration: expected a mapping, got {type(data)!r}")
        version = data.get("version", 1)  # before versions were written: version 1
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"calibration: version {version} is not one of {READABLE_VERSIONS}; recalibrate"
            )
        names = (
            "elements",
            "weights_A2",
            "kappa",
            "widths_A",
            "background",
            "tails_A2",
            "tail_width_A",
            *_OPTICS_FIELDS,
        )
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"calibration: missing field {missing[0]!r}")
        cal = cls(
            elements=tuple(data["elements"]),
            weights_A2=dict(data["weights_A2"]),
            kappa=dict(data["kappa"]),
            widths_A=dict(data["widths_A"]),
            background=data["background"],
            tails_A2=dict(data["tails_A2"]) if data.get("tails_A2") is not None else None,
            tail_width_A=float(data.get("tail_width_A", 0.0)),
            tails2_A2=dict(data["tails2_A2"]) if data.get("tails2_A2") is not None else None,
            tail2_width_A=float(data.get("tail2_width_A", 0.0)),
            version=int(version),
            defocus_fits=tuple(data.get("defocus_fits") or ()),
            reference=dict(data.get("reference", {})),
            fit=dict(data.get("fit", {})),
            **{n: data[n] for n in _OPTICS_FIELDS},
        )
        if "key" in data and data["key"] != cal.key:
            raise ValueError(f"calibration: stored key {data['key']!r} != {cal.key!r}")
        return cal

    # -- use ------------------------------------------------------------------------------
    def column_weights(self, counts, elements: Sequence[str]) -> np.ndarray:
        """Integrated weight [Å²] of each column (``sum_e n_je w_e kappa_e^(n_j - 1)``)."""
        counts = np.asarray(counts)
        n = counts.sum(axis=1)
        out = np.zeros(counts.shape[0])
        for i, e in enumerate(elements):
            if not counts[:, i].any():
                continue
            if e not in self.weights_A2:
                raise ValueError(f"calibration: no weights for element {e!r}")
            out += counts[:, i] * self.weights_A2[e] * self.kappa[e] ** (n - 1.0)
        return out


# -- reference cells -----------------------------------------------------------------------------


#: Lone-atom weight [Å²] of W (Z = 74) in :func:`pointsum_calibration` (the order of the
#: calibrated value); the other elements scale as ``(Z / 74) ** exponent``.
POINTSUM_W_WEIGHT_A2 = 0.055


#: Node spacing [mrad] of a detector grid: inner angles on multiples of 20 mrad, outer
#: angles on multiples of 50 mrad (:func:`detector_grid_nodes`).
GRID_STEP_MRAD = (20.0, 50.0)

#: Smallest inner angle [mrad] of a detector grid (the interpolation is in log(angle)).
GRID_MIN_INNER_MRAD = 20.0

#: Parameters interpolated in log space between detector nodes (they scale like a power
#: of the collection angles); the others are interpolated linearly.
_LOG_FIELDS = ("weights_A2", "tails_A2", "tails2_A2")


def detector_grid_nodes(
    inner_mrad: tuple[float, float], outer_mrad: tuple[float, float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Grid nodes covering drawn detector angles.

    Parameters
    ----------
    inner_mrad, outer_mrad : (float, float)
        Smallest and largest inner and outer collection angle [mrad] the samples draw.

    Returns
    -------
    (tuple, tuple)
        The inner and the outer nodes [mrad]: a fixed angle is its own node; a range is
        covered by multiples of :data:`GRID_STEP_MRAD` (20 mrad inner, 50 mrad outer) from
        the one at or below its low end to the one at or above its high end.
    """
    out = []
    for (lo, hi), step in zip((inner_mrad, outer_mrad), GRID_STEP_MRAD, strict=True):
        lo, hi = float(lo), float(hi)
        if hi == lo:
            out.append((lo,))
            continue
        a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        out.append(tuple(float(k * step) for k in range(a, b + 1)))
    inner, outer = out
    if len(inner) > 1 and inner[0] < GRID_MIN_INNER_MRAD:
        raise ValueError(
            f"haadf_inner_mrad: a drawn inner angle must stay >= {GRID_MIN_INNER_MRAD:g} mrad "
            f"(the model is calibrated on a grid of HAADF detectors), got {inner_mrad[0]:g}"
        )
    if outer[0] <= 0 or inner[-1] >= outer[0]:
        raise ValueError(
            f"haadf_inner_mrad: the detector grid's inner nodes ({inner[0]:g}–{inner[-1]:g} "
            f"mrad, multiples of {GRID_STEP_MRAD[0]:g}) must stay below its outer nodes "
            f"({outer[0]:g}–{outer[-1]:g} mrad, multiples of {GRID_STEP_MRAD[1]:g}); "
            "narrow the drawn ranges"
        )
    return inner, outer


def detector_grid_key(node_keys: Sequence[str], inner_mrad, outer_mrad) -> str:
    """Key of a :class:`DetectorGrid` from its nodes' keys (inner-major order):
    ``grid-<model>-<E>kV-<alpha>mrad-<inner span>-<outer span>mrad-<elements>-<hash>``."""
    model, energy, alpha, _, _, elements, _ = str(node_keys[0]).rsplit("-", 6)
    digest = hashlib.sha1(json.dumps(list(node_keys)).encode()).hexdigest()[:12]

    def span(v):
        return f"{v[0]:g}" if len(v) == 1 else f"{v[0]:g}to{v[-1]:g}"

    return (
        f"grid-{model}-{energy}-{alpha}-{span(inner_mrad)}-{span(outer_mrad)}mrad-"
        f"{elements}-{digest}"
    )


@dataclass(frozen=True)
class DetectorGrid:
    """Calibrations of one set of optics and elements on a grid of HAADF detectors.

    HAADF contrast depends on the detector's collection angles (a higher inner angle
    raises the metal/chalcogen ratio). A dataset that draws its detector per sample
    renders each sample with :meth:`at_detector`: the parameters interpolated between the
    four surrounding nodes (weights and tails in log(weight) against log(angle), where
    they follow a power law of the angle; widths, channelling factors, tail width and
    background linearly).

    Parameters
    ----------
    calibrations : tuple of Calibration
        One per (inner, outer) node of a full rectangular grid; equal elements, energy,
        semi-angle and reference numerics.
    """

    calibrations: tuple

    def __post_init__(self):
        cals = tuple(
            c if isinstance(c, Calibration) else Calibration.from_dict(c) for c in self.calibrations
        )
        if not cals:
            raise ValueError("calibrations: a detector grid needs at least one calibration")
        first = cals[0]

        def same(c):
            d = c.dependencies()
            return {k: v for k, v in d.items() if not k.startswith("haadf_")}

        for c in cals[1:]:
            if same(c) != same(first):
                raise ValueError(
                    "calibrations: the nodes of a detector grid must share elements, energy, "
                    f"semi-angle and reference numerics; {c.key} differs from {first.key}"
                )
        for c in cals:
            if c.defocus_fits:
                raise ValueError(
                    f"calibrations: {c.key} has defocus fits; a detector grid takes focus-only "
                    "calibrations"
                )
        nodes = {(c.haadf_inner_mrad, c.haadf_outer_mrad): c for c in cals}
        inner = tuple(sorted({a for a, _ in nodes}))
        outer = tuple(sorted({b for _, b in nodes}))
        if len(nodes) != len(cals) or len(nodes) != len(inner) * len(outer):
            raise ValueError(
                f"calibrations: the detectors {sorted(nodes)} are not a full grid of distinct "
                "(inner, outer) nodes"
            )
        if len(inner) > 1 and inner[0] <= 0:
            raise ValueError("calibrations: a detector grid's inner angles must be > 0 mrad")
        ordered = tuple(nodes[(a, b)] for a in inner for b in outer)
        object.__setattr__(self, "calibrations", ordered)
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_outer", outer)

    @property
    def inner_mrad(self) -> tuple[float, ...]:
        """Inner-angle nodes [mrad]."""
        return self._inner

    @property
    def outer_mrad(self) -> tuple[float, ...]:
        """Outer-angle nodes [mrad]."""
        return self._outer

    @property
    def elements(self) -> tuple[str, ...]:
        return self.calibrations[0].elements

    @property
    def key(self) -> str:
        """:func:`detector_grid_key` of the nodes."""
        return detector_grid_key([c.key for c in self.calibrations], self._inner, self._outer)

    def _bracket(self, nodes, value, name):
        v = float(value)
        lo, hi = nodes[0], nodes[-1]
        if not lo * (1 - CALIBRATION_RTOL) <= v <= hi * (1 + CALIBRATION_RTOL):
            where = f"fixed at {lo:g} mrad" if lo == hi else f"{lo:g}–{hi:g} mrad"
            raise ValueError(
                f"{name}: {v:g} mrad lies outside the calibrated detector grid "
                f"({where}); calibrate for the drawn range"
            )
        if len(nodes) == 1:
            return 0, 0, 0.0
        v = min(max(v, lo), hi)
        j = int(np.clip(np.searchsorted(nodes, v) - 1, 0, len(nodes) - 2))
        u = (math.log(v) - math.log(nodes[j])) / (math.log(nodes[j + 1]) - math.log(nodes[j]))
        return j, j + 1, u

    def corners(self, inner_mrad: float, outer_mrad: float) -> list[tuple[Calibration, float]]:
        """The nodes around the detector ``(inner_mrad, outer_mrad)`` [mrad] and their
        bilinear weights (in log angle; summing to 1; one node, weight 1, at a node).

        :func:`simgen.simulation.simulate` renders a grid's sample as the weighted sum of
        these nodes' images: an exact interpolation of images, where mixing the nodes'
        parameters can break (two tails that nearly cancel at one node, e.g. at a 40 mrad
        inner angle, do not cancel once their widths are mixed with another node's)."""
        i0, i1, u = self._bracket(self._inner, inner_mrad, "haadf_inner_mrad")
        j0, j1, v = self._bracket(self._outer, outer_mrad, "haadf_outer_mrad")
        n_out = len(self._outer)
        share_i = {i0: 1.0 - u, i1: u} if i1 != i0 else {i0: 1.0}
        share_j = {j0: 1.0 - v, j1: v} if j1 != j0 else {j0: 1.0}
        corners = [
            (self.calibrations[i * n_out + j], wi * wj)
            for i, wi in share_i.items()
            for j, wj in share_j.items()
        ]
        corners = [(c, w) for c, w in corners if w > 0] or corners[:1]
        total = sum(w for _, w in corners)
        return [(c, w / total) for c, w in corners]

    def at_detector(self, inner_mrad: float, outer_mrad: float) -> Calibration:
        """The calibration of the detector ``(inner_mrad, outer_mrad)`` [mrad], its
        parameters interpolated between the grid's nodes (exactly a node's calibration at a
        node). Its reference records the grid's key, so its :attr:`~Calibration.key` is not
        a node's. Images of a grid are rendered from :meth:`corners` instead (exact
        between nodes); this one describes them (weights, the key)."""
        corners = self.corners(inner_mrad, outer_mrad)
        if (
            len(corners) == 1
            and corners[0][0].haadf_inner_mrad == float(inner_mrad)
            and (corners[0][0].haadf_outer_mrad == float(outer_mrad))
        ):
            return corners[0][0]
        els = self.elements

        def mix(name):
            values = [(getattr(c, name), w) for c, w in corners]
            if isinstance(values[0][0], Mapping):
                out = {}
                for e in els:
                    vals = [(t[e], w) for t, w in values]
                    if name in _LOG_FIELDS and all(x > 0 for x, _ in vals):
                        out[e] = math.exp(sum(w * math.log(x) for x, w in vals))
                    else:
                        out[e] = sum(w * x for x, w in vals)
                return out
            return sum(w * x for x, w in values)

        first = corners[0][0]
        fields_ = [n for n in _DEFOCUS_FIELDS if n != "C10_A"]
        return dataclasses.replace(
            first,
            **{n: mix(n) for n in fields_},
            haadf_inner_mrad=float(inner_mrad),
            haadf_outer_mrad=float(outer_mrad),
            reference={**first.reference, "detector_grid": self.key},
            fit={
                **(
                    {"correlation": min(corr)}
                    if (
                        corr := [c.fit["correlation"] for c, _ in corners if "correlation" in c.fit]
                    )
                    else {}
                ),
                "interpolated_from": [c.key for c, _ in corners],
            },
        )

    def to_dict(self) -> dict:
        """``{"kind": "detector_grid", "version", "key", "calibrations": [...]}``."""
        return {
            "kind": "detector_grid",
            "version": self.calibrations[0].version,
            "key": self.key,
            "calibrations": [c.to_dict() for c in self.calibrations],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorGrid:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping) or data.get("kind") != "detector_grid":
            raise ValueError("calibration: expected a detector grid (kind 'detector_grid')")
        cals = data.get("calibrations")
        if not isinstance(cals, list | tuple):
            raise ValueError("calibration: a detector grid needs a list 'calibrations'")
        grid = cls(tuple(Calibration.from_dict(c) for c in cals))
        if "key" in data and data["key"] != grid.key:
            raise ValueError(f"calibration: stored key {data['key']!r} != {grid.key!r}")
        return grid


def calibration_from_dict(data: Mapping[str, Any]) -> Calibration | DetectorGrid:
    """A :class:`Calibration` or a :class:`DetectorGrid` from its ``to_dict()``."""
    if isinstance(data, Mapping) and data.get("kind") == "detector_grid":
        return DetectorGrid.from_dict(data)
    return Calibration.from_dict(data)


def pointsum_calibration(
    elements: Sequence[str],
    optics: Mapping[str, float],
    *,
    exponent: float = 2.0,
    width_A: float = 0.08,
) -> Calibration:
    """The textbook point-sum HAADF model as a :class:`Calibration`: every atom scatters
    ``∝ Z^exponent`` (Rutherford-like, ``exponent`` 2), independent of its column (no
    channelling, ``kappa = 1``), no background; no simulation behind it.

    A physics deliberately different from the calibrated model, for robustness tests:
    a network trained on one should still label images of the other.

    Parameters
    ----------
    elements : sequence of str
    optics : mapping
        ``energy_kV``, ``semiangle_mrad``, ``haadf_inner_mrad``, ``haadf_outer_mrad`` (the
        probe still comes from them).
    exponent : float
        Z exponent, in [1, 3].
    width_A : float
        Object-peak width σ [Å] (thermal smearing).

    Returns
    -------
    Calibration
    """
    if not 1.0 <= float(exponent) <= 3.0:
        raise ValueError(f"exponent: expected 1 <= n <= 3, got {exponent}")
    if not 0.0 < float(width_A) <= MAX_WIDTH_A:
        raise ValueError(f"width_A: expected 0 < σ <= {MAX_WIDTH_A} Å, got {width_A}")
    els = canonical_elements(elements)
    values = optics_values(optics, rng=0)
    return Calibration(
        elements=els,
        weights_A2={
            e: POINTSUM_W_WEIGHT_A2 * (atomic_number(e) / 74.0) ** float(exponent) for e in els
        },
        kappa=dict.fromkeys(els, 1.0),
        widths_A=dict.fromkeys(els, float(width_A)),
        background=0.0,
        **{k: float(values[k]) for k in _OPTICS_FIELDS},
        reference={"model": "pointsum", "exponent": float(exponent), "width_A": float(width_A)},
    )


def _sim_step(pixel_size_A: float, optics: Mapping[str, float]) -> tuple[float, int]:
    """Simulation step ``p / m`` with the smallest ``m`` that keeps it below Nyquist."""
    nyq = NYQUIST_FRACTION * nyquist_sampling_A(optics)
    m = max(1, math.ceil(pixel_size_A / nyq - 1e-9))
    return pixel_size_A / m, m


def _kernel_box(optics: Mapping[str, float], step_A: float) -> int:
    """Points of the probe kernel's periodic box: ``2 * probe radius``, even, FFT-fast."""
    nk = 2 * math.ceil(probe_radius_A(optics) / step_A)
    while _next_fast(nk) != nk or nk % 2:
        nk += 2
    return nk


def _next_fast(n: int) -> int:
    from scipy.fft import next_fast_len

    return int(next_fast_len(int(n), real=True))


@functools.lru_cache(maxsize=4)
def _frequency_squared(grid_shape: tuple[int, int], step_A: float, device: str):
    """``|k|²`` [1/Å²] on the half-spectrum of an rfft2 grid (cached per grid; read-only)."""
    xp = get_array_module(device)
    ny, nx = grid_shape
    ky = xp.fft.fftfreq(ny, d=step_A).astype(xp.float32)
    kx = xp.fft.rfftfreq(nx, d=step_A).astype(xp.float32)
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    if xp is np:
        k2.flags.writeable = False
    return k2


@functools.lru_cache(maxsize=8)
def _gaussian_spectrum(grid_shape: tuple[int, int], step_A: float, width_A: float, device: str):
    """Fourier transform of a unit Gaussian of standard deviation ``width_A`` [Å] on an
    rfft2 grid (cached: a calibration's tail widths recur in every sample; read-only)."""
    xp = get_array_module(device)
    k2 = _frequency_squared(grid_shape, step_A, device)
    blur = xp.exp(np.float32(-2.0 * math.pi**2 * width_A**2) * k2)
    if xp is np:
        blur.flags.writeable = False
    return blur


def _fft(xp):
    """``scipy.fft`` (float32-aware, no planning) or ``cupyx.scipy.fft``."""
    return get_scipy_submodule(xp, "fft")


# -- incoherent model -------------------------------------------------------------------------
def column_peaks(
    counts: np.ndarray,
    elements: tuple[str, ...],
    calibration: Calibration,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian peaks of the object function, one per (column, element present).

    The atoms of element ``e`` in a column of ``n`` atoms contribute
    ``counts[j, e] * w_e * kappa_e ** (n - 1)`` (Å²) with width ``sigma_e``.

    Returns
    -------
    column_index, amplitude_A2, sigma_A : ndarray [n_peaks]
    tail_A2 : ndarray [n_peaks, n_tails]
        The tail weights of the peak (``counts[j, e] * t_ek``), one column per tail of
        :meth:`Calibration.tail_terms` (none without tails).
    """
    counts = np.asarray(counts)
    used = [i for i, e in enumerate(elements) if counts[:, i].any()]
    missing = [elements[i] for i in used if elements[i] not in calibration.weights_A2]
    if missing:
        raise ValueError(
            f"calibration: no weights for element(s) {missing}; it covers "
            f"{list(calibration.elements)} (calibrate for these elements)"
        )
    n_atoms = counts.sum(axis=1)
    terms = calibration.tail_terms()
    idx, amp, sig, tail = [], [], [], []
    for i in used:
        e = elements[i]
        rows = np.nonzero(counts[:, i])[0]
        a = (
            counts[rows, i]
            * calibration.weights_A2[e]
            * calibration.kappa[e] ** (n_atoms[rows] - 1).astype(np.float64)
        )
        idx.append(rows)
        amp.append(a)
        sig.append(np.full(rows.size, calibration.widths_A[e]))
        tail.append(counts[rows, i][:, None] * np.array([[t[e] for t, _ in terms]]))
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros((0, len(terms)))
    return np.concatenate(idx), np.concatenate(amp), np.concatenate(sig), np.concatenate(tail)


class IncoherentRenderer:
    """Probe-intensity convolution on a fixed grid for one set of optics.

    Built once per image (or once per calibration fit): it holds the grid geometry and the
    Fourier transform of the probe intensity kernel, and :meth:`render` turns Gaussian
    peaks at exact sub-pixel positions into an image. The kernel is abTEM's probe on a
    compact box of ``2 * probe_radius_A`` (periodic, so its tail folds back and the total
    intensity is conserved), embedded in an FFT grid padded by that radius so that no
    wrap-around reaches the field of view.

    Parameters
    ----------
    optics : mapping
        Drawn optics values.
    pixel_size_A : float
        Output pixel size [Å].
    origin_A : (float, float)
        Cell-frame position of pixel (0, 0) [Å].
    shape : (H, W)
        Output shape [px].
    focal_points : int
        Gauss–Hermite nodes of the focal-spread average.
    device : str
        ``cpu`` or ``gpu``.
    """

    def __init__(
        self,
        optics: Mapping[str, float],
        pixel_size_A: float,
        origin_A: tuple[float, float],
        shape: tuple[int, int],
        *,
        focal_points: int = 7,
        device: str = "cpu",
        refocus_A: Sequence[float] = (),
    ):
        self.optics = optics_values(optics)
        self.device = resolve_device(device)
        self.xp = get_array_module(self.device)
        xp = self.xp
        self.pixel_size_A = float(pixel_size_A)
        self.shape = (int(shape[0]), int(shape[1]))
        self.step_A, self.m = _sim_step(self.pixel_size_A, self.optics)
        ps = self.step_A
        self.render_sigma_A = ps  # peaks are drawn this much wider, then deconvolved
        refocus = sorted({float(dz) for dz in refocus_A if float(dz) != 0.0})
        nk = _kernel_box(self.optics, ps)
        self.kernel_gpts = nk
        # each refocused probe keeps its own box (the calibration was fitted with the
        # nominal probe's box: the fold-back of the far tail it sets shows in dark sites);
        # the FFT grid holds the largest
        boxes = {dz: _kernel_box(self._refocused(dz), ps) for dz in refocus}
        nk_max = max([nk, *boxes.values()])
        sigma_src = self.optics["source_size_A"] * FWHM_TO_SIGMA
        self.patch_half = math.ceil(4.0 * math.hypot(MAX_WIDTH_A, self.render_sigma_A) / ps)
        pad = nk_max // 2 + math.ceil(4.0 * sigma_src / ps) + self.patch_half + 2
        h, w = self.shape
        ny = _next_fast(self.m * (h - 1) + 1 + 2 * pad)
        nx = _next_fast(self.m * (w - 1) + 1 + 2 * pad)
        self.pad = pad
        self.grid_shape = (ny, nx)
        self.grid_origin_A = (origin_A[0] - pad * ps, origin_A[1] - pad * ps)
        self.origin_A = (float(origin_A[0]), float(origin_A[1]))

        k2 = _frequency_squared((ny, nx), ps, self.device)
        env = xp.exp(-2.0 * math.pi**2 * (sigma_src**2 - self.render_sigma_A**2) * k2)
        # |P|^2 is band-limited to 2 alpha / lambda (+ the soft aperture edge): zero the
        # float round-off beyond it, which the deconvolution of the render width amplifies.
        lam = wavelength_A(self.optics["energy_kV"])
        k_band = 2.0 * (self.optics["semiangle_mrad"] * 1e-3 / lam + 1.0 / (nk * ps))
        self._envelope = env * (k2 <= k_band**2)
        self._focal_points = int(focal_points)
        # one abTEM build per box size for the nominal and every refocused probe
        boxes[0.0] = nk
        spectra = {}
        for box in sorted(set(boxes.values())):
            shifts = [dz for dz in sorted(boxes) if boxes[dz] == box]
            kernels = probe_intensities(
                self.optics,
                shifts,
                sampling_A=ps,
                gpts=box,
                focal_points=self._focal_points,
                source=False,
                device=self.device,
            )
            spectra.update(
                {dz: self._kernel_spectrum(k, box) for dz, k in zip(shifts, kernels, strict=True)}
            )
        self.kernel_spectrum = spectra.pop(0.0)
        #: Kernel spectra of the probe refocused by ``dz`` [Å] (``C10 + dz``), by ``dz``.
        self.refocused_spectra = {dz: spectra[dz] for dz in refocus}

    def _refocused(self, dz_A: float) -> dict:
        return {**self.optics, "C10_A": self.optics["C10_A"] + float(dz_A)}

    def _kernel_spectrum(self, intensity, nk: int):
        """A probe intensity (:func:`probe_intensity` on a periodic box of ``nk`` points,
        abTEM's ``[x, y]`` layout) on the FFT grid (flipped, embedded, source-blurred,
        band-limited, render width divided out), as a spectrum."""
        xp, ps = self.xp, self.step_A
        ny, nx = self.grid_shape
        kernel = intensity.T  # abTEM [x, y] -> [y, x]
        # The image is a correlation with the probe, I(R) = int |P(r - R)|^2 O(r) dr, i.e. a
        # convolution with |P(-r)|^2: flip the kernel (matters for odd aberrations, C21/C23).
        kernel = xp.roll(kernel[::-1, ::-1], 1, axis=(0, 1))
        k0 = xp.fft.ifftshift(kernel)  # centre to index (0, 0)
        half = nk // 2
        # embedded in the (ny, nx) grid only rows [0, half) and [ny - half, ny) are
        # non-zero: build those, transform them along x, then every column along y (bit
        # for bit rfft2's own two passes over the whole grid)
        band = xp.zeros((2 * half, nx), dtype=xp.float32)
        band[:half, :half] = k0[:half, :half]
        band[:half, nx - half :] = k0[:half, half:]
        band[half:, :half] = k0[half:, :half]
        band[half:, nx - half :] = k0[half:, half:]
        fft = _fft(xp)
        spectrum = xp.zeros((ny, nx // 2 + 1), dtype=xp.complex64)
        rows = fft.rfft(band, axis=1)
        spectrum[:half] = rows[:half]
        spectrum[ny - half :] = rows[half:]
        spectrum = fft.fft(spectrum, axis=0, overwrite_x=True)
        spectrum *= self._envelope  # in place: the same products, no temporaries
        spectrum *= ps * ps
        return spectrum.astype(xp.complex64, copy=False)

    def _tail_blur(self, width_A: float):
        """Fourier transform of a tail's extra Gaussian on the FFT grid (cached: the tail
        widths are the calibration's, the same for every sample)."""
        return _gaussian_spectrum(self.grid_shape, self.step_A, float(width_A), self.device)

    def render(self, x_A, y_A, amplitude_A2, sigma_A, tails=(), focus_A=None):
        """Image of Gaussian object peaks convolved with the probe intensity.

        Parameters
        ----------
        x_A, y_A : array [n]
            Peak positions [Å], cell frame.
        amplitude_A2 : array [n]
            Integrated weights [Å²] (the HAADF cross-section of the peak).
        sigma_A : array [n]
            Gaussian standard deviations of the peaks [Å].
        tails : sequence of (array [n], float)
            Broad tails: per tail, the weight [Å²] of each peak's tail and its extra width
            ``tau`` [Å] (same centre, width ``sqrt(sigma^2 + tau^2)``; applied in Fourier
            space). Tails of width 0 are left out.
        focus_A : array [n], optional
            Per peak, the refocus ``dz`` [Å] of its probe (0, or one of the renderer's
            ``refocus_A``): such peaks are convolved with the probe at ``C10 + dz``. Their
            tails keep the main probe (the tails are broad; refocusing them changes
            nothing measurable).

        Returns
        -------
        ndarray (NumPy or CuPy), float32 [H, W]
            Without background.
        """
        xp = self.xp
        ps = self.step_A
        ny, nx = self.grid_shape
        u = (xp.asarray(x_A, dtype=xp.float64) - self.grid_origin_A[0]) / ps
        v = (xp.asarray(y_A, dtype=xp.float64) - self.grid_origin_A[1]) / ps
        amp = xp.asarray(amplitude_A2, dtype=xp.float64)
        s = xp.sqrt(xp.asarray(sigma_A, dtype=xp.float64) ** 2 + self.render_sigma_A**2)
        tails = [(xp.asarray(t, dtype=xp.float64), float(w)) for t, w in tails if float(w) > 0]
        keep = (u >= 0) & (u < nx) & (v >= 0) & (v < ny)
        used = amp != 0
        for t, _ in tails:
            used |= t != 0
        keep &= used
        u, v, amp, s = u[keep], v[keep], amp[keep], s[keep]
        tails = [(t[keep], w) for t, w in tails]
        focus = None
        if focus_A is not None:
            focus = np.asarray(to_numpy(focus_A), dtype=np.float64)[to_numpy(keep)]
            unknown = set(focus[focus != 0].tolist()) - set(self.refocused_spectra)
            if unknown:
                raise ValueError(
                    f"focus_A: refocus {sorted(unknown)[0]} Å was not given as refocus_A"
                )
        fft = _fft(xp)
        if u.size == 0:
            img = xp.zeros((ny, nx), dtype=xp.float32)
        else:
            smax = float(s.max())
            if smax > math.hypot(MAX_WIDTH_A, self.render_sigma_A) + 1e-9:
                raise ValueError(f"sigma_A: peak widths must be <= {MAX_WIDTH_A} Å")
            half = max(2, math.ceil(4.0 * smax / ps))
            d = xp.arange(-half, half + 1, dtype=xp.float64)
            iu = xp.floor(u)
            iv = xp.floor(v)
            inv = (ps / s)[:, None]
            gx = xp.exp(-0.5 * ((d[None, :] - (u - iu)[:, None]) * inv) ** 2)
            gy = xp.exp(-0.5 * ((d[None, :] - (v - iv)[:, None]) * inv) ** 2)
            from simgen.rasterize import PeakPatches

            patches = PeakPatches(iu, iv, gx, gy, 2.0 * math.pi * s * s, (ny, nx))

            def spectrum(weights, subset=None):
                density = patches.density(weights, subset=subset)
                return fft.rfft2(density.astype(xp.float32))

            if focus is None or not focus.any():
                spec = spectrum(amp)
                for t, w in tails:
                    spec += spectrum(t) * self._tail_blur(w)
                img = fft.irfft2(spec * self.kernel_spectrum, s=(ny, nx))
            else:
                main = xp.asarray(focus == 0)
                spec = spectrum(xp.where(main, amp, 0.0))
                for t, w in tails:
                    spec += spectrum(t) * self._tail_blur(w)
                spec = spec * self.kernel_spectrum
                for dz, kernel in self.refocused_spectra.items():
                    here = xp.asarray(np.flatnonzero(focus == dz))
                    if here.size:
                        spec += spectrum(amp, subset=here) * kernel
                img = fft.irfft2(spec, s=(ny, nx))
        h, w = self.shape
        m, pad = self.m, self.pad
        out = img[pad : pad + m * (h - 1) + 1 : m, pad : pad + m * (w - 1) + 1 : m]
        return xp.ascontiguousarray(out, dtype=xp.float32)


def periodic_images(x, y, cell_xy, lo, hi):
    """Copies of the columns shifted by whole cells that fall inside ``[lo, hi)``."""
    lx, ly = cell_xy
    ix = range(math.floor((lo[0] - x.max()) / lx), math.ceil((hi[0] - x.min()) / lx) + 1)
    iy = range(math.floor((lo[1] - y.max()) / ly), math.ceil((hi[1] - y.min()) / ly) + 1)
    idx, xs, ys = [], [], []
    base = np.arange(x.size)
    for i in ix:
        for j in iy:
            xx, yy = x + i * lx, y + j * ly
            keep = (xx >= lo[0]) & (xx < hi[0]) & (yy >= lo[1]) & (yy < hi[1])
            idx.append(base[keep])
            xs.append(xx[keep])
            ys.append(yy[keep])
    return np.concatenate(idx), np.concatenate(xs), np.concatenate(ys)


def check_calibration(calibration, optics) -> None:
    if calibration is None:
        raise ValueError(
            "calibration: the incoherent model needs a Calibration "
            "(simgen.calibrate.calibrate(...) for these optics and elements)"
        )
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration: expected a Calibration, got {type(calibration)!r}")
    for key in ("energy_kV", "semiangle_mrad", "haadf_inner_mrad", "haadf_outer_mrad"):
        ref = getattr(calibration, key)
        if abs(optics[key] - ref) > CALIBRATION_RTOL * abs(ref):
            raise ValueError(
                f"calibration: computed for {key}={ref:g}, but the optics have "
                f"{optics[key]:g} (tolerance {CALIBRATION_RTOL:.0%}); calibrate for these optics"
            )


#: Heights of single-atom columns are rounded to this step [Å] before their probe is
#: refocused (one probe kernel per distinct height; 0.1 Å of defocus changes nothing).
DEPTH_STEP_A = 0.1


def render_incoherent(
    x,
    y,
    counts,
    elements,
    optics,
    calibration,
    geom,
    *,
    cell_xy,
    periodic,
    focal_points,
    device,
    z_A=None,
):
    """Incoherent image of columns ``(x, y, counts, elements)`` in the window ``geom``.

    ``geom`` is ``(x0, y0, H, W, pixel_size_A)``; with ``periodic`` the columns are repeated
    by whole cells ``cell_xy``. ``z_A`` (optional, per column [Å]): the height of a
    single-atom column's atom above the specimen's mid-plane; such columns are imaged with
    the probe refocused to that height (``C10 + z``: a single chalcogen vacancy leaves the
    other atom 1.6–1.8 Å off the mid-plane, and out of focus the two cases differ by 6–13 %
    in converged PRISM; without heights the model reads both as their mean). Returns
    ``(image, info)``.
    """
    x0, y0, h, w, p = geom
    calibration = calibration.at_defocus(float(optics.get("C10_A", 0.0)))
    col, amp, sig, tail = column_peaks(counts, elements, calibration)
    depth = np.zeros(col.size)
    if z_A is not None and col.size:
        depth = np.round(np.asarray(z_A, dtype=np.float64)[col] / DEPTH_STEP_A) * DEPTH_STEP_A
        depth[depth == 0] = 0.0  # no -0.0
    refocus = sorted(set(depth[depth != 0].tolist()))
    renderer = IncoherentRenderer(
        optics, p, (x0, y0), (h, w), focal_points=focal_points, device=device, refocus_A=refocus
    )
    px, py = x[col], y[col]
    if periodic and col.size:
        ny, nx = renderer.grid_shape
        lo = renderer.grid_origin_A
        hi = (lo[0] + nx * renderer.step_A, lo[1] + ny * renderer.step_A)
        sel, px, py = periodic_images(px, py, cell_xy, lo, hi)
        amp, sig, tail, depth = amp[sel], sig[sel], tail[sel], depth[sel]
    tails = [(tail[:, k], w) for k, (_, w) in enumerate(calibration.tail_terms())]
    image = renderer.render(px, py, amp, sig, tails, focus_A=depth if refocus else None)
    info = {
        "step_A": renderer.step_A,
        "grid_shape": renderer.grid_shape,
        "kernel_gpts": renderer.kernel_gpts,
        "focal_points": len(focal_quadrature(optics["focal_spread_A"], focal_points)[0]),
        "refocused_heights_A": refocus,
    }
    return image + np.float32(calibration.background), info
