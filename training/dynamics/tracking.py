"""Columns of every frame of a stack placed on one set of lattice sites.

1. **Columns per frame**: local maxima of the background-subtracted, lightly smoothed frame
   with intensity-weighted sub-pixel centroids (:func:`find_columns`), or the columns a
   trained network found (:mod:`training.experiments.label`).
2. **Rigid drift** between consecutive frames: phase correlation of their central halves.
   On a periodic lattice the correlation has a peak at every lattice translation, so a
   first registration pass (3.) fixes each frame only up to a lattice translation
   ``n₁a₁ + n₂a₂`` (lattice vectors from the lattice fit of frame 0,
   :func:`simgen.experiment.lattice.assign_sublattices`). For each pair of frames the
   aperiodic part of the specimen (dopants, vacancies) gives the evidence for each
   translation, and the drift path through the whole stack is the one with the most
   evidence and a smooth stage drift (:func:`drift_path`, Viterbi), so one pair with a
   hopping dopant does not decide; a second pass registers the frames with it.
3. **Non-rigid** registration of each frame to the reference sites: the displacement
   ``frame(x, y) − reference(x, y)`` is a low-order polynomial (affine plus quadratic
   terms and a cubic term along the slow scan), fitted by least squares to the matched
   columns and refitted after re-matching with a tighter radius. Every frame is fitted
   against the same sites, so registration errors do not accumulate.
4. **Sites**: the columns of frame 0, then columns of later frames that match no site
   (columns entering the field, vacancies filled), then empty lattice sites the lattice fit
   predicts (:func:`simgen.experiment.lattice.find_empty_sites`). A site keeps its
   identity whether or not a column is seen on it in a frame.
5. **Linking**: in each frame the columns are assigned to the predicted site positions by
   minimum total distance (Hungarian, :func:`scipy.optimize.linear_sum_assignment`, on each
   group of competing candidates) within ``0.4 b``.

Positions are ``(x, y)`` in pixels (x = column, y = row); ``b`` = a/√3 is the projected
metal–chalcogen distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from structures import CHALCOGEN, METAL


class StackError(ValueError):
    """A stack that cannot be analysed; the message says why in one line."""


def find_columns(image, bond_px: float, *, rel_threshold: float = 0.08) -> np.ndarray:
    """Atomic columns of one frame by peak finding, ``(N, 2)`` as ``(x, y)`` [px].

    A difference of Gaussians (σ = 0.15 b minus σ = 0.4 b) turns the weak chalcogen columns
    on the tails of the bright metal columns into maxima of their own; its local maxima at
    least ``0.5 b`` apart above ``rel_threshold`` times the 95th percentile of the maxima are
    refined to the intensity-weighted centroid of a ``±0.3 b`` window.
    """
    from skimage.feature import peak_local_max

    img = np.asarray(image, dtype=np.float64)
    sm = ndimage.gaussian_filter(img, max(0.15 * bond_px, 0.5)) - ndimage.gaussian_filter(
        img, 0.4 * bond_px
    )
    pk = peak_local_max(sm, min_distance=max(1, int(0.5 * bond_px)), exclude_border=False)
    if len(pk) == 0:
        return np.zeros((0, 2))
    heights = sm[pk[:, 0], pk[:, 1]]
    keep = heights > rel_threshold * np.percentile(heights, 95)
    pk = pk[keep]
    r = max(1, int(round(0.3 * bond_px)))
    off = np.arange(-r, r + 1)
    h, w = sm.shape
    rr = np.clip(pk[:, 0, None, None] + off[None, :, None], 0, h - 1)
    cc = np.clip(pk[:, 1, None, None] + off[None, None, :], 0, w - 1)
    val = sm[rr, cc]
    val = np.clip(val - val.min(axis=(1, 2), keepdims=True), 0, None) + 1e-12
    y = (val * rr).sum(axis=(1, 2)) / val.sum(axis=(1, 2))
    x = (val * cc).sum(axis=(1, 2)) / val.sum(axis=(1, 2))
    return np.column_stack([x, y])


def disk_intensities(image, xy, radius_px: float) -> np.ndarray:
    """Mean of ``image`` in a disk of ``radius_px`` around each ``(x, y)`` (bilinear)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    r = max(radius_px, 0.5)
    n = max(2, int(math.ceil(r)))
    g = np.arange(-n, n + 1, dtype=np.float64)
    dx, dy = np.meshgrid(g, g)
    sel = dx**2 + dy**2 <= r * r
    dx, dy = dx[sel], dy[sel]
    rows = xy[:, 1, None] + dy[None]
    cols = xy[:, 0, None] + dx[None]
    vals = ndimage.map_coordinates(
        np.asarray(image, dtype=np.float64), [rows.ravel(), cols.ravel()], order=1, mode="nearest"
    )
    return vals.reshape(len(xy), -1).mean(axis=1)


# -- registration --------------------------------------------------------------------------
def _basis(xy, shape) -> np.ndarray:
    """Polynomial basis of the displacement field at ``xy`` (normalised coordinates)."""
    h, w = shape
    u = (xy[:, 0] - w / 2) / (w / 2)
    v = (xy[:, 1] - h / 2) / (h / 2)
    return np.column_stack([np.ones_like(u), u, v, u * v, u * u, v * v, v**3])


@dataclass(frozen=True)
class Registration:
    """Map from reference (frame 0) pixels to each frame's pixels.

    Attributes
    ----------
    coeffs : ndarray, shape (T, K, 2)
        Polynomial coefficients of the displacement ``frame − reference`` [px].
    shape : (int, int)
        Frame shape ``(H, W)``.
    rigid_px : ndarray, shape (T, 2)
        Rigid part: the displacement at the frame centre ``(dx, dy)`` [px].
    rms_px : ndarray, shape (T,)
        RMS residual of the matched columns after the fit [px].
    matched : ndarray, shape (T,)
        Fraction of the frame's columns matched to a site.
    """

    coeffs: np.ndarray
    shape: tuple
    rigid_px: np.ndarray
    rms_px: np.ndarray
    matched: np.ndarray

    def to_frame(self, frame: int, xy_ref) -> np.ndarray:
        xy_ref = np.asarray(xy_ref, dtype=np.float64).reshape(-1, 2)
        return xy_ref + _basis(xy_ref, self.shape) @ self.coeffs[frame]

    def to_reference(self, frame: int, xy) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        ref = xy.copy()
        for _ in range(4):  # fixed point: the displacement varies slowly
            ref = xy - _basis(ref, self.shape) @ self.coeffs[frame]
        return ref


def _prep(image, bond_px):
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    return (img - img.mean()) * np.outer(np.hanning(h), np.hanning(w))


def _defect_signal(values) -> np.ndarray:
    """Column intensities less the periodic part: robust z-scores within the two intensity
    groups (metal-like and chalcogen-like columns, split by Otsu's threshold), so that what
    is left is the aperiodic pattern (dopants, vacancies) and noise."""
    from skimage.filters import threshold_otsu

    v = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(v)
    if len(v) < 4 or np.ptp(v) == 0:
        return out
    thr = threshold_otsu(v)
    for sel in (v <= thr, v > thr):
        if sel.sum() < 2:
            continue
        med = np.median(v[sel])
        mad = 1.4826 * np.median(np.abs(v[sel] - med)) + 1e-12
        out[sel] = (v[sel] - med) / mad
    return out


def _subpixel(surface, iy, ix) -> np.ndarray:
    """Parabolic sub-pixel offset ``(dx, dy)`` of the peak at ``(iy, ix)``."""
    h, w = surface.shape
    c = surface[iy, ix]
    out = []
    for (ya, xa), (yb, xb) in (
        (((iy) % h, (ix - 1) % w), ((iy) % h, (ix + 1) % w)),
        (((iy - 1) % h, ix % w), ((iy + 1) % h, ix % w)),
    ):
        lo, hi = surface[ya, xa], surface[yb, xb]
        den = lo - 2 * c + hi
        out.append(0.5 * (lo - hi) / den if den < 0 else 0.0)
    return np.clip(np.array(out), -0.5, 0.5)


#: Width of the smooth-drift prior [lattice constants]: the change of the frame-to-frame
#: step between consecutive frames (a stage's random walk of ~0.3 Å per frame; a lattice
#: translation, 3.2 Å, costs ½·6² = 18 in log-likelihood per jump).
_DRIFT_SIGMA_A = 1.0 / 6.0

#: Cost [z-score units] of correcting one step of the registration by one lattice constant
#: (:func:`drift_path`): small beside what a real correction gains (smoothness 18–37, and
#: its evidence, 5–30), large beside noise (the best of ~18 wrong translations of one pair
#: scores ~2; a path off by a lattice vector in every one of ~50 steps pays 300).
_ANCHOR_WEIGHT = 6.0


def _correlation_peaks(prev, cur, bond_px, centre, radius, n_peaks=3) -> list:
    """The ``n_peaks`` highest peaks [px, (dx, dy)] of the phase correlation of the central
    halves of two frames (the per-frame scan shear would blur that of the whole frames)
    within ``radius`` of ``centre``, refined to sub-pixel. On a lattice there is a peak at
    every lattice translation of the step, and at low dose the peak of the
    metal-onto-chalcogen translation (one bond) may beat the true one: the registration
    tells them apart."""
    from skimage.feature import peak_local_max

    h, w = cur.shape
    r0, c0 = h // 4, w // 4
    crop = (slice(r0, h - r0), slice(c0, w - c0))
    fa = np.fft.fft2(_prep(prev[crop], bond_px))
    fb = np.fft.fft2(_prep(cur[crop], bond_px))
    cross = np.conj(fa) * fb
    surface = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-12)))
    hc, wc = surface.shape
    dy, dx = np.meshgrid(np.fft.fftfreq(hc) * hc, np.fft.fftfreq(wc) * wc, indexing="ij")
    near = (dx - centre[0]) ** 2 + (dy - centre[1]) ** 2 <= radius**2
    shifted = np.fft.fftshift(np.where(near, surface, surface.min()))
    peaks = peak_local_max(
        shifted, min_distance=max(1, int(0.5 * bond_px)), num_peaks=n_peaks,
        exclude_border=False,
    )  # fmt: skip
    out = []
    for py, px_ in peaks:
        iy, ix = (py - hc // 2) % hc, (px_ - wc // 2) % wc  # back from the shifted surface
        if near[iy, ix]:
            out.append(np.array([dx[iy, ix], dy[iy, ix]]) + _subpixel(surface, iy, ix))
    return out or [np.asarray(centre, dtype=np.float64)]


def _alias_evidence(prev, cur, xy_prev, xy_cur, shifts, bond_px) -> np.ndarray:
    """Evidence for each lattice translation ``shifts`` (K, 2) [px] added to a frame's
    registration: the agreement of the aperiodic site intensities (dopants, vacancies) of
    the frame and the previous one, as the mean product of their defect signals times √N
    (~N(0, 1) for a wrong translation). ``xy_prev``, ``xy_cur``: the same sites as
    registered in the two frames."""
    shape = cur.shape
    radius = 0.3 * bond_px
    z = np.full(len(shifts), -np.inf)
    base = _in_view(xy_prev, shape, 2 * bond_px)
    if base.sum() < 20:
        return np.zeros(len(shifts))
    i_prev = disk_intensities(prev, xy_prev[base], radius)
    for k, shift in enumerate(shifts):
        moved = xy_cur[base] + shift
        ok = _in_view(moved, shape, 1.0)
        if ok.sum() < 20:
            continue
        a = _defect_signal(i_prev[ok])
        b = _defect_signal(disk_intensities(cur, moved[ok], radius))
        z[k] = float(np.mean(a * b)) * math.sqrt(ok.sum())
    return z


def drift_path(candidates, a_len_px: float, anchor=None) -> np.ndarray:
    """The most likely sequence of frame-to-frame steps, ``(T − 1, 2)`` [px].

    ``candidates`` holds per pair of frames ``(steps, z)``: candidate steps and the
    evidence for each (:func:`_alias_evidence`). A lattice translation matches the columns
    of two frames as well as the true step, and a dopant hopping to a neighbouring site
    looks like one. The path maximises the summed evidence less the smooth-drift penalty
    ``|s_f − s_{f−1}|² / 2σ²`` (σ = a/6) by dynamic programming (Viterbi): a step that
    differs from the steps before *and after* it by a lattice vector costs 2 × 18, so one
    pair's spurious evidence does not decide, and the first step is judged by the second.

    A path off by the same lattice vector in every step is as smooth as the truth and
    collects only noise; ``anchor`` (``(T − 1, 2)`` [px], the steps the registration found)
    breaks that tie: every candidate pays ``_ANCHOR_WEIGHT · |s − anchor|² / a²``, so a
    correction is made only where evidence and smoothness call for it."""
    if not candidates:
        return np.zeros((0, 2))
    sigma = _DRIFT_SIGMA_A * a_len_px

    def _evidence(f):
        steps, z = candidates[f]
        z = np.asarray(z, dtype=np.float64)
        if not np.isfinite(z).any():  # a pair with no usable candidate says nothing
            z = np.zeros_like(z)
        if anchor is not None:
            z = z - _ANCHOR_WEIGHT * ((steps - anchor[f]) ** 2).sum(-1) / a_len_px**2
        return z

    score = _evidence(0)
    back = []
    for f in range(1, len(candidates)):
        steps, prev_steps = candidates[f][0], candidates[f - 1][0]
        d2 = ((steps[:, None, :] - prev_steps[None, :, :]) ** 2).sum(-1)
        total = score[None, :] - 0.5 * d2 / sigma**2
        arg = np.argmax(total, axis=1)
        back.append(arg)
        score = total[np.arange(len(steps)), arg] + _evidence(f)
    idx = [int(np.argmax(score))]
    for arg in reversed(back):
        idx.append(int(arg[idx[-1]]))
    idx.reverse()
    return np.array([candidates[f][0][i] for f, i in enumerate(idx)])


def match_points(a, b, tol):
    """Pairs ``(i, j)`` of points ``a[i]``, ``b[j]`` closer than ``tol``, one-to-one with
    the smallest total distance (Hungarian on each connected group of candidates)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    # mutual nearest neighbours within tol are taken as they are (nothing competes), the
    # Hungarian decides among the rest
    d_ab, j_ab = cKDTree(b).query(a, distance_upper_bound=tol)
    d_ba, i_ba = cKDTree(a).query(b, distance_upper_bound=tol)
    ok = np.isfinite(d_ab)
    mutual = np.zeros(len(a), bool)
    mutual[ok] = i_ba[j_ab[ok]] == np.flatnonzero(ok)
    mi = np.flatnonzero(mutual)
    mj = j_ab[mi]
    rest_a = np.setdiff1d(np.arange(len(a)), mi)
    rest_b = np.setdiff1d(np.arange(len(b)), mj)
    ri, rj = _hungarian(a[rest_a], b[rest_b], tol)
    return np.r_[mi, rest_a[ri]].astype(np.int64), np.r_[mj, rest_b[rj]].astype(np.int64)


def _hungarian(a, b, tol):
    """Minimum-total-distance one-to-one pairs within ``tol``, per connected group."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    tree = cKDTree(b)
    lists = tree.query_ball_point(a, r=tol)
    ii = np.repeat(np.arange(len(a)), [len(v) for v in lists])
    jj = np.fromiter((j for v in lists for j in v), dtype=np.int64, count=len(ii))
    if len(ii) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    d = np.linalg.norm(a[ii] - b[jj], axis=1)
    na = len(a)
    graph = coo_matrix((np.ones(len(ii)), (ii, jj + na)), shape=(na + len(b), na + len(b)))
    _, comp = connected_components(graph, directed=False)
    ci = comp[ii]
    order = np.argsort(ci, kind="stable")
    ii, jj, d, ci = ii[order], jj[order], d[order], ci[order]
    starts = np.flatnonzero(np.r_[True, ci[1:] != ci[:-1]])
    ends = np.r_[starts[1:], len(ci)]
    single = ends - starts == 1  # one candidate pair: nothing to decide
    out_i, out_j = list(ii[starts[single]]), list(jj[starts[single]])
    for s, e in zip(starts[~single], ends[~single], strict=True):
        ua, ia = np.unique(ii[s:e], return_inverse=True)
        ub, ib = np.unique(jj[s:e], return_inverse=True)
        cost = np.full((len(ua), len(ub)), 1e6)
        cost[ia, ib] = d[s:e]
        r, c = linear_sum_assignment(cost)
        good = cost[r, c] < 1e5
        out_i.extend(ua[r[good]])
        out_j.extend(ub[c[good]])
    return np.asarray(out_i, dtype=np.int64), np.asarray(out_j, dtype=np.int64)


#: (half-extent of the fitted region in normalised coordinates, polynomial terms, match
#: radius in bond lengths) of the successive fits of a frame's registration
_SCHEDULE = (
    (0.35, 1, 0.5),
    (0.35, 3, 0.4),
    (0.7, 3, 0.4),
    (0.7, 6, 0.4),
    (1.0, 7, 0.35),
    (1.0, 7, 0.3),
)


#: Offsets [bond lengths] tried around the coarse step when its registration fails.
_SEARCH = tuple(
    (r * math.cos(k * math.pi / 4), r * math.sin(k * math.pi / 4))
    for r in (0.5, 1.0)
    for k in range(8)
)


def _register_frame(site_xy, cur, start, shape, bond):
    """Coarse-to-fine fit of one frame from ``start`` coefficients: ``(coeffs, rms,
    matched fraction, indices of the matched columns)``."""
    reg = Registration(start[None], shape, np.zeros((1, 2)), np.zeros(1), np.ones(1))
    coeffs, rms = start, np.inf
    j = np.zeros(0, dtype=np.int64)
    for extent, n_terms, tol in _SCHEDULE:
        pred = reg.to_frame(0, site_xy)
        i, j = match_points(pred, cur, tol * bond)
        central = _central(cur[j], shape, extent)
        i, j = i[central], j[central]
        try:
            coeffs, rms = _fit(site_xy[i], cur[j], shape, n_terms)
        except StackError:
            return start, np.inf, 0.0, np.zeros(0, dtype=np.int64)
        reg.coeffs[0] = coeffs
    return coeffs, rms, len(j) / max(len(cur), 1), j


def _register_sequence(columns, highpass, shape, bond, a_len, *, starts=None, offsets=None,
                       progress=None):  # fmt: skip
    """Register every frame to the sites of the frames before it: ``(coeffs, rms,
    matched, sites)`` (sites: a list of ``(N, 2)`` reference positions, frame 0's columns
    first, then the columns of each frame that matched no site).

    Without ``starts`` a frame starts from the previous frame's registration plus a
    phase-correlation step: the three highest peaks within 0.4 a of the previous step
    (0.6 a of zero for the first) are tried and the best registration (matched fraction,
    then residual) wins; if none registers, offsets of 0.5 and 1 bond around the highest
    peak. With ``starts`` (``(T, K, 2)`` coefficients) and ``offsets`` (``(T, 2)`` [px]
    added to their constant terms) a frame starts from those. ``progress(f)`` is called
    after each frame.

    Raises
    ------
    StackError
        A frame that cannot be registered.
    """
    t_count = len(columns)
    k = _basis(np.zeros((1, 2)), shape).shape[1]
    coeffs = np.zeros((t_count, k, 2))
    rms = np.zeros(t_count)
    matched = np.ones(t_count)
    sites = [np.asarray(columns[0], dtype=np.float64)]
    reg = Registration(coeffs, shape, np.zeros((t_count, 2)), rms, matched)
    if starts is not None:
        coeffs[0] = starts[0]
        coeffs[0, 0] += offsets[0]
    for f in range(1, t_count):
        site_xy = np.concatenate(sites)
        cur = np.asarray(columns[f], dtype=np.float64)
        if starts is None:
            # near the previous step (a stage drifts smoothly; any lattice translation of
            # it is as good here), or anywhere in the Voronoi cell of zero for the first
            prior = coeffs[f - 1, 0] - coeffs[f - 2, 0] if f >= 2 else np.zeros(2)
            radius = (0.4 if f >= 2 else 0.6) * a_len
            trials = []
            for step in _correlation_peaks(highpass(f - 1), highpass(f), bond, prior, radius):
                start = coeffs[f - 1].copy()
                start[0] += step
                trials.append(start)
        else:
            start = starts[f].copy()
            start[0] += offsets[f]
            trials = [start]
        best = None
        for start in trials:
            got = _register_frame(site_xy, cur, start, shape, bond)
            if best is None or (got[2], -got[1]) > (best[2], -best[1]):
                best = got
        if best[2] < 0.5 or best[1] > 0.3 * bond:
            # the coarse step was off by more than the first match radius (a frame whose
            # scan distortion differs much from its neighbour's): search around it
            for ox, oy in _SEARCH:
                trial = trials[0].copy()
                trial[0] += np.array([ox, oy]) * bond
                got = _register_frame(site_xy, cur, trial, shape, bond)
                if got[2] > best[2]:
                    best = got
        coeffs[f], rms[f], matched[f], j = best
        if matched[f] < 0.5 or rms[f] > 0.3 * bond:
            raise StackError(
                f"frame {f} cannot be registered to frame {f - 1} ({matched[f]:.0%} of its "
                f"columns matched, residual {rms[f]:.2f} px)"
            )
        free = np.ones(len(cur), bool)
        free[j] = False
        new = cur[free & _in_view(cur, shape, bond)]
        if len(new):
            sites.append(reg.to_reference(f, new))
        if progress is not None:
            progress(f)
    return coeffs, rms, matched, sites


def _central(xy, shape, extent):
    h, w = shape
    u = np.abs(xy[:, 0] - w / 2) / (w / 2)
    v = np.abs(xy[:, 1] - h / 2) / (h / 2)
    return (u <= extent) & (v <= extent)


def _fit(ref_xy, frame_xy, shape, n_terms=None):
    basis = _basis(ref_xy, shape)
    k = basis.shape[1]
    n_terms = k if n_terms is None else n_terms
    if len(ref_xy) < 3 * n_terms + 3:
        raise StackError(f"only {len(ref_xy)} columns matched: too few to register the frame")
    part, *_ = np.linalg.lstsq(basis[:, :n_terms], frame_xy - ref_xy, rcond=None)
    coeffs = np.zeros((k, 2))
    coeffs[:n_terms] = part
    resid = frame_xy - ref_xy - basis @ coeffs
    return coeffs, float(np.sqrt(np.mean(np.sum(resid**2, axis=1))))


def _in_view(xy, shape, border):
    h, w = shape
    return (
        (xy[:, 0] >= border)
        & (xy[:, 0] <= w - 1 - border)
        & (xy[:, 1] >= border)
        & (xy[:, 1] <= h - 1 - border)
    )


@dataclass(frozen=True)
class Tracks:
    """Sites of a stack and where each is in every frame.

    Attributes
    ----------
    sites_xy : ndarray, shape (S, 2)
        Site positions in reference (frame 0) pixels.
    sublattice : ndarray of int8, shape (S,)
        ``METAL``, ``CHALCOGEN`` or −1 (not placed).
    xy : ndarray, shape (T, S, 2)
        Position of each site in each frame [px] (the linked column where one was seen,
        else the registered site position).
    observed : ndarray of bool, shape (T, S)
        A column was linked to the site in the frame.
    in_view : ndarray of bool, shape (T, S)
        The site lies in the frame (more than one bond from the edge).
    registration : Registration
    bond_px : float
    lattice_vectors_px : ndarray, shape (2, 2)
    """

    sites_xy: np.ndarray
    sublattice: np.ndarray
    xy: np.ndarray
    observed: np.ndarray
    in_view: np.ndarray
    registration: Registration
    bond_px: float
    lattice_vectors_px: np.ndarray


def track_stack(frames, bond_px: float, *, columns=None, progress=None) -> Tracks:
    """Register the frames and link their columns onto one set of lattice sites.

    Parameters
    ----------
    frames : ndarray, shape (T, H, W)
    bond_px : float
        Expected projected metal–chalcogen distance ``a/√3`` [px].
    columns : list of ndarray, optional
        Columns ``(x, y)`` of each frame (e.g. from a network); found by
        :func:`find_columns` when not given.
    progress : callable, optional
        Called with the frame index after each frame is registered.

    Raises
    ------
    StackError
        No lattice in frame 0, or a frame that cannot be registered.
    """
    from simgen.experiment.lattice import assign_sublattices, fit_lattice

    frames = np.asarray(frames, dtype=np.float32)
    highpass: dict = {}

    def _hp(f):
        """Frame ``f`` less a wide blur (σ = 2 b): smooth contamination and gain changes
        would otherwise correlate under any small translation."""
        if f not in highpass:
            if len(highpass) > 2:
                highpass.clear()
            img = frames[f].astype(np.float64)
            highpass[f] = img - ndimage.gaussian_filter(img, 2.0 * bond_px)
        return highpass[f]

    t_count, h, w = frames.shape
    shape = (h, w)
    if columns is None:
        columns = [find_columns(f, bond_px) for f in frames]
    cols0 = columns[0]
    try:
        fit0 = assign_sublattices(cols0, bond_length_px=bond_px)
    except ValueError as err:
        raise StackError(f"frame 0: no lattice found ({err})") from None
    placed = fit0.sublattice >= 0
    if placed.mean() < 0.6 or fit0.frustrated_fraction > 0.25:
        raise StackError(
            f"frame 0: no 2H lattice found ({placed.mean():.0%} of {len(cols0)} columns placed, "
            f"{fit0.frustrated_fraction:.0%} frustrated bonds)"
        )
    bond = float(fit0.bond_length_px)
    a_vec = np.asarray(fit0.lattice_vectors_px, dtype=np.float64)
    a_len = float(np.linalg.norm(a_vec[0]))
    # lattice translations up to two lattice constants, the shortest (zero) first
    n_range = np.arange(-2, 3)
    shifts = (n_range[:, None, None] * a_vec[0] + n_range[None, :, None] * a_vec[1]).reshape(-1, 2)
    longest = max(float(np.linalg.norm(v)) for v in a_vec)
    shifts = shifts[np.linalg.norm(shifts, axis=1) <= 2.05 * longest]
    shifts = shifts[np.argsort(np.linalg.norm(shifts, axis=1), kind="stable")]
    # pass 1: each frame registered to the sites so far, from the phase-correlation step;
    # this fixes every frame up to a lattice translation (which matches the columns as well
    # as the truth)
    first = _register_sequence(columns, _hp, shape, bond, a_len, progress=progress)
    reg1 = Registration(first[0], shape, np.zeros((t_count, 2)), first[1], first[2])
    site_xy = np.concatenate(first[3])
    # the translations: for every pair of frames the evidence of the sites' aperiodic
    # intensities for each, then the path with the most evidence and a smooth stage drift
    # (one pair alone is fooled by a dopant hopping to the next site, which looks like one)
    candidates = []
    for f in range(1, t_count):
        xy_prev, xy_cur = reg1.to_frame(f - 1, site_xy), reg1.to_frame(f, site_xy)
        z = _alias_evidence(_hp(f - 1), _hp(f), xy_prev, xy_cur, shifts, bond)
        step = first[0][f, 0] - first[0][f - 1, 0]
        candidates.append((step + shifts, z))
    anchor = first[0][1:, 0] - first[0][:-1, 0]
    path = drift_path(candidates, a_len, anchor=anchor)
    offsets = np.zeros((t_count, 2))
    for f in range(1, t_count):
        step = first[0][f, 0] - first[0][f - 1, 0]
        offsets[f] = offsets[f - 1] + (path[f - 1] - step)
    # pass 2: the registration with those translations, and the sites it finds
    coeffs, rms, matched, sites = _register_sequence(
        columns, _hp, shape, bond, a_len, starts=first[0], offsets=offsets
    )
    reg = Registration(coeffs, shape, np.zeros((t_count, 2)), rms, matched)
    site_xy = np.concatenate(sites)
    site_xy = _merge_close(site_xy, 0.4 * bond)
    # empty lattice sites predicted by the lattice fit of the site set
    fit = fit_lattice(site_xy, intensities=np.ones(len(site_xy)), metal_brighter=True)
    if len(fit.empty_xy):
        site_xy = _merge_close(np.concatenate([site_xy, fit.empty_xy]), 0.4 * bond)
    xy = np.zeros((t_count, len(site_xy), 2))
    observed = np.zeros((t_count, len(site_xy)), bool)
    in_view = np.zeros((t_count, len(site_xy)), bool)
    for f in range(t_count):
        pred = reg.to_frame(f, site_xy)
        i, j = match_points(pred, np.asarray(columns[f], dtype=np.float64), 0.4 * bond)
        xy[f] = pred
        xy[f, i] = np.asarray(columns[f])[j]
        observed[f, i] = True
        in_view[f] = _in_view(pred, shape, bond)
    # drop sites never linked that the lattice does not support (noise peaks)
    keep = observed.sum(axis=0) >= min(2, t_count)
    keep |= _supported(site_xy, site_xy[keep], bond)
    sub = _sublattices(site_xy[keep], bond, frames, xy[:, keep], in_view[:, keep])
    rigid = np.array(
        [reg.to_frame(f, [[w / 2, h / 2]])[0] - [w / 2, h / 2] for f in range(t_count)]
    )
    registration = Registration(coeffs, shape, rigid, rms, matched)
    return Tracks(
        sites_xy=site_xy[keep],
        sublattice=sub,
        xy=xy[:, keep],
        observed=observed[:, keep],
        in_view=in_view[:, keep],
        registration=registration,
        bond_px=bond,
        lattice_vectors_px=a_vec,
    )


def _merge_close(xy, tol):
    """Points closer than ``tol`` merged into their mean (first occurrences kept first)."""
    tree = cKDTree(xy)
    pairs = tree.query_pairs(tol, output_type="ndarray")
    if len(pairs) == 0:
        return xy
    n = len(xy)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    counts = np.bincount(comp)
    mx = np.bincount(comp, weights=xy[:, 0]) / counts
    my = np.bincount(comp, weights=xy[:, 1]) / counts
    first = np.unique(comp, return_index=True)[1]
    order = np.argsort(first)
    return np.column_stack([mx, my])[order]


def _supported(xy, good_xy, bond):
    """Points with at least two well-observed sites at a bond length."""
    tree = cKDTree(good_xy)
    near = tree.query_ball_point(xy, r=1.25 * bond)
    far = tree.query_ball_point(xy, r=0.75 * bond)
    return np.array([len(a) - len(b) >= 2 for a, b in zip(near, far, strict=True)])


def _sublattices(site_xy, bond, frames, xy, in_view):
    """Metal or chalcogen per site: topology of the site set, the brighter sublattice metal
    (the mean intensity over the frames)."""
    from simgen.experiment.lattice import fit_lattice

    inten = np.zeros(len(site_xy))
    n = np.zeros(len(site_xy))
    for f in range(len(frames)):
        v = in_view[f]
        inten[v] += disk_intensities(frames[f], xy[f, v], 0.3 * bond)
        n[v] += 1
    inten = inten / np.maximum(n, 1)
    fit = fit_lattice(site_xy, intensities=inten, metal_brighter=True, bond_length_px=bond)
    sub = fit.site.astype(np.int8)
    assert METAL == 0 and CHALCOGEN == 1
    return sub
