"""Noise-free HAADF-STEM images of a monolayer: multislice, PRISM and an incoherent model.

One function, :func:`simulate`, runs three models and returns a :class:`Simulated`:

``multislice``
    abTEM probe scan through the potential with an annular detector, optionally averaged
    over frozen-phonon configurations. The reference: exact within the independent-atom
    and frozen-phonon approximations, and the slowest.
``prism``
    abTEM's PRISM (S-matrix) algorithm with an interpolation factor ``f``; ``f = 1``
    reproduces multislice; ``f > 1`` is faster and truncates the probe to ``1/f`` of the
    simulated box.
``incoherent``
    ``I(r) = b + sum_j (|P|^2 * O_j)(r)``: the probe intensity of abTEM's aberrated probe
    (focal-spread average, source-size blur) convolved with one Gaussian peak per
    (column, element), weight and width from a :class:`~simgen.calibrate.Calibration`
    fitted to PRISM/multislice images for the same energy, aperture and detector.

All three give the image in the same unit: the fraction of the incident beam that the
detector collects (what abTEM's ``AnnularDetector`` returns); a later stage turns it into
counts with the dose.

Geometry (see ``docs/architecture.md``): the image is ``[H, W] = [rows (y), cols (x)]``,
pixel ``(r, c)`` is the probe position ``(x0 + c p, y0 + r p)`` in the cell frame, and a
column at ``(x, y)`` sits at ``col = (x - x0) / p``, ``row = (y - y0) / p``.

Sampling: every model samples the image at or below the Nyquist step of the probe
intensity, ``lambda / (4 alpha)``. When the requested pixel is coarser, it simulates on a
grid ``m`` times finer that contains every pixel position and keeps every ``m``-th point
(exact point sampling, as the microscope does). PRISM/multislice scan the requested pixel
positions directly when the pixel is fine enough, or, with ``scan_sampling_A``, a coarser
grid resampled by quintic splines (at 0.9 x Nyquist the resampling error is <= 1 % of the
image maximum, measured; see ``docs/physics.md``).

Boundaries: ``periodic=False`` (the default, for cells from ``structures.build_monolayer``)
treats the cell as a finite piece of material: the incoherent model renders only the
columns that exist and pads its FFT grid by the probe radius; PRISM/multislice cut the atoms
within the window plus a probe-sized margin into a new box (vacuum where the box leaves the
cell), so the wrap-around of abTEM's periodic potential stays outside the field of view.
``periodic=True`` uses the cell as one period of an infinite crystal (tiny test and
calibration cells).

API::

    settings = SimulationSettings(model="incoherent", pixel_size_A=None,
                                  window=(x0, y0, width, height) | None, shape=(H, W) | None,
                                  origin=(x0, y0) | None, interpolation=2, frozen_phonons=0,
                                  phonon_sigma_A=0.07, potential_sampling_A=0.05,
                                  slice_thickness_A=1.0, focal_points=7, scan_sampling_A=None,
                                  periodic=False, device="cpu")
    sim = simulate(atoms, columns, optics, settings, calibration=cal, rng=None)
    sim = simulate(atoms, columns, optics, model="prism")  # a settings field per keyword
    sim.image            # float32 [H, W], NumPy or CuPy (device="gpu")
    sim.rows, sim.cols   # every column's sub-pixel position, same order as ``columns``
    sim.params           # optics values used (store them per sample)
    sim.calibration_key  # the incoherent model's calibration (None for prism/multislice)

``columns`` is anything with ``x, y, counts, elements`` (``structures.ColumnTable``, or
:class:`Columns`). The incoherent model itself lives in :mod:`simgen.incoherent`; its
calibration against the abTEM models in :mod:`simgen.calibrate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from simgen.backend import get_array_module, get_scipy_submodule, resolve_device
from simgen.configbase import Config
from simgen.distributions import as_rng
from simgen.incoherent import (
    Z_EXPONENT_REFERENCE,
    Calibration,
    DetectorGrid,
    check_calibration,
    render_incoherent,
)
from simgen.optics import (
    FWHM_TO_SIGMA,
    OpticsConfig,
    abtem_aberrations,
    focal_quadrature,
    nyquist_sampling_A,
    optics_values,
    probe_radius_A,
    wavelength_A,
)
from simgen.transmission import z_exponent_potential_scale

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms

__all__ = [
    "MODELS",
    "Columns",
    "Simulated",
    "SimulationSettings",
    "plane_slices",
    "resolve_window",
    "simulate",
    "simulate_defocus_series",
    "simulate_series",
    "single_atom_heights",
]

MODELS = ("incoherent", "prism", "multislice")


# -- containers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Columns:
    """Projected atomic columns (the part of ``structures.ColumnTable`` simulators need).

    Parameters
    ----------
    x, y : ndarray, float [n]
        Column positions [Å] in the cell frame.
    counts : ndarray, int [n, n_elements]
        Atoms of each element in each column (0 rows are empty sites).
    elements : tuple of str
        Element symbols, the column order of ``counts``.
    """

    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray
    elements: tuple[str, ...]

    @property
    def n_atoms(self) -> np.ndarray:
        """Atoms per column."""
        return np.asarray(self.counts).sum(axis=1)


@dataclass(frozen=True)
class Simulated:
    """A noise-free image and where every column is in it.

    Attributes
    ----------
    image : ndarray (NumPy or CuPy), float32 [H, W]
        Fraction of the incident beam collected by the detector, per probe position.
    rows, cols : ndarray, float64 [n_columns]
        Sub-pixel position of every input column (same order as ``columns``), in image
        pixels; columns outside the image have values outside ``[0, H) x [0, W)``.
    params : dict
        The optics values used (``simgen.optics.OPTICS_KEYS`` → float).
    model : str
        ``incoherent``, ``prism`` or ``multislice``.
    pixel_size_A : float
        Pixel size [Å].
    origin_A : (float, float)
        ``(x0, y0)``: cell-frame position [Å] of pixel ``(0, 0)``.
    calibration_key : str or None
        :attr:`Calibration.key` of the calibration that produced an incoherent image (before
        ``optics.z_exponent_shift``, which ``params`` holds).
    calibration : Calibration or None
        That calibration.
    info : dict
        Numerical settings of the run (grid steps, interpolation, frozen phonons...).
    columns : object or None
        The ``columns`` argument, so the image travels with what it shows.
    """

    image: Any
    rows: np.ndarray
    cols: np.ndarray
    params: dict
    model: str
    pixel_size_A: float
    origin_A: tuple[float, float]
    calibration_key: str | None = None
    calibration: Calibration | None = None
    info: dict = field(default_factory=dict)
    columns: Any = None


# -- input checks ---------------------------------------------------------------------------
def _cell_xy(atoms: Atoms) -> tuple[float, float]:
    cell = np.asarray(atoms.cell[:])
    if cell.shape != (3, 3) or not np.allclose(cell - np.diag(np.diag(cell)), 0.0, atol=1e-6):
        raise ValueError("atoms: the cell must be orthogonal (use abtem.orthogonalize_cell)")
    lx, ly = float(cell[0, 0]), float(cell[1, 1])
    if lx <= 0 or ly <= 0 or cell[2, 2] <= 0:
        raise ValueError(f"atoms: cell lengths must be positive, got {np.diag(cell).tolist()}")
    return lx, ly


def single_atom_heights(atoms: Atoms, x, y, counts, cell_xy) -> np.ndarray:
    """Height [Å] of the atom of each single-atom column above the specimen's mid-plane
    (the mean atom height, where ``C10`` is measured); 0 for the other columns.

    The atom is the one within 0.3 Å of the column position (periodic in ``cell_xy``);
    a column without one gets 0. Pure: arrays and atoms in, an array out.
    """
    from scipy.spatial import cKDTree

    counts = np.asarray(counts)
    z_A = np.zeros(counts.shape[0])
    single = np.flatnonzero(counts.sum(axis=1) == 1)
    if single.size == 0 or len(atoms) == 0:
        return z_A
    pos = atoms.positions
    box = np.asarray(cell_xy, dtype=np.float64)

    def wrap(xy):
        xy = np.mod(xy, box)
        return np.where(xy >= box, 0.0, xy)  # -1e-17 % L == L

    tree = cKDTree(wrap(pos[:, :2]), boxsize=box)
    points = wrap(np.stack([np.asarray(x)[single], np.asarray(y)[single]], axis=1))
    dist, idx = tree.query(points, distance_upper_bound=0.3)
    found = np.isfinite(dist)
    z_A[single[found]] = pos[idx[found], 2] - float(np.mean(pos[:, 2]))
    return z_A


def _check_columns(columns) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    from ase.data import atomic_numbers

    for name in ("x", "y", "counts", "elements"):
        if not hasattr(columns, name):
            raise ValueError(f"columns: missing attribute {name!r} (need x, y, counts, elements)")
    x = np.asarray(columns.x, dtype=np.float64).ravel()
    y = np.asarray(columns.y, dtype=np.float64).ravel()
    elements = tuple(str(e) for e in columns.elements)
    counts = np.asarray(columns.counts)
    if counts.ndim == 1 and len(elements) == 1:
        counts = counts[:, None]
    if x.shape != y.shape or counts.shape != (x.size, len(elements)):
        raise ValueError(
            f"columns: x {x.shape}, y {y.shape} and counts {counts.shape} disagree with "
            f"{len(elements)} elements"
        )
    if np.any(counts < 0):
        raise ValueError("columns.counts: must be >= 0")
    bad = [e for e in elements if e not in atomic_numbers]
    if bad:
        raise ValueError(f"columns.elements: unknown element symbol {bad[0]!r}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("columns: x and y must be finite")
    return x, y, counts.astype(np.int64), elements


def resolve_window(
    cell_xy: tuple[float, float],
    pixel_size_A: float,
    window: tuple[float, float, float, float] | None = None,
    shape: tuple[int, int] | None = None,
    origin: tuple[float, float] | None = None,
) -> tuple[float, float, int, int]:
    """Turn a window or a shape + origin into ``(x0, y0, H, W)`` and check it.

    Parameters
    ----------
    cell_xy : (float, float)
        Cell lengths along x and y [Å].
    pixel_size_A : float
        Pixel size [Å].
    window : (x0, y0, width, height), optional
        Field of view [Å]; ``W = round(width / p)``, ``H = round(height / p)``.
    shape : (H, W), optional
        Image shape [px], with ``origin`` ``(x0, y0)`` [Å] (default ``(0, 0)``).
    origin : (x0, y0), optional
        Position of pixel (0, 0) [Å] when ``shape`` is given.

    Returns
    -------
    (x0, y0, H, W)
        The default (neither given) is the whole cell.
    """
    p = float(pixel_size_A)
    lx, ly = cell_xy
    if window is not None and shape is not None:
        raise ValueError("window: give either window=(x0, y0, width, height) or shape+origin")
    if window is not None:
        if len(window) != 4:
            raise ValueError(f"window: expected (x0, y0, width, height) in Å, got {window!r}")
        x0, y0, wx, wy = (float(v) for v in window)
        if not (wx > 0 and wy > 0):
            raise ValueError(f"window: width and height must be > 0, got {wx}, {wy}")
        h, w = max(1, int(round(wy / p))), max(1, int(round(wx / p)))
    elif shape is not None:
        if len(shape) != 2 or min(int(s) for s in shape) < 1:
            raise ValueError(f"shape: expected (H, W) >= 1, got {shape!r}")
        h, w = int(shape[0]), int(shape[1])
        x0, y0 = (0.0, 0.0) if origin is None else (float(origin[0]), float(origin[1]))
    else:
        if origin is not None:
            raise ValueError("origin: give it together with shape")
        x0, y0 = 0.0, 0.0
        h, w = max(1, int(math.floor(ly / p + 1e-9))), max(1, int(math.floor(lx / p + 1e-9)))
    tol = 1e-6
    x1, y1 = x0 + (w - 1) * p, y0 + (h - 1) * p
    if x0 < -tol or y0 < -tol or x1 > lx + tol or y1 > ly + tol:
        raise ValueError(
            f"window: pixels span x {x0:.3f}..{x1:.3f} Å, y {y0:.3f}..{y1:.3f} Å, outside "
            f"the cell 0..{lx:.3f} x 0..{ly:.3f} Å"
        )
    return x0, y0, h, w


@contextlib.contextmanager
def _quiet_abtem():
    """Silence abTEM's warnings and keep its Dask graphs on the calling thread."""
    import dask

    with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
        warnings.filterwarnings("ignore", module="abtem")
        warnings.filterwarnings("ignore", message=".*interpolation factor does not exactly")
        yield


# -- abTEM reference models --------------------------------------------------------------------
def _scan_layout(p, h, w, optics, scan_sampling_A):
    """Scan step, sub-sampling factor and margin (in scan steps) of a reference scan."""
    nyq = nyquist_sampling_A(optics)
    sigma_src = optics["source_size_A"] * FWHM_TO_SIGMA
    if scan_sampling_A is None:
        m = max(1, math.ceil(p / nyq - 1e-9))
        s = p / m
        resample = False
    else:
        s = float(scan_sampling_A)
        if not 0 < s <= nyq * (1 + 1e-9):
            raise ValueError(
                f"scan_sampling_A: must be in (0, {nyq:.4f}] Å (Nyquist for these optics), "
                f"got {scan_sampling_A}"
            )
        m, resample = 1, True
    margin = math.ceil(4.0 * sigma_src / s) + (4 if resample else 0)
    if resample:
        nsx = math.ceil((w - 1) * p / s) + 1 + 2 * margin
        nsy = math.ceil((h - 1) * p / s) + 1 + 2 * margin
    else:
        nsx = m * (w - 1) + 1 + 2 * margin
        nsy = m * (h - 1) + 1 + 2 * margin
    return s, m, margin, (nsx, nsy), resample


def plane_slices(
    z_A, depth_A: float, max_thickness_A: float, *, gap_A: float = 0.5, below_A: float = 0.05
) -> tuple[float, ...]:
    """Slice thicknesses [Å] whose slices start just below each atomic plane.

    abTEM applies a slice's projected potential at the slice's entrance and then
    propagates through the whole slice, so an atom acts as if it sat on the entrance plane
    of its slice. Starting a slice ``below_A`` under each plane of atoms (planes: sorted
    heights split at gaps > ``gap_A``) puts every atom within ``below_A`` of where it acts;
    the gaps are cut into equal slices no thicker than ``max_thickness_A``.

    Parameters
    ----------
    z_A : array
        Atom heights [Å] (inside ``[0, depth_A)``).
    depth_A : float
        Cell depth along z [Å].
    max_thickness_A : float
        Thickest slice allowed [Å].
    """
    z = np.sort(np.asarray(z_A, dtype=np.float64))
    edges = [0.0]
    if z.size:
        starts = np.concatenate([[z[0]], z[1:][np.diff(z) > gap_A]])
        for start in starts:
            edge = max(0.0, float(start) - below_A)
            if edge > edges[-1] + 1e-3:
                edges.append(edge)
    if depth_A > edges[-1] + 1e-3:
        edges.append(float(depth_A))
    else:
        edges[-1] = float(depth_A)
    out: list[float] = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        n = max(1, math.ceil((hi - lo) / max_thickness_A - 1e-9))
        out += [(hi - lo) / n] * n
    return tuple(out)


def _crop_atoms(atoms, lo, hi):
    """Atoms inside the box ``[lo, hi)`` (x, y) moved to a new orthogonal cell."""
    from ase import Atoms

    pos = atoms.positions
    keep = (pos[:, 0] >= lo[0]) & (pos[:, 0] < hi[0]) & (pos[:, 1] >= lo[1]) & (pos[:, 1] < hi[1])
    new = Atoms(
        numbers=atoms.numbers[keep],
        positions=pos[keep] - np.array([lo[0], lo[1], 0.0]),
        cell=[hi[0] - lo[0], hi[1] - lo[1], float(atoms.cell[2, 2])],
        pbc=True,
    )
    return new


def _max_sigma(sigma) -> float:
    if isinstance(sigma, Mapping):
        return float(max(np.max(v) for v in sigma.values())) if sigma else 0.0
    return float(np.max(sigma))


def check_potential_sampling(optics, potential_sampling_A: float) -> None:
    """Raise ``ValueError`` unless a wave grid of ``potential_sampling_A`` [Å] resolves
    scattering out to ``optics["haadf_outer_mrad"]`` (abTEM's 2/3 antialias cutoff)."""
    lam = wavelength_A(optics["energy_kV"])
    cutoff_mrad = 2.0 / 3.0 / (2.0 * potential_sampling_A) * lam * 1e3
    if cutoff_mrad < optics["haadf_outer_mrad"]:
        raise ValueError(
            f"potential_sampling_A: {potential_sampling_A} Å resolves scattering only to "
            f"{cutoff_mrad:.0f} mrad < haadf_outer_mrad {optics['haadf_outer_mrad']:g}; use "
            f"<= {2.0 / 3.0 / 2.0 * lam * 1e3 / optics['haadf_outer_mrad']:.4f} Å"
        )


def _reference_specimen(atoms, cell_xy, optics, layout, origin, settings, rng):
    """The atoms abTEM sees (cropped box or the periodic cell, frozen phonons), its
    potential grid and slices, the scan start in that box and the focal plane height."""
    import abtem

    s, _, margin, (nsx, nsy), _ = layout
    sx0, sy0 = origin[0] - margin * s, origin[1] - margin * s
    if settings.periodic:
        work, box = atoms, cell_xy
    else:
        pad = probe_radius_A(optics)
        lo = (sx0 - pad, sy0 - pad)
        hi = (sx0 + (nsx - 1) * s + pad, sy0 + (nsy - 1) * s + pad)
        work = _crop_atoms(atoms, lo, hi)
        box = (hi[0] - lo[0], hi[1] - lo[1])
        sx0, sy0 = sx0 - lo[0], sy0 - lo[1]
    # abTEM focuses the probe on the entrance plane of the potential (z = 0); C10 here is
    # measured from the specimen's mid-plane (mean atom height), as the incoherent model
    # assumes: propagating dz adds dz to C10, so abTEM gets C10 - z_mid.
    z_mid = float(np.mean(work.positions[:, 2])) if len(work) else 0.5 * float(work.cell[2, 2])
    f = int(settings.interpolation) if settings.model == "prism" else 1
    step = float(settings.potential_sampling_A)
    gpts = tuple(f * math.ceil(math.ceil(length / step) / f / 2) * 2 for length in box)
    n_fp = int(settings.frozen_phonons)
    below = 0.05 + (3.0 * _max_sigma(settings.phonon_sigma_A) if n_fp > 0 else 0.0)
    slices = plane_slices(
        np.mod(work.positions[:, 2], work.cell[2, 2]) if len(work) else [],
        float(work.cell[2, 2]),
        float(settings.slice_thickness_A),
        below_A=below,
    )
    if n_fp > 0:
        seed = int(as_rng(rng).integers(2**31 - 1))
        work = abtem.FrozenPhonons(
            work, num_configs=n_fp, sigmas=settings.phonon_sigma_A, seed=seed
        )
    return work, gpts, slices, (sx0, sy0), z_mid, f


def _common_step_mrad(detectors_mrad) -> float | None:
    """The largest of 10, 5, 2, 1, 0.5 mrad that divides every detector edge, or None.

    The detectors of a series (``detectors_mrad`` given) are read from one radially binned
    detector with this bin width (an annular detector integrates the diffraction pattern
    once per detector: 2 s per detector and scan of a calibration cell on two CPU cores),
    so every node of a detector grid is computed the same way whichever nodes are
    computed together. On a GPU abTEM's binning kernel runs one thread per bin: not
    measured there yet."""
    edges = [float(v) for pair in detectors_mrad for v in pair]
    for step in (10.0, 5.0, 2.0, 1.0, 0.5):
        if all(abs(v / step - round(v / step)) < 1e-9 for v in edges):
            return step
    return None


def _abtem_scan(
    work,
    gpts,
    slices,
    start,
    z_mid,
    f,
    optics,
    layout,
    settings,
    device,
    dC10_A=(0.0,),  # noqa: N803 - the optics' name
    detectors_mrad=None,
    potential_scale=None,
):
    """Focal-spread average of the HAADF signal of an abTEM scan, ``[x, y]`` float64, one
    per defocus change in ``dC10_A`` [Å] and detector ``(inner, outer)`` in
    ``detectors_mrad`` (default: the optics' detector), defocus-major. PRISM builds its
    S-matrix once for all of them; every detector reads the same exit waves."""
    import abtem

    s, _, _, (nsx, nsy), _ = layout
    sx0, sy0 = start
    xp = get_array_module(device)
    nodes, weights = focal_quadrature(optics["focal_spread_A"], int(settings.focal_points))
    energy = optics["energy_kV"] * 1e3
    alpha = optics["semiangle_mrad"]
    with _quiet_abtem():
        binned = detectors_mrad is not None  # a series: every detector read the same way
        if detectors_mrad is None:
            detectors_mrad = [(optics["haadf_inner_mrad"], optics["haadf_outer_mrad"])]
        n_det = len(detectors_mrad)
        step = _common_step_mrad(detectors_mrad) if binned else None
        if step is not None:  # one radially binned detector read out per annulus
            top = max(float(b) for _, b in detectors_mrad)
            detectors = [
                abtem.FlexibleAnnularDetector(step_size=step, outer=top, to_cpu=device == "cpu")
            ]
        else:
            detectors = [
                abtem.AnnularDetector(inner=float(a), outer=float(b), to_cpu=device == "cpu")
                for a, b in detectors_mrad
            ]
        scan = abtem.GridScan(start=(sx0, sy0), end=(sx0 + nsx * s, sy0 + nsy * s), gpts=(nsx, nsy))
        acc = [None] * (len(dC10_A) * n_det)
        potentials = _potentials(work, gpts, slices, energy, settings, device, potential_scale)
        for potential, share in potentials:
            if settings.model == "prism":
                smatrix = abtem.SMatrix(
                    potential=potential,
                    energy=energy,
                    semiangle_cutoff=alpha,
                    interpolation=f,
                    device=device,
                ).build(lazy=False)
            for n_df, (node, weight) in itertools.product(
                range(len(dC10_A)), zip(nodes, weights, strict=True)
            ):
                shift = float(node) + float(dC10_A[n_df]) - z_mid
                aberrations = abtem_aberrations(optics, dC10_A=shift)
                if settings.model == "prism":
                    ctf = abtem.CTF(
                        semiangle_cutoff=alpha, energy=energy, aberration_coefficients=aberrations
                    )
                    meas = smatrix.reduce(scan=scan, ctf=ctf, detectors=detectors)
                else:
                    probe = abtem.Probe(
                        energy=energy,
                        semiangle_cutoff=alpha,
                        aberrations=aberrations,
                        device=device,
                    )
                    meas = probe.scan(potential, scan=scan, detectors=detectors, lazy=False)
                if not isinstance(meas, list | tuple):
                    meas = [meas]
                if step is not None:
                    meas = [meas[0].integrate_radial(float(a), float(b)) for a, b in detectors_mrad]
                for k, one in enumerate(meas):
                    arr = xp.asarray(one.array, dtype=xp.float64)
                    while arr.ndim > 2:  # any ensemble axis left (frozen phonons): plain mean
                        arr = arr.mean(axis=0)
                    term = (weight * share) * arr
                    n = n_df * n_det + k
                    acc[n] = term if acc[n] is None else acc[n] + term
    return acc, len(nodes)


def _potentials(work, gpts, slices, energy, settings, device, potential_scale=None):
    """``(potential, weight)`` per configuration: abTEM's own potential (its frozen-phonon
    ensemble inside) with ``transmission_supersampling = 1`` and no ``potential_scale``,
    else one band-limited transmission function per frozen-phonon configuration (built as
    it is needed; ``potential_scale``: atomic number -> factor on its potential)."""
    import abtem

    factor = int(settings.transmission_supersampling)
    if factor == 1 and not potential_scale:
        yield abtem.Potential(work, gpts=gpts, slice_thickness=slices, device=device), 1.0
        return
    from simgen.transmission import band_limited_transmission

    configs = list(work) if isinstance(work, abtem.FrozenPhonons) else [work]
    for atoms in configs:
        tf = band_limited_transmission(
            atoms, gpts, slices, energy, factor=factor, potential_scale=potential_scale,
            device=device,
        )  # fmt: skip
        yield tf, 1.0 / len(configs)


def _scan_to_pixels(img, optics, layout, p, h, w):
    """Source-size blur of the scanned image, then its values at the requested pixels."""
    xp = get_array_module(img)
    s, m, margin, (nsx, nsy), resample = layout
    sigma_src = optics["source_size_A"] * FWHM_TO_SIGMA
    if sigma_src > 0:
        fft = get_scipy_submodule(xp, "fft")
        ky = xp.fft.fftfreq(nsy, d=s)
        kx = xp.fft.rfftfreq(nsx, d=s)
        env = xp.exp(-2.0 * math.pi**2 * sigma_src**2 * (ky[:, None] ** 2 + kx[None, :] ** 2))
        img = fft.irfft2(fft.rfft2(img) * env, s=(nsy, nsx))
    if resample:
        ndi = get_scipy_submodule(img, "ndimage")
        rr = margin + (xp.arange(h, dtype=xp.float64) * p) / s
        cc = margin + (xp.arange(w, dtype=xp.float64) * p) / s
        coords = xp.stack(xp.meshgrid(rr, cc, indexing="ij"))
        return ndi.map_coordinates(img, coords, order=5, mode="nearest")
    return img[margin : margin + m * (h - 1) + 1 : m, margin : margin + m * (w - 1) + 1 : m]


def _potential_scale(atoms, optics) -> dict:
    """Potential factor per atomic number for the optics' Z-exponent shift (empty at 0)."""
    shift = float(optics.get("z_exponent_shift", 0.0))
    return z_exponent_potential_scale(atoms.numbers, shift, Z_EXPONENT_REFERENCE)


def _record_potential_scale(info: dict, scale: dict) -> None:
    """Record the potential factors by element in a result's ``info``."""
    if scale:
        from ase.data import chemical_symbols

        info["potential_scale"] = {chemical_symbols[z]: v for z, v in sorted(scale.items())}


def _reference(
    atoms,
    cell_xy,
    optics,
    geom,
    settings: SimulationSettings,
    device,
    rng,
    dC10_A=None,  # noqa: N803 - the optics' name
    detectors_mrad=None,
    potential_scale=None,
):
    """PRISM or multislice image of the window ``geom`` and the numerical settings used;
    with ``dC10_A`` [Å] (and ``detectors_mrad``) a list of images, one per defocus change
    and detector, defocus-major (one S-matrix)."""
    x0, y0, h, w, p = geom
    check_potential_sampling(optics, float(settings.potential_sampling_A))
    layout = _scan_layout(p, h, w, optics, settings.scan_sampling_A)
    work, gpts, slices, start, z_mid, f = _reference_specimen(
        atoms, cell_xy, optics, layout, (x0, y0), settings, rng
    )
    series = dC10_A is not None or detectors_mrad is not None
    shifts = (0.0,) if dC10_A is None else tuple(float(d) for d in dC10_A)
    acc, n_nodes = _abtem_scan(
        work, gpts, slices, start, z_mid, f, optics, layout, settings, device, shifts,
        detectors_mrad, potential_scale,
    )  # fmt: skip
    outs = [_scan_to_pixels(a.T, optics, layout, p, h, w) for a in acc]  # [x, y] -> [y, x]
    s, _, _, (nsx, nsy), resample = layout
    info = {
        "scan_step_A": s,
        "scan_shape": (nsy, nsx),
        "potential_gpts": gpts,
        "potential_sampling_A": float(settings.potential_sampling_A),
        "transmission_supersampling": int(settings.transmission_supersampling),
        "slice_thickness_A": float(settings.slice_thickness_A),
        "n_slices": len(slices),
        "interpolation": f,
        "frozen_phonons": int(settings.frozen_phonons),
        "focal_points": int(n_nodes),
        "resampled": resample,
        "focal_plane_z_A": z_mid,
    }
    xp = get_array_module(outs[0])
    images = [xp.ascontiguousarray(o, dtype=xp.float32) for o in outs]
    return (images if series else images[0]), info


# -- public entry point ------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationSettings(Config):
    """How :func:`simulate` images a cell: model, window and numerical settings.

    Parameters
    ----------
    model : {"incoherent", "prism", "multislice"}
        Image model.
    pixel_size_A : float, optional
        Pixel size [Å]; default ``optics["pixel_size_A"]``.
    window : (x0, y0, width, height), optional
        Field of view [Å] in the cell frame; it may be any part of the cell (the caller
        may ask for more than the final image, e.g. for scan-distortion padding).
    shape, origin : (H, W) and (x0, y0), optional
        Alternative to ``window``: image shape [px] and position of pixel (0, 0) [Å].
        Without either the whole cell is imaged.
    interpolation : int
        PRISM interpolation factor (1 = exact).
    frozen_phonons : int
        Frozen-phonon configurations for ``prism``/``multislice`` (0 = static lattice).
        The incoherent model ignores it (thermal smearing is in its calibrated widths;
        calibrate against a frozen-phonon reference to include it), as it ignores the
        other abTEM settings below.
    phonon_sigma_A : float or mapping
        Displacement standard deviation per direction [Å] (or per element).
    potential_sampling_A : float
        Grid step of the waves and transmission functions [Å] for ``prism``/``multislice``;
        must resolve the outer detector angle (0.05 Å does up to 279 mrad at 80 kV).
    transmission_supersampling : int
        The potential is built this many times finer than ``potential_sampling_A``, with
        exact atom positions, and its transmission function band-limited into the wave
        grid (:func:`simgen.transmission.band_limited_transmission`). 4 (default) makes a
        lone atom's HAADF independent of its sub-pixel position to <= 0.71 % at 0.05 Å
        (11.2 % for W with abTEM's plain potential, ``1``).
    slice_thickness_A : float
        Multislice slice thickness [Å].
    focal_points : int
        Gauss–Hermite nodes of the focal-spread average (used when ``focal_spread_A`` >
        0); every model uses the same nodes.
    scan_sampling_A : float, optional
        ``prism``/``multislice`` only: scan on this step (<= Nyquist) and resample to the
        pixels with quintic splines, instead of scanning the pixel positions directly
        (fewer probe positions; error <= 1 % of the image maximum at 0.9 x Nyquist).
    periodic : bool
        Treat the cell as one period of an infinite crystal (small test/calibration cells);
        the default treats it as a finite piece with real structure in its margin.
    device : {"cpu", "gpu", "auto"}
        Where to compute; on ``gpu`` the image is a CuPy array.
    """

    model: str = "incoherent"
    pixel_size_A: float | None = None
    window: tuple[float, float, float, float] | None = None
    shape: tuple[int, int] | None = None
    origin: tuple[float, float] | None = None
    interpolation: int = 2
    frozen_phonons: int = 0
    phonon_sigma_A: float | dict[str, float] = 0.07
    potential_sampling_A: float = 0.05
    transmission_supersampling: int = 4
    slice_thickness_A: float = 1.0
    focal_points: int = 7
    scan_sampling_A: float | None = None
    periodic: bool = False
    device: str = "cpu"

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {MODELS}, got {self.model!r}")
        if self.pixel_size_A is not None and not 0 < self.pixel_size_A <= 5.0:
            raise ValueError(f"pixel_size_A: expected 0 < p <= 5 Å, got {self.pixel_size_A}")
        for name, low in (
            ("interpolation", 1),
            ("frozen_phonons", 0),
            ("focal_points", 1),
            ("transmission_supersampling", 1),
        ):
            value = getattr(self, name)
            if int(value) != value or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not 0 < self.potential_sampling_A <= 0.2:
            raise ValueError(
                f"potential_sampling_A: expected 0 < s <= 0.2 Å, got {self.potential_sampling_A}"
            )
        if not self.slice_thickness_A > 0:
            raise ValueError(f"slice_thickness_A: must be > 0, got {self.slice_thickness_A}")


def _settings(settings: SimulationSettings | None, overrides: dict) -> SimulationSettings:
    settings = SimulationSettings() if settings is None else settings
    if not isinstance(settings, SimulationSettings):
        raise ValueError(f"settings: expected a SimulationSettings, got {type(settings)!r}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SimulationSettings)})
    if unknown:
        raise TypeError(f"simulate() got an unexpected keyword argument {unknown[0]!r}")
    return dataclasses.replace(settings, **overrides) if overrides else settings


def simulate(
    atoms: Atoms,
    columns,
    optics: Mapping[str, float] | OpticsConfig | None = None,
    settings: SimulationSettings | None = None,
    *,
    calibration: Calibration | DetectorGrid | None = None,
    rng=None,
    **overrides,
) -> Simulated:
    """Simulate the noise-free HAADF image of a window of a cell.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure with an orthogonal cell and vacuum along z. Used by ``prism`` and
        ``multislice``; the incoherent model uses only its cell (for checks and
        ``periodic``).
    columns : object with ``x, y, counts, elements``
        The projected columns (e.g. ``structures.ColumnTable`` or :class:`Columns`);
        positions [Å] in the cell frame. The incoherent model images these; all models
        return their pixel positions.
    optics : mapping or OpticsConfig, optional
        Drawn optics values (:meth:`OpticsConfig.draw`); missing keys take the defaults.
        An ``OpticsConfig`` is drawn with ``rng``.
    settings : SimulationSettings, optional
        Model, window and numerical settings (default :class:`SimulationSettings()`).
    calibration : Calibration or DetectorGrid, optional
        Required by the incoherent model; recorded in the result. A detector grid renders
        the optics' detector as the weighted sum of the images of the nodes around it
        (:meth:`DetectorGrid.corners`) and records :meth:`DetectorGrid.at_detector`.
    rng : Generator, int or None
        Random source (frozen-phonon displacements, drawing an ``OpticsConfig``).
    **overrides
        Fields of :class:`SimulationSettings` to change for this call, e.g.
        ``model="prism", pixel_size_A=0.2``.

    Returns
    -------
    Simulated
    """
    settings = _settings(settings, overrides)
    device = resolve_device(settings.device)
    rng = as_rng(rng)
    optics = optics_values(optics, rng=rng)
    p = float(optics["pixel_size_A"] if settings.pixel_size_A is None else settings.pixel_size_A)
    if not 0 < p <= 5.0:
        raise ValueError(f"pixel_size_A: expected 0 < p <= 5 Å, got {settings.pixel_size_A}")
    optics["pixel_size_A"] = p
    cell_xy = _cell_xy(atoms)
    x, y, counts, elements = _check_columns(columns)
    x0, y0, h, w = resolve_window(cell_xy, p, settings.window, settings.shape, settings.origin)
    geom = (x0, y0, h, w, p)
    if settings.model == "incoherent":
        detector = (optics["haadf_inner_mrad"], optics["haadf_outer_mrad"])
        if isinstance(calibration, DetectorGrid):  # the weighted images of the nodes
            parts = calibration.corners(*detector)
            calibration = calibration.at_detector(*detector)
        else:
            parts = [(calibration, 1.0)]
        check_calibration(calibration, optics)
        # the textbook point-sum model keeps one probe for every atom
        pointsum = calibration.reference.get("model") == "pointsum"
        heights = None if pointsum else single_atom_heights(atoms, x, y, counts, cell_xy)
        image = None
        shift = float(optics.get("z_exponent_shift", 0.0))
        for node, weight in parts:
            node = node.with_z_exponent_shift(shift)
            node_optics = {
                **optics,
                "haadf_inner_mrad": node.haadf_inner_mrad,
                "haadf_outer_mrad": node.haadf_outer_mrad,
            }
            part, info = render_incoherent(
                x, y, counts, elements, node_optics, node, geom,
                cell_xy=cell_xy, periodic=settings.periodic,
                focal_points=int(settings.focal_points), device=device, z_A=heights,
            )  # fmt: skip
            part = part if len(parts) == 1 else part * np.float32(weight)
            image = part if image is None else image + part
        if len(parts) > 1:
            info["detector_nodes_mrad"] = [
                (n.haadf_inner_mrad, n.haadf_outer_mrad, w) for n, w in parts
            ]
    else:
        if len(atoms) == 0:
            raise ValueError("atoms: the structure holds no atoms")
        scale = _potential_scale(atoms, optics)
        image, info = _reference(
            atoms, cell_xy, optics, geom, settings, device, rng, potential_scale=scale
        )
        _record_potential_scale(info, scale)
        calibration = None
    info["periodic"] = bool(settings.periodic)
    return Simulated(
        image=image,
        rows=(y - y0) / p,
        cols=(x - x0) / p,
        params=dict(optics),
        model=settings.model,
        pixel_size_A=p,
        origin_A=(x0, y0),
        calibration_key=None if calibration is None else calibration.key,
        calibration=calibration,
        info=info,
        columns=columns,
    )


def simulate_defocus_series(
    atoms: Atoms,
    columns,
    optics: Mapping[str, float] | OpticsConfig | None,
    C10_A,  # noqa: N803 - the optics' name
    settings: SimulationSettings | None = None,
    *,
    rng=None,
    **overrides,
) -> list[Simulated]:
    """:func:`simulate` of a ``prism``/``multislice`` image at several defoci at once.

    PRISM builds the S-matrix once and reduces it per defocus (a defocus series costs
    little more than one image); the frozen-phonon configurations are the same for all.

    Parameters
    ----------
    atoms, columns, optics, settings, rng, **overrides
        As :func:`simulate` (``model`` must be ``prism`` or ``multislice``).
    C10_A : sequence of float
        The defoci [Å] (``C10``; replaces ``optics["C10_A"]``).

    Returns
    -------
    list of Simulated
        One per defocus, in order.
    """
    return simulate_series(atoms, columns, optics, settings, C10_A=C10_A, rng=rng, **overrides)


def simulate_series(
    atoms: Atoms,
    columns,
    optics: Mapping[str, float] | OpticsConfig | None,
    settings: SimulationSettings | None = None,
    *,
    C10_A=None,  # noqa: N803 - the optics' name
    detectors_mrad=None,
    rng=None,
    **overrides,
) -> list[Simulated]:
    """:func:`simulate` of a ``prism``/``multislice`` image at several defoci and HAADF
    detectors at once, from one set of exit waves.

    The S-matrix (or every multislice exit wave) does not depend on the defocus or the
    detector: it is built once, then reduced per defocus and read by every detector, so
    a series costs little more than one image.

    Parameters
    ----------
    atoms, columns, optics, settings, rng, **overrides
        As :func:`simulate` (``model`` must be ``prism`` or ``multislice``).
    C10_A : sequence of float, optional
        The defoci [Å] (replace ``optics["C10_A"]``); default the optics' own.
    detectors_mrad : sequence of (float, float), optional
        Annular detectors ``(inner, outer)`` [mrad]; default the optics' own.

    Returns
    -------
    list of Simulated
        One per (defocus, detector), defocus-major; each one's ``params`` hold its
        ``C10_A``, ``haadf_inner_mrad`` and ``haadf_outer_mrad``.
    """
    settings = _settings(settings, overrides)
    if settings.model not in ("prism", "multislice"):
        raise ValueError(
            f"model: a defocus or detector series needs prism or multislice, got {settings.model!r}"
        )
    device = resolve_device(settings.device)
    rng = as_rng(rng)
    optics = optics_values(optics, rng=rng)
    p = float(optics["pixel_size_A"] if settings.pixel_size_A is None else settings.pixel_size_A)
    optics["pixel_size_A"] = p
    defoci = [float(optics["C10_A"])] if C10_A is None else [float(c) for c in C10_A]
    if not defoci:
        raise ValueError("C10_A: give at least one defocus")
    if detectors_mrad is None:
        detectors = [(optics["haadf_inner_mrad"], optics["haadf_outer_mrad"])]
    else:
        detectors = [(float(a), float(b)) for a, b in detectors_mrad]
    if not detectors:
        raise ValueError("detectors_mrad: give at least one (inner, outer) pair")
    for a, b in detectors:
        if not 0.0 <= a < b:
            raise ValueError(
                f"detectors_mrad: expected 0 <= inner < outer [mrad], got ({a:g}, {b:g})"
            )
    if len(set(detectors)) != len(detectors):
        raise ValueError(f"detectors_mrad: a detector is listed twice: {detectors}")
    top = max(b for _, b in detectors)
    check_potential_sampling({**optics, "haadf_outer_mrad": top}, settings.potential_sampling_A)
    base = defoci[0]
    cell_xy = _cell_xy(atoms)
    x, y, _, _ = _check_columns(columns)
    x0, y0, h, w = resolve_window(cell_xy, p, settings.window, settings.shape, settings.origin)
    if len(atoms) == 0:
        raise ValueError("atoms: the structure holds no atoms")
    scale = _potential_scale(atoms, optics)  # calibrations draw no shift: empty for them
    images, info = _reference(
        atoms, cell_xy, {**optics, "C10_A": base}, (x0, y0, h, w, p), settings, device, rng,
        dC10_A=[c - base for c in defoci],
        detectors_mrad=None if detectors_mrad is None else detectors,
        potential_scale=scale,
    )  # fmt: skip
    _record_potential_scale(info, scale)
    info["periodic"] = bool(settings.periodic)
    keys = [(c, a, b) for c in defoci for a, b in detectors]
    return [
        Simulated(
            image=img,
            rows=(y - y0) / p,
            cols=(x - x0) / p,
            params={**optics, "C10_A": c, "haadf_inner_mrad": a, "haadf_outer_mrad": b},
            model=settings.model,
            pixel_size_A=p,
            origin_A=(x0, y0),
            calibration_key=None,
            calibration=None,
            info=dict(info),
            columns=columns,
        )
        for (c, a, b), img in zip(keys, images, strict=True)
    ]
