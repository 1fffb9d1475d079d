"""Store schema round trip, resume bookkeeping, and reading with plain zarr."""

from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from simgen import store


def _layout(n=4, c=12, shape=(16, 20)):
    return store.StoreLayout(
        n_samples=n,
        image_shape=shape,
        column_capacity=c,
        elements=("S", "Mo"),
        param_names=("defocus_A", "lam"),
    )


def _sample(i, n_cols=5, shape=(16, 20)):
    rng = np.random.default_rng(i)
    return SimpleNamespace(
        image=rng.random(shape, dtype=np.float32),
        mask=rng.integers(0, 3, shape).astype(np.uint8),
        columns={
            "x": rng.random(n_cols) * 20,
            "y": rng.random(n_cols) * 16,
            "class_id": rng.integers(0, 3, n_cols),
            "site": rng.integers(0, 2, n_cols),
            "n_atoms": rng.integers(0, 3, n_cols),
            "counts": rng.integers(0, 3, (n_cols, 2)),
            "elements": ("Mo", "S"),
        },
        params={"defocus_A": float(i), "lam": 10.0 + i},
    )


ATTRS = {
    "config": {"a": 1},
    "label_scheme": {"name": "atoms", "names": ["background", "metal", "chalcogen"]},
    "pixel_size_A": 0.2,
    "calibration": None,
}


def test_schema_round_trip_and_plain_zarr(tmp_path):
    path = tmp_path / "s.zarr"
    root = store.create_store(path, _layout(), ATTRS)
    assert list(store.pending_indices(root)) == [0, 1, 2, 3]
    s1 = _sample(1)
    store.write_sample(root, 1, s1)
    assert list(store.pending_indices(root)) == [0, 2, 3]
    # read back without simgen: plain zarr
    plain = zarr.open_group(str(path), mode="r")
    assert plain.attrs["schema_version"] == store.SCHEMA_VERSION
    assert plain["images"].chunks == (1, 16, 20)
    np.testing.assert_array_equal(plain["images"][1], s1.image)
    np.testing.assert_array_equal(plain["masks"][1], s1.mask)
    o, n = int(plain["columns/offset"][1]), int(plain["columns/count"][1])
    assert (o, n) == (12, 5)
    np.testing.assert_allclose(plain["columns/x"][o : o + n], s1.columns["x"], rtol=1e-6)
    # element order of the store (S, Mo) differs from the sample's (Mo, S): remapped
    counts = plain["columns/counts"][o : o + n]
    np.testing.assert_array_equal(counts[:, 0], s1.columns["counts"][:, 1])
    assert plain["params/defocus_A"][1] == 1.0 and np.isnan(plain["params/lam"][0])
    info = store.summary(store.open_store(path))
    assert info["completed"] == 1 and info["params"]["lam"] == (11.0, 11.0)


def test_resume_refuses_other_config_and_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    store.create_store(path, _layout(), ATTRS)
    store.open_for_resume(path, ATTRS["config"], _layout())  # same config: fine
    with pytest.raises(store.StoreError, match="different config"):
        store.open_for_resume(path, {"a": 2}, _layout())
    with pytest.raises(store.StoreError, match="overwrite"):
        store.create_store(path, _layout(), ATTRS)
    store.create_store(path, _layout(), ATTRS, overwrite=True)


def test_capacity_and_missing_store_errors(tmp_path):
    root = store.create_store(tmp_path / "s.zarr", _layout(c=3), ATTRS)
    with pytest.raises(store.StoreError, match="capacity"):
        store.write_sample(root, 0, _sample(0, n_cols=5))
    assert store.pending_indices(root).tolist() == [0, 1, 2, 3]  # nothing marked complete
    with pytest.raises(store.StoreError, match="not found"):
        store.open_store(tmp_path / "missing.zarr")
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(store.StoreError):
        store.open_store(tmp_path / "junk.zarr")


def test_wrong_schema_version(tmp_path):
    root = store.create_store(tmp_path / "s.zarr", _layout(), ATTRS)
    root.attrs["schema_version"] = 99
    with pytest.raises(store.StoreError, match="schema_version"):
        store.open_store(tmp_path / "s.zarr")


def test_calibration_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path))
    assert store.load_cached_calibration("k/1") is None
    store.save_calibration("k/1", {"w": [1.0, 2.0]})
    assert store.load_cached_calibration("k/1") == {"w": [1.0, 2.0]}


def test_xarray_opens_every_array_with_named_dimensions_and_coordinates_in_A(tmp_path):
    xr = pytest.importorskip("xarray")
    path = tmp_path / "s.zarr"
    root = store.create_store(path, _layout(), ATTRS)
    store.write_sample(root, 0, _sample(0))
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["images"].dims == ds["masks"].dims == ("sample", "y", "x")
    assert ds.sizes == {"sample": 4, "y": 16, "x": 20}
    assert ds["x"].attrs["units"] == ds["y"].attrs["units"] == "Å"
    np.testing.assert_allclose(ds["x"].values, np.arange(20) * 0.2)
    np.testing.assert_allclose(ds["y"].values, np.arange(16) * 0.2)
    np.testing.assert_array_equal(ds["images"].isel(sample=0).values, _sample(0).image)
    assert ds["masks"].sel(x=0.4, y=0.2, method="nearest").isel(sample=0) == _sample(0).mask[1, 2]
    cols = xr.open_zarr(path, group="columns", consolidated=False)
    params = xr.open_zarr(path, group="params", consolidated=False)
    assert cols["counts"].dims == ("slot", "element") and cols["x"].dims == ("slot",)
    assert cols["offset"].dims == ("sample",) and params["lam"].dims == ("sample",)
    for group in (ds, cols, params):
        for name, var in group.variables.items():
            assert not any(d.startswith("dim_") for d in var.dims), name
            assert "units" in var.attrs or name in params, name


def test_pixel_coordinates_fall_back_to_pixels_when_the_pixel_size_is_drawn(tmp_path):
    root = store.create_store(tmp_path / "s.zarr", _layout(), {**ATTRS, "pixel_size_A": None})
    assert root["x"].attrs["units"] == "px"
    np.testing.assert_array_equal(root["x"][:], np.arange(20.0))


def test_atomic_write_and_json_helpers(tmp_path):
    path = store.write_json({"a": np.float32(1.5), "b": [np.nan, np.int64(2)], "c": np.bool_(1)},
                            tmp_path / "r.json")  # fmt: skip
    assert path.read_text() == '{\n  "a": 1.5,\n  "b": [\n    null,\n    2\n  ],\n  "c": true\n}\n'
    store.atomic_write(tmp_path / "b.bin", lambda fh: fh.write(b"\x00\x01"), binary=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ZeroDivisionError):
        store.atomic_write(tmp_path / "r.json", lambda fh: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "r.json"]  # no temp left
    assert "null" in path.read_text()  # the failed write left the old file intact


@pytest.mark.parametrize("scheme", ["atoms", "composition"])
def test_preview_legend_never_covers_the_images(tmp_path, scheme):
    from simgen.preview import preview_figure
    from structures import get_scheme

    names = get_scheme(scheme).to_dict()
    layout = _layout(n=6, shape=(32, 32))  # square images leave no slack around the axes
    root = store.create_store(tmp_path / "s.zarr", layout, {**ATTRS, "label_scheme": names})
    k = len(names["names"])
    for i in range(6):
        s = _sample(i, shape=(32, 32))
        s.mask[:] = np.arange(32 * 32).reshape(32, 32) % k  # every class present
        store.write_sample(root, i, s)
    fig = preview_figure(root, count=6)
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert len(legend.get_texts()) == k - 1
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), ax.get_title()
    assert box.y0 >= 0  # inside the figure


def test_complete_indices_follow_written_samples_not_the_planned_size(tmp_path, monkeypatch):
    """``inspect`` of a store planned for 10⁹ samples with 3 written reads 3 flags: the
    chunk listing gives the written ones; the block-wise fallback agrees; a damaged flag
    reads as not complete (resume recomputes it) or, strict, names the sample."""
    import tracemalloc

    n = 1_000_000_000
    layout = store.StoreLayout(
        n_samples=n,
        image_shape=(16, 20),
        column_capacity=12,
        elements=("S", "Mo"),
        param_names=("defocus_A", "lam"),
    )
    root = store.create_store(tmp_path / "big.zarr", layout, ATTRS)
    for i in (5, 77, n - 1):
        store.write_sample(root, i, _sample(i))
    root = store.open_store(tmp_path / "big.zarr")
    listed = store._written_flag_chunks(root)
    assert listed is not None and len(listed) == 3
    tracemalloc.start()
    assert list(store.complete_indices(root)) == [5, 77, n - 1]
    info = store.summary(root)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB to summarise 3 samples"
    assert info["completed"] == 3 and info["params"]["lam"] == (15.0, 10.0 + n - 1)
    # fallback over blocks (store that cannot be listed) on a smaller planned size
    small = store.create_store(tmp_path / "s.zarr", _layout(n=300), ATTRS)
    for i in (0, 150, 299):
        store.write_sample(small, i, _sample(i))
    monkeypatch.setattr(store, "FLAG_BLOCK", 64)
    with_listing = list(store.complete_indices(small))
    monkeypatch.setattr(store, "_written_flag_chunks", lambda root: None)
    assert list(store.complete_indices(small)) == with_listing == [0, 150, 299]
    monkeypatch.undo()
    (tmp_path / "s.zarr" / "complete" / "c" / "150").write_bytes(b"garbage")
    small = store.open_store(tmp_path / "s.zarr")
    assert list(store.complete_indices(small)) == [0, 299]
    assert list(store.pending_indices(small))[:3] == [1, 2, 3] and 150 in store.pending_indices(
        small
    )
    with pytest.raises(store.StoreError, match="sample 150"):
        store.complete_indices(small, strict=True)
