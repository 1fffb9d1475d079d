"""Class masks, heatmaps and column tables in recorded-image pixels."""

from __future__ import annotations

import numpy as np
import pytest

from simgen.acquisition import AcquisitionConfig, apply_acquisition, required_padding_px
from simgen.check import synthetic_lattice
from simgen.labels import (
    LabelConfig,
    class_heatmaps,
    class_mask,
    column_labels,
    make_labels,
)

P = 0.2


def reference_mask(rows, cols, ids, shape, radius):
    """Brute force: every pixel takes the class of its nearest column within radius."""
    h, w = shape
    rr, cc = np.mgrid[0:h, 0:w]
    d2 = (rr[None] - rows[:, None, None]) ** 2 + (cc[None] - cols[:, None, None]) ** 2
    nearest = np.argmin(d2, axis=0)  # first index on exact ties, as class_mask
    out = ids[nearest].astype(np.uint8)
    out[np.min(d2, axis=0) > radius**2] = 0
    return out


def test_mask_matches_brute_force_nearest_column():
    rng = np.random.default_rng(0)
    rows, cols = rng.uniform(-4, 68, 60), rng.uniform(-4, 52, 60)
    ids = rng.integers(1, 6, 60)
    for radius in (1.5, 3.0, 4.7):
        got = class_mask(rows, cols, ids, (64, 48), radius_px=radius)
        np.testing.assert_array_equal(got, reference_mask(rows, cols, ids, (64, 48), radius))
    # on a half-pixel lattice many pixels are exactly as far from two columns (and class 0
    # columns claim their disk as background)
    rows, cols = rng.integers(0, 40, 80) / 2.0, rng.integers(0, 30, 80) / 2.0
    ids = rng.integers(0, 6, 80)
    got = class_mask(rows, cols, ids, (24, 18), radius_px=2.0)
    np.testing.assert_array_equal(got, reference_mask(rows, cols, ids, (24, 18), 2.0))


def test_disk_is_centred_on_the_sub_pixel_position():
    mask = class_mask(np.array([10.3]), np.array([20.6]), np.array([4]), (32, 40), radius_px=3.5)
    rr, cc = np.nonzero(mask)
    assert set(np.unique(mask)) == {0, 4}
    assert np.all((rr - 10.3) ** 2 + (cc - 20.6) ** 2 <= 3.5**2)
    assert rr.mean() == pytest.approx(10.3, abs=0.2) and cc.mean() == pytest.approx(20.6, abs=0.2)


def test_overlapping_disks_nearest_wins():
    mask = class_mask(
        np.array([8.0, 8.0]), np.array([8.0, 12.0]), np.array([1, 2]), (16, 24), radius_px=3
    )
    assert mask[8, 9] == 1 and mask[8, 11] == 2
    assert mask[8, 10] == 1  # exact tie: the column listed first


def test_heatmaps_peak_and_background_channel():
    rows, cols, ids = (
        np.array([10.0, 10.0, 30.0]),
        np.array([10.0, 13.0, 30.0]),
        np.array([1, 1, 2]),
    )
    hm = class_heatmaps(rows, cols, ids, (40, 40), 3, sigma_px=2.0)
    assert hm.shape == (3, 40, 40) and hm.dtype == np.float32
    assert hm[1, 10, 10] == pytest.approx(1.0) and hm[2, 30, 30] == pytest.approx(1.0)
    assert hm[1].max() <= 1.0  # overlapping columns take the maximum, not the sum
    assert hm[1, 10, 11] == pytest.approx(np.exp(-1 / 8), rel=1e-6)
    np.testing.assert_allclose(hm[0], 1 - hm[1:].max(axis=0))
    assert hm[2, 10, 10] == 0.0
    none = class_heatmaps(np.array([5.0]), np.array([5.0]), np.array([0]), (10, 10), 2, sigma_px=1)
    assert none[1].max() == 0 and none[0].min() == 1


def test_bad_label_arguments():
    with pytest.raises(ValueError, match="kind"):
        LabelConfig(kind="disks")
    with pytest.raises(ValueError, match="disk_radius_A"):
        LabelConfig.from_dict({"disk_radius_A": 0})
    with pytest.raises(ValueError, match="class_ids"):
        class_mask(np.zeros(2), np.zeros(2), np.array([1, 300]), (4, 4), radius_px=1)
    with pytest.raises(ValueError, match="class_ids"):
        class_heatmaps(np.zeros(1), np.zeros(1), np.array([3]), (4, 4), 3, sigma_px=1)
    with pytest.raises(ValueError, match="cols"):
        class_mask(np.zeros(2), np.zeros(3), np.array([1, 1]), (4, 4), radius_px=1)


def test_make_labels_kinds():
    rows, cols, ids = np.array([5.0]), np.array([6.0]), np.array([2])
    both = make_labels(rows, cols, ids, (12, 12), LabelConfig(kind="both"), pixel_size_A=P)
    assert both["mask"][5, 6] == 2 and both["heatmaps"].shape == (3, 12, 12)
    only = make_labels(rows, cols, ids, (12, 12), pixel_size_A=P)
    assert set(only) == {"mask"}
    # 0.7 Å at 0.2 Å/px = 3.5 px radius
    assert only["mask"].sum() // 2 == np.sum(
        (np.mgrid[0:12, 0:12][0] - 5) ** 2 + (np.mgrid[0:12, 0:12][1] - 6) ** 2 <= 3.5**2
    )


class _Table:
    def __init__(self, n):
        self.class_id = np.arange(n) % 3
        self.site = (np.arange(n) % 2).astype(np.int8)
        self.composition = np.array(["Mo", "S2"] * (n // 2) + ["Mo"] * (n % 2))
        self.counts = np.ones((n, 2), dtype=int)


def test_column_labels_stay_aligned_with_the_table():
    table = _Table(7)
    rows = np.array([1.0, -3.0, 2.0, 50.0, 4.0, 5.0, 6.0])
    cols = rows[::-1].copy()
    inside = (rows >= -0.5) & (rows < 9.5) & (cols >= -0.5) & (cols < 9.5)
    lab = column_labels(table, rows, cols, inside)
    np.testing.assert_array_equal(lab.index, np.flatnonzero(inside))
    np.testing.assert_array_equal(lab.y, rows[inside])
    np.testing.assert_array_equal(lab.x, cols[inside])
    np.testing.assert_array_equal(lab.class_id, table.class_id[lab.index])
    np.testing.assert_array_equal(lab.composition, table.composition[lab.index])
    assert lab.counts.shape == (len(lab), 2) and lab.defect is None
    everything = column_labels(table, rows, cols, inside, keep="all")
    assert len(everything) == 7 and not everything.inside.all()
    assert set(everything.as_dict()) == {
        "index",
        "x",
        "y",
        "inside",
        "class_id",
        "site",
        "counts",
        "composition",
    }


def test_mask_follows_the_distorted_image():
    """Every disk of the mask is centred on its column's blob in the distorted image."""
    cfg = AcquisitionConfig.from_dict(
        {
            "drift": {"vx_A_per_s": 0.8, "vy_A_per_s": -0.6, "nonlinear_A": 0.1},
            "jitter": {"line_x_A": 0.05},
            "contamination": {"rel": 0.0},
            "current": {"drift_rel": 0.0, "line_rel": 0.0},
        }
    )
    shape = (160, 160)
    pad = required_padding_px(cfg, shape, P)
    lat = synthetic_lattice((shape[0] + 2 * pad,) * 2, pixel_size_A=P, rotation_deg=11.0)
    out = apply_acquisition(lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=P, rng=3)
    ids = np.arange(1, len(lat.rows) + 1) % 250 + 1  # one label per column (wraps at 250)
    mask = class_mask(out.rows, out.cols, ids, shape, radius_px=3.0)
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    inner = out.inside & (out.rows > 4) & (out.rows < shape[0] - 5) & (out.cols > 4)
    inner &= out.cols < shape[1] - 5
    errors = []
    for i in np.flatnonzero(inner):
        disk = mask == ids[i]
        near = disk & ((rr - out.rows[i]) ** 2 + (cc - out.cols[i]) ** 2 <= 9)
        wgt = out.noise_free[near]
        errors.append(
            np.hypot(
                (wgt * rr[near]).sum() / wgt.sum() - out.rows[i],
                (wgt * cc[near]).sum() / wgt.sum() - out.cols[i],
            )
        )
    assert len(errors) > 100
    assert np.percentile(errors, 99) < 0.5
