"""Zarr v3 dataset stores and file helpers: the only module of simgen that touches disk.

Schema in ``docs/store.md``. Each task (``samples_per_task`` consecutive samples) owns whole
chunks of every array, so any number of workers can write concurrently without
read-modify-write races (zarr-python#3682). Root attributes are written once, by the
coordinating process. ``complete[i]`` is written last for sample i: a killed run resumes by
recomputing the tasks that hold a sample whose flag is 0.

:func:`atomic_write`, :func:`to_jsonable` and :func:`write_json` are the project's one way
to write a small file safely (temporary file, then rename) and to turn NumPy-laden results
into JSON; ``training`` uses them too.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

SCHEMA_VERSION = 1
COLUMN_FIELDS = {  # name -> (dtype, fill value)
    "x": ("float32", np.nan),
    "y": ("float32", np.nan),
    "class_id": ("int16", -1),
    "site": ("int8", -1),
    "n_atoms": ("int8", -1),
}


def to_jsonable(value):
    """``value`` as plain JSON types: NumPy scalars and arrays to Python, tuples to lists,
    mapping keys to str, paths to str, NaN and ±inf to None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def atomic_write(path: str | Path, content, *, binary: bool = False) -> Path:
    """Write a file so that readers never see half of it: a temporary file, then a rename.

    Parameters
    ----------
    path : path-like
    content : str, bytes or callable
        The text (or bytes), or a function called with the open temporary file (text
        mode, UTF-8, ``newline=""``; binary mode with ``binary=True``), e.g. a CSV writer
        or ``lambda fh: torch.save(obj, fh)``.
    binary : bool
        Open the file in binary mode (implied by ``bytes`` content).

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    binary = binary or isinstance(content, bytes)
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(data, path: str | Path, *, indent: int = 2, ensure_ascii: bool = True) -> Path:
    """Write ``data`` as indented JSON (:func:`to_jsonable` first: NaN as null), atomically."""
    text = json.dumps(to_jsonable(data), indent=indent, ensure_ascii=ensure_ascii) + "\n"
    return atomic_write(path, text)


class StoreError(ValueError):
    """A store is missing, malformed, or does not match the request."""


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a dataset (recorded in every store)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("simgen", "abtem", "ase", "numpy", "scipy", "zarr", "dask"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of a store: what must be known before the first sample is written."""

    n_samples: int
    image_shape: tuple[int, int]
    column_capacity: int
    elements: tuple[str, ...]
    param_names: tuple[str, ...]
    samples_per_chunk: int = 1
    #: Samples per task: the chunk of the small per-sample arrays (column table, offsets,
    #: parameters; not the images, masks or flags), a multiple of ``samples_per_chunk``.
    #: None: ``samples_per_chunk``. Several samples per chunk cut the per-chunk cost of
    #: Zarr (~2 ms of one core per chunk write) that one-sample chunks paid ~70 times per
    #: sample, once per drawn parameter.
    samples_per_task: int | None = None

    def __post_init__(self):
        if self.samples_per_chunk < 1:
            raise StoreError(f"samples_per_chunk must be >= 1, got {self.samples_per_chunk}")
        if self.task % self.samples_per_chunk:
            raise StoreError(
                f"samples_per_task ({self.samples_per_task}) must be a multiple of "
                f"samples_per_chunk ({self.samples_per_chunk})"
            )

    @property
    def task(self) -> int:
        """Samples per task (see ``samples_per_task``)."""
        return self.samples_per_task or self.samples_per_chunk


#: Units and meaning of the arrays, as attributes every reader (xarray, napari...) sees.
ARRAY_ATTRS = {
    "images": {
        "long_name": "recorded HAADF-STEM image",
        "units": "detector output (gain x counts + offset; ideal units without shot noise)",
    },
    "masks": {"long_name": "class id per pixel (attrs label_scheme)", "units": "1"},
    "complete": {"long_name": "1 once the sample is written", "units": "1"},
    "columns/x": {"long_name": "column position along x (image columns)", "units": "px"},
    "columns/y": {"long_name": "column position along y (image rows)", "units": "px"},
    "columns/class_id": {"long_name": "class id of the column", "units": "1"},
    "columns/site": {"long_name": "sublattice: 0 metal, 1 chalcogen", "units": "1"},
    "columns/n_atoms": {"long_name": "atoms in the column", "units": "1"},
    "columns/counts": {"long_name": "atoms of each element (attrs elements)", "units": "1"},
    "columns/offset": {"long_name": "first column slot of the sample", "units": "1"},
    "columns/count": {"long_name": "column slots used by the sample", "units": "1"},
}


def _codecs():
    """Compression then a CRC-32C checksum on every chunk: a damaged chunk fails to read.

    Blosc LZ4 after a bit shuffle: on 512² float32 images as small as Zstd's output
    (recorded 0.30, noise-free 0.81 of the raw size against 0.29 and 0.89) at a fifth of
    its time (0.9 against 4.8 ms; about 5 ms of a ~100 ms sample). Stores written with Zstd
    read as before (each array names its codecs)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


def _array(group, name, shape, chunks, dtype, fill, dims, attrs=None):
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill,
        overwrite=True,
        dimension_names=dims,
        attributes=dict(attrs or {}),
        compressors=_codecs(),
    )


#: Root attribute naming the tool that made a store: the ownership marker ``--overwrite``
#: checks before deleting anything.
MARKER_ATTR = "simgen_store"


def is_simgen_store(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a store made by simgen (its root
    ``zarr.json`` carries :data:`MARKER_ATTR`, or, for stores written before the marker,
    ``schema_version`` and ``versions.simgen``)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    if attrs.get(MARKER_ATTR):
        return True
    return "schema_version" in attrs and "simgen" in (attrs.get("versions") or {})


def remove_own_store(path: str | Path) -> None:
    """Delete the store at ``path`` if, and only if, simgen made it (or it is an empty
    folder); refuse anything else by name, touching nothing.

    Raises
    ------
    StoreError
        ``path`` is a file, or a folder that is not a simgen store.
    """
    path = Path(path)
    check_replaceable(path)
    if path.exists():
        shutil.rmtree(path)


def check_replaceable(path: str | Path) -> None:
    """Raise :class:`StoreError` unless ``path`` is absent, an empty folder or a simgen
    store (what :func:`remove_own_store` may delete); touches nothing."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        raise StoreError(f"{path} is a file, not a simgen store; refusing to replace it")
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"{path} is not a folder; refusing to replace it")
    if any(path.iterdir()) and not is_simgen_store(path):
        raise StoreError(
            f"{path} is not a simgen store (no {MARKER_ATTR} marker in zarr.json); refusing "
            "to replace it: choose another output path or remove it yourself"
        )


def _pixel_coordinates(root, h: int, w: int, pixel_size_A) -> None:
    """1-D ``y`` and ``x`` coordinate arrays (what xarray shows as the images' coordinates):
    the position of each pixel from pixel (0, 0), in Å when the pixel size is fixed, else in
    pixels (the per-sample pixel size is ``params/pixel_size_A``)."""
    fixed = pixel_size_A is not None and math.isfinite(float(pixel_size_A))
    step = float(pixel_size_A) if fixed else 1.0
    units = "Å" if fixed else "px"
    for name, n in (("y", h), ("x", w)):
        attrs = {"long_name": f"position along {name} from pixel (0, 0)", "units": units}
        arr = _array(root, name, (n,), (n,), "float64", 0.0, (name,), {**attrs, "step": step})
        arr[:] = np.arange(n, dtype=np.float64) * step


def create_store(path: str | Path, layout: StoreLayout, attrs: Mapping, *, overwrite=False):
    """Create an empty store (all ``complete`` flags 0) with the documented schema.

    Parameters
    ----------
    path : str or Path
        Directory of the store (``*.zarr``).
    layout : StoreLayout
    attrs : mapping
        Root attributes: ``config``, ``label_scheme``, ``pixel_size_A``, ``calibration``...
        (schema version, versions and shapes are added here).
    overwrite : bool
        Replace an existing store at ``path``.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise StoreError(f"{path} exists; use --overwrite to replace it")
        remove_own_store(path)
    n, (h, w), c = layout.n_samples, layout.image_shape, layout.column_capacity
    e = max(len(layout.elements), 1)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs[MARKER_ATTR] = True  # first, so an interrupted creation can be replaced
    k = layout.samples_per_chunk  # images and masks: k samples per chunk
    t = layout.task  # a task owns t consecutive samples = whole chunks of every array
    a = ARRAY_ATTRS
    image_dims = ("sample", "y", "x")
    _array(root, "images", (n, h, w), (k, h, w), "float32", 0.0, image_dims, a["images"])
    _array(root, "masks", (n, h, w), (k, h, w), "uint8", 0, image_dims, a["masks"])
    _array(root, "complete", (n,), (1,), "uint8", 0, ("sample",), a["complete"])
    _pixel_coordinates(root, h, w, attrs.get("pixel_size_A"))
    cols = root.create_group("columns")
    for name, (dtype, fill) in COLUMN_FIELDS.items():
        _array(cols, name, (n * c,), (t * c,), dtype, fill, ("slot",), a[f"columns/{name}"])
    counts_dims = ("slot", "element")
    _array(cols, "counts", (n * c, e), (t * c, e), "uint8", 0, counts_dims, a["columns/counts"])
    # one chunk per task, written with it: creating a store costs nothing per planned sample
    _array(cols, "offset", (n,), (t,), "int64", 0, ("sample",), a["columns/offset"])
    _array(cols, "count", (n,), (t,), "int32", 0, ("sample",), a["columns/count"])
    params = root.create_group("params")
    for name in layout.param_names:
        _array(params, name, (n,), (t,), "float64", np.nan, ("sample",), {"long_name": name})
    root.attrs.update(
        {
            **dict(attrs),
            MARKER_ATTR: True,
            "schema_version": SCHEMA_VERSION,
            "n_samples": n,
            "image_shape": [h, w],
            "column_capacity": c,
            "elements": list(layout.elements),
            "param_names": list(layout.param_names),
            "versions": package_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
    )
    return root


def open_store(path: str | Path, mode: str = "r"):
    """Open a store and check its schema version; clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store not found: {path}")
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a store")
    try:
        root = zarr.open_group(str(path), mode=mode)
    except Exception as err:  # zarr raises several kinds for non-stores
        raise StoreError(f"{path} is not a Zarr store: {err}") from None
    version = root.attrs.get("schema_version")
    if version is None and root.attrs.get(MARKER_ATTR):
        raise StoreError(
            f"{path}: the store's creation did not finish (interrupted, or another writer is "
            "creating it now); use --overwrite to replace it"
        )
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
        )
    return root


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def open_for_resume(path: str | Path, config: Mapping, layout: StoreLayout, normalize=None):
    """Open an existing store to continue it; refuse a store made by another config.

    ``normalize`` (dict -> dict) reads the stored config as today's code would (fields
    added since, at their defaults, which reproduce the old draws); a stored config it
    cannot read counts as different."""
    root = open_store(path, mode="r+")
    stored = root.attrs.get("config")
    if normalize is not None and isinstance(stored, Mapping):
        try:
            stored = normalize(dict(stored))
        except (TypeError, ValueError, KeyError):
            pass
    if _canonical(stored) != _canonical(dict(config)):
        raise StoreError(
            f"{path} was made with a different config; use --overwrite to replace it, or "
            "another output path"
        )
    if (
        tuple(root.attrs["image_shape"]) != tuple(layout.image_shape)
        or root.attrs["n_samples"] != layout.n_samples
    ):
        raise StoreError(f"{path} has other shapes than this config; use --overwrite")
    return root


def pending_indices(root) -> np.ndarray:
    """Indices of the samples not yet complete (a damaged flag counts as not complete)."""
    return np.flatnonzero(complete_flags(root) == 0)


def samples_per_task(root) -> int:
    """Consecutive samples that share chunks in ``root`` (a task computes and writes them
    together): 1 or ``samples_per_chunk`` for stores written before tasks grouped samples."""
    return math.lcm(int(root["columns/count"].chunks[0]), int(root["images"].chunks[0]))


def write_samples(root, indices, samples) -> None:
    """Write samples (a task's consecutive ones), then their completion flags.

    One call for many samples: see :class:`SampleWriter` to write many tasks into one
    store without resolving its arrays each time."""
    SampleWriter(root).write(indices, samples)


class SampleWriter:
    """Writes samples into an open store, its arrays resolved once.

    Every array of a run of consecutive samples is written by one Zarr call, all arrays
    concurrently (Zarr's per-call cost, not the bytes, dominated one-by-one writes), then
    the runs' completion flags.

    Parameters
    ----------
    root : zarr.Group
        A store opened for writing.
    """

    def __init__(self, root):
        self.root = root
        self.capacity = int(root.attrs["column_capacity"])
        self.elements = list(root.attrs["elements"])
        self.param_names = list(root.attrs["param_names"])
        names = ["images", "masks", "complete", "columns/counts", "columns/count"]
        names += ["columns/offset", *(f"columns/{n}" for n in COLUMN_FIELDS)]
        names += [f"params/{n}" for n in self.param_names]
        # every chunk written, even one equal to the fill value (absence means damage)
        keep = {"write_empty_chunks": True}
        self.arrays = {name: root[name].with_config(keep) for name in names}

    def write(self, indices, samples) -> None:
        """Write ``samples`` at ``indices``, then their completion flags.

        Every sample is checked (column count, elements) before anything is written."""
        indices = [int(i) for i in indices]
        samples = list(samples)
        if len(indices) != len(samples):
            raise ValueError(f"{len(indices)} indices for {len(samples)} samples")
        for index, sample in zip(indices, samples, strict=True):
            self._check(index, sample)
        runs, start = [], 0
        for j in range(1, len(indices) + 1):
            if j == len(indices) or indices[j] != indices[j - 1] + 1:
                runs.append((indices[start], samples[start:j]))
                start = j
        for first, run in runs:
            _write_concurrently(self._values(first, run))
        for first, run in runs:
            self.arrays["complete"][first : first + len(run)] = np.ones(len(run), np.uint8)

    def _check(self, index, sample) -> None:
        n = len(sample.columns["x"])
        if n > self.capacity:
            raise StoreError(
                f"sample {index}: {n} columns exceed the store's capacity {self.capacity}"
            )
        for el in sample.columns["elements"]:
            if el not in self.elements:
                raise StoreError(
                    f"sample {index}: element {el} not in the store's list {self.elements}"
                )

    def _values(self, first: int, run: list):
        """``(array, selection, values)`` of every array for samples ``first, first+1...``."""
        c, m = self.capacity, len(run)
        a = self.arrays
        rows = slice(first, first + m)
        slots = slice(first * c, (first + m) * c)
        out = [
            (a["images"], rows, np.stack([np.asarray(s.image, np.float32) for s in run])),
            (a["masks"], rows, np.stack([np.asarray(s.mask, np.uint8) for s in run])),
        ]
        n_cols = [len(s.columns["x"]) for s in run]
        for name, (dtype, fill) in COLUMN_FIELDS.items():
            buf = np.full((m, c), fill, dtype=dtype)
            for j, s in enumerate(run):
                buf[j, : n_cols[j]] = np.asarray(s.columns[name])
            out.append((a[f"columns/{name}"], slots, buf.reshape(-1)))
        counts = np.zeros((m, c, max(len(self.elements), 1)), dtype=np.uint8)
        for j, s in enumerate(run):
            per_element = np.asarray(s.columns["counts"])
            for e, el in enumerate(s.columns["elements"]):
                counts[j, : n_cols[j], self.elements.index(el)] = per_element[:, e]
        out.append((a["columns/counts"], slots, counts.reshape(m * c, -1)))
        out.append((a["columns/count"], rows, np.asarray(n_cols, dtype=np.int32)))
        # stores before 0.3 had the offsets written whole by their creator, in chunks
        # shared by many tasks: those are left alone (rewriting them would race)
        if _owns_chunks(a["columns/offset"], first, m):
            starts = (first + np.arange(m, dtype=np.int64)) * c
            out.append((a["columns/offset"], rows, starts))
        for name in self.param_names:
            values = np.asarray([float(s.params.get(name, np.nan)) for s in run])
            out.append((a[f"params/{name}"], rows, values))
        return out


def _owns_chunks(arr, first: int, m: int) -> bool:
    """True when samples ``first .. first+m-1`` cover whole chunks of ``arr`` (or run to its
    end): writing them touches no other task's samples."""
    step, n = int(arr.chunks[0]), int(arr.shape[0])
    return first % step == 0 and ((first + m) % step == 0 or first + m >= n)


def _write_concurrently(writes) -> None:
    """``array[selection] = values`` for every ``(array, selection, values)``, all at once on
    Zarr's event loop."""
    import asyncio

    from zarr.core.sync import sync

    async def write_all():
        await asyncio.gather(*(arr.async_array.setitem(sel, val) for arr, sel, val in writes))

    sync(write_all())


def _every_chunk_written():
    """Write chunks equal to the fill value too, so that every chunk of a complete sample
    exists on disk and a missing one is damage, not an empty sample."""
    return zarr.config.set({"array.write_empty_chunks": True})


# -- integrity -----------------------------------------------------------------------------
def _sample_arrays(root):
    """``(name, array, per_sample)`` of every array holding per-sample chunks; per_sample is
    the number of first-axis entries a sample owns (1, or the column capacity)."""
    c = int(root.attrs["column_capacity"])
    n = int(root.attrs["n_samples"])

    def walk(group, prefix=""):
        for name, arr in group.arrays():
            yield prefix + name, arr
        for name, sub in group.groups():
            yield from walk(sub, prefix + name + "/")

    for name, arr in walk(root):
        if not arr.shape:
            continue
        if arr.shape[0] == n and name not in ("x", "y"):
            yield name, arr, 1
        elif arr.shape[0] == n * c and name.startswith("columns/"):
            yield name, arr, c


def has_checksums(root) -> bool:
    """True when the store's image chunks carry a CRC-32C checksum."""
    return any(type(c).__name__ == "Crc32cCodec" for c in root["images"].compressors)


def damaged_indices(path: str | Path, root, indices=None) -> dict[int, str]:
    """Samples (of ``indices``, default the complete ones) whose chunks are missing or fail
    to decode (a checksum mismatch, a truncated or overwritten chunk).

    Parameters
    ----------
    path : path-like
        The store's folder (chunk files are looked up there).
    root : zarr.Group
    indices : iterable of int, optional

    Returns
    -------
    dict
        index -> what is wrong (e.g. ``"images: chunk c/3/0/0 missing"``).
    """
    path = Path(path)
    n = int(root.attrs["n_samples"])
    todo = complete_indices(root) if indices is None else np.asarray(list(indices), int)
    arrays = list(_sample_arrays(root))
    bad: dict[int, str] = {}
    for i in (int(v) for v in todo):
        if not 0 <= i < n:
            continue
        for name, arr, per in arrays:
            start = i * per
            coords = (start // arr.chunks[0],) + (0,) * (arr.ndim - 1)
            key = arr.metadata.encode_chunk_key(coords)
            if not (path / arr.path / key).is_file():
                bad[i] = f"{name}: chunk {key} missing"
                break
            try:
                arr[start : start + per]
            except Exception as err:  # a codec reports damage in its own exception type
                bad[i] = f"{name}: chunk {key} unreadable ({_one_line(err)})"
                break
    return bad


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


#: Flags read per block when the chunk files cannot be listed (bounded memory).
FLAG_BLOCK = 1 << 16


def _written_flag_chunks(root) -> np.ndarray | None:
    """Indices of the ``complete`` chunks that exist on disk (only they can hold a 1), from
    the folder listing of a local store: cost follows the written samples, not
    ``n_samples``. None when the store is not a local folder or a file name is unexpected."""
    arr = root["complete"]
    base = getattr(root.store, "root", None)
    if base is None or arr.chunks[0] != 1:
        return None
    folder = Path(base) / arr.path
    key = arr.metadata.encode_chunk_key((0,))
    layouts = {"c/0": (folder / "c", ""), "c.0": (folder, "c."), "0": (folder, "")}
    if key not in layouts:
        return None
    where, start = layouts[key]
    if not where.is_dir():
        return np.zeros(0, dtype=np.int64) if folder.is_dir() else None
    found = []
    for entry in os.scandir(where):
        name = entry.name
        if name == "zarr.json" or entry.is_dir() or not name.startswith(start):
            continue
        digits = name[len(start) :]
        if not digits.isdigit():
            return None
        found.append(int(digits))
    return np.asarray(sorted(found), dtype=np.int64)


def _runs(indices: np.ndarray, gap: int = 64) -> Iterable[np.ndarray]:
    """Sorted ``indices`` split where consecutive ones are more than ``gap`` apart or a run
    spans more than ``FLAG_BLOCK``: each run is read as one slice (zarr's coordinate
    selection allocates per entry of the whole array, 8 GB for 10⁹ samples)."""
    if not len(indices):
        return
    breaks = np.flatnonzero(np.diff(indices) > gap) + 1
    for run in np.split(indices, breaks):
        for s in range(0, len(run), FLAG_BLOCK):
            part = run[s : s + FLAG_BLOCK]
            while part[-1] - part[0] >= FLAG_BLOCK:  # a long sparse run: halve it
                half = np.searchsorted(part, part[0] + FLAG_BLOCK)
                yield part[:half]
                part = part[half:]
            yield part


def gather(arr, indices) -> np.ndarray:
    """``arr[indices]`` for sorted sample indices of a 1-D per-sample array, read as slices
    over runs of nearby indices (memory follows ``len(indices)``, not the array)."""
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty(len(indices), dtype=arr.dtype)
    pos = 0
    for run in _runs(indices):
        block = np.asarray(arr[int(run[0]) : int(run[-1]) + 1])
        out[pos : pos + len(run)] = block[run - run[0]]
        pos += len(run)
    return out


def _read_flags(arr, indices: np.ndarray, strict: bool = False) -> np.ndarray:
    """Flags at sorted ``indices``; a chunk that fails to decode reads as 0 (``strict``:
    raises :class:`StoreError` naming the sample)."""
    out = np.zeros(len(indices), dtype=np.uint8)
    pos = 0
    for run in _runs(indices):
        try:
            out[pos : pos + len(run)] = gather(arr, run)
        except Exception:
            for j, i in enumerate(run):
                try:
                    out[pos + j] = arr[int(i)]
                except Exception as err:
                    if strict:
                        raise StoreError(
                            f"the complete flag of sample {int(i)} is damaged ({_one_line(err)})"
                        ) from None
                    out[pos + j] = 0
        pos += len(run)
    return out


def _flag_blocks(arr, strict: bool = False) -> Iterable[tuple[int, np.ndarray]]:
    """``(start, flags)`` of every block of ``FLAG_BLOCK`` samples (damaged chunks read 0,
    or raise with ``strict``)."""
    n, step = arr.shape[0], arr.chunks[0]
    for s in range(0, n, FLAG_BLOCK):
        e = min(s + FLAG_BLOCK, n)
        try:
            yield s, np.asarray(arr[s:e], dtype=np.uint8)
        except Exception:
            out = np.zeros(e - s, dtype=np.uint8)
            for t in range(s, e, step):
                try:
                    out[t - s : t - s + step] = arr[t : min(t + step, e)]
                except Exception as err:
                    if strict:
                        raise StoreError(
                            f"the complete flag of sample {t} is damaged ({_one_line(err)})"
                        ) from None
                    out[t - s : t - s + step] = 0
            yield s, out


def complete_indices(root, strict: bool = False) -> np.ndarray:
    """Indices of the complete samples, in order, in memory that grows with the complete
    samples only (``simgen inspect`` of a store of 10⁹ planned samples stays small).

    A damaged flag reads as 0 (the sample is recomputed on resume); with ``strict`` it
    raises :class:`StoreError` naming the sample (readers that must not skip samples).
    """
    arr = root["complete"]
    written = _written_flag_chunks(root)
    if written is not None:
        written = written[written < arr.shape[0]]
        return written[_read_flags(arr, written, strict) == 1]
    parts = [s + np.flatnonzero(flags == 1) for s, flags in _flag_blocks(arr, strict)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def complete_flags(root, strict: bool = False) -> np.ndarray:
    """The ``complete`` flags as a uint8 array of ``n_samples``; a damaged flag reads as 0
    (recompute the sample) instead of failing, or raises with ``strict``."""
    out = np.zeros(root["complete"].shape[0], dtype=np.uint8)
    out[complete_indices(root, strict)] = 1
    return out


def mark_incomplete(root, indices) -> None:
    """Clear the completion flags of ``indices`` (damaged samples), so that resuming the
    store recomputes them."""
    with _every_chunk_written():
        arr = root["complete"]
        for i in indices:
            arr[int(i)] = 0


def write_sample(root, index: int, sample) -> None:
    """Write sample ``index`` (every array it owns), then its completion flag.

    ``sample`` has ``image`` [H, W], ``mask`` [H, W], ``columns`` (mapping with x, y,
    class_id, site, n_atoms, counts and ``elements``) and ``params`` (name -> float).
    """
    SampleWriter(root).write([index], [sample])


def _checked_read(root, index: int, name: str, read):
    """``read()``, a damaged chunk reported as one :class:`StoreError` naming the store and
    the sample (each codec raises its own exception type)."""
    try:
        return read()
    except StoreError:
        raise
    except Exception as err:
        where = getattr(getattr(root, "store", None), "root", None) or root.store_path
        raise StoreError(
            f"{where}: sample {index} is damaged ({name}: {_one_line(err)}); run `simgen check "
            f"--integrity {where}`, then the same `simgen generate` to recompute it"
        ) from None


def read_image(root, index: int) -> np.ndarray:
    """Recorded image of sample ``index`` (damage reported as :class:`StoreError`)."""
    return _checked_read(root, index, "images", lambda: np.asarray(root["images"][index]))


def read_mask(root, index: int) -> np.ndarray:
    """Class mask of sample ``index`` (damage reported as :class:`StoreError`)."""
    return _checked_read(root, index, "masks", lambda: np.asarray(root["masks"][index]))


def read_columns(root, index: int) -> dict[str, np.ndarray]:
    """Column table of sample ``index`` in recorded-image pixels."""

    def read():
        o = int(root["columns/offset"][index])
        n = int(root["columns/count"][index])
        out = {name: np.asarray(root[f"columns/{name}"][o : o + n]) for name in COLUMN_FIELDS}
        out["counts"] = np.asarray(root["columns/counts"][o : o + n])
        return out

    return _checked_read(root, index, "columns", read)


def summary(root) -> dict:
    """What ``simgen inspect`` prints: completion, class frequencies, parameter ranges."""
    done = complete_indices(root)  # memory follows the complete samples, not n_samples
    names = root.attrs["label_scheme"]["names"]
    class_counts = np.zeros(len(names), dtype=np.int64)
    pixel_counts = np.zeros(len(names), dtype=np.int64)
    for i in done:
        cols = read_columns(root, int(i))
        class_counts += np.bincount(cols["class_id"].astype(np.int64), minlength=len(names))[
            : len(names)
        ]
        pixel_counts += np.bincount(read_mask(root, int(i)).ravel(), minlength=len(names))[
            : len(names)
        ]
    params = {}
    for name in root.attrs["param_names"]:
        values = gather(root["params"][name], done)
        values = values[np.isfinite(values)]
        lo, hi = (values.min(), values.max()) if len(values) else (np.inf, -np.inf)
        if lo <= hi:
            params[name] = (float(lo), float(hi))
    return {
        "n_samples": int(root.attrs["n_samples"]),
        "completed": len(done),
        "image_shape": list(root.attrs["image_shape"]),
        "pixel_size_A": root.attrs.get("pixel_size_A"),
        "label_scheme": root.attrs["label_scheme"]["name"],
        "columns_per_class": {n: int(c) for n, c in zip(names, class_counts, strict=True)},
        "pixels_per_class": {n: int(c) for n, c in zip(names, pixel_counts, strict=True)},
        "params": params,
    }


# -- calibration cache (the physics code never touches disk) ------------------------------
def calibration_cache_dir() -> Path:
    """``$SIMGEN_CACHE`` or ``~/.cache/simgen``, holding calibrations as JSON."""
    return Path(os.environ.get("SIMGEN_CACHE", Path.home() / ".cache" / "simgen"))


def calibration_cache_file(key: str) -> Path:
    """Where the calibration ``key`` is cached."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
    return calibration_cache_dir() / "calibrations" / f"{safe}.json"


def load_cached_calibration(key: str) -> dict | None:
    """The cached calibration dict for ``key``, or None."""
    f = calibration_cache_file(key)
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: recompute


@functools.lru_cache(maxsize=1)
def shipped_calibration_table() -> dict:
    """The calibration table shipped in the package (``simgen/data/calibrations.json``,
    :mod:`simgen.calibration_table`), or ``{}`` if it is missing or unreadable."""
    from importlib import resources

    try:
        text = resources.files("simgen").joinpath("data/calibrations.json").read_text()
        return json.loads(text)
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return {}


def save_calibration(key: str, data: Mapping) -> Path:
    """Cache a calibration dict atomically; returns the file."""
    f = calibration_cache_file(key)
    f.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(f, json.dumps(dict(data), indent=1, default=float))


def iter_complete(root) -> Iterable[int]:
    yield from (int(i) for i in complete_indices(root))


# -- writer lock ---------------------------------------------------------------------------
class LockedError(StoreError):
    """Another live process is writing the store (or run)."""


def lock_path(path: str | Path) -> Path:
    """The lock file of the store (or run folder) ``path``: ``<path>.lock`` beside it, so
    that replacing the store never removes the lock."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _read_lock(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign: treat as held by an unknown writer


class WriterLock:
    """Exclusive lock on a store or run being written, as a context manager.

    The lock file holds the holder's ``pid``, ``host`` and ``since`` (UTC). A second writer
    gets :class:`LockedError` naming them, whatever its config; a lock left by a dead process
    on this host (SIGKILL) is taken over.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = lock_path(path)
        self.held = False

    def __enter__(self):
        import socket

        host = socket.gethostname()
        me = {
            "pid": os.getpid(),
            "host": host,
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_lock(self.lock)
                if other is None:
                    continue  # released meanwhile
                pid = other.get("pid")
                stale = other.get("host") == host and isinstance(pid, int) and not _pid_alive(pid)
                if not stale:
                    raise LockedError(
                        f"{self.path} is being written by pid {other.get('pid', '?')} on host "
                        f"{other.get('host', '?')} since {other.get('since', '?')}; wait for it "
                        f"to finish, or remove {self.lock} if that process is gone"
                    ) from None
                self.lock.unlink(missing_ok=True)  # its holder died: take it over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise LockedError(f"{self.path}: could not take the lock {self.lock}")

    def __exit__(self, *exc):
        if self.held:
            other = _read_lock(self.lock)
            if other and other.get("pid") == os.getpid():
                self.lock.unlink(missing_ok=True)
            self.held = False
        return False


def creation_unfinished(path: str | Path) -> bool:
    """True when ``path`` is a store whose creation was interrupted (marker, no schema)."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(attrs.get(MARKER_ATTR)) and "schema_version" not in attrs


def free_space(path: str | Path) -> int:
    """Free bytes on the file system that would hold ``path`` (its nearest existing
    parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# -- extra tables (movie stores) -----------------------------------------------------------
def write_table(root, name: str, data, *, dims: tuple[str, ...], attrs: Mapping | None = None):
    """Write a whole array ``name`` (e.g. ``"events/frame"``) in one chunk, with the
    store's codecs (CRC-32C checked); written once, by the process creating the store."""
    data = np.asarray(data)
    parts = name.split("/")
    group = root
    for part in parts[:-1]:
        group = group.require_group(part)
    chunks = tuple(max(1, s) for s in data.shape)
    fill = 0 if data.dtype.kind in "biu" else np.nan
    arr = _array(group, parts[-1], data.shape, chunks, data.dtype, fill, dims, attrs)
    with _every_chunk_written():
        if data.size:
            arr[...] = data
    return arr


def create_slot_array(root, name: str, dtype: str, fill, attrs: Mapping | None = None):
    """A per-column-slot array ``columns/<name>`` (chunked like the column table) that
    :func:`write_slot_values` fills sample by sample."""
    n, c = int(root.attrs["n_samples"]), int(root.attrs["column_capacity"])
    chunk = root["columns/x"].chunks
    return _array(root["columns"], name, (n * c,), chunk, dtype, fill, ("slot",), attrs)


def write_slot_values(root, name: str, index: int, values, fill) -> None:
    """Write sample ``index``'s values of ``columns/<name>`` (before its completion flag)."""
    c = int(root.attrs["column_capacity"])
    arr = root[f"columns/{name}"]
    buf = np.full(c, fill, dtype=arr.dtype)
    values = np.asarray(values)
    buf[: len(values)] = values
    with _every_chunk_written():
        arr[index * c : (index + 1) * c] = buf


def read_slot_values(root, name: str, index: int) -> np.ndarray:
    """Sample ``index``'s values of ``columns/<name>`` (as many as its columns)."""

    def read():
        o = int(root["columns/offset"][index])
        n = int(root["columns/count"][index])
        return np.asarray(root[f"columns/{name}"][o : o + n])

    return _checked_read(root, index, f"columns/{name}", read)
