"""Store checks, split, dataset items, augmentation and normalisation of training/."""

import numpy as np
import pytest
import torch
import zarr
from _fakestore import SCHEME, write_fake_store

from training.augment import augment, dihedral, inverse_dihedral, normalize_image, random_crop
from training.config import AugmentConfig, DataConfig, TrainConfig, annotated_yaml
from training.data import (
    EpochSampler,
    build_datasets,
    class_frequencies,
    make_loaders,
)
from training.losses import class_weights_from_frequencies
from training.stores import (
    StoreError,
    open_store,
    open_stores,
    scheme_from_attrs,
    split_indices,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_fake_store(
        tmp_path_factory.mktemp("data") / "a.zarr", 10, (40, 48), incomplete=[2]
    )


def test_open_store_reads_documented_schema(store):
    st = open_store(store)
    assert st.n_samples == 10 and st.image_shape == (40, 48)
    assert st.scheme == scheme_from_attrs(SCHEME)
    assert st.scheme.class_names == ["background", "M", "X2", "vac_X1", "vac_X2", "vac_M"]
    assert list(st.complete_indices()) == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    cols = st.columns(0)
    root = zarr.open_group(str(store), mode="r")
    assert len(cols["x"]) == int(root["columns/count"][0]) > 10
    assert st.image(0).dtype == np.float32 and st.mask(0).dtype == np.uint8


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="store not found"):
        open_store(tmp_path / "nope.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="empty"):
        open_store(tmp_path / "empty")


def test_wrong_schema_version_is_refused(tmp_path):
    path = write_fake_store(tmp_path / "v2.zarr", 2, (32, 32), schema_version=2)
    with pytest.raises(StoreError, match="schema_version 2 is not supported"):
        open_store(path)


def test_missing_array_is_reported(tmp_path):
    path = write_fake_store(tmp_path / "a.zarr", 2, (32, 32))
    root = zarr.open_group(str(path), mode="a")
    del root["masks"]
    with pytest.raises(StoreError, match="missing array 'masks'"):
        open_store(path)


def test_store_with_drawn_pixel_size_is_refused(tmp_path):
    path = write_fake_store(tmp_path / "p.zarr", 2, (32, 32))
    zarr.open_group(str(path), mode="a").attrs["pixel_size_A"] = None  # drawn per sample
    with pytest.raises(StoreError, match="one pixel size per store"):
        open_store(path)


def test_label_scheme_mismatch_between_stores(tmp_path, store):
    other = {"ids": [1, 2, 3, 4, 5], "names": ["M", "X2", "vac_X2", "vac_X1", "vac_M"]}
    path = write_fake_store(tmp_path / "b.zarr", 2, (32, 32), scheme=other)
    with pytest.raises(StoreError, match="label scheme mismatch"):
        open_stores([store, path])
    cfg = DataConfig(train_stores=(str(store),), val_stores=(str(path),))
    with pytest.raises(StoreError, match="label scheme mismatch"):
        build_datasets(cfg, None, 0)


def test_scheme_with_background_id():
    s = scheme_from_attrs({"ids": [0, 1, 3], "names": ["bg", "metal", "chalcogen"]})
    assert s.n_classes == 4
    assert s.class_names == ["bg", "metal", "unused_2", "chalcogen"]
    with pytest.raises(StoreError, match="duplicate"):
        scheme_from_attrs({"ids": [1, 1], "names": ["a", "b"]})


def test_split_is_deterministic_and_skips_incomplete(store):
    st = open_store(store)
    train, val = split_indices(st, val_fraction=0.2)
    assert list(train) == [0, 1, 3, 4, 5, 6, 7] and list(val) == [8, 9]
    train, val = split_indices(st, train_range=(0, 4), val_range=(6, 10))
    assert list(train) == [0, 1, 3] and list(val) == [6, 7, 8, 9]
    train, val = split_indices(st, val_range=(0, 3))
    assert list(val) == [0, 1] and list(train) == [3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(StoreError, match="overlaps"):
        split_indices(st, train_range=(0, 6), val_range=(5, 10))


def test_dataset_items_and_epoch_keys(store):
    train, val = build_datasets(
        DataConfig(train_stores=(str(store),), crop=32, val_fraction=0.2), AugmentConfig(), 3
    )
    assert len(train) == 7 and len(val) == 2
    a, b = train[(1, 0, 5)], train[(1, 0, 5)]
    assert a["image"].shape == (1, 32, 32) and a["mask"].shape == (32, 32)
    assert a["image"].dtype == torch.float32 and a["mask"].dtype == torch.int64
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    c = train[(1, 1, 5)]
    assert not torch.equal(a["image"], c["image"])
    v = val[0]
    assert v["image"].shape == (1, 40, 48) and set(v["columns"]) == {"x", "y", "class_id"}


def test_sampler_reshuffles_per_epoch_and_repeats():
    s = EpochSampler(5, samples_per_epoch=12, seed=1)
    keys0 = list(s)
    assert len(keys0) == 12 and [k[2] for k in keys0] == list(range(12))
    assert sorted(k[0] for k in keys0[:5]) == list(range(5))
    s.set_epoch(1)
    keys1 = list(s)
    assert [k[0] for k in keys1] != [k[0] for k in keys0] and keys1[0][1] == 1
    s.set_epoch(0)
    assert list(s) == keys0


def test_loader_with_workers_matches_main_process(store):
    cfg = DataConfig(train_stores=(str(store),), crop=32, batch_size=3, val_fraction=0.2)
    train, val = build_datasets(cfg, AugmentConfig(noise_std=0.1), 0)
    batches = []
    for workers in (0, 2):
        loader, _ = make_loaders(train, val, cfg.replace(num_workers=workers), seed=0)
        loader.sampler.set_epoch(1)
        batches.append([b["image"] for b in loader])
    for x, y in zip(*batches, strict=True):
        assert torch.equal(x, y)


def test_normalize_image_is_robust_and_unit_free():
    rng = np.random.default_rng(0)
    img = rng.poisson(8.0, (64, 64)).astype(np.float32)
    n = normalize_image(img)
    assert n.dtype == np.float32
    np.testing.assert_allclose(np.percentile(n, [1, 99]), [0, 1], atol=1e-6)
    np.testing.assert_allclose(normalize_image(img * 37.0 + 5.0), n, atol=1e-5)
    hot = img.copy()
    hot[0, 0] = 1e6  # one hot pixel does not change the scale
    np.testing.assert_allclose(normalize_image(hot)[1:], n[1:], atol=1e-6)
    assert np.all(normalize_image(np.full((8, 8), 3.0)) == 0)
    with pytest.raises(ValueError, match="NaN"):
        normalize_image(np.full((4, 4), np.nan))


def test_augment_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    img = rng.random((12, 16)).astype(np.float32)
    for k in range(8):
        t = dihedral(img, k)
        assert np.array_equal(inverse_dihedral(t, k), img)
    mask = (img > 0.5).astype(np.uint8)
    for seed in range(10):
        a, m = augment(img, mask, np.random.default_rng(seed), scale=(1, 1), offset=(0, 0))
        assert np.array_equal(m, (a > 0.5).astype(np.uint8))
    ci, cm = random_crop(img, mask, 8, np.random.default_rng(1))
    assert ci.shape == (8, 8) and np.array_equal(cm, (ci > 0.5).astype(np.uint8))


def test_class_weights_from_frequencies(store):
    train, _ = build_datasets(DataConfig(train_stores=(str(store),), crop=0), None, 0)
    counts = class_frequencies(train, 6)
    assert counts.sum() == len(train) * 40 * 48 and counts[0] > counts[1] > 0
    w = class_weights_from_frequencies(counts, power=0.5, max_weight=20)
    assert w[0] < w[1] and np.all(w <= 20)
    freq = counts / counts.sum()
    present = (counts > 0) & (w < 20)
    assert np.sum(freq[present] * w[present]) <= 1.0 + 1e-9
    np.testing.assert_allclose(class_weights_from_frequencies([3, 1], power=0), [1, 1])


def test_config_validation_and_annotated_template():
    assert TrainConfig.from_yaml(annotated_yaml()) == TrainConfig()
    with pytest.raises(ValueError, match="unknown key data.crops"):
        TrainConfig.from_dict({"data": {"crops": 3}})
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig.from_dict({"optim": {"schedule": "step"}})
    with pytest.raises(ValueError, match="crop"):
        TrainConfig.from_dict({"data": {"crop": 8}})
