"""Image-stack dynamics: speed and the acceptance figures of issue 17 on simulated movies.

``main()`` simulates 50-frame 512² movies (the shipped movie defaults: MoS2 with Re dopants,
λ = 15, stage drift 0.5–1.5 Å per frame plus a random walk, at most 2 Å per frame) for
several seeds in ``clustered`` and ``random`` mode, analyses each with
:func:`training.dynamics.analyse_stack` (lattice peak finding, no model) on two torch
threads, and prints per movie: the analysis time, the share of true sites whose track
keeps its identity over all frames, event precision/recall per kind, the AUROC of the
instability score for the sites of true events, and the Clark–Evans ratio of created
vacancies with its CSR p-value. Events are scored as the images show them
(:func:`training.dynamics.truth.score_events`) and, on a second line, against the
simulator's own kinds. Not pass/fail: the figures go in docs/dynamics.md.

``python -m benchmarks.bench_dynamics [N_SEEDS] [FRAMES] [SIZE]`` (defaults 5, 50, 512);
``SIMGEN_BENCH_QUICK=1`` runs one seed of 10 frames at 256². ``SIMGEN_DYN_MOVIES=DIR`` keeps
the movies in DIR and reuses those already there (a movie is ~25 s to simulate, its
analysis minutes); ``SIMGEN_DYN_MODEL=RUN`` analyses each movie a second time with the
columns of that trained run (``--model``; one trained on the default recipe, MoS2 with Re).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def movie_config(seed: int, mode: str, frames: int, size: int):
    from simgen.movie import load_movie_config

    return load_movie_config().with_overrides(
        {
            "dataset.n_samples": frames,
            "dataset.image_size": [size, size],
            "dataset.seed": seed,
            "dynamics.mode": mode,
            "simulation.model": "incoherent",
            "simulation.device": "cpu",
            "stage_drift.speed_A_per_frame": {"uniform": [0.5, 1.5]},
        }
    )


def measure(store_path: Path, model=None) -> dict:
    """Analyse one movie store (with the columns of ``model`` when given) and score it
    against its ground truth."""
    from simgen.dynamics import EVENT_KINDS
    from simgen.movie import read_movie_truth
    from training.dynamics import analyse_stack, read_stack
    from training.dynamics.truth import auroc, event_sites, map_sites, score_events

    st = read_stack(store_path)
    truth = read_movie_truth(st.store)
    t0, c0 = time.perf_counter(), time.process_time()
    res = analyse_stack(st.frames, st.pixel_size_A, model=model)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    mapped = map_sites(res.tracks, truth)
    events = score_events(res.events, truth, mapped["true_to_track"], res.tracks, EVENT_KINDS)
    raw = score_events(
        res.events, truth, mapped["true_to_track"], res.tracks, EVENT_KINDS, observable=False
    )
    pos = np.zeros(len(res.tracks.sites_xy), bool)
    pos[list(event_sites(truth, mapped["true_to_track"]))] = True
    seen = np.zeros_like(pos)
    seen[list(mapped["true_to_track"].values())] = True
    seen &= res.tracks.in_view.mean(axis=0) >= 0.5
    c = res.clustering
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "stage_seconds": res.summary["stage_seconds"],
        "identity": mapped["identity"],
        "n_true_sites": mapped["n_true_sites"],
        "events": events,
        "events_simulator_kinds": raw,
        "auroc": auroc(res.instability["score"][seen], pos[seen]),
        "clark_evans_R": c.get("clark_evans_R"),
        "p_clustered": c.get("p_clustered"),
        "clustered": c.get("clustered"),
        "n_created": c.get("n_points"),
    }


def main(n_seeds: int = 5, frames: int = 50, size: int = 512) -> list[dict]:
    import torch

    if os.environ.get("SIMGEN_BENCH_QUICK"):
        n_seeds, frames, size = 1, 10, 256
    torch.set_num_threads(2)
    rows = []
    print(f"\n== dynamics: {n_seeds} seeds x 2 modes, {frames} frames of {size}²")
    model = os.environ.get("SIMGEN_DYN_MODEL") or None
    keep = os.environ.get("SIMGEN_DYN_MOVIES")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep) if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for seed in range(n_seeds):
            for mode in ("clustered", "random"):
                out = folder / f"{mode}{seed}_{frames}x{size}.zarr"
                gen = _movie(out, movie_config(seed, mode, frames, size))
                for with_model in (None, model) if model else (None,):
                    row = {"seed": seed, "mode": mode, "simulate_s": gen,
                           "model": with_model, **measure(out, with_model)}  # fmt: skip
                    rows.append(row)
                    _print_row(row)
    if os.environ.get("SIMGEN_BENCH_JSON"):
        Path(os.environ["SIMGEN_BENCH_JSON"]).write_text(json.dumps(rows, indent=1, default=float))
    return rows


def _movie(out: Path, cfg) -> float | None:
    """Simulate the movie ``out`` unless a finished one of the same config is there:
    seconds, or None. A kept movie of another config (the defaults changed) is refused."""
    from simgen.api import calibration_for
    from simgen.movie import generate_movie
    from simgen.store import complete_indices

    if out.exists():
        import zarr

        root = zarr.open_group(str(out), mode="r")
        if json.loads(json.dumps(cfg.to_dict())) != root.attrs.get("config"):
            raise SystemExit(f"{out}: a movie of another config; remove it to simulate anew")
        if len(complete_indices(root)) == cfg.dataset.n_samples:
            return None
    t0 = time.perf_counter()
    generate_movie(cfg, out, calibration=calibration_for(cfg), progress=False)
    return time.perf_counter() - t0


def _print_row(row: dict) -> None:
    def _pr(ev):
        return "  ".join(
            f"{k}: {v['precision']:.2f}/{v['recall']:.2f} (n={v['true']})"
            for k, v in ev.items()
            if v["true"] or v["detected"]
        )

    pr = (
        _pr(row["events"])
        + "\n    against the simulator's kinds: "
        + _pr(row["events_simulator_kinds"])
    )
    print(
        f"seed {row['seed']} {row['mode']:9s} {'model' if row['model'] else 'peaks'} "
        f"analysis {row['seconds']:6.1f} s wall, {row['cpu_seconds']:6.1f} s CPU  identity "
        f"{row['identity']:.4f}  AUROC {row['auroc']:.3f}  R {row['clark_evans_R']:.2f} "
        f"(p {row['p_clustered']:.3f}, n {row['n_created']})  P/R {pr}",
        flush=True,
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
