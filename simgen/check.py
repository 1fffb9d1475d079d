"""Label ↔ image checker: do the column labels sit on the columns of the image?

:func:`check_labels` finds the intensity maxima of a noise-free recorded image
(``skimage.feature.peak_local_max`` and a sub-pixel refinement) and reports, for every
label, the distance to the nearest maximum. Used by the tests after every distortion and
by users (``simgen check``) on a stored sample's ``noise_free`` image.

:func:`synthetic_lattice` renders a known-answer test image: Gaussian columns at exact
sub-pixel 2H-MX2 positions, independent of any simulation engine.

Geometry follows ``docs/architecture.md``: images are ``[H, W]`` and positions are
``(row = y, col = x)`` in pixels, pixel centres at integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simgen.backend import to_numpy

__all__ = ["CheckReport", "SyntheticLattice", "check_labels", "find_peaks", "synthetic_lattice"]

_REFINE = ("quadratic", "centroid", "none")


@dataclass(frozen=True)
class CheckReport:
    """Offsets between labels and the nearest image maximum.

    Attributes
    ----------
    offsets_px : ndarray of float64, shape (n_labels,)
        Distance of each checked label to the nearest refined maximum [px].
    dr_px, dc_px : ndarray of float64, shape (n_labels,)
        Row and column components (maximum − label) [px].
    checked : ndarray of bool, shape (N,)
        Which input labels were checked (not within ``border_px`` of the edge).
    n_peaks : int
        Maxima found in the image.
    """

    offsets_px: np.ndarray
    dr_px: np.ndarray
    dc_px: np.ndarray
    checked: np.ndarray
    n_peaks: int

    @property
    def n_labels(self) -> int:
        return int(self.offsets_px.size)

    @property
    def median_px(self) -> float:
        return float(np.median(self.offsets_px)) if self.n_labels else math.nan

    @property
    def p99_px(self) -> float:
        return float(np.percentile(self.offsets_px, 99)) if self.n_labels else math.nan

    @property
    def max_px(self) -> float:
        return float(self.offsets_px.max()) if self.n_labels else math.nan

    def fraction_within(self, tol_px: float = 0.5) -> float:
        """Fraction of checked labels within ``tol_px`` of a maximum."""
        return float(np.mean(self.offsets_px <= tol_px)) if self.n_labels else math.nan

    def to_dict(self) -> dict[str, float]:
        """Summary as plain floats (for JSON / the CLI)."""
        return {
            "n_labels": float(self.n_labels),
            "n_peaks": float(self.n_peaks),
            "median_px": self.median_px,
            "p99_px": self.p99_px,
            "max_px": self.max_px,
            "frac_within_0.5px": self.fraction_within(0.5),
        }

    def __str__(self) -> str:
        return (
            f"{self.n_labels} labels, {self.n_peaks} maxima: offset median {self.median_px:.3f}"
            f" px, p99 {self.p99_px:.3f} px, max {self.max_px:.3f} px, "
            f"{100 * self.fraction_within(0.5):.2f}% within 0.5 px"
        )


def _refine_quadratic(img: np.ndarray, rc: np.ndarray, radius: int = 1) -> np.ndarray:
    """Sub-pixel maxima from a least-squares 2-D quadratic fit over each
    (2·radius+1)² neighbourhood.

    Falls back to separable three-point parabolas where the fit has no maximum within one
    pixel; maxima within ``radius`` of the image's edge stay at the pixel.
    """
    h, w = img.shape
    out = rc.astype(np.float64)
    k = int(radius)
    ok = (rc[:, 0] >= k) & (rc[:, 0] < h - k) & (rc[:, 1] >= k) & (rc[:, 1] < w - k)
    if not ok.any():
        return out
    r, c = rc[ok, 0], rc[ok, 1]
    dy, dx = np.mgrid[-k : k + 1, -k : k + 1]
    dy, dx = dy.ravel().astype(np.float64), dx.ravel().astype(np.float64)
    design = np.stack([np.ones(dx.size), dx, dy, dx * dx, dx * dy, dy * dy], axis=1)
    pinv = np.linalg.pinv(design)  # (6, n_window)
    patches = img[r[:, None] + dy.astype(int)[None, :], c[:, None] + dx.astype(int)[None, :]]
    coef = patches @ pinv.T  # (n, 6): a, bx, by, cxx, cxy, cyy
    bx, by, cxx, cxy, cyy = coef[:, 1], coef[:, 2], coef[:, 3], coef[:, 4], coef[:, 5]
    det = 4 * cxx * cyy - cxy * cxy
    safe = np.where(det != 0, det, 1.0)
    ox = (-2 * cyy * bx + cxy * by) / safe
    oy = (cxy * bx - 2 * cxx * by) / safe
    good = (det > 0) & (cxx < 0) & (np.abs(ox) <= 1) & (np.abs(oy) <= 1)
    # separable fallback
    zc = img[r, c]
    zl, zr = img[r, c - 1], img[r, c + 1]
    zu, zd = img[r - 1, c], img[r + 1, c]
    den_x = zl - 2 * zc + zr
    den_y = zu - 2 * zc + zd
    fx = np.clip(np.where(den_x < 0, 0.5 * (zl - zr) / np.where(den_x < 0, den_x, 1), 0), -0.5, 0.5)
    fy = np.clip(np.where(den_y < 0, 0.5 * (zu - zd) / np.where(den_y < 0, den_y, 1), 0), -0.5, 0.5)
    out[ok, 0] = r + np.where(good, oy, fy)
    out[ok, 1] = c + np.where(good, ox, fx)
    return out


def _refine_centroid(img: np.ndarray, rc: np.ndarray, radius: int) -> np.ndarray:
    """Sub-pixel maxima as the centroid of (patch − patch minimum) over a (2·radius+1)²
    window (clipped at the image edge)."""
    h, w = img.shape
    off = np.arange(-radius, radius + 1)
    rr = rc[:, 0][:, None] + off
    cc = rc[:, 1][:, None] + off
    valid = (((rr >= 0) & (rr < h))[:, :, None] & ((cc >= 0) & (cc < w))[:, None, :]).astype(
        np.float64
    )
    patch = img[np.clip(rr, 0, h - 1)[:, :, None], np.clip(cc, 0, w - 1)[:, None, :]]
    big = np.where(valid > 0, patch, np.inf)
    base = big.min(axis=(1, 2))[:, None, None]
    wgt = np.clip(patch - base, 0, None) * valid
    tot = wgt.sum(axis=(1, 2))
    tot = np.where(tot > 0, tot, 1.0)
    r = np.einsum("nij,ni->n", wgt, rr.astype(np.float64)) / tot
    c = np.einsum("nij,nj->n", wgt, cc.astype(np.float64)) / tot
    flat = wgt.sum(axis=(1, 2)) == 0
    return np.stack([np.where(flat, rc[:, 0], r), np.where(flat, rc[:, 1], c)], axis=1)


def find_peaks(
    image,
    *,
    min_distance_px: int = 3,
    threshold_rel: float = 0.1,
    refine: str = "quadratic",
    smooth_px: float = 1.0,
    quadratic_radius_px: int = 1,
    centroid_radius_px: int = 2,
) -> np.ndarray:
    """Local intensity maxima of an image with sub-pixel positions.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), shape (H, W)
        Noise-free image (moved to the host).
    min_distance_px : int
        Minimum separation of maxima [px] (``peak_local_max``'s ``min_distance``).
    threshold_rel : float
        Maxima below ``min + threshold_rel·(max − min)`` are ignored.
    refine : {"quadratic", "centroid", "none"}
        Sub-pixel refinement: least-squares 2-D quadratic over a window of radius
        ``quadratic_radius_px`` (3×3 by default), centroid of (patch − minimum) over a window
        of radius ``centroid_radius_px``, or none. The quadratic fit is unbiased on
        symmetric peaks (0.01 px median on a rendered lattice); the centroid of a window
        centred on the integer maximum is pulled towards it (~0.1 px).
    smooth_px : float
        The maxima are those of the image smoothed by a Gaussian of this σ [px] (0: none).
        Smoothing over about one pixel averages the neighbouring scan lines, so with line
        jitter the maximum is the column's centre rather than the brightest line's
        (unsmoothed, a jittered column's maximum sits on one line and can be ~3× the
        jitter away from the centre); it does not move the maxima of symmetric columns.
    quadratic_radius_px, centroid_radius_px : int
        Window radii of the refinements [px].

    Returns
    -------
    ndarray of float64, shape (n_peaks, 2)
        (row, col) of every maximum [px].
    """
    from skimage.feature import peak_local_max

    img = np.asarray(to_numpy(image), dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image: expected a 2-D array, got shape {img.shape}")
    if refine not in _REFINE:
        raise ValueError(f"refine: expected one of {_REFINE}, got {refine!r}")
    if int(min_distance_px) < 1:
        raise ValueError(f"min_distance_px: must be >= 1, got {min_distance_px}")
    if not 0 <= threshold_rel < 1:
        raise ValueError(f"threshold_rel: must be in [0, 1), got {threshold_rel}")
    if not smooth_px >= 0:
        raise ValueError(f"smooth_px: must be >= 0, got {smooth_px}")
    if int(quadratic_radius_px) < 1 or int(centroid_radius_px) < 1:
        raise ValueError("quadratic_radius_px, centroid_radius_px: must be >= 1")
    if smooth_px > 0:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, float(smooth_px), mode="nearest")
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        return np.zeros((0, 2))
    rc = peak_local_max(
        img,
        min_distance=int(min_distance_px),
        threshold_abs=lo + threshold_rel * (hi - lo),
        exclude_border=False,
    )
    if rc.size == 0:
        return np.zeros((0, 2))
    if refine == "quadratic":
        return _refine_quadratic(img, rc, int(quadratic_radius_px))
    if refine == "centroid":
        return _refine_centroid(img, rc, int(centroid_radius_px))
    return rc.astype(np.float64)


def check_labels(
    image,
    rows,
    cols,
    *,
    min_distance_px: int = 3,
    threshold_rel: float = 0.1,
    refine: str = "quadratic",
    smooth_px: float = 1.0,
    border_px: float = 2.0,
) -> CheckReport:
    """Distance from every label to the nearest intensity maximum of ``image``.

    Pass only labels of columns that hold atoms (an emptied site has no maximum) and the
    noise-free image (:attr:`simgen.acquisition.Acquired.noise_free`). Labels within
    ``border_px`` of the image edge are not checked: a column cut by the edge has its
    maximum displaced or missing.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), shape (H, W)
    rows, cols : array_like of float, shape (N,)
        Label positions [px] (row = y, col = x).
    min_distance_px, threshold_rel, refine, smooth_px
        See :func:`find_peaks`.
    border_px : float
        Labels closer than this to the edge are skipped [px].

    Returns
    -------
    CheckReport
    """
    from scipy.spatial import cKDTree

    img = np.asarray(to_numpy(image), dtype=np.float64)
    r = np.asarray(to_numpy(rows), dtype=np.float64).ravel()
    c = np.asarray(to_numpy(cols), dtype=np.float64).ravel()
    if r.shape != c.shape:
        raise ValueError(f"cols: shape {c.shape} differs from rows {r.shape}")
    if not border_px >= 0:
        raise ValueError(f"border_px: must be >= 0, got {border_px}")
    h, w = img.shape
    checked = (r >= border_px) & (r <= h - 1 - border_px) & (c >= border_px)
    checked &= c <= w - 1 - border_px
    peaks = find_peaks(
        img,
        min_distance_px=min_distance_px,
        threshold_rel=threshold_rel,
        refine=refine,
        smooth_px=smooth_px,
    )
    labels = np.stack([r[checked], c[checked]], axis=1)
    if len(peaks) == 0 or len(labels) == 0:
        inf = np.full(len(labels), np.inf)
        return CheckReport(inf, inf.copy(), inf.copy(), checked, len(peaks))
    dist, idx = cKDTree(peaks).query(labels)
    diff = peaks[idx] - labels
    return CheckReport(dist, diff[:, 0], diff[:, 1], checked, len(peaks))


@dataclass(frozen=True)
class SyntheticLattice:
    """A rendered test lattice.

    Attributes
    ----------
    image : ndarray of float64, shape (H, W)
    rows, cols : ndarray of float64, shape (N,)
        Exact column positions [px] (row = y, col = x), including columns just outside the
        image whose tails reach it.
    site : ndarray of int8, shape (N,)
        0 metal, 1 chalcogen.
    """

    image: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    site: np.ndarray


def synthetic_lattice(
    shape,
    *,
    pixel_size_A: float = 0.2,
    a_A: float = 3.2,
    sigma_A: float = 0.45,
    weights: tuple[float, float] = (1.0, 0.6),
    rotation_deg: float = 0.0,
    origin_px: tuple[float, float] = (0.0, 0.0),
    background: float = 0.0,
) -> SyntheticLattice:
    """Render a 2H-MX2-like projected lattice as a sum of Gaussians at exact positions.

    Metal columns sit at ``i·a1 + j·a2`` and chalcogen columns at ``+ (a1 + a2)/3`` with
    ``a1 = a(1, 0)``, ``a2 = a(1/2, √3/2)`` rotated by ``rotation_deg``, offset by
    ``origin_px``. Each column is ``weight·exp(−d²/2σ²)`` (truncated at 5σ), evaluated at the
    pixel centres, so the true positions are known to machine precision.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(H, W)``.
    pixel_size_A : float
        Pixel size [Å].
    a_A : float
        Lattice constant [Å].
    sigma_A : float
        Gaussian width of a column [Å].
    weights : (float, float)
        Peak heights of metal and chalcogen columns.
    rotation_deg : float
        Lattice rotation [degrees].
    origin_px : (float, float)
        (row, col) of one metal column [px].
    background : float
        Constant added to the image.

    Returns
    -------
    SyntheticLattice
    """
    h, w = (int(v) for v in shape)
    if h < 1 or w < 1:
        raise ValueError(f"shape: must be positive, got {shape!r}")
    for name, val in (("pixel_size_A", pixel_size_A), ("a_A", a_A), ("sigma_A", sigma_A)):
        if not val > 0:
            raise ValueError(f"{name}: must be > 0, got {val}")
    p = float(pixel_size_A)
    th = math.radians(rotation_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    a1 = rot @ np.array([a_A, 0.0]) / p  # (x, y) in px
    a2 = rot @ np.array([a_A / 2, a_A * math.sqrt(3) / 2]) / p
    reach = 5.0 * sigma_A / p
    corners = np.array([[-reach, -reach], [w + reach, -reach], [-reach, h + reach]])
    corners = np.vstack([corners, [w + reach, h + reach]]) - np.array(origin_px[::-1])
    inv = np.linalg.inv(np.stack([a1, a2], axis=1))
    ij = corners @ inv.T
    i0, i1 = int(np.floor(ij[:, 0].min())) - 1, int(np.ceil(ij[:, 0].max())) + 1
    j0, j1 = int(np.floor(ij[:, 1].min())) - 1, int(np.ceil(ij[:, 1].max())) + 1
    ii, jj = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
    base = ii.ravel()[:, None] * a1 + jj.ravel()[:, None] * a2 + np.array(origin_px[::-1])
    xy = np.concatenate([base, base + (a1 + a2) / 3])
    site = np.concatenate([np.zeros(len(base), np.int8), np.ones(len(base), np.int8)])
    keep = (
        (xy[:, 0] > -reach)
        & (xy[:, 0] < w - 1 + reach)
        & (xy[:, 1] > -reach)
        & (xy[:, 1] < h - 1 + reach)
    )
    xy, site = xy[keep], site[keep]
    cols, rows = xy[:, 0], xy[:, 1]
    amp = np.where(site == 0, weights[0], weights[1]).astype(np.float64)
    half = int(math.ceil(reach))
    off = np.arange(-half, half + 1)
    rr = np.rint(rows).astype(np.intp)[:, None] + off
    cc = np.rint(cols).astype(np.intp)[:, None] + off
    s2 = 2.0 * (sigma_A / p) ** 2
    gy = np.exp(-((rr - rows[:, None]) ** 2) / s2) * ((rr >= 0) & (rr < h))
    gx = np.exp(-((cc - cols[:, None]) ** 2) / s2) * ((cc >= 0) & (cc < w))
    vals = amp[:, None, None] * gy[:, :, None] * gx[:, None, :]
    flat = np.clip(rr, 0, h - 1)[:, :, None] * w + np.clip(cc, 0, w - 1)[:, None, :]
    image = np.bincount(flat.ravel(), weights=vals.ravel(), minlength=h * w).reshape(h, w)
    return SyntheticLattice(image + background, rows, cols, site)
