"""Cost of the acquisition chain per image, stage by stage.

``main()`` prints the median wall time of every stage of
:func:`simgen.acquisition.apply_acquisition` with the default config on a rendered
512² lattice (0.2 Å pixels, ~2 400 columns), of the whole chain, of the class mask and of
the checker, on the current device (CPU NumPy unless ``device="gpu"``). Not pass/fail.
"""

from __future__ import annotations

import time


def bench_acquisition(size: int = 512, *, repeats: int = 5, device: str = "cpu") -> dict:
    """Time the acquisition chain on a ``size``² image.

    Parameters
    ----------
    size : int
        Recorded image side [px].
    repeats : int
        Timed runs per stage (median reported), after one warm-up.
    device : {"cpu", "gpu"}
        Where the image lives.

    Returns
    -------
    dict
        ``size``, ``pad``, ``n_columns``, ``device`` and the median seconds per stage under
        ``seconds`` (``contamination, scan, labels_map, current, shot, detector, chain,
        mask, check``).
    """
    import numpy as np

    from simgen import acquisition as acq
    from simgen.backend import get_array_module, to_device
    from simgen.check import check_labels, synthetic_lattice
    from simgen.labels import class_mask

    p = 0.2
    cfg = acq.AcquisitionConfig()
    shape = (size, size)
    pad = acq.required_padding_px(cfg, shape, p)
    lat = synthetic_lattice((size + 2 * pad, size + 2 * pad), pixel_size_A=p, rotation_deg=7.0)
    ideal = to_device(lat.image, device)
    xp = get_array_module(ideal)
    sync = getattr(getattr(xp, "cuda", None), "Stream", None)

    def wait():
        if sync is not None:  # pragma: no cover - GPU only
            sync.null.synchronize()

    params = cfg.draw(np.random.default_rng(0))
    std = float(xp.std(ideal))
    state: dict = {}

    def contamination():
        bg = acq.contamination_background(
            ideal.shape, params, pixel_size_A=p, rng=1, lattice_std=std
        )
        state["specimen"] = ideal + xp.asarray(bg.field)

    def scan():
        state["rec"], state["map"] = acq.distort_scan(
            state["specimen"], shape, pad, params, pixel_size_A=p, rng=2
        )

    def labels_map():
        state["pos"] = acq.map_positions(lat.rows, lat.cols, state["map"])

    def current():
        state["cur"] = acq.modulate_current(state["rec"], params, rng=3)

    def shot():
        state["counts"] = acq.add_shot_noise(state["cur"], params, rng=4, mode=cfg.shot.mode)

    def detector():
        acq.apply_detector(state["counts"], params, rng=5)

    def chain():
        state["out"] = acq.apply_acquisition(
            ideal, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=p, rng=6
        )

    def mask():
        out = state["out"]
        class_mask(out.rows, out.cols, lat.site.astype(np.int64) + 1, shape, radius_px=3.5)

    def check():
        out = state["out"]
        check_labels(out.noise_free, out.rows[out.inside], out.cols[out.inside])

    stages = {
        "contamination": contamination,
        "scan": scan,
        "labels_map": labels_map,
        "current": current,
        "shot": shot,
        "detector": detector,
        "chain": chain,
        "mask": mask,
        "check": check,
    }
    seconds = {}
    for name, fn in stages.items():
        fn()
        wait()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            wait()
            runs.append(time.perf_counter() - t0)
        seconds[name] = float(np.median(runs))
    return {
        "size": size,
        "pad": pad,
        "n_columns": len(lat.rows),
        "device": device,
        "seconds": seconds,
    }


def main() -> dict:
    """Print the acquisition chain's cost per 512² image, stage by stage, beside the
    figures measured before issue 16 (:mod:`benchmarks.previous`)."""
    from benchmarks.previous import BEFORE_V2, ISSUE16, fmt

    res = bench_acquisition()
    s = {**res["seconds"], "sample": bench_sample()}
    drawn = bench_sample(overrides={})
    print(
        f"acquisition chain, {res['size']}² image (+{res['pad']} px pad), "
        f"{res['n_columns']} columns, default config, {res['device']}, load {_load()}:"
    )
    print(f"  {'stage':<22} {'now ms':>8} {'before*':>8} {'issue 16':>9}")
    names = ("contamination", "scan", "labels_map", "current", "shot", "detector")
    labels = {
        "chain": "whole chain",
        "mask": "class mask",
        "check": "checker",
        "sample": "labelled sample**",
    }
    for name in (*names, "chain", "mask", "check", "sample"):
        print(
            f"  {labels.get(name, name):<22} {1e3 * s[name]:8.1f} "
            f"{fmt(BEFORE_V2['chain_ms'][name]):>8} {fmt(ISSUE16['chain_ms'].get(name)):>9}"
        )
    print(f"  * before: {BEFORE_V2['date']}")
    print(
        "  ** make_sample of the default 512² dataset in this process: structure, incoherent "
        "image, chain, labels, mask (median of 10, the workers' malloc settings; a worker "
        "also writes it, ~8 ms), one 60-200 mrad detector as issue 16 measured; the shipped "
        f"config draws the detector: {1e3 * drawn:.1f} ms (up to 4 detector-grid renders)"
    )
    return res


def bench_sample(size: int = 512, repeats: int = 10, overrides: dict | None = None) -> float:
    """Median seconds of :func:`simgen.pipeline.make_sample` for the shipped config with
    ``overrides`` (default: one fixed detector, ``bench_generate.ONE_DETECTOR``) at ``size``²
    (the calibration cached or computed first; two warm-up samples)."""
    import numpy as np

    from benchmarks.bench_generate import ONE_DETECTOR
    from simgen import store
    from simgen.cluster import tune_malloc_in_process
    from simgen.config import load_config
    from simgen.pipeline import calibration_request, make_sample

    tune_malloc_in_process()  # the workers' malloc thresholds (simgen.cluster)
    overrides = ONE_DETECTOR if overrides is None else overrides
    cfg = load_config().with_overrides({**overrides, "dataset.image_size": [size, size]})
    key, compute = calibration_request(cfg)
    calibration = store.load_cached_calibration(key)
    if calibration is None:
        calibration = compute()
        store.save_calibration(key, calibration)
    for i in range(2):
        make_sample(cfg, i, calibration=calibration)
    times = []
    for i in range(2, 2 + repeats):
        t0 = time.perf_counter()
        make_sample(cfg, i, calibration=calibration)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _load() -> str:
    try:
        import os

        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - platform without getloadavg
        return "?"


if __name__ == "__main__":
    main()
