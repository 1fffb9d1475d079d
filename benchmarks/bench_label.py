"""Labelling speed: columns labelled per minute on a simulated 2048² "experiment".

``main()`` simulates one image with simgen (the incoherent model, the material, optics and
noise of the model's training store, another seed), labels it with
:func:`training.experiments.label.label_image` as ``simgen-train label`` does (tiles of at
most 512², 64 px overlap, with and without 8-fold TTA) and prints columns per minute, the
time of each stage and the time to write the five output files. Not pass/fail.

The model is ``runs/cpu`` (the CPU recipe of docs/training.md) when it exists, else a
network of the recipe's size (U-Net depth 3, width 16) trained for a minute or two on a
small generated store, which is enough to find the columns (the figure is a speed, not an
accuracy).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

#: Model used when none is given and it exists.
DEFAULT_MODEL = Path("runs/cpu")


def _calibrated(cfg) -> dict | None:
    """The incoherent model's calibration for ``cfg`` (cached as ``simgen generate`` does)."""
    from simgen import store
    from simgen.pipeline import calibration_request, resolve_model

    if resolve_model(cfg) != "incoherent":
        return None
    key, compute = calibration_request(cfg)
    data = store.load_cached_calibration(key)
    if data is None:
        data = compute()
        store.save_calibration(key, data)
    return data


def _generate(cfg, out: Path) -> Path:
    from simgen.cluster import ClusterSpec
    from simgen.generation import generate

    generate(cfg, out, cluster=ClusterSpec("none"), calibration=_calibrated(cfg), progress=False)
    return out


def _training_config(ensemble):
    """simgen config of the model's first training store (default config if unreadable)."""
    import zarr

    from simgen.config import SimgenConfig, load_config

    for path in ensemble.infos[0].get("train_stores", []):
        try:
            return SimgenConfig.from_dict(zarr.open_group(path, mode="r").attrs["config"])
        except Exception:  # store moved or deleted: fall back to the default dataset
            continue
    return load_config()


def quick_model(out_dir, *, threads: int = 1) -> Path:
    """Train a recipe-sized U-Net (depth 3, width 16) briefly on 48 simulated 128² images.

    Parameters
    ----------
    out_dir : path-like
        Working folder (store and run directory).
    threads : int
        torch threads.

    Returns
    -------
    pathlib.Path
        The run directory.
    """
    from simgen.config import load_config
    from training.config import TrainConfig
    from training.train import train_model

    out = Path(out_dir)
    cfg = load_config().with_overrides(
        {
            "dataset.n_samples": 48,
            "dataset.image_size": [128, 128],
            "simulation.model": "incoherent",
            "simulation.device": "cpu",
        }
    )
    store = _generate(cfg, out / "train.zarr")
    config = TrainConfig.from_dict(
        {
            "epochs": 10,
            "val_every": 10,
            "progress": False,
            "num_threads": threads,
            "data": {
                "train_stores": [str(store)],
                "crop": 64,
                "batch_size": 16,
                "samples_per_epoch": 128,
            },
            "optim": {"lr": 0.01},
        }
    )
    return train_model(config, out / "run").out_dir


def bench_label(
    model=None,
    *,
    size: int = 2048,
    tta: bool = True,
    tile: int = 512,
    overlap: int = 64,
    seed: int = 20250,
    threads: int | None = None,
    workdir=None,
) -> dict:
    """Label one simulated ``size × size`` image and time it.

    Parameters
    ----------
    model : path-like, optional
        Checkpoint, run or ensemble directory (default :data:`DEFAULT_MODEL`, else
        :func:`quick_model`).
    size : int
        Image side [px] (at the model's training pixel size).
    tta, tile, overlap
        As ``simgen-train label``.
    seed : int
        Dataset seed of the simulated image.
    threads : int, optional
        torch threads (default: torch's default, one per core).
    workdir : path-like, optional
        Where the image, outputs (and a quick model) go; default a temporary folder.

    Returns
    -------
    dict
        ``columns``, ``seconds`` (labelling), ``columns_per_min``, ``timings_s`` (per
        stage), ``write_seconds``, ``model``, ``threads``, ``size``, ``tta``, ``material``.
    """
    import numpy as np
    import torch
    import zarr

    from simgen.experiment.readers import ExperimentImage
    from training.experiments.label import label_image, write_outputs
    from training.predict import Ensemble

    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if model is None:
            model = DEFAULT_MODEL if DEFAULT_MODEL.exists() else quick_model(work / "model")
        torch.set_num_threads(threads)  # (training a quick model sets its own)
        ens = Ensemble.load(model, "cpu")
        cfg = _training_config(ens).with_overrides(
            {
                "dataset.n_samples": 1,
                "dataset.image_size": [size, size],
                "dataset.seed": seed,
                "simulation.model": "incoherent",
                "simulation.device": "cpu",
            }
        )
        root = zarr.open_group(str(_generate(cfg, work / "image.zarr")), mode="r")
        image = ExperimentImage(
            data=np.asarray(root["images"][0], dtype=np.float32),
            pixel_size_A=float(root.attrs["pixel_size_A"]),
            pixel_size_source="metadata",
            pixel_size_uncertainty_A=None,
            source="simulated",
            frame=None,
        )
        t0 = time.perf_counter()
        result = label_image(image, ens, tile=tile, overlap=overlap, tta=tta)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        write_outputs(result, work / "labels")
        write_seconds = time.perf_counter() - t1
    return {
        "columns": result.n_columns,
        "sites": len(result.catalogue),
        "seconds": seconds,
        "columns_per_min": result.n_columns / seconds * 60.0,
        "timings_s": result.summary["timings_s"],
        "write_seconds": write_seconds,
        "model": str(model),
        "threads": torch.get_num_threads(),
        "size": size,
        "tta": tta,
        "material": str(cfg.structure.material.args[0]),
    }


def main() -> list[dict]:
    """Print columns labelled per minute for a 2048² image (512² tiles), without and with
    8-fold TTA, beside the figures from before issue 16 (:mod:`benchmarks.previous`)."""
    from benchmarks.previous import ISSUE16, LABEL_QUIET_BEFORE, fmt

    out = []
    for tta in (False, True):
        r = bench_label(tta=tta)
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["timings_s"].items())
        before = LABEL_QUIET_BEFORE["label_columns_per_min"].get(tta)
        issue = ISSUE16["label_columns_per_min"].get(tta)
        print(
            f"label ({r['size']}² {r['material']} image, {'8-fold TTA' if tta else 'no TTA'}, "
            f"tiles <= 512², {r['threads']} CPU threads, model {r['model']}): {r['columns']} "
            f"columns in {r['seconds']:.1f} s = {r['columns_per_min']:,.0f} columns/min "
            f"(before*: {fmt(before, ',.0f')}, issue 16: {fmt(issue, ',.0f')}; {stages}); "
            f"writing the 5 files {r['write_seconds']:.1f} s"
        )
        out.append(r)
    print(f"  * before: {LABEL_QUIET_BEFORE['date']}")
    return out


if __name__ == "__main__":
    main()
