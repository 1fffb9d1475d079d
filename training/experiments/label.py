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
5. the **lattice fit** (:func:`~training.experiments.lattice.fit_lattice`: two sublattices by
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
import glob
import math
import numbers
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.experiments.calibration import lattice_constant_of
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
from training.experiments.lattice import (
    UNASSIGNED,
    LatticeFit,
    constrain_probabilities,
    fit_lattice,
    scheme_names,
)
from training.experiments.readers import FORMATS, ExperimentImage, ReaderError, read_image

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
    rr, cc = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
    out = np.empty((len(pts), k))
    count = valid.sum(axis=1)
    for c in range(k):
        out[:, c] = np.where(valid, m[c][rr, cc], 0.0).sum(axis=1) / count
    return out


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


def label_image(
    image: ExperimentImage,
    ensemble,
    *,
    scheme=None,
    train_pixel_size_A: float | None = None,
    tile: int = 512,
    overlap: int = 64,
    tta: bool = True,
    batch_size: int = 4,
    background_removal: bool = False,
    background_sigma_A: float = 3.0,
    threshold: float | None = None,
    sample_radius_A: float = 0.5,
    vacancy_min_prob: float = 0.05,
    min_metal_margin: float = 0.2,
    material: str | None = None,
    keep_maps: bool = False,
) -> LabelResult:
    """Label one experimental image: columns, sublattices, classes, vacancies, summary.

    Parameters
    ----------
    image : ExperimentImage
        From :func:`training.experiments.readers.read_image` (data and pixel size [Å/px]).
    ensemble : Ensemble or path-like
        A :class:`training.predict.Ensemble` (or any object with its ``predict``,
        ``scheme``, ``infos`` and ``config``), or a checkpoint / run / ensemble directory to
        load on the CPU.
    scheme : optional
        Label scheme of the network's outputs; default the checkpoint's.
    train_pixel_size_A : float, optional
        Pixel size the network was trained at [Å/px]; default the checkpoint's
        (:func:`model_pixel_size`).
    tile : int
        Inference tile side [px] (in the resampled image).
    overlap : int
        Overlap of neighbouring tiles [px]; blending weights ramp over it.
    tta : bool
        Average the 8 flips/rotations of the square (8× the cost).
    batch_size : int
        Tiles per forward pass.
    background_removal : bool
        Subtract a Gaussian blur of σ = ``background_sigma_A`` before normalising.
    background_sigma_A : float
        [Å]. About one lattice constant: the blur then holds no lattice contrast (the {100}
        fringes, spacing d = a√3/2, keep a fraction exp(−2π²σ²/d²) < 10⁻⁸ of their
        amplitude at σ = 3 Å in every TMD), so only the background is subtracted: slowly
        varying contamination, thickness or gain changes longer than a few σ.
    threshold : float, optional
        Foreground probability of a column pixel; default the model's ``evaluate.threshold``.
    sample_radius_A : float
        Radius of the disk over which a column's (or empty site's) class probabilities and
        variances are averaged [Å].
    vacancy_min_prob : float
        An empty lattice site is a vacancy when the vacancy class of its sublattice is the
        most probable class allowed there (background aside) and its mean probability over
        the disk is at least this. Unsupported empty sites are left out of the catalogue
        (and counted in ``summary["empty_sites"]``). Schemes without a vacancy class list
        every empty site as class 0 (background: no column, no class).
    min_metal_margin : float
        Refuse the image when the network's probabilities decide the metal sublattice less
        clearly than this (:func:`training.experiments.lattice.decide_metal_sublattice`; ≈ 0.9 on
        simulated images, ≈ 0 on noise or a blank image, where the "columns" are the
        network's hallucinations); 0 disables the check.
    material : str, optional
        E.g. ``"WSe2"``: its tabulated lattice constant gives ``lattice_area_nm2`` in the
        summary (default: the lattice constant measured from the fit).
    keep_maps : bool
        Keep the probability mean and variance maps in the result.

    Returns
    -------
    LabelResult

    Raises
    ------
    ValueError
        Bad settings, an image that is not 2-D, fewer than 4 columns found, or no 2H lattice
        the model recognises (``min_metal_margin``).
    """
    t0 = time.perf_counter()
    if not isinstance(image, ExperimentImage):
        raise ValueError(f"image: expected an ExperimentImage, got {type(image).__name__}")
    if not isinstance(tile, int) or tile < 16:
        raise ValueError(f"tile: expected an integer >= 16 px, got {tile!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap: expected an integer in [0, tile), got {overlap!r}")
    if not 0.0 <= vacancy_min_prob <= 1.0:
        raise ValueError(f"vacancy_min_prob: expected a probability, got {vacancy_min_prob!r}")
    if not sample_radius_A > 0:
        raise ValueError(f"sample_radius_A: expected > 0 Å, got {sample_radius_A!r}")
    if not hasattr(ensemble, "predict"):
        from training.predict import Ensemble

        ensemble = Ensemble.load(ensemble, "cpu")
    scheme_d = _scheme_of(ensemble, scheme)
    names = scheme_names(scheme_d)
    if train_pixel_size_A is None:
        train_pixel_size_A = model_pixel_size(ensemble)
    ev = _eval_settings(ensemble)
    if threshold is None:
        threshold = float(ev["threshold"])
    source = image.source + ("" if image.frame is None else f" (frame {image.frame})")

    clock = {"start": time.perf_counter()}

    # 1-2: resample, background
    data, scale = resample_image(image.data, image.pixel_size_A, train_pixel_size_A)
    p_res = image.pixel_size_A / math.sqrt(scale[0] * scale[1])
    if background_removal:
        data = remove_background(data, background_sigma_A / p_res)
    if min(data.shape) < 8:
        raise ValueError(f"{source}: image of {data.shape} px after resampling is too small")

    clock["prepare"] = time.perf_counter()

    # 3: normalisation, tiles, TTA, ensemble
    mean, var = ensemble.predict(
        data, tile=tile, overlap=overlap, tta=tta, batch_size=batch_size, normalize=True
    )
    if mean.shape[0] != len(names):
        raise ValueError(
            f"scheme: the network has {mean.shape[0]} outputs but the scheme {len(names)} classes"
        )

    clock["network"] = time.perf_counter()

    # 4: columns and their class probabilities
    from training.metrics import find_columns

    cols = find_columns(
        mean,
        threshold=threshold,
        min_area_px=float(ev["min_area_A2"]) / p_res**2,
        min_distance_px=float(ev["min_separation_A"]) / p_res or None,
    )
    xy_res = np.column_stack([cols["x"], cols["y"]])
    if len(xy_res) < 4:
        raise ValueError(
            f"{source}: {len(xy_res)} columns found; no lattice to label (wrong pixel size, "
            "not a TMD monolayer, or out of focus?)"
        )
    radius_px = sample_radius_A / p_res
    probs = sample_disks(mean, xy_res, radius_px)
    variance = sample_disks(var, xy_res, radius_px)

    clock["columns"] = time.perf_counter()

    # 5: lattice
    try:
        fit = fit_lattice(xy_res, probs=probs, scheme=scheme_d, image_shape=data.shape)
    except ValueError as err:
        raise ValueError(f"{source}: lattice fit failed: {err}") from err
    if fit.metal_margin < min_metal_margin:
        raise ValueError(
            f"{source}: no 2H lattice the model recognises: metal and chalcogen sublattices "
            f"undecided (margin {fit.metal_margin:.2f} < {min_metal_margin}; "
            f"{fit.sublattices.frustrated_fraction:.0%} of bonds frustrated)"
        )

    clock["lattice"] = time.perf_counter()

    # 6: empty sites: vacancies where the network supports them
    m = len(fit.empty_xy)
    e_probs = sample_disks(mean, fit.empty_xy, radius_px) if m else np.zeros((0, len(names)))
    e_var = sample_disks(var, fit.empty_xy, radius_px) if m else np.zeros((0, len(names)))
    vac = np.array([vacancy_class(scheme_d, int(s)) for s in fit.empty_site], dtype=np.int64)
    if m:
        q = constrain_probabilities(e_probs, fit.empty_site, scheme_d)
        best = np.argmax(q, axis=1)
        p_vac = e_probs[np.arange(m), vac]
        confirmed = (vac == 0) | ((best == vac) & (p_vac >= vacancy_min_prob))
        e_prob_out = np.where(vac > 0, q[np.arange(m), vac], np.nan)
        e_var_out = np.where(vac > 0, e_var[np.arange(m), vac], np.nan)
    else:
        confirmed = np.zeros(0, dtype=bool)
        e_prob_out = e_var_out = np.zeros(0)

    # 7: catalogue in original pixels
    xy_orig = to_original_px(xy_res, scale)
    empty_orig = to_original_px(fit.empty_xy, scale)
    no_empty = dataclasses.replace(
        fit,
        empty_xy=np.zeros((0, 2)),
        empty_site=np.zeros(0, dtype=np.int8),
        empty_support=np.zeros(0, dtype=np.int64),
    )
    detected = catalogue_from_lattice(
        no_empty, xy_orig, probs, scheme_d, image.pixel_size_A, variance=variance
    )
    keep = confirmed
    catalogue = build_catalogue(
        np.concatenate([detected.positions_px, empty_orig[keep]]),
        np.concatenate([detected.class_id, vac[keep]]),
        scheme_d,
        image.pixel_size_A,
        site=np.concatenate([detected.site, fit.empty_site[keep]]),
        probability=np.concatenate([detected.probability, e_prob_out[keep]]),
        variance=np.concatenate([detected.variance, e_var_out[keep]]),
        detected=np.concatenate([detected.detected, np.zeros(int(keep.sum()), bool)]),
    )
    fg = np.ones(len(names), bool)
    fg[0] = False
    unconstrained = np.argmax(np.where(fg, probs, -np.inf), axis=1).astype(np.int64)

    # summary
    clock["catalogue"] = time.perf_counter()
    lattice_a_measured = math.sqrt(3.0) * fit.bond_length_px * p_res
    a_ref = lattice_constant_of(material) if material else lattice_a_measured
    summary = summarize(
        catalogue, scheme_d, image.shape, image.pixel_size_A, lattice_constant_A=a_ref
    )
    on_site = fit.site != UNASSIGNED
    lattice = fit.summary()
    lattice["bond_length_px"] = float(fit.bond_length_px / math.sqrt(scale[0] * scale[1]))
    lattice["lattice_constant_measured_A"] = lattice_a_measured
    if material:
        lattice["lattice_constant_table_A"] = a_ref
        lattice["material"] = str(material)
    summary.update(
        {
            "source": image.source,
            "frame": image.frame,
            "pixel_size_source": image.pixel_size_source,
            "pixel_size_uncertainty_A": image.pixel_size_uncertainty_A,
            "model": {
                "checkpoints": [str(i.get("path", "?")) for i in getattr(ensemble, "infos", [])],
                "members": len(getattr(ensemble, "infos", [])) or 1,
                "train_pixel_size_A": float(train_pixel_size_A),
                "class_names": list(names),
            },
            "resampling": {
                "factor_yx": [float(scale[0]), float(scale[1])],
                "pixel_size_A": float(p_res),
                "shape": [int(s) for s in data.shape],
            },
            "lattice": lattice,
            "constraint": {
                "changed": int(np.sum(on_site & (unconstrained != detected.class_id))),
                "unassigned_columns": int(np.sum(~on_site)),
            },
            "empty_sites": {
                "found": int(m),
                "confirmed": int(keep.sum()),
                "unconfirmed": int(m - keep.sum()),
            },
            "mean_variance": float(np.nanmean(detected.variance)) if len(detected) else None,
            "settings": {
                "tile": tile,
                "overlap": overlap,
                "tta": bool(tta),
                "background_removal": bool(background_removal),
                "background_sigma_A": float(background_sigma_A) if background_removal else None,
                "threshold": float(threshold),
                "min_area_A2": float(ev["min_area_A2"]),
                "min_separation_A": float(ev["min_separation_A"]),
                "sample_radius_A": float(sample_radius_A),
                "vacancy_min_prob": float(vacancy_min_prob),
                "min_metal_margin": float(min_metal_margin),
            },
            "seconds": time.perf_counter() - t0,
            "timings_s": {
                stage: clock[stage] - clock[prev]
                for prev, stage in zip(
                    ("start", "prepare", "network", "columns", "lattice"),
                    ("prepare", "network", "columns", "lattice", "catalogue"),
                    strict=True,
                )
            },
        }
    )
    return LabelResult(
        image=image,
        catalogue=catalogue,
        summary=summary,
        scheme=scheme_d,
        fit=fit,
        column_probs=probs,
        column_variance=variance,
        unconstrained_class=unconstrained,
        empty_confirmed=confirmed,
        scale=(float(scale[0]), float(scale[1])),
        maps=(mean, var) if keep_maps else None,
    )


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


def expand_inputs(inputs: Iterable) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named by paths, glob patterns and folders.

    Folders are searched recursively for the readable extensions
    (:data:`~training.experiments.readers.FORMATS`); glob patterns (``*``, ``?``, ``[``;
    ``**`` recurses)
    are expanded; a file given by name is kept whatever its extension (the reader then says
    what is wrong with it). Duplicates are dropped, order is sorted per input.

    Returns
    -------
    files : list of Path
    missing : list of (str, str)
        Inputs that name nothing, with the reason.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    missing: list[tuple[str, str]] = []

    def add(path: Path):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        text = str(item)
        p = Path(text)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in FORMATS)
            if not found:
                missing.append((text, f"no image files ({', '.join(sorted(FORMATS))}) in folder"))
            for q in found:
                add(q)
        elif p.is_file():
            add(p)
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(text, recursive=True) if Path(q).is_file())
            if not found:
                missing.append((text, "pattern matches no file"))
            for q in found:
                add(q)
        else:
            missing.append((text, "file not found"))
    return files, missing


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
    device: str = "cpu",
    progress: bool = True,
    echo=None,
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
    device : str
        ``cpu``, ``auto``, ``cuda``...
    progress : bool
        tqdm bar over files.
    echo : callable, optional
        Called with one line per failure (default: ``tqdm.write`` to stderr).
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
    ensemble = model if hasattr(model, "predict") else Ensemble.load(model, resolve_device(device))
    files, missing = expand_inputs(inputs)
    out.mkdir(parents=True, exist_ok=True)
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
                path, pixel_size_A=pixel_size_A, material=material, sum_frames=sum_frames
            )
        except (ReaderError, ValueError) as err:
            fail(str(path), _one_line(err), image=name)
            continue
        stack = len(images) > 1 or images[0].frame is not None
        for im in images:
            sub = f"{name}/frame_{im.frame:03d}" if stack and im.frame is not None else name
            try:
                result = label_image(im, ensemble, material=material, **label_kwargs)
                write_outputs(result, out / sub)
            except (MemoryError, KeyboardInterrupt):
                raise
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
            bar.set_postfix(columns=run.n_columns, failed=len(run.failures))
    bar.close()
    write_run_summary_csv(rows, out / "summary.csv")
    text = "".join(f"{_failure_line(what, reason)}\n" for what, reason in run.failures)
    (out / "failures.txt").write_text(text, encoding="utf-8")
    return run
