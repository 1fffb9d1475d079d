"""Read-only access to simgen stores (``docs/store.md``, ``schema_version = 1``).

Everything here uses plain ``zarr`` and NumPy, never torch or simgen's writer, and only
the documented layout: ``images``, ``masks``, ``complete``, ``columns/*`` and the root
attributes ``schema_version``, ``label_scheme``, ``pixel_size_A``, ``image_shape`` and
``n_samples``.

:class:`StoreInfo` is cheap to build (attributes and the ``complete`` flags only) and
picklable; the Zarr group is opened lazily, once per process, on first data access, so a
``StoreInfo`` can travel to DataLoader workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from structures.columns import LabelScheme

SCHEMA_VERSION = 1
REQUIRED_ATTRS = ("schema_version", "label_scheme", "pixel_size_A", "image_shape", "n_samples")
REQUIRED_ARRAYS = (
    "images",
    "masks",
    "complete",
    "columns/x",
    "columns/y",
    "columns/class_id",
    "columns/offset",
    "columns/count",
)


class StoreError(ValueError):
    """A store is missing, unreadable, of another schema version or of another label scheme."""


def scheme_from_attrs(value, where: str = "label_scheme") -> LabelScheme:
    """The :class:`structures.LabelScheme` of a store's (or checkpoint's) ``label_scheme``.

    Accepts the full form simgen writes and the bare ``{"ids": [...], "names": [...]}``.

    Raises
    ------
    StoreError
        Malformed mapping (missing keys, unequal lengths, ids outside [0, 255], duplicates).
    """
    try:
        return LabelScheme.from_dict(value, where)
    except ValueError as err:
        raise StoreError(str(err)) from None


@dataclass
class StoreInfo:
    """Metadata of one store, validated, plus lazy per-process access to its arrays.

    Use :func:`open_store` to build one.
    """

    path: str
    scheme: LabelScheme
    pixel_size_A: float
    image_shape: tuple[int, int]
    n_samples: int
    complete: np.ndarray
    #: Trained on, never validated on (pseudo-labels of ``simgen-train adapt``).
    train_only: bool = False
    _root: object = field(default=None, repr=False, compare=False)
    _pid: int = field(default=-1, repr=False, compare=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_root"], state["_pid"] = None, -1
        return state

    @property
    def root(self):
        """The Zarr group, opened read-only once per process."""
        if self._root is None or self._pid != os.getpid():
            import zarr

            self._root = zarr.open_group(self.path, mode="r")
            self._pid = os.getpid()
        return self._root

    def complete_indices(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Indices in ``[start, stop)`` whose ``complete`` flag is 1."""
        stop = self.n_samples if stop is None else min(stop, self.n_samples)
        idx = np.arange(start, max(start, stop))
        return idx[self.complete[idx] == 1]

    def _read(self, i: int, name: str, read):
        """``read()``, with a damaged chunk (checksum mismatch, undecodable bytes) reported
        as one :class:`StoreError` naming the store and the sample, not a codec traceback."""
        try:
            return read()
        except Exception as err:  # each codec raises its own type
            text = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise StoreError(
                f"{self.path}: sample {i} is damaged ({name}: {text}); run `simgen check "
                f"--integrity {self.path}` and resume the store to recompute it"
            ) from None

    def image(self, i: int) -> np.ndarray:
        """Recorded image of sample ``i`` as float32 ``[H, W]``."""
        return self._read(i, "images", lambda: np.asarray(self.root["images"][i], dtype=np.float32))

    def mask(self, i: int) -> np.ndarray:
        """Class-id mask of sample ``i`` as uint8 ``[H, W]``."""
        return self._read(i, "masks", lambda: np.asarray(self.root["masks"][i], dtype=np.uint8))

    def columns(self, i: int) -> dict[str, np.ndarray]:
        """Columns of sample ``i``: ``x``, ``y`` (pixels; col = x, row = y) and ``class_id``."""
        root = self.root

        def read():
            o = int(root["columns/offset"][i])
            n = int(root["columns/count"][i])
            return {
                "x": np.asarray(root["columns/x"][o : o + n], dtype=np.float64),
                "y": np.asarray(root["columns/y"][o : o + n], dtype=np.float64),
                "class_id": np.asarray(root["columns/class_id"][o : o + n], dtype=np.int64),
            }

        return self._read(i, "columns", read)


def open_store(path: str | os.PathLike) -> StoreInfo:
    """Open a store read-only and check it against the documented schema.

    Parameters
    ----------
    path : str or path-like
        Directory of a Zarr v3 group written by simgen.

    Returns
    -------
    StoreInfo

    Raises
    ------
    StoreError
        When the path does not exist, is not a Zarr group, has another
        ``schema_version``, or lacks a documented attribute or array.
    """
    import zarr

    path = str(path)
    if not Path(path).exists():
        raise StoreError(f"store not found: {path}")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several types for a non-store directory
        raise StoreError(f"not a readable Zarr group: {path} ({type(err).__name__})") from None
    attrs = dict(root.attrs)
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if "schema_version" in missing:
        raise StoreError(f"{path}: no schema_version attribute; not a simgen store")
    version = attrs["schema_version"]
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema_version {version!r} is not supported (this reader reads "
            f"{SCHEMA_VERSION}); regenerate the store or update simgen"
        )
    if missing:
        raise StoreError(f"{path}: missing root attribute(s) {', '.join(missing)}")
    for name in REQUIRED_ARRAYS:
        try:
            root[name]
        except KeyError:
            raise StoreError(f"{path}: missing array {name!r}") from None
    scheme = scheme_from_attrs(attrs["label_scheme"], f"{path}: label_scheme")
    shape = tuple(int(s) for s in attrs["image_shape"])
    n = int(attrs["n_samples"])
    if root["images"].shape != (n, *shape) or root["masks"].shape != (n, *shape):
        raise StoreError(
            f"{path}: images/masks shape {root['images'].shape} does not match "
            f"n_samples={n}, image_shape={list(shape)}"
        )
    from simgen import store as simgen_store

    try:
        complete = simgen_store.complete_flags(root, strict=True)
    except simgen_store.StoreError as err:  # a damaged flag chunk
        raise StoreError(f"{path}: {err}; run `simgen check --integrity {path}`") from None
    if attrs.get("pixel_size_A") is None:
        raise StoreError(
            f"{path}: its samples have different pixel sizes (optics.pixel_size_A is drawn); "
            "training needs one pixel size per store: generate it with a fixed pixel size"
        )
    return StoreInfo(
        path=path,
        scheme=scheme,
        pixel_size_A=float(attrs["pixel_size_A"]),
        image_shape=shape,  # type: ignore[arg-type]
        n_samples=n,
        complete=complete,
        train_only=bool(attrs.get("train_only", False)),
    )


def open_stores(paths, expected: LabelScheme | None = None) -> list[StoreInfo]:
    """Open several stores and check that they share one label scheme.

    Parameters
    ----------
    paths : sequence of str or path-like
        Store directories.
    expected : LabelScheme, optional
        Scheme they must all have (e.g. the one a checkpoint was trained on); by default
        the first store's.

    Returns
    -------
    list of StoreInfo

    Raises
    ------
    StoreError
        When a store fails :func:`open_store` or has a different label scheme.
    """
    paths = list(paths)
    if not paths:
        raise StoreError("no store given")
    stores = [open_store(p) for p in paths]
    ref = expected if expected is not None else stores[0].scheme
    ref_name = "the model's" if expected is not None else f"{stores[0].path}'s"
    for s in stores:
        check_scheme(s.scheme, ref, f"{s.path}", ref_name)
    return stores


def check_scheme(scheme: LabelScheme, ref: LabelScheme, what: str, ref_what: str) -> None:
    """Raise :class:`StoreError` when two label schemes differ, saying how."""
    if scheme.same_classes(ref):
        return
    raise StoreError(
        f"label scheme mismatch: {what} has {dict(zip(scheme.ids, scheme.names, strict=True))}"
        f" but {ref_what} is {dict(zip(ref.ids, ref.names, strict=True))}"
    )


def split_indices(
    store: StoreInfo,
    *,
    val_fraction: float = 0.1,
    train_range: tuple[int, int] | None = None,
    val_range: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of one store by sample index.

    Without explicit ranges the last ``ceil(val_fraction · n_samples)`` indices are for
    validation and the others for training. Only samples with ``complete == 1`` are kept.

    Parameters
    ----------
    store : StoreInfo
    val_fraction : float
        Fraction of the indices kept for validation.
    train_range, val_range : (int, int), optional
        Explicit ``[start, stop)`` index ranges (override ``val_fraction``; a missing one is
        the rest of the store).

    Returns
    -------
    train, val : ndarray of int
    """
    n = store.n_samples
    if train_range is None and val_range is None:
        n_val = int(np.ceil(val_fraction * n)) if val_fraction > 0 else 0
        train_range, val_range = (0, n - n_val), (n - n_val, n)
    elif train_range is None:
        train_range = (0, val_range[0]) if val_range[0] > 0 else (val_range[1], n)
    elif val_range is None:
        val_range = (train_range[1], n) if train_range[1] < n else (0, train_range[0])
    if max(train_range[0], val_range[0]) < min(train_range[1], val_range[1]):
        raise StoreError(f"train_range {list(train_range)} overlaps val_range {list(val_range)}")
    return store.complete_indices(*train_range), store.complete_indices(*val_range)
