"""Train from human labels: corrected label folders (and images labelled elsewhere) → a store.

People correct the network's catalogue in ``simgen-train review``; this module turns what
they corrected into training data and trains on it mixed with simulated stores:

* :func:`human_samples` reads the **reviewed images** of a label output folder (those with a
  ``corrections.csv``; the journal is replayed on the original ``columns.csv``, see
  :mod:`training.experiments.review`) and **images labelled elsewhere**: a folder of image
  files, each beside a points table ``NAME.csv`` (``x_px, y_px, class_name``; ``class_id``
  instead of the name also works) or a class mask ``NAME_mask.{npy,png,tif}``.
* :func:`write_human_store` resamples every image to the network's pixel size (cubic
  spline, :func:`~training.experiments.label.resample_image`), renders the class mask from
  the catalogue with the simulator's rule (disks of ``labels.disk_radius_A``, nearest column
  wins, :func:`simgen.labels.class_mask`; empty sites such as ``vac_M`` get their disk too,
  as in simulated masks) and writes a store of the documented schema (``docs/store.md``,
  one sample per image, images padded to one shape with their median and background),
  which training reads like any other.
* :func:`finetune` continues a trained run (single network or ensemble) on simulated
  stores plus that store, with ``data.store_weights`` setting the share of real draws
  (``real_fraction``); validation is split off by image (``data.val_fraction`` of every
  store's samples, at least one real image left for training).

Positions are ``(x, y)`` in pixels (pixel centres at integers); lengths in Å.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simgen.experiment.lattice import scheme_names
from simgen.labels import UNLABELLED
from training.experiments.label import LABEL_MARKER, resample_image

#: Name of the store of human labels inside a finetune / train output folder.
HUMAN_STORE = "human_labels.zarr"
MASK_SUFFIXES = (".npy", ".png", ".tif", ".tiff")


@dataclass(frozen=True)
class HumanSample:
    """One human-labelled image in its file's pixels.

    Attributes
    ----------
    name : str
    image : ndarray of float32, shape (H, W)
    pixel_size_A : float
        [Å/px].
    x, y : ndarray of float, shape (N,)
        Column (and empty-site) positions [px]; empty for a mask sample.
    class_id : ndarray of int, shape (N,)
        :data:`simgen.labels.UNLABELLED` for a site left without a label (its disk gets no
        loss in training).
    mask : ndarray of uint8, shape (H, W) or None
        A class mask drawn elsewhere (then ``x, y, class_id`` may be empty).
    """

    name: str
    image: np.ndarray
    pixel_size_A: float
    x: np.ndarray
    y: np.ndarray
    class_id: np.ndarray
    mask: np.ndarray | None = None


def _reviewed(folder: Path, names, reviewed_only: bool) -> list[HumanSample]:
    from training.experiments.review import CORRECTIONS, ImageReview, find_label_images

    out = []
    for name in find_label_images(folder):
        if reviewed_only and not (folder / name / CORRECTIONS).is_file():
            continue
        rv = ImageReview(folder, name)
        if tuple(rv.class_names) != tuple(names):
            raise ValueError(
                f"{folder / name}: labelled with classes {list(rv.class_names)}, the network "
                f"has {list(names)}"
            )
        cat = rv.catalogue()
        out.append(
            HumanSample(
                f"{folder.name}/{name}",
                rv.read_image(),
                rv.pixel_size_A,
                cat.x_px,
                cat.y_px,
                cat.class_id,
            )  # fmt: skip
        )
    return out


def _elsewhere(folder: Path, names, pixel_size_A: float | None) -> list[HumanSample]:
    """Images with a points CSV (``NAME.csv``) or a mask (``NAME_mask.*``) beside them."""
    from simgen.experiment.readers import FORMATS, read_image

    out = []
    images = sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in FORMATS and not p.stem.endswith("_mask")
    )  # fmt: skip
    for path in images:
        points = path.with_suffix(".csv")
        masks = [path.with_name(f"{path.stem}_mask{s}") for s in MASK_SUFFIXES]
        masks = [m for m in masks if m.is_file()]
        if not points.is_file() and not masks:
            continue
        (im,) = read_image(path, pixel_size_A=pixel_size_A, calibrate="file")[:1]
        if masks:
            mask = _read_mask(masks[0], im.data.shape, len(names))
            out.append(
                HumanSample(
                    path.stem,
                    im.data,
                    im.pixel_size_A,
                    np.zeros(0),
                    np.zeros(0),
                    np.zeros(0, np.int64),
                    mask,
                )  # fmt: skip
            )
            continue
        x, y, cid = _read_points(points, names)
        out.append(HumanSample(path.stem, im.data, im.pixel_size_A, x, y, cid))
    if not out:
        raise ValueError(
            f"{folder}: neither a label output folder ({LABEL_MARKER}) nor images with a "
            "points table NAME.csv or a mask NAME_mask.npy/.png/.tif beside them"
        )
    return out


def _read_points(path: Path, names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"x_px", "y_px"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns x_px, y_px and class_name (or class_id)")
    x = np.array([float(r["x_px"]) for r in rows])
    y = np.array([float(r["y_px"]) for r in rows])
    cid = []
    for i, r in enumerate(rows, start=2):
        if r.get("class_name"):
            if r["class_name"] not in names[1:]:
                raise ValueError(f"{path}: line {i}: class {r['class_name']!r} is not one of "
                                 f"{', '.join(names[1:])}")  # fmt: skip
            cid.append(names.index(r["class_name"]))
        elif r.get("class_id", "").strip().isdigit() and 0 < int(r["class_id"]) < len(names):
            cid.append(int(r["class_id"]))
        else:
            raise ValueError(f"{path}: line {i}: no valid class_name or class_id")
    return x, y, np.array(cid, dtype=np.int64)


def _read_mask(path: Path, shape, n_classes: int) -> np.ndarray:
    if path.suffix == ".npy":
        mask = np.load(path)
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            mask = np.asarray(im)
    else:
        import tifffile

        mask = tifffile.imread(path)
    mask = np.asarray(mask)
    if mask.shape != tuple(shape) or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{path}: expected an integer class mask of shape {tuple(shape)}")
    if mask.min() < 0 or mask.max() >= n_classes:
        raise ValueError(f"{path}: class ids must be in 0..{n_classes - 1}")
    return mask.astype(np.uint8)


def human_samples(
    paths, class_names, *, reviewed_only: bool = True, pixel_size_A: float | None = None
) -> list[HumanSample]:
    """Human-labelled images from label output folders and folders labelled elsewhere.

    Parameters
    ----------
    paths : iterable of path-like
    class_names : sequence of str
        The network's classes by id (labels must use the same names).
    reviewed_only : bool
        From a label folder take only images with a ``corrections.csv``.
    pixel_size_A : float, optional
        [Å/px] of images labelled elsewhere whose files carry no calibration.

    Raises
    ------
    ValueError
        A path that is neither kind, classes that differ from the network's, a foreign
        ``corrections.csv``, or no human-labelled image at all.
    """
    names = tuple(class_names)
    out: list[HumanSample] = []
    for p in paths:
        folder = Path(p)
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder")
        if (folder / LABEL_MARKER).is_file():
            found = _reviewed(folder, names, reviewed_only)
            if not found:
                raise ValueError(
                    f"{folder}: no reviewed image (no corrections.csv); correct some with "
                    "`simgen-train review` first"
                )
            out.extend(found)
        else:
            out.extend(_elsewhere(folder, names, pixel_size_A))
    if not out:
        raise ValueError("no human-labelled image given")
    return out


def write_human_store(
    samples,
    out,
    *,
    scheme: dict,
    pixel_size_A: float,
    disk_radius_A: float = 0.7,
    train_only: bool = False,
):
    """Write human-labelled images as a training store at the network's pixel size.

    Parameters
    ----------
    samples : sequence of HumanSample
    out : path-like
        Store directory (replaced).
    scheme : dict
        The network's label scheme (``LabelScheme.to_dict()`` of its training stores), so the
        store opens with the simulated ones.
    pixel_size_A : float
        The network's training pixel size [Å/px].
    disk_radius_A : float
        Disk radius of a column in the masks [Å] (the simulated stores'
        ``labels.disk_radius_A``).
    train_only : bool
        Mark the store (root attribute ``train_only``) so that training draws from all its
        samples and validates on none (pseudo-labels are no ground truth).

    Returns
    -------
    pathlib.Path
    """
    import shutil

    import zarr

    from simgen.labels import class_mask

    prepared = []
    for s in samples:
        img, (fy, fx) = resample_image(s.image, s.pixel_size_A, pixel_size_A)
        if s.mask is not None:  # nearest-neighbour resampling of the class ids
            rows = np.clip(((np.arange(img.shape[0]) + 0.5) / fy - 0.5).round().astype(int),
                           0, s.mask.shape[0] - 1)  # fmt: skip
            cols = np.clip(((np.arange(img.shape[1]) + 0.5) / fx - 0.5).round().astype(int),
                           0, s.mask.shape[1] - 1)  # fmt: skip
            mask = s.mask[np.ix_(rows, cols)]
            x = y = np.zeros(0)
            cid = np.zeros(0, np.int64)
        else:
            x, y = (s.x + 0.5) * fx - 0.5, (s.y + 0.5) * fy - 0.5
            cid = np.asarray(s.class_id, np.int64)
            mask = np.asarray(
                class_mask(y, x, cid, img.shape, radius_px=disk_radius_A / pixel_size_A)
            ).astype(np.uint8)
            labelled = cid != UNLABELLED  # unlabelled sites: in the mask only
            x, y, cid = x[labelled], y[labelled], cid[labelled]
        prepared.append((img, mask, x, y, cid))
    h = max(p[0].shape[0] for p in prepared)
    w = max(p[0].shape[1] for p in prepared)
    n = len(prepared)
    cap = max(1, max(len(p[2]) for p in prepared))
    path = Path(out)
    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(str(path), mode="w")

    def arr(group, name, shape, chunks, dtype):
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)

    images = arr(root, "images", (n, h, w), (1, h, w), "float32")
    masks = arr(root, "masks", (n, h, w), (1, h, w), "uint8")
    complete = arr(root, "complete", (n,), (1,), "uint8")
    cols_g = root.create_group("columns")
    cx = arr(cols_g, "x", (n * cap,), (cap,), "float32")
    cy = arr(cols_g, "y", (n * cap,), (cap,), "float32")
    ccls = arr(cols_g, "class_id", (n * cap,), (cap,), "int16")
    offset = arr(cols_g, "offset", (n,), (n,), "int64")
    count = arr(cols_g, "count", (n,), (1,), "int32")
    offset[:] = np.arange(n, dtype=np.int64) * cap
    for i, (img, mask, x, y, cid) in enumerate(prepared):
        full = np.full((h, w), float(np.median(img)), np.float32)
        full[: img.shape[0], : img.shape[1]] = img
        m = np.zeros((h, w), np.uint8)
        m[: mask.shape[0], : mask.shape[1]] = mask
        images[i] = full
        masks[i] = m
        o, k = i * cap, len(x)
        if k:
            cx[o : o + k] = x
            cy[o : o + k] = y
            ccls[o : o + k] = cid
        count[i] = k
        complete[i] = 1
    root.attrs.update(
        {
            "schema_version": 1,
            "simgen_store": True,
            "label_scheme": dict(scheme),
            "pixel_size_A": float(pixel_size_A),
            "image_shape": [h, w],
            "n_samples": n,
            "column_capacity": cap,
            "config": {
                "human_labels": [s.name for s in samples],
                "labels": {"disk_radius_A": float(disk_radius_A)},
            },
            "model": "human",
            "train_only": bool(train_only),
        }
    )
    return path


def human_store_for(paths, out_dir, stores, *, reviewed_only=True, pixel_size_A=None) -> Path:
    """The human-label store of ``paths`` in ``out_dir``, matching the simulated ``stores``
    (their scheme, pixel size and mask disk radius)."""
    from training.stores import open_store

    ref = open_store(stores[0])
    samples = human_samples(
        paths, scheme_names(ref.scheme.to_dict()), reviewed_only=reviewed_only,
        pixel_size_A=pixel_size_A,
    )  # fmt: skip
    return store_for(samples, out_dir, stores)


def store_for(samples, out_dir, stores, *, train_only: bool = False) -> Path:
    """``out_dir/human_labels.zarr`` from ``samples``, matching the simulated ``stores``
    (their scheme, pixel size and mask disk radius); claims ``out_dir`` as a run folder.
    ``train_only``: see :func:`write_human_store`."""
    from training.stores import open_store
    from training.train import claim_run_folder

    ref = open_store(stores[0])
    cfg = dict(ref.root.attrs.get("config") or {})
    radius = float((cfg.get("labels") or {}).get("disk_radius_A", 0.7))
    claim_run_folder(out_dir)  # the human store goes inside the run folder: claim it first
    return write_human_store(
        samples,
        Path(out_dir) / HUMAN_STORE,
        scheme=ref.scheme.to_dict(),
        pixel_size_A=ref.pixel_size_A,
        disk_radius_A=radius,
        train_only=train_only,
    )


def mix_config(config, human_store, real_fraction: float):
    """``config`` with the human store added to the training stores and ``store_weights``
    giving it ``real_fraction`` of the draws (the simulated stores share the rest)."""
    if not 0.0 <= real_fraction <= 1.0 or not math.isfinite(real_fraction):
        raise ValueError(f"--real-fraction: expected 0..1, got {real_fraction}")
    sim = tuple(config.data.train_stores)
    if not sim:
        raise ValueError("no simulated training store (give --store or data.train_stores)")
    weights = tuple([(1.0 - real_fraction) / len(sim)] * len(sim) + [real_fraction])
    data = config.data.replace(train_stores=(*sim, str(human_store)), store_weights=weights)
    return config.replace(data=data)


def finetune(
    run,
    corrected,
    out,
    *,
    stores=None,
    real_fraction: float = 0.5,
    members: int | None = None,
    overrides=None,
    reviewed_only: bool = True,
    pixel_size_A: float | None = None,
):
    """Continue a trained run on its simulated stores mixed with human labels.

    Parameters
    ----------
    run : path-like
        Checkpoint, run directory or ensemble directory.
    corrected : iterable of path-like
        Reviewed label folders and/or folders labelled elsewhere (:func:`human_samples`).
    out : path-like
        New run directory (``human_labels.zarr`` goes inside it).
    stores : sequence of str, optional
        Simulated training stores (default: the run's ``data.train_stores``).
    real_fraction : float
        Share of training draws from the human labels.
    members : int, optional
        Ensemble size (default the run's: every member continues from its own weights).
    overrides : dict, optional
        Dotted config keys to change (``{"epochs": 5, "optim.lr": 1e-3}``; see
        :func:`simgen.configbase.parse_overrides` for ``--set`` strings).
    reviewed_only, pixel_size_A
        See :func:`human_samples`.

    Returns
    -------
    list of training.train.RunResult
    """
    config = continued_config(run, out, stores=stores, members=members, overrides=overrides)
    human = human_store_for(
        corrected, out, config.data.train_stores, reviewed_only=reviewed_only,
        pixel_size_A=pixel_size_A,
    )  # fmt: skip
    return train_config(mix_config(config, human, real_fraction), out)


def continued_config(run, out, *, stores=None, members=None, overrides=None):
    """The training config that continues ``run`` (every member from its own weights) on
    ``stores`` (default the run's simulated stores) into the new run folder ``out``.

    Parameters
    ----------
    run : path-like
        Checkpoint, run directory or ensemble directory.
    out : path-like
        New run directory; refused when it already holds a run.
    stores, members, overrides
        As in :func:`finetune`.

    Returns
    -------
    training.config.TrainConfig
    """
    from training.config import TrainConfig
    from training.predict import resolve_checkpoints
    from training.train import load_checkpoint_dict

    target = Path(out)
    if (target / "last.pt").exists() or (target / "ensemble.json").exists():
        raise ValueError(f"--out: {target} already holds a run; choose another directory")
    checkpoints = [str(p) for p in resolve_checkpoints(run)]
    info = load_checkpoint_dict(checkpoints[0])
    base = TrainConfig.from_dict(info["config"])
    sim = tuple(str(s) for s in (stores or base.data.train_stores))
    config = base.replace(
        members=members or len(checkpoints), init_from=tuple(checkpoints), seed=base.seed
    )
    config = config.replace(data=config.data.replace(train_stores=sim, store_weights=None))
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    if changes:
        config = config.with_overrides(changes)
    return config


def train_config(config, out):
    """Train ``config`` into ``out``: an ensemble when it has several members."""
    from training.train import train_ensemble, train_model

    if config.members > 1:
        return train_ensemble(config, out)
    return [train_model(config, out)]
