"""Pixel size and scan distortion of an atomic-resolution image from its hexagonal FFT spots.

Pure NumPy/SciPy: no file access, no torch. Positions are ``(x, y)`` with x along the image's
columns (the fast scan direction of a STEM image) and y along its rows (the slow scan).

How it works (:func:`find_lattice_spots`, :func:`calibrate_lattice`):

1. **Detection** on a *Welch* power spectrum (Hann-windowed tiles with 50 % overlap,
   averaged): its log has a noise of about ``1/√(tiles)`` instead of the periodogram's
   exponential scatter, so real low-dose images (λ ≈ 2 counts per pixel) still show the
   lattice. A radial median is subtracted (contamination, thickness and the probe's
   envelope make a smooth radial background) and local maxima standing a few robust standard
   deviations above it are candidates.
2. **Hexagon search**: three candidates ``g1, g2, g2 − g1`` 60° apart within an affine
   tolerance (15 % in length and 9° in angle, so scan distortion of several per cent does not
   break it), scored by their summed significance; the smallest such hexagon wins, so a
   visible {100} ring is never taken for {110}. Spots may be restricted to the radius
   expected from a nominal pixel size.
3. **Refinement** on the full zero-padded periodogram (high resolution): the spots of every
   order {100}, {110}, {200}, ... that stand above the background are located to sub-bin
   precision and a least-squares fit gives the reciprocal basis: an affine fit of the lattice.
4. **Distortion**: the lattice metric in pixels is compared with the ideal hexagonal one of
   the material's lattice constant. Its Cholesky factor is the unique upper-triangular map
   ``P`` [Å/px] from pixel offsets to an undistorted frame: ``P[0,0]`` is the pixel size
   along the fast scan, ``P[1,1]`` along the slow scan, ``P[0,1]`` the shear a linear drift
   during the frame adds. Sample drift acts along the slow scan, so the fast-scan pixel size
   is the microscope's calibration and is what :func:`calibrate_lattice` reports as
   ``pixel_size_A``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial import cKDTree

from structures import parse_material

SQRT3 = math.sqrt(3.0)
#: Largest scan anisotropy / shear accepted as a distorted hexagonal lattice. A square lattice
#: is an affine image of a hexagonal one only through a 73 % stretch.
MAX_DISTORTION = 0.15


class CalibrationError(ValueError):
    """The FFT of an image shows no clear hexagonal lattice (no pixel size can be read)."""


@dataclass(frozen=True)
class LatticeSpots:
    """Hexagonal lattice spots found in the power spectrum of an image.

    Attributes
    ----------
    reciprocal_px : ndarray, shape (2, 2)
        Rows ``b1``, ``b2``: reciprocal basis of the metal sublattice [cycles/px], ``(x, y)``
        components, 60° apart; the six first-order {100} spots are ±b1, ±b2, ±(b2 − b1).
    lattice_px : ndarray, shape (2, 2)
        Rows ``a1``, ``a2``: real-space lattice vectors [px] (``a_i · b_j = δ_ij``).
    hkl : ndarray of int, shape (n, 2)
        Indices of the spots used in the fit (``g = h b1 + k b2``).
    spots : ndarray, shape (n, 2)
        Refined spot positions [cycles/px].
    strength : float
        Median peak-to-background power ratio of the six first-order spots (Welch spectrum).
    """

    reciprocal_px: np.ndarray
    lattice_px: np.ndarray
    hkl: np.ndarray
    spots: np.ndarray
    strength: float

    @property
    def lengths_px(self) -> np.ndarray:
        """Lattice constant along the three close-packed directions [px] (equal if undistorted)."""
        a1, a2 = self.lattice_px
        third = min(np.linalg.norm(a1 + a2), np.linalg.norm(a1 - a2))
        return np.array([np.linalg.norm(a1), np.linalg.norm(a2), third])

    @property
    def rotation_deg(self) -> float:
        """Direction of ``a1`` in the image [degrees, from +x towards +y], modulo 60°."""
        a1 = self.lattice_px[0]
        return float(math.degrees(math.atan2(a1[1], a1[0])) % 60.0)

    @property
    def orders(self) -> int:
        """Highest order used, as the squared length h² + hk + k² (1 {100}, 3 {110}, 4 {200})."""
        h, k = self.hkl[:, 0], self.hkl[:, 1]
        return int(np.max(h * h + h * k + k * k))


@dataclass(frozen=True)
class LatticeCalibration:
    """Pixel size and scan distortion measured from the lattice.

    Attributes
    ----------
    pixel_size_A : float
        Pixel size along the fast scan direction (x) [Å/px]: the microscope's calibration.
    pixel_size_x_A, pixel_size_y_A : float
        Pixel size along x (fast scan) and y (slow scan) [Å/px].
    pixel_size_mean_A : float
        ``√(p_x p_y)``: the pixel size that preserves areas [Å/px].
    shear : float
        ``P[0,1] / P[1,1]``: x displacement per unit y of the undistorted frame (a linear
        drift along x during the frame).
    anisotropy : float
        ``p_y / p_x − 1``.
    uncertainty_A : float
        One standard deviation of ``pixel_size_A`` [Å/px] from the fit's residuals.
    rotation_deg : float
        Lattice direction in the image, modulo 60° [degrees].
    lattice_constant_A : float
        The constant the calibration used [Å].
    pixel_to_A : ndarray, shape (2, 2)
        Upper-triangular map from a pixel offset ``(dx, dy)`` to Å in an undistorted frame
        whose x axis is the fast scan direction.
    spots : LatticeSpots
    """

    pixel_size_A: float
    pixel_size_x_A: float
    pixel_size_y_A: float
    pixel_size_mean_A: float
    shear: float
    anisotropy: float
    uncertainty_A: float
    rotation_deg: float
    lattice_constant_A: float
    pixel_to_A: np.ndarray
    spots: LatticeSpots

    @property
    def distorted(self) -> bool:
        """Anisotropy or shear above 0.5 %: worth correcting before labelling."""
        return abs(self.anisotropy) > 0.005 or abs(self.shear) > 0.005

    def summary(self) -> dict:
        """Plain values for ``summary.json``."""
        return {
            "pixel_size_A": self.pixel_size_A,
            "pixel_size_x_A": self.pixel_size_x_A,
            "pixel_size_y_A": self.pixel_size_y_A,
            "pixel_size_mean_A": self.pixel_size_mean_A,
            "uncertainty_A": self.uncertainty_A,
            "anisotropy": self.anisotropy,
            "shear": self.shear,
            "rotation_deg": self.rotation_deg,
            "lattice_constant_A": self.lattice_constant_A,
            "spot_strength": self.spots.strength,
            "orders": self.spots.orders,
        }


# --------------------------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------------------------


def _frames(image) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or min(img.shape[1:]) < 16:
        raise CalibrationError(
            f"image: expected [H, W] or [n, H, W] with H, W >= 16, got {img.shape}"
        )
    if not np.all(np.isfinite(img)):
        raise CalibrationError("image: contains NaN or infinite values")
    return img


def _periodogram(frames: np.ndarray, n: int) -> np.ndarray:
    """Mean Hann-windowed power spectrum of the frames, zero-padded to n×n, fftshifted."""
    h, w = frames.shape[1:]
    window = (np.hanning(h)[:, None] * np.hanning(w)[None, :]).astype(np.float32)
    power = np.zeros((n, n), dtype=np.float64)
    for frame in frames:
        f = frame - np.float32(np.average(frame, weights=window))
        spec = sfft.fft2(f * window, s=(n, n), workers=-1)
        power += spec.real.astype(np.float64) ** 2 + spec.imag.astype(np.float64) ** 2
    return sfft.fftshift(power / len(frames))


def _welch(frames: np.ndarray, tile: int) -> tuple[np.ndarray, int]:
    """Welch power spectrum: Hann tiles of side ``tile`` with 50 % overlap. Returns it and the
    number of tiles averaged."""
    h, w = frames.shape[1:]
    step = tile // 2
    starts_y = list(range(0, h - tile + 1, step)) or [0]
    starts_x = list(range(0, w - tile + 1, step)) or [0]
    window = (np.hanning(tile)[:, None] * np.hanning(tile)[None, :]).astype(np.float32)
    power = np.zeros((tile, tile), dtype=np.float64)
    count = 0
    for frame in frames:
        for y0 in starts_y:
            for x0 in starts_x:
                t = frame[y0 : y0 + tile, x0 : x0 + tile]
                t = t - np.float32(np.average(t, weights=window))
                spec = sfft.fft2(t * window)
                power += np.abs(spec) ** 2
                count += 1
    return sfft.fftshift(power / count), count


def _radial_excess(logp: np.ndarray, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``logp`` minus its radial median (per integer radius, estimated on every ``stride``-th
    bin along each axis), and the radius of every bin."""
    n = logp.shape[0]
    c = n // 2
    yy, xx = np.indices(logp.shape)
    rr = np.hypot(yy - c, xx - c)
    ring = np.rint(rr).astype(np.int64)
    sub_ring = ring[::stride, ::stride].ravel()
    values = logp[::stride, ::stride].ravel()
    order = np.lexsort((values, sub_ring))  # by ring, then by value within a ring
    bounds = np.searchsorted(sub_ring[order], np.arange(ring.max() + 2))
    mid = np.clip((bounds[:-1] + bounds[1:]) // 2, 0, len(values) - 1)
    median = values[order][mid]
    return logp - median[ring], rr


def _refine_peak(logp: np.ndarray, guess, search: float) -> tuple[np.ndarray, tuple]:
    """Sub-bin position (row, col) of the maximum of ``logp`` within ``search`` bins of
    ``guess``: the integer maximum refined by a parabola through the log power (a Gaussian
    fit) along each axis."""
    n = logp.shape[0]
    r = max(2, int(math.ceil(search)))
    r0, c0 = int(round(guess[0])), int(round(guess[1]))
    lo_r, hi_r = max(r0 - r, 1), min(r0 + r + 1, n - 1)
    lo_c, hi_c = max(c0 - r, 1), min(c0 + r + 1, n - 1)
    if lo_r >= hi_r or lo_c >= hi_c:
        return np.array([np.nan, np.nan]), (0, 0)
    win = logp[lo_r:hi_r, lo_c:hi_c]
    ir, ic = np.unravel_index(np.argmax(win), win.shape)
    ir, ic = ir + lo_r, ic + lo_c
    out = np.array([float(ir), float(ic)])
    for axis, (a, b) in enumerate(((1, 0), (0, 1))):
        lm, l0, lp = logp[ir - a, ic - b], logp[ir, ic], logp[ir + a, ic + b]
        den = lm - 2.0 * l0 + lp
        if den < 0:
            out[axis] += float(np.clip(0.5 * (lm - lp) / den, -0.5, 0.5))
    return out, (ir, ic)


def _hkl_shell(order_sq: int) -> np.ndarray:
    """Indices (h, k) with h² + hk + k² = order_sq: |h b1 + k b2|² / |b|² for b1, b2 at 60°."""
    rng = range(-3, 4)
    return np.array([(h, k) for h in rng for k in rng if h * h + h * k + k * k == order_sq])


# --------------------------------------------------------------------------------------------
# Detection: a hexagon of significant spots in the Welch spectrum
# --------------------------------------------------------------------------------------------


def _max_near(signif: np.ndarray, g: np.ndarray, centre: int, radius: int = 2) -> float:
    """Largest value of ``signif`` within ``radius`` bins of ``±g`` (x, y bins from centre):
    the weaker of the two Friedel mates."""
    out = []
    for v in (g, -g):
        c, r = int(round(v[0])) + centre, int(round(v[1])) + centre
        win = signif[max(r - radius, 0) : r + radius + 1, max(c - radius, 0) : c + radius + 1]
        out.append(float(win.max()) if win.size else -np.inf)
    return min(out)


def _rotate(v: np.ndarray, degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _detect_hexagon(
    frames: np.ndarray,
    *,
    max_period_px: float,
    radius_range: tuple[float, float] | None,
    sigma_threshold: float,
    tolerance: float,
) -> list[tuple[np.ndarray, float]]:
    """Candidate first-order bases ``(b1, b2)`` [cycles/px] with their spots' mean power ratio,
    most plausible first: hexagons from the smallest ring outwards (strongest first within a
    ring), each preceded by the {100} hexagons it would be the {110} or {200} ring of."""
    h, w = frames.shape[1:]
    side = min(h, w)
    tile = 1 << int(math.floor(math.log2(max(side / 2, 16))))
    tile = int(min(max(tile, min(side, 128)), 512))
    tile = max(16, min(tile, side))
    power, count = _welch(frames, tile)
    logp = np.log(power + power.max() * 1e-12 + 1e-30)
    excess, rr = _radial_excess(ndimage.gaussian_filter(logp, 0.7))
    c = tile // 2
    r_min = max(tile / max_period_px, 2.0)
    r_max = 0.98 * c
    annulus = (rr >= r_min) & (rr <= r_max)
    vals = excess[annulus]
    if vals.size < 20:
        raise CalibrationError("image too small for a lattice search")
    noise = 1.4826 * float(np.median(np.abs(vals - np.median(vals)))) or 1e-6
    signif = excess / noise
    if radius_range is not None:  # cycles/px → bins; the noise level is the whole annulus'
        annulus &= (rr >= radius_range[0] * tile) & (rr <= radius_range[1] * tile)
    peaks = (signif == ndimage.maximum_filter(signif, size=3)) & annulus
    peaks &= signif > sigma_threshold
    pr, pc = np.nonzero(peaks)
    if len(pr) < 6:
        raise CalibrationError(
            f"no hexagonal lattice spots in the FFT ({len(pr)} significant peaks; need six)"
        )
    order = np.argsort(-signif[pr, pc])[:200]
    cand = np.column_stack([pc[order] - c, pr[order] - c]).astype(float)  # (x, y) bins
    score = signif[pr[order], pc[order]]
    radius = np.hypot(cand[:, 0], cand[:, 1])
    tree = cKDTree(cand)
    hexagons = []  # (mean radius, summed significance, members)
    for i in range(len(cand)):
        g1 = cand[i]
        members, total = [g1], score[i]
        for angle in (60.0, 120.0, 180.0, 240.0, 300.0):
            idx = tree.query_ball_point(_rotate(g1, angle), max(2.0, tolerance * radius[i]))
            if not idx:
                break
            j = max(idx, key=lambda k: score[k])
            members.append(cand[j])
            total += score[j]
        else:
            hexagons.append((float(np.mean(np.hypot(*np.array(members).T))), total, members))
    if not hexagons:
        raise CalibrationError(
            "no hexagonal lattice spots in the FFT (no six-fold set of significant peaks; "
            "not a hexagonal crystal, or too noisy)"
        )
    # the smallest ring is the first order ({110} is √3, {200} 2x larger); on it the strongest.
    # A {100} ring too weak or too split for the search (or outside a nominal radius range)
    # is tried before each hexagon, as the ring it would be the {110} or {200} of; the
    # refinement on the full spectrum validates every candidate (six sharp spots).
    hexagons.sort(key=lambda hx: (round(math.log(hx[0]) / math.log(1.15)), -hx[1]))
    out = []
    for _, total, members in hexagons[:12]:
        basis = np.array([members[0], members[1]])
        ratio = float(np.exp(total / 6.0 * noise))
        for sub in (
            np.array([(2 * basis[0] - basis[1]) / 3.0, (basis[0] + basis[1]) / 3.0]),  # {110}
            basis / 2.0,  # {200}
        ):
            if np.hypot(*sub[0]) >= max(r_min, 3.0):
                out.append((sub / tile, ratio))
        out.append((basis / tile, ratio))
    return out


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def find_lattice_spots(
    image,
    *,
    max_period_px: float | None = None,
    expected_period_px: float | None = None,
    sigma_threshold: float = 6.0,
    tolerance: float = 0.15,
    max_distortion: float = MAX_DISTORTION,
    max_fft: int = 4096,
) -> LatticeSpots:
    """Find the hexagonal lattice spots in the power spectrum of an image.

    Parameters
    ----------
    image : array_like, shape (H, W) or (n, H, W)
        Image or stack of frames (their spectra are averaged, so drift between frames does not
        matter).
    max_period_px : float, optional
        Longest lattice period considered [px]; default a quarter of the Welch tile side.
    expected_period_px : float, optional
        Lattice constant expected in pixels (from a nominal pixel size): spots are searched
        within ±25 % of the corresponding radius only.
    sigma_threshold : float
        Significance of a candidate spot above the radial median of the log Welch spectrum, in
        robust standard deviations.
    tolerance : float
        Relative tolerance of the hexagon's radii and rotations (absorbs scan distortion).
    max_distortion : float
        Largest anisotropy or shear of an accepted lattice (a square lattice is a hexagonal
        one stretched by 73 %).
    max_fft : int
        Largest padded FFT side [px] for the refinement (bounds memory on very large images).

    Returns
    -------
    LatticeSpots

    Raises
    ------
    CalibrationError
        No six-fold set of significant spots (not a hexagonal lattice, too noisy, unresolved).
    """
    frames = _frames(image)
    h, w = frames.shape[1:]
    if max_period_px is None:
        max_period_px = min(h, w) / 4.0
    radius_range = None
    if expected_period_px is not None:
        if not expected_period_px > 0:
            raise ValueError(f"expected_period_px: expected > 0 px, got {expected_period_px!r}")
        g = 2.0 / (SQRT3 * expected_period_px)
        radius_range = (g / 1.25, g * 1.25)
    candidates = _detect_hexagon(
        frames,
        max_period_px=max_period_px,
        radius_range=radius_range,
        sigma_threshold=sigma_threshold,
        tolerance=tolerance,
    )
    spectrum = _Spectrum.of(frames, max_fft)
    too_distorted = None
    for basis, strength in candidates:
        try:
            reciprocal, hkl, spots = _refine_basis(spectrum, basis, min_excess=math.log(8.0))
        except CalibrationError:
            continue
        found = LatticeSpots(
            reciprocal_px=reciprocal,
            lattice_px=np.linalg.inv(reciprocal).T,
            hkl=hkl,
            spots=spots,
            strength=strength,
        )
        anisotropy, shear = _shape_of(found)
        if max(abs(anisotropy), abs(shear)) > max_distortion:
            too_distorted = too_distorted or (anisotropy, shear)
            continue
        return found
    if too_distorted is not None:
        raise CalibrationError(
            f"the FFT spots are not a hexagonal lattice within {max_distortion:.0%} scan "
            f"distortion (anisotropy {too_distorted[0]:+.1%}, shear {too_distorted[1]:+.1%}): "
            "a non-hexagonal crystal?"
        )
    raise CalibrationError(
        "no hexagonal lattice spots in the FFT (first-order spots not confirmed in the full "
        "spectrum)"
    )


def _shape_of(spots: LatticeSpots) -> tuple[float, float]:
    """Anisotropy ``p_y/p_x − 1`` and shear of a lattice (independent of its constant)."""
    p = distortion_from_spots(spots, 1.0)
    return float(p[1, 1] / p[0, 0] - 1.0), float(p[0, 1] / p[1, 1])


@dataclass(frozen=True)
class _Spectrum:
    """Full zero-padded periodogram of an image (log power, excess over the radial median)."""

    logp: np.ndarray
    excess: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def of(cls, frames: np.ndarray, max_fft: int = 4096) -> _Spectrum:
        h, w = frames.shape[1:]
        size = max(h, w)
        n = sfft.next_fast_len(max(size, min(2 * size, max_fft)))
        power = _periodogram(frames, n)
        logp = np.log(ndimage.gaussian_filter(power, 0.5) + power.max() * 1e-12 + 1e-30)
        excess, _ = _radial_excess(logp, stride=max(1, n // 512))
        return cls(logp, excess, (h, w))


def _refine_basis(spectrum: _Spectrum, basis: np.ndarray, min_excess: float):
    """Refine an approximate basis [cycles/px] on the full periodogram with every visible
    order; returns the reciprocal basis [cycles/px], the spots' hkl and positions.

    All six first-order spots must be found and stand, on average, ``exp(min_excess)`` times
    above their ring's median power; higher-order spots each ``exp(min_excess)`` times.
    """
    logp, excess = spectrum.logp, spectrum.excess
    n = logp.shape[0]
    h, w = spectrum.shape
    centre = n // 2
    r_max = 0.98 * centre
    b_bins = np.asarray(basis, dtype=np.float64) * n
    spot_width = max(2.0, 1.5 * n / min(h, w))  # a Hann window's main lobe [bins]

    ring_r = np.hypot(*np.mgrid[-4:5, -4:5]) * spot_width / 2.0  # local annulus 2-4 widths
    local = (ring_r >= 1.0 * spot_width) & (ring_r <= 2.0 * spot_width)
    offsets = (np.argwhere(local) - 4) * spot_width / 2.0

    def local_excess(ij) -> float:
        """Log power at a peak over the median of an annulus 1-2 spot widths around it: a
        Bragg spot is sharp, contamination and noise are not."""
        rc = np.clip(np.rint(np.asarray(ij) + offsets).astype(int), 0, n - 1)
        return float(logp[ij] - np.median(logp[rc[:, 0], rc[:, 1]]))

    def refine(vec_xy, window):
        pos, ij = _refine_peak(logp, (vec_xy[1] + centre, vec_xy[0] + centre), window)
        return np.array([pos[1] - centre, pos[0] - centre]), min(excess[ij], local_excess(ij))

    def shell(order_sq, b, wide):
        found_h, found_g, found_ex = [], [], []
        for hk in _hkl_shell(order_sq):
            pred = hk @ b
            radius = np.hypot(*pred)
            if radius > r_max:
                continue
            window = max(3 * spot_width, 0.2 * radius) if wide else 2 * spot_width
            pos, ex = refine(pred, window)
            if np.all(np.isfinite(pos)) and np.hypot(*(pos - pred)) <= window:
                found_h.append(hk)
                found_g.append(pos)
                found_ex.append(ex)
        return found_h, found_g, found_ex

    def fit(hkl, g):
        return np.linalg.lstsq(np.array(hkl, float), np.array(g), rcond=None)[0]

    # first order: a wide search from the detection, a basis from what was found, then a
    # narrow one around the basis' predictions that must find all six
    found_h, found_g, _ = shell(1, b_bins, wide=True)
    if len(found_h) >= 4 and np.linalg.matrix_rank(np.array(found_h, float)) == 2:
        b_bins = fit(found_h, found_g)
    hkl_all, spots_all, first_excess = shell(1, b_bins, wide=False)
    if len(hkl_all) < 6 or min(first_excess) < min_excess:
        raise CalibrationError("no hexagonal lattice spots in the FFT (first order incomplete)")
    b_bins = fit(hkl_all, spots_all)
    for order_sq in (3, 4, 7, 9):
        found_h, found_g, found_ex = shell(order_sq, b_bins, wide=False)
        keep = [k for k, ex in enumerate(found_ex) if ex >= min_excess]
        if not keep:
            break
        hkl_all.extend(found_h[k] for k in keep)
        spots_all.extend(found_g[k] for k in keep)
        b_bins = fit(hkl_all, spots_all)
    return b_bins / n, np.array(hkl_all, dtype=int), np.array(spots_all) / n


def distortion_from_spots(spots: LatticeSpots, lattice_constant_A: float) -> np.ndarray:
    """Upper-triangular pixel → Å map ``P`` that makes the measured lattice ideal.

    The measured reciprocal basis ``B`` [cycles/px] (rows) and the ideal one ``K`` [1/Å] are
    related by ``B = K R P`` for some rotation ``R``, so ``PᵀP = Bᵀ (KKᵀ)⁻¹ B`` whatever
    ``R``; its Cholesky factor is ``P``.
    """
    b = np.asarray(spots.reciprocal_px, dtype=np.float64)
    sign = 1.0 if b[0] @ b[1] >= 0 else -1.0
    g_len = 2.0 / (SQRT3 * lattice_constant_A)
    ideal = g_len**2 * np.array([[1.0, 0.5 * sign], [0.5 * sign, 1.0]])
    metric = b.T @ np.linalg.inv(ideal) @ b
    return np.linalg.cholesky(metric).T


def calibrate_lattice(
    image,
    lattice_constant_A: float,
    *,
    nominal_pixel_size_A: float | None = None,
    max_distortion: float = MAX_DISTORTION,
    **kwargs,
) -> LatticeCalibration:
    """Pixel size, scan anisotropy and shear of an image of a hexagonal 2D crystal.

    Parameters
    ----------
    image : array_like, shape (H, W) or (n, H, W)
    lattice_constant_A : float
        In-plane lattice constant ``a`` [Å] (:func:`lattice_constant_of`).
    nominal_pixel_size_A : float, optional
        A rough pixel size [Å/px] (e.g. the file's): the spot search is restricted to the
        radius it implies (±25 %).
    max_distortion : float
        Largest anisotropy or shear accepted; beyond it the lattice is not a distorted
        hexagonal one (a square lattice needs 73 %).
    **kwargs
        Passed to :func:`find_lattice_spots`.

    Returns
    -------
    LatticeCalibration

    Raises
    ------
    CalibrationError
        No clear hexagonal lattice, or one distorted beyond ``max_distortion``.
    ValueError
        ``lattice_constant_A`` or ``nominal_pixel_size_A`` not positive.
    """
    if not (isinstance(lattice_constant_A, int | float) and lattice_constant_A > 0):
        raise ValueError(f"lattice_constant_A: expected > 0 Å, got {lattice_constant_A}")
    if nominal_pixel_size_A is not None:
        if not nominal_pixel_size_A > 0:
            raise ValueError(f"nominal_pixel_size_A: expected > 0 Å, got {nominal_pixel_size_A}")
        kwargs.setdefault("expected_period_px", lattice_constant_A / nominal_pixel_size_A)
    spots = find_lattice_spots(image, max_distortion=max_distortion, **kwargs)
    p = distortion_from_spots(spots, lattice_constant_A)
    px, py = float(p[0, 0]), float(p[1, 1])
    shear, anisotropy = float(p[0, 1] / py), py / px - 1.0
    residual = spots.spots - spots.hkl @ spots.reciprocal_px
    g_mean = float(np.mean(np.linalg.norm(spots.spots, axis=1)))
    rel = float(np.sqrt(np.mean(residual**2))) / g_mean / math.sqrt(max(len(spots.hkl) - 4, 1))
    # the top and bottom halves of the frame (scanned at different times): non-linear drift
    frames = _frames(image)
    half = frames.shape[1] // 2
    if half >= 64:
        halves = []
        for part in (frames[:, :half], frames[:, half:]):
            try:
                b, *_ = _refine_basis(_Spectrum.of(part), spots.reciprocal_px, 0.0)
            except CalibrationError:
                continue
            halves.append(
                distortion_from_spots(
                    dataclasses.replace(spots, reciprocal_px=b), lattice_constant_A
                )[0, 0]
            )
        if len(halves) == 2:
            rel = math.hypot(rel, abs(halves[0] - halves[1]) / 2.0 / px)
    return LatticeCalibration(
        pixel_size_A=px,
        pixel_size_x_A=px,
        pixel_size_y_A=py,
        pixel_size_mean_A=math.sqrt(px * py),
        shear=shear,
        anisotropy=anisotropy,
        uncertainty_A=px * max(rel, 1e-5),
        rotation_deg=spots.rotation_deg,
        lattice_constant_A=float(lattice_constant_A),
        pixel_to_A=p,
        spots=spots,
    )


def calibrate_pixel_size(image, lattice_constant_A: float, **kwargs) -> tuple[float, float]:
    """Pixel size [Å/px] along the fast scan and its uncertainty, from the FFT spots.

    A shortcut for :func:`calibrate_lattice` (which also gives the slow-scan pixel size, the
    anisotropy and the shear).
    """
    cal = calibrate_lattice(image, lattice_constant_A, **kwargs)
    return cal.pixel_size_A, cal.uncertainty_A


def lattice_constant_of(material: str) -> float:
    """Tabulated in-plane lattice constant ``a`` [Å] of a 2H material such as ``"MoS2"``."""
    from structures import LATTICE_TABLE

    return LATTICE_TABLE[parse_material(material)][0]
