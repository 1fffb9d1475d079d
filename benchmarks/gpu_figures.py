"""Figures of ``benchmarks/gpu_check.sh``: each on the given device, beside the CPU one.

``python -m benchmarks.gpu_figures --device gpu`` prints, one line each (not pass/fail):

* PRISM and multislice seconds per 512² image at 0.1 Å/px (80 kV, 30 mrad, the default
  converged numerics: 0.05 Å waves, transmission from a 4x finer potential): a
  ``window``² field is simulated through :func:`make_sample` and the time scaled by
  area to 512² (the cost is linear in probe positions);
* incoherent model + acquisition chain + labels, samples/s (``make_sample`` in a loop);
* ``simgen generate`` samples/s on one device (start-up amortised, as bench_generate);
* AMP training samples/s and inference columns/min (bench_training, bench_label).

Every step has its own time budget and failure message, so one broken path does not hide
the others. ``--json PATH`` also writes the figures. CPU figures for the comparison come
from ``benchmarks/cpu_figures.json`` (``--device cpu --json benchmarks/cpu_figures.json``
writes them, on a 2-core machine) when it exists.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

CPU_FIGURES = Path(__file__).with_name("cpu_figures.json")


def _cfg(model: str, device: str, size: int, pixel_A: float, n: int = 8):
    from simgen.config import load_config

    return load_config().with_overrides(
        {
            "dataset.n_samples": n,
            "dataset.image_size": [size, size],
            "simulation.model": model,
            "simulation.device": device,
            "optics.pixel_size_A": pixel_A,
        }
    )


def _sync(device: str) -> None:
    if device == "gpu":  # pragma: no cover - GPU only
        import cupy

        cupy.cuda.Stream.null.synchronize()


def seconds_per_image(model: str, device: str, window: int, repeats: int = 2) -> float:
    """Seconds per 512² image at 0.1 Å/px, from a ``window``² sample scaled by area."""
    from simgen.pipeline import make_sample

    cfg = _cfg(model, device, window, 0.1)
    make_sample(cfg, 0)  # warm-up: imports, FFT plans, kernels
    _sync(device)
    t0 = time.perf_counter()
    for i in range(1, repeats + 1):
        make_sample(cfg, i)
    _sync(device)
    return (time.perf_counter() - t0) / repeats * (512 / window) ** 2


def incoherent_rate(device: str, size: int = 512, n: int = 8) -> float:
    """Samples/s of the whole sample (structure, incoherent image, acquisition, labels)."""
    from benchmarks.bench_generate import _calibration
    from simgen.pipeline import make_sample

    cfg = _cfg("incoherent", device, size, 0.2)
    cal = _calibration(cfg)
    make_sample(cfg, 0, calibration=cal)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        make_sample(cfg, i, calibration=cal)
    _sync(device)
    return n / (time.perf_counter() - t0)


def generate_rate(device: str, size: int = 512, n: int = 64) -> float:
    """``simgen generate`` samples/s: one GPU worker (dask-cuda) or 2 CPU workers."""
    import tempfile

    from benchmarks.bench_generate import _calibration
    from simgen.cluster import ClusterSpec
    from simgen.generation import generate

    cfg = _cfg("auto" if device == "gpu" else "incoherent", device, size, 0.2, n)
    spec = ClusterSpec("local", workers=2)
    if device == "gpu":  # pragma: no cover - GPU only
        try:
            import dask_cuda  # noqa: F401

            spec = ClusterSpec("cuda", workers=1)
        except ImportError:
            print("dask-cuda not importable: generating in-process on the GPU")
            spec = ClusterSpec("none")
    marks: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(
            cfg,
            Path(tmp) / "g.zarr",
            cluster=spec,
            calibration=_calibration(cfg),
            progress=False,
            on_progress=lambda done, total: marks.append((time.perf_counter(), done)),
        )
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def training_rate(device: str) -> float:
    from benchmarks.bench_training import bench_training

    return bench_training("cuda" if device == "gpu" else "cpu")["samples_per_s"]


def inference_rate(device: str, tta: bool) -> float:
    from benchmarks.bench_label import bench_label

    if device == "gpu":  # pragma: no cover - GPU only
        import training.predict as predict

        predict_load = predict.Ensemble.load
        predict.Ensemble.load = classmethod(lambda cls, path, dev="cpu": predict_load(path, "cuda"))
    return bench_label(tta=tta)["columns_per_min"]


STEPS = {
    "prism_s_per_512": lambda d: seconds_per_image("prism", d, 128 if d == "gpu" else 32),
    "multislice_s_per_512": lambda d: seconds_per_image("multislice", d, 64 if d == "gpu" else 16),
    "incoherent_acq_samples_per_s": incoherent_rate,
    "generate_samples_per_s": generate_rate,
    "amp_training_samples_per_s": training_rate,
    "inference_columns_per_min": lambda d: inference_rate(d, False),
    "inference_tta_columns_per_min": lambda d: inference_rate(d, True),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    ap.add_argument("--only", nargs="*", default=None, help="steps to run (default all)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    cpu = json.loads(CPU_FIGURES.read_text()) if CPU_FIGURES.exists() else {}
    out = {}
    print(f"{'figure':<32} {args.device:>12} {'CPU (2 cores)':>14}")
    for name, step in STEPS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            out[name] = float(step(args.device))
        except Exception:  # keep going: report every path that works
            out[name] = None
            traceback.print_exc()
        ref = cpu.get(name)
        value = "failed" if out[name] is None else f"{out[name]:,.2f}"
        print(
            f"{name:<32} {value:>12} {'-' if ref is None else f'{ref:,.2f}':>14}"
            f"   ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
