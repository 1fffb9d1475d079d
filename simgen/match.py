"""``simgen match``: the acquisition of an experimental image, estimated from the image, as a
config whose distributions are centred on the estimates.

Every figure is measured by the same function (:func:`measure_image`) on the user's image
and on images simulated from the matched config, and the matched values are refined until
the two agree, so the match does not rest on a model of the user's detector being right:

========================  ==============================================  ==================
figure                    how it is measured                              what it sets
========================  ==============================================  ==================
contrast                  ``(I_M − I_H)/(I_X − I_H)`` at the lattice      HAADF inner angle
                          sites (:func:`~simgen.experiment.quality.
                          contrast_ratio`)
noise level               pixel noise (residual of a 1 px smoothing)      λ (counts/px at the
                          over the contrast ``I_M − I_H``                 image mean)
noise correlation         of that residual between neighbouring pixels    smoothing of the
                                                                          export
peak width                rms radius of the mean metal column [Å]         source size
background                std of the image smoothed over one lattice      contamination
                          constant / std of the rest                      amplitude
line jitter               rms row-to-row shift along the fast scan [Å]    line jitter (x)
line noise                rms row-to-row change of the line mean [rel.]   per-line current
clipping                  pixels at the 8-bit export's 0 and 255 [%]      export stretch
pixel size, anisotropy,   FFT lattice calibration                         pixel size, drift
shear                                                                     velocity
========================  ==============================================  ==================

Functions here are pure (arrays in, numbers and configs out); reading the image and the
calibration cache is the CLI's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from structures import CHALCOGEN, METAL

#: Figures compared between the image and the matched simulation, with the relative
#: tolerance the check reports against (contrast 5 %, noise level 20 %, peak width 10 %).
CHECKED = {"contrast": 0.05, "noise_level": 0.20, "peak_width_A": 0.10}
#: Inner angles [mrad] over which the contrast curve is computed (the shipped grids).
INNER_SWEEP_MRAD = tuple(range(40, 121, 5))
#: Source sizes (FWHM) [Å] over which the peak-width curve is computed.
SOURCE_SWEEP_A = (0.1, 0.4, 0.7, 1.0, 1.3, 1.6, 2.0)
#: Export smoothings [px] over which the noise-correlation curve is computed.
SMOOTHING_SWEEP_PX = (0.0, 0.3, 0.45, 0.6, 0.75, 0.9, 1.1, 1.4, 1.8, 2.4)


class MatchError(ValueError):
    """The image cannot be matched; the message says why."""


@dataclass(frozen=True)
class ImageFigures:
    """What :func:`measure_image` reads off one image.

    Attributes
    ----------
    pixel_size_A : float
        [Å/px].
    contrast : float
        ``(I_M − I_H)/(I_X − I_H)``: host metal over full chalcogen columns above the
        hollow sites.
    noise_level : float
        Standard deviation of the pixel noise (robust, of the residual of a 1 px Gaussian
        smoothing, corrected for the filter's white-noise gain) over ``I_M − I_H``.
    noise_correlation : float
        Correlation of that residual between neighbouring pixels (mean of x and y; white
        noise: about −0.2; filtered or upsampled images: > 0).
    site_scatter : float
        ``1.4826 · MAD`` of the metal sites' disk means (background removed) over
        ``I_M − I_H``: how much equal columns scatter, relative to their contrast.
    peak_width_A : float
        rms radius of the mean metal column above the hollow level, within half a bond [Å].
    background : float
        Standard deviation of the image smoothed over one lattice constant (Gaussian) over
        that of the rest: the low-frequency background (contamination, thickness) relative
        to the lattice.
    line_jitter_A : float
        rms shift between consecutive scan lines along x, slow drifts removed [Å].
    line_noise : float
        rms change of a scan line's mean from the mean of its two neighbours (divided by
        √1.5, the factor for independent line gains), relative to the image mean.
    clip_low_percent, clip_high_percent : float
        Pixels at 0 and at 255 in an 8-bit export [%] (0 for other images).
    eight_bit : bool
        Integer values within 0–255.
    n_metal, n_chalcogen : int
        Lattice sites found.
    bond_length_px : float
        Projected metal–chalcogen distance [px].
    """

    pixel_size_A: float
    contrast: float
    noise_level: float
    noise_correlation: float
    site_scatter: float
    peak_width_A: float
    background: float
    line_jitter_A: float
    line_noise: float
    clip_low_percent: float
    clip_high_percent: float
    eight_bit: bool
    n_metal: int
    n_chalcogen: int
    bond_length_px: float

    def to_dict(self) -> dict:
        return {
            k: (bool(v) if isinstance(v, bool | np.bool_) else v) for k, v in asdict(self).items()
        }


@dataclass(frozen=True)
class SiteValues:
    """Disk means at the lattice sites of one image (background removed), for histograms.

    ``metal``, ``chalcogen``, ``hollow``: ndarray of float.
    """

    metal: np.ndarray
    chalcogen: np.ndarray
    hollow: np.ndarray

    def normalised(self) -> SiteValues:
        """``(v − median hollow)/(median metal − median hollow)`` for every site."""
        h = float(np.median(self.hollow)) if len(self.hollow) else 0.0
        span = float(np.median(self.metal)) - h if len(self.metal) else 1.0
        span = span if span > 0 else 1.0
        return SiteValues(
            (self.metal - h) / span, (self.chalcogen - h) / span, (self.hollow - h) / span
        )


# ---------------------------------------------------------------------------------------
# measuring an image
# ---------------------------------------------------------------------------------------
def find_lattice(image, pixel_size_A: float, material: str):
    """Columns of a 2H monolayer image placed on its lattice, without a network.

    Peaks of the image smoothed over 0.3 Å at least 0.6 bond lengths apart, placed on the
    two sublattices by :func:`~simgen.experiment.lattice.fit_lattice` (topology; the metal
    sublattice decided by brightness with the material's expectation).

    Parameters
    ----------
    image : array_like, shape (H, W)
    pixel_size_A : float
        [Å/px].
    material : str
        E.g. ``"WSe2"``.

    Returns
    -------
    xy : ndarray, shape (N, 2)
        Column positions ``(x, y)`` [px].
    fit : LatticeFit

    Raises
    ------
    MatchError
        Too few columns for a lattice.
    """
    from skimage.feature import peak_local_max

    from simgen.experiment.calibration import lattice_constant_of
    from simgen.experiment.lattice import fit_lattice

    img = np.asarray(image, dtype=np.float64)
    bond = lattice_constant_of(material) / math.sqrt(3.0) / pixel_size_A
    if bond < 3.0:
        raise MatchError(
            f"pixel size {pixel_size_A:.3f} Å/px: the bond length is {bond:.1f} px, too few "
            "pixels to tell the columns apart (need about 3 or more)"
        )
    smooth = ndimage.gaussian_filter(img, 0.3 / pixel_size_A)
    peaks = peak_local_max(smooth, min_distance=max(int(0.6 * bond), 1), exclude_border=2)
    xy = peaks[:, ::-1].astype(np.float64)
    if len(xy) < 12:
        raise MatchError(f"only {len(xy)} columns found: not a lattice image at this pixel size")
    try:
        fit = fit_lattice(xy, image=smooth, material=material, bond_length_px=bond)
    except ValueError as err:
        raise MatchError(f"no 2H lattice in the image: {err}") from None
    return xy, fit


def _site_values(image, metal, chalc, bond, a_px) -> tuple[SiteValues, np.ndarray]:
    from simgen.experiment.quality import disk_means, hollow_sites

    img = np.asarray(image, dtype=np.float64)
    flat = img - ndimage.gaussian_filter(img, 2.0 * a_px) + float(img.mean())
    hollow = hollow_sites(metal, chalc, bond, img.shape)
    r = 0.25 * bond
    values = SiteValues(
        disk_means(flat, metal, r), disk_means(flat, chalc, r), disk_means(flat, hollow, r)
    )
    return values, flat


def peak_width_A(image, metal_xy, hollow_level: float, bond_px: float, pixel_size_A: float):
    """rms radius [Å] of the mean metal column above ``hollow_level``, within half a bond.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    metal_xy : ndarray, shape (N, 2)
        ``(x, y)`` [px].
    hollow_level : float
        Background subtracted before the moments.
    bond_px : float
    pixel_size_A : float
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    half = int(math.ceil(0.5 * bond_px))
    xy = np.asarray(metal_xy, dtype=np.float64).reshape(-1, 2)
    ci, cj = np.rint(xy[:, 1]).astype(int), np.rint(xy[:, 0]).astype(int)
    keep = (ci >= half) & (ci < h - half) & (cj >= half) & (cj < w - half)
    if keep.sum() < 3:
        return float("nan")
    offs = np.arange(-half, half + 1)
    patches = img[(ci[keep, None] + offs)[:, :, None], (cj[keep, None] + offs)[:, None, :]]
    mean = patches.mean(axis=0) - hollow_level
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    r2 = dx**2 + dy**2
    wgt = np.where(r2 <= (0.5 * bond_px) ** 2, np.clip(mean, 0.0, None), 0.0)
    if not wgt.sum() > 0:
        return float("nan")
    return float(math.sqrt((wgt * r2).sum() / wgt.sum())) * pixel_size_A


def line_jitter_A(image, pixel_size_A: float) -> float:
    """rms shift [Å] between consecutive scan lines along x (fast scan), slow drifts removed.

    Each pair of lines is compared by least squares on the x-gradient (``row_{r+1} ≈
    row_r(x − s)``); the series of shifts is high-passed (minus its running median over 7
    lines) and its robust spread divided by √2 (a difference of two independent offsets).
    Noise gives a floor: compare images of equal noise, as :func:`match` does.
    """
    img = ndimage.gaussian_filter1d(np.asarray(image, dtype=np.float64), 1.0, axis=1)
    a, b = img[:-1], img[1:]
    g = np.gradient(0.5 * (a + b), axis=1)
    den = (g * g).sum(axis=1)
    ok = den > 0
    if ok.sum() < 16:
        return float("nan")
    shift = -((b - a) * g).sum(axis=1)[ok] / den[ok]
    hp = shift - ndimage.median_filter(shift, size=7, mode="nearest")
    mad = float(np.median(np.abs(hp - np.median(hp))))
    return 1.4826 * mad / math.sqrt(2.0) * pixel_size_A


def line_noise(image) -> float:
    """rms relative change of a scan line's mean intensity against its neighbours'.

    ``d_r = m_r − (m_{r−1} + m_{r+1})/2`` of the line means ``m``; independent per-line gain
    changes of rms ``g`` give ``std(d) = √1.5 · g · mean``. The lattice changes the line
    means smoothly over many lines at atomic-resolution sampling, so it hardly enters;
    noise gives a floor (compare images of equal noise, as :func:`match` does).
    """
    img = np.asarray(image, dtype=np.float64)
    m = img.mean(axis=1)
    mean = float(img.mean())
    if len(m) < 8 or not mean > 0:
        return float("nan")
    d = m[1:-1] - 0.5 * (m[:-2] + m[2:])
    mad = float(np.median(np.abs(d - np.median(d))))
    return 1.4826 * mad / math.sqrt(1.5) / mean


def _pixel_noise(image, span: float) -> tuple[float, float]:
    img = np.asarray(image, dtype=np.float64)
    resid = img - ndimage.gaussian_filter(img, 1.0)
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    kernel = delta - ndimage.gaussian_filter(delta, 1.0)
    gain = float(np.sqrt((kernel**2).sum()))  # white noise through the residual filter
    lo, hi = img.min(), img.max()
    ok = (ndimage.minimum_filter(img, 5) > lo) & (ndimage.maximum_filter(img, 5) < hi)
    if ok.sum() < 100:
        return float("nan"), float("nan")
    r = resid - resid[ok].mean()
    var = (r[ok] ** 2).mean()
    bx, by = ok[:, 1:] & ok[:, :-1], ok[1:] & ok[:-1]
    cx = (r[:, 1:] * r[:, :-1])[bx].mean() / var
    cy = (r[1:] * r[:-1])[by].mean() / var
    corr = float(0.5 * (cx + cy))
    sigma = 1.4826 * float(np.median(np.abs(r[ok]))) / gain
    return sigma / span, corr


def _clipping(img: np.ndarray) -> tuple[bool, float, float]:
    eight = bool(img.min() >= 0 and img.max() <= 255 and np.all(img == np.rint(img)))
    if not eight:
        return False, 0.0, 0.0
    low = 100.0 * float(np.mean(img == 0)) if img.min() == 0 else 0.0
    high = 100.0 * float(np.mean(img == 255)) if img.max() == 255 else 0.0
    return True, low, high


def measure_image(image, pixel_size_A: float, material: str) -> tuple[ImageFigures, SiteValues]:
    """The figures :func:`match` compares, read off one image.

    Parameters
    ----------
    image : array_like, shape (H, W)
        Real or simulated HAADF image (any units; 8-bit exports are recognised).
    pixel_size_A : float
        [Å/px].
    material : str
        E.g. ``"WSe2"``: the lattice constant and which sublattice is brighter.

    Returns
    -------
    ImageFigures, SiteValues

    Raises
    ------
    MatchError
        No lattice found, or no contrast between the sites.
    """
    from simgen.experiment.calibration import lattice_constant_of
    from simgen.experiment.quality import contrast_ratio

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 32:
        raise MatchError(f"expected one image of at least 32 × 32 px, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise MatchError("the image holds NaN or infinite values")
    xy, fit = find_lattice(img, pixel_size_A, material)
    bond = float(fit.bond_length_px)
    metal, chalc = xy[fit.site == METAL], xy[fit.site == CHALCOGEN]
    a_px = lattice_constant_of(material) / pixel_size_A
    values, flat = _site_values(img, metal, chalc, bond, a_px)
    if len(values.hollow) < 3 or len(values.metal) < 3:
        raise MatchError("too few metal and hollow sites to measure the contrast")
    i_h = float(np.median(values.hollow))
    span = float(np.median(values.metal)) - i_h
    if not span > 0:
        raise MatchError("the metal sites are not brighter than the hollow sites")
    spread = 1.4826 * float(np.median(np.abs(values.metal - np.median(values.metal))))
    noise, corr = _pixel_noise(img, span)
    low = ndimage.gaussian_filter(img, a_px)
    m = int(min(a_px, min(img.shape) // 4))
    inner = (slice(m, img.shape[0] - m), slice(m, img.shape[1] - m))
    rest = float(np.std((img - low)[inner]))
    eight, clip_lo, clip_hi = _clipping(img)
    contrast = float(contrast_ratio(img, metal, chalc, bond))
    if not (math.isfinite(contrast) and contrast > 0):
        raise MatchError("the chalcogen columns are not brighter than the hollow sites")
    if not (math.isfinite(noise) and noise > 0):
        raise MatchError("no pixel noise measurable (a noise-free or saturated image?)")
    figures = ImageFigures(
        pixel_size_A=float(pixel_size_A),
        contrast=contrast,
        noise_level=noise,
        noise_correlation=corr,
        site_scatter=spread / span,
        peak_width_A=peak_width_A(flat, metal, i_h, bond, pixel_size_A),
        background=float(np.std(low[inner])) / rest if rest > 0 else float("nan"),
        line_jitter_A=line_jitter_A(img, pixel_size_A),
        line_noise=line_noise(img),
        clip_low_percent=clip_lo,
        clip_high_percent=clip_hi,
        eight_bit=eight,
        n_metal=int(len(metal)),
        n_chalcogen=int(len(chalc)),
        bond_length_px=bond,
    )
    return figures, values


def measure_tiles(
    image, pixel_size_A: float, material: str, tile_shape
) -> tuple[ImageFigures, SiteValues]:
    """:func:`measure_image` on the non-overlapping tiles of ``tile_shape`` (the training
    images' size), combined by the median (:func:`combine_figures`).

    Figures such as the line noise, line jitter and background depend on the image's size
    (a line's mean averages its width), so an image is compared with simulations of equal
    size through its tiles. An image smaller than a tile is measured whole.

    Raises
    ------
    MatchError
        When no tile can be measured.
    """
    img = np.asarray(image)
    th, tw = (int(v) for v in tile_shape)
    h, w = img.shape
    if h < th or w < tw:
        return measure_image(img, pixel_size_A, material)
    ny, nx = h // th, w // tw
    oy, ox = (h - ny * th) // 2, (w - nx * tw) // 2
    figures, sites, errors = [], [], []
    for i in range(ny):
        for j in range(nx):
            tile = img[oy + i * th : oy + (i + 1) * th, ox + j * tw : ox + (j + 1) * tw]
            try:
                f, v = measure_image(tile, pixel_size_A, material)
            except MatchError as err:
                errors.append(str(err))
                continue
            figures.append(f)
            sites.append(v)
    if not figures:
        raise MatchError(f"no {th} × {tw} tile could be measured: {errors[0]}")
    return combine_figures(figures), _merge_sites(sites)


def _merge_sites(sites: Sequence[SiteValues]) -> SiteValues:
    return SiteValues(
        *(np.concatenate([getattr(v, k) for v in sites]) for k in ("metal", "chalcogen", "hollow"))
    )


def radial_power_spectrum(image, pixel_size_A: float, n_bins: int = 64):
    """Azimuthally averaged power spectrum of the mean-removed, Hann-windowed image.

    Returns
    -------
    q : ndarray
        Spatial frequency [1/Å] at the bin centres (up to Nyquist).
    power : ndarray
        Mean ``|F|²`` per bin, normalised to a total of 1.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    f = np.fft.fftshift(np.abs(np.fft.fft2((img - img.mean()) * win)) ** 2)
    ky = np.fft.fftshift(np.fft.fftfreq(h, pixel_size_A))
    kx = np.fft.fftshift(np.fft.fftfreq(w, pixel_size_A))
    q = np.hypot(*np.meshgrid(ky, kx, indexing="ij"))
    edges = np.linspace(0.0, 0.5 / pixel_size_A, n_bins + 1)
    idx = np.digitize(q.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    power = np.bincount(idx[ok], f.ravel()[ok], n_bins) / np.maximum(
        np.bincount(idx[ok], minlength=n_bins), 1
    )
    return 0.5 * (edges[1:] + edges[:-1]), power / power.sum()


def smoothing_correlation_curve(size: int = 256, seed: int = 0):
    """Noise correlation and noise level (as :func:`measure_image` measures them) of unit
    white noise smoothed by each of :data:`SMOOTHING_SWEEP_PX`.

    Returns
    -------
    correlation : ndarray
        Increasing with the smoothing.
    level : ndarray
        The measured noise level of unit noise (1 without smoothing); decreasing.
    """
    noise = np.random.default_rng(seed).standard_normal((size, size))
    corr, level = [], []
    for s in SMOOTHING_SWEEP_PX:
        img = ndimage.gaussian_filter(noise, s, mode="nearest") if s > 0 else noise
        lv, c = _pixel_noise(img, 1.0)
        corr.append(c)
        level.append(lv)
    return np.maximum.accumulate(np.array(corr)), np.array(level) / level[0]


def combine_figures(figures: Sequence[ImageFigures]) -> ImageFigures:
    """Median of each figure over several images (a folder of one microscope)."""
    if not figures:
        raise MatchError("no image to match")
    out = {}
    for name, value in figures[0].to_dict().items():
        vals = [getattr(f, name) for f in figures]
        if isinstance(value, bool):
            out[name] = all(vals)
        elif isinstance(value, int):
            out[name] = int(np.median(vals))
        else:
            finite = [v for v in vals if math.isfinite(v)]
            out[name] = float(np.median(finite)) if finite else float("nan")
    return ImageFigures(**out)


# ---------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Matched:
    """Matched acquisition values (the centres of the written distributions).

    Attributes
    ----------
    pixel_size_A, inner_mrad, lambda_counts, source_size_A, line_jitter_A, line_current_rel,
    contamination_rel, current_drift_rel,
    stretch_low_percent, stretch_high_percent, smoothing_px, gamma, drift_vx_A_per_s,
    drift_vy_A_per_s : float
        ``gamma`` (the detector response exponent) stays 1 unless the image's contrast is
        beyond what any detector angle gives.
    eight_bit : bool
        The image is an 8-bit export (the config exports 8-bit with its clipping; else no
        export).
    notes : tuple of str
        What could not be matched and why.
    """

    pixel_size_A: float
    inner_mrad: float
    lambda_counts: float
    source_size_A: float
    line_jitter_A: float
    line_current_rel: float
    contamination_rel: float
    current_drift_rel: float
    stretch_low_percent: float
    stretch_high_percent: float
    smoothing_px: float = 0.0
    gamma: float = 1.0
    eight_bit: bool = True
    drift_vx_A_per_s: float = 0.0
    drift_vy_A_per_s: float = 0.0
    notes: tuple = field(default=())

    def values(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "notes"}


@dataclass(frozen=True)
class MatchResult:
    """What :func:`match` returns.

    Attributes
    ----------
    matched : Matched
    target : ImageFigures
        The image's figures (median over its tiles).
    simulated : ImageFigures
        The same figures on images simulated from the matched centres.
    config : SimgenConfig
        The matched config (distributions about the matched values).
    check_images : list of ndarray
        The simulated check images (for the report).
    check_sites : SiteValues
        Their site values.
    contrast_curve : (ndarray, ndarray)
        Inner angle [mrad] and noise-free contrast of the model.
    history : list of dict
        Matched values and simulated figures per refinement round.
    """

    matched: Matched
    target: ImageFigures
    simulated: ImageFigures
    config: object
    check_images: list
    check_sites: SiteValues
    contrast_curve: tuple
    history: list

    def agreement(self) -> dict:
        """``{figure: (image, simulated, relative difference, within tolerance)}``."""
        out = {}
        for name, tol in CHECKED.items():
            a, b = getattr(self.target, name), getattr(self.simulated, name)
            rel = (b - a) / a if a else float("nan")
            out[name] = (a, b, rel, bool(abs(rel) <= tol))
        return out


def _is_distribution(value) -> bool:
    from simgen.distributions import KINDS

    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in KINDS[1:]


#: The detector [mrad] (inner, outer) :func:`match` starts from when the base config draws
#: one: the contrast crossing nearest this inner angle is taken.
BASE_DETECTOR_MRAD = (60.0, 200.0)


def _fixed_or(dist, default: float) -> float:
    """A fixed distribution's value, else ``default`` clamped into its range."""
    lo, hi = dist.bounds()  # (value, value) when fixed
    return float(min(max(float(default), lo), hi))


def _centre(value):
    from simgen.distributions import Distribution

    return Distribution.parse(value).centre()


def centred_config(cfg):
    """``cfg`` with every distribution replaced by its centre (mean, mid-range, geometric
    mean, first choice): the config's typical sample."""

    def walk(node):
        if _is_distribution(node):
            return _centre(node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    return type(cfg).from_dict(walk(cfg.to_dict()))


def _line_time_s(cfg) -> float:
    dwell = _centre(cfg.acquisition.scan.dwell_time_us.to_config())
    fly = _centre(cfg.acquisition.scan.flyback_time_us.to_config())
    return (cfg.dataset.image_size[1] * dwell + fly) * 1e-6


def drift_from_distortion(anisotropy: float, shear: float, pixel_size_A: float, line_time_s):
    """Linear drift velocities ``(vx, vy)`` [Å/s] giving a measured scan anisotropy and shear.

    The probe moves by ``v·τ`` per line (``τ`` the line time), so the slow-scan step becomes
    ``p + vy·τ`` (anisotropy ``vy·τ/p``) and each line is shifted along x by ``vx·τ``
    (shear ``vx·τ/p``).
    """
    a = 0.0 if not math.isfinite(anisotropy) else anisotropy
    s = 0.0 if not math.isfinite(shear) else shear
    return s * pixel_size_A / line_time_s, a * pixel_size_A / line_time_s


#: Width of the written distribution about each matched value: (field, config key, kind,
#: half-width, relative?, low, high, smallest half-width). ``log``: log-uniform over
#: ``v·(1 ∓ w)``; a relative width about 0 is no width unless the smallest is > 0.
WIDTHS = (
    ("inner_mrad", "optics.haadf_inner_mrad", "uniform", 8.0, False, 40.0, 120.0, 0.0),
    ("source_size_A", "optics.source_size_A", "uniform", 0.2, False, 0.05, None, 0.0),
    ("lambda_counts", "acquisition.shot.lambda_counts", "log", 0.35, True, None, None, 0.0),
    ("line_jitter_A", "acquisition.jitter.line_x_A", "uniform", 0.5, True, 0.0, None, 0.0),
    ("line_current_rel", "acquisition.current.line_rel", "uniform", 0.5, True, 0.0, None, 0.0),
    ("current_drift_rel", "acquisition.current.drift_rel", "uniform", 0.5, True, 0.0, None, 0.0),
    ("contamination_rel", "acquisition.contamination.rel", "uniform", 0.5, True, 0.0, None, 0.02),
    ("drift_vx_A_per_s", "acquisition.drift.vx_A_per_s", "normal", 0.05, False, None, None, 0.0),
    ("drift_vy_A_per_s", "acquisition.drift.vy_A_per_s", "normal", 0.05, False, None, None, 0.0),
    ("gamma", "acquisition.detector.gamma", "uniform", 0.08, True, 0.2, 5.0, 0.0),
    ("smoothing_px", "acquisition.detector.smoothing_px", "uniform", 0.15, True, 0.0, None, 0.0),
)
_STRETCH = (
    ("stretch_low_percent", "acquisition.detector.stretch_low_percent"),
    ("stretch_high_percent", "acquisition.detector.stretch_high_percent"),
)


def matched_overrides(matched: Matched | Sequence[Matched], *, widths: bool) -> dict:
    """Dotted config overrides for a match: fixed values (``widths=False``: one match's
    centre) or distributions (``widths=True``, what training draws) about one match or
    spanning several (a folder: from the smallest to the largest matched value, each
    widened by :data:`WIDTHS`).

    Parameters
    ----------
    matched : Matched or sequence of Matched
    widths : bool

    Returns
    -------
    dict
        ``{"optics.haadf_inner_mrad": {"uniform": [a, b]}, ...}`` (one pixel size: the
        median; float images get no 8-bit export).

    Raises
    ------
    ValueError
        Fixed values asked for several matches.
    """
    many = [matched] if isinstance(matched, Matched) else list(matched)
    if not many:
        raise MatchError("nothing matched")
    if not widths and len(many) > 1:
        raise ValueError("fixed values need one match")

    def span(name, kind, width, relative, lo, hi, least=0.0):
        vals = [float(getattr(m, name)) for m in many]
        if not widths:
            return vals[0]
        if kind == "normal":  # drift: the mean of the matches, their spread added
            return {
                "normal": [round(float(np.mean(vals)), 4), round(width + float(np.std(vals)), 4)]
            }
        half = [max(abs(v) * width if relative else width, least) for v in vals]
        a = min(v - d for v, d in zip(vals, half, strict=True))
        b = max(v + d for v, d in zip(vals, half, strict=True))
        if kind == "log":
            a = min(v * (1 - width) for v in vals)
            b = max(v * (1 + width) for v in vals)
        a = a if lo is None else max(a, lo)
        b = b if hi is None else min(b, hi)
        if b <= a:
            return round(a, 4)
        return {("loguniform" if kind == "log" else "uniform"): [round(a, 4), round(b, 4)]}

    # one pixel size (training needs one per store; labelling resamples each image to it)
    sizes = [m.pixel_size_A for m in many]
    out = {
        "optics.pixel_size_A": round(float(np.median(sizes)), 5) if widths else sizes[0],
        "acquisition.shot.mode": "lambda",
    }
    for name, key, kind, width, relative, lo, hi, least in WIDTHS:
        out[key] = span(name, kind, width, relative, lo, hi, least)
    if any(m.eight_bit for m in many):  # exported with the images' clipping
        out["acquisition.detector.export_bits"] = 8
        for name, key in _STRETCH:
            out[key] = span(name, "uniform", 0.25, True, 0.0, 49.0)
    else:  # float images: the detector output as it is
        out["acquisition.detector.export_bits"] = None
        for _, key in _STRETCH:
            out[key] = 0.0
    return out


def _host_xy(sample):
    from simgen.experiment.quality import host_classes

    cols = sample.columns
    cid, site = np.asarray(cols["class_id"]), np.asarray(cols["site"])
    hosts = host_classes(cid, site)
    xy = np.column_stack([cols["x"], cols["y"]])
    metal = xy[(site == METAL) & (cid == hosts.get(METAL, -1))]
    chalc = xy[(site == CHALCOGEN) & (cid == hosts.get(CHALCOGEN, -1))]
    return metal, chalc


def _solve_curve(x, y, target, prefer):
    """``x`` where the piecewise-linear ``y(x)`` crosses ``target``, the crossing nearest
    ``prefer``; the ``x`` of the closest ``y`` when none does (second value False)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not math.isfinite(target) or not np.isfinite(y).any():
        return float(prefer), False
    roots = []
    for i in range(len(x) - 1):
        a, b = y[i] - target, y[i + 1] - target
        if a == 0:
            roots.append(x[i])
        elif a * b < 0:
            roots.append(x[i] + (x[i + 1] - x[i]) * a / (a - b))
    if abs(y[-1] - target) == 0:
        roots.append(x[-1])
    if roots:
        return float(min(roots, key=lambda r: abs(r - prefer))), True
    return float(x[int(np.nanargmin(np.abs(y - target)))]), False


def match(
    target: ImageFigures,
    base_cfg,
    grid,
    *,
    material: str,
    anisotropy: float = float("nan"),
    shear: float = float("nan"),
    n_check: int = 6,
    rounds: int = 4,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> MatchResult:
    """Matched acquisition values for an image's figures, refined by simulation.

    1. Curves of the noise-free model: contrast against the HAADF inner angle (at the
       shipped grid's angles, ground-truth sites) and metal-peak width against the source
       size.
    2. Starting values: the inner angle whose contrast is the image's (the crossing nearest
       the base config's angle; contrast is not monotonic in the angle), the source size of
       its width, the export's clipping, the drift giving the FFT's anisotropy and shear.
    3. ``rounds`` times: simulate ``n_check`` images from the matched centres, measure them
       with :func:`measure_image`, and correct each value by the mismatch of its figure
       (λ by the noise level squared, the angle through the contrast curve, the source
       through the width, jitter and contamination by their figures).

    Parameters
    ----------
    target : ImageFigures
        The image's figures (:func:`measure_image`, or :func:`combine_figures`).
    base_cfg : SimgenConfig
        Everything not matched comes from it (structure, defects, optics but the detector
        and source, dataset size).
    grid : DetectorGrid
        Incoherent-model calibrations over detector angles for ``material``.
    material : str
    anisotropy, shear : float
        From the FFT calibration (NaN: none).
    n_check : int
        Simulated images per round.
    rounds : int
    seed : int
        Seed of the simulated images.
    progress : callable, optional
        Told a line per step.

    Returns
    -------
    MatchResult
    """
    from simgen.pipeline import make_sample

    say = progress or (lambda _m: None)
    notes = []
    p = target.pixel_size_A
    # one microscope has one detector: a base that draws it (the shipped config) starts from
    # a common HAADF detector instead of the middle of its range
    outer = _fixed_or(base_cfg.optics.haadf_outer_mrad, BASE_DETECTOR_MRAD[1])
    lo_in, hi_in = float(min(grid.inner_mrad)), float(max(grid.inner_mrad))
    sweep_inner = [a for a in INNER_SWEEP_MRAD if lo_in <= a <= hi_in]
    base = centred_config(
        base_cfg.with_overrides(
            {
                "structure.material": material,
                "simulation.model": "incoherent",
                "optics.pixel_size_A": p,
            }
        )
    )
    base_inner = _fixed_or(base_cfg.optics.haadf_inner_mrad, BASE_DETECTOR_MRAD[0])

    def cfg_for(m: Matched, **extra):
        over = matched_overrides(m, widths=False)
        over["optics.haadf_outer_mrad"] = outer
        over.update(extra)
        return base.with_overrides(over)

    def sample(cfg, i):
        return make_sample(cfg, i, calibration=grid.to_dict())  # at the cfg's detector

    # 1. noise-free model curves (no contamination, ground-truth sites)
    from simgen.experiment.quality import contrast_ratio, hollow_sites

    say("model contrast against the detector inner angle ...")
    m = Matched(
        pixel_size_A=p,
        inner_mrad=base_inner,
        lambda_counts=float(_centre(base_cfg.acquisition.shot.lambda_counts.to_config())),
        source_size_A=float(_centre(base_cfg.optics.source_size_A.to_config())),
        line_jitter_A=0.0,
        line_current_rel=0.0,
        contamination_rel=0.0,
        current_drift_rel=float(_centre(base_cfg.acquisition.current.drift_rel.to_config())),
        stretch_low_percent=0.0,
        stretch_high_percent=0.0,
    )
    bond = target.bond_length_px
    quiet = {"acquisition.jitter.line_x_A": 0.0, "acquisition.contamination.rel": 0.0}

    def ideal_figures(cfg, i=0):
        s = sample(cfg, 10_000 + i)
        metal, chalc = _host_xy(s)
        img = s.noise_free
        ratio = contrast_ratio(img, metal, chalc, bond)
        hollow = hollow_sites(metal, chalc, bond, img.shape)
        from simgen.experiment.quality import disk_means

        i_h = float(np.median(disk_means(img, hollow, 0.25 * bond))) if len(hollow) else 0.0
        return ratio, peak_width_A(img, metal, i_h, bond, p)

    curve = []
    for a in sweep_inner:
        curve.append(ideal_figures(cfg_for(m, **quiet, **{"optics.haadf_inner_mrad": float(a)}))[0])
    curve = np.array(curve)
    say("model peak width against the source size ...")
    widths = np.array(
        [
            ideal_figures(cfg_for(m, **quiet, **{"optics.source_size_A": s}))[1]
            for s in SOURCE_SWEEP_A
        ]
    )

    # 2. starting values
    inner, found = _solve_curve(sweep_inner, curve, target.contrast, base_inner)
    if not found:
        notes.append(
            f"contrast {target.contrast:.2f} is outside what the model gives for inner angles "
            f"{sweep_inner[0]}-{sweep_inner[-1]} mrad ({curve.min():.2f}-{curve.max():.2f}): "
            "matched with the detector response exponent gamma instead; check the material, "
            "energy and convergence angle"
        )
    source, _ = _solve_curve(SOURCE_SWEEP_A, widths, target.peak_width_A, 0.6)
    corr_curve, level_curve = smoothing_correlation_curve()
    smoothing, _ = _solve_curve(SMOOTHING_SWEEP_PX, corr_curve, target.noise_correlation, 0.0)
    vx, vy = drift_from_distortion(anisotropy, shear, p, _line_time_s(base))
    m = Matched(
        pixel_size_A=p,
        inner_mrad=inner,
        lambda_counts=m.lambda_counts,
        source_size_A=source,
        line_jitter_A=0.0,
        line_current_rel=0.0,
        contamination_rel=0.1,
        current_drift_rel=m.current_drift_rel,
        stretch_low_percent=target.clip_low_percent,
        stretch_high_percent=target.clip_high_percent,
        smoothing_px=smoothing,
        eight_bit=bool(target.eight_bit),
        drift_vx_A_per_s=vx,
        drift_vy_A_per_s=vy,
    )

    def simulate_figures(m: Matched, offset: int):
        cfg = cfg_for(m)
        figs, sites, images = [], [], []
        for i in range(n_check):
            s = sample(cfg, offset + i)
            try:
                f, v = measure_image(s.image, p, material)
            except MatchError:
                continue
            figs.append(f)
            sites.append(v)
            images.append(s.image)
        if not figs:
            raise MatchError("no simulated image of the matched config could be measured")
        merged = _merge_sites(sites)
        return combine_figures(figs), merged, images

    # 3. refinement
    history = []
    ideal_target = target.contrast
    for r in range(rounds):
        say(f"refinement round {r + 1}/{rounds}: {n_check} simulated images ...")
        sim, _, _ = simulate_figures(m, 1000 * (r + 1))
        history.append(
            {"round": r + 1, **m.values(), **{f"sim_{k}": v for k, v in sim.to_dict().items()}}
        )
        updates = {}
        # contrast: the acquisition's effect on it (clipping, gamma) as a factor on the curve
        if math.isfinite(sim.contrast) and sim.contrast > 0:
            if m.gamma == 1.0:
                ideal_target = ideal_target * target.contrast / sim.contrast
                inner, reachable = _solve_curve(sweep_inner, curve, ideal_target, m.inner_mrad)
                updates["inner_mrad"] = inner
            else:
                reachable = False  # once on the response exponent, the angle stays put
            if not reachable and abs(math.log(sim.contrast)) > 0.01:
                # beyond every detector angle: the response exponent (r -> ~r^gamma) does it
                ratio = math.log(target.contrast) / math.log(sim.contrast)
                updates["gamma"] = float(np.clip(m.gamma * ratio, 0.3, 4.0))
        if math.isfinite(sim.noise_correlation) and math.isfinite(target.noise_correlation):
            at = float(np.interp(m.smoothing_px, SMOOTHING_SWEEP_PX, corr_curve))
            want = target.noise_correlation + at - sim.noise_correlation
            updates["smoothing_px"], _ = _solve_curve(
                SMOOTHING_SWEEP_PX, corr_curve, want, m.smoothing_px
            )
        if math.isfinite(sim.noise_level) and sim.noise_level > 0 and target.noise_level > 0:
            # shot noise ~ 1/sqrt(lambda), times what the new smoothing leaves of it
            before = float(np.interp(m.smoothing_px, SMOOTHING_SWEEP_PX, level_curve))
            after = float(
                np.interp(
                    updates.get("smoothing_px", m.smoothing_px), SMOOTHING_SWEEP_PX, level_curve
                )
            )
            lam = m.lambda_counts * (sim.noise_level / target.noise_level * after / before) ** 2
            updates["lambda_counts"] = float(np.clip(lam, 0.5, 1e5))
        w_ideal = float(np.interp(m.source_size_A, SOURCE_SWEEP_A, widths))
        if math.isfinite(sim.peak_width_A) and math.isfinite(target.peak_width_A):
            want = target.peak_width_A**2 - (sim.peak_width_A**2 - w_ideal**2)
            updates["source_size_A"], _ = _solve_curve(
                SOURCE_SWEEP_A, widths, math.sqrt(max(want, 0.0)), m.source_size_A
            )
        if math.isfinite(sim.line_jitter_A) and math.isfinite(target.line_jitter_A):
            j2 = m.line_jitter_A**2 + target.line_jitter_A**2 - sim.line_jitter_A**2
            updates["line_jitter_A"] = float(math.sqrt(max(j2, 0.0)))
        if math.isfinite(sim.line_noise) and math.isfinite(target.line_noise):
            l2 = m.line_current_rel**2 + target.line_noise**2 - sim.line_noise**2
            updates["line_current_rel"] = float(math.sqrt(max(l2, 0.0)))
        if (
            math.isfinite(sim.background)
            and sim.background > 0
            and math.isfinite(target.background)
        ):
            # both slow intensity changes: contamination and the probe current's drift
            factor = target.background / sim.background
            updates["contamination_rel"] = float(np.clip(m.contamination_rel * factor, 0.0, 2.0))
            updates["current_drift_rel"] = float(np.clip(m.current_drift_rel * factor, 0.0, 0.5))
        m = Matched(**{**m.values(), **updates, "notes": ()})

    say(f"check: {n_check} images simulated from the matched values ...")
    sim, sites, images = simulate_figures(m, 100_000)
    m = Matched(**m.values(), notes=tuple(notes))
    history.append(
        {"round": "check", **m.values(), **{f"sim_{k}": v for k, v in sim.to_dict().items()}}
    )
    cfg = base_cfg.with_overrides(
        {
            "structure.material": material,
            "optics.haadf_outer_mrad": outer,
            **matched_overrides(m, widths=True),
        }
    )
    return MatchResult(
        matched=m,
        target=target,
        simulated=sim,
        config=cfg,
        check_images=images,
        check_sites=sites,
        contrast_curve=(np.array(sweep_inner, float), curve),
        history=history,
    )


def match_images(
    measured: Mapping[str, tuple[ImageFigures, float, float]],
    base_cfg,
    grid,
    *,
    material: str,
    n_check: int = 6,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, MatchResult]:
    """:func:`match` for each image of a session.

    Parameters
    ----------
    measured : mapping
        ``{name: (figures, anisotropy, shear)}``.
    base_cfg, grid, material, n_check, seed, progress
        As for :func:`match`.

    Returns
    -------
    dict of name to MatchResult
        Images that cannot be matched (:class:`MatchError`) are left out, with a line
        through ``progress``.
    """
    say = progress or (lambda _m: None)
    out = {}
    for k, (name, (figures, anisotropy, shear)) in enumerate(measured.items()):
        say(f"matching {name} ({k + 1}/{len(measured)}) ...")
        try:
            out[name] = match(
                figures,
                base_cfg,
                grid,
                material=material,
                anisotropy=anisotropy,
                shear=shear,
                n_check=n_check,
                seed=seed,
            )
        except MatchError as err:  # one image must not cost the others
            say(f"skipped {name}: {err}")
    return out


def combined_config(base_cfg, material: str, results: Mapping[str, MatchResult]):
    """The config for a session: ``base_cfg`` with distributions spanning every image's
    matched values (:func:`matched_overrides` of all of them).

    Parameters
    ----------
    base_cfg : SimgenConfig
    material : str
    results : mapping of name to MatchResult

    Returns
    -------
    SimgenConfig
    """
    matched = [r.matched for r in results.values()]
    outer = _fixed_or(base_cfg.optics.haadf_outer_mrad, BASE_DETECTOR_MRAD[1])
    return base_cfg.with_overrides(
        {
            "structure.material": material,
            "optics.haadf_outer_mrad": outer,
            **matched_overrides(matched, widths=True),
        }
    )


def summary_table(results: Mapping[str, MatchResult]) -> str:
    """One line per image: its contrast and noise level beside the matched simulation's,
    the main matched values, and whether every checked figure agrees.

    Parameters
    ----------
    results : mapping of name to MatchResult

    Returns
    -------
    str
    """
    lines = [
        f"{'image':<28} {'contrast img/sim':>17} {'noise img/sim':>15} {'inner':>6} "
        f"{'gamma':>6} {'lambda':>7} {'smooth':>7} {'source':>7} {'clip %':>7} ok"
    ]
    for name, r in results.items():
        a = r.agreement()
        c, n, m = a["contrast"], a["noise_level"], r.matched
        lines.append(
            f"{name[-28:]:<28} {c[0]:>8.3f}/{c[1]:<8.3f} {n[0]:>7.3f}/{n[1]:<7.3f} "
            f"{m.inner_mrad:>6.1f} {m.gamma:>6.2f} {m.lambda_counts:>7.2f} "
            f"{m.smoothing_px:>7.2f} {m.source_size_A:>7.2f} {m.stretch_low_percent:>7.2f} "
            + ("yes" if all(v[3] for v in a.values()) else "NO")
        )
    notes = sorted({note for r in results.values() for note in r.matched.notes})
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


def describe(result: MatchResult) -> str:
    """Plain-text table of one match: the image's figures beside the matched simulation's,
    then the matched values (what the CLI prints and the YAML header holds).

    Parameters
    ----------
    result : MatchResult

    Returns
    -------
    str
    """
    lines = []
    lines.append(f"{'figure':<14} {'image':>8} {'matched':>8} {'diff':>7}")
    for name, (a, b, rel, ok) in result.agreement().items():
        lines.append(f"{name:<14} {a:>8.3f} {b:>8.3f} {100 * rel:>+6.1f}% {'ok' if ok else 'OFF'}")
    for name in (
        "noise_correlation",
        "site_scatter",
        "line_jitter_A",
        "line_noise",
        "background",
    ):
        a, b = getattr(result.target, name), getattr(result.simulated, name)
        lines.append(f"{name:<14} {a:>8.3f} {b:>8.3f}")
    lines.append("")
    lines.append("matched values (centres of the written distributions):")
    for k, v in result.matched.values().items():
        lines.append(f"  {k:<22} {v:.4g}")
    for note in result.matched.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def report_figure(result: MatchResult, image, sites: SiteValues, *, title: str = ""):
    """The match report: the image beside a simulated one from the matched values (same
    field of view), their radial power spectra, their per-site intensity histograms, the
    model's contrast curve and the table of figures.

    Parameters
    ----------
    result : MatchResult
    image : array_like, shape (H, W)
        The (first) matched image.
    sites : SiteValues
        Its site values (:func:`measure_image`).
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    p = result.target.pixel_size_A
    img = np.asarray(image, dtype=np.float64)
    sim = np.asarray(result.check_images[0], dtype=np.float64)
    sh, sw = sim.shape
    h, w = img.shape
    r0, c0 = max((h - sh) // 2, 0), max((w - sw) // 2, 0)
    crop = img[r0 : r0 + sh, c0 : c0 + sw]

    fig = Figure(figsize=(15, 9.2), layout="constrained")
    axes = fig.subplots(2, 3)
    extent = [0, crop.shape[1] * p / 10, 0, crop.shape[0] * p / 10]
    for ax, data, name in (
        (axes[0, 0], crop, "image (centre)"),
        (axes[0, 1], sim, "matched simulation"),
    ):
        ax.imshow(data, cmap="gray", extent=[0, data.shape[1] * p / 10, 0, data.shape[0] * p / 10])
        ax.set_title(name)
        ax.set_xlabel("x [nm]")
    axes[0, 0].set_xlim(extent[0], extent[1])

    ax = axes[0, 2]
    q, power = radial_power_spectrum(img, p)
    ax.semilogy(q, power, label="image", color="k")
    sims = [radial_power_spectrum(s, p, n_bins=len(q)) for s in result.check_images]
    qs = sims[0][0]
    ax.semilogy(qs, np.mean([s[1] for s in sims], axis=0), label="matched", color="C1", ls="--")
    ax.set_xlabel("spatial frequency [1/Å]")
    ax.set_ylabel("radial power (normalised)")
    ax.set_title("radial power spectrum")
    ax.legend()

    ax = axes[1, 0]
    real_n, sim_n = sites.normalised(), result.check_sites.normalised()
    bins = np.linspace(-0.6, 1.8, 61)
    for name, colour in (("metal", "C0"), ("chalcogen", "C2"), ("hollow", "C7")):
        a, b = getattr(real_n, name), getattr(sim_n, name)
        ax.hist(a, bins, density=True, histtype="step", color=colour, lw=1.6, label=f"{name} image")
        ax.hist(
            b, bins, density=True, histtype="step", color=colour, ls="--", label=f"{name} matched"
        )
    ax.set_xlabel("(site − hollow) / (metal − hollow)")
    ax.set_title("intensity at lattice sites")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    angles, curve = result.contrast_curve
    ax.plot(angles, curve, "o-", color="C0", label="model, noise-free")
    ax.axhline(result.target.contrast, color="k", ls=":", label="image")
    ax.axvline(result.matched.inner_mrad, color="C1", ls="--", label="matched inner angle")
    ax.set_xlabel("HAADF inner angle [mrad]")
    ax.set_ylabel("contrast (I_M − I_H)/(I_X − I_H)")
    ax.set_title("metal/chalcogen contrast")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    ax.axis("off")
    ax.text(0.0, 1.0, describe(result), family="monospace", fontsize=7.2, va="top")
    if title:
        fig.suptitle(title)
    return fig
