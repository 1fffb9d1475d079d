"""End-to-end dataset generation speed with 1 and 2 local workers (not pass/fail)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path


def main(n_samples: int = 96, size: int = 256) -> None:
    from simgen import store
    from simgen.cluster import ClusterSpec
    from simgen.config import load_config
    from simgen.generation import generate, stores_identical
    from simgen.pipeline import calibration_request, resolve_model

    cfg = load_config().with_overrides(
        {"dataset.n_samples": n_samples, "dataset.image_size": [size, size]}
    )
    model = resolve_model(cfg)
    calibration = None
    if model == "incoherent":
        key, compute = calibration_request(cfg)
        calibration = store.load_cached_calibration(key)
        if calibration is None:
            calibration = compute()
            store.save_calibration(key, calibration)
    tmp = Path(tempfile.mkdtemp(prefix="simgen-bench-"))
    rows = []
    try:
        for label, spec in (
            ("in-process", ClusterSpec("none")),
            ("1 worker", ClusterSpec("local", workers=1)),
            ("2 workers", ClusterSpec("local", workers=2)),
        ):
            out = tmp / f"{label.replace(' ', '_')}.zarr"
            t0 = time.perf_counter()
            report = generate(cfg, out, cluster=spec, calibration=calibration, progress=False)
            wall = time.perf_counter() - t0
            rows.append((label, report.computed, wall, report.computed / wall))
        same = stores_identical(tmp / "1_worker.zarr", tmp / "2_workers.zarr")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n== dataset generation: {n_samples} samples of {size}², model {model}, "
        f"{os.cpu_count()} cores (wall time includes cluster start-up)"
    )
    print(f"{'run':<12} {'samples':>8} {'wall s':>8} {'samples/s':>10}")
    for label, n, wall, rate in rows:
        print(f"{label:<12} {n:>8} {wall:>8.1f} {rate:>10.2f}")
    print(
        f"2 workers / 1 worker speed-up: {rows[2][3] / rows[1][3]:.2f}x; stores identical: {same}"
    )


if __name__ == "__main__":
    main()
