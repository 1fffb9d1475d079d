"""Label experimental images with a trained network: file → columns → lattice → classes.

The user-facing end of a model's life (``simgen-train label``). One image goes through

1. **resampling** to the pixel size the network was trained at (cubic spline, Gaussian
   anti-aliasing when shrinking; the factor is kept to map positions back),
2. optional **background removal** (subtract a wide Gaussian blur),
3. the **training normalisation** (:func:`training.augment.normalize_image`, applied by
   :func:`training.predict.predict_probabilities`), overlapping **tiles** blended with
   weights that ramp over the overlap, **dihedral test-time augmentation** and the
   **ensemble** mean and variance per pixel,
4. **columns** from the probability maps (:func:`training.metrics.find_columns`:
   probability-weighted sub-pixel centroids of the foreground blobs, merged blobs split by
   a watershed) and each column's class probabilities and ensemble variance averaged over
   a small disk,
5. the **lattice fit** (:func:`~simgen.experiment.lattice.fit_lattice`: two sublattices by
   topology,
   metal sublattice from the probabilities, empty lattice sites),
6. the **site constraint** (metal-site classes only on metal sites, chalcogen-site classes
   only on chalcogen sites) and the **vacancy check** of empty sites: an empty site becomes
   the scheme's vacancy class of its sublattice (``vac_M``, ``vac_X2``...) when the network's
   probabilities there support it,
7. the **catalogue** and its **summary** (counts, concentrations per nm², per cm² and per
   eligible site) in the original image's pixels and Å.

:func:`label_image` does all of it without touching the disk and returns a
:class:`LabelResult`; :func:`write_outputs` writes one image's files and
:func:`label_files` runs a whole batch of files (the CLI), writing a run-level
``summary.csv`` and ``failures.txt``.

Positions are ``(x, y)`` in pixels of an ``[H, W] = [rows (y), cols (x)]`` image, pixel
centres at integers; lengths in Å, areas in nm².
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from simgen.experiment.calibration import lattice_constant_of
from simgen.experiment.lattice import (
    UNASSIGNED,
    LatticeFit,
    constrain_probabilities,
    fit_lattice,
    scheme_names,
)
from simgen.experiment.quality import quality_figures, store_contrast_range
from simgen.experiment.readers import (
    ExperimentImage,
    ReaderError,
    expand_inputs,
    read_image,
)
from training.experiments.catalogue import (
    Catalogue,
    build_catalogue,
    catalogue_from_lattice,
    flatten_summary,
    summarize,
    vacancy_class,
    write_columns_csv,
    write_run_summary_csv,
    write_summary_json,
)

#: Relative pixel-size difference below which an image is not resampled.
RESAMPLE_TOLERANCE = 1e-3
#: Files written per image by :func:`write_outputs`.
OUTPUT_FILES = (
    "columns.csv",
    "summary.json",
    "overlay.png",
    "class_averages.png",
    "defect_density.png",
)


@dataclass(frozen=True)
class LabelResult:
    """Everything :func:`label_image` found in one image.

    Attributes
    ----------
    image : ExperimentImage
        The input (original pixels and pixel size).
    catalogue : Catalogue
        One row per lattice site in the original image's pixels: detected columns (class
        after the site constraint) and confirmed empty sites (vacancies).
    summary : dict
        :func:`training.experiments.catalogue.summarize` of the catalogue plus the provenance of the
        result (``source``, ``frame``, ``model``, ``resampling``, ``lattice``,
        ``empty_sites``, ``settings``, ``seconds``); JSON-ready.
    scheme : dict
        Label scheme of the network (``{"ids": [...], "names": [...]}``).
    fit : LatticeFit
        Lattice fit in the *resampled* image's pixels (all empty sites found).
    column_probs : ndarray, shape (N, K)
        Mean class probabilities of each detected column (ensemble mean, before the
        constraint), in catalogue order.
    column_variance : ndarray, shape (N, K)
        Ensemble variance of those probabilities.
    unconstrained_class : ndarray of int, shape (N,)
        Most probable non-background class of each detected column before the constraint.
    empty_confirmed : ndarray of bool, shape (M,)
        For each empty site of ``fit``: whether the network supports a vacancy there (those
        are in the catalogue).
    scale : (float, float)
        Resampling factors ``(f_y, f_x)`` = resampled / original pixels per length;
        ``x_orig = (x_res + 0.5) / f_x − 0.5``.
    maps : tuple of ndarray or None
        ``(mean, variance)`` probability maps ``[K, H', W']`` of the resampled image, when
        requested with ``keep_maps=True``.
    resampling : Resampling
        The map from the resampled image to the file's pixels (affine when the scan
        distortion was corrected; then ``scale`` holds only its diagonal).
    """

    image: ExperimentImage
    catalogue: Catalogue
    summary: dict
    scheme: dict
    fit: LatticeFit
    column_probs: np.ndarray
    column_variance: np.ndarray
    unconstrained_class: np.ndarray
    empty_confirmed: np.ndarray
    scale: tuple[float, float]
    maps: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    resampling: Resampling | None = field(default=None, repr=False)

    @property
    def n_columns(self) -> int:
        """Detected columns."""
        return int(np.sum(self.catalogue.detected))


# --------------------------------------------------------------------------------------------
# Image preparation
# --------------------------------------------------------------------------------------------


def resample_image(image, pixel_size_A: float, target_pixel_size_A: float):
    """Resample an image to another pixel size.

    Cubic-spline interpolation with pixel *edges* aligned (``scipy.ndimage.zoom`` with
    ``grid_mode=True``): output pixel ``j`` covers input coordinates
    ``(j + 0.5)/f − 0.5``. When shrinking, the image is first blurred with a Gaussian of
    σ = (1/f − 1)/2 input pixels against aliasing (as ``skimage.transform.rescale`` does).

    Parameters
    ----------
    image : array_like, shape (H, W)
    pixel_size_A : float
        Pixel size of ``image`` [Å/px].
    target_pixel_size_A : float
        Wanted pixel size [Å/px].

    Returns
    -------
    resampled : ndarray of float32, shape (H', W')
        ``H' = round(H · f)``, ``W' = round(W · f)`` with ``f = pixel_size_A /
        target_pixel_size_A``; the image itself (as float32) when ``f`` is within
        :data:`RESAMPLE_TOLERANCE` of 1.
    scale : (float, float)
        The factors actually applied, ``(H'/H, W'/W)``.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image: expected [H, W], got shape {img.shape}")
    for name, value in (
        ("pixel_size_A", pixel_size_A),
        ("target_pixel_size_A", target_pixel_size_A),
    ):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a pixel size > 0 Å, got {value!r}")
    f = float(pixel_size_A) / float(target_pixel_size_A)
    if abs(f - 1.0) <= RESAMPLE_TOLERANCE:
        return img, (1.0, 1.0)
    h, w = img.shape
    out_shape = (max(2, int(round(h * f))), max(2, int(round(w * f))))
    src = img.astype(np.float64)
    if f < 1.0:
        src = ndimage.gaussian_filter(src, (1.0 / f - 1.0) / 2.0, mode="reflect")
    zoom = (out_shape[0] / h, out_shape[1] / w)
    out = ndimage.zoom(src, zoom, order=3, mode="reflect", grid_mode=True)
    return out.astype(np.float32), zoom


def to_original_px(xy, scale: tuple[float, float]) -> np.ndarray:
    """Map positions ``(x, y)`` [px] of a resampled image back to the original pixels.

    Parameters
    ----------
    xy : array_like, shape (N, 2)
        Positions in the resampled image [px].
    scale : (float, float)
        ``(f_y, f_x)`` from :func:`resample_image`.

    Returns
    -------
    ndarray, shape (N, 2)
    """
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    fy, fx = scale
    return np.column_stack([(p[:, 0] + 0.5) / fx - 0.5, (p[:, 1] + 0.5) / fy - 0.5])


def remove_background(image, sigma_px: float) -> np.ndarray:
    """Subtract a wide Gaussian blur (slowly varying contamination, thickness, gain).

    Parameters
    ----------
    image : array_like, shape (H, W)
    sigma_px : float
        Gaussian σ [px]; choose several lattice constants so the lattice survives.

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    if not sigma_px > 0:
        raise ValueError(f"sigma_px: expected > 0, got {sigma_px!r}")
    img = np.asarray(image, dtype=np.float64)
    return (img - ndimage.gaussian_filter(img, sigma_px, mode="reflect")).astype(np.float32)


def sample_disks(maps, xy, radius_px: float) -> np.ndarray:
    """Mean of every map over a disk around each position.

    Parameters
    ----------
    maps : ndarray, shape (K, H, W)
    xy : array_like, shape (N, 2)
        Disk centres ``(x, y)`` [px]; pixels outside the image are left out of the mean
        (the nearest pixel is used when none is inside).
    radius_px : float
        Disk radius [px] (at least the centre pixel is used).

    Returns
    -------
    ndarray of float64, shape (N, K)
    """
    m = np.asarray(maps)
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    k, h, w = m.shape
    if len(pts) == 0:
        return np.zeros((0, k))
    r = max(float(radius_px), 0.0)
    half = int(math.ceil(r))
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    inside = dx**2 + dy**2 <= max(r, 0.5) ** 2
    dy, dx = dy[inside], dx[inside]
    rows = np.rint(pts[:, 1]).astype(np.int64)[:, None] + dy[None, :]
    cols = np.rint(pts[:, 0]).astype(np.int64)[:, None] + dx[None, :]
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    none = ~valid.any(axis=1)
    if none.any():  # disk entirely outside: use the nearest pixel
        rows[none, 0] = np.clip(rows[none, 0], 0, h - 1)
        cols[none, 0] = np.clip(cols[none, 0], 0, w - 1)
        valid[none, 0] = True
    flat = np.clip(rows, 0, h - 1) * w + np.clip(cols, 0, w - 1)
    weight = valid / valid.sum(axis=1, keepdims=True)  # [N, D]: 1/count inside, 0 outside
    # one gather of every map at every disk pixel, then one weighted sum per position
    values = m.reshape(k, h * w)[:, flat]  # [K, N, D]
    return np.einsum("knd,nd->nk", values, weight, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# What the model says about itself
# --------------------------------------------------------------------------------------------


def model_pixel_size(ensemble) -> float:
    """Pixel size the network was trained at [Å/px], from its checkpoint(s).

    Checkpoints record the sorted pixel sizes of their training stores; one value is used
    as is, several (a model trained across pixel sizes) give their geometric midpoint
    ``√(min · max)``.

    Raises
    ------
    ValueError
        When no checkpoint records a pixel size.
    """
    sizes = []
    for info in getattr(ensemble, "infos", []):
        value = info.get("pixel_size_A")
        if value is None:
            continue
        sizes.extend(float(v) for v in np.atleast_1d(value))
    sizes = [s for s in sizes if math.isfinite(s) and s > 0]
    if not sizes:
        raise ValueError(
            "train_pixel_size_A: the checkpoint records no training pixel size; pass it"
        )
    return float(math.sqrt(min(sizes) * max(sizes)))


def _eval_settings(ensemble) -> dict:
    """Column-detection settings of the model (its config's ``evaluate`` section)."""
    from training.config import EvalConfig

    config = getattr(ensemble, "config", None) or {}
    return EvalConfig.from_dict(config.get("evaluate", {})).to_dict()


def _scheme_of(ensemble, scheme) -> dict:
    if scheme is None:
        scheme = ensemble.scheme
    if hasattr(scheme, "to_dict") and hasattr(scheme, "ids"):
        return scheme.to_dict()
    if isinstance(scheme, dict) and "ids" in scheme and "names" in scheme:
        return {"ids": list(scheme["ids"]), "names": list(scheme["names"])}
    names = scheme_names(scheme)
    return {"ids": list(range(len(names))), "names": list(names)}


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSettings:
    """How :func:`label_image` labels an image (validated on construction).

    Attributes
    ----------
    tile : int
        Largest inference tile side [px] (in the resampled image); the fewest tiles of at
        most this side are spread evenly (:func:`training.predict.predict_probabilities`).
    overlap : int
        Smallest overlap of neighbouring tiles [px]; blending weights ramp over it.
    tta : bool
        Average the 8 flips/rotations of the square (8× the cost).
    batch_size : int
        Tiles per forward pass (default 1: on a CPU one tile at a time stays in cache and
        runs fastest; 2048² in 512² tiles: 5.1 s at 1, 6.1 s at 4, 7.7 s at 25).
    background_removal : bool
        Subtract a Gaussian blur of σ = ``background_sigma_A`` before normalising.
    background_sigma_A : float
        [Å]. About one lattice constant: the blur then holds no lattice contrast (the {100}
        fringes, spacing d = a√3/2, keep a fraction exp(−2π²σ²/d²) < 10⁻⁸ of their
        amplitude at σ = 3 Å in every TMD), so only the background is subtracted.
    threshold : float or None
        Foreground probability of a column pixel; default the model's ``evaluate.threshold``.
    sample_radius_A : float
        Radius of the disk over which a column's (or empty site's) class probabilities and
        variances are averaged [Å].
    vacancy_min_prob : float
        An empty lattice site is a vacancy when the vacancy class of its sublattice is the
        most probable class allowed there and its mean probability is at least this.
    min_metal_margin : float
        Refuse the image when the network decides the metal sublattice less clearly than this
        (≈ 0.9 on simulated images, ≈ 0 on noise); 0 disables the check.
    correct_distortion : bool
        When the image carries an FFT lattice calibration with scan anisotropy or shear,
        resample it onto an undistorted square grid before labelling (positions are still
        reported in the file's pixels).
    preprocess : str or None
        Preprocessing instead of the model's (``plane,lines=median,gauss=0.5,clahe``, see
        :func:`training.preprocess.parse_preprocess`); None: the model's own, as trained.
    """

    tile: int = 512
    overlap: int = 64
    tta: bool = True
    batch_size: int = 1
    background_removal: bool = False
    background_sigma_A: float = 3.0
    threshold: float | None = None
    sample_radius_A: float = 0.5
    vacancy_min_prob: float = 0.05
    min_metal_margin: float = 0.2
    correct_distortion: bool = True
    preprocess: str | None = None

    def __post_init__(self):
        if self.preprocess is not None:
            from training.config import PreprocessConfig
            from training.preprocess import parse_preprocess

            PreprocessConfig.from_dict(parse_preprocess(self.preprocess))  # validates
        if not isinstance(self.tile, int) or self.tile < 16:
            raise ValueError(f"tile: expected an integer >= 16 px, got {self.tile!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap: expected an integer in [0, tile), got {self.overlap!r}")
        if not 0.0 <= self.vacancy_min_prob <= 1.0:
            raise ValueError(
                f"vacancy_min_prob: expected a probability, got {self.vacancy_min_prob!r}"
            )
        if not self.sample_radius_A > 0:
            raise ValueError(f"sample_radius_A: expected > 0 Å, got {self.sample_radius_A!r}")
        if not self.background_sigma_A > 0:
            raise ValueError(f"background_sigma_A: expected > 0 Å, got {self.background_sigma_A!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Resampling:
    """Map from the resampled (labelled) image back to the file's pixels.

    ``xy_original = xy_resampled @ matrix.T + offset`` (``(x, y)`` [px]).
    """

    matrix: np.ndarray
    offset: np.ndarray
    pixel_size_A: float
    shape: tuple[int, int]
    corrected: bool

    def to_original(self, xy) -> np.ndarray:
        p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return p @ self.matrix.T + self.offset

    @property
    def scale(self) -> tuple[float, float]:
        """``(f_y, f_x)``: resampled pixels per original pixel along y and x."""
        return (1.0 / float(self.matrix[1, 1]), 1.0 / float(self.matrix[0, 0]))


def prepare_image(image: ExperimentImage, target_pixel_size_A: float, settings: LabelSettings):
    """Resample an image to the network's pixel size, removing the scan distortion measured
    by its FFT calibration when there is one (``settings.correct_distortion``).

    Returns the resampled image (float32) and its :class:`Resampling`.
    """
    lattice = image.lattice
    if settings.correct_distortion and lattice is not None and lattice.distorted:
        # the FFT's shape (anisotropy, shear) at the pixel size actually used
        p = np.asarray(lattice.pixel_to_A) * (image.pixel_size_A / lattice.pixel_size_A)
        data, res = resample_affine(image.data, p, target_pixel_size_A)
    else:
        data, scale = resample_image(image.data, image.pixel_size_A, target_pixel_size_A)
        fy, fx = scale
        res = Resampling(
            matrix=np.diag([1.0 / fx, 1.0 / fy]),
            offset=np.array([0.5 / fx - 0.5, 0.5 / fy - 0.5]),
            pixel_size_A=image.pixel_size_A / math.sqrt(fx * fy),
            shape=tuple(data.shape),
            corrected=False,
        )
    if settings.background_removal:
        data = remove_background(data, settings.background_sigma_A / res.pixel_size_A)
    return data, res


def resample_affine(image, pixel_to_A, target_pixel_size_A: float):
    """Resample an image with scan distortion onto an undistorted square grid.

    Parameters
    ----------
    image : array_like, shape (H, W)
    pixel_to_A : array_like, shape (2, 2)
        Map from a pixel offset ``(dx, dy)`` to Å in the undistorted frame
        (:attr:`LatticeCalibration.pixel_to_A`).
    target_pixel_size_A : float

    Returns
    -------
    ndarray of float32
        Cubic-spline resampled image; areas outside the original (sheared corners) are the
        image's median, which holds no columns.
    Resampling
    """
    img = np.asarray(image, dtype=np.float64)
    p = np.asarray(pixel_to_A, dtype=np.float64)
    h, w = img.shape
    t = float(target_pixel_size_A)
    to_out = p / t  # original px -> output px
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float) @ to_out.T
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    shape = (int(math.floor(hi[1] - lo[1])) + 1, int(math.floor(hi[0] - lo[0])) + 1)
    a = np.linalg.inv(to_out)  # output px -> original px
    b = a @ lo
    mean_pixel = math.sqrt(abs(np.linalg.det(p)))
    if t > mean_pixel:  # anti-aliasing before shrinking
        img = ndimage.gaussian_filter(img, (t / mean_pixel - 1.0) / 2.0, mode="reflect")
    swap = np.array([[0, 1], [1, 0]])
    out = ndimage.affine_transform(
        img, swap @ a @ swap, offset=b[::-1], output_shape=shape, order=3,
        mode="constant", cval=float(np.median(img)),
    )  # fmt: skip
    res = Resampling(matrix=a, offset=b, pixel_size_A=t, shape=shape, corrected=True)
    return out.astype(np.float32), res


#: Bytes per pixel of the resampled image that labelling holds besides the class maps
#: (lattice fit, catalogue, quality maps, figures: a few float64 maps).
LABEL_BYTES_PER_PX = 160


def label_memory_bytes(shape, n_classes: int) -> int:
    """Rough peak memory of :func:`label_image` on a resampled image of ``shape``: the
    probability mean and variance (float32, one map per class) plus
    :data:`LABEL_BYTES_PER_PX`."""
    h, w = (int(v) for v in shape[-2:])
    return h * w * (2 * 4 * int(n_classes) + LABEL_BYTES_PER_PX)


def default_label_memory() -> int:
    """Half of this machine's physical memory (the default per-image limit)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8 * 10**9


def label_image(
    image: ExperimentImage,
    ensemble,
    settings: LabelSettings | None = None,
    *,
    scheme=None,
    train_pixel_size_A: float | None = None,
    material: str | None = None,
    keep_maps: bool = False,
    max_memory_bytes: int | None = None,
    **overrides,
) -> LabelResult:
    """Label one experimental image: columns, sublattices, classes, vacancies, summary, and
    quality figures (:mod:`simgen.experiment.quality`).

    Parameters
    ----------
    image : ExperimentImage
        From :func:`simgen.experiment.readers.read_image` (data and pixel size [Å/px]).
    ensemble : Ensemble or path-like
        A :class:`training.predict.Ensemble` (or any object with its ``predict``,
        ``scheme``, ``infos`` and ``config``), or a checkpoint / run / ensemble directory to
        load on the CPU.
    settings : LabelSettings, optional
        How to label; ``**overrides`` replace single fields (``tta=False``...).
    scheme : optional
        Label scheme of the network's outputs; default the checkpoint's.
    train_pixel_size_A : float, optional
        Pixel size the network was trained at [Å/px]; default the checkpoint's
        (:func:`model_pixel_size`).
    material : str, optional
        E.g. ``"WSe2"``: its tabulated lattice constant gives ``lattice_area_nm2`` in the
        summary (default: the lattice constant measured from the fit).
    keep_maps : bool
        Keep the probability mean and variance maps in the result.
    max_memory_bytes : int, optional
        Refuse an image whose estimated working set (:func:`label_memory_bytes`) exceeds
        this (default: half of this machine's RAM).

    Returns
    -------
    LabelResult

    Raises
    ------
    ValueError
        Bad settings, an image that is not 2-D or is constant, fewer than 4 columns found, or
        no 2H lattice the model recognises (``min_metal_margin``).
    """
    # Long on purpose: the stages of labelling in the order they run, each one call to a
    # helper, with the clock between them; splitting it further would hide the pipeline.
    t0 = time.perf_counter()
    settings = dataclasses.replace(settings or LabelSettings(), **overrides)
    if not isinstance(image, ExperimentImage):
        raise ValueError(f"image: expected an ExperimentImage, got {type(image).__name__}")
    if not hasattr(ensemble, "predict"):
        from training.predict import Ensemble

        ensemble = Ensemble.load(ensemble, "cpu")
    scheme_d = _scheme_of(ensemble, scheme)
    if train_pixel_size_A is None:
        train_pixel_size_A = model_pixel_size(ensemble)
    ev = _eval_settings(ensemble)
    if settings.threshold is None:
        settings = dataclasses.replace(settings, threshold=float(ev["threshold"]))
    source = image.source + ("" if image.frame is None else f" (frame {image.frame})")
    clock = {"start": time.perf_counter()}
    finite = np.asarray(image.data)[np.isfinite(image.data)]
    if finite.size == 0 or finite.min() == finite.max():
        value = f"every pixel {finite.flat[0]:g}" if finite.size else "no finite pixel"
        raise ValueError(f"{source}: the image is constant ({value}); nothing to label")

    # before any work on it: the image at the network's pixel size, and what labelling costs
    scale = float(image.pixel_size_A) / float(train_pixel_size_A or image.pixel_size_A)
    h, w = (max(1, round(n * scale)) for n in np.shape(image.data)[-2:])
    need = label_memory_bytes((h, w), len(scheme_names(scheme_d)))
    limit = default_label_memory() if max_memory_bytes is None else int(max_memory_bytes)
    if need > limit:
        raise ValueError(
            f"{source}: labelling {h}x{w} px (at the network's pixel size) would need about "
            f"{need / 1e9:.1f} GB of memory, over the limit {limit / 1e9:.1f} GB; crop or bin "
            "the image"
        )
    data, res = prepare_image(image, train_pixel_size_A, settings)
    if min(data.shape) < 8:
        raise ValueError(f"{source}: image of {data.shape} px after resampling is too small")
    clock["prepare"] = time.perf_counter()

    extra = {}
    if settings.preprocess is not None:
        from training.preprocess import parse_preprocess

        extra = {"preprocess": parse_preprocess(settings.preprocess)}
    mean, var = ensemble.predict(
        data, tile=settings.tile, overlap=settings.overlap, tta=settings.tta,
        batch_size=settings.batch_size, normalize=True, **extra,
    )  # fmt: skip
    names = scheme_names(scheme_d)
    if mean.shape[0] != len(names):
        raise ValueError(
            f"scheme: the network has {mean.shape[0]} outputs but the scheme {len(names)} classes"
        )
    clock["network"] = time.perf_counter()

    xy_res, probs, variance = _detect(mean, var, res.pixel_size_A, ev, settings, source)
    clock["columns"] = time.perf_counter()

    try:
        fit = fit_lattice(xy_res, probs=probs, scheme=scheme_d, image_shape=data.shape)
    except ValueError as err:
        raise ValueError(f"{source}: lattice fit failed: {err}") from err
    if fit.metal_margin < settings.min_metal_margin:
        raise ValueError(
            f"{source}: no 2H lattice the model recognises: metal and chalcogen sublattices "
            f"undecided (margin {fit.metal_margin:.2f} < {settings.min_metal_margin}; "
            f"{fit.sublattices.frustrated_fraction:.0%} of bonds frustrated)"
        )
    clock["lattice"] = time.perf_counter()

    empty = _empty_sites(mean, var, fit, scheme_d, res.pixel_size_A, settings)
    catalogue, detected, keep_rows = _catalogue(image, res, fit, xy_res, probs, variance, empty,
                                                scheme_d)  # fmt: skip
    fg = np.ones(len(names), bool)
    fg[0] = False
    unconstrained = np.argmax(np.where(fg, probs, -np.inf), axis=1).astype(np.int64)
    clock["catalogue"] = time.perf_counter()

    quality = quality_figures(
        data, xy_res, fit.site, detected.class_id, detected.probability, fit.empty_xy,
        fit.empty_site, fit.bond_length_px, variance=detected.variance,
        members=len(getattr(ensemble, "infos", [])) or 1,
        train_contrast=train_contrast_range(ensemble),
    )  # fmt: skip
    if image.metadata.get("calibration_warning"):
        quality["reasons"].append("pixel size: " + image.metadata["calibration_warning"])
        if quality["verdict"] == "ok":
            quality["verdict"] = "check"
    summary = _summary(
        image, catalogue, scheme_d, fit, res, detected, unconstrained, empty, settings, ev,
        ensemble, train_pixel_size_A, material,
    )  # fmt: skip
    summary["quality"] = quality
    summary["intensity_check"] = intensity_check(data, xy_res, fit)
    summary["seconds"] = time.perf_counter() - t0
    stages = ("start", "prepare", "network", "columns", "lattice", "catalogue")
    summary["timings_s"] = {
        b: clock[b] - clock[a] for a, b in zip(stages[:-1], stages[1:], strict=True)
    }
    return LabelResult(
        image=image,
        catalogue=catalogue,
        summary=summary,
        scheme=scheme_d,
        fit=fit,
        column_probs=probs[keep_rows],
        column_variance=variance[keep_rows],
        unconstrained_class=unconstrained[keep_rows],
        empty_confirmed=empty["confirmed"],
        scale=res.scale,
        maps=(mean, var) if keep_maps else None,
        resampling=res,
    )


def _detect(mean, var, p_res: float, ev: dict, settings: LabelSettings, source: str):
    """Columns of the probability maps and their disk-averaged probabilities and variances."""
    from training.metrics import find_columns

    cols = find_columns(
        mean,
        threshold=settings.threshold,
        min_area_px=float(ev["min_area_A2"]) / p_res**2,
        min_distance_px=float(ev["min_separation_A"]) / p_res or None,
    )
    xy_res = np.column_stack([cols["x"], cols["y"]])
    if len(xy_res) < 4:
        raise ValueError(
            f"{source}: {len(xy_res)} columns found; no lattice to label (wrong pixel size, "
            "not a TMD monolayer, or out of focus?)"
        )
    radius_px = settings.sample_radius_A / p_res
    return xy_res, sample_disks(mean, xy_res, radius_px), sample_disks(var, xy_res, radius_px)


def _empty_sites(mean, var, fit: LatticeFit, scheme_d, p_res: float, settings: LabelSettings):
    """Which empty lattice sites the network supports as vacancies."""
    radius_px = settings.sample_radius_A / p_res
    m = len(fit.empty_xy)
    vac = np.array([vacancy_class(scheme_d, int(s)) for s in fit.empty_site], dtype=np.int64)
    if not m:
        empty = np.zeros(0)
        return {"vac": vac, "confirmed": np.zeros(0, bool), "prob": empty, "var": empty}
    e_probs = sample_disks(mean, fit.empty_xy, radius_px)
    e_var = sample_disks(var, fit.empty_xy, radius_px)
    q = constrain_probabilities(e_probs, fit.empty_site, scheme_d)
    best = np.argmax(q, axis=1)
    rows = np.arange(m)
    confirmed = (vac == 0) | ((best == vac) & (e_probs[rows, vac] >= settings.vacancy_min_prob))
    return {
        "vac": vac,
        "confirmed": confirmed,
        "prob": np.where(vac > 0, q[rows, vac], np.nan),
        "var": np.where(vac > 0, e_var[rows, vac], np.nan),
    }


def _catalogue(image, res: Resampling, fit, xy_res, probs, variance, empty, scheme_d):
    """Detected columns and confirmed vacancies in the file's pixels (sites mapped outside the
    file, in the sheared corners of a distortion-corrected image, are dropped)."""
    h, w = image.shape

    def inside(xy):
        return (xy[:, 0] > -0.5) & (xy[:, 0] < w - 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < h - 0.5)

    xy_orig = res.to_original(xy_res)
    empty_orig = res.to_original(fit.empty_xy)
    keep_rows = inside(xy_orig)
    no_empty = dataclasses.replace(
        fit,
        site=fit.site[keep_rows],
        empty_xy=np.zeros((0, 2)),
        empty_site=np.zeros(0, dtype=np.int8),
        empty_support=np.zeros(0, dtype=np.int64),
    )
    detected = catalogue_from_lattice(
        no_empty, xy_orig[keep_rows], probs[keep_rows], scheme_d, image.pixel_size_A,
        variance=variance[keep_rows],
    )  # fmt: skip
    keep = empty["confirmed"] & inside(empty_orig)
    catalogue = build_catalogue(
        np.concatenate([detected.positions_px, empty_orig[keep]]),
        np.concatenate([detected.class_id, empty["vac"][keep]]),
        scheme_d,
        image.pixel_size_A,
        site=np.concatenate([detected.site, fit.empty_site[keep]]),
        probability=np.concatenate([detected.probability, empty["prob"][keep]]),
        variance=np.concatenate([detected.variance, empty["var"][keep]]),
        detected=np.concatenate([detected.detected, np.zeros(int(keep.sum()), bool)]),
    )
    # the full detected table (all rows, resampled frame) for the quality figures
    full = catalogue_from_lattice(
        dataclasses.replace(no_empty, site=fit.site), xy_res, probs, scheme_d, res.pixel_size_A,
        variance=variance,
    )  # fmt: skip
    return catalogue, full, keep_rows


def _summary(image, catalogue, scheme_d, fit, res, detected, unconstrained, empty, settings, ev,
             ensemble, train_pixel_size_A, material) -> dict:  # fmt: skip
    names = scheme_names(scheme_d)
    lattice_a_measured = math.sqrt(3.0) * fit.bond_length_px * res.pixel_size_A
    a_ref = lattice_constant_of(material) if material else lattice_a_measured
    summary = summarize(
        catalogue, scheme_d, image.shape, image.pixel_size_A, lattice_constant_A=a_ref
    )
    on_site = fit.site != UNASSIGNED
    lattice = fit.summary()
    lattice["bond_length_px"] = float(fit.bond_length_px * res.pixel_size_A / image.pixel_size_A)
    lattice["lattice_constant_measured_A"] = lattice_a_measured
    if material:
        lattice["lattice_constant_table_A"] = a_ref
        lattice["material"] = str(material)
    m, confirmed = len(fit.empty_xy), int(empty["confirmed"].sum())
    summary.update(
        {
            "source": image.source,
            "frame": image.frame,
            "pixel_size_source": image.pixel_size_source,
            "pixel_size_uncertainty_A": image.pixel_size_uncertainty_A,
            "calibration": image.metadata.get("fft_calibration"),
            "model": {
                "checkpoints": [str(i.get("path", "?")) for i in getattr(ensemble, "infos", [])],
                "members": len(getattr(ensemble, "infos", [])) or 1,
                "train_pixel_size_A": float(train_pixel_size_A),
                "class_names": list(names),
            },
            "resampling": {
                "factor_yx": [float(f) for f in res.scale],
                "pixel_size_A": float(res.pixel_size_A),
                "shape": [int(s) for s in res.shape],
                "distortion_corrected": bool(res.corrected),
                "to_original": [[float(v) for v in row] for row in res.matrix],
                "offset": [float(v) for v in res.offset],
            },
            "lattice": lattice,
            "constraint": {
                "changed": int(np.sum(on_site & (unconstrained != detected.class_id))),
                "unassigned_columns": int(np.sum(~on_site)),
            },
            "empty_sites": {"found": m, "confirmed": confirmed, "unconfirmed": m - confirmed},
            "mean_variance": float(np.nanmean(detected.variance)) if len(detected) else None,
            "settings": {
                **settings.to_dict(),
                "min_area_A2": float(ev["min_area_A2"]),
                "min_separation_A": float(ev["min_separation_A"]),
            },
        }
    )
    return summary


def train_contrast_range(ensemble) -> tuple[float, float] | None:
    """Metal/chalcogen contrast range of the network's training data: recorded in the
    checkpoint, else measured on its training stores when they are still there."""
    infos = getattr(ensemble, "infos", [])
    for info in infos:
        if info.get("train_contrast"):
            return tuple(info["train_contrast"])
    cache = getattr(ensemble, "_train_contrast", False)
    if cache is not False:
        return cache
    value = None
    paths = [p for info in infos for p in info.get("train_stores", [])]
    if paths:
        try:
            from training.stores import open_store

            value = store_contrast_range([open_store(p) for p in paths], ensemble.scheme)
        except (OSError, ValueError, KeyError):
            value = None
    try:
        ensemble._train_contrast = value
    except AttributeError:
        pass
    return value


def write_outputs(result: LabelResult, outdir) -> dict[str, Path]:
    """Write one labelled image's files into ``outdir`` (created if needed).

    ``columns.csv`` (one row per site: ``x_px, y_px, x_A, y_A, site, class_id, class_name,
    probability, variance, detected``), ``summary.json`` (counts, concentrations,
    provenance), ``overlay.png``, ``class_averages.png`` and ``defect_density.png``
    (see :mod:`training.report`), all on the original image and pixel grid.

    Parameters
    ----------
    result : LabelResult
    outdir : path-like

    Returns
    -------
    dict
        File name -> path written.
    """
    from training.experiments.pictures import class_averages_png, defect_density_png, overlay_png

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    img, cat, scheme = result.image.data, result.catalogue, result.scheme
    title = Path(result.image.source).name
    if result.image.frame is not None:
        title += f" frame {result.image.frame}"
    paths = {
        "columns.csv": write_columns_csv(cat, out / "columns.csv"),
        "summary.json": write_summary_json(result.summary, out / "summary.json"),
        "overlay.png": overlay_png(img, cat, scheme, out / "overlay.png", title=title),
        "class_averages.png": class_averages_png(img, cat, scheme, out / "class_averages.png"),
        "defect_density.png": defect_density_png(img, cat, scheme, out / "defect_density.png"),
    }
    return paths


# --------------------------------------------------------------------------------------------
# Batches of files (the CLI)
# --------------------------------------------------------------------------------------------


@dataclass
class LabelRun:
    """Outcome of :func:`label_files`.

    Attributes
    ----------
    outdir : Path
    labelled : list of dict
        One row per labelled image (as in ``summary.csv``).
    failures : list of (str, str)
        ``(input, one-line reason)`` for every input that could not be labelled (whole
        file, or one frame of a stack).
    """

    outdir: Path
    labelled: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_columns(self) -> int:
        """Detected columns over all labelled images."""
        return int(sum(r.get("n_columns") or 0 for r in self.labelled))


def intensity_check(data, xy, fit) -> dict:
    """Network-free fractions of single and double chalcogen vacancies from the intensity
    histogram of every chalcogen lattice site (:func:`simgen.experiment.populations.
    populations_at_sites`; assumes one chalcogen element): a cross-check of the network's
    ``vac_X1`` and ``vac_X2`` fractions that does not depend on the metal/chalcogen
    contrast. ``{"error": ...}`` when the image has too few sites."""
    from simgen.experiment.populations import populations_at_sites
    from structures import CHALCOGEN, METAL

    xy = np.asarray(xy, dtype=np.float64)
    try:
        pops = populations_at_sites(
            data,
            xy[fit.site == METAL],
            xy[fit.site == CHALCOGEN],
            fit.empty_xy[fit.empty_site == CHALCOGEN],
            fit.bond_length_px,
            background_px=2.0 * math.sqrt(3.0) * fit.bond_length_px,  # two lattice constants
        )
    except ValueError as err:
        return {"error": str(err)}
    return {
        "vac_X1": pops.single,
        "vac_X2": pops.empty,
        "n_sites": pops.n_sites,
        "site_scatter": pops.width,
        "single_ratio": pops.single_ratio,
    }


def quality_line(name: str, summary: Mapping) -> str:
    """One console line: columns, pixel size and the quality verdict of a labelled image."""
    q = summary.get("quality", {})

    def fmt(key, spec=".3f"):
        value = q.get(key)
        return "n/a" if value is None or not math.isfinite(value) else format(value, spec)

    train = q.get("train_contrast")
    train_txt = f" (training {train[0]:.2f}-{train[1]:.2f})" if train else ""
    pixel = summary.get("pixel_size_A", float("nan"))
    line = (
        f"{name}: {summary.get('n_columns', '?')} columns, "
        f"{pixel:.4f} Å/px ({summary.get('pixel_size_source')}); "
        f"quality {q.get('verdict', '?')}: honeycomb {fmt('honeycomb_consistency')}, "
        f"sites found {fmt('sites_detected_fraction')}, "
        f"M/X contrast {fmt('contrast_metal_chalcogen', '.2f')}{train_txt}"
    )
    check = summary.get("intensity_check") or {}
    network = (summary.get("classes") or {}).get("vac_X1", {}).get("per_site")
    if "vac_X1" in check and network is not None:
        line += (
            f"; vac_X1 {network:.3f} per chalcogen site (intensity histogram {check['vac_X1']:.3f})"
        )
    if q.get("reasons"):
        line += " — " + "; ".join(q["reasons"])
    return line


def _output_names(files: Sequence[Path]) -> list[str]:
    """A distinct folder name per input file: the stem, then ``stem-ext``, then ``-2``..."""
    names, used = [], set()
    stems = [f.stem for f in files]
    for f in files:
        name = f.stem if stems.count(f.stem) == 1 else f"{f.stem}-{f.suffix.lstrip('.')}"
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def _failure_line(what: str, reason: str) -> str:
    """``input: reason``, without repeating the input when the reason starts with it."""
    return reason if reason.startswith(what) else f"{what}: {reason}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, ReaderError):
        return text
    return text if isinstance(err, ValueError) and text else f"{type(err).__name__}: {text}"


def label_files(
    inputs: Iterable,
    model,
    outdir,
    *,
    pixel_size_A: float | None = None,
    material: str | None = None,
    sum_frames: bool = False,
    calibrate: str = "auto",
    device: str = "cpu",
    progress: bool = True,
    echo=None,
    on_result=None,
    **label_kwargs,
) -> LabelRun:
    """Label every image named by ``inputs`` and write the results under ``outdir``.

    For each file: ``outdir/<name>/`` gets :func:`write_outputs`' files; a stack gets one
    subfolder per frame (``frame_000``, ...) unless ``sum_frames``. The run-level
    ``outdir/summary.csv`` has one row per labelled image (``image``, ``source``,
    ``frame``, ``status``, pixel size and its source, counts and concentrations) and one
    ``failed`` row per failure; ``outdir/failures.txt`` lists ``input: reason`` (empty
    when all succeeded). A file that cannot be read or labelled (corrupt, not 2-D, no pixel
    size and no calibration possible, no lattice found) is recorded and the others go on.

    Parameters
    ----------
    inputs : iterable of path-like or str
        Files, glob patterns and folders (see :func:`expand_inputs`).
    model : path-like or Ensemble
        Checkpoint, run directory or ensemble directory (loaded once).
    outdir : path-like
    pixel_size_A : float, optional
        [Å/px] for files without a calibration.
    material : str, optional
        FFT pixel-size calibration for files without one, and the lattice constant of the
        summary.
    sum_frames : bool
        Label the sum of a stack's frames instead of each frame.
    calibrate : {"auto", "fft", "file"}
        Pixel-size policy of :func:`simgen.experiment.readers.read_image`.
    device : str
        ``cpu``, ``auto``, ``cuda``...
    progress : bool
        tqdm bar over files.
    echo : callable, optional
        Called with one line per image (its quality verdict) and per failure (default:
        ``tqdm.write`` to stderr).
    on_result : callable, optional
        Called as ``on_result(name, result)`` with each labelled image's output name (its
        folder under ``outdir``) and :class:`LabelResult`, after its files are written.
    **label_kwargs
        Passed to :func:`label_image` (``tile``, ``overlap``, ``tta``,
        ``background_removal``...).

    Returns
    -------
    LabelRun
    """
    from tqdm.auto import tqdm

    from training.predict import Ensemble
    from training.train import resolve_device

    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    previous = _previous_label_run(out)
    ensemble = model if hasattr(model, "predict") else Ensemble.load(model, resolve_device(device))
    files, missing = expand_inputs(inputs)
    _clear_previous_label_run(out, previous)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    _write_label_marker(out, written, finished=False)
    run = LabelRun(outdir=out)
    rows: list[dict] = []

    def say(line: str) -> None:
        if echo is not None:
            echo(line)
        else:
            tqdm.write(line, file=sys.stderr)

    def fail(what: str, reason: str, image: str = "", frame=None) -> None:
        run.failures.append((what, reason))
        rows.append(
            {"image": image, "source": what, "frame": frame, "status": "failed", "error": reason}
        )
        say(f"failed: {_failure_line(what, reason)}")

    for what, reason in missing:
        fail(what, reason)
    bar = tqdm(
        list(zip(files, _output_names(files), strict=True)),
        desc="label",
        unit="file",
        disable=not progress,
        dynamic_ncols=True,
    )
    for path, name in bar:
        try:
            images = read_image(
                path,
                pixel_size_A=pixel_size_A,
                material=material,
                sum_frames=sum_frames,
                calibrate=calibrate,
            )
        except (ReaderError, ValueError) as err:
            fail(str(path), _one_line(err), image=name)
            continue
        stack = len(images) > 1 or images[0].frame is not None
        for im in images:
            sub = f"{name}/frame_{im.frame:03d}" if stack and im.frame is not None else name
            try:
                result = label_image(im, ensemble, material=material, **label_kwargs)
                if name not in written:  # recorded before writing: a kill leaves it owned
                    written.append(name)
                    _write_label_marker(out, written, finished=False)
                write_outputs(result, out / sub)
            except KeyboardInterrupt:
                raise
            except MemoryError:  # this image alone: the batch goes on
                fail(str(path), "ran out of memory labelling it", image=sub, frame=im.frame)
                continue
            except Exception as err:  # one bad image must not stop a batch
                fail(str(path), _one_line(err), image=sub, frame=im.frame)
                continue
            row = flatten_summary(
                result.summary,
                image=sub,
                source=str(path),
                frame=im.frame,
                status="ok",
                error="",
                pixel_size_source=im.pixel_size_source,
                pixel_size_uncertainty_A=im.pixel_size_uncertainty_A,
                seconds=result.summary["seconds"],
            )
            rows.append(row)
            run.labelled.append(row)
            if on_result is not None:
                on_result(sub, result)
            say(quality_line(sub, result.summary))
            bar.set_postfix(columns=run.n_columns, failed=len(run.failures))
    bar.close()
    write_run_summary_csv(rows, out / "summary.csv")
    text = "".join(f"{_failure_line(what, reason)}\n" for what, reason in run.failures)
    (out / "failures.txt").write_text(text, encoding="utf-8")
    _write_label_marker(out, written, finished=True)
    return run


# --------------------------------------------------------------------------------------------
# Notebook API
# --------------------------------------------------------------------------------------------


def label(
    image,
    model,
    *,
    pixel_size_A: float | None = None,
    material: str | None = None,
    frame: int | None = None,
    sum_frames: bool = False,
    settings: LabelSettings | None = None,
    as_frame: bool | None = None,
    device: str = "cpu",
    **overrides,
):
    """Label one image from a notebook: a file or a plain array, a model, the catalogue back.

    Parameters
    ----------
    image : path-like or array_like, shape (H, W)
        A microscope file (any format of :func:`~simgen.experiment.readers.read_image`) or
        an array of intensities.
    model : path-like or Ensemble
        Checkpoint, run directory or ensemble directory (or a loaded
        :class:`training.predict.Ensemble`).
    pixel_size_A : float, optional
        [Å/px]: needed for an array unless ``material`` is given (then the FFT calibrates it);
        for a file, used when the file has no calibration.
    material : str, optional
        E.g. ``"WSe2"``: FFT lattice calibration (pixel size, scan distortion) and the
        tabulated lattice constant.
    frame, sum_frames
        Which image of a stack (a stack needs one of them).
    settings : LabelSettings, optional
        With ``**overrides`` replacing single fields (``tta=False``...).
    as_frame : bool, optional
        Return a pandas DataFrame (``None``: when pandas is installed).
    device : str
        Where a model given as a path is loaded.

    Returns
    -------
    pandas.DataFrame or Catalogue
        One row per site (:data:`~training.experiments.catalogue.COLUMN_FIELDS`). The
        DataFrame's ``attrs["summary"]`` (or the Catalogue's ``summary`` attribute) holds the
        summary with the quality figures.
    """
    if isinstance(image, str | Path):
        images = read_image(
            image, pixel_size_A=pixel_size_A, material=material, frame=frame,
            sum_frames=sum_frames,
        )  # fmt: skip
        if len(images) > 1:
            raise ValueError(
                f"{image}: a stack of {len(images)} frames; pass frame=K or sum_frames=True"
            )
        im = images[0]
    else:
        im = _array_image(image, pixel_size_A, material)
    if not hasattr(model, "predict"):
        from training.predict import Ensemble
        from training.train import resolve_device

        model = Ensemble.load(model, resolve_device(device))
    result = label_image(im, model, settings, material=material, **overrides)
    if as_frame is None:
        import importlib.util

        as_frame = importlib.util.find_spec("pandas") is not None
    if as_frame:
        import pandas as pd

        df = pd.DataFrame.from_records(result.catalogue.to_records())
        df.attrs["summary"] = result.summary
        return df
    return dataclasses.replace(result.catalogue, summary=result.summary)


def _array_image(data, pixel_size_A, material) -> ExperimentImage:
    """An :class:`ExperimentImage` from a plain array (pixel size given or FFT-calibrated)."""
    arr = np.asarray(data)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"image: expected a real 2-D array [H, W], got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError("image: contains NaN or infinite values")
    lattice, source, uncertainty = None, "user", None
    if material is not None:
        from simgen.experiment.calibration import calibrate_lattice, lattice_constant_of

        lattice = calibrate_lattice(
            arr, lattice_constant_of(material), nominal_pixel_size_A=pixel_size_A
        )
        if pixel_size_A is None:
            source, uncertainty = "fft", lattice.uncertainty_A
    if pixel_size_A is None and lattice is None:
        raise ValueError("pixel_size_A: an array needs a pixel size [Å/px] or a material")
    pixel = float(pixel_size_A) if pixel_size_A is not None else lattice.pixel_size_A
    if not (math.isfinite(pixel) and pixel > 0):
        raise ValueError(f"pixel_size_A: expected > 0 Å, got {pixel_size_A!r}")
    meta = {"format": "array"}
    if lattice is not None:
        meta["fft_calibration"] = lattice.summary()
    return ExperimentImage(arr, pixel, source, uncertainty, "array", None, meta, lattice)


#: File in a label folder listing what ``label_files`` wrote there: the only things a later
#: run into the same folder removes.
LABEL_MARKER = ".simgen-label.json"


def _previous_label_run(out: Path) -> list[str] | None:
    """Per-image folders of an earlier label run in ``out`` (None: new or empty folder).

    Raises
    ------
    ValueError
        ``out`` holds files that no label run wrote (refused, untouched).
    """
    import json

    if not out.is_dir() or not any(out.iterdir()):
        return None
    marker = out / LABEL_MARKER
    try:
        names = json.loads(marker.read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"--out: {out} already holds files that `simgen-train label` did not write (no "
            f"{LABEL_MARKER}); refusing to write into it: choose a new or empty folder"
        ) from None
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


def _clear_previous_label_run(out: Path, previous: list[str] | None) -> None:
    """Remove what the earlier run in ``out`` wrote (its per-image folders, summary.csv,
    failures.txt), so that summary.csv lists every per-image folder there."""
    import shutil

    if previous is None:
        return
    for name in previous:
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
    for name in ("summary.csv", "failures.txt"):
        (out / name).unlink(missing_ok=True)


def _write_label_marker(out: Path, names: list[str], *, finished: bool) -> None:
    from simgen.store import write_json

    write_json(
        {"tool": "simgen-train label", "images": names, "finished": finished}, out / LABEL_MARKER
    )
