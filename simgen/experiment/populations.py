"""How many chalcogen sites hold two, one or no atoms, read off the intensity histogram
of every chalcogen lattice site, without a network.

A network's defect fractions can only be checked on real images against something that
does not share its weaknesses. This estimate uses one fact of HAADF physics: above the
hollow-site level, a chalcogen column with one atom left gives about 0.45 of a full
column's signal (0.43–0.45 at 40–120 mrad in the calibrated model and in converged PRISM,
docs/physics.md; a non-linear detector response moves it, so it is fitted within 0.25–0.6),
and an empty site gives the hollow level. So the normalised site
intensities ``t = (I − I_hollow)/(median I_X − I_hollow)`` of *every* chalcogen lattice site
(the detected columns and the empty sites the lattice predicts: a single vacancy is often
no local maximum) form three Gaussian populations at ``0``, ``r·m`` and ``m`` with one
width; their weights are the fractions of double vacancies, single vacancies and full
columns. The metal/chalcogen contrast does not enter, so images of one session with
different contrast are read alike, which a classifier that compares a chalcogen with its
metal neighbours cannot promise.

Limits: it assumes a binary host (one chalcogen element; substitutions at the same site
read as vacancies or full columns), site-to-site scatter that is the same for every
population, and enough sites (a few hundred) for the weights to mean something. Its empty
sites are the lattice's geometric predictions, not a network's confirmed vacancies: a hole
or a flake edge inside the field counts its sites as empty (double vacancies).

API::

    pops = chalcogen_populations(image, pixel_size_A=0.096, material="WSe2")
    pops.single, pops.empty, pops.n_sites
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "ChalcogenPopulations",
    "chalcogen_populations",
    "populations_at_sites",
    "three_level_mixture",
]

#: Signal of a chalcogen column with one atom left over a full one, above the hollow level
#: (linear detector).
SINGLE_RATIO = 0.45
#: Range the one-atom ratio is fitted in (a detector response γ 0.7–2.5 moves it).
RATIO_BOUNDS = (0.25, 0.6)
#: Normalised site intensities outside this range are not sites of the monolayer
#: (contamination, holes, edges) and are left out of the fit.
OUTLIER_RANGE = (-0.6, 1.8)


@dataclass(frozen=True)
class ChalcogenPopulations:
    """Fractions of the chalcogen lattice sites by the atoms they hold.

    Attributes
    ----------
    n_sites : int
        Chalcogen lattice sites in the fit (detected columns and predicted empty sites at
        least one bond length inside the image, less outliers).
    full, single, empty : float
        Fractions of sites with two, one and no chalcogen atoms (sum 1).
    full_level : float
        Fitted level of a full column, in units of the median chalcogen site above the
        hollow level (about 1).
    width : float
        Site-to-site scatter of one population, same units.
    single_ratio : float
        The one-atom/full signal ratio above the hollow level (fitted).
    """

    n_sites: int
    full: float
    single: float
    empty: float
    full_level: float
    width: float
    single_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def three_level_mixture(
    values,
    single_ratio: float = SINGLE_RATIO,
    iterations: int = 300,
    *,
    ratio_bounds: tuple[float, float] | None = RATIO_BOUNDS,
):
    """Weights of three Gaussians at ``0``, ``r·m`` and ``m`` (one width) fitted to
    ``values`` by expectation maximisation; ``m``, the width and (within ``ratio_bounds``)
    ``r`` are fitted too.

    Parameters
    ----------
    values : array_like
        Normalised site intensities (full columns near 1, the hollow level 0).
    single_ratio : float
        ``r``, in (0, 1): fixed when ``ratio_bounds`` is None, else the starting value.
    iterations : int
    ratio_bounds : (float, float) or None
        Range ``r`` is fitted in. A detector response ``I^γ`` moves the one-atom level
        (≈ 0.32 of a full column above the hollow level at γ = 2, 0.48 at γ = 0.8), so it
        is fitted unless the caller knows the response is linear.

    Returns
    -------
    weights : ndarray, shape (3,)
        ``(empty, single, full)``.
    level : float
        ``m``.
    width : float
    ratio : float
        ``r`` (the fitted one, or ``single_ratio``).
    """
    t = np.asarray(values, dtype=np.float64).ravel()
    t = t[np.isfinite(t) & (t > OUTLIER_RANGE[0]) & (t < OUTLIER_RANGE[1])]
    if t.size < 10:
        raise ValueError(f"only {t.size} usable sites: too few for three populations")
    if not 0.0 < single_ratio < 1.0:
        raise ValueError(f"single_ratio: expected a value in (0, 1), got {single_ratio}")
    if ratio_bounds is not None and not 0.0 < ratio_bounds[0] <= ratio_bounds[1] < 1.0:
        raise ValueError(f"ratio_bounds: expected 0 < low <= high < 1, got {ratio_bounds}")
    ratio = float(single_ratio)
    weights = np.array([0.01, 0.05, 0.94])
    level = 1.0
    width = max(float(np.std(t)), 0.02)
    for _ in range(int(iterations)):
        a = np.array([0.0, ratio, 1.0])
        z = (t[:, None] - a * level) / width
        dens = weights * np.exp(-0.5 * z * z)
        resp = dens / np.maximum(dens.sum(axis=1, keepdims=True), 1e-300)
        weights = resp.mean(axis=0)
        if ratio_bounds is not None and resp[:, 1].sum() > 1.0:
            level = float((resp[:, 2] * t).sum() / max(resp[:, 2].sum(), 1e-12))
            single = float((resp[:, 1] * t).sum() / resp[:, 1].sum())
            ratio = float(np.clip(single / level, *ratio_bounds))
            a = np.array([0.0, ratio, 1.0])
        else:
            level = float((resp * t[:, None] * a).sum() / (resp * a * a).sum())
        width = max(float(np.sqrt((resp * (t[:, None] - a * level) ** 2).sum() / t.size)), 0.01)
    return weights, level, width, ratio


def chalcogen_populations(
    image, pixel_size_A: float, material: str, *, single_ratio: float = SINGLE_RATIO
) -> ChalcogenPopulations:
    """Fractions of full, single-vacancy and empty chalcogen sites in one image.

    Parameters
    ----------
    image : array_like, shape (H, W)
        HAADF image (any units), at least a few hundred chalcogen sites.
    pixel_size_A : float
        [Å/px].
    material : str
        The host, e.g. ``"WSe2"`` (lattice constant, which sublattice is brighter).
    single_ratio : float
        Signal of one chalcogen atom over two, above the hollow level.

    Returns
    -------
    ChalcogenPopulations

    Raises
    ------
    simgen.match.MatchError
        No lattice in the image.
    ValueError
        Too few sites.
    """
    from simgen.experiment.calibration import lattice_constant_of
    from simgen.match import find_lattice
    from structures import CHALCOGEN, METAL

    img = np.asarray(image, dtype=np.float64)
    xy, fit = find_lattice(img, pixel_size_A, material)
    return populations_at_sites(
        img,
        xy[fit.site == METAL],
        xy[fit.site == CHALCOGEN],
        fit.empty_xy[fit.empty_site == CHALCOGEN],
        float(fit.sublattices.bond_length_px),
        background_px=2.0 * lattice_constant_of(material) / pixel_size_A,
        single_ratio=single_ratio,
    )


def populations_at_sites(
    image,
    metal_xy,
    chalcogen_xy,
    empty_chalcogen_xy,
    bond_length_px: float,
    *,
    background_px: float,
    single_ratio: float = SINGLE_RATIO,
) -> ChalcogenPopulations:
    """:func:`chalcogen_populations` at sites already placed on the lattice (e.g. by a
    labelling run's lattice fit).

    Parameters
    ----------
    image : array_like, shape (H, W)
    metal_xy, chalcogen_xy : array_like, shape (N, 2)
        Detected metal and chalcogen columns ``(x, y)`` [px].
    empty_chalcogen_xy : array_like, shape (M, 2)
        Chalcogen lattice sites without a detected column [px].
    bond_length_px : float
    background_px : float
        Gaussian σ [px] of the slow background removed first (about two lattice constants).
    single_ratio : float
        Starting value of the one-atom/full ratio (fitted within :data:`RATIO_BOUNDS`).

    Returns
    -------
    ChalcogenPopulations
    """
    from simgen.experiment.quality import disk_means, hollow_sites

    img = np.asarray(image, dtype=np.float64)
    flat = img - ndimage.gaussian_filter(img, float(background_px))  # slow background removed
    metal = np.asarray(metal_xy, dtype=np.float64).reshape(-1, 2)
    detected = np.asarray(chalcogen_xy, dtype=np.float64).reshape(-1, 2)
    empty = np.asarray(empty_chalcogen_xy, dtype=np.float64).reshape(-1, 2)
    sites = np.concatenate([detected, empty])
    h, w = img.shape
    b = float(bond_length_px)
    inside = (sites[:, 0] >= b) & (sites[:, 0] <= w - 1 - b)
    sites = sites[inside & (sites[:, 1] >= b) & (sites[:, 1] <= h - 1 - b)]  # whole disks
    radius = 0.25 * float(bond_length_px)
    hollow = hollow_sites(metal, detected, float(bond_length_px), img.shape)
    if len(hollow) < 3 or len(sites) < 10:
        raise ValueError(f"{len(sites)} chalcogen and {len(hollow)} hollow sites: too few")
    level_h = float(np.median(disk_means(flat, hollow, radius)))
    values = disk_means(flat, sites, radius)
    span = float(np.median(values)) - level_h
    if not span > 0:
        raise ValueError("the chalcogen sites are not brighter than the hollow sites")
    t = (values - level_h) / span
    weights, level, width, ratio = three_level_mixture(t, single_ratio)
    empty_w, single, full = (float(x) for x in weights)
    used = np.isfinite(t) & (t > OUTLIER_RANGE[0]) & (t < OUTLIER_RANGE[1])
    return ChalcogenPopulations(
        n_sites=int(used.sum()),
        full=full,
        single=single,
        empty=empty_w,
        full_level=float(level),
        width=float(width),
        single_ratio=float(ratio),
    )
