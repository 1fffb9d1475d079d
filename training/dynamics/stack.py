"""Read an image stack: a dm3/dm4/emd/tif/... stack file, a folder of frames, or a simgen
movie store. Bad input is one :class:`~training.dynamics.tracking.StackError` line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.dynamics.tracking import StackError


@dataclass(frozen=True)
class Stack:
    """Frames ``(T, H, W)`` float32, pixel size [Å/px], where they came from, and the
    movie store's root when the stack is one (ground truth for checks)."""

    frames: np.ndarray
    pixel_size_A: float
    source: str
    names: tuple
    store: object = None


def _check_frames(frames, names, source) -> np.ndarray:
    shapes = {tuple(np.shape(f)) for f in frames}
    if len(shapes) > 1:
        detail = ", ".join(
            f"{n}: {np.shape(f)[1]}x{np.shape(f)[0]}"
            for n, f in list(zip(names, frames, strict=True))[:3]
        )
        raise StackError(
            f"{source}: frames of different sizes ({detail}, ...); crop them to one size"
        )
    if len(frames) < 2:
        raise StackError(
            f"{source}: a single image, not a stack; the dynamics analysis needs at least 2 frames"
        )
    arr = np.stack([np.asarray(f, dtype=np.float32) for f in frames])
    if not np.isfinite(arr).all():
        raise StackError(f"{source}: frames contain NaN or infinite values")
    if min(arr.shape[1:]) < 32:
        raise StackError(f"{source}: frames of {arr.shape[2]}x{arr.shape[1]} px are too small")
    return arr


def read_stack(path, *, pixel_size_A: float | None = None, material: str | None = None) -> Stack:
    """Frames of ``path`` and their pixel size.

    Parameters
    ----------
    path : path-like
        A stack file (any format :func:`simgen.experiment.readers.read_image` reads), a
        folder of single-frame files (sorted by name), or a simgen store (``*.zarr``; a
        movie store's ground truth is kept).
    pixel_size_A : float, optional
        Pixel size when the files carry none [Å/px].
    material : str, optional
        Calibrate the pixel size from the lattice in the FFT when nothing else gives it.

    Raises
    ------
    StackError
        Missing path, unreadable file, a single image, frames of different sizes.
    """
    from simgen.experiment.readers import FORMATS, ReaderError, read_image

    p = Path(path)
    if not p.exists():
        raise StackError(f"{p}: not found")
    if p.is_dir() and (p / "zarr.json").is_file():
        from simgen import store

        try:
            root = store.open_store(p)
        except store.StoreError as err:
            raise StackError(str(err)) from None
        done = list(store.iter_complete(root))
        frames = [store.read_image(root, i) for i in done]
        px = root.attrs.get("pixel_size_A") or pixel_size_A
        if px is None:
            raise StackError(f"{p}: the store has no fixed pixel size; give --pixel-size")
        arr = _check_frames(frames, [f"frame {i}" for i in done], str(p))
        if len(done) < int(root.attrs["n_samples"]):
            raise StackError(
                f"{p}: only {len(done)} of {root.attrs['n_samples']} frames are complete; "
                "finish the store first (run the same simgen movie command)"
            )
        return Stack(arr, float(px), str(p), tuple(f"frame {i}" for i in done), root)
    try:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
            if not files:
                raise StackError(f"{p}: no image files in the folder")
            images = []
            for f in files:
                got = read_image(f, pixel_size_A=pixel_size_A, material=material)
                if len(got) != 1:
                    raise StackError(
                        f"{f}: holds {len(got)} frames; a folder holds one frame per file"
                    )
                images.append(got[0])
            names = tuple(f.name for f in files)
        else:
            images = read_image(p, pixel_size_A=pixel_size_A, material=material)
            names = tuple(f"frame {k}" for k in range(len(images)))
    except ReaderError as err:
        raise StackError(str(err)) from None
    arr = _check_frames([im.data for im in images], names, str(p))
    return Stack(arr, float(images[0].pixel_size_A), str(p), names)
