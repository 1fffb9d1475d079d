"""Inference: checkpoints → class-probability maps of whole images (tiles, TTA, ensembles).

Images of any size are normalised with :func:`training.augment.normalize_image` (the
function used in training), cut into overlapping tiles, and the tile predictions blended
with weights that fall off linearly over the overlap (no seams). An :class:`Ensemble`
averages the members' probabilities and reports their per-pixel variance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.augment import dihedral, inverse_dihedral, normalize_image
from training.models import build_model, fused_for_inference
from training.stores import check_scheme, scheme_from_attrs
from training.train import load_checkpoint_dict, resolve_device


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network of a checkpoint, in eval mode.

    Parameters
    ----------
    path : path-like
        ``last.pt`` or ``best.pt`` of a run.
    device : str or torch.device

    Returns
    -------
    model : torch.nn.Module
    info : dict
        The checkpoint's metadata (``config``, ``label_scheme``, ``class_names``,
        ``pixel_size_A``, ``normalization``, ``epoch``, ``history``...), without states.
    """
    dev = resolve_device(device)
    ckpt = load_checkpoint_dict(path, map_location=dev)
    spec = ckpt["model"]
    model = build_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(ckpt["model_state"])
    model.to(dev).eval()
    info = {k: v for k, v in ckpt.items() if not k.endswith("_state") and k != "rng"}
    info["path"] = str(path)
    return model, info


def resolve_checkpoints(model_path) -> list[Path]:
    """Checkpoint files named by a path: a ``.pt`` file, a run directory or an ensemble.

    A directory with ``ensemble.json`` gives its members' checkpoints; a run directory
    gives its ``best.pt`` (``last.pt`` when there is no ``best.pt``).

    Raises
    ------
    ValueError
        When nothing usable is found.
    """
    p = Path(model_path)
    if p.is_file():
        return [p]
    if p.is_dir():
        ens = p / "ensemble.json"
        if ens.is_file():
            members = [p / m for m in json.loads(ens.read_text())["members"]]
            missing = [str(m) for m in members if not m.is_file()]
            if missing:
                raise ValueError(f"{ens}: member checkpoint(s) missing: {', '.join(missing)}")
            return members
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return [p / name]
        raise ValueError(f"{p}: no best.pt, last.pt or ensemble.json in this directory")
    raise ValueError(f"model not found: {p}")


#: Run the network in channels-last (NHWC) memory layout on the CPU: oneDNN's convolutions
#: are faster in it (the same logits to ~1e-6; benchmarks/bench_label.py).
CPU_CHANNELS_LAST = True


def _tiling(length: int, tile: int, overlap: int, multiple: int = 16) -> tuple[int, list[int]]:
    """Tile side and tile starts along one axis: the fewest tiles of at most ``tile`` px
    that overlap by at least ``overlap`` px, all of one size (a multiple of ``multiple`` px
    where possible: the U-Net pads to a multiple of ``2**depth``), spread evenly.

    A 2048 px axis in tiles of at most 512 px with 64 px overlap takes five tiles of 464 px
    (2320 px computed) instead of five of 512 (2560 px): the network's cost is the area of
    the tiles.
    """
    if length <= tile:
        return length, [0]
    step = max(tile - overlap, 1)
    n = -(-(length - overlap) // step)  # ceil: tiles needed at the largest size
    size = -(-(length + (n - 1) * overlap) // n)
    size = min(tile, -(-size // multiple) * multiple)

    def starts_of(size):
        return [int(v) for v in np.floor(np.linspace(0, length - size, n) + 0.5)]

    def smallest_overlap(starts):
        return min(size - (b - a) for a, b in zip(starts, starts[1:], strict=False))

    starts = starts_of(size)
    while size < tile and smallest_overlap(starts) < overlap:
        size += 1
        starts = starts_of(size)
    return size, starts


def _ramp(size: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    w = np.ones(size)
    if overlap > 0:
        r = (np.arange(overlap) + 1.0) / (overlap + 1.0)
        n = min(overlap, size)
        if not first:
            w[:n] = np.minimum(w[:n], r[:n])
        if not last:
            w[-n:] = np.minimum(w[-n:], r[:n][::-1])
    return w


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    image,
    *,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 1,
    tta: bool = False,
    normalize: bool = True,
    amp: bool = False,
) -> np.ndarray:
    """Class probabilities of one image.

    Parameters
    ----------
    model : torch.nn.Module
        Network in eval mode (its parameters' device is used).
    image : array_like, shape (H, W)
        Recorded image (any units) or, with ``normalize=False``, an already normalised one.
    tile : int
        Largest tile side [px] (images smaller than a tile go through whole). Along each
        axis the fewest tiles of at most this size that overlap by ``overlap`` are spread
        evenly, all of one size (:func:`_tiling`).
    overlap : int
        Smallest overlap of neighbouring tiles [px]; blending weights ramp over it.
    batch_size : int
        Tiles per forward pass.
    tta : bool
        Average over the 8 flips/rotations of the square (8× the cost).
    normalize : bool
        Apply :func:`normalize_image` first (as in training).
    amp : bool
        Autocast on CUDA.

    Notes
    -----
    Runs a copy of ``model`` with its batch norms folded into the convolutions
    (:func:`training.models.fused_for_inference`): the same probabilities to ~1e-6.

    Returns
    -------
    ndarray of float32, shape (K, H, W)
    """
    img = normalize_image(image) if normalize else np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image: expected [H, W], got shape {img.shape}")
    if tile < 16:
        raise ValueError(f"tile: must be >= 16 px, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap: must be in [0, tile), got {overlap}")
    if not (amp and next(model.parameters()).device.type == "cuda"):
        # batch norms folded into the convolutions (not under autocast: folded weights can
        # reach hundreds × the originals, which float16 rounds differently)
        model = fused_for_inference(model)
    if not tta:
        return _predict_tiled(model, img, tile, overlap, batch_size, amp)
    acc = None
    for k in range(8):
        view = np.ascontiguousarray(dihedral(img, k))  # tiles cut from contiguous rows
        p = inverse_dihedral(_predict_tiled(model, view, tile, overlap, batch_size, amp), k)
        if acc is None:
            acc = np.array(p, dtype=np.float32)  # a contiguous copy
        else:
            acc += p
    acc /= 8
    return acc


def _predict_tiled(model, img, tile, overlap, batch_size, amp) -> np.ndarray:
    device = next(model.parameters()).device
    h, w = img.shape
    multiple = 2 ** int(getattr(model, "depth", 4))  # tiles the U-Net need not pad
    th, rows = _tiling(h, tile, overlap, multiple)
    tw, cols = _tiling(w, tile, overlap, multiple)
    acc = None
    wsum = np.zeros((h, w), np.float32)
    ramp_r = {r: _ramp(th, overlap, r == 0, r + th >= h).astype(np.float32) for r in rows}
    ramp_c = {c: _ramp(tw, overlap, c == 0, c + tw >= w).astype(np.float32) for c in cols}
    jobs = [(r, c) for r in rows for c in cols]
    use_amp = amp and device.type == "cuda"
    layout = torch.channels_last if device.type == "cpu" and CPU_CHANNELS_LAST else None
    if layout is not None:
        model = model.to(memory_format=layout)
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b : b + batch_size]
        x = torch.from_numpy(np.stack([img[r : r + th, c : c + tw] for r, c in chunk])[:, None])
        x = x.to(device)
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        if use_amp:
            with torch.autocast(device_type="cuda"):
                logits = model(x)
        else:
            logits = model(x)
        probs = logits.float().softmax(1).cpu().numpy()
        if acc is None:
            acc = np.zeros((probs.shape[1], h, w), np.float32)
        for (r, c), p in zip(chunk, probs, strict=True):
            wt = ramp_r[r][:, None] * ramp_c[c][None, :]
            p *= wt
            acc[:, r : r + th, c : c + tw] += p
            wsum[r : r + th, c : c + tw] += wt
    acc /= wsum
    return acc


class Ensemble:
    """Several networks trained on one label scheme; mean and variance of probabilities.

    Parameters
    ----------
    models : list of torch.nn.Module
        Members in eval mode.
    infos : list of dict
        Their checkpoint metadata (as :func:`load_checkpoint` returns).

    Raises
    ------
    ValueError
        When the members disagree on the label scheme.
    """

    def __init__(self, models: list[nn.Module], infos: list[dict]):
        if not models or len(models) != len(infos):
            raise ValueError("models: expected at least one model and one info per model")
        self.models = list(models)
        self.infos = list(infos)
        self.scheme = scheme_from_attrs(infos[0]["label_scheme"])
        for info in infos[1:]:
            check_scheme(
                scheme_from_attrs(info["label_scheme"]),
                self.scheme,
                f"checkpoint {info.get('path', '?')}",
                "the first member's",
            )
        self.class_names = self.scheme.class_names

    @classmethod
    def load(cls, model_path, device="cpu") -> Ensemble:
        """Load the checkpoint(s) a path names (see :func:`resolve_checkpoints`)."""
        paths = (
            [p for mp in model_path for p in resolve_checkpoints(mp)]
            if isinstance(model_path, list | tuple)
            else resolve_checkpoints(model_path)
        )
        loaded = [load_checkpoint(p, device) for p in paths]
        return cls([m for m, _ in loaded], [i for _, i in loaded])

    def __len__(self) -> int:
        return len(self.models)

    @property
    def config(self) -> dict:
        """Training config of the first member (plain dict)."""
        return self.infos[0]["config"]

    @property
    def preprocess(self):
        """The preprocessing the members were trained with (``PreprocessConfig``)."""
        from training.config import PreprocessConfig

        return PreprocessConfig.from_dict(self.config.get("preprocess") or {})

    @property
    def pixel_size_A(self) -> float | None:
        """Pixel size of the first member's training stores [Å/px] (geometric midpoint of
        several), or None when not recorded."""
        sizes = [float(v) for v in np.atleast_1d(self.infos[0].get("pixel_size_A") or [])]
        sizes = [v for v in sizes if v > 0]
        return float(np.sqrt(min(sizes) * max(sizes))) if sizes else None

    def check_pixel_size(self, pixel_size_A: float, what: str, tolerance: float = 0.05) -> None:
        """Refuse images at a pixel size the members were not trained at.

        Raises
        ------
        ValueError
            ``pixel_size_A`` lies more than ``tolerance`` (relative) outside the pixel sizes
            of the training stores (nothing is checked when they are not recorded).
        """
        sizes = [float(v) for v in np.atleast_1d(self.infos[0].get("pixel_size_A") or [])]
        sizes = [v for v in sizes if v > 0]
        if not sizes or not pixel_size_A or not np.isfinite(pixel_size_A):
            return
        lo, hi = min(sizes) / (1 + tolerance), max(sizes) * (1 + tolerance)
        if not lo <= pixel_size_A <= hi:
            trained = f"{sizes[0]:.4g}" if len(sizes) == 1 else f"{min(sizes):.4g}-{max(sizes):.4g}"
            raise ValueError(
                f"{what}: {pixel_size_A:.4g} Å/px, but the model was trained at {trained} Å/px: "
                "make the store at the model's pixel size (simgen generate --set "
                "optics.pixel_size_A=...), or label images (labelling resamples them)"
            )

    def predict(
        self, image, *, preprocess=None, pixel_size_A: float | None = None, **kwargs
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel class-probability mean and variance over the members.

        The image is first preprocessed as the members were in training
        (:attr:`preprocess`, :func:`training.preprocess.preprocess_image`).

        Parameters
        ----------
        image : array_like, shape (H, W)
        preprocess : PreprocessConfig or dict, optional
            Preprocessing to use instead of the model's.
        pixel_size_A : float, optional
            [Å/px] of ``image`` for the preprocessing's lengths (default: the model's
            training pixel size, which is what labelling resamples to).
        **kwargs
            Passed to :func:`predict_probabilities` (``tile``, ``overlap``, ``tta``...).

        Returns
        -------
        mean, var : ndarray of float32, shape (K, H, W)
            ``var`` is the population variance (exactly 0 for identical members).
        """
        from training.config import PreprocessConfig
        from training.preprocess import preprocess_image

        cfg = self.preprocess if preprocess is None else preprocess
        if isinstance(cfg, dict):
            cfg = PreprocessConfig.from_dict(cfg)
        if cfg.active and kwargs.get("normalize", True):
            pixel = pixel_size_A or self.pixel_size_A
            if pixel is None:
                raise ValueError("pixel_size_A: needed for the preprocessing (not recorded)")
            image = preprocess_image(image, cfg, pixel)
        if len(self.models) == 1:  # one member: its probabilities, no variance
            p = predict_probabilities(self.models[0], image, **kwargs)
            return p, np.zeros_like(p)
        mean = m2 = None
        for n, model in enumerate(self.models, start=1):
            p = predict_probabilities(model, image, **kwargs).astype(np.float64)
            if mean is None:
                mean, m2 = p.copy(), np.zeros_like(p)
                continue
            delta = p - mean
            mean += delta / n
            m2 += delta * (p - mean)
        return mean.astype(np.float32), (m2 / len(self.models)).astype(np.float32)


def predict_store(
    model_path,
    store_path,
    out_path,
    *,
    indices=None,
    save_probabilities: bool = False,
    device="auto",
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    tta: bool = False,
    progress: bool = False,
) -> Path:
    """Predict every (complete) sample of a store and write a Zarr group of results.

    The output group holds ``index`` (int64 ``[n]``, source sample), ``class_map`` (uint8
    ``[n, H, W]``), optionally ``probability`` and — for ensembles — ``variance`` (float32
    ``[n, K, H, W]``), and the detected columns as flat arrays ``columns/sample``,
    ``columns/x``, ``columns/y`` (pixels), ``columns/class_id``, ``columns/score``; attributes
    name the source store, checkpoints, class names and pixel size.

    Parameters
    ----------
    model_path : path-like or list
        Checkpoint, run directory or ensemble directory.
    store_path : path-like
        simgen store to predict.
    out_path : path-like
        Output Zarr directory (must not exist).
    indices : sequence of int, optional
        Samples to predict (default: all complete ones).
    save_probabilities : bool
        Also store probabilities (and ensemble variance).
    device, tile, overlap, batch_size, tta
        See :func:`predict_probabilities`.
    progress : bool
        tqdm bar over samples.

    Returns
    -------
    pathlib.Path
    """
    import zarr

    from training.config import EvalConfig
    from training.metrics import find_columns
    from training.stores import open_stores

    out_path = Path(out_path)
    _claim_output(out_path)
    ens = Ensemble.load(model_path, resolve_device(device))
    (store,) = open_stores([store_path], expected=ens.scheme)
    ens.check_pixel_size(store.pixel_size_A, str(store.path))
    idx = store.complete_indices() if indices is None else np.asarray(indices, dtype=np.int64)
    bad = [int(i) for i in idx if not (0 <= i < store.n_samples and store.complete[i] == 1)]
    if bad:
        raise ValueError(f"indices: samples {bad[:5]} are out of range or not complete")
    ev = EvalConfig.from_dict(ens.config.get("evaluate", {}))
    p = store.pixel_size_A
    h, w = store.image_shape
    k = len(ens.class_names)
    n = len(idx)
    root = zarr.open_group(str(out_path), mode="w")
    root.attrs[PREDICTION_MARKER] = {"complete": False}  # True once every sample is written
    root.create_array("index", data=np.asarray(idx, dtype=np.int64))
    cmap = root.create_array("class_map", shape=(n, h, w), chunks=(1, h, w), dtype="uint8")
    prob = var = None
    if save_probabilities:
        prob = root.create_array(
            "probability", shape=(n, k, h, w), chunks=(1, k, h, w), dtype="float32"
        )
        if len(ens) > 1:
            var = root.create_array(
                "variance", shape=(n, k, h, w), chunks=(1, k, h, w), dtype="float32"
            )
    found = {"sample": [], "x": [], "y": [], "class_id": [], "score": []}
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="predict", dynamic_ncols=True)
    for j in iterator:
        i = int(idx[j])
        mean, variance = ens.predict(
            store.image(i), tile=tile, overlap=overlap, batch_size=batch_size, tta=tta
        )
        cmap[j] = mean.argmax(0).astype(np.uint8)
        if prob is not None:
            prob[j] = mean
        if var is not None:
            var[j] = variance
        cols = find_columns(
            mean,
            threshold=ev.threshold,
            min_area_px=ev.min_area_A2 / p**2,
            min_distance_px=ev.min_separation_A / p or None,
        )
        found["sample"].append(np.full(len(cols["x"]), i, np.int64))
        for key in ("x", "y", "class_id", "score"):
            found[key].append(cols[key])
    dtypes = {"sample": "int64", "x": "float32", "y": "float32", "class_id": "int16"}
    grp = root.create_group("columns")
    for key, parts in found.items():
        data = np.concatenate(parts) if parts else np.zeros(0)
        grp.create_array(key, data=data.astype(dtypes.get(key, "float32")))
    root.attrs.update(
        {
            "source_store": str(store_path),
            "checkpoints": [info["path"] for info in ens.infos],
            "class_names": ens.class_names,
            "label_scheme": ens.scheme.to_dict(),
            "pixel_size_A": p,
            "tta": tta,
            PREDICTION_MARKER: {"complete": True},
        }
    )
    return out_path


#: Root attribute of a prediction store: who made it and whether it was finished.
PREDICTION_MARKER = "simgen_predictions"


def _claim_output(path: Path) -> None:
    """Make way for a prediction store at ``path``: nothing there, or an unfinished one this
    function's caller made (a killed run), which is replaced. A finished prediction and
    anything else are refused by name, untouched."""
    if not (path.exists() or path.is_symlink()):
        return
    meta = path / "zarr.json"
    mark = None
    if path.is_dir() and meta.is_file():
        try:
            mark = (json.loads(meta.read_text()).get("attributes") or {}).get(PREDICTION_MARKER)
        except (OSError, ValueError, AttributeError):
            mark = None
    if isinstance(mark, dict) and not mark.get("complete"):
        shutil.rmtree(path)  # our own, interrupted: start it again
        return
    if isinstance(mark, dict):
        raise ValueError(
            f"output already exists: {path} (a finished prediction; choose "
            "another path or remove it)"
        )
    raise ValueError(
        f"output already exists: {path} is not a simgen prediction store; refusing to touch it"
    )
