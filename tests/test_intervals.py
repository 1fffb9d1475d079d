"""Bootstrap intervals over test images (training/intervals.py) and test-set sizing
(simgen/sweep.py ``images_for_interval``): the statistics of the noise study."""

from __future__ import annotations

import numpy as np
import pytest

from simgen.sweep import images_for_interval
from training.intervals import (
    f1_metrics,
    percentile_interval,
    resample_weights,
    resampled_metrics,
    stream,
)
from training.metrics import ColumnScores

NAMES = ["background", "metal", "chalcogen", "vac_X1", "vac_X2", "vac_M"]
DEFECTS = ["vac_X1", "vac_X2", "vac_M"]


def _image(rng, n_true=40, p_miss=0.1, p_confuse=0.1, n_false=2):
    """True columns on a grid and detections: some missed, some misclassified, some false."""
    xy = np.stack(np.meshgrid(np.arange(8) * 6.0, np.arange(5) * 6.0), -1).reshape(-1, 2)[:n_true]
    cls = rng.choice([1, 2, 3, 4, 5], size=len(xy), p=[0.45, 0.4, 0.09, 0.03, 0.03])
    keep = rng.random(len(xy)) > p_miss
    pred_cls = np.where(rng.random(len(xy)) < p_confuse, rng.integers(1, 6, len(xy)), cls)
    px = np.concatenate([xy[keep, 0] + 0.1, rng.uniform(0, 45, n_false)])
    py = np.concatenate([xy[keep, 1], rng.uniform(0, 27, n_false) + 0.5])
    pred = {"x": px, "y": py, "class_id": np.concatenate([pred_cls[keep], [1] * n_false])}
    true = {"x": xy[:, 0], "y": xy[:, 1], "class_id": cls}
    return pred, true


def _scores(seed, n_images, **kw):
    rng = np.random.default_rng(seed)
    scores = ColumnScores(NAMES)
    for _ in range(n_images):
        pred, true = _image(rng, **kw)
        scores.add_columns(pred, true, radius_px=1.0)
    return scores


def test_f1s_from_summed_image_counts_equal_the_scores_summary():
    from training.noise_study import macro_f1

    scores = _scores(0, 12)
    counts = scores.image_counts()
    assert counts.shape == (12, 3 + 3 * len(NAMES))
    summary = scores.summary()
    got = f1_metrics(counts.sum(0), NAMES, DEFECTS)
    assert got["detection_f1"] == pytest.approx(summary["detection"]["f1"], rel=1e-12)
    for name, c in summary["classes"].items():
        if c["f1"] is None:
            assert np.isnan(got[f"f1_{name}"])
        else:
            assert got[f"f1_{name}"] == pytest.approx(c["f1"], rel=1e-12)
    assert got["macro_f1"] == pytest.approx(macro_f1(summary["classes"]), rel=1e-12)
    assert got["macro_defect_f1"] == pytest.approx(macro_f1(summary["classes"], DEFECTS), rel=1e-12)
    # a class with true columns and no detection is undefined, but counts 0 in the macro
    none = np.zeros(3 + 3 * 3, np.int64)
    none[[2, 3 + 6 + 1, 3 + 6 + 2]] = [5, 3, 2]  # 5 true columns, 3 of class 1, 2 of class 2
    none[[0, 1, 3 + 1, 3 + 3 + 1]] = [3, 3, 3, 3]  # class 1 found perfectly
    m = f1_metrics(none, ["bg", "a", "b"], ["a", "b"])
    assert m["f1_a"] == 1.0 and np.isnan(m["f1_b"]) and m["macro_defect_f1"] == 0.5
    zero = f1_metrics(none, ["bg", "a", "b"], ["a", "b"], undefined_as_zero=True)
    assert zero["f1_b"] == 0.0 and zero["macro_defect_f1"] == 0.5  # what repeats average


def test_bootstrap_interval_shrinks_with_the_number_of_images():
    small = _scores(1, 20).image_counts()
    big = np.concatenate([small] * 16)  # the same images, 16 times as many
    widths = []
    for counts in (small, big):
        w = resample_weights(len(counts), 2000, stream(0, "t"))
        lo, hi = percentile_interval(resampled_metrics(counts, w, NAMES, DEFECTS)["macro_f1"])
        widths.append(hi - lo)
    assert widths[0] > 0
    assert widths[0] / widths[1] == pytest.approx(4.0, rel=0.2)  # 1/sqrt(n)


def test_paired_difference_is_narrower_than_the_separate_intervals():
    """Two models on the same images (some images harder than others): one is the other
    with a few more misses. The paired difference is clearly positive although the
    separate intervals overlap."""
    rng = np.random.default_rng(3)
    good, worse = ColumnScores(NAMES), ColumnScores(NAMES)
    for _ in range(30):
        pred, true = _image(rng, p_miss=rng.uniform(0.0, 0.3), p_confuse=0.05)
        good.add_columns(pred, true, radius_px=1.0)
        drop = rng.random(len(pred["x"])) < 0.03
        worse.add_columns({k: v[~drop] for k, v in pred.items()}, true, radius_px=1.0)
    w = resample_weights(30, 2000, stream(0, "images/x"))
    a = resampled_metrics(good.image_counts(), w, NAMES, DEFECTS)["detection_f1"]
    b = resampled_metrics(worse.image_counts(), w, NAMES, DEFECTS)["detection_f1"]
    lo_a, hi_a = percentile_interval(a)
    lo_b, hi_b = percentile_interval(b)
    lo_d, hi_d = percentile_interval(a - b)
    assert lo_a < hi_b  # the separate intervals overlap
    assert lo_d > 0  # the paired difference does not include 0
    assert hi_d - lo_d < 0.5 * min(hi_a - lo_a, hi_b - lo_b)


def test_resamples_depend_only_on_seed_and_name():
    a = resample_weights(10, 50, stream(0, "images/lambda5-20"))
    assert np.array_equal(a, resample_weights(10, 50, stream(0, "images/lambda5-20")))
    assert not np.array_equal(a, resample_weights(10, 50, stream(0, "images/lambda0")))
    assert not np.array_equal(a, resample_weights(10, 50, stream(1, "images/lambda5-20")))
    assert (a.sum(1) == 10).all()


def test_images_for_interval_scales_as_one_over_width_squared():
    rates = {"vac_X1": 2.75, "vac_X2": 0.8, "vac_M": 0.9}
    n1, one = images_for_interval(0.05, rates)
    n2, _ = images_for_interval(0.025, rates)
    assert n2 == pytest.approx(4 * n1, abs=2)
    # rarer defects need more images; an F1 near 1 needs fewer
    assert images_for_interval(0.05, {k: v / 2 for k, v in rates.items()})[0] > n1
    assert images_for_interval(0.05, rates, f1=0.99)[0] < n1
    # the formula: z * sqrt(f(1-f) * sum(1/m)) / C for one image
    assert one == pytest.approx(1.959964 * np.sqrt(0.09 * sum(1 / v for v in rates.values())) / 3)
    with pytest.raises(ValueError, match="no defect columns"):
        images_for_interval(0.05, {})
    with pytest.raises(ValueError, match="--target-ci"):
        images_for_interval(1.5, rates)


def test_images_for_interval_gives_the_wanted_spread_of_simulated_f1s():
    """Simulated studies of the planned size: defect columns per image Poisson, each found
    (no false detection) with probability 0.9. The plan is conservative, not loose: the
    macro F1's 95 % half-width is at most the target, and more than half of it."""
    rates = {"a": 3.0, "b": 0.8, "c": 0.9}
    n, _ = images_for_interval(0.05, rates, f1=0.9)
    rng = np.random.default_rng(0)
    macros = []
    for _ in range(400):
        f1s = []
        for m in rates.values():
            true = rng.poisson(m, n).sum()
            tp = rng.binomial(true, 0.9)
            f1s.append(2 * tp / (tp + true))  # precision 1, recall tp/true
        macros.append(np.mean(f1s))
    lo, hi = np.quantile(macros, [0.025, 0.975])
    # with precision fixed at 1, F1 = 2r/(1+r) moves ~0.55x as much as the recall r
    assert 0.5 * 0.05 < (hi - lo) / 2 < 0.05 * 1.05


def test_sweep_target_ci_refuses_bad_input_before_writing(tmp_path):
    from typer.testing import CliRunner

    from simgen.cli import app

    out = tmp_path / "sweep"
    base = ["sweep", "--noise-lambda", "5-20", "--size", "64", "-o", str(out)]
    for extra, message in (
        (["--target-ci", "0.05", "--set", "structure.defects={}"], "no defect columns"),
        (["--target-ci", "2"], "expected a half-width between 0 and 1"),
        (["--target-ci", "0.05", "--planning-f1", "1"], "--planning-f1"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()
