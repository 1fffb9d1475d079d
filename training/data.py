"""Stores → torch batches: a lazy segmentation dataset, its epoch sampler and loaders.

A :class:`SegmentationDataset` holds only metadata (:class:`~training.stores.StoreInfo`
and sample indices); each process opens the Zarr groups on its first read, so the dataset
is safe to hand to DataLoader workers. Training items are keyed by ``(item, epoch, draw)``
(see :class:`EpochSampler`): the crop and augmentation of a draw come from
``numpy.random.default_rng([seed, 1, epoch, draw])``, so an epoch is the same whatever the
number of workers and an interrupted run resumes exactly.

Every image goes through :func:`normalize_image` (re-exported from
:mod:`training.augment`) before cropping; inference uses the same function.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from simgen.labels import UNLABELLED
from structures.columns import LabelScheme
from training.augment import augment, normalize_image, random_crop
from training.config import AugmentConfig, DataConfig, PreprocessConfig
from training.preprocess import preprocess_image
from training.stores import StoreError, StoreInfo, open_stores, split_indices

__all__ = [
    "EpochSampler",
    "SegmentationDataset",
    "build_datasets",
    "class_frequencies",
    "collate",
    "item_weights",
    "make_loaders",
    "normalize_image",
]


class SegmentationDataset(Dataset):
    """Image/mask pairs from one or more stores, read lazily.

    Parameters
    ----------
    stores : list of StoreInfo
        Opened stores (one label scheme).
    indices : list of array_like of int
        Sample indices to use from each store (same order as ``stores``).
    crop : int
        Side of random square crops [px]; 0 = whole images.
    augment : AugmentConfig, optional
        Augmentations; ``None`` for none (validation).
    seed : int
        Seed of crops and augmentations.
    with_columns : bool
        Also return the true columns of each (whole) image, for column-level metrics.
    preprocess : PreprocessConfig, optional
        Applied to each whole image before the normalisation
        (:func:`training.preprocess.preprocess_image`).

    Notes
    -----
    ``dataset[i]`` with an int returns item ``i`` (random parts drawn from
    ``default_rng([seed, 0, i])``); ``dataset[(i, epoch, draw)]`` uses
    ``default_rng([seed, 1, epoch, draw])``. An item is a dict with ``image`` (float32
    ``[1, h, w]``), ``mask`` (int64 ``[h, w]``), ``store`` and ``index`` (ints), ``pixel_size_A``
    (float) and, with ``with_columns``, ``columns`` (dict of NumPy arrays ``x, y, class_id``).
    """

    def __init__(
        self,
        stores: list[StoreInfo],
        indices,
        *,
        crop: int = 0,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        with_columns: bool = False,
        preprocess: PreprocessConfig | None = None,
    ):
        if len(stores) != len(indices):
            raise ValueError("indices: expected one index array per store")
        self.stores = list(stores)
        self.items = [
            (s, int(i)) for s, idx in enumerate(indices) for i in np.asarray(idx, dtype=np.int64)
        ]
        self.crop = int(crop)
        self.augment = augment
        self.seed = int(seed)
        self.with_columns = with_columns
        self.preprocess = preprocess if preprocess is not None and preprocess.active else None
        if self.crop > 0:
            for st in self.stores:
                if self.crop > min(st.image_shape):
                    raise ValueError(
                        f"crop: {self.crop} px is larger than the images of {st.path} "
                        f"({st.image_shape[0]}×{st.image_shape[1]} px)"
                    )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def scheme(self) -> LabelScheme:
        """Label scheme shared by the stores."""
        return self.stores[0].scheme

    @property
    def same_shape(self) -> bool:
        """Whether all items have one shape (so they can be batched)."""
        if self.crop > 0:
            return True
        return len({st.image_shape for st in self.stores}) <= 1

    def __getitem__(self, key):
        if isinstance(key, tuple | list):
            item, epoch, draw = (int(k) for k in key)
            rng = np.random.default_rng([self.seed, 1, epoch, draw])
        else:
            item = int(key)
            rng = np.random.default_rng([self.seed, 0, item])
        s, i = self.items[item]
        store = self.stores[s]
        image = store.image(i)
        if self.preprocess is not None:
            image = preprocess_image(image, self.preprocess, store.pixel_size_A)
        image = normalize_image(image)
        mask = store.mask(i)
        image, mask = random_crop(image, mask, self.crop, rng)
        if self.augment is not None:
            a = self.augment
            image, mask = augment(
                image,
                mask,
                rng,
                dihedral_group=a.dihedral,
                scale=a.scale,
                offset=a.offset,
                noise_std=a.noise_std,
            )
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
            "store": s,
            "index": i,
            "pixel_size_A": store.pixel_size_A,
        }
        if self.with_columns:
            out["columns"] = store.columns(i)
        return out


class EpochSampler(Sampler):
    """Yields ``(item, epoch, draw)`` keys: a reshuffled pass over the items per epoch.

    Parameters
    ----------
    n_items : int
        Size of the dataset.
    samples_per_epoch : int
        Keys per epoch (0 = ``n_items``); items are repeated in further shuffled passes when
        it exceeds ``n_items``.
    seed : int
        Shuffling of epoch ``e`` uses ``default_rng([seed, 2, e])``.
    weights : array_like, shape (n_items,), optional
        Probability of each item per draw (normalised); the epoch then draws items
        independently with these probabilities instead of shuffled passes.
    """

    def __init__(self, n_items: int, samples_per_epoch: int = 0, seed: int = 0, weights=None):
        if n_items < 1:
            raise ValueError("n_items: the dataset is empty")
        self.n_items = n_items
        self.samples_per_epoch = samples_per_epoch or n_items
        self.seed = seed
        self.epoch = 0
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (n_items,) or np.any(w < 0) or not w.sum() > 0:
                raise ValueError(f"weights: expected {n_items} weights >= 0 with a positive sum")
            self.weights = w / w.sum()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, 2, self.epoch])
        if self.weights is not None:
            order = rng.choice(self.n_items, size=self.samples_per_epoch, p=self.weights)
        else:
            passes = math.ceil(self.samples_per_epoch / self.n_items)
            order = np.concatenate([rng.permutation(self.n_items) for _ in range(passes)])
        for draw, item in enumerate(order[: self.samples_per_epoch]):
            yield (int(item), self.epoch, draw)


def collate(batch: list[dict]) -> dict:
    """Stack images and masks; keep per-item metadata as lists."""
    out = {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "store": [b["store"] for b in batch],
        "index": [b["index"] for b in batch],
        "pixel_size_A": [b["pixel_size_A"] for b in batch],
    }
    if "columns" in batch[0]:
        out["columns"] = [b["columns"] for b in batch]
    return out


def build_datasets(
    data: DataConfig,
    augment_cfg: AugmentConfig | None,
    seed: int,
    preprocess: PreprocessConfig | None = None,
) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """Open the configured stores, split them, and build training and validation sets.

    Parameters
    ----------
    data : DataConfig
        Stores, split and crop size.
    augment_cfg : AugmentConfig, optional
        Training augmentations.
    seed : int
        Seed of crops and augmentations.
    preprocess : PreprocessConfig, optional
        Image preprocessing of both sets.

    Returns
    -------
    train, val : SegmentationDataset
        ``val`` is ``None`` when there is no validation data.

    Raises
    ------
    StoreError
        Missing store, wrong schema version, label schemes that differ, or no complete
        sample to train on.
    """
    if not data.train_stores:
        raise StoreError("data.train_stores: no training store given")
    train_stores = open_stores(data.train_stores)
    scheme = train_stores[0].scheme
    train_idx, val_idx = [], []
    separate_val = bool(data.val_stores)
    for st in train_stores:
        if st.train_only:  # pseudo-labels: trained on, never validated on
            train_idx.append(st.complete_indices())
            val_idx.append(np.zeros(0, dtype=np.int64))
        elif separate_val:
            span = data.train_range or (0, st.n_samples)
            train_idx.append(st.complete_indices(*span))
        else:
            t, v = split_indices(
                st,
                val_fraction=data.val_fraction,
                train_range=data.train_range,
                val_range=data.val_range,
            )
            train_idx.append(t)
            val_idx.append(v)
    if separate_val:
        val_stores = open_stores(data.val_stores, expected=scheme)
        val_idx = [st.complete_indices(*(data.val_range or (0, st.n_samples))) for st in val_stores]
    else:
        val_stores = train_stores
    if sum(len(t) for t in train_idx) == 0:
        raise StoreError("no complete training sample in the chosen range of the stores")
    train = SegmentationDataset(
        train_stores, train_idx, crop=data.crop, augment=augment_cfg, seed=seed,
        preprocess=preprocess,
    )  # fmt: skip
    _warn_incomplete_validation(data, val_stores if separate_val else train_stores, val_idx)
    if sum(len(v) for v in val_idx) == 0:
        return train, None
    val = SegmentationDataset(
        val_stores, val_idx, crop=0, augment=None, with_columns=True, preprocess=preprocess
    )
    return train, val


def _warn_incomplete_validation(data, stores, val_idx) -> None:
    """Say so when the validation part of the stores is not complete (a store still being
    generated): training would otherwise validate on fewer samples, or none, silently."""
    import logging

    log = logging.getLogger("training.data")
    for st, got in zip(stores, val_idx, strict=True):
        if st.train_only:
            continue
        if data.val_range is not None:
            lo, hi = data.val_range
            wanted = max(0, min(hi, st.n_samples) - lo)
        elif data.val_stores:
            wanted = st.n_samples
        else:
            wanted = math.ceil(data.val_fraction * st.n_samples) if data.val_fraction > 0 else 0
        if wanted and len(got) < wanted:
            what = "no validation" if len(got) == 0 else f"validation on {len(got)} of {wanted}"
            log.warning(
                "warning: %s: only %d of the %d samples of its validation part are complete; "
                "%s samples from it (finish the store with simgen generate)",
                st.path, len(got), wanted, what,
            )  # fmt: skip


def make_loaders(
    train: SegmentationDataset,
    val: SegmentationDataset | None,
    data: DataConfig,
    seed: int,
    *,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader | None]:
    """DataLoaders for training (keyed by :class:`EpochSampler`) and validation.

    Parameters
    ----------
    train, val : SegmentationDataset
    data : DataConfig
        Batch size, crops per epoch and workers.
    seed : int
        Shuffling seed.
    pin_memory : bool
        Pin host memory (useful when training on CUDA).

    Returns
    -------
    train_loader, val_loader : DataLoader
    """
    if data.crop == 0 and data.batch_size > 1 and not train.same_shape:
        raise ValueError(
            "data.crop: training stores have different image shapes; set a crop size or "
            "batch_size 1"
        )
    workers = data.num_workers
    sampler = EpochSampler(len(train), data.samples_per_epoch, seed, item_weights(train, data))
    # Loaders draw a worker base seed from their generator at every iter(); a private
    # generator keeps that from consuming the global torch RNG (which dropout uses), so
    # results do not depend on how often a loader is iterated (progress bars, resumes).
    # Our items never use torch's worker seeds (see SegmentationDataset).
    train_loader = DataLoader(
        train,
        batch_size=data.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = None
    if val is not None:
        val_loader = DataLoader(
            val,
            batch_size=data.batch_size if val.same_shape else 1,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
    return train_loader, val_loader


def item_weights(train: SegmentationDataset, data: DataConfig):
    """Draw probability of each training item from ``data.store_weights`` (None: uniform).

    A store's weight is shared equally by its items, so a store of 3 real images with weight
    0.5 gives half the draws whatever the size of the simulated stores.
    """
    if data.store_weights is None:
        return None
    if len(data.store_weights) != len(train.stores):
        raise ValueError(
            f"data.store_weights: {len(data.store_weights)} weight(s) for "
            f"{len(train.stores)} training store(s)"
        )
    stores = np.array([s for s, _ in train.items])
    counts = np.bincount(stores, minlength=len(train.stores))
    w = np.asarray(data.store_weights, dtype=np.float64)
    if not np.any(w[counts > 0] > 0):
        raise ValueError("data.store_weights: every store with training samples has weight 0")
    return w[stores] / counts[stores]


def class_frequencies(dataset: SegmentationDataset, n_classes: int, max_samples: int = 64):
    """Pixel count of every class over (up to ``max_samples`` evenly spaced) training masks.

    Parameters
    ----------
    dataset : SegmentationDataset
    n_classes : int
        Number of classes (length of the result).
    max_samples : int
        Masks to read at most.

    Returns
    -------
    ndarray of int64, shape (n_classes,)
    """
    n = len(dataset.items)
    pick = np.unique(np.linspace(0, n - 1, min(n, max_samples)).round().astype(int))
    counts = np.zeros(n_classes, np.int64)
    for j in pick:
        s, i = dataset.items[j]
        m = dataset.stores[s].mask(i)
        m = m[m != UNLABELLED]
        if m.size and int(m.max()) >= n_classes:
            raise StoreError(
                f"{dataset.stores[s].path}: mask of sample {i} has class {int(m.max())}, "
                f"beyond the label scheme's {n_classes} classes"
            )
        counts += np.bincount(m.ravel(), minlength=n_classes)[:n_classes]
    return counts
