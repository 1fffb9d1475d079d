"""Bootstrap intervals of column F1s over test images.

A test set's column scores are sums of per-image counts
(:meth:`training.metrics.ColumnScores.image_counts`). Resampling the images with
replacement — each drawn image brings all its columns, so the correlation of the columns
of one image is kept — and re-summing gives the bootstrap distribution of every F1. Two
models scored on the same test images are compared with the *same* resamples (a paired
bootstrap), which removes the image-to-image variation they share.

Everything here is numpy on integer counts: the same seed gives the same intervals on any
machine. Importing this module does not import torch.
"""

from __future__ import annotations

import zlib

import numpy as np


def count_layout(class_names) -> dict[str, int | slice]:
    """Where each count sits in a row of :meth:`ColumnScores.image_counts`.

    Returns
    -------
    dict
        ``matched``, ``detected``, ``true`` (int columns) and ``tp``, ``pred``,
        ``support`` (slices over the class ids ``0..K-1``).
    """
    k = len(class_names)
    return {
        "matched": 0,
        "detected": 1,
        "true": 2,
        "tp": slice(3, 3 + k),
        "pred": slice(3 + k, 3 + 2 * k),
        "support": slice(3 + 2 * k, 3 + 3 * k),
    }


def _ratio(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def f1_metrics(
    totals, class_names, defect_classes, *, undefined_as_zero: bool = False
) -> dict[str, np.ndarray]:
    """F1s from summed column counts (any leading shape, e.g. one row per resample).

    The definitions are those of ``results.csv`` (``docs/noise_study.md``): F1 =
    2 TP / (detections + true columns), undefined (NaN) without detections or without true
    columns; macro F1 = mean over the classes with true columns, an undefined F1 counting 0.

    Parameters
    ----------
    totals : array_like, shape (..., 3 + 3 K)
        Summed rows of :meth:`~training.metrics.ColumnScores.image_counts`.
    class_names : sequence of str
        Class names by id (0 = background).
    defect_classes : sequence of str
        Classes of the macro defect F1.
    undefined_as_zero : bool
        A class with true columns but no detection gets F1 0 instead of NaN (the macro
        F1's rule; used when averaging repeats, so that a model that never predicts a
        class pulls the mean down instead of dropping out of it).

    Returns
    -------
    dict of ndarray
        ``detection_f1``, ``macro_f1``, ``macro_defect_f1`` and ``f1_<class>`` for every
        class but background, each of the leading shape.
    """
    t = np.asarray(totals, np.int64)
    lay = count_layout(class_names)
    m, d, n = t[..., lay["matched"]], t[..., lay["detected"]], t[..., lay["true"]]
    out = {"detection_f1": np.where((d > 0) & (n > 0), _ratio(2 * m, d + n), np.nan)}
    tp, pred, sup = t[..., lay["tp"]], t[..., lay["pred"]], t[..., lay["support"]]
    f1_or_zero = _ratio(2 * tp, pred + sup)  # 0 where there are true columns but no TP
    f1 = np.where(((pred > 0) | undefined_as_zero) & (sup > 0), f1_or_zero, np.nan)
    has = sup > 0

    def macro(ids):
        if not ids:
            return np.full(t.shape[:-1], np.nan)
        h = has[..., ids]
        s = np.where(h, np.nan_to_num(f1_or_zero[..., ids]), 0.0).sum(-1)
        return _ratio(s, h.sum(-1))

    names = list(class_names)
    out["macro_f1"] = macro(list(range(1, len(names))))
    out["macro_defect_f1"] = macro([names.index(c) for c in defect_classes if c in names])
    for c in range(1, len(names)):
        out[f"f1_{names[c]}"] = f1[..., c]
    return out


def stream(seed: int, name: str) -> np.random.Generator:
    """Generator of one named stream (a test set's images, a bin's repeats).

    Seeded by ``seed`` and the CRC-32 of ``name``: adding a test set or a bin does not
    change the resamples of the others.
    """
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def resample_weights(n_items: int, n_resamples: int, rng) -> np.ndarray:
    """How often each item is drawn in each resample (multinomial counts).

    Returns
    -------
    ndarray of int64, shape (n_resamples, n_items)
        Rows sum to ``n_items``.
    """
    rng = np.random.default_rng(rng)
    if n_items == 0:
        return np.zeros((n_resamples, 0), np.int64)
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_resamples).astype(
        np.int64
    )


def resampled_metrics(
    counts, weights, class_names, defect_classes, *, undefined_as_zero: bool = False
) -> dict[str, np.ndarray]:
    """Every F1 of each resample of one model on one test set.

    Parameters
    ----------
    counts : array_like, shape (n_images, 3 + 3 K)
        Per-image counts.
    weights : ndarray, shape (B, n_images)
        :func:`resample_weights` of that test set (share it between models: paired).
    undefined_as_zero : bool
        See :func:`f1_metrics`.

    Returns
    -------
    dict of ndarray, each shape (B,)
    """
    c = np.asarray(counts, np.int64)
    return f1_metrics(weights @ c, class_names, defect_classes, undefined_as_zero=undefined_as_zero)


def percentile_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Central percentile interval of bootstrap values (NaN resamples left out).

    Returns
    -------
    (float, float)
        ``(nan, nan)`` when no resample is finite.
    """
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return (float("nan"), float("nan"))
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)
