"""Column finding, matching and scores (training/metrics.py) on hand-built cases."""

import json

import numpy as np
import pytest

from training.metrics import ColumnScores, find_columns, match_columns, prf
from training.report import plot_confusion, read_history_csv, write_history_csv, write_json

NAMES = ["background", "M", "X2", "vac_X1"]


def cols(xy, cls):
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return {"x": xy[:, 0], "y": xy[:, 1], "class_id": np.asarray(cls, dtype=np.int64)}


TRUE = cols([[10, 10], [20, 10], [30, 10], [10, 20], [20, 20]], [1, 2, 3, 1, 2])


def score(pred, true=TRUE, radius=2.0, **kw):
    s = ColumnScores(NAMES)
    s.add_columns(pred, true, radius, **kw)
    return s.summary()


def test_perfect_and_shifted_columns_match():
    out = score(TRUE)
    assert out["detection"]["f1"] == 1.0 and out["detection"]["mean_distance_px"] == 0.0
    shifted = cols(np.column_stack([TRUE["x"] + 1.2, TRUE["y"] - 0.9]), TRUE["class_id"])
    out = score(shifted)
    assert out["detection"]["f1"] == 1.0
    assert out["detection"]["mean_distance_px"] == pytest.approx(1.5)
    out = score(shifted, radius=1.4)  # shifted beyond the radius: all missed, all spurious
    assert out["detection"] == pytest.approx(
        {
            "precision": 0.0,
            "recall": 0.0,
            "f1": 0.0,
            "tp": 0,
            "fp": 5,
            "fn": 5,
            "mean_distance_px": None,
        }
    )


def test_missing_extra_and_misclassified_columns():
    # drop the vac_X1 column, add a spurious M at (40, 40), call (20, 20) an M instead of X2
    pred = cols([[10, 10], [20, 10], [10, 20], [20, 20], [40, 40]], [1, 2, 1, 1, 1])
    out = score(pred)
    det = out["detection"]
    assert (det["tp"], det["fp"], det["fn"]) == (4, 1, 1)
    assert det["precision"] == pytest.approx(0.8) and det["recall"] == pytest.approx(0.8)
    m = out["classes"]["M"]  # 2 correct Ms, one M on an X2 site, one spurious M
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 0)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == 1.0
    x2 = out["classes"]["X2"]
    assert (x2["tp"], x2["fp"], x2["fn"]) == (1, 0, 1) and x2["detected"] == 1.0
    v = out["classes"]["vac_X1"]
    assert v["recall"] == 0.0 and v["precision"] is None and v["detected"] == 0.0
    conf = np.array(out["confusion"]["matrix"])
    assert conf[1, 1] == 2 and conf[2, 2] == 1 and conf[2, 1] == 1 and conf.sum() == 4


def test_hungarian_beats_greedy_on_a_chain():
    # greedy takes the closest pair (p0-t1, 0.9) and strands p1 and t0; Hungarian pairs both
    pred = [[0.0, 0.0], [1.9, 0.0]]
    true = [[-1.0, 0.0], [0.9, 0.0]]
    pi, ti, d = match_columns(pred, true, 1.05)
    assert list(zip(pi, ti, strict=True)) == [(0, 0), (1, 1)]
    np.testing.assert_allclose(d, [1.0, 1.0])
    pi, ti, _ = match_columns(pred, true, 1.05, method="greedy")
    assert list(zip(pi, ti, strict=True)) == [(0, 1)]


def test_matching_edge_cases():
    pi, ti, d = match_columns([[5, 5]], [[5, 5]], 0.5)  # zero distance is a match
    assert list(pi) == [0] and list(ti) == [0] and d[0] == 0
    assert len(match_columns(np.zeros((0, 2)), [[1, 1]], 1.0)[0]) == 0
    assert len(match_columns([[0, 0]], [[3, 0]], 3.0)[0]) == 1  # the radius is inclusive
    with pytest.raises(ValueError, match="method"):
        match_columns([[0, 0]], [[0, 0]], 1.0, method="nearest")
    rng = np.random.default_rng(0)  # many columns: one match per column at most
    t = rng.uniform(0, 200, (400, 2))
    p = t + rng.normal(0, 0.3, t.shape)
    pi, ti, _ = match_columns(p, t, 1.0)
    assert len(set(pi)) == len(pi) == len(set(ti)) and len(pi) > 390


def test_border_band_excludes_columns_on_both_sides():
    true = cols([[1, 10], [10, 10], [18.5, 10]], [1, 1, 1])
    pred = cols([[1.3, 10], [10, 10], [19, 10], [0.5, 5]], [1, 1, 1, 1])
    out = score(pred, true, shape=(20, 20), border_px=2.0)
    assert out["detection"]["tp"] == 1 and out["detection"]["fp"] == 0
    assert out["detection"]["fn"] == 0


def disk(shape, x, y, r):
    rows, c = np.mgrid[: shape[0], : shape[1]]
    return (c - x) ** 2 + (rows - y) ** 2 <= r**2


def test_find_columns_subpixel_centroids_and_classes():
    shape = (32, 32)
    class_map = np.zeros(shape, np.int64)
    centres = [(8.3, 7.6, 1), (20.0, 9.5, 2), (12.5, 22.0, 3)]
    for x, y, c in centres:
        class_map[disk(shape, x, y, 2.6)] = c
    found = find_columns(class_map=class_map)
    order = np.argsort(found["x"])
    got = np.column_stack([found["x"], found["y"]])[order]
    want = np.array(sorted([(x, y) for x, y, _ in centres]))
    np.testing.assert_allclose(got, want, atol=0.35)
    assert sorted(found["class_id"]) == [1, 2, 3]
    class_map[0, 0] = 1  # a one-pixel speck is dropped
    assert len(find_columns(class_map=class_map, min_area_px=2)["x"]) == 3


def test_find_columns_splits_merged_blobs_and_uses_probabilities():
    shape = (24, 40)
    fg = np.zeros(shape)
    fg[disk(shape, 12, 12, 3.5)] = 0.9
    fg[disk(shape, 18, 12, 3.5)] = 0.9  # overlapping: one component, two peaks
    probs = np.stack([1 - fg, fg * 0.7, fg * 0.3])
    assert len(find_columns(probs)["x"]) == 1
    found = find_columns(probs, min_distance_px=4)
    assert len(found["x"]) == 2 and set(found["class_id"]) == {1}
    np.testing.assert_allclose(np.sort(found["x"]), [12, 18], atol=1.0)
    assert np.all(found["score"] == pytest.approx(0.9))
    assert len(find_columns(np.stack([np.ones(shape), np.zeros(shape)]))["x"]) == 0


def test_pixel_iou_and_summary_json(tmp_path):
    s = ColumnScores(NAMES)
    truth = np.array([[0, 0, 1, 1], [0, 2, 2, 0]])
    pred = np.array([[0, 0, 1, 0], [0, 2, 1, 0]])
    s.add_pixels(pred, truth)
    iou = s.iou()
    np.testing.assert_allclose(iou[:3], [4 / 5, 1 / 3, 1 / 2])
    assert np.isnan(iou[3])
    out = s.summary()
    assert out["pixel"]["accuracy"] == pytest.approx(6 / 8)
    assert out["pixel"]["mean_iou_foreground"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert out["pixel"]["iou"]["vac_X1"] is None
    path = write_json(out, tmp_path / "m.json")
    assert json.loads(path.read_text())["pixel"]["accuracy"] == pytest.approx(0.75)


def test_prf_undefined_values():
    assert prf(0, 0, 0) == {
        "precision": None,
        "recall": None,
        "f1": None,
        "tp": 0,
        "fp": 0,
        "fn": 0,
    }
    assert prf(0, 2, 0)["precision"] == 0.0 and prf(0, 2, 0)["f1"] is None


def test_confusion_png_and_history_csv(tmp_path):
    png = plot_confusion(
        [[0, 0, 0], [0, 5, 1], [0, 2, 7]], ["background", "M", "X2"], tmp_path / "c.png"
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = [{"epoch": 1, "train_loss": 0.5, "val_f1": None}, {"epoch": 2, "train_loss": 0.25}]
    path = write_history_csv(hist, tmp_path / "h.csv")
    back = read_history_csv(path)
    assert back[1]["epoch"] == 2 and back[1]["train_loss"] == 0.25 and back[0]["val_f1"] is None


def test_unlabelled_pixels_carry_no_loss_and_no_score():
    """Pseudo-labels leave unsure sites UNLABELLED: no gradient there, the loss equals the
    one on the labelled pixels alone, and pixel scores skip them."""
    import torch

    from simgen.labels import UNLABELLED
    from training.losses import SegmentationLoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    part = target.clone()
    part[:, :4] = UNLABELLED
    loss_fn = SegmentationLoss([1.0, 2.0, 3.0], dice_weight=1.0)
    loss_fn(logits, part).backward()
    assert torch.all(logits.grad[:, :, :4] == 0) and torch.any(logits.grad[:, :, 4:] != 0)
    # the same as the loss of the labelled half alone
    half = logits.detach()[:, :, 4:].clone().requires_grad_(True)
    torch.testing.assert_close(loss_fn(logits, part), loss_fn(half, target[:, 4:]))
    nothing = torch.full_like(target, UNLABELLED)
    assert float(loss_fn(logits, nothing).detach()) == 0.0
    scores = ColumnScores(("background", "a", "b"))
    scores.add_pixels(
        np.zeros((4, 4), int), np.r_[np.full(8, UNLABELLED), np.zeros(8)].reshape(4, 4)
    )
    assert scores.pixels.sum() == 8


def _reference_find_columns(probs, threshold, min_distance):
    """find_columns as written before it was made fast: skimage's peak_local_max and a
    watershed over the whole image, ndimage's measurements."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    fg_prob = 1.0 - probs[0].astype(np.float64)
    fg = fg_prob > threshold
    labels, n = ndimage.label(fg)
    smooth = ndimage.gaussian_filter(fg_prob, 1.0)
    peaks = peak_local_max(smooth, min_distance=min_distance, labels=labels, exclude_border=False)
    markers = np.zeros(labels.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    has = np.zeros(n + 1, bool)
    has[labels[tuple(peaks.T)]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    for j, p in enumerate(ndimage.maximum_position(smooth, labels, missing)):
        markers[p] = len(peaks) + j + 1
    labels = watershed(-smooth, markers, mask=fg)
    index = np.arange(1, int(markers.max()) + 1)
    com = np.asarray(ndimage.center_of_mass(fg_prob, labels, index)).reshape(-1, 2)
    mass = [ndimage.sum_labels(probs[c], labels, index) for c in range(1, len(probs))]
    return {
        "x": com[:, 1],
        "y": com[:, 0],
        "class_id": np.argmax(mass, axis=0) + 1,
        "score": np.asarray(ndimage.mean(fg_prob, labels, index)),
        "area": np.asarray(ndimage.sum_labels(fg, labels, index), dtype=float),
    }


def test_fast_find_columns_equals_the_plain_skimage_and_ndimage_chain():
    """Many blobs (lone, merged pairs and triples, plateaus of equal values, one-pixel
    specks): the same columns, centroids, classes, scores and areas as the plain chain."""
    rng = np.random.default_rng(3)
    shape = (160, 200)
    fg = np.zeros(shape)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for _ in range(140):
        x, y = rng.uniform(4, shape[1] - 4), rng.uniform(4, shape[0] - 4)
        r = rng.uniform(1.0, 3.5)
        fg = np.maximum(fg, 0.95 * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * r * r)))
    fg[20:24, 30:34] = 0.8  # a flat plateau: ties everywhere
    fg[100, 5] = 0.9  # a one-pixel speck
    fg = np.round(fg, 2)  # more ties
    k = rng.dirichlet(np.ones(3), size=shape).transpose(2, 0, 1)
    probs = np.concatenate([(1 - fg)[None], fg[None] * k])
    for min_distance in (2, 4):
        got = find_columns(probs, threshold=0.5, min_distance_px=min_distance, min_area_px=0)
        want = _reference_find_columns(probs, 0.5, min_distance)
        assert len(got["x"]) == len(want["x"]) > 100
        for key in ("x", "y", "score", "area"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got["class_id"], want["class_id"])


def test_find_columns_ignores_a_nan_pixel():
    """A NaN probability (e.g. an overflow under autocast) leaves the other columns as they
    are and never turns the background into a column."""
    shape = (40, 40)
    fg = np.zeros(shape)
    for x, y in ((10, 10), (28, 10), (10, 28), (28, 28)):
        fg[disk(shape, x, y, 2.5)] = 0.9
    probs = np.stack([1 - fg, fg])
    clean = find_columns(probs, min_distance_px=4)
    probs[:, 10, 10] = np.nan
    found = find_columns(probs, min_distance_px=4)
    assert len(found["x"]) == len(clean["x"]) == 4
    assert found["area"].max() <= clean["area"].max()
