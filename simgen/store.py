"""Zarr v3 dataset stores: the only module of simgen that touches disk.

Schema in ``docs/store.md``. Each sample owns whole chunks (one sample per chunk) of every
array, so any number of workers can write concurrently without read-modify-write races
(zarr-python#3682). Root attributes are written once, by the coordinating process.
``complete[i]`` is written last for sample i: a killed run resumes by recomputing exactly
the samples whose flag is 0.
"""

from __future__ import annotations

import datetime
import json
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


def _array(group, name, shape, chunks, dtype, fill):
    return group.create_array(
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, overwrite=True
    )


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
    if path.exists():
        if not overwrite:
            raise StoreError(f"{path} exists; use --overwrite to replace it")
        shutil.rmtree(path)
    n, (h, w), c = layout.n_samples, layout.image_shape, layout.column_capacity
    e = max(len(layout.elements), 1)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    k = layout.samples_per_chunk  # a task owns k consecutive samples = one chunk
    _array(root, "images", (n, h, w), (k, h, w), "float32", 0.0)
    _array(root, "masks", (n, h, w), (k, h, w), "uint8", 0)
    _array(root, "complete", (n,), (1,), "uint8", 0)
    cols = root.create_group("columns")
    for name, (dtype, fill) in COLUMN_FIELDS.items():
        _array(cols, name, (n * c,), (c,), dtype, fill)
    _array(cols, "counts", (n * c, e), (c, e), "uint8", 0)
    offset = _array(cols, "offset", (n,), (n,), "int64", 0)
    offset[:] = np.arange(n, dtype=np.int64) * c
    _array(cols, "count", (n,), (1,), "int32", 0)
    params = root.create_group("params")
    for name in layout.param_names:
        _array(params, name, (n,), (1,), "float64", np.nan)
    root.attrs.update(
        {
            **dict(attrs),
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
    try:
        root = zarr.open_group(str(path), mode=mode)
    except Exception as err:  # zarr raises several kinds for non-stores
        raise StoreError(f"{path} is not a Zarr store: {err}") from None
    version = root.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
        )
    return root


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def open_for_resume(path: str | Path, config: Mapping, layout: StoreLayout):
    """Open an existing store to continue it; refuse a store made by another config."""
    root = open_store(path, mode="r+")
    if _canonical(root.attrs.get("config")) != _canonical(dict(config)):
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
    """Indices of the samples not yet complete."""
    return np.flatnonzero(np.asarray(root["complete"][:]) == 0)


def write_samples(root, indices, samples) -> None:
    """Write consecutive samples (one chunk group), then their completion flags."""
    for index, sample in zip(indices, samples, strict=True):
        write_sample(root, index, sample, flag=False)
    for index in indices:
        root["complete"][index] = 1


def write_sample(root, index: int, sample, *, flag: bool = True) -> None:
    """Write sample ``index`` (every array it owns), then its completion flag.

    ``sample`` has ``image`` [H, W], ``mask`` [H, W], ``columns`` (mapping with x, y,
    class_id, site, n_atoms, counts and ``elements``) and ``params`` (name -> float).
    """
    c = int(root.attrs["column_capacity"])
    elements = list(root.attrs["elements"])
    cols = sample.columns
    n = len(cols["x"])
    if n > c:
        raise StoreError(f"sample {index}: {n} columns exceed the store's capacity {c}")
    root["images"][index] = np.asarray(sample.image, dtype=np.float32)
    root["masks"][index] = np.asarray(sample.mask, dtype=np.uint8)
    start = index * c
    for name, (dtype, fill) in COLUMN_FIELDS.items():
        buf = np.full(c, fill, dtype=dtype)
        buf[:n] = np.asarray(cols[name])
        root[f"columns/{name}"][start : start + c] = buf
    counts = np.zeros((c, max(len(elements), 1)), dtype=np.uint8)
    for j, el in enumerate(cols["elements"]):
        if el not in elements:
            raise StoreError(f"sample {index}: element {el} not in the store's list {elements}")
        counts[:n, elements.index(el)] = np.asarray(cols["counts"])[:, j]
    root["columns/counts"][start : start + c] = counts
    root["columns/count"][index] = n
    params = root["params"]
    for name in root.attrs["param_names"]:
        params[name][index] = float(sample.params.get(name, np.nan))
    if flag:
        root["complete"][index] = 1


def read_columns(root, index: int) -> dict[str, np.ndarray]:
    """Column table of sample ``index`` in recorded-image pixels."""
    o = int(root["columns/offset"][index])
    n = int(root["columns/count"][index])
    out = {name: np.asarray(root[f"columns/{name}"][o : o + n]) for name in COLUMN_FIELDS}
    out["counts"] = np.asarray(root["columns/counts"][o : o + n])
    return out


def summary(root) -> dict:
    """What ``simgen inspect`` prints: completion, class frequencies, parameter ranges."""
    complete = np.asarray(root["complete"][:]).astype(bool)
    names = root.attrs["label_scheme"]["names"]
    class_counts = np.zeros(len(names), dtype=np.int64)
    pixel_counts = np.zeros(len(names), dtype=np.int64)
    for i in np.flatnonzero(complete):
        cols = read_columns(root, int(i))
        class_counts += np.bincount(cols["class_id"].astype(np.int64), minlength=len(names))[
            : len(names)
        ]
        pixel_counts += np.bincount(np.asarray(root["masks"][i]).ravel(), minlength=len(names))[
            : len(names)
        ]
    params = {}
    for name in root.attrs["param_names"]:
        values = np.asarray(root["params"][name][:])[complete]
        values = values[np.isfinite(values)]
        if len(values):
            params[name] = (float(values.min()), float(values.max()))
    return {
        "n_samples": int(root.attrs["n_samples"]),
        "completed": int(complete.sum()),
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


def _cache_file(key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
    return calibration_cache_dir() / "calibrations" / f"{safe}.json"


def load_cached_calibration(key: str) -> dict | None:
    """The cached calibration dict for ``key``, or None."""
    f = _cache_file(key)
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: recompute


def save_calibration(key: str, data: Mapping) -> Path:
    """Cache a calibration dict atomically; returns the file."""
    f = _cache_file(key)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(data), indent=1, default=float))
    os.replace(tmp, f)
    return f


def iter_complete(root) -> Iterable[int]:
    yield from (int(i) for i in np.flatnonzero(np.asarray(root["complete"][:])))
