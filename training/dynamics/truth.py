"""Scores of a dynamics analysis against a simulated movie's ground truth.

Used by the tests and the benchmark: identity of the site tracks, precision and recall of
the events per kind, the AUROC of the instability score for the sites of true events.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from structures import CHALCOGEN
from training.dynamics.events import interior, pair_hops, sublattice_neighbours
from training.dynamics.tracking import match_points


def map_sites(tracks, truth, *, tol_bonds: float = 0.5) -> dict:
    """Which analysed site each true site is, frame by frame.

    Returns
    -------
    dict
        ``identity`` (fraction of true sites seen in ≥ 2 frames that are matched to one and
        the same analysed site in every frame they are in view), ``n_true_sites``,
        ``true_to_track`` (true site -> analysed site, the majority over frames).
    """
    per_site: dict[int, list] = {}
    shape = tracks.registration.shape
    border = tracks.bond_px
    for f, cols in enumerate(truth["frames"]):
        xy = np.column_stack([cols["x"], cols["y"]]).astype(np.float64)
        h, w = shape
        inside = (
            (xy[:, 0] > border)
            & (xy[:, 0] < w - 1 - border)
            & (xy[:, 1] > border)
            & (xy[:, 1] < h - 1 - border)
        )
        xy, sid = xy[inside], cols["site_index"][inside]
        i, j = match_points(xy, tracks.xy[f], tol_bonds * tracks.bond_px)
        got = dict(zip(i.tolist(), j.tolist(), strict=True))
        for k, s in enumerate(sid.tolist()):
            per_site.setdefault(int(s), []).append(got.get(k, -1))
    kept, total, mapping = 0, 0, {}
    for s, ids in per_site.items():
        ids = np.asarray(ids)
        good = ids[ids >= 0]
        if len(good):
            vals, counts = np.unique(good, return_counts=True)
            mapping[s] = int(vals[np.argmax(counts)])
        if len(ids) < 2:
            continue
        total += 1
        kept += bool(np.all(ids == ids[0]) and ids[0] >= 0)
    return {
        "identity": kept / total if total else float("nan"),
        "n_true_sites": total,
        "true_to_track": mapping,
    }


def score_events(detected, truth, mapping, tracks, kinds, *, observable: bool = True) -> dict:
    """Precision and recall of detected events per kind.

    A true event counts when its sites map to analysed sites that are in view in the frame
    before and the frame of the event (for a one-site event: with its whole neighbourhood,
    :func:`training.dynamics.events.interior`); a detected event matches a true one of the same
    kind, frame and (mapped) from/to sites.

    With ``observable`` (default) the true chalcogen events of each frame are first turned
    into what the images show, the sites that lose and gain an atom, and paired into hops
    the way the analysis pairs them (:func:`training.dynamics.events.pair_hops`): a vacancy
    created next to a site that is refilled is a hop in every image, and a vacancy created
    next to one that hops can be paired two ways, so the true kinds of such coincidences
    are not observable. ``observable=False`` scores against the simulator's own kinds.
    """
    ev = truth["events"]
    true_set = {}
    changes: dict[int, tuple[set, set]] = {}
    for f, kind, a, b in zip(
        ev["frame"], ev["kind_name"], ev["from_site"], ev["to_site"], strict=True
    ):
        ta, tb = mapping.get(int(a)), mapping.get(int(b))
        f, kind = int(f), str(kind)
        if observable and kind in ("vacancy_appears", "vacancy_disappears", "vacancy_hop"):
            # what the images show: each site that loses or gains an atom, where it is in
            # view in both frames and tracked as a chalcogen site (one end of a hop may be
            # outside the field; the analysis then sees the other end alone)
            down, up = changes.setdefault(f, (set(), set()))
            gains = {"vacancy_appears": (), "vacancy_disappears": (ta,), "vacancy_hop": (ta,)}
            losses = {"vacancy_appears": (ta,), "vacancy_disappears": (), "vacancy_hop": (tb,)}
            for sites, into in ((gains[kind], up), (losses[kind], down)):
                for t in sites:
                    if t is not None and _seen_chalcogen(tracks, f, t):
                        into.add(t)
            continue
        if ta is None or tb is None:
            continue
        if not (tracks.in_view[f - 1, [ta, tb]].all() and tracks.in_view[f, [ta, tb]].all()):
            continue
        if ta == tb and not interior(tracks, f, ta):
            continue  # a one-site event at the edge of the field (see events.interior)
        true_set[(f, kind, ta, tb)] = True
    for f, (down, up) in changes.items():
        both = down & up  # lost and regained in one frame: nothing to see
        down, up = down - both, up - both
        for s, j in pair_hops(down, up, lambda s: sublattice_neighbours(tracks, s)):
            true_set[(f, "vacancy_hop", j, s)] = True
            down.discard(s)
            up.discard(j)
        for s in down | up:
            if interior(tracks, f, s):
                true_set[(f, "vacancy_appears" if s in down else "vacancy_disappears", s, s)] = True
    det_set = {
        (int(e["frame"]), e["kind"], int(e["from_site"]), int(e["to_site"])) for e in detected
    }
    out = {}
    for kind in kinds:
        t = {k for k in true_set if k[1] == kind}
        d = {k for k in det_set if k[1] == kind}
        hit = len(t & d)
        out[kind] = {
            "true": len(t),
            "detected": len(d),
            "precision": hit / len(d) if d else float("nan"),
            "recall": hit / len(t) if t else float("nan"),
        }
    return out


def _seen_chalcogen(tracks, frame: int, site: int) -> bool:
    return bool(
        tracks.sublattice[site] == CHALCOGEN
        and tracks.in_view[frame - 1, site]
        and tracks.in_view[frame, site]
    )


def auroc(scores, positive) -> float:
    """Area under the ROC curve (Mann–Whitney) of ``scores`` for ``positive`` (bool)."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def event_sites(truth, mapping) -> set[int]:
    """Analysed sites taking part in any true event."""
    ev = truth["events"]
    out = set()
    for a, b in zip(ev["from_site"], ev["to_site"], strict=True):
        for s in (int(a), int(b)):
            if s in mapping:
                out.add(mapping[s])
    return out
