"""Quality figures of a labelled image (simgen/experiment/quality.py) on known geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_lattice import render_haadf

from simgen.experiment.quality import (
    contrast_ratio,
    honeycomb_consistency,
    quality_figures,
    verdict,
)
from structures import CHALCOGEN, METAL


def honeycomb(size=200, bond=10.0):
    """A perfect 2H projection filling a ``size``² image: metal sites on a triangular
    lattice, chalcogens at (a1 + a2)/3."""
    a = bond * math.sqrt(3)
    a1, a2 = np.array([a, 0.0]), np.array([a / 2, a * math.sqrt(3) / 2])
    n = int(3 * size / a)
    ij = np.array([(i, j) for i in range(-n, n) for j in range(-n, n)], float)
    metal = ij @ np.array([a1, a2]) + 3.0
    chalc = metal + (a1 + a2) / 3
    xy = np.concatenate([metal, chalc])
    site = np.concatenate([np.full(len(metal), METAL), np.full(len(chalc), CHALCOGEN)])
    keep = np.all((xy >= 0) & (xy <= size - 1), axis=1)
    return xy[keep], site[keep], (size, size)


def test_honeycomb_perfect_swapped_and_random():
    xy, site, shape = honeycomb()
    frac, n = honeycomb_consistency(xy, site, 10.0, shape)
    assert frac == 1.0 and n > 200
    wrong = site.copy()
    wrong[::7] = 1 - wrong[::7]  # mislabelled sublattice
    assert honeycomb_consistency(xy, wrong, 10.0, shape)[0] < 0.8
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, shape[1], (len(xy), 2))
    assert honeycomb_consistency(noise, site, 10.0, shape)[0] < 0.2
    # a bond length 40 % off is not a honeycomb at ±25 %
    assert honeycomb_consistency(xy, site, 14.0, shape)[0] == 0.0


def test_contrast_ratio_matches_the_rendered_weights():
    # render_haadf: Gaussian columns of weight Σ Z^1.7 -> W/Se2 peak ratio 74^1.7 / (2·34^1.7)
    img, table, ml, (col, row) = render_haadf("WSe2", 0.1, (256, 256), 0.0, dose=1e6)
    xy = np.column_stack([col, row])
    inside = (xy[:, 0] > 5) & (xy[:, 0] < 250) & (xy[:, 1] > 5) & (xy[:, 1] < 250)
    metal = inside & (table.site == METAL)
    chalc = inside & (table.site == CHALCOGEN)
    bond = 3.282 / math.sqrt(3) / 0.1
    ratio = contrast_ratio(img, xy[metal], xy[chalc], bond)
    expected = 74**1.7 / (2 * 34**1.7)
    assert ratio == pytest.approx(expected, rel=0.1)
    # independent of offset and gain (8-bit stretch)
    assert contrast_ratio(img * 3.7 + 50, xy[metal], xy[chalc], bond) == pytest.approx(ratio)


def test_quality_figures_and_verdict():
    xy, site, shape = honeycomb()
    img = np.zeros(shape, np.float32)
    cls = np.where(site == METAL, 1, 2)
    prob = np.full(len(xy), 0.95)
    q = quality_figures(img, xy, site, cls, prob, np.zeros((0, 2)), np.zeros(0), 10.0)
    assert q["verdict"] == "ok" and q["reasons"] == []
    assert q["sites_detected_fraction"] == 1.0 and q["off_lattice_fraction"] == 0.0
    # a fifth of the sites missed and reported as empty: poor, with the reason
    miss = np.arange(len(xy)) % 5 == 0
    q = quality_figures(img, xy[~miss], site[~miss], cls[~miss], prob[~miss], xy[miss],
                        site[miss], 10.0)  # fmt: skip
    assert q["sites_detected_fraction"] == pytest.approx(0.8, abs=0.01)
    assert q["verdict"] == "poor" and "lattice sites with a column" in q["reasons"][0]
    v = verdict({"honeycomb_consistency": 0.99, "contrast_metal_chalcogen": 1.17,
                 "train_contrast": [1.6, 2.1]})  # fmt: skip
    assert v["verdict"] == "check"
    assert v["reasons"] == [
        "metal/chalcogen contrast 1.17, training data 1.60-2.10: outside what the model saw"
    ]
