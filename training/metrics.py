"""Column-level evaluation: maps → columns → matching → detection and class scores.

Pure NumPy/SciPy (no torch). The chain:

1. :func:`find_columns` turns class-probability maps ``[K, H, W]`` (or a class map
   ``[H, W]``) into columns: the foreground (``1 − p_background > threshold``) is split into
   connected components — optionally further split around peaks of the smoothed
   foreground probability by a watershed — and each component gives one column with a
   probability-weighted sub-pixel centroid and the class of largest summed probability.
2. :func:`match_columns` pairs detected and true columns closer than a radius: the
   largest number of pairs, and among those the smallest total distance (Hungarian
   assignment on each connected group of candidates), or greedily by distance.
3. :class:`ColumnScores` accumulates over images: detection precision/recall/F1 (any
   column, class ignored), per-class precision/recall/F1, the confusion matrix over
   matched columns, and pixel IoU per class.

Positions are in pixels with ``x`` = column index and ``y`` = row index (the store's
convention, no half-pixel offset).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from simgen.labels import UNLABELLED as IGNORE_LABEL

_EMPTY = {
    "x": np.zeros(0),
    "y": np.zeros(0),
    "class_id": np.zeros(0, np.int64),
    "score": np.zeros(0),
    "area": np.zeros(0),
}


def find_columns(
    probs=None,
    class_map=None,
    *,
    threshold: float = 0.5,
    min_area_px: float = 2.0,
    min_distance_px: float | None = None,
    smooth_px: float = 1.0,
) -> dict[str, np.ndarray]:
    """Detect columns in a probability map or class map.

    Parameters
    ----------
    probs : ndarray, shape (K, H, W), optional
        Class probabilities (class 0 = background).
    class_map : ndarray of int, shape (H, W), optional
        Class per pixel; used when ``probs`` is not given (one-hot probabilities).
    threshold : float
        Foreground probability above which a pixel belongs to a column.
    min_area_px : float
        Components smaller than this many pixels are dropped.
    min_distance_px : float, optional
        When given, components holding several peaks of the smoothed foreground
        probability at least this far apart are split by a watershed (merged columns).
    smooth_px : float
        Gaussian sigma [px] of the smoothing used to find peaks.

    Returns
    -------
    dict of ndarray
        ``x``, ``y`` (sub-pixel centroid [px]), ``class_id`` (int), ``score`` (mean foreground
        probability), ``area`` (pixels), one entry per column.
    """
    if probs is None:
        if class_map is None:
            raise ValueError("find_columns: give probs or class_map")
        cm = np.asarray(class_map)
        if cm.ndim != 2:
            raise ValueError(f"class_map: expected [H, W], got shape {cm.shape}")
        k = int(cm.max()) + 1 if cm.size else 1
        probs = (np.arange(max(k, 2))[:, None, None] == cm[None]).astype(np.float32)
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"probs: expected [K >= 2, H, W], got shape {probs.shape}")
    fg_prob = 1.0 - probs[0].astype(np.float64)
    fg = fg_prob > threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return {k: v.copy() for k, v in _EMPTY.items()}
    if min_distance_px is not None and min_distance_px > 0:
        labels, n = _split_merged(fg_prob, fg, labels, n, min_distance_px, smooth_px)
    # per-component sums over the labelled pixels only, by bincount
    where = np.flatnonzero(labels)
    lab = labels.ravel()[where]

    def sums(values):
        return np.bincount(lab, weights=values.ravel()[where], minlength=n + 1)[1:]

    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    mass = sums(fg_prob)
    rows, cols = np.divmod(where, labels.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        com = (
            np.column_stack(
                [
                    np.bincount(lab, weights=fg_prob.ravel()[where] * rows, minlength=n + 1)[1:],
                    np.bincount(lab, weights=fg_prob.ravel()[where] * cols, minlength=n + 1)[1:],
                ]
            )
            / mass[:, None]
        )
    score = mass / np.maximum(area, 1.0)
    class_mass = np.stack([sums(probs[c]) for c in range(1, len(probs))])
    class_id = np.argmax(class_mass, axis=0).astype(np.int64) + 1
    keep = area >= min_area_px
    com = com.reshape(-1, 2)
    return {
        "x": com[keep, 1],
        "y": com[keep, 0],
        "class_id": class_id[keep],
        "score": score[keep],
        "area": area[keep],
    }


def _split_merged(fg_prob, fg, labels, n, min_distance_px, smooth_px):
    """Watershed split of components around peaks of the smoothed foreground probability."""
    from skimage.segmentation import watershed

    smooth = ndimage.gaussian_filter(fg_prob, smooth_px) if smooth_px > 0 else fg_prob
    peaks = _peaks_per_label(smooth, labels, n, max(1, int(round(min_distance_px))))
    markers = np.zeros(labels.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # every component keeps at least one marker (its maximum)
    per_label = np.bincount(labels[tuple(peaks.T)], minlength=n + 1)
    missing = np.flatnonzero(per_label[1:] == 0) + 1
    if len(missing):
        _, _, first_max = _label_extrema(smooth, labels, n)
        pos = np.divmod(first_max[missing - 1], labels.shape[1])
        markers[pos] = len(peaks) + np.arange(1, len(missing) + 1)
    # only components with several markers need the watershed; a component with one
    # marker floods to itself (same connectivity as the labelling)
    per_label[missing] = 1
    several = per_label > 1
    several[0] = False
    new = np.zeros_like(markers)
    if several.any():
        split = several[labels]
        new = watershed(-smooth, np.where(split, markers, 0), mask=split)
    single = (markers > 0) & (labels > 0) & ~several[labels]
    marker_of = np.zeros(n + 1, np.int32)
    marker_of[labels[single]] = markers[single]
    new = np.where(new > 0, new, marker_of[labels])
    return new, int(markers.max())


def _label_extrema(values, labels, n: int):
    """Per component ``1..n`` of ``labels``: maximum, minimum, and the flat index of the
    first pixel (raster order) holding the maximum, as ``ndimage.maximum``,
    ``ndimage.minimum`` and ``ndimage.maximum_position`` give them, without their sort of the
    whole image (NaN pixels are ignored; every component must be present)."""
    where = np.flatnonzero(labels)
    lab = labels.ravel()[where]
    v = values.ravel()[where]
    hi = np.full(n + 1, -np.inf)
    lo = np.full(n + 1, np.inf)
    np.fmax.at(hi, lab, v)  # NaN-ignoring, as ndimage
    np.fmin.at(lo, lab, v)
    at_max = v == hi[lab]
    # a component of NaN only: its first pixel
    ids, first = np.unique(lab, return_index=True)
    first_max = np.full(n + 1, -1, dtype=np.int64)
    first_max[ids] = where[first]
    ids, first = np.unique(lab[at_max], return_index=True)
    first_max[ids] = where[at_max][first]
    return hi[1:], lo[1:], first_max[1:]


def _peaks_per_label(smooth, labels, n, min_distance: int):
    """``peak_local_max(smooth, min_distance, labels=labels, exclude_border=False)``, with
    the same peaks in the same order, without its per-component Python loop for the
    components that can hold only one peak.

    skimage's candidates in a component are its pixels not exceeded by a pixel of the same
    component within ``min_distance``; they are a subset of the pixels not exceeded by a
    same-component 8-neighbour, computed here for the whole image at once. When those all
    lie within ``min_distance`` of each other (Chebyshev), the spacing step keeps only the
    highest candidate, which is the component's maximum (first in raster order among equal
    values), and the component is not skimage's "trivial" all-equal case, which needs a
    maximum above its minimum. Every other component still goes through skimage.
    """
    from skimage.feature import peak_local_max

    def skimage_peaks(lab):
        return peak_local_max(smooth, min_distance=min_distance, labels=lab, exclude_border=False)

    if min_distance <= 1 or n == 0:  # no spacing step: every candidate is a peak
        return skimage_peaks(labels)
    index = np.arange(1, n + 1)
    h, w = labels.shape
    lab = np.pad(labels, 1)
    val = np.pad(smooth, 1, constant_values=-np.inf)
    centre_lab, centre_val = lab[1:-1, 1:-1], val[1:-1, 1:-1]
    maybe = labels > 0
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                nb = (slice(1 + dr, 1 + dr + h), slice(1 + dc, 1 + dc + w))
                maybe &= ~((lab[nb] == centre_lab) & (val[nb] > centre_val))
    boxes = ndimage.find_objects(np.where(maybe, labels, 0), max_label=n)
    span = np.array([[s.stop - s.start - 1 for s in b] if b else [0, 0] for b in boxes])
    hi, lo, first_max = _label_extrema(smooth, labels, n)
    present = np.array([b is not None for b in boxes])
    one_peak = present & (span.max(axis=1) <= min_distance) & (hi > lo) & (hi > smooth.min())
    rest_ids = index[~one_peak]
    big = np.empty((0, 2), dtype=np.intp)
    if len(rest_ids):
        big = skimage_peaks(np.where(np.isin(labels, rest_ids), labels, 0)).astype(np.intp)
    one = np.column_stack(np.divmod(first_max[one_peak], w)).astype(np.intp)
    peaks = np.concatenate([big, one.reshape(-1, 2)])
    order = np.argsort(labels[tuple(peaks.T)], kind="stable")  # skimage: by component
    return peaks[order]


def match_columns(pred_xy, true_xy, radius: float, method: str = "hungarian"):
    """Pair detected and true columns closer than ``radius``.

    Parameters
    ----------
    pred_xy, true_xy : array_like, shape (n, 2) and (m, 2)
        Positions ``(x, y)`` [px].
    radius : float
        Largest matching distance [px] (inclusive).
    method : {"hungarian", "greedy"}
        ``hungarian``: as many pairs as possible, then the smallest total distance, solved
        exactly on each connected group of candidate pairs; ``greedy``: repeatedly take the
        closest remaining pair.

    Returns
    -------
    pred_idx, true_idx : ndarray of int
        Indices of the matched pairs.
    dist : ndarray of float
        Their distances [px].
    """
    if method not in ("hungarian", "greedy"):
        raise ValueError(f"method: expected hungarian or greedy, got {method!r}")
    if radius <= 0:
        raise ValueError(f"radius: must be > 0, got {radius}")
    p = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if len(p) == 0 or len(t) == 0:
        return empty
    cand = cKDTree(p).query_ball_tree(cKDTree(t), r=radius)
    pi = np.array([i for i, js in enumerate(cand) for _ in js], dtype=np.int64)
    ti = np.array([j for js in cand for j in js], dtype=np.int64)
    if len(pi) == 0:
        return empty
    d = np.hypot(*(p[pi] - t[ti]).T)
    if method == "greedy":
        order = np.lexsort((ti, pi, d))
        used_p, used_t, keep = set(), set(), []
        for k in order:
            if pi[k] not in used_p and ti[k] not in used_t:
                used_p.add(pi[k])
                used_t.add(ti[k])
                keep.append(k)
        keep = np.array(keep, dtype=np.int64)
        order = np.argsort(pi[keep], kind="stable")
        keep = keep[order]
        return pi[keep], ti[keep], d[keep]
    # connected groups of the bipartite candidate graph: nodes 0..n-1 pred, n..n+m-1 true
    n, m = len(p), len(t)
    adj = coo_matrix((np.ones(len(pi)), (pi, n + ti)), shape=(n + m, n + m))
    _, comp = connected_components(adj, directed=False)
    edge_comp = comp[pi]
    out_p, out_t, out_d = [], [], []
    big = 1e6 * (1.0 + radius)
    for c in np.unique(edge_comp):
        sel = edge_comp == c
        ps, ts = np.unique(pi[sel]), np.unique(ti[sel])
        cost = np.full((len(ps), len(ts)), big)
        cost[np.searchsorted(ps, pi[sel]), np.searchsorted(ts, ti[sel])] = d[sel]
        r, col = linear_sum_assignment(cost)
        ok = cost[r, col] < big
        out_p.append(ps[r[ok]])
        out_t.append(ts[col[ok]])
        out_d.append(cost[r[ok], col[ok]])
    pm, tm, dm = np.concatenate(out_p), np.concatenate(out_t), np.concatenate(out_d)
    order = np.argsort(pm, kind="stable")
    return pm[order], tm[order], dm[order]


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 from counts (``None`` where undefined)."""
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def average_precision(y_true, y_score) -> float | None:
    """Area under the precision–recall curve as the mean precision at each positive.

    Ties in ``y_score`` are ranked together (the precision of a tied block is that at its
    end), as ``sklearn.metrics.average_precision_score`` does. ``None`` without positives.
    """
    t = np.asarray(y_true, dtype=bool)
    s = np.asarray(y_score, dtype=np.float64)
    n_pos = int(t.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    t, s = t[order], s[order]
    tp = np.cumsum(t)
    # the end of each block of equal scores
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp_b, n_b = tp[last], last + 1
    precision = tp_b / n_b
    recall_gain = np.diff(np.r_[0, tp_b]) / n_pos
    return float(min(1.0, np.sum(precision * recall_gain)))  # no 1 + 1e-16 from rounding


def auroc(y_true, y_score) -> float | None:
    """Area under the ROC curve (Mann–Whitney U with mid-ranks for ties); ``None`` unless
    there are positives and negatives."""
    from scipy.stats import rankdata

    t = np.asarray(y_true, dtype=bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(y_score, dtype=np.float64))
    return float(min(1.0, (ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))


def reliability_bins(uncertainty, error, n_bins: int = 10) -> dict:
    """Error rate against uncertainty in bins of equal count (a reliability diagram).

    Parameters
    ----------
    uncertainty : array_like, shape (N,)
        E.g. the ensemble variance of each column's predicted class.
    error : array_like of bool, shape (N,)
        Whether the column's class is wrong.
    n_bins : int

    Returns
    -------
    dict
        ``mean_uncertainty``, ``error_rate``, ``count`` per bin (JSON-ready), and the
        Spearman correlation ``spearman`` of uncertainty and error (``None`` if undefined).
    """
    from scipy.stats import spearmanr

    u = np.asarray(uncertainty, dtype=np.float64)
    e = np.asarray(error, dtype=bool)
    ok = np.isfinite(u)
    u, e = u[ok], e[ok]
    out = {"mean_uncertainty": [], "error_rate": [], "count": [], "spearman": None}
    if len(u) == 0:
        return out
    order = np.argsort(u, kind="mergesort")
    for part in np.array_split(order, min(n_bins, len(u))):
        out["mean_uncertainty"].append(float(u[part].mean()))
        out["error_rate"].append(float(e[part].mean()))
        out["count"].append(int(len(part)))
    if np.ptp(u) > 0 and 0 < e.sum() < len(e):
        out["spearman"] = float(spearmanr(u, e).statistic)
    return out


def _select(cols: dict, keep: np.ndarray) -> dict:
    return {k: np.asarray(v)[keep] for k, v in cols.items()}


def inside(cols: dict, shape, border_px: float = 0.0) -> np.ndarray:
    """Mask of columns at least ``border_px`` inside an image of ``shape`` (H, W)."""
    h, w = shape
    x, y = np.asarray(cols["x"]), np.asarray(cols["y"])
    return (x >= border_px) & (y >= border_px) & (x <= w - 1 - border_px) & (y <= h - 1 - border_px)


class ColumnScores:
    """Accumulates column and pixel scores over images.

    Parameters
    ----------
    class_names : sequence of str
        Name of every class by id (index 0 = background).
    """

    def __init__(self, class_names):
        self.class_names = list(class_names)
        k = len(self.class_names)
        if k < 2:
            raise ValueError("class_names: need background and at least one class")
        self.confusion = np.zeros((k, k), np.int64)  # true × predicted, matched columns
        self.pixels = np.zeros((k, k), np.int64)  # true × predicted, pixels
        self.n_true = np.zeros(k, np.int64)
        self.n_pred = np.zeros(k, np.int64)
        self.matched = 0
        self.pred_total = 0
        self.true_total = 0
        self.dist_sum = 0.0
        self.n_images = 0
        self._rank_true: list[np.ndarray] = []  # per scored row: true class (0: none)
        self._rank_probs: list[np.ndarray] = []  # ... and the class probabilities [n, K]
        self._uncertainty: list[np.ndarray] = []  # matched columns: uncertainty, error
        self._error: list[np.ndarray] = []
        self._image_counts: list[np.ndarray] = []

    def add_columns(
        self,
        pred: dict,
        true: dict,
        radius_px: float,
        *,
        shape=None,
        border_px: float = 0.0,
        method: str = "hungarian",
    ) -> dict:
        """Match one image's columns and add them to the totals.

        Parameters
        ----------
        pred, true : dict of ndarray
            Columns with ``x``, ``y`` [px] and ``class_id``; true columns of class 0 (not
            labelled in the masks) and ids beyond the class list are ignored. ``pred`` may
            also hold ``probs`` (``[N, K]`` class probabilities of each detection) and
            ``uncertainty`` (``[N]``, e.g. the ensemble variance of its class): then
            average precision, AUROC and the reliability diagram are computed too.
        radius_px : float
            Matching radius [px].
        shape : (int, int), optional
            Image shape; with it, true columns closer than ``border_px`` to an edge (or
            outside) are left out, with the detections matched to them and the unmatched
            detections in that band (matching itself uses all columns).
        border_px : float
            Width of the excluded edge band [px].
        method : {"hungarian", "greedy"}
            See :func:`match_columns`.

        Returns
        -------
        dict
            ``pred_idx``, ``true_idx`` of the matches (into the filtered columns), and the
            filtered ``pred`` and ``true`` columns.
        """
        k = len(self.class_names)
        true_id = np.asarray(true["class_id"]).astype(np.int64)
        t = _select({k_: true[k_] for k_ in ("x", "y", "class_id")}, (true_id > 0) & (true_id < k))
        p = dict(pred)
        pi, ti, d = match_columns(
            np.column_stack([p["x"], p["y"]]), np.column_stack([t["x"], t["y"]]), radius_px, method
        )
        if shape is not None:
            # true columns count when inside the band; a match counts when its true column
            # does; an unmatched detection counts when it lies inside the band itself
            count_t = inside(t, shape, border_px)
            count_p = inside(p, shape, border_px)
            count_p[pi] = count_t[ti]
            keep = count_t[ti]
            new_t = np.cumsum(count_t) - 1
            new_p = np.cumsum(count_p) - 1
            pi, ti, d = new_p[pi[keep]], new_t[ti[keep]], d[keep]
            t, p = _select(t, count_t), _select(p, count_p)
        tc = np.asarray(t["class_id"], np.int64)
        pc = np.clip(np.asarray(p["class_id"], np.int64), 0, k - 1)
        confusion = np.zeros((k, k), np.int64)
        np.add.at(confusion, (tc[ti], pc[pi]), 1)
        n_true = np.bincount(tc, minlength=k)[:k]
        n_pred = np.bincount(pc, minlength=k)[:k]
        self.confusion += confusion
        self.n_true += n_true
        self.n_pred += n_pred
        self._image_counts.append(
            np.concatenate([[len(pi), len(pc), len(tc)], np.diag(confusion), n_pred, n_true])
        )
        self.matched += len(pi)
        self.pred_total += len(pc)
        self.true_total += len(tc)
        self.dist_sum += float(d.sum())
        self.n_images += 1
        if "probs" in p:
            self._add_ranking(p, tc, pc, pi, ti, k)
        return {"pred_idx": pi, "true_idx": ti, "pred": p, "true": t}

    def _add_ranking(self, p, tc, pc, pi, ti, k) -> None:
        """Rows for AP/AUROC: matched detections (their true class), unmatched detections
        (true class 0) and missed true columns (probability 0 for every class)."""
        probs = np.asarray(p["probs"], np.float64).reshape(len(pc), -1)
        if probs.shape[1] != k:
            raise ValueError(f"add_columns: pred probs have {probs.shape[1]} classes, not {k}")
        unmatched_p = np.setdiff1d(np.arange(len(pc)), pi)
        missed_t = np.setdiff1d(np.arange(len(tc)), ti)
        self._rank_true.append(
            np.concatenate([tc[ti], np.zeros(len(unmatched_p), np.int64), tc[missed_t]])
        )
        self._rank_probs.append(
            np.concatenate([probs[pi], probs[unmatched_p], np.zeros((len(missed_t), k))])
        )
        if "uncertainty" in p:
            self._uncertainty.append(np.asarray(p["uncertainty"], np.float64)[pi])
            self._error.append(tc[ti] != pc[pi])

    def image_counts(self) -> np.ndarray:
        """Column counts of every image added, for resampling images (bootstrap).

        Returns
        -------
        ndarray of int64, shape (n_images, 3 + 3 K)
            Per image: matched, detected and true columns (classes ignored), then per class
            id ``0..K-1`` the correctly classified matches, the detections and the true
            columns. Summing rows gives the totals :meth:`summary` scores.
        """
        k = len(self.class_names)
        if not self._image_counts:
            return np.zeros((0, 3 + 3 * k), np.int64)
        return np.stack(self._image_counts).astype(np.int64)

    def add_pixels(self, pred_map, true_map) -> None:
        """Add one image's pixel confusion (class maps of equal shape)."""
        k = len(self.class_names)
        p = np.clip(np.asarray(pred_map, np.int64).ravel(), 0, k - 1)
        t = np.asarray(true_map, np.int64).ravel()
        if p.shape != t.shape:
            raise ValueError("add_pixels: prediction and truth differ in shape")
        labelled = t != IGNORE_LABEL  # unlabelled pixels (pseudo-labels) are not scored
        p, t = p[labelled], t[labelled]
        if t.size and t.max() >= k:
            raise ValueError(f"add_pixels: true class {t.max()} beyond the {k} classes")
        self.pixels += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def iou(self) -> np.ndarray:
        """Pixel IoU per class (NaN for a class absent from truth and prediction)."""
        inter = np.diag(self.pixels).astype(np.float64)
        union = self.pixels.sum(0) + self.pixels.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / np.maximum(union, 1), np.nan)

    def summary(self) -> dict:
        """All scores as a JSON-ready dict.

        Returns
        -------
        dict
            ``detection`` (precision/recall/F1 over columns, class ignored, and the mean
            localisation error of matches [px]), ``classes`` (per class: precision,
            recall, F1, support, and ``detected`` = fraction of its true columns matched by
            a column of any class), ``confusion`` (true × predicted over matched columns,
            with ``class_names``), ``pixel`` (IoU per class, mean IoU over foreground
            classes present, pixel accuracy), ``n_images``. With detection probabilities
            (see :meth:`add_columns`) each class also has ``ap`` (average precision of
            ranking all scored columns by that class's probability; missed true columns
            rank last) and ``auroc``, and ``reliability`` holds
            :func:`reliability_bins` of the uncertainty against class errors of matched
            columns.
        """
        k = len(self.class_names)
        det = prf(self.matched, self.pred_total - self.matched, self.true_total - self.matched)
        det["mean_distance_px"] = self.dist_sum / self.matched if self.matched else None
        classes = {}
        matched_true = self.confusion.sum(1)
        for c in range(1, k):
            tp = int(self.confusion[c, c])
            entry = prf(tp, int(self.n_pred[c] - tp), int(self.n_true[c] - tp))
            entry["support"] = int(self.n_true[c])
            entry["detected"] = float(matched_true[c] / self.n_true[c]) if self.n_true[c] else None
            if self._rank_true:
                y = np.concatenate(self._rank_true) == c
                score = np.concatenate(self._rank_probs)[:, c]
                entry["ap"] = average_precision(y, score)
                entry["auroc"] = auroc(y, score)
            classes[self.class_names[c]] = entry
        iou = self.iou()
        fg = iou[1:][~np.isnan(iou[1:])]
        total = self.pixels.sum()
        extra = {}
        if self._rank_true:
            present = [
                e for name, e in classes.items()
                if e["support"] and e.get("ap") is not None
            ]  # fmt: skip
            extra["mean_ap"] = float(np.mean([e["ap"] for e in present])) if present else None
        if self._uncertainty:
            extra["reliability"] = reliability_bins(
                np.concatenate(self._uncertainty), np.concatenate(self._error)
            )
        return extra | {
            "n_images": self.n_images,
            "detection": det,
            "classes": classes,
            "confusion": {
                "class_names": self.class_names,
                "matrix": self.confusion.tolist(),
                "rows": "true class",
                "cols": "predicted class",
            },
            "pixel": {
                "iou": {
                    n: (None if np.isnan(v) else float(v))
                    for n, v in zip(self.class_names, iou, strict=True)
                },
                "mean_iou_foreground": float(fg.mean()) if fg.size else None,
                "accuracy": float(np.trace(self.pixels) / total) if total else None,
            },
        }
