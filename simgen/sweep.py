"""Paired noise sweeps: one store per noise level, everything else identical.

Every store of a sweep shares the dataset seed, so sample i of every store has the same
structure, optics and geometric distortions; only the noise parameters differ (the
acquisition draws noise from its own random stream, see ``simgen.pipeline``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# config fields the sweep varies (see simgen.acquisition)
LAMBDA_KEY = "acquisition.shot.lambda_counts"
SIGMA_KEY = "acquisition.detector.read_noise"
SIGMA_MODE_KEY = "acquisition.detector.read_noise_mode"


@dataclass(frozen=True)
class SweepEntry:
    name: str
    config: object
    levels: dict  # e.g. {"lambda": [5, 20], "sigma": [0.0, 0.0]}


def _levels(text: str | None, points: int | None, bins: str | None, name: str):
    """List of (low, high) levels from a range plus --points or --bins."""
    if text is None:
        return [None]
    if bins:
        out = []
        for part in bins.split(","):
            out.append(_range(part, f"--bins ({name})"))
        return out
    lo, hi = _range(text, f"--{name}")
    if points is not None:
        if points < 1:
            raise ValueError(f"--points: expected >= 1, got {points}")
        return [(float(v), float(v)) for v in np.linspace(lo, hi, points)]
    return [(lo, hi)]


def _range(text: str, name: str) -> tuple[float, float]:
    text = text.strip()
    try:
        if "-" in text.lstrip("-"):
            lo, hi = (float(v) for v in text.split("-"))
        else:
            lo = hi = float(text)
    except ValueError:
        raise ValueError(f"{name}: expected a number or LOW-HIGH, got {text!r}") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"{name}: expected 0 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def _value(level):
    lo, hi = level
    return lo if lo == hi else {"uniform": [lo, hi]}


def _label(prefix, level):
    lo, hi = level
    return f"{prefix}{lo:g}" if lo == hi else f"{prefix}{lo:g}-{hi:g}"


def plan_sweep(base, *, noise_lambda=None, gaussian_sigma=None, points=None, bins=None):
    """The stores of a sweep: one per λ level × σ level.

    ``bins`` applies to whichever of λ and σ is given (to λ when both are).
    """
    if noise_lambda is None and gaussian_sigma is None:
        raise ValueError("give --noise-lambda and/or --gaussian-sigma")
    lam_levels = _levels(noise_lambda, points, bins, "noise-lambda")
    sig_bins = bins if noise_lambda is None else None
    sig_points = points if noise_lambda is None else None
    sig_levels = _levels(gaussian_sigma, sig_points, sig_bins, "gaussian-sigma")
    plan = []
    for lam in lam_levels:
        for sig in sig_levels:
            overrides, parts, levels = {}, [], {}
            if lam is not None:
                overrides[LAMBDA_KEY] = _value(lam)
                parts.append(_label("lambda", lam))
                levels["lambda"] = list(lam)
            if sig is not None:
                overrides[SIGMA_KEY] = _value(sig)
                # σ relative to the image mean: defined with or without shot noise
                overrides[SIGMA_MODE_KEY] = "relative"
                parts.append(_label("sigma", sig))
                levels["sigma"] = list(sig)
            plan.append(SweepEntry("_".join(parts), base.with_overrides(overrides), levels))
    return plan


def write_manifest(directory: Path, plan) -> Path:
    """``sweep.json``: the stores of a sweep and their noise levels."""
    path = Path(directory) / "sweep.json"
    path.write_text(
        json.dumps(
            {
                "paired": True,
                "stores": [
                    {"name": e.name, "path": f"{e.name}.zarr", "levels": e.levels} for e in plan
                ],
            },
            indent=1,
        )
    )
    return path
