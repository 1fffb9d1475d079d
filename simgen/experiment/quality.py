"""Can a labelled real image be trusted? Figures measured on the image itself, and a verdict.

A real image has no ground truth, so :func:`quality_figures` measures what a microscopist
would check by eye: are the lattice's sites all found, is every site surrounded by three
sites of the other sublattice at the bond length (the honeycomb), are there detections off
the lattice, is the metal/chalcogen contrast within what the network was trained on, how many
sites were decided with low confidence, how much the ensemble disagrees. :func:`verdict`
turns them into ``ok`` / ``check`` / ``poor`` with the reasons.

Pure NumPy/SciPy: no file access, no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import numpy as np
from scipy.spatial import cKDTree

from structures import CHALCOGEN, METAL

#: Bond-length tolerance of the honeycomb test (±25 %).
BOND_TOLERANCE = 0.25
#: Class probability under which a site counts as a low-confidence decision.
LOW_CONFIDENCE = 0.5
#: Thresholds of the verdict: (figure, "check" below/above, "poor" below/above, direction).
THRESHOLDS = (
    ("honeycomb_consistency", 0.98, 0.90, "min"),
    ("sites_detected_fraction", 0.95, 0.85, "min"),
    ("off_lattice_fraction", 0.02, 0.10, "max"),
    ("low_confidence_fraction", 0.10, 0.30, "max"),
)
#: Relative margin around the training data's contrast range before it is flagged.
CONTRAST_MARGIN = 0.10


def host_classes(class_id, site, n_classes: int | None = None) -> dict[int, int]:
    """The most common class on each sublattice (the host metal and the full chalcogen column).

    Parameters
    ----------
    class_id, site : array_like of int, shape (N,)
        Class and site (``METAL``/``CHALCOGEN``; others ignored) of every column.

    Returns
    -------
    dict
        ``{METAL: class id, CHALCOGEN: class id}`` for the sublattices present.
    """
    class_id, site = np.asarray(class_id), np.asarray(site)
    out = {}
    for s in (METAL, CHALCOGEN):
        counts = Counter(int(c) for c in class_id[site == s] if c > 0)
        if counts:
            out[s] = counts.most_common(1)[0][0]
    return out


def disk_means(image: np.ndarray, xy: np.ndarray, radius_px: float) -> np.ndarray:
    """Mean of ``image`` in a disk of ``radius_px`` about each ``(x, y)`` [px] (rounded to
    the nearest pixel; pixels beyond the edge repeat the edge)."""
    h, w = image.shape
    r = max(float(radius_px), 0.5)
    half = int(math.ceil(r))
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    keep = dx**2 + dy**2 <= r * r
    dy, dx = dy[keep], dx[keep]
    rows = np.clip(np.rint(xy[:, 1]).astype(int)[:, None] + dy, 0, h - 1)
    cols = np.clip(np.rint(xy[:, 0]).astype(int)[:, None] + dx, 0, w - 1)
    return image[rows, cols].mean(axis=1)


def contrast_ratio(
    image, metal_xy, chalcogen_xy, bond_length_px: float, radius_px: float | None = None
) -> float:
    """Metal/chalcogen peak contrast of an image above the hollow-site background.

    ``(I_M − I_H) / (I_X − I_H)``: mean intensities in disks of ``radius_px`` (default a
    quarter bond length) at the host metal columns, the full chalcogen columns, and the
    hollow sites (the hexagon centres, at ``2·M − X`` for each metal–chalcogen bond). It does
    not depend on the export's offset and gain, so real images, 8-bit exports and simulations
    compare directly.

    Parameters
    ----------
    image : array_like, shape (H, W)
    metal_xy, chalcogen_xy : array_like, shape (N, 2)
        Positions ``(x, y)`` [px] of host metal columns and full chalcogen columns.
    bond_length_px : float
        Projected metal–chalcogen distance [px].

    Returns
    -------
    float
        NaN when there are too few columns or no contrast.
    """
    img = np.asarray(image, dtype=np.float64)
    m = np.asarray(metal_xy, dtype=np.float64).reshape(-1, 2)
    x = np.asarray(chalcogen_xy, dtype=np.float64).reshape(-1, 2)
    if len(m) < 3 or len(x) < 3 or not bond_length_px > 0:
        return float("nan")
    radius = 0.25 * bond_length_px if radius_px is None else radius_px
    hollow = hollow_sites(m, x, bond_length_px, img.shape)
    if len(hollow) < 3:
        return float("nan")
    i_h = float(np.median(disk_means(img, hollow, radius)))
    i_m = float(np.median(disk_means(img, m, radius))) - i_h
    i_x = float(np.median(disk_means(img, x, radius))) - i_h
    return i_m / i_x if i_x > 0 else float("nan")


def hollow_sites(metal_xy, chalcogen_xy, bond_length_px: float, shape) -> np.ndarray:
    """Hollow sites (hexagon centres) of the 2H lattice inside an image: ``2·M − X`` for
    each metal column ``M`` and each of its (up to three) chalcogen neighbours ``X`` within
    1.25 bond lengths.

    Parameters
    ----------
    metal_xy, chalcogen_xy : array_like, shape (N, 2)
        ``(x, y)`` [px].
    bond_length_px : float
        Projected metal–chalcogen distance [px].
    shape : (H, W)
        Image shape; sites outside it are dropped.

    Returns
    -------
    ndarray, shape (M, 2)
    """
    m = np.asarray(metal_xy, dtype=np.float64).reshape(-1, 2)
    x = np.asarray(chalcogen_xy, dtype=np.float64).reshape(-1, 2)
    if len(m) == 0 or len(x) < 3:
        return np.zeros((0, 2))
    d, j = cKDTree(x).query(m, k=3, distance_upper_bound=1.25 * bond_length_px)
    ok = np.isfinite(d)
    hollow = (2.0 * m[:, None, :] - x[np.where(ok, j, 0)])[ok]
    h, w = shape
    inside = (hollow[:, 0] >= 0) & (hollow[:, 0] < w) & (hollow[:, 1] >= 0) & (hollow[:, 1] < h)
    return hollow[inside]


def honeycomb_consistency(
    xy, site, bond_length_px: float, shape, tolerance: float = BOND_TOLERANCE
) -> tuple[float, int]:
    """Fraction of sites whose three nearest neighbours are of the other sublattice at the bond
    length ±``tolerance``, over sites at least 1.5 bond lengths inside the image.

    Parameters
    ----------
    xy : array_like, shape (N, 2)
        All lattice sites ``(x, y)`` [px]: detected columns and empty sites.
    site : array_like of int, shape (N,)
        ``METAL``/``CHALCOGEN``; other values (unassigned detections) count as neither.
    bond_length_px : float
    shape : (H, W)

    Returns
    -------
    fraction : float
        NaN when no site is inside.
    n_tested : int
    """
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    site = np.asarray(site)
    h, w = shape
    margin = 1.5 * bond_length_px
    inner = (
        (pts[:, 0] > margin) & (pts[:, 0] < w - 1 - margin)
        & (pts[:, 1] > margin) & (pts[:, 1] < h - 1 - margin)
        & np.isin(site, (METAL, CHALCOGEN))
    )  # fmt: skip
    if len(pts) < 4 or not inner.any():
        return float("nan"), 0
    d, j = cKDTree(pts).query(pts[inner], k=4)
    d, j = d[:, 1:], j[:, 1:]
    bond_ok = np.abs(d / bond_length_px - 1.0) <= tolerance
    other = site[j] == (1 - site[inner])[:, None]
    good = np.all(bond_ok & other, axis=1)
    return float(good.mean()), int(inner.sum())


def quality_figures(
    image,
    detected_xy,
    detected_site,
    detected_class,
    detected_prob,
    empty_xy,
    empty_site,
    bond_length_px: float,
    *,
    variance=None,
    members: int = 1,
    train_contrast=None,
) -> dict:
    """Quality figures of one labelled image (all positions in one undistorted pixel frame).

    Parameters
    ----------
    image : array_like, shape (H, W)
        The image the columns were found in.
    detected_xy, detected_site, detected_class, detected_prob
        Detected columns: positions [px], site (``UNASSIGNED`` = off the lattice), class id
        after the site constraint, its probability.
    empty_xy, empty_site
        Lattice sites with no detected column.
    bond_length_px : float
    variance : array_like, optional
        Ensemble variance of each detected column's class.
    members : int
        Ensemble size (the variance is reported for more than one).
    train_contrast : (float, float), optional
        Range of the metal/chalcogen contrast in the training data.

    Returns
    -------
    dict
        ``sites_detected_fraction``, ``honeycomb_consistency`` (and ``honeycomb_sites``),
        ``off_lattice_fraction``, ``contrast_metal_chalcogen``, ``train_contrast``,
        ``low_confidence_fraction``, ``ensemble_variance``, then ``verdict`` and ``reasons``
        (see :func:`verdict`).
    """
    xy = np.asarray(detected_xy, dtype=np.float64).reshape(-1, 2)
    site = np.asarray(detected_site)
    cls = np.asarray(detected_class)
    prob = np.asarray(detected_prob, dtype=np.float64)
    e_xy = np.asarray(empty_xy, dtype=np.float64).reshape(-1, 2)
    e_site = np.asarray(empty_site)
    on = np.isin(site, (METAL, CHALCOGEN))
    n_sites = int(on.sum()) + len(e_xy)
    honey, n_tested = honeycomb_consistency(
        np.concatenate([xy, e_xy]), np.concatenate([site, e_site]), bond_length_px,
        np.shape(image),
    )  # fmt: skip
    hosts = host_classes(cls[on], site[on])
    contrast = float("nan")
    if METAL in hosts and CHALCOGEN in hosts:
        metal = on & (site == METAL) & (cls == hosts[METAL])
        chalc = on & (site == CHALCOGEN) & (cls == hosts[CHALCOGEN])
        contrast = contrast_ratio(image, xy[metal], xy[chalc], bond_length_px)
    figures = {
        "sites_detected_fraction": int(on.sum()) / n_sites if n_sites else float("nan"),
        "honeycomb_consistency": honey,
        "honeycomb_sites": n_tested,
        "off_lattice_fraction": float(np.mean(~on)) if len(on) else float("nan"),
        "contrast_metal_chalcogen": contrast,
        "train_contrast": None if train_contrast is None else [float(v) for v in train_contrast],
        "low_confidence_fraction": float(np.mean(prob[on] < LOW_CONFIDENCE)) if on.any() else 0.0,
        "ensemble_variance": (
            float(np.nanmean(np.asarray(variance)[on]))
            if members > 1 and variance is not None and on.any()
            else None
        ),
    }
    figures.update(verdict(figures))
    return figures


def verdict(figures: Mapping) -> dict:
    """``ok`` / ``check`` / ``poor`` from quality figures, with a reason for each flag.

    ``poor`` when any figure passes its poor threshold (:data:`THRESHOLDS`); ``check`` when any
    passes its check threshold or the contrast lies more than :data:`CONTRAST_MARGIN` outside
    the training range; ``ok`` otherwise.
    """
    level, reasons = 0, []
    names = {
        "honeycomb_consistency": "honeycomb consistency",
        "sites_detected_fraction": "lattice sites with a column",
        "off_lattice_fraction": "detections off the lattice",
        "low_confidence_fraction": "low-confidence sites",
    }
    for key, check, poor, direction in THRESHOLDS:
        value = figures.get(key)
        if value is None or not math.isfinite(value):
            continue
        worse = (lambda v, t: v < t) if direction == "min" else (lambda v, t: v > t)
        if worse(value, poor):
            level = max(level, 2)
        elif worse(value, check):
            level = max(level, 1)
        else:
            continue
        limit = check if direction == "min" else check
        sign = ">=" if direction == "min" else "<="
        reasons.append(f"{names[key]} {value:.3f} (want {sign} {limit})")
    contrast, train = figures.get("contrast_metal_chalcogen"), figures.get("train_contrast")
    if contrast is not None and math.isfinite(contrast) and train:
        lo, hi = train
        if contrast < lo * (1 - CONTRAST_MARGIN) or contrast > hi * (1 + CONTRAST_MARGIN):
            level = max(level, 1)
            reasons.append(
                f"metal/chalcogen contrast {contrast:.2f}, training data {lo:.2f}-{hi:.2f}: "
                "outside what the model saw"
            )
    return {"verdict": ("ok", "check", "poor")[level], "reasons": reasons}


def store_contrast_range(stores, scheme, *, n_samples: int = 24, quantiles=(0.05, 0.95)):
    """Range of the metal/chalcogen contrast over samples of training stores (ground truth).

    Parameters
    ----------
    stores : sequence of StoreInfo
        Opened stores (:func:`training.stores.open_store`): ``image(i)``, ``columns(i)``,
        ``complete_indices()`` and ``pixel_size_A``.
    scheme : label scheme
    n_samples : int
        Samples used, spread evenly over each store's complete samples.

    Returns
    -------
    (float, float) or None
    """
    from simgen.experiment.lattice import allowed_sites, scheme_names

    names = scheme_names(scheme)
    allowed = allowed_sites(scheme)
    site_of = np.array(
        [allowed[n][0] if len(allowed[n]) == 1 else -1 for n in names], dtype=np.int64
    )
    ratios = []
    for st in stores:
        done = st.complete_indices()
        if len(done) == 0:
            continue
        pick = done[np.linspace(0, len(done) - 1, min(n_samples, len(done))).astype(int)]
        for i in pick:
            cols = st.columns(int(i))
            cid = cols["class_id"]
            cid = np.clip(cid, 0, len(names) - 1)
            site = site_of[cid]
            xy = np.column_stack([cols["x"], cols["y"]])
            hosts = host_classes(cid, site)
            if METAL not in hosts or CHALCOGEN not in hosts:
                continue
            metal = (site == METAL) & (cid == hosts[METAL])
            chalc = (site == CHALCOGEN) & (cid == hosts[CHALCOGEN])
            if metal.sum() < 3 or chalc.sum() < 3:
                continue
            d, _ = cKDTree(xy[chalc]).query(xy[metal])
            bond = float(np.median(d))
            r = contrast_ratio(st.image(int(i)), xy[metal], xy[chalc], bond)
            if math.isfinite(r):
                ratios.append(r)
    if not ratios:
        return None
    lo, hi = np.quantile(ratios, quantiles)
    return float(lo), float(hi)
