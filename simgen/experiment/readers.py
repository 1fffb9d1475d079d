"""Read experimental STEM images into plain arrays with a pixel size in Å.

Formats: Gatan ``.dm3``/``.dm4``, ``.emd`` (Velox and Berkeley/NCEM), FEI TIA ``.ser``
(through rosettasciio), ``.tif``/``.tiff`` (tifffile: ImageJ, FEI/Thermo and resolution
tags, OME-TIFF, ImageJ hyperstacks; LZW, Deflate, ZSTD, PackBits and JPEG compression through
imagecodecs), ``.mrc`` (mrcfile), ``.npy`` and ``.png``. Torch-free: the result is an
:class:`ExperimentImage` per frame (or one for a summed stack).

The pixel size comes from the file's calibration, from the ``pixel_size_A`` argument, or
from the hexagonal FFT spots of the named material
(:func:`simgen.experiment.calibration.calibrate_lattice`, which also measures scan
anisotropy and shear). When the file has a calibration and a material is named, both are
measured: a disagreement above :data:`CALIBRATION_MISMATCH` is logged as a warning and kept
in the metadata; the file's value wins unless ``calibrate="fft"``. Every failure is a
:class:`ReaderError` whose one-line message names the file.
"""

from __future__ import annotations

import glob
import logging
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Supported extensions (lower case) and the format each is read as.
FORMATS = {
    ".dm3": "dm",
    ".dm4": "dm",
    ".emd": "emd",
    ".ser": "tia",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".mrc": "mrc",
    ".npy": "npy",
    ".png": "png",
}

#: Length units -> Å per unit (case-sensitive keys first, then lower-cased lookup).
_UNITS_A = {
    "\u00c5": 1.0,  # Å, LATIN CAPITAL LETTER A WITH RING ABOVE
    "\u212b": 1.0,  # Å, ANGSTROM SIGN
    "A": 1.0,
    "angstrom": 1.0,
    "angstroms": 1.0,
    "ang": 1.0,
    "pm": 0.01,
    "nm": 10.0,
    "nanometer": 10.0,
    "nanometers": 10.0,
    "nanometre": 10.0,
    "nanometres": 10.0,
    "\u00b5m": 1e4,  # µm, MICRO SIGN
    "\u03bcm": 1e4,  # μm, GREEK SMALL LETTER MU
    "um": 1e4,
    "micron": 1e4,
    "microns": 1e4,
    "micrometer": 1e4,
    "micrometre": 1e4,
    "mm": 1e7,
    "cm": 1e8,
    "m": 1e10,
    "meter": 1e10,
    "meters": 1e10,
    "metre": 1e10,
    "metres": 1e10,
}
#: Pixel sizes outside this range [Å] are not an atomic-resolution calibration (e.g. a 72 dpi
#: TIFF resolution tag) and are ignored.
PLAUSIBLE_PIXEL_A = (1e-3, 1e3)


#: Relative disagreement between the file's pixel size and the FFT's that is warned about.
CALIBRATION_MISMATCH = 0.03
#: ``calibrate`` choices of :func:`read_image`.
CALIBRATE_CHOICES = ("auto", "fft", "file")

log = logging.getLogger(__name__)


class ReaderError(ValueError):
    """An experimental image file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ExperimentImage:
    """One experimental image (a frame of a stack, or the sum of a stack).

    Attributes
    ----------
    data : ndarray of float32, shape (H, W)
        Intensities as recorded (rows y, columns x).
    pixel_size_A : float
        Pixel size [Å/px].
    pixel_size_source : {"metadata", "user", "fft"}
        Where the pixel size came from.
    pixel_size_uncertainty_A : float or None
        One standard deviation [Å/px] when calibrated from the FFT, else None.
    source : str
        Path of the file.
    frame : int or None
        Frame index in a stack; None for a single image or a summed stack.
    metadata : dict
        Plain values: format, original shape, units and scales read, selected dataset, the
        FFT calibration's figures, a calibration warning, ...
    lattice : LatticeCalibration or None
        The FFT lattice calibration when one was made (its scan anisotropy and shear are
        corrected before labelling).
    """

    data: np.ndarray
    pixel_size_A: float
    pixel_size_source: str
    pixel_size_uncertainty_A: float | None
    source: str
    frame: int | None
    metadata: dict = field(default_factory=dict)
    lattice: object | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def field_of_view_A(self) -> tuple[float, float]:
        """``(width, height)`` [Å]."""
        h, w = self.data.shape
        return (w * self.pixel_size_A, h * self.pixel_size_A)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def length_to_A(value: float, units) -> float | None:
    """Convert a length in ``units`` to Å; None when the units are not a length.

    Parameters
    ----------
    value : float
    units : str
        E.g. ``"nm"``, ``"pm"``, ``"Å"``, ``"µm"``, ``"m"``. Reciprocal units (``"1/nm"``),
        pixels and empty units give None.
    """
    if units is None:
        return None
    u = str(units).strip()
    factor = _UNITS_A.get(u, _UNITS_A.get(u.lower()))
    return None if factor is None else float(value) * factor


def _plausible(pixel_A: float | None) -> bool:
    return (
        pixel_A is not None
        and math.isfinite(pixel_A)
        and (PLAUSIBLE_PIXEL_A[0] <= pixel_A <= PLAUSIBLE_PIXEL_A[1])
    )


# --------------------------------------------------------------------------------------------
# Format loaders: path -> (array [H, W] or [n, H, W] (or colour), (py, px) Å or None, metadata)
# --------------------------------------------------------------------------------------------


def _from_rsciio(signals: list, path: Path, dataset) -> tuple[np.ndarray, tuple | None, dict]:
    """Pick the image signal from rosettasciio's list of dicts and read its calibration."""
    images = []
    for k, sig in enumerate(signals):
        data = sig.get("data")
        if data is None:
            continue
        shape = np.shape(data)
        if len(shape) in (2, 3) and min(shape[-2:]) > 1:
            title = str(sig.get("metadata", {}).get("General", {}).get("title", ""))
            images.append((k, title, sig))
    if not images:
        shapes = [tuple(np.shape(s.get("data"))) for s in signals]
        raise ReaderError(f"{path}: no 2-D image or 3-D stack in the file (datasets {shapes})")
    titles = [t for _, t, _ in images]
    if dataset is None:
        haadf = [i for i, t in enumerate(titles) if "haadf" in t.lower()]
        choice = haadf[0] if haadf else 0
    elif isinstance(dataset, int):
        if not 0 <= dataset < len(images):
            raise ReaderError(f"{path}: dataset {dataset} out of range (images: {titles})")
        choice = dataset
    else:
        hits = [i for i, t in enumerate(titles) if str(dataset).lower() in t.lower()]
        if not hits:
            raise ReaderError(f"{path}: no dataset titled {dataset!r} (images: {titles})")
        choice = hits[0]
    _, title, sig = images[choice]
    data = np.asarray(sig["data"])
    axes = list(sig.get("axes", []))
    meta = {"title": title, "datasets": titles}
    scale = None
    if len(axes) >= 2:
        ay, ax = axes[-2], axes[-1]
        meta["units"] = (str(ay.get("units")), str(ax.get("units")))
        meta["scale"] = (float(ay.get("scale", 1.0)), float(ax.get("scale", 1.0)))
        py = length_to_A(ay.get("scale", 1.0), ay.get("units"))
        px = length_to_A(ax.get("scale", 1.0), ax.get("units"))
        if py is not None and px is not None:
            scale = (py, px)
        else:
            recip = [str(a.get("units")) for a in (ay, ax) if "/" in str(a.get("units"))]
            if recip:
                raise ReaderError(
                    f"{path}: reciprocal-space axes ({recip[0]}): a diffraction pattern, not an "
                    "image"
                )
    return data, scale, meta


def _load_dm(path: Path, dataset):
    from rsciio.digitalmicrograph import file_reader

    return _from_rsciio(file_reader(str(path)), path, dataset)


def _load_emd(path: Path, dataset):
    from rsciio.emd import file_reader

    return _from_rsciio(file_reader(str(path), select_type="image"), path, dataset)


def _load_tia(path: Path, dataset):
    from rsciio.tia import file_reader

    return _from_rsciio(file_reader(str(path)), path, dataset)


def _tiff_scale(tif) -> tuple[tuple | None, dict]:
    """Pixel size from FEI/Thermo metadata, ImageJ metadata or the resolution tags."""
    meta: dict = {}
    fei = getattr(tif, "fei_metadata", None)
    if fei:
        scan = fei.get("Scan", {}) or {}
        if scan.get("PixelWidth") and scan.get("PixelHeight"):
            px = float(scan["PixelWidth"]) * 1e10
            py = float(scan["PixelHeight"]) * 1e10
            meta["calibration"] = "fei"
            if _plausible(px) and _plausible(py):
                return (py, px), meta
    ome = _ome_scale(tif)
    if ome is not None:
        meta["calibration"] = "ome"
        return ome, meta
    page = tif.pages.first
    tags = page.tags
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if xres is None or yres is None:
        return None, meta

    def per_unit(tag):
        num, den = tag.value
        return float(num) / float(den) if den else 0.0

    rx, ry = per_unit(xres), per_unit(yres)  # pixels per unit
    if rx <= 0 or ry <= 0:
        return None, meta
    ij = tif.imagej_metadata or {}
    if ij.get("unit"):
        unit = str(ij["unit"]).replace("\\u00B5", "µ").replace("\\u00b5", "µ")
        meta["calibration"] = "imagej"
    else:
        res_unit = tags.get("ResolutionUnit")
        code = int(res_unit.value) if res_unit is not None else 2
        unit = {2: "inch", 3: "cm"}.get(code)
        meta["calibration"] = f"resolution_unit_{code}"
        if unit == "inch":
            meta["resolution_dpi"] = rx
            px, py = 2.54e8 / rx, 2.54e8 / ry
            return ((py, px), meta) if _plausible(px) and _plausible(py) else (None, meta)
    px, py = length_to_A(1.0 / rx, unit), length_to_A(1.0 / ry, unit)
    meta["units"] = unit
    if _plausible(px) and _plausible(py):
        return (py, px), meta
    return None, meta


def _ome_scale(tif) -> tuple[float, float] | None:
    """``(p_y, p_x)`` [Å] from OME-XML ``PhysicalSizeX/Y`` (default unit µm), if present."""
    xml = getattr(tif, "ome_metadata", None) if getattr(tif, "is_ome", False) else None
    if not xml:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
            px = length_to_A(float(el.get("PhysicalSizeX")), el.get("PhysicalSizeXUnit", "µm"))
            py = length_to_A(
                float(el.get("PhysicalSizeY", el.get("PhysicalSizeX"))),
                el.get("PhysicalSizeYUnit", el.get("PhysicalSizeXUnit", "µm")),
            )
            if px and py and _plausible(px) and _plausible(py):
                return (py, px)
    return None


def _load_tiff(path: Path, dataset):
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes
        scale, meta = _tiff_scale(tif)
    meta["axes"] = axes
    if axes.endswith("S") and data.shape[-1] in (3, 4):  # RGB(A) samples
        data = _to_grey(data)
        meta["converted_from"] = "rgb"
        axes = axes[:-1]
    if data.ndim > 3 and axes.endswith("YX"):  # ImageJ/OME hyperstack: every plane a frame
        meta["hyperstack_shape"] = tuple(int(n) for n in data.shape[:-2])
        data = data.reshape(-1, *data.shape[-2:])
    return data, scale, meta


def _load_mrc(path: Path, dataset):
    import mrcfile

    with mrcfile.open(str(path), permissive=False) as mrc:
        data = np.array(mrc.data)
        voxel = mrc.voxel_size
        vx, vy = float(voxel.x), float(voxel.y)
    meta = {"voxel_size_A": (vy, vx)}
    scale = (vy, vx) if vx > 0 and vy > 0 else None  # MRC voxel sizes are in Å; 0 = unset
    return data, scale, meta


def _load_npy(path: Path, dataset):
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ValueError("no NumPy .npy header")
    return np.load(str(path), allow_pickle=False), None, {}


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)[..., :3]
    return rgb @ np.array([0.2125, 0.7154, 0.0721])


def _load_png(path: Path, dataset):
    from PIL import Image

    with Image.open(str(path)) as im:
        im.load()
        mode = im.mode
        data = np.asarray(im)
    meta = {"mode": mode}
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        if np.ptp(data[..., :3].astype(np.int64), axis=-1).max() == 0:
            data = data[..., 0]  # grey stored as RGB
        else:
            data = _to_grey(data)
            meta["converted_from"] = "rgb"
    elif data.ndim == 3 and data.shape[-1] == 2:  # grey + alpha
        data = data[..., 0]
    return data, None, meta


_LOADERS = {
    "dm": _load_dm,
    "emd": _load_emd,
    "tia": _load_tia,
    "tiff": _load_tiff,
    "mrc": _load_mrc,
    "npy": _load_npy,
    "png": _load_png,
}


# --------------------------------------------------------------------------------------------
# Public reader
# --------------------------------------------------------------------------------------------


def read_image(
    path,
    *,
    pixel_size_A: float | None = None,
    material: str | None = None,
    frame: int | None = None,
    sum_frames: bool = False,
    dataset: int | str | None = None,
    calibrate: str = "auto",
) -> list[ExperimentImage]:
    """Read an experimental image or stack with its pixel size in Å.

    Parameters
    ----------
    path : path-like
        ``.dm3``, ``.dm4``, ``.emd``, ``.ser``, ``.tif``/``.tiff``, ``.mrc``, ``.npy`` or
        ``.png``.
    pixel_size_A : float, optional
        Pixel size [Å/px] used when the file carries no calibration.
    material : str, optional
        E.g. ``"MoS2"``: measure the lattice in the FFT with the tabulated lattice constant:
        the pixel size when neither the file nor ``pixel_size_A`` gives one, and in any case
        the scan anisotropy and shear (and a check of the file's calibration).
    frame : int, optional
        Return only this frame of a stack (negative indices count from the end).
    sum_frames : bool
        Return one image, the sum of all frames of a stack.
    dataset : int or str, optional
        For files holding several images (e.g. Velox EMD with HAADF, DF, BF): index among the
        images or a case-insensitive part of the title. Default: the first titled HAADF,
        else the first image.
    calibrate : {"auto", "fft", "file"}
        ``"auto"``: the file's calibration, else ``pixel_size_A``, else the FFT; ``"fft"``:
        the FFT's pixel size even when the file has one (needs ``material``); ``"file"``: no
        FFT at all.

    Returns
    -------
    list of ExperimentImage
        One per frame of a stack, or one (a single image, a chosen frame or the sum).

    Raises
    ------
    ReaderError
        Missing file, unsupported extension, unreadable or corrupt file, data not 2-D (or a
        3-D stack), non-finite values, frame out of range, no pixel size and no material,
        or FFT calibration failing.
    """
    p = Path(path)
    if frame is not None and sum_frames:
        raise ReaderError(f"{p}: give either frame or sum_frames, not both")
    if pixel_size_A is not None and not (
        isinstance(pixel_size_A, numbers.Real) and math.isfinite(pixel_size_A) and pixel_size_A > 0
    ):
        raise ReaderError(f"{p}: pixel_size_A must be a positive number of Å, got {pixel_size_A!r}")
    if not p.exists():
        raise ReaderError(f"{p}: file not found")
    if not p.is_file():
        raise ReaderError(f"{p}: not a file")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ReaderError(
            f"{p}: unsupported extension {p.suffix!r}; supported: {', '.join(sorted(FORMATS))}"
        )
    try:
        data, scale, meta = _LOADERS[fmt](p, dataset)
    except ReaderError:
        raise
    except MemoryError:
        raise
    except ImportError as exc:  # e.g. EMD (HDF5) files need h5py
        name = getattr(exc, "name", None) or "a missing package"
        raise ReaderError(f"{p}: reading {fmt} files needs {name} (pip install {name})") from exc
    except Exception as exc:  # any library failure on a bad file: one clear line
        raise ReaderError(
            f"{p}: unreadable or corrupt {fmt} file ({type(exc).__name__}: {_one_line(exc)})"
        ) from exc
    meta = {"format": fmt, **meta}

    arr = np.asarray(data)
    meta["original_shape"] = tuple(int(s) for s in arr.shape)
    meta["original_dtype"] = str(arr.dtype)
    if np.iscomplexobj(arr):
        raise ReaderError(f"{p}: complex data {arr.shape}; expected a real-valued image")
    if arr.dtype.kind not in "biuf":
        raise ReaderError(f"{p}: non-numeric data of dtype {arr.dtype}")
    squeezed = arr.reshape([s for s in arr.shape if s != 1]) if arr.ndim > 2 else arr
    if squeezed.ndim not in (2, 3) or min(squeezed.shape[-2:]) < 2:
        raise ReaderError(
            f"{p}: expected a 2-D image or a 3-D stack [frames, H, W], got shape {arr.shape}"
        )
    stack = squeezed.astype(np.float32)[None] if squeezed.ndim == 2 else squeezed.astype(np.float32)
    if not np.all(np.isfinite(stack)):
        raise ReaderError(f"{p}: contains NaN or infinite values")
    n_frames = len(stack)
    meta["n_frames"] = n_frames
    is_stack = squeezed.ndim == 3

    if frame is not None:
        if not -n_frames <= frame < n_frames:
            raise ReaderError(f"{p}: frame {frame} out of range ({n_frames} frames)")
        frames = [(frame % n_frames if is_stack else None, stack[frame])]
    elif sum_frames:
        frames = [(None, stack.sum(axis=0, dtype=np.float64).astype(np.float32))]
        meta["summed_frames"] = n_frames
    else:
        frames = [(k if is_stack else None, f) for k, f in enumerate(stack)]

    pixel, source, uncertainty, lattice = _pixel_size(
        p, np.stack([f for _, f in frames]), scale, pixel_size_A, material, calibrate, meta
    )
    return [
        ExperimentImage(
            data=np.ascontiguousarray(img, dtype=np.float32),
            pixel_size_A=float(pixel),
            pixel_size_source=source,
            pixel_size_uncertainty_A=None if uncertainty is None else float(uncertainty),
            source=str(p),
            frame=k,
            metadata=_plain(meta),
            lattice=lattice,
        )
        for k, img in frames
    ]


def _pixel_size(p: Path, frames, scale, pixel_size_A, material, calibrate, meta):
    """Pixel size [Å/px], its source and uncertainty, and the FFT lattice calibration.

    Order: the file's calibration (unless ``calibrate="fft"``), ``pixel_size_A``, the FFT.
    The FFT runs whenever a material is named (and ``calibrate != "file"``): it measures
    the scan distortion, and a file calibration that disagrees with it is warned about.
    """
    if calibrate not in CALIBRATE_CHOICES:
        raise ReaderError(f"{p}: calibrate must be one of {CALIBRATE_CHOICES}, got {calibrate!r}")
    if calibrate == "fft" and material is None:
        raise ReaderError(f"{p}: calibrate='fft' needs a material (e.g. 'WSe2')")
    file_pixel = None
    if scale is not None and _plausible(scale[0]) and _plausible(scale[1]):
        py, px = scale
        if abs(py - px) > 1e-3 * max(py, px):
            meta["pixel_size_yx_A"] = (py, px)  # non-square pixels: geometric mean used
        file_pixel = math.sqrt(px * py)
        if pixel_size_A is not None:
            meta["pixel_size_user_A"] = float(pixel_size_A)
    lattice = None
    if material is not None and calibrate != "file":
        from simgen.experiment.calibration import (
            CalibrationError,
            calibrate_lattice,
            lattice_constant_of,
        )

        try:
            a = lattice_constant_of(material)
        except (KeyError, ValueError) as exc:
            raise ReaderError(f"{p}: {_one_line(exc)}") from exc
        nominal = file_pixel if calibrate == "auto" else None
        nominal = nominal if nominal is not None else pixel_size_A
        try:
            lattice = calibrate_lattice(frames, a, nominal_pixel_size_A=nominal)
        except CalibrationError as exc:
            if file_pixel is None and pixel_size_A is None or calibrate == "fft":
                what = "no pixel size in the file and " if file_pixel is None else ""
                raise ReaderError(f"{p}: {what}FFT calibration failed: {_one_line(exc)}") from exc
            meta["fft_calibration_error"] = _one_line(exc)
        if lattice is not None:
            meta["calibration_material"] = str(material)
            meta["lattice_constant_A"] = a
            meta["fft_calibration"] = lattice.summary()
    if calibrate == "fft" and lattice is not None:
        chosen = (lattice.pixel_size_A, "fft", lattice.uncertainty_A)
    elif file_pixel is not None:
        chosen = (file_pixel, "metadata", None)
    elif pixel_size_A is not None:
        chosen = (float(pixel_size_A), "user", None)
    elif lattice is not None:
        chosen = (lattice.pixel_size_A, "fft", lattice.uncertainty_A)
    else:
        raise ReaderError(
            f"{p}: no pixel size in the file; give pixel_size_A or a material (e.g. 'MoS2') for "
            "FFT calibration"
        )
    if lattice is not None and chosen[1] != "fft":
        mismatch = chosen[0] / lattice.pixel_size_A - 1.0
        meta["fft_mismatch"] = mismatch
        if abs(mismatch) > CALIBRATION_MISMATCH:
            warning = (
                f"{p}: the {'file' if chosen[1] == 'metadata' else 'given'} pixel size "
                f"{chosen[0]:.4f} Å differs from the FFT lattice's {lattice.pixel_size_A:.4f} Å "
                f"by {mismatch:+.1%}; using the {'file' if chosen[1] == 'metadata' else 'given'}"
                " value (calibrate='fft' uses the FFT's)"
            )
            meta["calibration_warning"] = warning
            log.warning(warning)
    return (*chosen, lattice)


def _plain(value):
    """Metadata as plain Python values (JSON-friendly)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def expand_inputs(inputs: Iterable) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named by paths, glob patterns and folders.

    Folders are searched recursively for the readable extensions
    (:data:`~simgen.experiment.readers.FORMATS`); glob patterns (``*``, ``?``, ``[``;
    ``**`` recurses)
    are expanded; a file given by name is kept whatever its extension (the reader then says
    what is wrong with it). Duplicates are dropped, order is sorted per input.

    Returns
    -------
    files : list of Path
    missing : list of (str, str)
        Inputs that name nothing, with the reason.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    missing: list[tuple[str, str]] = []

    def add(path: Path):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        text = str(item)
        p = Path(text)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in FORMATS)
            if not found:
                missing.append((text, f"no image files ({', '.join(sorted(FORMATS))}) in folder"))
            for q in found:
                add(q)
        elif p.is_file():
            add(p)
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(text, recursive=True) if Path(q).is_file())
            if not found:
                missing.append((text, "pattern matches no file"))
            for q in found:
                add(q)
        else:
            missing.append((text, "file not found"))
    return files, missing
