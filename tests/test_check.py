"""The label checker: exact lattices pass, misplaced labels are measured."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simgen.check import CheckReport, check_labels, find_peaks, synthetic_lattice

P = 0.2


@pytest.fixture(scope="module")
def lattice():
    return synthetic_lattice((200, 220), pixel_size_A=P, rotation_deg=13.0, origin_px=(2.4, 5.7))


def test_synthetic_lattice_geometry(lattice):
    m = lattice.site == 0
    pts = np.stack([lattice.rows[m], lattice.cols[m]], axis=1)
    d = np.hypot(*(pts[1:, None, :] - pts[None, :1, :]).reshape(-1, 2).T)
    assert d[d > 0].min() == pytest.approx(3.2 / P, rel=1e-9)  # lattice constant 3.2 Å
    mx = np.hypot(
        lattice.rows[~m][:, None] - lattice.rows[m], lattice.cols[~m][:, None] - lattice.cols[m]
    )
    assert mx.min() == pytest.approx(3.2 / math.sqrt(3) / P, rel=1e-9)  # M–X in projection
    r, c = int(round(lattice.rows[m][50])), int(round(lattice.cols[m][50]))
    assert lattice.image[r, c] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("refine", ["quadratic", "centroid"])
def test_exact_labels_pass(lattice, refine):
    report = check_labels(lattice.image, lattice.rows, lattice.cols, refine=refine)
    assert report.n_labels > 300
    assert report.fraction_within(0.5) == 1.0
    limit = 0.05 if refine == "quadratic" else 0.3
    assert report.max_px < limit, str(report)


def test_quadratic_refinement_is_sub_pixel(lattice):
    report = check_labels(lattice.image, lattice.rows, lattice.cols, smooth_px=0)
    assert report.median_px < 0.02 and report.max_px < 0.05
    coarse = check_labels(lattice.image, lattice.rows, lattice.cols, refine="none")
    assert coarse.median_px > 0.2  # integer maxima are ~0.38 px off on average


def test_misplaced_labels_are_measured(lattice):
    shifted = check_labels(lattice.image, lattice.rows, lattice.cols + 0.3)
    assert shifted.median_px == pytest.approx(0.3, abs=0.03)
    assert np.median(shifted.dc_px) == pytest.approx(-0.3, abs=0.03)
    far = check_labels(lattice.image, lattice.rows + 4.0, lattice.cols)
    assert far.fraction_within(0.5) < 0.05


def test_border_labels_are_skipped(lattice):
    rows = np.array([0.5, 100.0, 198.5])
    cols = np.array([100.0, 1.0, 100.0])
    report = check_labels(lattice.image, rows, cols, border_px=2.0)
    assert report.checked.tolist() == [False, False, False]
    assert report.n_labels == 0 and math.isnan(report.median_px)


def test_report_summary(lattice):
    report = check_labels(lattice.image, lattice.rows, lattice.cols)
    d = report.to_dict()
    assert set(d) == {"n_labels", "n_peaks", "median_px", "p99_px", "max_px", "frac_within_0.5px"}
    assert all(isinstance(v, float) for v in d.values())
    assert "within 0.5 px" in str(report)
    assert isinstance(report, CheckReport)


def test_bad_checker_arguments(lattice):
    with pytest.raises(ValueError, match="refine"):
        find_peaks(lattice.image, refine="gauss")
    with pytest.raises(ValueError, match="threshold_rel"):
        find_peaks(lattice.image, threshold_rel=1.5)
    with pytest.raises(ValueError, match="image"):
        find_peaks(np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="sigma_A"):
        synthetic_lattice((10, 10), sigma_A=0)
    assert find_peaks(np.zeros((8, 8))).shape == (0, 2)
