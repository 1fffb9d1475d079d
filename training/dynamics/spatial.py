"""Instability per site and where the unstable sites are: density and clustering.

**Instability** of a site: the largest step of its time series, for the intensity and for
the autoencoder latent vector (:func:`step_scores`: the mean of up to ``w`` frames before
each frame against up to ``w`` after, weighed by how many there are): for the intensity in
units of the noise σ of its sublattice's levels, for the latent vector as the Euclidean
distance in units of the typical frame-to-frame latent noise. Each of the two is
turned into a robust z-score over the sites (median, 1.4826 MAD) and the instability is
their mean.

**Density** of unstable sites [nm⁻²]: a Gaussian kernel density (bandwidth in Å) of their
positions, divided by the kernel-smoothed window so the edges are not under-counted.

**Clustering** against complete spatial randomness (CSR) on the lattice, of the sites
where the beam *created* a vacancy (each sputtering event is an independent draw under CSR;
the later sites of a hopping vacancy are not, so all unstable sites would look clustered
even for random events). Optionally points closer than ``link_A`` are merged into one.
The null is Monte Carlo: as many points drawn uniformly among the analysed lattice sites
(999 draws: the window's edges and the lattice are the same for data and null). The
Clark–Evans ratio R is the points' mean nearest-neighbour distance divided by its mean
under the null (R < 1: clustering; ``p_clark_evans`` its one-sided rank p-value). The
decision ``clustered`` is the global envelope test on Ripley's L(r) = √(K(r)/π), r = 5–40 Å:
the largest excess of L over the null mean in units of the null's spread, over the radii,
ranked among the same statistic of the draws (``p_clustered`` < 0.01). It looks at every
scale at once, so hot regions of any size are seen, where R only sees nearest neighbours.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


def step_scores(series, *, window: int = 3) -> np.ndarray:
    """Largest step of each site's series, in units of the per-frame noise of one value.

    At each frame t the mean of up to ``window`` in-view frames before (``n_b`` of them) and
    after (``n_a``) are compared: ``|mean_a − mean_b| / √(1/n_a + 1/n_b)`` (Euclidean norm
    for vectors), so a step near the start or end of the stack, seen with fewer frames,
    is weighed by the evidence it has. ``series`` is ``(T, S)`` or ``(T, S, D)`` with NaN
    out of view."""
    x = np.asarray(series, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    t_count, n, _ = x.shape
    ok = np.isfinite(x).all(axis=2)
    v = np.where(ok[..., None], x, 0.0)
    best = np.zeros(n)
    for t in range(1, t_count):
        lo, hi = max(0, t - window), min(t_count, t + window)
        nb, na = ok[lo:t].sum(axis=0), ok[t:hi].sum(axis=0)
        good = (nb > 0) & (na > 0)
        mb = v[lo:t].sum(axis=0) / np.maximum(nb, 1)[:, None]
        ma = v[t:hi].sum(axis=0) / np.maximum(na, 1)[:, None]
        d = np.linalg.norm(ma - mb, axis=1) / np.sqrt(1 / np.maximum(na, 1) + 1 / np.maximum(nb, 1))
        best[good] = np.maximum(best[good], d[good])
    return best


def robust_z(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med)) + 1e-12
    return (v - med) / mad


def frame_noise(series) -> float:
    """Typical frame-to-frame change of a quiet site (median |Δ| / 0.6745 / √2)."""
    x = np.asarray(series, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    d = np.diff(x, axis=0)
    d = np.linalg.norm(d, axis=2).ravel()
    d = d[np.isfinite(d)]
    return float(np.median(d) / 0.6745 / np.sqrt(2)) + 1e-12 if len(d) else 1.0


def instability(intensity, latent, sigma_intensity: float, *, window: int = 3) -> dict:
    """Per-site instability (module docstring): ``score``, ``intensity_step`` (in σ),
    ``latent_step`` (in latent noise units)."""
    s_int = step_scores(intensity, window=window) / max(sigma_intensity, 1e-12)
    s_lat = step_scores(latent, window=window) / frame_noise(latent)
    score = 0.5 * (robust_z(s_int) + robust_z(s_lat))
    return {"score": score, "intensity_step": s_int, "latent_step": s_lat}


def merge_clusters(xy, link: float) -> np.ndarray:
    """Centroids of the groups of points linked at distance ``link``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 2:
        return xy
    pairs = cKDTree(xy).query_pairs(link, output_type="ndarray")
    n = len(xy)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    counts = np.bincount(comp)
    return np.column_stack(
        [np.bincount(comp, weights=xy[:, 0]) / counts, np.bincount(comp, weights=xy[:, 1]) / counts]
    )


def _mean_nn(xy) -> float:
    if len(xy) < 2:
        return float("nan")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(d[:, 1].mean())


def _ripley_l(xy, radii, area) -> np.ndarray:
    n = len(xy)
    if n < 2:
        return np.full(len(radii), np.nan)
    d = cKDTree(xy).count_neighbors(cKDTree(xy), radii) - n  # ordered pairs, self excluded
    k = area * d / (n * (n - 1))
    return np.sqrt(k / np.pi)


def clustering(
    points_A,
    window_sites_A,
    link_A: float | None = None,
    *,
    n_sim: int = 999,
    rng=0,
    radii_A=None,
) -> dict:
    """Clark–Evans ratio and Ripley's L of points on lattice sites against CSR on the lattice.

    Parameters
    ----------
    points_A : ndarray, shape (N, 2)
        The sites tested [Å] (the analysis: where the beam created a vacancy).
    window_sites_A : ndarray, shape (M, 2)
        Every site a point could have been on [Å] (the null draws from these).
    link_A : float, optional
        Sites closer than this are one cluster [Å] (default: every point counts).

    Returns
    -------
    dict
        ``n_points``, ``n_clusters``, ``clark_evans_R``, ``p_clustered``,
        ``clustered`` (p < 0.01), ``mean_nn_A``, ``mean_nn_csr_A``, ``ripley`` (radii,
        L, envelope low/high).
    """
    rng = np.random.default_rng(rng)
    radii = np.arange(5.0, 41.0, 5.0) if radii_A is None else np.asarray(radii_A, float)
    pts = np.asarray(points_A, float).reshape(-1, 2)
    if link_A is not None:
        pts = merge_clusters(pts, link_A)
    n = len(pts)
    out = {"n_points": int(len(points_A)), "n_clusters": int(n)}
    sites = np.asarray(window_sites_A, dtype=np.float64)
    if n < 3 or len(sites) < 2 * n:
        out.update(clark_evans_R=float("nan"), p_clustered=float("nan"), clustered=False)
        return out
    ext = np.ptp(sites, axis=0)
    area = float(ext[0] * ext[1])
    obs = _mean_nn(pts)
    sims, l_sims = [], []
    for _ in range(n_sim):
        draw = sites[rng.choice(len(sites), size=n, replace=False)]
        sims.append(_mean_nn(draw))
        l_sims.append(_ripley_l(draw, radii, area))
    sims = np.asarray(sims)
    l_sims = np.asarray(l_sims)
    p_ce = (1 + np.sum(sims <= obs)) / (1 + n_sim)
    # global envelope test on Ripley's L: the largest standardised excess over the radii,
    # ranked among the same statistic of the draws themselves
    l_obs = _ripley_l(pts, radii, area)
    mu, sd = l_sims.mean(axis=0), l_sims.std(axis=0) + 1e-9
    t_obs = float(np.max((l_obs - mu) / sd))
    t_sims = np.max((l_sims - mu) / sd, axis=1)
    p_l = (1 + np.sum(t_sims >= t_obs)) / (1 + n_sim)
    out.update(
        mean_nn_A=obs,
        mean_nn_csr_A=float(sims.mean()),
        clark_evans_R=float(obs / sims.mean()),
        p_clark_evans=float(p_ce),
        ripley_excess=t_obs,
        p_clustered=float(p_l),
        clustered=bool(p_l < 0.01),
        ripley={
            "radius_A": radii.tolist(),
            "L_A": l_obs.tolist(),
            "csr_low_A": np.percentile(l_sims, 2.5, axis=0).tolist(),
            "csr_high_A": np.percentile(l_sims, 97.5, axis=0).tolist(),
        },
    )
    return out


def density_map(points_px, shape, pixel_size_A: float, bandwidth_A: float, window=None):
    """Kernel density of points [nm⁻²] on the pixel grid ``shape`` (edge-corrected by the
    smoothed ``window`` mask, default the whole frame)."""
    h, w = shape
    hist = np.zeros((h, w))
    xy = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    r = np.clip(np.rint(xy[:, 1]).astype(int), 0, h - 1)
    c = np.clip(np.rint(xy[:, 0]).astype(int), 0, w - 1)
    np.add.at(hist, (r, c), 1.0)
    sigma = bandwidth_A / pixel_size_A
    mask = np.ones((h, w)) if window is None else np.asarray(window, float)
    num = ndimage.gaussian_filter(hist, sigma, mode="constant")
    den = ndimage.gaussian_filter(mask, sigma, mode="constant")
    per_px = np.where(den > 0.2, num / np.maximum(den, 1e-12), np.nan)
    return per_px / (pixel_size_A**2) * 100.0  # per Å² -> per nm²
