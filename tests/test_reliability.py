"""Issue 12: ownership of outputs, chunk integrity, exit codes (store level, fast)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from simgen import store
from simgen.cli import app
from tests.test_store import ATTRS, _layout, _sample

runner = CliRunner()


def _complete_store(path, n=4):
    root = store.create_store(path, _layout(n=n), ATTRS)
    store.write_samples(root, list(range(n)), [_sample(i) for i in range(n)])
    return root


def _damage(path, key, how):
    chunk = path / key
    if how == "delete":
        chunk.unlink()
    elif how == "random":
        chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    elif how == "flip":
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        chunk.write_bytes(bytes(raw))


# -- ownership ---------------------------------------------------------------------------
def test_overwrite_refuses_a_folder_that_is_not_a_simgen_store(tmp_path):
    folder = tmp_path / "important"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(store.StoreError, match="not a simgen store.*refusing"):
        store.create_store(folder, _layout(), ATTRS, overwrite=True)
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_overwrite_refuses_a_plain_file_and_a_foreign_zarr_group(tmp_path):
    import zarr

    f = tmp_path / "notes.zarr"
    f.write_text("a file")
    with pytest.raises(store.StoreError, match="is a file, not a simgen store"):
        store.create_store(f, _layout(), ATTRS, overwrite=True)
    assert f.read_text() == "a file"
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["mine"] = 1
    with pytest.raises(store.StoreError, match="not a simgen store"):
        store.create_store(other, _layout(), ATTRS, overwrite=True)
    assert zarr.open_group(str(other), mode="r").attrs["mine"] == 1


def test_overwrite_replaces_its_own_store_and_an_empty_folder(tmp_path):
    path = tmp_path / "s.zarr"
    _complete_store(path)
    assert store.is_simgen_store(path)
    root = store.create_store(path, _layout(), ATTRS, overwrite=True)
    assert int(np.asarray(root["complete"][:]).sum()) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    store.create_store(empty, _layout(), ATTRS, overwrite=True)
    assert store.is_simgen_store(empty)


def test_an_interrupted_creation_is_named_and_replaceable(tmp_path):
    import zarr

    path = tmp_path / "s.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3).attrs[store.MARKER_ATTR] = True
    with pytest.raises(store.StoreError, match="creation did not finish"):
        store.open_store(path)
    store.create_store(path, _layout(), ATTRS, overwrite=True)  # its own: replaced
    store.open_store(path)


def test_generate_overwrite_on_a_user_folder_is_one_line_and_touches_nothing(tmp_path):
    folder = tmp_path / "important"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2,3")
    result = runner.invoke(
        app, ["generate", "-o", str(folder), "--overwrite", "--cluster", "none", "--n", "1"]
    )
    assert result.exit_code == 1, result.output
    assert "not a simgen store" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    result = runner.invoke(
        app, ["generate", "-o", str(plain), "--overwrite", "--cluster", "none", "--n", "1"]
    )
    assert result.exit_code == 1 and "is a file" in result.output, result.output
    assert "Traceback" not in result.output and plain.read_text() == "x"


# -- integrity ---------------------------------------------------------------------------
def test_every_array_carries_a_checksum_and_every_chunk_is_written(tmp_path):
    path = tmp_path / "s.zarr"
    root = _complete_store(path)
    assert store.has_checksums(root)
    for name, arr, _ in store._sample_arrays(root):
        assert any(type(c).__name__ == "Crc32cCodec" for c in arr.compressors), name
    # a sample with no columns still writes its (all-fill) chunks: absence means damage
    empty = _sample(0, n_cols=0)
    empty.params["lam"] = float("nan")
    store.write_samples(root, [1], [empty])
    assert store.damaged_indices(path, root) == {}


@pytest.mark.parametrize(
    ("key", "how"),
    [
        ("images/c/2/0/0", "delete"),
        ("images/c/2/0/0", "random"),
        ("images/c/2/0/0", "flip"),
        ("masks/c/2/0/0", "flip"),
        ("columns/x/c/2", "delete"),
        ("columns/counts/c/2/0", "flip"),
        ("params/lam/c/2", "random"),
    ],
)
def test_damaged_chunks_are_found_and_resume_recomputes_them(tmp_path, key, how):
    path = tmp_path / "s.zarr"
    _complete_store(path)
    _damage(path, key, how)
    root = store.open_store(path, mode="r+")
    bad = store.damaged_indices(path, root)
    assert list(bad) == [2], bad
    assert key.split("/c/")[0] in bad[2]
    store.mark_incomplete(root, bad)
    assert list(store.pending_indices(root)) == [2]
    store.write_samples(root, [2], [_sample(2)])
    assert store.damaged_indices(path, root) == {}
    np.testing.assert_array_equal(root["images"][2], _sample(2).image)


def test_a_damaged_completion_flag_reads_as_not_complete(tmp_path):
    path = tmp_path / "s.zarr"
    _complete_store(path)
    _damage(path, "complete/c/1", "random")
    root = store.open_store(path, mode="r+")
    assert list(store.pending_indices(root)) == [1]


def test_check_integrity_lists_damage_exits_1_and_marks_it_for_resume(tmp_path):
    path = tmp_path / "s.zarr"
    _complete_store(path)
    ok = runner.invoke(app, ["check", "--integrity", str(path)])
    assert ok.exit_code == 0 and "no damaged sample" in ok.output, ok.output
    _damage(path, "images/c/3/0/0", "flip")
    _damage(path, "masks/c/0/0/0", "delete")
    result = runner.invoke(app, ["check", "--integrity", str(path)])
    assert result.exit_code == 1, result.output
    assert "sample 0: damaged (masks" in result.output
    assert "sample 3: damaged (images" in result.output
    assert "Traceback" not in result.output
    root = store.open_store(path)
    assert list(store.pending_indices(root)) == [0, 3]


def test_creating_a_store_writes_nothing_per_planned_sample(tmp_path):
    """A store planned for 10⁸ samples is created in constant time and space: the per-sample
    offsets are written with each sample, as every other per-sample array."""
    root = store.create_store(tmp_path / "s.zarr", _layout(n=100_000_000, c=12), ATTRS)
    assert root["columns/offset"].chunks == (1,)
    size = sum(f.stat().st_size for f in (tmp_path / "s.zarr").rglob("*") if f.is_file())
    assert size < 200_000, size
    small = store.create_store(tmp_path / "t.zarr", _layout(n=7, c=12), ATTRS)
    for i in (0, 3, 6):
        store.write_sample(small, i, _sample(i, n_cols=5))
    assert [int(small["columns/offset"][i]) for i in (0, 3, 6)] == [0, 36, 72]
    assert store.damaged_indices(tmp_path / "t.zarr", small) == {}


def test_tasks_write_whole_chunks_and_leave_shared_offsets_of_old_stores_alone(tmp_path):
    """Tasks of several samples share the chunks of the small arrays and write them whole;
    a store from before 0.3 (offsets chunked whole, written by its creator) gets no offset
    write from a task (that would be a read-modify-write race between workers)."""
    import dataclasses

    layout = dataclasses.replace(_layout(n=6, c=12), samples_per_task=3)
    root = store.create_store(tmp_path / "t.zarr", layout, ATTRS)
    assert root["params/lam"].chunks == (3,) and root["columns/x"].chunks == (36,)
    assert root["images"].chunks[0] == 1 and store.samples_per_task(root) == 3
    store.write_samples(root, [3, 4, 5], [_sample(i, n_cols=5) for i in (3, 4, 5)])
    assert list(store.complete_indices(root)) == [3, 4, 5]
    assert store.damaged_indices(tmp_path / "t.zarr", root) == {}
    assert [float(root["params/lam"][i]) for i in (3, 4, 5)] == [13.0, 14.0, 15.0]
    _damage(tmp_path / "t.zarr", "params/lam/c/1", "random")  # shared by samples 3-5
    assert sorted(store.damaged_indices(tmp_path / "t.zarr", root)) == [3, 4, 5]
    # an old store: offsets in one chunk of the whole array, already written
    old = store.create_store(tmp_path / "old.zarr", _layout(n=4, c=12), ATTRS)
    old.create_array("columns/offset", shape=(4,), chunks=(4,), dtype="int64", fill_value=0,
                     overwrite=True)[:] = np.arange(4) * 12  # fmt: skip
    before = (tmp_path / "old.zarr" / "columns" / "offset" / "c" / "0").stat().st_mtime_ns
    store.write_sample(old, 2, _sample(2, n_cols=5))
    after = (tmp_path / "old.zarr" / "columns" / "offset" / "c" / "0").stat().st_mtime_ns
    assert before == after and int(old["columns/offset"][2]) == 24
    assert store.read_columns(old, 2)["x"].shape == (5,)


# -- one error style ---------------------------------------------------------------------
def test_version_on_both_clis():
    from training.cli import app as train_app

    for cli in (app, train_app):
        result = runner.invoke(cli, ["--version"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("simgen ")


def test_readers_name_the_store_and_sample_of_a_damaged_chunk(tmp_path):
    from training.stores import StoreError as ReaderError
    from training.stores import open_store as open_for_training

    path = tmp_path / "s.zarr"
    _complete_store(path)
    _damage(path, "images/c/1/0/0", "random")
    _damage(path, "masks/c/2/0/0", "flip")
    info = open_for_training(path)
    with pytest.raises(ReaderError, match=r"s\.zarr: sample 1 is damaged \(images"):
        info.image(1)
    with pytest.raises(ReaderError, match="sample 2 is damaged"):
        info.mask(2)
    root = store.open_store(path)
    with pytest.raises(store.StoreError, match="sample 1 is damaged"):
        store.read_image(root, 1)
    for args in (["preview", str(path), "-o", str(tmp_path / "p.png")], ["inspect", str(path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "is damaged" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


# -- bad config values -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optics.C10_A", ".nan", "optics.C10_A"),
        ("optics.semiangle_mrad", ".nan", "finite"),
        ("structure.margin_A", ".inf", "structure.margin_A: expected a finite number"),
        ("optics.C10_A", "{normal: [0, .nan]}", "finite"),
        ("structure.dopant", "Qq", "structure.dopant: 'Qq' is not an element"),
        ("structure.substituent", "Zz", "structure.substituent: expected a chalcogen"),
    ],
)
def test_config_show_refuses_bad_values_in_one_line(key, value, message):
    result = runner.invoke(app, ["config", "show", "--set", f"{key}={value}"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_sweep_refuses_zero_points(tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(
        app, ["sweep", "--noise-lambda", "5-20", "--points", "0", "-o", str(out), "--n", "1"]
    )
    assert result.exit_code == 1 and "--points: expected >= 1, got 0" in result.output
    assert not out.exists()


def test_a_structure_file_without_a_cell_is_one_line(tmp_path):
    cell = tmp_path / "nocell.xyz"
    cell.write_text("2\n\nMo 0 0 0\nS 1 1 1.5\n")
    out = tmp_path / "x.zarr"
    result = runner.invoke(
        app, ["generate", "--structure", str(cell), "-o", str(out), "--cluster", "none"]
    )
    assert result.exit_code == 1, result.output
    assert "has no cell in x and y" in result.output and not out.exists()


def test_ctrl_c_during_generate_is_one_line_and_exit_130(tmp_path, monkeypatch):
    import simgen.generation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simgen.generation, "generate", interrupted)
    monkeypatch.setattr("simgen.cli._calibration_for", lambda cfg: None)
    out = tmp_path / "x.zarr"
    result = runner.invoke(app, ["generate", "-o", str(out), "--cluster", "none", "--n", "1"])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "resume" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_check_exits_1_when_a_sample_is_not_reproduced(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import simgen.pipeline

    path = tmp_path / "s.zarr"
    attrs = {**ATTRS, "config": {}, "sample_version": simgen.pipeline.SAMPLE_VERSION}
    root = store.create_store(path, _layout(n=2), attrs)
    store.write_samples(root, [0, 1], [_sample(0), _sample(1)])
    other = _sample(5)
    fake = SimpleNamespace(image=other.image, noise_free=other.image)
    monkeypatch.setattr(simgen.pipeline, "make_sample", lambda cfg, i, calibration=None: fake)
    result = runner.invoke(app, ["check", str(path), "-i", "0"])
    assert result.exit_code == 1, result.output
    assert "reproduced bit for bit: False" in result.output
    assert "sample(s) [0] not reproduced" in result.output


# -- cost before work --------------------------------------------------------------------
def test_a_huge_dataset_is_refused_with_the_numbers_before_any_work(tmp_path):
    out = tmp_path / "big.zarr"
    result = runner.invoke(
        app, ["generate", "-o", str(out), "--n", "1000000000", "--cluster", "none"]
    )
    assert result.exit_code == 1, result.output
    assert "TB on disk (1000000000 samples), over the limit 200.0 GB" in result.output
    assert "--yes" in result.output and not out.exists()
    result = runner.invoke(
        app, ["generate", "-o", str(out), "--size", "8192", "--set", "optics.pixel_size_A=5",
              "--max-memory", "4GB", "--n", "1", "--cluster", "none"]
    )  # fmt: skip
    assert result.exit_code == 1 and "GB of memory (a 8" in result.output, result.output
    assert not out.exists()
    bad = runner.invoke(app, ["generate", "-o", str(out), "--max-disk", "lots"])
    assert bad.exit_code == 1 and "--max-disk: expected a size" in bad.output


def test_cost_estimate_grows_with_what_the_config_asks():
    from simgen.config import load_config
    from simgen.cost import estimate_cost, parse_bytes

    base = load_config()
    small = estimate_cost(base.with_overrides({"dataset.image_size": [64, 64]}))
    big = estimate_cost(base.with_overrides({"dataset.image_size": [1024, 1024]}))
    more = estimate_cost(base.with_overrides({"dataset.n_samples": 2 * base.dataset.n_samples}))
    assert small.disk_bytes < estimate_cost(base).disk_bytes < big.disk_bytes
    assert small.worker_bytes < big.worker_bytes
    assert more.disk_bytes == 2 * estimate_cost(base).disk_bytes
    h, w = base.dataset.image_size
    assert estimate_cost(base).disk_bytes > base.dataset.n_samples * h * w * 5  # images, masks
    assert parse_bytes("1.5 GB", "x") == 1_500_000_000 and parse_bytes("512MB", "x") == 512e6
