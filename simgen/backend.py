"""Array backend: the only module of simgen that imports CuPy.

Everything else asks :func:`get_array_module` for ``numpy`` or ``cupy`` and stays
device-agnostic, the habit abTEM keeps in ``abtem/core/backend.py``.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu", "auto")

try:  # pragma: no cover - exercised only on machines with CUDA
    import cupy as cp  # noqa: F401

    try:
        _GPU_AVAILABLE = cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CuPy installed but no driver/device
        _GPU_AVAILABLE = False
except ImportError:
    cp = None
    _GPU_AVAILABLE = False

_warned_auto_fallback = False


def gpu_available() -> bool:
    """Return True when CuPy imports and sees at least one CUDA device."""
    return _GPU_AVAILABLE


def resolve_device(device: str | None = "auto") -> str:
    """Resolve ``"cpu" | "gpu" | "auto"`` to ``"cpu"`` or ``"gpu"``.

    ``"gpu"`` without CuPy or a CUDA device raises a clear error; ``"auto"`` falls
    back to the CPU and says so once per process.
    """
    global _warned_auto_fallback
    if device is None:
        device = "auto"
    device = str(device).lower()
    if device == "cuda":
        device = "gpu"
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if device == "gpu":
        if not _GPU_AVAILABLE:
            reason = "CuPy is not installed" if cp is None else "CuPy found no CUDA device"
            raise RuntimeError(
                f"device='gpu' requested but {reason}; install with `pip install -e .[gpu]` "
                "on a CUDA machine, or use device='cpu'/'auto'"
            )
        return "gpu"
    if device == "auto":
        if _GPU_AVAILABLE:
            return "gpu"
        if not _warned_auto_fallback:
            logger.warning("device='auto': no usable GPU (CuPy/CUDA) found, running on the CPU")
            _warned_auto_fallback = True
        return "cpu"
    return "cpu"


def mark_fallback_reported() -> None:
    """Do not repeat the ``device='auto'`` CPU fallback message in this process (workers
    of a dataset run: the coordinating process has said it already)."""
    global _warned_auto_fallback
    _warned_auto_fallback = True


def get_array_module(x: Any = None) -> ModuleType:
    """Return ``numpy`` or ``cupy`` for an array, a dask array, or a device name."""
    if x is None:
        return np
    if isinstance(x, str):
        return cp if resolve_device(x) == "gpu" else np
    if isinstance(x, ModuleType):
        return x
    meta = getattr(x, "_meta", None)  # dask arrays carry their block type in _meta
    if meta is not None:
        return get_array_module(meta)
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def get_scipy_module(x: Any):
    """Return ``scipy`` or ``cupyx.scipy`` matching the array module of ``x``."""
    if get_array_module(x) is np:
        import scipy

        return scipy
    import cupyx.scipy  # pragma: no cover

    return cupyx.scipy


def get_scipy_submodule(x: Any, name: str) -> ModuleType:
    """Return ``scipy.<name>`` or ``cupyx.scipy.<name>`` (e.g. ``"fft"``, ``"ndimage"``)."""
    import importlib

    base = "scipy" if get_array_module(x) is np else "cupyx.scipy"
    return importlib.import_module(f"{base}.{name}")


def to_device(x: Any, device: str) -> Any:
    """Move an array to ``device`` (``"cpu"`` or ``"gpu"``/``"auto"``)."""
    target = resolve_device(device)
    if target == "cpu":
        return to_numpy(x)
    return cp.asarray(x)  # pragma: no cover


def to_numpy(x: Any) -> np.ndarray:
    """Return a NumPy array whatever device ``x`` lives on."""
    if cp is not None and isinstance(x, cp.ndarray):  # pragma: no cover
        return cp.asnumpy(x)
    return np.asarray(x)


def device_of(x: Any) -> str:
    """``"gpu"`` for CuPy arrays, ``"cpu"`` otherwise."""
    return "gpu" if get_array_module(x) is not np else "cpu"
