"""Instability per site and where the unstable sites are: density and clustering.

**Instability** of a site: the largest step of its time series, for the intensity and for
the autoencoder latent vector. At each frame t the mean of the ``w`` frames before is
compared with the mean of the ``w`` frames after (both inside the field): for the
intensity in units of the noise σ of its sublattice's levels, for the latent vector as the
Euclidean distance in units of the typical frame-to-frame latent noise. Each of the two is
turned into a robust z-score over the sites (median, 1.4826 MAD) and the instability is
their mean.

**Density** of unstable sites [nm⁻²]: a Gaussian kernel density (bandwidth in Å) of their
positions, divided by the kernel-smoothed window so the edges are not under-counted.

**Clustering** against complete spatial randomness (CSR) on the lattice, of the sites
where the beam *created* a vacancy (each sputtering event is an independent draw under CSR;
the later sites of a hopping vacancy are not, so all unstable sites would look clustered
even for random events). Optionally points closer than ``link_A`` are merged into one.
The Clark–Evans ratio R is their mean nearest-neighbour distance divided
by its mean under CSR, estimated by Monte Carlo: as many points drawn uniformly among the
analysed lattice sites (199 draws: the window's edges and the lattice are the same for data
and null). R < 1 is clustering; the one-sided p-value is the rank of the data among the
draws. Ripley's L(r) = √(K(r)/π) is reported with the draws' 2.5–97.5 % envelope.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


def step_scores(series, *, window: int = 3) -> np.ndarray:
    """Largest |mean(after) − mean(before)| over frames, per site; ``series`` is ``(T, S)``
    or ``(T, S, D)`` (Euclidean norm over D) with NaN out of view."""
    x = np.asarray(series, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    t_count, n, _ = x.shape
    best = np.zeros(n)
    w = max(1, min(window, t_count // 2))
    for t in range(w, t_count - w + 1):
        before = x[t - w : t]
        after = x[t : t + w]
        ok = np.isfinite(before).all(axis=(0, 2)) & np.isfinite(after).all(axis=(0, 2))
        d = np.linalg.norm(after.mean(axis=0) - before.mean(axis=0), axis=1)
        best[ok] = np.maximum(best[ok], d[ok])
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
    n_sim: int = 199,
    rng=0,
    radii_A=None,
) -> dict:
    """Clark–Evans ratio and Ripley's L of unstable sites against CSR on the lattice.

    Parameters
    ----------
    points_A : ndarray, shape (N, 2)
        Unstable sites [Å].
    window_sites_A : ndarray, shape (M, 2)
        Every analysed site [Å] (the null draws from these).
    link_A : float, optional
        Sites closer than this are one cluster [Å] (default: every point counts).

    Returns
    -------
    dict
        ``n_unstable_sites``, ``n_clusters``, ``clark_evans_R``, ``p_clustered``,
        ``clustered`` (p < 0.01), ``mean_nn_A``, ``mean_nn_csr_A``, ``ripley`` (radii,
        L, envelope low/high).
    """
    rng = np.random.default_rng(rng)
    radii = np.arange(5.0, 41.0, 5.0) if radii_A is None else np.asarray(radii_A, float)
    pts = np.asarray(points_A, float).reshape(-1, 2)
    if link_A is not None:
        pts = merge_clusters(pts, link_A)
    n = len(pts)
    out = {"n_unstable_sites": int(len(points_A)), "n_clusters": int(n)}
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
    p = (1 + np.sum(sims <= obs)) / (1 + n_sim)
    out.update(
        mean_nn_A=obs,
        mean_nn_csr_A=float(sims.mean()),
        clark_evans_R=float(obs / sims.mean()),
        p_clustered=float(p),
        clustered=bool(p < 0.01),
        ripley={
            "radius_A": radii.tolist(),
            "L_A": _ripley_l(pts, radii, area).tolist(),
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
