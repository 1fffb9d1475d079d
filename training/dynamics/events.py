"""Per-site intensity time series, their discrete states and the events between frames.

1. **Intensity** of a site in a frame: mean of the background-subtracted frame (a wide
   Gaussian, σ = 3 b, removed) in a disk of 0.3 b at the site's position, divided by the
   frame's median metal-site intensity (probe current and gain change between frames).
2. **Levels**: a one-dimensional Gaussian mixture per sublattice (EM, one shared σ), with
   components started at 0, ½ and 1 of the sublattice's median for chalcogen columns
   (empty, one atom, two atoms) and at 0, 1 and 2.5 for metal columns (empty, host, a
   heavier dopant such as Re in MoS2). Components that end with no weight are dropped.
3. **States over time**: the most likely state sequence of each site (Viterbi) under that
   mixture and a probability ``switch`` of changing state between two frames: a change
   needs evidence from several frames or one strong step, so noise does not flicker.
4. **Events**: on chalcogen sites a state going down is a vacancy appearing, going up a
   vacancy disappearing; a site going down and a neighbouring chalcogen site (one lattice
   constant away) going up in the same frame is one ``vacancy_hop`` (the vacancy moved from
   the site that gained an atom to the one that lost it). On metal sites a heavier-than-host
   state moving to a neighbouring metal site is a ``dopant_hop``, a site going empty a
   ``metal_vacancy``. A change left unpaired is reported only where the site and all six of
   its neighbours are in view in both frames (:func:`interior`): at the edge of the field it
   may be half of a hop whose other half is outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from structures import CHALCOGEN, METAL
from training.dynamics.tracking import disk_intensities


def site_intensities(frames, tracks, *, progress=None) -> np.ndarray:
    """Normalised intensity of every site in every frame, ``(T, S)`` (NaN out of view)."""
    t_count = len(frames)
    out = np.full((t_count, len(tracks.sites_xy)), np.nan)
    bond = tracks.bond_px
    metal = tracks.sublattice == METAL
    for f in range(t_count):
        img = np.asarray(frames[f], dtype=np.float64)
        img = img - ndimage.gaussian_filter(img, 3.0 * bond)
        v = tracks.in_view[f]
        out[f, v] = disk_intensities(img, tracks.xy[f, v], 0.3 * bond)
        ref = out[f, v & metal]
        scale = np.median(ref) if len(ref) else np.nanmedian(np.abs(out[f]))
        out[f] /= scale if scale > 0 else 1.0
        if progress is not None:
            progress(f)
    return out


@dataclass(frozen=True)
class Levels:
    """A 1-D Gaussian mixture: ``means`` (ascending), ``weights``, one ``sigma``."""

    means: np.ndarray
    weights: np.ndarray
    sigma: float

    def log_likelihood(self, x) -> np.ndarray:
        """``(..., K)`` log N(x; μ_k, σ²) + log w_k."""
        x = np.asarray(x, dtype=np.float64)[..., None]
        return (
            -0.5 * ((x - self.means) / self.sigma) ** 2
            - np.log(self.sigma * np.sqrt(2 * np.pi))
            + np.log(self.weights)
        )


def fit_levels(values, init, *, iterations: int = 60, min_weight: float = 2e-4) -> Levels:
    """EM for a 1-D Gaussian mixture with one shared σ, started at ``init`` means."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    means = np.asarray(init, dtype=np.float64).copy()
    weights = np.full(len(means), 1.0 / len(means))
    med = np.median(x)
    sigma = 1.4826 * np.median(np.abs(x - med)) + 1e-6
    for _ in range(iterations):
        ll = -0.5 * ((x[:, None] - means) / sigma) ** 2 + np.log(weights)
        ll -= ll.max(axis=1, keepdims=True)
        r = np.exp(ll)
        r /= r.sum(axis=1, keepdims=True)
        nk = r.sum(axis=0)
        keep = nk / len(x) > min_weight
        if not keep.all():
            means, weights, r, nk = means[keep], weights[keep], r[:, keep], nk[keep]
        means = (r * x[:, None]).sum(axis=0) / nk
        weights = nk / nk.sum()
        sigma = float(np.sqrt((r * (x[:, None] - means) ** 2).sum() / len(x))) + 1e-6
    order = np.argsort(means)
    return Levels(means[order], weights[order], sigma)


def viterbi(series, levels: Levels, *, switch: float = 1e-3) -> np.ndarray:
    """Most likely state of each site in each frame, ``(T, S)`` int (−1 out of view).

    ``series`` is ``(T, S)`` with NaN where the site is out of view (no evidence)."""
    x = np.asarray(series, dtype=np.float64)
    t_count, n = x.shape
    k = len(levels.means)
    emit = levels.log_likelihood(np.nan_to_num(x))
    emit[~np.isfinite(x)] = 0.0
    log_stay = np.log1p(-switch)
    log_move = np.log(switch / max(k - 1, 1))
    trans = np.full((k, k), log_move)
    np.fill_diagonal(trans, log_stay)
    score = emit[0] + np.log(levels.weights)
    back = np.zeros((t_count, n, k), dtype=np.int8)
    for t in range(1, t_count):
        cand = score[:, :, None] + trans[None]  # (n, from, to)
        back[t] = np.argmax(cand, axis=1)
        score = np.max(cand, axis=1) + emit[t]
    states = np.zeros((t_count, n), dtype=np.int64)
    states[-1] = np.argmax(score, axis=1)
    for t in range(t_count - 1, 0, -1):
        states[t - 1] = back[t, np.arange(n), states[t]]
    states[~np.isfinite(x)] = -1
    return states


@dataclass(frozen=True)
class SiteStates:
    """States of every site over the frames.

    Attributes
    ----------
    state : ndarray of int, shape (T, S)
        Index into the sublattice's levels (−1 out of view or unplaced).
    label : ndarray of str, shape (T, S)
        ``X2``, ``X1``, ``empty_X`` (chalcogen) or ``M``, ``heavy_M``, ``light_M``,
        ``empty_M`` (metal), ``""`` where unknown.
    levels : dict
        ``"metal"`` and ``"chalcogen"`` :class:`Levels`.
    """

    state: np.ndarray
    label: np.ndarray
    levels: dict


def _labels(levels: Levels, full: str, names_below: tuple, names_above: tuple) -> list:
    """Name each level: the most populated is the host ``full``; below/above by order."""
    host = int(np.argmax(levels.weights))
    out = []
    for k in range(len(levels.means)):
        if k == host:
            out.append(full)
        elif k < host:
            out.append(names_below[min(host - k - 1, len(names_below) - 1)])
        else:
            out.append(names_above[min(k - host - 1, len(names_above) - 1)])
    return out, host


#: Starting guess of the intensity one chalcogen atom adds, in units of the metal column
#: (HAADF ~ Z^1.7: S/Mo 0.19, Se/W 0.35); EM refines it.
CHALCOGEN_STEP = 0.25
_X_NAMES = ("X2", ("X1", "empty_X"), ("X_heavy",))
_M_NAMES = ("M", ("light_M", "empty_M"), ("heavy_M",))


def classify_sites(intensity, sublattice, *, switch: float = 1e-3) -> SiteStates:
    """Levels per sublattice and the Viterbi state sequence of every site."""
    t_count, n = intensity.shape
    state = np.full((t_count, n), -1, dtype=np.int64)
    label = np.full((t_count, n), "", dtype=object)
    levels = {}
    for sub, name, init, names in (
        (CHALCOGEN, "chalcogen", (-2 * CHALCOGEN_STEP, -CHALCOGEN_STEP, 0.0), _X_NAMES),
        (METAL, "metal", (-1.0, 0.0, 1.5), _M_NAMES),
    ):
        cols = np.flatnonzero(sublattice == sub)
        if len(cols) == 0:
            continue
        x = intensity[:, cols]
        med = np.nanmedian(x)
        lv = fit_levels(x[np.isfinite(x)], med + np.asarray(init))
        host_names, _ = _labels(lv, *names)
        levels[name] = lv
        st = viterbi(x, lv, switch=switch)
        state[:, cols] = st
        lab = np.asarray(host_names, dtype=object)[np.clip(st, 0, None)]
        lab[st < 0] = ""
        label[:, cols] = lab
    return SiteStates(state=state, label=label, levels=levels)


def detect_events(states: SiteStates, tracks) -> list[dict]:
    """Events between consecutive frames from the state sequences (module docstring).

    Returns
    -------
    list of dict
        ``frame`` (the first frame showing the new state), ``kind``, ``from_site``,
        ``to_site``, ``from_state``, ``to_state``.
    """
    st = states.state
    lab = states.label
    sub = tracks.sublattice
    t_count, n = st.shape
    out: list[dict] = []
    metal_heavy = {"heavy_M"}
    for f in range(1, t_count):
        prev, cur = st[f - 1], st[f]
        changed = np.flatnonzero((prev >= 0) & (cur >= 0) & (prev != cur))
        if len(changed) == 0:
            continue
        down = {int(s) for s in changed if cur[s] < prev[s]}
        up = {int(s) for s in changed if cur[s] > prev[s]}
        used: set[int] = set()

        # chalcogen hops: sites losing an atom paired with neighbouring sites gaining one,
        # as many pairs as possible (Hungarian on the frame's candidate pairs)
        downs = [s for s in down if sub[s] == CHALCOGEN]
        ups = [s for s in up if sub[s] == CHALCOGEN]
        for s, j in pair_hops(downs, ups, lambda s: sublattice_neighbours(tracks, s)):
            used.update((s, j))
            out.append(_event(f, "vacancy_hop", j, s, lab))
        # dopant hops: a heavy metal leaving a site for a neighbouring one
        for s in sorted(changed):
            s = int(s)
            if sub[s] != METAL or s in used or lab[f - 1, s] not in metal_heavy:
                continue
            partners = [
                j
                for j in sublattice_neighbours(tracks, s)
                if j not in used
                and lab[f, j] in metal_heavy
                and lab[f - 1, j] not in metal_heavy
                and j in set(changed.tolist())
            ]
            if partners:
                j = partners[0]
                used.update((s, j))
                out.append(_event(f, "dopant_hop", s, j, lab))
        for s in sorted(int(v) for v in changed):
            if s in used:
                continue
            if not interior(tracks, f, s, sublattice_neighbours(tracks, s)):
                continue  # a partner may be outside the field: cannot tell the kind
            if sub[s] == CHALCOGEN:
                kind = "vacancy_appears" if s in down else "vacancy_disappears"
            elif sub[s] == METAL and lab[f, s] == "empty_M":
                kind = "metal_vacancy"
            elif sub[s] == METAL:
                kind = "metal_change"
            else:
                continue
            out.append(_event(f, kind, s, s, lab))
    return out


def pair_hops(downs, ups, neighbours) -> list[tuple[int, int]]:
    """Chalcogen sites losing an atom (``downs``) paired with neighbouring sites gaining one
    (``ups``) as hops ``(down, up)``: as many pairs as possible (Hungarian on the candidate
    pairs; ``neighbours(site)`` lists a site's neighbours). Where the changes of a frame
    pair up in more than one way (a vacancy created next to one that hops) no image tells
    which happened; the choice is deterministic in the sites."""
    downs, ups = sorted(int(s) for s in downs), sorted(int(s) for s in ups)
    if not downs or not ups:
        return []
    cost = np.full((len(downs), len(ups)), 1e6)
    col = {u: k for k, u in enumerate(ups)}
    for r, s in enumerate(downs):
        for j in neighbours(s):
            if j in col:
                cost[r, col[j]] = 1.0
    rr, cc = linear_sum_assignment(cost)
    return [(downs[r], ups[c]) for r, c in zip(rr, cc, strict=True) if cost[r, c] < 1e5]


def sublattice_neighbours(tracks, site: int) -> list[int]:
    """The six nearest sites of the same sublattice as ``site`` (about one lattice
    constant away)."""
    a_px = float(np.linalg.norm(tracks.lattice_vectors_px[0]))
    d = np.linalg.norm(tracks.sites_xy - tracks.sites_xy[site], axis=1)
    same = tracks.sublattice == tracks.sublattice[site]
    return np.flatnonzero((d > 0.8 * a_px) & (d < 1.2 * a_px) & same).tolist()


def interior(tracks, frame: int, site: int, neighbours=None) -> bool:
    """True when the site and its six same-sublattice neighbours are in view in ``frame``
    and the frame before (a one-site change there cannot be half of a hop)."""
    if neighbours is None:
        neighbours = sublattice_neighbours(tracks, site)
    idx = np.r_[site, np.asarray(neighbours, dtype=np.int64)]
    if len(idx) < 7:
        return False
    return bool(tracks.in_view[frame - 1, idx].all() and tracks.in_view[frame, idx].all())


def _event(f, kind, a, b, lab):
    return {
        "frame": int(f),
        "kind": kind,
        "from_site": int(a),
        "to_site": int(b),
        "from_state": f"{lab[f - 1, a]}->{lab[f, a]}",
        "to_state": f"{lab[f - 1, b]}->{lab[f, b]}",
    }
