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


def plan_sweep(
    base,
    *,
    noise_lambda=None,
    gaussian_sigma=None,
    points=None,
    bins=None,
    sigma_points=None,
    sigma_bins=None,
):
    """The stores of a sweep: one per λ level × σ level (a grid when both are given).

    Parameters
    ----------
    base : SimgenConfig
        Config every store starts from.
    noise_lambda, gaussian_sigma : str, optional
        Poisson λ range [counts/px at the image mean] and Gaussian read-noise σ range
        (relative to the image mean), ``"LOW-HIGH"`` or one value.
    points, bins : optional
        Levels of whichever of λ and σ is given (of λ when both are): ``points`` evenly
        spaced fixed values, or ``bins`` ``"0,5-20,20-40"`` (uniform within a bin).
    sigma_points, sigma_bins : optional
        Levels of σ when both variables are given (the second axis of a λ × σ grid).

    Returns
    -------
    list of SweepEntry
        λ-major order; store names ``lambda5-20``, ``sigma0.02-0.05``,
        ``lambda5-20_sigma0.02-0.05``.
    """
    if noise_lambda is None and gaussian_sigma is None:
        raise ValueError("give --noise-lambda and/or --gaussian-sigma")
    if (sigma_points is not None or sigma_bins) and (
        noise_lambda is None or gaussian_sigma is None
    ):
        raise ValueError(
            "--sigma-bins/--sigma-points: only with both --noise-lambda and --gaussian-sigma "
            "(a λ × σ grid); for σ alone use --bins/--points"
        )
    lam_levels = _levels(noise_lambda, points, bins, "noise-lambda")
    sig_bins = bins if noise_lambda is None else sigma_bins
    sig_points = points if noise_lambda is None else sigma_points
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


def scored_columns_per_image(cfg, *, n_pilot: int = 32, border_A: float = 1.0) -> dict:
    """Mean true columns per image and class, from the structures of the first samples.

    Builds only the structures (no image simulation) of samples ``0..n_pilot-1`` of
    ``cfg`` (so the defect concentrations, material and field of view are those of the
    dataset) and counts the columns inside the field of view less a ``border_A`` band
    (the band evaluation leaves out, ``evaluate.border_A``).

    Parameters
    ----------
    cfg : SimgenConfig
    n_pilot : int
        Structures to average over.
    border_A : float
        Edge band not scored [Å].

    Returns
    -------
    dict
        Class name -> mean columns per image (classes never seen are left out).
    """
    from simgen.pipeline import structure_columns
    from structures import get_scheme

    scheme = get_scheme(cfg.labels.scheme)
    totals = np.zeros(len(scheme.names), np.float64)
    for i in range(n_pilot):
        table, origin, fov = structure_columns(cfg, i)
        x = np.asarray(table.x) - origin[0]
        y = np.asarray(table.y) - origin[1]
        keep = (
            np.asarray(table.in_fov, bool)
            & (x >= border_A)
            & (y >= border_A)
            & (x <= fov[0] - border_A)
            & (y <= fov[1] - border_A)
        )
        ids = np.asarray(table.class_id, np.int64)[keep]
        totals += np.bincount(ids, minlength=len(totals))[: len(totals)]
    return {
        name: float(totals[c] / n_pilot)
        for c, name in enumerate(scheme.names)
        if c > 0 and totals[c] > 0
    }


def images_for_interval(
    half_width: float, columns_per_image: dict, *, f1: float = 0.9, confidence: float = 0.95
) -> tuple[int, float]:
    """Test images per store for a wanted 95 % interval half-width of the macro defect F1.

    Normal approximation, each class's F1 treated as a proportion over its true columns
    (variance ``f1 (1 − f1) / N_c``) and the classes independent:
    ``var(macro) = Σ_c f1 (1 − f1) / (m_c n) / C²`` for ``n`` images holding ``m_c`` true
    columns of defect class ``c`` each (``C`` classes). The variance is largest at
    F1 = 0.5 and vanishes towards 1, so the planning ``f1`` matters: 0.9 sizes for models
    that find most defects. Columns of one image are correlated, so the image bootstrap
    of the report is usually somewhat wider: read the achieved intervals there.

    Parameters
    ----------
    half_width : float
        Wanted half-width (the ``±``) of the interval, in F1 units, e.g. 0.05.
    columns_per_image : dict
        Defect class -> mean true columns per image (:func:`scored_columns_per_image`).
    f1 : float
        Planning F1, in (0, 1).
    confidence : float
        Interval coverage, in (0, 1).

    Returns
    -------
    (int, float)
        Images per store (at least 1) and the half-width of one image.

    Raises
    ------
    ValueError
        A value out of range, or no defect class with columns.
    """
    from statistics import NormalDist

    if not 0 < half_width < 1:
        raise ValueError(f"--target-ci: expected a half-width between 0 and 1, got {half_width}")
    if not 0 < f1 < 1:
        raise ValueError(f"--planning-f1: expected a value between 0 and 1, got {f1}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value between 0 and 1, got {confidence}")
    rates = [float(m) for m in columns_per_image.values() if m > 0]
    if not rates:
        raise ValueError(
            "--target-ci: the dataset has no defect columns (structure.defects), "
            "so there is no defect F1 to size the test set for; give --n"
        )
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    one = z * float(np.sqrt(f1 * (1.0 - f1) * sum(1.0 / m for m in rates))) / len(rates)
    return max(1, int(np.ceil((one / half_width) ** 2))), one
