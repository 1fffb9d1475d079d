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

    sim = simulate(atoms, columns, optics, model="incoherent", pixel_size_A=None,
                   window=(x0, y0, width, height) | None, shape=(H, W) | None,
                   origin=(x0, y0) | None, calibration=cal, interpolation=2,
                   frozen_phonons=0, phonon_sigma_A=0.07, potential_sampling_A=0.05,
                   slice_thickness_A=1.0, focal_points=7, scan_sampling_A=None,
                   periodic=False, device="cpu", rng=None)
    sim.image            # float32 [H, W], NumPy or CuPy (device="gpu")
    sim.rows, sim.cols   # every column's sub-pixel position, same order as ``columns``
    sim.params           # optics values used (store them per sample)
    sim.calibration_key  # the incoherent model's calibration (None for prism/multislice)

``columns`` is anything with ``x, y, counts, elements`` (``structures.ColumnTable``, or
:class:`Columns`). :class:`IncoherentRenderer` is the incoherent model's engine (one
probe kernel, many renders), used by :mod:`simgen.calibrate`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from simgen.backend import get_array_module, get_scipy_submodule, resolve_device, to_numpy
from simgen.distributions import as_rng
from simgen.optics import (
    OpticsConfig,
    abtem_aberrations,
    focal_quadrature,
    nyquist_sampling_A,
    optics_values,
    probe_intensity,
    probe_radius_A,
    wavelength_A,
)

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms

    from simgen.calibrate import Calibration

__all__ = [
    "MODELS",
    "Columns",
    "IncoherentRenderer",
    "Simulated",
    "column_peaks",
    "plane_slices",
    "resolve_window",
    "simulate",
]

MODELS = ("incoherent", "prism", "multislice")

#: The incoherent model's grid step is at most this fraction of the Nyquist step.
NYQUIST_FRACTION = 0.9

#: Largest object-peak width [Å] the incoherent model accepts (sizes its FFT padding).
MAX_WIDTH_A = 0.5

#: Calibration optics may differ from the simulated ones by this relative amount.
CALIBRATION_RTOL = 0.02

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


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
        :attr:`Calibration.key` of the calibration that produced an incoherent image.
    calibration : Calibration or None
        That calibration.
    info : dict
        Numerical settings of the run (grid steps, interpolation, frozen phonons...).
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


# -- input checks ---------------------------------------------------------------------------
def _cell_xy(atoms: Atoms) -> tuple[float, float]:
    cell = np.asarray(atoms.cell[:])
    if cell.shape != (3, 3) or not np.allclose(cell - np.diag(np.diag(cell)), 0.0, atol=1e-6):
        raise ValueError("atoms: the cell must be orthogonal (use abtem.orthogonalize_cell)")
    lx, ly = float(cell[0, 0]), float(cell[1, 1])
    if lx <= 0 or ly <= 0 or cell[2, 2] <= 0:
        raise ValueError(f"atoms: cell lengths must be positive, got {np.diag(cell).tolist()}")
    return lx, ly


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


def _sim_step(pixel_size_A: float, optics: Mapping[str, float]) -> tuple[float, int]:
    """Simulation step ``p / m`` with the smallest ``m`` that keeps it below Nyquist."""
    nyq = NYQUIST_FRACTION * nyquist_sampling_A(optics)
    m = max(1, math.ceil(pixel_size_A / nyq - 1e-9))
    return pixel_size_A / m, m


@contextlib.contextmanager
def _quiet_abtem():
    """Silence abTEM's warnings and keep its Dask graphs on the calling thread."""
    import dask

    with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
        warnings.filterwarnings("ignore", module="abtem")
        warnings.filterwarnings("ignore", message=".*interpolation factor does not exactly")
        yield


def _next_fast(n: int) -> int:
    from scipy.fft import next_fast_len

    return int(next_fast_len(int(n), real=True))


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
    idx, amp, sig = [], [], []
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
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return np.concatenate(idx), np.concatenate(amp), np.concatenate(sig)


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
        radius = probe_radius_A(self.optics)
        nk = 2 * math.ceil(radius / ps)
        while _next_fast(nk) != nk or nk % 2:
            nk += 2
        self.kernel_gpts = nk
        sigma_src = self.optics["source_size_A"] * _FWHM_TO_SIGMA
        self.patch_half = math.ceil(4.0 * math.hypot(MAX_WIDTH_A, self.render_sigma_A) / ps)
        pad = nk // 2 + math.ceil(4.0 * sigma_src / ps) + self.patch_half + 2
        h, w = self.shape
        ny = _next_fast(self.m * (h - 1) + 1 + 2 * pad)
        nx = _next_fast(self.m * (w - 1) + 1 + 2 * pad)
        self.pad = pad
        self.grid_shape = (ny, nx)
        self.grid_origin_A = (origin_A[0] - pad * ps, origin_A[1] - pad * ps)
        self.origin_A = (float(origin_A[0]), float(origin_A[1]))

        kernel = probe_intensity(
            self.optics,
            sampling_A=ps,
            gpts=nk,
            focal_points=focal_points,
            source=False,
            device=self.device,
        ).T  # abTEM [x, y] -> [y, x]
        # The image is a correlation with the probe, I(R) = int |P(r - R)|^2 O(r) dr, i.e. a
        # convolution with |P(-r)|^2: flip the kernel (matters for odd aberrations, C21/C23).
        kernel = xp.roll(kernel[::-1, ::-1], 1, axis=(0, 1))
        k0 = xp.fft.ifftshift(kernel)  # centre to index (0, 0)
        half = nk // 2
        big = xp.zeros((ny, nx), dtype=xp.float32)
        big[:half, :half] = k0[:half, :half]
        big[:half, nx - half :] = k0[:half, half:]
        big[ny - half :, :half] = k0[half:, :half]
        big[ny - half :, nx - half :] = k0[half:, half:]
        fft = _fft(xp)
        ky = xp.fft.fftfreq(ny, d=ps).astype(xp.float32)
        kx = xp.fft.rfftfreq(nx, d=ps).astype(xp.float32)
        k2 = ky[:, None] ** 2 + kx[None, :] ** 2
        env = xp.exp(-2.0 * math.pi**2 * (sigma_src**2 - self.render_sigma_A**2) * k2)
        # |P|^2 is band-limited to 2 alpha / lambda (+ the soft aperture edge): zero the
        # float round-off beyond it, which the deconvolution of the render width amplifies.
        lam = wavelength_A(self.optics["energy_kV"])
        k_band = 2.0 * (self.optics["semiangle_mrad"] * 1e-3 / lam + 1.0 / (nk * ps))
        env = env * (k2 <= k_band**2)
        self.kernel_spectrum = (fft.rfft2(big) * env * (ps * ps)).astype(xp.complex64)

    def render(self, x_A, y_A, amplitude_A2, sigma_A):
        """Image of Gaussian object peaks convolved with the probe intensity.

        Parameters
        ----------
        x_A, y_A : array [n]
            Peak positions [Å], cell frame.
        amplitude_A2 : array [n]
            Integrated weights [Å²] (the HAADF cross-section of the peak).
        sigma_A : array [n]
            Gaussian standard deviations of the peaks [Å].

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
        keep = (u >= 0) & (u < nx) & (v >= 0) & (v < ny) & (amp != 0)
        u, v, amp, s = u[keep], v[keep], amp[keep], s[keep]
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
            norm = amp / (2.0 * math.pi * s * s)
            vals = (norm[:, None, None] * gy[:, :, None] * gx[:, None, :]).ravel()
            di = d.astype(xp.int64)
            cols = (iu.astype(xp.int64)[:, None] + di[None, :]) % nx
            rows = (iv.astype(xp.int64)[:, None] + di[None, :]) % ny
            flat = (rows[:, :, None] * nx + cols[:, None, :]).ravel()
            density = xp.bincount(flat, weights=vals, minlength=ny * nx)
            density = density.reshape(ny, nx).astype(xp.float32)
            img = fft.irfft2(fft.rfft2(density) * self.kernel_spectrum, s=(ny, nx))
        h, w = self.shape
        m, pad = self.m, self.pad
        out = img[pad : pad + m * (h - 1) + 1 : m, pad : pad + m * (w - 1) + 1 : m]
        return xp.ascontiguousarray(out, dtype=xp.float32)


def _periodic_images(x, y, cell_xy, lo, hi):
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


def _check_calibration(calibration, optics) -> None:
    from simgen.calibrate import Calibration

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


def _incoherent(x, y, counts, elements, cell_xy, optics, calibration, geom, periodic, fp, dev):
    x0, y0, h, w, p = geom
    renderer = IncoherentRenderer(optics, p, (x0, y0), (h, w), focal_points=fp, device=dev)
    col, amp, sig = column_peaks(counts, elements, calibration)
    px, py = x[col], y[col]
    if periodic and col.size:
        ny, nx = renderer.grid_shape
        lo = renderer.grid_origin_A
        hi = (lo[0] + nx * renderer.step_A, lo[1] + ny * renderer.step_A)
        sel, px, py = _periodic_images(px, py, cell_xy, lo, hi)
        amp, sig = amp[sel], sig[sel]
    image = renderer.render(px, py, amp, sig) + np.float32(calibration.background)
    info = {
        "step_A": renderer.step_A,
        "grid_shape": renderer.grid_shape,
        "kernel_gpts": renderer.kernel_gpts,
        "focal_points": len(focal_quadrature(optics["focal_spread_A"], fp)[0]),
    }
    return image, info


# -- abTEM reference models --------------------------------------------------------------------
def _scan_layout(p, h, w, optics, scan_sampling_A):
    """Scan step, sub-sampling factor and margin (in scan steps) of a reference scan."""
    nyq = nyquist_sampling_A(optics)
    sigma_src = optics["source_size_A"] * _FWHM_TO_SIGMA
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


def _reference(
    atoms,
    cell_xy,
    optics,
    geom,
    *,
    model,
    periodic,
    interpolation,
    frozen_phonons,
    phonon_sigma_A,
    potential_sampling_A,
    slice_thickness_A,
    focal_points,
    scan_sampling_A,
    device,
    rng,
):
    import abtem

    x0, y0, h, w, p = geom
    xp = get_array_module(device)
    lam = wavelength_A(optics["energy_kV"])
    cutoff_mrad = 2.0 / 3.0 / (2.0 * potential_sampling_A) * lam * 1e3
    if cutoff_mrad < optics["haadf_outer_mrad"]:
        raise ValueError(
            f"potential_sampling_A: {potential_sampling_A} Å resolves scattering only to "
            f"{cutoff_mrad:.0f} mrad < haadf_outer_mrad {optics['haadf_outer_mrad']:g}; use "
            f"<= {2.0 / 3.0 / 2.0 * lam * 1e3 / optics['haadf_outer_mrad']:.4f} Å"
        )
    s, m, margin, (nsx, nsy), resample = _scan_layout(p, h, w, optics, scan_sampling_A)
    sx0, sy0 = x0 - margin * s, y0 - margin * s
    if periodic:
        work = atoms
        box = cell_xy
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
    f = int(interpolation) if model == "prism" else 1
    gpts = tuple(
        f * math.ceil(math.ceil(length / potential_sampling_A) / f / 2) * 2 for length in box
    )
    below = 0.05 + (3.0 * _max_sigma(phonon_sigma_A) if frozen_phonons > 0 else 0.0)
    slices = plane_slices(
        np.mod(work.positions[:, 2], work.cell[2, 2]) if len(work) else [],
        float(work.cell[2, 2]),
        slice_thickness_A,
        below_A=below,
    )
    if frozen_phonons > 0:
        seed = int(as_rng(rng).integers(2**31 - 1))
        work = abtem.FrozenPhonons(
            work, num_configs=int(frozen_phonons), sigmas=phonon_sigma_A, seed=seed
        )
    nodes, weights = focal_quadrature(optics["focal_spread_A"], focal_points)
    energy = optics["energy_kV"] * 1e3
    with _quiet_abtem():
        potential = abtem.Potential(work, gpts=gpts, slice_thickness=slices, device=device)
        detector = abtem.AnnularDetector(
            inner=optics["haadf_inner_mrad"],
            outer=optics["haadf_outer_mrad"],
            to_cpu=device == "cpu",
        )
        scan = abtem.GridScan(start=(sx0, sy0), end=(sx0 + nsx * s, sy0 + nsy * s), gpts=(nsx, nsy))
        acc = None
        if model == "prism":
            smatrix = abtem.SMatrix(
                potential=potential,
                energy=energy,
                semiangle_cutoff=optics["semiangle_mrad"],
                interpolation=f,
                device=device,
            ).build(lazy=False)
        for node, weight in zip(nodes, weights, strict=True):
            aberrations = abtem_aberrations(optics, dC10_A=float(node) - z_mid)
            if model == "prism":
                ctf = abtem.CTF(
                    semiangle_cutoff=optics["semiangle_mrad"],
                    energy=energy,
                    aberration_coefficients=aberrations,
                )
                meas = smatrix.reduce(scan=scan, ctf=ctf, detectors=[detector])
            else:
                probe = abtem.Probe(
                    energy=energy,
                    semiangle_cutoff=optics["semiangle_mrad"],
                    aberrations=aberrations,
                    device=device,
                )
                meas = probe.scan(potential, scan=scan, detectors=detector, lazy=False)
            if isinstance(meas, list):
                meas = meas[0]
            arr = xp.asarray(meas.array, dtype=xp.float64)
            while arr.ndim > 2:  # any ensemble axis left (frozen phonons): plain mean
                arr = arr.mean(axis=0)
            acc = weight * arr if acc is None else acc + weight * arr
    img = acc.T  # [x, y] -> [y, x]
    sigma_src = optics["source_size_A"] * _FWHM_TO_SIGMA
    if sigma_src > 0:
        fft = _fft(xp)
        ky = xp.fft.fftfreq(nsy, d=s)
        kx = xp.fft.rfftfreq(nsx, d=s)
        env = xp.exp(-2.0 * math.pi**2 * sigma_src**2 * (ky[:, None] ** 2 + kx[None, :] ** 2))
        img = fft.irfft2(fft.rfft2(img) * env, s=(nsy, nsx))
    if resample:
        ndi = get_scipy_submodule(img, "ndimage")
        rr = margin + (xp.arange(h, dtype=xp.float64) * p) / s
        cc = margin + (xp.arange(w, dtype=xp.float64) * p) / s
        coords = xp.stack(xp.meshgrid(rr, cc, indexing="ij"))
        out = ndi.map_coordinates(img, coords, order=5, mode="nearest")
    else:
        out = img[margin : margin + m * (h - 1) + 1 : m, margin : margin + m * (w - 1) + 1 : m]
    info = {
        "scan_step_A": s,
        "scan_shape": (nsy, nsx),
        "potential_gpts": gpts,
        "potential_sampling_A": potential_sampling_A,
        "slice_thickness_A": slice_thickness_A,
        "n_slices": len(slices),
        "interpolation": f,
        "frozen_phonons": int(frozen_phonons),
        "focal_points": int(len(nodes)),
        "resampled": resample,
        "focal_plane_z_A": z_mid,
    }
    return xp.ascontiguousarray(out, dtype=xp.float32), info


# -- public entry point ------------------------------------------------------------------------
def simulate(
    atoms: Atoms,
    columns,
    optics: Mapping[str, float] | OpticsConfig | None = None,
    *,
    model: str = "incoherent",
    pixel_size_A: float | None = None,
    window: tuple[float, float, float, float] | None = None,
    shape: tuple[int, int] | None = None,
    origin: tuple[float, float] | None = None,
    calibration: Calibration | None = None,
    interpolation: int = 2,
    frozen_phonons: int = 0,
    phonon_sigma_A: float | Mapping[str, float] = 0.07,
    potential_sampling_A: float = 0.05,
    slice_thickness_A: float = 1.0,
    focal_points: int = 7,
    scan_sampling_A: float | None = None,
    periodic: bool = False,
    device: str = "cpu",
    rng=None,
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
    calibration : Calibration, optional
        Required by the incoherent model; recorded in the result.
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
        Potential grid step [Å] for ``prism``/``multislice``; must resolve the outer
        detector angle (0.05 Å does up to 279 mrad at 80 kV).
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
    rng : Generator, int or None
        Random source (frozen-phonon displacements, drawing an ``OpticsConfig``).

    Returns
    -------
    Simulated
    """
    if model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
    device = resolve_device(device)
    rng = as_rng(rng)
    optics = optics_values(optics, rng=rng)
    p = float(optics["pixel_size_A"] if pixel_size_A is None else pixel_size_A)
    if not 0 < p <= 5.0:
        raise ValueError(f"pixel_size_A: expected 0 < p <= 5 Å, got {pixel_size_A}")
    optics["pixel_size_A"] = p
    if int(interpolation) != interpolation or interpolation < 1:
        raise ValueError(f"interpolation: expected an integer >= 1, got {interpolation!r}")
    if int(frozen_phonons) != frozen_phonons or frozen_phonons < 0:
        raise ValueError(f"frozen_phonons: expected an integer >= 0, got {frozen_phonons!r}")
    if int(focal_points) != focal_points or focal_points < 1:
        raise ValueError(f"focal_points: expected an integer >= 1, got {focal_points!r}")
    if not 0 < potential_sampling_A <= 0.2:
        raise ValueError(
            f"potential_sampling_A: expected 0 < s <= 0.2 Å, got {potential_sampling_A}"
        )
    if not slice_thickness_A > 0:
        raise ValueError(f"slice_thickness_A: must be > 0, got {slice_thickness_A}")
    cell_xy = _cell_xy(atoms)
    x, y, counts, elements = _check_columns(columns)
    x0, y0, h, w = resolve_window(cell_xy, p, window, shape, origin)
    geom = (x0, y0, h, w, p)
    if model == "incoherent":
        _check_calibration(calibration, optics)
        image, info = _incoherent(
            x,
            y,
            counts,
            elements,
            cell_xy,
            optics,
            calibration,
            geom,
            periodic,
            int(focal_points),
            device,
        )
    else:
        if len(atoms) == 0:
            raise ValueError("atoms: the structure holds no atoms")
        image, info = _reference(
            atoms,
            cell_xy,
            optics,
            geom,
            model=model,
            periodic=periodic,
            interpolation=int(interpolation),
            frozen_phonons=int(frozen_phonons),
            phonon_sigma_A=phonon_sigma_A,
            potential_sampling_A=float(potential_sampling_A),
            slice_thickness_A=float(slice_thickness_A),
            focal_points=int(focal_points),
            scan_sampling_A=scan_sampling_A,
            device=device,
            rng=rng,
        )
        calibration = None
    info["periodic"] = bool(periodic)
    return Simulated(
        image=image,
        rows=(y - y0) / p,
        cols=(x - x0) / p,
        params=dict(optics),
        model=model,
        pixel_size_A=p,
        origin_A=(x0, y0),
        calibration_key=None if calibration is None else calibration.key,
        calibration=calibration,
        info=info,
    )


def image_to_numpy(sim: Simulated) -> np.ndarray:
    """The image of a :class:`Simulated` as a NumPy array (copies from the GPU)."""
    return to_numpy(sim.image)
