"""What a dataset will cost before any of it is computed: size on disk and peak memory
per worker, from the config alone (no simulation, no disk access).

The estimates are upper bounds in the sense that matter for a refusal: the disk size is
the uncompressed size of every chunk (Zstd only shrinks it; noisy images by little), and
the memory is a rough model of the simulation's working set on the padded field of view
(see ``docs/cli.md``, "Limits").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Bytes a worker process holds before its first sample (interpreter, NumPy, SciPy, ASE).
WORKER_BASE_BYTES = 400 * 2**20
#: Float64 arrays of the padded field the simulation keeps at once, per image model.
WORKING_ARRAYS = {"incoherent": 24, "pointsum": 24, "prism": 96, "multislice": 64}


@dataclass(frozen=True)
class CostEstimate:
    """Estimated cost of a dataset.

    Attributes
    ----------
    n_samples : int
    disk_bytes : int
        Size of the store on disk (uncompressed chunks, metadata ignored).
    worker_bytes : int
        Peak memory of one worker computing one chunk of samples.
    padded_shape : (int, int)
        Field the simulation computes (image plus scan-distortion padding), in pixels.
    """

    n_samples: int
    disk_bytes: int
    worker_bytes: int
    padded_shape: tuple[int, int]


def human_bytes(n: float) -> str:
    """``1.5 GB``-style size (powers of 1000, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    raise AssertionError  # pragma: no cover


def parse_bytes(text: str, name: str) -> int:
    """``"200GB"``, ``"1.5 TB"``, ``"512MB"`` or a plain number of bytes -> bytes."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15}
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTPB")
    unit = t[len(num) :]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{name}: expected a size like 200GB or 512MB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive size, got {text!r}")
    return int(value)


def estimate_cost(cfg) -> CostEstimate:
    """Disk size and per-worker peak memory of the dataset ``cfg``.

    Parameters
    ----------
    cfg : SimgenConfig

    Returns
    -------
    CostEstimate
    """
    from simgen import acquisition as acq
    from simgen.pipeline import param_names, resolve_model, store_layout

    layout = store_layout(cfg)
    n = layout.n_samples
    h, w = layout.image_shape
    c = layout.column_capacity
    e = max(len(layout.elements), 1)
    per_sample = (
        h * w * (4 + 1)  # images float32, masks uint8
        + c * (4 + 4 + 2 + 1 + 1 + e)  # columns x, y, class_id, site, n_atoms, counts
        + 1 + 4 + 8  # complete, count, offset
        + 8 * len(param_names(cfg))
    )  # fmt: skip
    p_min = float(cfg.optics.pixel_size_A.bounds()[0])
    pad = acq.required_padding_px(cfg.acquisition, (h, w), p_min)
    ph, pw = h + 2 * pad, w + 2 * pad
    k = cfg.dataset.samples_per_chunk
    arrays = WORKING_ARRAYS.get(resolve_model(cfg), 96)
    frozen = max(1, int(getattr(cfg.simulation, "frozen_phonons", 1) or 1))
    sim = ph * pw * 8 * arrays * (1 if arrays == WORKING_ARRAYS["incoherent"] else frozen)
    worker = WORKER_BASE_BYTES + sim + k * per_sample * 2
    return CostEstimate(n, int(n * per_sample), int(worker), (ph, pw))


def check_limits(est: CostEstimate, *, max_disk: int, max_memory: int, free_disk=None) -> None:
    """Refuse a dataset beyond the limits, with the numbers.

    Raises
    ------
    ValueError
        The store would exceed ``max_disk`` (or the free space ``free_disk``), or one worker
        would need more than ``max_memory``.
    """
    hint = "pass --yes to go on anyway"
    if est.disk_bytes > max_disk:
        raise ValueError(
            f"the store would take about {human_bytes(est.disk_bytes)} on disk "
            f"({est.n_samples} samples), over the limit {human_bytes(max_disk)} "
            f"(--max-disk); {hint}"
        )
    if free_disk is not None and est.disk_bytes > free_disk:
        raise ValueError(
            f"the store would take about {human_bytes(est.disk_bytes)} on disk but only "
            f"{human_bytes(free_disk)} is free there; {hint}"
        )
    if est.worker_bytes > max_memory:
        ph, pw = est.padded_shape
        raise ValueError(
            f"one worker would need about {human_bytes(est.worker_bytes)} of memory (a "
            f"{ph}x{pw} px padded field), over the limit {human_bytes(max_memory)} "
            f"(--max-memory); {hint}"
        )
