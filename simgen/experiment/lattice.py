"""The 2H lattice of an experimental image: FFT pixel-size calibration, the two-sublattice fit of
detected columns, empty-site search and the site constraint on column classes.

Pure NumPy/SciPy: no file access, no torch. Positions are ``(x, y)`` in pixels of the image
``[H, W] = [rows (y), cols (x)]``; lengths of the crystal in Å.

Geometry used throughout (see ``docs/structures.md``): in projection along c the metal (A)
sites form a triangular lattice of constant ``a``; each chalcogen (B) site sits at
``(a1 + a2) / 3``. Every A site has three B neighbours at the bond length ``b = a/√3`` in the
directions θ, θ + 120°, θ + 240°; every B site has three A neighbours in the opposite
directions θ + 60°, θ + 180°, θ + 300°. This *triad* orientation tells the two sublattices
apart without looking at brightness: for a column with bond angles φ_j,
``z = Σ_j exp(3iφ_j)`` is ``+3 e^{3iθ}`` on one sublattice and ``−3 e^{3iθ}`` on the other.

Which of the two topological sublattices is the metal one is a separate decision
(:func:`decide_metal_sublattice`): by the class probabilities of a network when given, else
by brightness with the direction expected from Z^1.7 (documented in ``docs/labelling.md``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from structures import CHALCOGEN, METAL, get_scheme, parse_material
from structures.columns import DEFECT_CLASSES, LabelScheme
from structures.defects import DEFECT_SITE
from structures.lattices import CHALCOGENS

SQRT3 = math.sqrt(3.0)
#: Site code of a column that could not be placed on the lattice.
UNASSIGNED = -1


# --------------------------------------------------------------------------------------------
# Sublattices from detected column positions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SublatticeFit:
    """Topological two-sublattice assignment of detected columns (which is metal undecided).

    Attributes
    ----------
    sublattice : ndarray of int8, shape (N,)
        0 or 1 (the two topological sublattices), ``UNASSIGNED`` (−1) for columns that fit
        neither (isolated, or off the lattice, e.g. an adatom).
    confidence : ndarray of float, shape (N,)
        Agreement of the column's bond directions with its sublattice's triad, in [−1, 1]
        (1: three bonds exactly in the triad directions; 0: no information).
    bond_length_px : float
        Median projected metal–chalcogen distance ``b = a/√3`` [px].
    lattice_vectors_px : ndarray, shape (2, 2)
        Global (average) lattice vectors of one sublattice [px], rows ``a1``, ``a2``.
    local_affine : ndarray, shape (N, 2, 2)
        Local map from the ideal (global-average) lattice to the observed one around each
        column (identity where the lattice is undistorted relative to the average).
    fit_rms_px : ndarray, shape (N,)
        RMS residual of the local fit of each column's neighbours [px] (NaN if not fitted).
    site_residual_px : ndarray, shape (N,)
        Distance of each column from the nearest lattice site its neighbours predict [px]
        (median over neighbours; NaN without placed neighbours). About ``b`` for a column in
        a hexagon's hollow.
    bonds : ndarray of int, shape (E, 2)
        Pairs of columns at bonding distance.
    frustrated_fraction : float
        Fraction of bonds joining two columns of the same sublattice (0 on a clean lattice).
    triad_angle_rad : float
        Global triad direction θ of sublattice 0: its bonds point at θ + k·120° [rad].
    """

    sublattice: np.ndarray
    confidence: np.ndarray
    bond_length_px: float
    lattice_vectors_px: np.ndarray
    local_affine: np.ndarray
    fit_rms_px: np.ndarray
    site_residual_px: np.ndarray
    bonds: np.ndarray
    frustrated_fraction: float
    triad_angle_rad: float

    def templates(self) -> tuple[np.ndarray, np.ndarray]:
        """Ideal neighbour offsets [px] of a sublattice-0 column in the average lattice.

        Returns ``(opposite, same)``: the three bonds plus the three third-shell vectors
        (2b, opposite sublattice), and the six second-shell vectors (√3 b, same sublattice).
        For a sublattice-1 column negate both.
        """
        return _templates(self.bond_length_px, self.triad_angle_rad)


def _templates(b: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    ang = theta + np.arange(3) * 2.0 * np.pi / 3.0
    bonds = b * np.column_stack([np.cos(ang), np.sin(ang)])
    second = np.array([bonds[k] - bonds[m] for k in range(3) for m in range(3) if k != m])
    return np.concatenate([bonds, -2.0 * bonds]), second


def _smooth_field(points: np.ndarray, values: np.ndarray, cell: float, sigma_cells: float):
    """Gaussian-smoothed complex field of per-point values, sampled back at the points."""
    lo = points.min(axis=0) - 2 * cell
    idx = np.floor((points - lo) / cell).astype(np.int64)
    shape = (int(idx[:, 1].max()) + 3, int(idx[:, 0].max()) + 3)
    out = np.zeros(len(points), dtype=complex)
    for part, unit in ((values.real, 1.0), (values.imag, 1j)):
        grid = np.zeros(shape)
        np.add.at(grid, (idx[:, 1], idx[:, 0]), part)
        grid = ndimage.gaussian_filter(grid, sigma_cells, mode="constant")
        out += unit * grid[idx[:, 1], idx[:, 0]]
    return out


def _batched_affine(
    t: np.ndarray, d: np.ndarray, w: np.ndarray, prior: np.ndarray, strength: float
) -> np.ndarray:
    """Per-row least-squares ``M`` with ``d ≈ M t``, pulled towards ``prior``.

    The ridge term ``strength · |M − prior|²`` (``strength`` in px², i.e. a number of virtual
    neighbours times their squared length) keeps fits from two or three noisy offsets sane.
    The 2×2 normal equations are summed and solved per row in closed form (no einsum or
    batched inverse: this runs a dozen times per labelled image on every column).
    """
    tx, ty, dx, dy = t[..., 0], t[..., 1], d[..., 0], d[..., 1]
    wtx, wty = w * tx, w * ty
    # T = Σ w t tᵀ + s·I and D = Σ w d tᵀ + s·prior, per row
    a = (wtx * tx).sum(axis=1) + strength
    b = (wtx * ty).sum(axis=1)
    c = (wty * ty).sum(axis=1) + strength
    d00 = (wtx * dx).sum(axis=1) + strength * prior[0, 0]
    d01 = (wty * dx).sum(axis=1) + strength * prior[0, 1]
    d10 = (wtx * dy).sum(axis=1) + strength * prior[1, 0]
    d11 = (wty * dy).sum(axis=1) + strength * prior[1, 1]
    det = a * c - b * b  # > 0: the ridge makes T positive definite
    out = np.empty((len(a), 2, 2))
    # M = D T⁻¹ with T⁻¹ = [[c, −b], [−b, a]] / det
    out[:, 0, 0] = (d00 * c - d01 * b) / det
    out[:, 0, 1] = (d01 * a - d00 * b) / det
    out[:, 1, 0] = (d10 * c - d11 * b) / det
    out[:, 1, 1] = (d11 * a - d10 * b) / det
    return out


def _apply_maps(m: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x, y`` of ``M_n t`` for maps ``m`` [..., 2, 2] and offsets [T, 2]: [..., T] each."""
    ox, oy = offsets[:, 0], offsets[:, 1]
    mx = m[..., 0, 0, None] * ox + m[..., 0, 1, None] * oy
    my = m[..., 1, 0, None] * ox + m[..., 1, 1, None] * oy
    return mx, my


def assign_sublattices(
    positions,
    *,
    bond_length_px: float | None = None,
    bond_tolerance: float = 0.35,
    smoothing_bonds: float = 4.0,
    max_iter: int = 20,
    off_lattice: float = 0.5,
) -> SublatticeFit:
    """Split detected columns into the two sublattices of the 2H lattice by topology.

    1. Bonds: mutual three-nearest neighbours at ``(1 ± bond_tolerance) b`` (``b`` = median
       of the pooled three nearest-neighbour distances unless given).
    2. Triad field: per column ``z = Σ_bonds exp(3iφ)``; its direction, smoothed over
       ``smoothing_bonds`` bond lengths, is the local triad axis (this follows rotation and
       shear of drift-distorted images); the sign of ``z`` along the axis is the column's
       sublattice vote.
    3. Relaxation on the bond graph: every bond joins the two sublattices (the projected
       lattice graph is bipartite), so votes are iterated with an antiferromagnetic
       coupling to the neighbours until stable.
    4. Local affine fit: around each column, the offsets of neighbours up to the third shell
       (b, √3 b, 2b) are matched to the ideal offsets and a 2×2 map fitted by least squares,
       pulled towards the image-average map (drift and shear tolerated). Each column takes
       the sublattice under which clearly (≥ 20 % of neighbours) more of its neighbours sit
       where its local lattice puts them; columns without bonds are placed this way too.
    5. Columns farther than ``off_lattice·b`` from every site their neighbours' local maps
       predict (median over neighbours; an adatom in a hexagon's hollow is ``b`` away) are
       left ``UNASSIGNED``.

    Brightness is never used. Missing columns only remove bonds and neighbours. Both
    sublattice labels are topological: which one is metal is decided separately
    (:func:`decide_metal_sublattice`).

    Parameters
    ----------
    positions : array_like, shape (N, 2)
        Column positions ``(x, y)`` [px].
    bond_length_px : float, optional
        Projected metal–chalcogen distance ``a/√3`` [px].
    bond_tolerance : float
        Relative tolerance on bond lengths and on matches to the ideal lattice.
    smoothing_bonds : float
        Length scale of the triad-axis smoothing [bond lengths].
    max_iter : int
        Maximum relaxation / reassignment sweeps.
    off_lattice : float
        Distance from the predicted sites, in bond lengths, beyond which a column is not
        placed.

    Returns
    -------
    SublatticeFit
    """
    # Long on purpose: one iterative fit (bond length, local affine maps, triad spins,
    # frustration repair) whose steps share a dozen arrays; see the module docstring.
    pts = np.asarray(positions, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"positions: expected shape (N, 2) (x, y in px), got {pts.shape}")
    if len(pts) < 4:
        raise ValueError(f"positions: need at least 4 columns to fit a lattice, got {len(pts)}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("positions: contains NaN or infinite values")
    n = len(pts)
    tree = cKDTree(pts)
    if bond_length_px is None:
        # pooled three nearest distances: unbiased by position noise (the nearest alone is
        # biased short), and robust to missing columns (a few √3·b entries)
        d, _ = tree.query(pts, k=4)
        d = d[:, 1:][np.isfinite(d[:, 1:]) & (d[:, 1:] > 0)]
        b = float(np.median(d)) if len(d) else 0.0
        near = d[(d > 0.7 * b) & (d < 1.3 * b)]
        b = float(np.median(near)) if len(near) else b
    else:
        b = float(bond_length_px)
    if not b > 0:
        raise ValueError(f"bond_length_px: expected > 0 px, got {b}")

    pairs = tree.query_pairs((1.0 + bond_tolerance) * b, output_type="ndarray")
    vec = pts[pairs[:, 1]] - pts[pairs[:, 0]] if len(pairs) else np.zeros((0, 2))
    dist = np.hypot(vec[:, 0], vec[:, 1])
    # a bond joins mutual three-nearest neighbours at bonding distance: second-shell pairs
    # brought close by distortion or noise are not bonds while the true bonds exist
    _, knn = tree.query(pts, k=min(4, n))
    mutual = np.zeros(len(pairs), dtype=bool)
    if len(pairs):
        in_i = (knn[pairs[:, 0], 1:] == pairs[:, 1:2]).any(axis=1)
        in_j = (knn[pairs[:, 1], 1:] == pairs[:, 0:1]).any(axis=1)
        mutual = in_i & in_j
    keep = (dist >= (1.0 - bond_tolerance) * b) & mutual
    pairs, vec = pairs[keep], vec[keep]
    e3 = np.exp(3j * np.arctan2(vec[:, 1], vec[:, 0]))
    z = np.zeros(n, dtype=complex)
    np.add.at(z, pairs[:, 0], e3)
    np.add.at(z, pairs[:, 1], -e3)  # the reverse bond points the other way: 3(φ+π) ≡ 3φ+π
    n_bonds = np.bincount(pairs.ravel(), minlength=n)
    if len(pairs) < 3:
        raise ValueError("positions: too few columns at bonding distance to fit a 2H lattice")

    z2 = z * z
    global_axis = np.angle(z2.sum()) / 2.0
    local = _smooth_field(pts, z2, b, smoothing_bonds)
    axis = np.angle(local) / 2.0
    flip = np.cos(axis - global_axis) < 0
    axis[flip] += np.pi
    field = np.real(z * np.exp(-1j * axis)) / np.maximum(n_bonds, 1)

    # antiferromagnetic relaxation on the bond graph
    spin = np.sign(field)
    for _ in range(max_iter):
        neigh = np.bincount(pairs[:, 0], spin[pairs[:, 1]], n) + np.bincount(
            pairs[:, 1], spin[pairs[:, 0]], n
        )
        new = np.sign(field * np.maximum(n_bonds, 1) - neigh)
        new[n_bonds == 0] = 0.0
        if np.array_equal(new, spin):
            break
        spin = new

    theta = global_axis / 3.0
    opposite, same = _templates(b, theta)

    # global affine map: bonds seen from their sublattice-0 end matched to the ideal bonds
    affine_g = np.eye(2)
    s_i, s_j = spin[pairs[:, 0]], spin[pairs[:, 1]]
    good = (s_i != 0) & (s_j == -s_i)
    if np.count_nonzero(good) >= 3:
        d = vec[good] * s_i[good, None]
        k = np.argmin(np.linalg.norm(d[:, None, :] - opposite[None, :3, :], axis=2), axis=1)
        affine_g = np.linalg.lstsq(opposite[k], d, rcond=None)[0].T

    # self-consistency with the local lattice: each column takes the sublattice under which
    # more of its neighbours (to the third shell) sit where the local lattice puts them
    k_nb = min(17, n)
    dist, idx = tree.query(pts, k=k_nb, distance_upper_bound=(2.0 + bond_tolerance) * b)
    dist, idx = dist[:, 1:], idx[:, 1:]
    valid = np.isfinite(dist) & (idx < n)
    idx = np.where(valid, idx, 0)
    args = (pts, idx, valid, b, affine_g, opposite, same, bond_tolerance)
    # A column's fit depends only on its neighbours' sublattices, so after the first sweep
    # only the columns next to a change are refitted (the same numbers as refitting all).
    fits = {+1.0: _neighbour_fit(spin, np.ones(n), *args)}
    fits[-1.0] = _neighbour_fit(spin, -np.ones(n), *args)
    for _ in range(max_iter):
        pref = fits[+1.0][2] - fits[-1.0][2]
        new = spin.copy()
        decisive = (np.abs(pref) >= 0.2) & (fits[+1.0][3] >= 2)
        new[decisive] = np.sign(pref[decisive])
        if np.array_equal(new, spin):
            break
        refit = np.flatnonzero((valid & (new != spin)[idx]).any(axis=1))
        spin = new
        for hypothesis, fit in fits.items():
            part = _neighbour_fit(spin, np.full(len(refit), hypothesis), *args, rows=refit)
            for whole, values in zip(fit, part, strict=True):
                whole[refit] = values
    # each column's fit under its own sublattice (the fits hold the current spins)
    local_affine = np.where((spin > 0)[:, None, None], fits[+1.0][0], fits[-1.0][0])
    rms = np.where(spin > 0, fits[+1.0][1], fits[-1.0][1])
    unplaced = np.flatnonzero(spin == 0)
    if len(unplaced):
        part = _neighbour_fit(spin, spin[unplaced], *args, rows=unplaced)
        local_affine[unplaced], rms[unplaced] = part[0], part[1]
    residual = _site_residual(pts, idx, valid, spin, local_affine, opposite, same)
    spin[residual > off_lattice * b] = 0.0  # e.g. an adatom in a hexagon's hollow (at b)

    sublattice = np.where(spin > 0, 0, np.where(spin < 0, 1, UNASSIGNED)).astype(np.int8)
    confidence = np.where(sublattice == UNASSIGNED, 0.0, field * spin)
    s_i, s_j = spin[pairs[:, 0]], spin[pairs[:, 1]]
    both = (s_i != 0) & (s_j != 0)
    frustrated = float(np.mean(s_i[both] == s_j[both])) if np.any(both) else 0.0
    a_vectors = np.array([same[0], same[1]]) @ affine_g.T  # b0 − b1, b0 − b2: 60° apart
    return SublatticeFit(
        sublattice=sublattice,
        confidence=confidence,
        bond_length_px=b,
        lattice_vectors_px=a_vectors,
        local_affine=local_affine,
        fit_rms_px=rms,
        site_residual_px=residual,
        bonds=pairs,
        frustrated_fraction=frustrated,
        triad_angle_rad=float(theta),
    )


def _site_residual(pts, idx, valid, spin, affine, opposite, same) -> np.ndarray:
    """Distance [px] of each column from the nearest lattice site its neighbours predict.

    Every placed neighbour ``j`` predicts the sites around it from its own local map; the
    median over neighbours of the distance to the nearest predicted site is small for a
    column on the lattice (position noise) and about ``b`` for one in a hexagon's hollow.
    NaN when no neighbour is placed.
    """
    sign_j = spin[idx]
    v = valid & (sign_j != 0)
    sites = np.concatenate([opposite, same])  # offsets from a sublattice-0 column
    e = (pts[:, None, :] - pts[idx]) * np.where(sign_j == 0, 1.0, sign_j)[..., None]
    pred_x, pred_y = _apply_maps(affine[idx], sites)  # [n, k, t]
    dmin = np.sqrt(_offset_errors_xy(e, pred_x, pred_y, squared=True).min(axis=2))
    dmin = np.where(v, dmin, np.nan)
    out = np.full(len(pts), np.nan)
    has = v.any(axis=1)
    out[has] = np.nanmedian(dmin[has], axis=1)
    return out


def _neighbour_fit(spin, self_spin, pts, idx, valid, *rest, rows=None, chunk=8192):
    """:func:`_neighbour_fit_rows` over blocks of columns (bounded memory): of every column,
    or of the columns ``rows`` (``self_spin`` then holds their hypotheses)."""
    rows = np.arange(len(pts)) if rows is None else np.asarray(rows, dtype=np.intp)
    parts = [
        _neighbour_fit_rows(
            spin,
            self_spin[k : k + chunk],
            pts,
            pts[rows[k : k + chunk]],
            idx[rows[k : k + chunk]],
            valid[rows[k : k + chunk]],
            *rest,
        )  # fmt: skip
        for k in range(0, len(rows), chunk)
    ]
    if not parts:
        return (np.zeros((0, 2, 2)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def _offset_errors_xy(d, ideal_x, ideal_y, squared: bool = False):
    """``|d[..., k] − ideal[..., t]|`` for every neighbour k and ideal offset t: [..., k, t].

    ``ideal_x``, ``ideal_y``: [n, t] (one set per row) or [n, k, t] (one per neighbour).
    Sums the two squares in place (no [..., k, t, 2] temporaries); ``squared`` skips the
    square root."""
    if ideal_x.ndim == d.ndim - 1:
        ideal_x, ideal_y = ideal_x[:, None, :], ideal_y[:, None, :]
    dx = d[..., None, 0] - ideal_x
    dy = d[..., None, 1] - ideal_y
    dx *= dx
    dy *= dy
    dx += dy
    return dx if squared else np.sqrt(dx, out=dx)


def _neighbour_fit_rows(spin, self_spin, pts, own, idx, valid, b, affine_g, opposite, same, tol):
    """Local affine fit of each column's neighbours under a sublattice hypothesis.

    ``self_spin`` (±1, or 0 for none) is the hypothesis for each column, ``spin`` the current
    sublattice of its neighbours. Neighbour offsets (to the third shell) are matched to the
    ideal offsets for that hypothesis and a 2×2 map ``d ≈ M t`` fitted (twice, the second
    time matching with the first local map, which follows nonlinear drift).

    ``own`` are the positions of the columns fitted (rows of ``idx``), ``pts`` all positions.
    Returns ``(M [n, 2, 2], rms [n] px, fraction of neighbours fitted [n], n neighbours [n])``.
    """
    n = len(own)
    sign_i = np.where(self_spin == 0, 1.0, self_spin)[:, None]
    sign_j = spin[idx]
    v = valid & (sign_j != 0) & (self_spin[:, None] != 0)
    d = (pts[idx] - own[:, None, :]) * sign_i[..., None]
    is_same = (sign_j == sign_i)[..., None]
    near = np.hypot(d[..., 0], d[..., 1]) < (1.0 + tol) * b
    m_all = np.tile(affine_g, (n, 1, 1))
    same_nb = is_same[..., 0]
    for it in range(3):
        # each neighbour is matched to the ideal offsets of its own kind (same / opposite
        # sublattice; six of each), in squared distances
        (sx, sy), (ox, oy) = _apply_maps(m_all, same), _apply_maps(m_all, opposite)
        ideal_x = np.where(is_same, sx[:, None, :], ox[:, None, :])
        ideal_y = np.where(is_same, sy[:, None, :], oy[:, None, :])
        err2 = _offset_errors_xy(d, ideal_x, ideal_y, squared=True)
        k_best = err2.argmin(axis=2)
        err2 = np.take_along_axis(err2, k_best[..., None], axis=2)[..., 0]
        t = np.where(is_same, same[k_best], opposite[k_best])
        w = v & (err2 < (tol * b) ** 2)
        if it == 0:  # bonds first: short offsets are least sensitive to local distortion
            w &= near & ~same_nb
        m_all = _batched_affine(t, d, w.astype(float), affine_g, 2.0 * b * b)
    fx = m_all[:, None, 0, 0] * t[..., 0] + m_all[:, None, 0, 1] * t[..., 1]
    fy = m_all[:, None, 1, 0] * t[..., 0] + m_all[:, None, 1, 1] * t[..., 1]
    res = np.hypot(d[..., 0] - fx, d[..., 1] - fy)
    fitted = v & (res < tol * b)
    n_valid = v.sum(axis=1)
    n_fit = fitted.sum(axis=1)
    frac = n_fit / np.maximum(n_valid, 1)
    with np.errstate(invalid="ignore"):
        rms = np.where(
            n_fit > 0, np.sqrt((fitted * res**2).sum(axis=1) / np.maximum(n_fit, 1)), np.nan
        )
    return m_all, rms, frac, n_valid


# --------------------------------------------------------------------------------------------
# Which classes may sit on which site
# --------------------------------------------------------------------------------------------

#: Defect kinds of ``structures`` and the site they occur on.
DEFECT_SITES = {kind: DEFECT_SITE[kind] for kind in DEFECT_CLASSES}
#: Class names that only occur on metal (A) sites: the host metal, metal vacancies, metal-site
#: substitutions (antisites, dopants), the composition scheme's metals and ``other``
#: (dopants and antisites), and Lee et al.'s metal classes.
METAL_SITE_CLASSES = frozenset(
    {"metal", "other", "metal_vacancy", "metal_Doped"}
    | {kind for kind, site in DEFECT_SITES.items() if site == METAL}
)
#: Class names that only occur on chalcogen (B) sites.
CHALCOGEN_SITE_CLASSES = frozenset(
    {"chalcogen", "vac_X", "1Doped", "2Doped", "1vacancy", "2vacancy"}
    | {kind for kind, site in DEFECT_SITES.items() if site == CHALCOGEN}
)
BOTH_SITES = (METAL, CHALCOGEN)
_ELEMENT = re.compile(r"([A-Z][a-z]?)(\d*)")


def _composition_site(text: str) -> tuple[int, ...] | None:
    """Site of a composition string: only chalcogens -> chalcogen; any metal -> metal."""
    if text == "vac_M":
        return (METAL,)
    if text == "vac_X":
        return (CHALCOGEN,)
    parts = _ELEMENT.findall(text)
    if not parts or "".join(e + n for e, n in parts) != text:
        return None
    if any(e not in chemical_symbols for e, _ in parts):
        return None
    return (CHALCOGEN,) if all(e in CHALCOGENS for e, _ in parts) else (METAL,)


def scheme_names(scheme) -> tuple[str, ...]:
    """Class names by class id for any scheme description.

    Accepts a preset name (``"defects"``), a custom or serialised scheme mapping, a
    ``structures`` :class:`~structures.columns.LabelScheme`, a store's ``{"ids", "names"}``
    mapping, or any object with ``class_names`` (``training.stores.LabelScheme``) or
    ``names``.
    """
    if isinstance(scheme, Mapping) and "ids" in scheme and "names" in scheme and "by" not in scheme:
        ids, names = list(scheme["ids"]), list(scheme["names"])
        out = [f"unused_{i}" for i in range(max(ids) + 1)]
        out[0] = "background"
        for i, name in zip(ids, names, strict=True):
            out[int(i)] = str(name)
        return tuple(out)
    if isinstance(scheme, str | Mapping | LabelScheme):
        return tuple(get_scheme(scheme).class_names)
    if hasattr(scheme, "class_names"):
        return tuple(scheme.class_names)
    if hasattr(scheme, "names"):
        return tuple(scheme.names)
    raise ValueError(f"scheme: expected a preset name, a mapping or a label scheme, got {scheme!r}")


def allowed_sites(scheme) -> dict[str, tuple[int, ...]]:
    """Sites (``METAL``, ``CHALCOGEN``) on which each class of a scheme may occur.

    Rules, in order:

    1. ``background`` and ``unused_*`` classes: no site (never assigned to a column).
    2. Names in :data:`METAL_SITE_CLASSES` / :data:`CHALCOGEN_SITE_CLASSES` (the presets
       ``atoms``, ``defects``, Lee et al.'s names).
    3. Classes of a custom ``structures`` scheme: the sites of the keys mapped to them —
       defect kinds by :data:`DEFECT_SITES`; compositions made of chalcogens only on
       chalcogen sites, any other (with a metal or dopant) on metal sites. Keys of both
       kinds, or ``"none"``, allow both sites.
    4. Names that read as a composition (``"Mo"``, ``"S2"``, ``"SeTe"``, ``"Re"``): the same
       composition rule. In the ``composition`` preset this makes ``S``/``Se``/``Te`` and the
       chalcogen pairs chalcogen-site classes; an antisite (a chalcogen on a metal site),
       which that preset labels by its composition, is then forced to a metal-site class.
    5. Anything else: both sites (the constraint leaves the class free).

    Parameters
    ----------
    scheme : str, mapping or label scheme
        See :func:`scheme_names`.

    Returns
    -------
    dict
        Class name -> tuple of allowed sites.
    """
    names = scheme_names(scheme)
    keys_of: dict[int, list[str]] = {}
    by = None
    if isinstance(scheme, str | Mapping | LabelScheme) and not (
        isinstance(scheme, Mapping) and "by" not in scheme and "classes" not in scheme
    ):
        ls = get_scheme(scheme)
        by = ls.by
        for key, cid in ls.mapping.items():
            keys_of.setdefault(int(cid), []).append(str(key))
    out: dict[str, tuple[int, ...]] = {}
    for cid, name in enumerate(names):
        if cid == 0 or name == "background" or name.startswith("unused_"):
            out[name] = ()
        elif name in METAL_SITE_CLASSES:
            out[name] = (METAL,)
        elif name in CHALCOGEN_SITE_CLASSES:
            out[name] = (CHALCOGEN,)
        elif cid in keys_of and by in ("defect", "composition"):
            sites: set[int] = set()
            for key in keys_of[cid]:
                if by == "defect":
                    found = (DEFECT_SITES[key],) if key in DEFECT_SITES else BOTH_SITES
                else:
                    found = _composition_site(key) or BOTH_SITES
                sites.update(found)
            out[name] = tuple(sorted(sites))
        else:
            out[name] = _composition_site(name) or BOTH_SITES
    return out


def site_table(scheme) -> np.ndarray:
    """Boolean ``[2, K]`` table: ``table[site, class_id]`` is True where allowed."""
    names = scheme_names(scheme)
    allowed = allowed_sites(scheme)
    table = np.zeros((2, len(names)), dtype=bool)
    for cid, name in enumerate(names):
        for site in allowed[name]:
            table[site, cid] = True
    return table


def constrain_probabilities(probs, site, scheme) -> np.ndarray:
    """Class probabilities of columns restricted to the classes allowed on their site.

    Probabilities of background and of classes not allowed on the column's site are set to
    zero and the rest renormalised; a column with ``site == UNASSIGNED`` keeps every
    non-background class. A column whose allowed classes all have zero probability gets a
    uniform distribution over them.

    Parameters
    ----------
    probs : array_like, shape (N, K)
        Per-column class probabilities (class 0 background).
    site : array_like of int, shape (N,)
        ``METAL`` (0), ``CHALCOGEN`` (1) or ``UNASSIGNED`` (−1).
    scheme : str, mapping or label scheme

    Returns
    -------
    ndarray of float, shape (N, K)
    """
    p = np.asarray(probs, dtype=np.float64)
    s = np.asarray(site)
    if p.ndim != 2:
        raise ValueError(f"probs: expected shape (N, K), got {p.shape}")
    if s.shape != (len(p),):
        raise ValueError(f"site: expected shape ({len(p)},), got {s.shape}")
    table = site_table(scheme)
    if table.shape[1] != p.shape[1]:
        raise ValueError(
            f"probs: {p.shape[1]} classes but the scheme has {table.shape[1]} ({table.shape[1]} "
            "names)"
        )
    free = np.ones(p.shape[1], dtype=bool)
    free[0] = False
    allowed = np.where(
        (s == METAL)[:, None],
        table[METAL],
        np.where((s == CHALCOGEN)[:, None], table[CHALCOGEN], free),
    )
    q = np.where(allowed, np.clip(p, 0.0, None), 0.0)
    total = q.sum(axis=1, keepdims=True)
    uniform = allowed / np.maximum(allowed.sum(axis=1, keepdims=True), 1)
    return np.where(total > 0, q / np.where(total > 0, total, 1.0), uniform)


def apply_site_constraint(probs, site, scheme) -> np.ndarray:
    """Class of each column, chosen among the classes allowed on its site.

    The sublattice constraint of Allen et al.: metal-site classes only on metal (A) sites,
    chalcogen-site classes only on chalcogen (B) sites (:func:`allowed_sites`); background is
    never chosen. Ties go to the lowest class id (the host ``metal``/``chalcogen`` class in
    the presets).

    Parameters
    ----------
    probs : array_like, shape (N, K)
        Per-column class probabilities (or scores) from the network.
    site : array_like of int, shape (N,)
        ``METAL``, ``CHALCOGEN`` or ``UNASSIGNED`` (any non-background class allowed).
    scheme : str, mapping or label scheme

    Returns
    -------
    ndarray of int64, shape (N,)
        Class ids.
    """
    return np.argmax(constrain_probabilities(probs, site, scheme), axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Metal sublattice, empty sites and the whole fit
# --------------------------------------------------------------------------------------------


def column_intensities(image, positions, radius_px: float) -> np.ndarray:
    """Mean image intensity around each column (Gaussian-weighted, σ = ``radius_px``/2).

    Parameters
    ----------
    image : array_like, shape (H, W)
    positions : array_like, shape (N, 2)
        ``(x, y)`` [px].
    radius_px : float
        Radius of the sampled disc [px] (about a quarter of the bond length).
    """
    img = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), max(radius_px / 2, 0.5))
    pts = np.asarray(positions, dtype=np.float64)
    return ndimage.map_coordinates(img, [pts[:, 1], pts[:, 0]], order=1, mode="nearest")


def metal_is_brighter(material: str | None) -> bool:
    """Whether a metal column should look brighter than a chalcogen pair in HAADF.

    From the Z^1.7 rule: ``Z_M^1.7`` against ``2 Z_X^1.7``. True for MoS2, WS2, WSe2;
    False for MoSe2 (close: channelling brings the two near each other, so brightness is a
    weak guide there), MoTe2, WTe2. ``None`` (material unknown): True.
    """
    if material is None:
        return True
    metal, chalcogen = parse_material(material)
    z = {el: atomic_numbers[el] ** 1.7 for el in (metal, chalcogen)}
    return z[metal] > 2.0 * z[chalcogen]


def decide_metal_sublattice(
    sublattice,
    *,
    probs=None,
    scheme=None,
    intensities=None,
    material: str | None = None,
    metal_brighter: bool | None = None,
) -> tuple[int, str, float]:
    """Which topological sublattice (0 or 1) holds the metal.

    Rule (documented in ``docs/labelling.md``):

    * with class probabilities: for every column, ``(P_M − P_X) / (P_M + P_X)`` where
      ``P_M`` sums the probabilities of metal-site classes and ``P_X`` those of chalcogen-site
      classes (:func:`allowed_sites`); the sublattice with the larger mean is metal. The
      margin is half the difference of the two means (1: the network is certain).
    * else with column intensities: the sublattice with the larger median intensity is metal
      when ``metal_brighter`` (default :func:`metal_is_brighter` of ``material``), else the
      dimmer one. The margin is the relative difference of the medians.

    Parameters
    ----------
    sublattice : array_like of int, shape (N,)
        0, 1 or ``UNASSIGNED``.
    probs : array_like, shape (N, K), optional
    scheme : optional
        Needed with ``probs``.
    intensities : array_like, shape (N,), optional
    material : str, optional
    metal_brighter : bool, optional

    Returns
    -------
    metal_sublattice : int
    rule : {"probabilities", "intensity"}
    margin : float
    """
    sub = np.asarray(sublattice)
    has = [np.any(sub == k) for k in (0, 1)]
    if not any(has):
        raise ValueError("sublattice: no column is placed on the lattice")
    if probs is not None:
        if scheme is None:
            raise ValueError("scheme: needed to read class probabilities")
        p = np.asarray(probs, dtype=np.float64)
        table = site_table(scheme)
        metal_only = table[METAL] & ~table[CHALCOGEN]
        chalc_only = table[CHALCOGEN] & ~table[METAL]
        pm, px = p[:, metal_only].sum(axis=1), p[:, chalc_only].sum(axis=1)
        score = (pm - px) / np.maximum(pm + px, 1e-12)
        means = [float(np.mean(score[sub == k])) if has[k] else 0.0 for k in (0, 1)]
        metal = 0 if means[0] >= means[1] else 1
        return metal, "probabilities", abs(means[0] - means[1]) / 2.0
    if intensities is not None:
        inten = np.asarray(intensities, dtype=np.float64)
        med = [float(np.median(inten[sub == k])) if has[k] else np.nan for k in (0, 1)]
        if not all(has):
            brighter = 0 if has[0] else 1
            margin = 0.0
        else:
            brighter = 0 if med[0] >= med[1] else 1
            margin = abs(med[0] - med[1]) / max(abs(med[0]) + abs(med[1]), 1e-12) * 2.0
        if metal_brighter is None:
            metal_brighter = metal_is_brighter(material)
        return (brighter if metal_brighter else 1 - brighter), "intensity", margin
    raise ValueError("give probs (with scheme) or intensities to decide which sublattice is metal")


def find_empty_sites(
    positions,
    fit: SublatticeFit,
    *,
    image_shape: tuple[int, int] | None = None,
    mask=None,
    border_px: float | None = None,
    min_support: int = 2,
    match_radius: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice sites with no detected column (candidate vacancies).

    Every placed column predicts its three bonded neighbours and six second-shell
    neighbours from its local lattice map; a prediction with no detected column within
    ``match_radius·b`` is a candidate. Candidates within ``match_radius·b`` of each other are
    one site (mean position, majority sublattice); it is kept when at least ``min_support``
    columns predict it and it lies inside the image less ``border_px`` (default one bond
    length) and inside ``mask``.

    Parameters
    ----------
    positions : array_like, shape (N, 2)
        Detected columns ``(x, y)`` [px] (those given to :func:`assign_sublattices`).
    fit : SublatticeFit
    image_shape : (H, W), optional
        Without it the sites are bounded by the detected columns' bounding box.
    mask : array_like of bool, shape (H, W), optional
        Analysed region (e.g. excluding contamination).
    border_px : float, optional
    min_support : int
    match_radius : float
        In bond lengths.

    Returns
    -------
    xy : ndarray, shape (M, 2)
        Empty-site positions ``(x, y)`` [px].
    sublattice : ndarray of int8, shape (M,)
        Topological sublattice (0/1) of each site.
    support : ndarray of int, shape (M,)
        Number of columns predicting each site.
    """
    pts = np.asarray(positions, dtype=np.float64)
    b = fit.bond_length_px
    spin = np.where(fit.sublattice == 0, 1.0, np.where(fit.sublattice == 1, -1.0, 0.0))
    placed = np.flatnonzero(spin != 0)
    opposite, same = fit.templates()
    offsets = np.concatenate([opposite[:3], same])
    kind = np.array([1] * 3 + [0] * len(same))  # 1: other sublattice, 0: same sublattice
    empty = (np.zeros((0, 2)), np.zeros(0, dtype=np.int8), np.zeros(0, dtype=np.int64))
    if len(placed) == 0:
        return empty
    pred = pts[placed, None, :] + spin[placed, None, None] * np.einsum(
        "nij,tj->nti", fit.local_affine[placed], offsets
    )
    pred_sub = np.where(
        kind[None, :] == 1, 1 - fit.sublattice[placed, None], fit.sublattice[placed, None]
    )
    source = np.repeat(placed, len(offsets))
    pred, pred_sub = pred.reshape(-1, 2), pred_sub.ravel()
    dist, _ = cKDTree(pts).query(pred)
    cand = dist > match_radius * b
    pred, pred_sub, source = pred[cand], pred_sub[cand], source[cand]
    if len(pred) == 0:
        return empty
    pairs = cKDTree(pred).query_pairs(match_radius * b, output_type="ndarray")
    graph = coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(pred), len(pred))
    )
    n_comp, comp = connected_components(graph, directed=False)
    counts = np.bincount(comp, minlength=n_comp)
    xy = np.column_stack([np.bincount(comp, pred[:, k], n_comp) / counts for k in range(2)])
    votes = np.bincount(comp, pred_sub.astype(float), n_comp) / counts
    sub = (votes > 0.5).astype(np.int8)
    support = np.array([len(np.unique(source[comp == c])) for c in range(n_comp)], dtype=np.int64)
    if border_px is None:
        border_px = b
    if image_shape is not None:
        h, w = image_shape
        lo, hi = np.array([border_px, border_px]), np.array([w - 1 - border_px, h - 1 - border_px])
    else:
        lo, hi = pts.min(axis=0) + border_px, pts.max(axis=0) - border_px
    keep = (support >= min_support) & np.all((xy >= lo) & (xy <= hi), axis=1)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        r = np.clip(np.rint(xy[:, 1]).astype(int), 0, m.shape[0] - 1)
        c = np.clip(np.rint(xy[:, 0]).astype(int), 0, m.shape[1] - 1)
        keep &= m[r, c]
    return xy[keep], sub[keep], support[keep]


@dataclass(frozen=True)
class LatticeFit:
    """Detected columns placed on the 2H lattice, with the metal sublattice decided.

    Attributes
    ----------
    site : ndarray of int8, shape (N,)
        ``METAL`` (0), ``CHALCOGEN`` (1) or ``UNASSIGNED`` (−1) for each detected column.
    sublattices : SublatticeFit
        The topological fit (bond length, lattice vectors, local maps, confidences).
    metal_sublattice : int
        Which topological sublattice is metal.
    metal_rule : {"probabilities", "intensity"}
    metal_margin : float
        How clearly the rule decided (see :func:`decide_metal_sublattice`).
    empty_xy : ndarray, shape (M, 2)
        Lattice sites with no detected column ``(x, y)`` [px].
    empty_site : ndarray of int8, shape (M,)
        ``METAL`` or ``CHALCOGEN`` for each empty site.
    empty_support : ndarray of int, shape (M,)
        Number of columns predicting each empty site.
    """

    site: np.ndarray
    sublattices: SublatticeFit
    metal_sublattice: int
    metal_rule: str
    metal_margin: float
    empty_xy: np.ndarray
    empty_site: np.ndarray
    empty_support: np.ndarray

    @property
    def bond_length_px(self) -> float:
        """Projected metal–chalcogen distance ``a/√3`` [px]."""
        return self.sublattices.bond_length_px

    def summary(self) -> dict:
        """Plain numbers for a report."""
        return {
            "n_columns": int(len(self.site)),
            "n_metal": int(np.sum(self.site == METAL)),
            "n_chalcogen": int(np.sum(self.site == CHALCOGEN)),
            "n_unassigned": int(np.sum(self.site == UNASSIGNED)),
            "n_empty_metal": int(np.sum(self.empty_site == METAL)),
            "n_empty_chalcogen": int(np.sum(self.empty_site == CHALCOGEN)),
            "bond_length_px": float(self.bond_length_px),
            "frustrated_bond_fraction": float(self.sublattices.frustrated_fraction),
            "metal_rule": self.metal_rule,
            "metal_margin": float(self.metal_margin),
        }


def fit_lattice(
    positions,
    *,
    probs=None,
    scheme=None,
    intensities=None,
    image=None,
    material: str | None = None,
    metal_brighter: bool | None = None,
    image_shape: tuple[int, int] | None = None,
    mask=None,
    border_px: float | None = None,
    bond_length_px: float | None = None,
    min_support: int = 2,
) -> LatticeFit:
    """Place detected columns on the two sublattices of the 2H lattice and find empty sites.

    :func:`assign_sublattices` (topology, never brightness), then
    :func:`decide_metal_sublattice` (class probabilities when given, else intensities, read
    from ``image`` when not given), then :func:`find_empty_sites`.

    Parameters
    ----------
    positions : array_like, shape (N, 2)
        Detected columns ``(x, y)`` [px].
    probs : array_like, shape (N, K), optional
        Per-column class probabilities; with ``scheme``.
    scheme : optional
        Label scheme of ``probs``.
    intensities : array_like, shape (N,), optional
        Column intensities (used without ``probs``).
    image : array_like, shape (H, W), optional
        Read intensities from it when neither ``probs`` nor ``intensities`` is given; also
        gives ``image_shape``.
    material : str, optional
        E.g. ``"WSe2"``: which sublattice should be brighter (:func:`metal_is_brighter`).
    metal_brighter : bool, optional
        Override of the material's expectation.
    image_shape : (H, W), optional
        Bounds of the empty-site search.
    mask : array_like of bool, shape (H, W), optional
        Analysed region.
    border_px : float, optional
        Margin inside the image where no empty site is reported (default one bond).
    bond_length_px : float, optional
        Known ``a/√3`` [px]; estimated from the positions otherwise.
    min_support : int
        Columns that must predict an empty site.

    Returns
    -------
    LatticeFit
    """
    pts = np.asarray(positions, dtype=np.float64)
    sub_fit = assign_sublattices(pts, bond_length_px=bond_length_px)
    if image is not None:
        image = np.asarray(image)
        if image_shape is None:
            image_shape = image.shape[-2:]
    if probs is None and intensities is None:
        if image is None:
            raise ValueError(
                "give probs (with scheme), intensities or image to decide which sublattice is metal"
            )
        intensities = column_intensities(image, pts, 0.25 * sub_fit.bond_length_px)
    metal, rule, margin = decide_metal_sublattice(
        sub_fit.sublattice,
        probs=probs,
        scheme=scheme,
        intensities=intensities,
        material=material,
        metal_brighter=metal_brighter,
    )
    to_site = np.array([METAL, CHALCOGEN] if metal == 0 else [CHALCOGEN, METAL], dtype=np.int8)
    s = sub_fit.sublattice
    site = np.where(s == UNASSIGNED, UNASSIGNED, to_site[np.clip(s, 0, 1)]).astype(np.int8)
    xy, esub, support = find_empty_sites(
        pts,
        sub_fit,
        image_shape=image_shape,
        mask=mask,
        border_px=border_px,
        min_support=min_support,
    )
    return LatticeFit(
        site=site,
        sublattices=sub_fit,
        metal_sublattice=int(metal),
        metal_rule=rule,
        metal_margin=float(margin),
        empty_xy=xy,
        empty_site=to_site[esub] if len(esub) else np.zeros(0, dtype=np.int8),
        empty_support=support,
    )
