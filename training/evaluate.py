"""Column-level evaluation of a checkpoint or ensemble on labelled stores.

Predicts each complete sample (:class:`training.predict.Ensemble`), finds columns,
matches them to the store's true columns and accumulates
:class:`training.metrics.ColumnScores`; writes ``metrics.json``, ``confusion.png`` and
``reliability.png``. Each detected column's class probabilities are the ensemble mean
averaged over a disk of half the matching radius (renormalised), which gives every class's
average precision and AUROC; its uncertainty (ensemble variance of its class, or
1 − its probability for one network) against class errors gives the reliability diagram.
"""

from __future__ import annotations

import numpy as np

from training.config import EvalConfig
from training.experiments.label import sample_disks
from training.metrics import ColumnScores, find_columns
from training.predict import Ensemble
from training.report import (
    claim_evaluate_output,
    finish_evaluate_output,
    plot_confusion,
    plot_reliability,
    write_json,
)
from training.stores import open_stores
from training.train import resolve_device


def evaluate_stores(
    model_path,
    store_paths,
    *,
    out_dir=None,
    eval_cfg: EvalConfig | None = None,
    eval_overrides: dict | None = None,
    sample_range: tuple[int, int] | None = None,
    device="auto",
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    tta: bool = False,
    method: str = "hungarian",
    progress: bool = False,
    per_image: bool = False,
) -> dict:
    """Score a model on labelled stores at column and pixel level.

    Parameters
    ----------
    model_path : path-like or list
        Checkpoint, run directory or ensemble directory (see
        :func:`training.predict.resolve_checkpoints`).
    store_paths : sequence of path-like
        Stores with the model's label scheme.
    out_dir : path-like, optional
        Where ``metrics.json`` and ``confusion.png`` go.
    eval_cfg : EvalConfig, optional
        Column finding and matching; default: the one the model was trained with.
    eval_overrides : dict, optional
        Fields of that config to change (e.g. ``{"radius_A": 0.8}``).
    sample_range : (int, int), optional
        ``[start, stop)`` indices of each store (default: all); incomplete samples are
        skipped.
    device, tile, overlap, batch_size, tta
        Inference settings (:func:`training.predict.predict_probabilities`).
    method : {"hungarian", "greedy"}
        Matching (:func:`training.metrics.match_columns`).
    progress : bool
        tqdm bar over samples.
    per_image : bool
        Also return every image's column counts (``per_image``: ``samples`` as
        ``[store index, sample index]`` pairs and ``counts`` rows of
        :meth:`ColumnScores.image_counts`), for bootstrap intervals over images.

    Returns
    -------
    dict
        :meth:`ColumnScores.summary` plus ``stores``, ``checkpoints``, ``settings`` and
        ``uncertainty`` (per-pixel ensemble variance of the predicted class, averaged over
        all pixels; ``None`` for a single model); ``per_image`` when asked.

    Raises
    ------
    StoreError
        A store is missing, of another schema version, or labelled with another scheme
        than the model's.
    ValueError
        A store's pixel size is not one the model was trained at (±5 %).
    """
    if out_dir is not None:  # refuse a folder that is not ours before any work
        out_dir = claim_evaluate_output(out_dir)
    ens = Ensemble.load(model_path, resolve_device(device))
    if eval_cfg is None:
        eval_cfg = EvalConfig.from_dict(ens.config.get("evaluate", {}))
    if eval_overrides:
        eval_cfg = eval_cfg.replace(**eval_overrides)
    stores = open_stores(store_paths, expected=ens.scheme)
    for st in stores:
        ens.check_pixel_size(st.pixel_size_A, str(st.path))
    scores = ColumnScores(ens.class_names)
    jobs = []
    for s, st in enumerate(stores):
        span = sample_range or (0, st.n_samples)
        jobs += [(s, int(i)) for i in st.complete_indices(*span)]
    if not jobs:
        raise ValueError("no complete sample to evaluate in the chosen range")
    iterator = jobs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(jobs, desc="evaluate", dynamic_ncols=True)
    var_sum, var_n = 0.0, 0
    for s, i in iterator:
        st = stores[s]
        p = st.pixel_size_A
        mean, var = ens.predict(
            st.image(i), tile=tile, overlap=overlap, batch_size=batch_size, tta=tta
        )
        class_map = mean.argmax(0)
        scores.add_pixels(class_map, st.mask(i))
        cols = find_columns(
            mean,
            threshold=eval_cfg.threshold,
            min_area_px=eval_cfg.min_area_A2 / p**2,
            min_distance_px=eval_cfg.min_separation_A / p or None,
        )
        xy = np.column_stack([cols["x"], cols["y"]])
        r_px = max(eval_cfg.radius_A / p / 2, 0.5)  # a disk well inside the column
        col_probs = sample_disks(mean, xy, r_px)
        cols["probs"] = col_probs / np.maximum(col_probs.sum(1, keepdims=True), 1e-12)
        picked = np.clip(cols["class_id"], 0, col_probs.shape[1] - 1)
        if len(ens) > 1:
            cols["uncertainty"] = sample_disks(var, xy, r_px)[np.arange(len(xy)), picked]
        else:
            cols["uncertainty"] = 1.0 - cols["probs"][np.arange(len(xy)), picked]
        scores.add_columns(
            cols,
            st.columns(i),
            eval_cfg.radius_A / p,
            shape=st.image_shape,
            border_px=eval_cfg.border_A / p,
            method=method,
        )
        if len(ens) > 1:
            var_sum += float(np.take_along_axis(var, class_map[None], 0).mean())
            var_n += 1
    result = scores.summary()
    result["stores"] = [st.path for st in stores]
    result["checkpoints"] = [info["path"] for info in ens.infos]
    result["n_members"] = len(ens)
    result["settings"] = {
        **eval_cfg.to_dict(),
        "method": method,
        "tta": tta,
        "tile": tile,
        "overlap": overlap,
        "sample_range": list(sample_range) if sample_range else None,
    }
    result["uncertainty"] = {
        "mean_variance_predicted_class": var_sum / var_n if var_n else None,
    }
    if "reliability" in result:
        result["reliability"]["uncertainty"] = (
            "ensemble variance of the predicted class" if len(ens) > 1
            else "1 - probability of the predicted class (one network: no variance)"
        )  # fmt: skip
    if per_image:
        result["per_image"] = {
            "samples": [[s, i] for s, i in jobs],
            "counts": scores.image_counts().tolist(),
        }
    if out_dir is not None:
        write_json(result, out_dir / "metrics.json")
        plot_confusion(result["confusion"]["matrix"], ens.class_names, out_dir / "confusion.png")
        if "reliability" in result:
            plot_reliability(result["reliability"], out_dir / "reliability.png")
        finish_evaluate_output(out_dir)
    return result
