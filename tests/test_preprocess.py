"""Image preprocessing (training/preprocess.py): each step, the order, the CLI form, and that
a model repeats the preprocessing it was trained with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fakestore import lattice_columns, render, write_fake_store
from scipy import ndimage

from training.config import PreprocessConfig, TrainConfig
from training.preprocess import (
    clahe,
    equalize,
    flatten_lines,
    parse_preprocess,
    plane_fit,
    preprocess_image,
)


def _lattice(shape=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    x, y, kinds = lattice_columns(shape, 0.3, 3.2, rng)
    return render(shape, x, y, np.where(np.array(kinds) == "M", 1.0, 0.6), 0.4 / 0.3)


def test_plane_fit_removes_a_tilt_exactly():
    img = _lattice()
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    tilted = img + 3.0 + 0.1 * xx - 0.05 * yy
    np.testing.assert_allclose(plane_fit(tilted), plane_fit(img), atol=1e-9)
    assert abs(plane_fit(tilted).mean()) < 1e-9


def test_line_flattening_removes_offsets_and_ramps_per_line():
    img = _lattice()
    rng = np.random.default_rng(1)
    offsets = rng.normal(0, 2.0, (img.shape[0], 1))
    np.testing.assert_allclose(flatten_lines(img + offsets), flatten_lines(img), atol=1e-9)
    x = np.linspace(-1, 1, img.shape[1])[None, :]
    ramps = offsets + rng.normal(0, 1.0, (img.shape[0], 1)) * x
    np.testing.assert_allclose(
        flatten_lines(img + ramps, "poly", 1), flatten_lines(img, "poly", 1), atol=1e-9
    )
    # median flattening leaves a ramp along the line; a degree-1 fit does not
    assert np.abs(flatten_lines(img + ramps) - flatten_lines(img)).max() > 0.5
    with pytest.raises(ValueError, match="lines: expected median or poly"):
        flatten_lines(img, "mean")


def test_gaussian_smoothing_in_angstrom_and_clahe():
    noise = np.random.default_rng(2).normal(0, 1, (256, 256))
    cfg = PreprocessConfig(gaussian_sigma_A=0.6)
    out = preprocess_image(noise, cfg, pixel_size_A=0.3)  # σ = 2 px
    # white noise smoothed by a Gaussian of σ px keeps std 1 / (2 √π σ)
    assert out.std() == pytest.approx(1 / (2 * np.sqrt(np.pi) * 2.0), rel=0.1)
    # CLAHE equalises the contrast of a dim half and a bright half
    img = _lattice((64, 128))
    img[:, :64] *= 0.1
    eq = clahe(img, kernel_px=32, clip=0.05)
    assert eq.min() >= 0 and eq.max() <= 1
    before = img[:, :64].std() / img[:, 64:].std()
    after = eq[:, :64].std() / eq[:, 64:].std()
    assert before < 0.15 and after > 0.5


def test_equalize_is_invariant_to_monotonic_intensity_changes():
    """Gain, offset, gamma and a log scale give the same equalised image; the ranks keep
    the columns' order (metal above chalcogen) and fill (0, 1) uniformly."""
    img = _lattice()
    eq = equalize(img)
    for changed in (3.0 * img + 7.0, img**2.2, np.log1p(img), np.sqrt(img) * 100):
        np.testing.assert_array_equal(equalize(changed), eq)
    assert 0.0 < eq.min() and eq.max() < 1.0
    assert eq.mean() == pytest.approx(0.5, abs=1e-3)
    peak = np.unravel_index(np.argmax(img), img.shape)
    assert eq[peak] == eq.max()
    assert np.all(equalize(np.ones((4, 4))) == 0.5)
    # not invariant to a non-monotonic change (it is a rank transform, nothing more)
    assert not np.array_equal(equalize((img - img.mean()) ** 2), eq)
    cfg = PreprocessConfig.from_dict(parse_preprocess("equalize"))
    assert cfg.active
    np.testing.assert_allclose(preprocess_image(img**0.7, cfg, 0.3), eq, atol=1e-6)


def test_steps_run_in_the_documented_order_whatever_the_order_asked():
    a = parse_preprocess("clahe=0.02, gauss=0.5,lines=poly2,plane")
    b = parse_preprocess("plane,lines=poly2,gauss=0.5,clahe=0.02")
    assert a == b == {
        "clahe": True, "clahe_clip": 0.02, "gaussian_sigma_A": 0.5, "lines": "poly",
        "line_degree": 2, "plane": True,
    }  # fmt: skip
    img = _lattice()
    cfg = PreprocessConfig.from_dict(a)
    smooth = ndimage.gaussian_filter(flatten_lines(plane_fit(img), "poly", 2), 0.5 / 0.3)
    by_hand = clahe(smooth, round(20.0 / 0.3), 0.02)
    np.testing.assert_allclose(preprocess_image(img, cfg, 0.3), by_hand, atol=1e-6)
    assert parse_preprocess("none")["plane"] is False
    for bad in ("plane=3", "lines=cubic", "gauss=wide", "sharpen"):
        with pytest.raises(ValueError, match="--preprocess: cannot read"):
            parse_preprocess(bad)
    with pytest.raises(ValueError, match="gaussian_sigma_A"):
        PreprocessConfig(gaussian_sigma_A=-1.0)


def test_a_model_repeats_its_preprocessing_at_inference(tmp_path):
    from training.predict import Ensemble
    from training.train import train_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = write_fake_store(tmp_path / "s.zarr", n_samples=4, shape=(48, 48))
        base = {
            "epochs": 1, "progress": False,
            "data": {"train_stores": [str(store)], "crop": 32, "batch_size": 4},
            "model": {"depth": 1, "width": 4},
        }  # fmt: skip
        flat = TrainConfig.from_dict({**base, "preprocess": {"lines": "median"}})
        train_model(flat, tmp_path / "flat")
        train_model(TrainConfig.from_dict(base), tmp_path / "plain")
        img = np.asarray(_lattice((48, 48)), dtype=np.float32) * 50
        streaks = img + np.random.default_rng(3).normal(0, 20, (48, 1)).astype(np.float32)
        ens = Ensemble.load(tmp_path / "flat")
        assert ens.preprocess.lines == "median"
        # line offsets are removed before the network: the same probabilities
        a, _ = ens.predict(img, tile=48)
        b, _ = ens.predict(streaks, tile=48)
        np.testing.assert_allclose(a, b, atol=1e-4)
        plain = Ensemble.load(tmp_path / "plain")
        c, _ = plain.predict(img, tile=48)
        d, _ = plain.predict(streaks, tile=48)
        assert np.abs(c - d).max() > 1e-3
        # an explicit preprocessing replaces the model's
        e, _ = plain.predict(streaks, tile=48, preprocess={"lines": "median"})
        f, _ = plain.predict(img, tile=48, preprocess={"lines": "median"})
        np.testing.assert_allclose(e, f, atol=1e-4)
    finally:
        torch.set_num_threads(n)
