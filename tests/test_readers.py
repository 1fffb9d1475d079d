"""Reading experimental images: formats, pixel sizes from metadata / user / FFT, clear errors."""

from __future__ import annotations

import importlib.util
import math
import struct

import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image
from test_lattice import render_haadf

from simgen.experiment.readers import ExperimentImage, ReaderError, length_to_A, read_image

RNG = np.random.default_rng(0)
STACK = RNG.random((3, 40, 50)).astype(np.float32)


def check_error(path, match, **kwargs):
    """read_image raises a one-line ReaderError naming the file."""
    with pytest.raises(ReaderError, match=match) as info:
        read_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_length_units_to_angstrom():
    assert length_to_A(0.02, "nm") == pytest.approx(0.2)
    assert length_to_A(20.0, "pm") == pytest.approx(0.2)
    for unit in ("Å", "\u212b", "A", "angstrom"):
        assert length_to_A(0.2, unit) == pytest.approx(0.2)
    for unit in ("µm", "μm", "um", "micron"):
        assert length_to_A(2e-5, unit) == pytest.approx(0.2)
    assert length_to_A(2e-11, "m") == pytest.approx(0.2)
    for unit in ("1/nm", "px", "", None, "<undefined>"):
        assert length_to_A(1.0, unit) is None


# ------------------------------------------------------------------------------ formats


def test_imagej_tiff_stack_with_pixel_size(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, STACK, imagej=True, resolution=(1 / 0.02, 1 / 0.02), metadata={"unit": "nm"}
    )
    images = read_image(path)
    assert len(images) == 3
    for k, im in enumerate(images):
        assert isinstance(im, ExperimentImage)
        assert im.frame == k
        assert im.data.dtype == np.float32 and im.data.shape == (40, 50)
        assert im.pixel_size_A == pytest.approx(0.2, rel=1e-6)
        assert im.pixel_size_source == "metadata"
        assert im.pixel_size_uncertainty_A is None
        assert im.source == str(path)
        np.testing.assert_array_equal(im.data, STACK[k])
    (one,) = read_image(path, frame=-1)
    assert one.frame == 2
    np.testing.assert_array_equal(one.data, STACK[2])
    (total,) = read_image(path, sum_frames=True)
    assert total.frame is None and total.metadata["summed_frames"] == 3
    np.testing.assert_allclose(total.data, STACK.sum(axis=0), rtol=1e-6)
    assert images[0].field_of_view_A == pytest.approx((10.0, 8.0))


def test_tiff_resolution_tags(tmp_path):
    cm = tmp_path / "cm.tif"  # pixels per centimetre, as some acquisition software writes
    tifffile.imwrite(
        cm, STACK[0], resolution=(1 / 0.25e-8, 1 / 0.25e-8), resolutionunit="CENTIMETER"
    )
    (im,) = read_image(cm)
    assert im.pixel_size_A == pytest.approx(0.25, rel=1e-6) and im.frame is None
    dpi = tmp_path / "dpi.tif"  # 72 dpi is a screen resolution, not a calibration
    tifffile.imwrite(dpi, STACK[0], resolution=(72, 72), resolutionunit="INCH")
    check_error(dpi, "no pixel size")
    (im,) = read_image(dpi, pixel_size_A=0.15)
    assert (im.pixel_size_A, im.pixel_size_source) == (0.15, "user")


def test_fei_thermo_tiff_metadata(tmp_path):
    path = tmp_path / "fei.tif"  # FEI/Thermo SEM/STEM TIFFs: INI text in tag 34682, metres
    ini = "[User]\r\nDate=01/01/2026\r\n[Scan]\r\nPixelWidth=2.1e-011\r\nPixelHeight=2.1e-011\r\n"
    tifffile.imwrite(path, STACK[0], extratags=[(34682, "s", 0, ini, True)])
    (im,) = read_image(path)
    assert im.pixel_size_A == pytest.approx(0.21) and im.metadata["calibration"] == "fei"


def test_file_calibration_wins_over_the_argument(tmp_path):
    path = tmp_path / "cal.tif"
    tifffile.imwrite(path, STACK[0], imagej=True, resolution=(50, 50), metadata={"unit": "nm"})
    (im,) = read_image(path, pixel_size_A=0.5)
    assert im.pixel_size_A == pytest.approx(0.2) and im.pixel_size_source == "metadata"
    assert im.metadata["pixel_size_user_A"] == 0.5


def test_mrc_voxel_size(tmp_path):
    path = tmp_path / "a.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(STACK)
        mrc.voxel_size = 0.3
    images = read_image(path)
    assert len(images) == 3
    assert images[1].pixel_size_A == pytest.approx(0.3, rel=1e-6)
    unset = tmp_path / "unset.mrc"
    with mrcfile.new(unset) as mrc:
        mrc.set_data(STACK[0])
    check_error(unset, "no pixel size")


def test_npy_and_png_take_the_user_pixel_size(tmp_path):
    npy = tmp_path / "img.npy"
    np.save(npy, STACK[0].astype(np.float64))
    (im,) = read_image(npy, pixel_size_A=0.2)
    assert im.data.dtype == np.float32 and im.pixel_size_source == "user"
    grey = (STACK[0] * 60000).astype(np.uint16)
    png16 = tmp_path / "grey16.png"
    Image.fromarray(grey).save(png16)
    (im,) = read_image(png16, pixel_size_A=0.2)
    np.testing.assert_array_equal(im.data, grey.astype(np.float32))
    rgb = np.stack([(STACK[0] * 255).astype(np.uint8)] * 3, axis=-1)
    png_rgb = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(png_rgb)
    (im,) = read_image(png_rgb, pixel_size_A=0.2)
    assert im.data.shape == (40, 50)
    np.testing.assert_array_equal(im.data, rgb[..., 0].astype(np.float32))


def test_emd_written_by_rosettasciio(tmp_path):
    pytest.importorskip("h5py", reason="rosettasciio reads EMD (HDF5) through h5py")
    from rsciio.emd import file_writer

    path = tmp_path / "stack.emd"
    axes = [
        {"name": "t", "scale": 1.0, "offset": 0.0, "units": "s", "size": 3, "navigate": True},
        {"name": "y", "scale": 0.021, "offset": 0.0, "units": "nm", "size": 40, "navigate": False},
        {"name": "x", "scale": 0.021, "offset": 0.0, "units": "nm", "size": 50, "navigate": False},
    ]
    signal = {
        "data": STACK,
        "axes": axes,
        "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}},
        "original_metadata": {},
    }
    file_writer(str(path), signal)
    images = read_image(path)
    assert len(images) == 3
    assert images[0].pixel_size_A == pytest.approx(0.21)
    assert images[0].metadata["title"] == "HAADF"
    np.testing.assert_allclose(images[2].data, STACK[2])


def dm3_bytes(data: np.ndarray, scale: float, units: str, title: str = "HAADF") -> bytes:
    """A minimal valid Gatan DM3 file (version 3, little-endian data) holding ``data``.

    Tag tree: ImageList / (unnamed image) / ImageData {Calibrations {Brightness, Dimension},
    Data (float32), DataType 2, Dimensions (x, y[, z]), PixelDepth}, ImageTags, Name — the
    layout rosettasciio's DigitalMicrograph reader walks. ``scale`` and ``units`` calibrate x
    and y; DM stores dimensions and calibrations x first.
    """

    def head(tag_id, name):
        return struct.pack(">bh", tag_id, len(name)) + name.encode()

    def group(name, entries):
        return head(20, name) + struct.pack(">bbl", 0, 1, len(entries)) + b"".join(entries)

    def simple(name, code, fmt, value):
        info = struct.pack(">ll", 1, code)
        return head(21, name) + b"%%%%" + info + struct.pack("<" + fmt, value)

    def array(name, code, payload, count):
        return head(21, name) + b"%%%%" + struct.pack(">llll", 3, 20, code, count) + payload

    def text(name, value):  # DM strings: arrays of uint16 characters
        return array(name, 4, np.array([ord(c) for c in value], "<u2").tobytes(), len(value))

    def calibration(scale_, units_):
        return [
            simple("Origin", 6, "f", 0.0),
            simple("Scale", 6, "f", scale_),
            text("Units", units_),
        ]

    dims = data.shape[::-1]
    axes = [group("", calibration(scale, units) if k < 2 else calibration(1.0, "")) for k in
            range(len(dims))]  # fmt: skip
    image_data = group(
        "ImageData",
        [
            group(
                "Calibrations",
                [group("Brightness", calibration(1.0, "")), group("Dimension", axes)],
            ),  # fmt: skip
            array("Data", 6, data.astype("<f4").tobytes(), data.size),
            simple("DataType", 3, "l", 2),  # 2: float32
            group("Dimensions", [simple("", 5, "L", d) for d in dims]),
            simple("PixelDepth", 3, "l", 4),
        ],
    )
    image = group("", [image_data, group("ImageTags", []), text("Name", title)])
    body = struct.pack(">bbl", 0, 1, 1) + group("ImageList", [image])
    return struct.pack(">lll", 3, len(body) + 8, 1) + body + bytes(8)


def test_dm3_stack_and_units(tmp_path):
    path = tmp_path / "stack.dm3"
    path.write_bytes(dm3_bytes(STACK, 0.018, "nm"))
    images = read_image(path)
    assert len(images) == 3 and images[0].metadata["title"] == "HAADF"
    assert images[0].pixel_size_A == pytest.approx(0.18, rel=1e-6)
    np.testing.assert_array_equal(images[1].data, STACK[1])
    for scale, units in ((18.0, "pm"), (0.18, "\u00c5"), (1.8e-5, "\u00b5m")):
        single = tmp_path / "single.dm3"
        single.write_bytes(dm3_bytes(STACK[0], scale, units))
        (im,) = read_image(single)
        assert im.pixel_size_A == pytest.approx(0.18, rel=1e-6) and im.frame is None
    uncalibrated = tmp_path / "uncal.dm3"
    uncalibrated.write_bytes(dm3_bytes(STACK[0], 1.0, ""))
    check_error(uncalibrated, "no pixel size")
    diffraction = tmp_path / "dp.dm3"
    diffraction.write_bytes(dm3_bytes(STACK[0], 0.05, "1/nm"))
    check_error(diffraction, "diffraction")
    truncated = tmp_path / "cut.dm3"
    truncated.write_bytes(dm3_bytes(STACK[0], 0.018, "nm")[:300])
    check_error(truncated, "unreadable or corrupt", pixel_size_A=0.2)


def test_fft_calibration_when_the_file_has_no_pixel_size(tmp_path):
    img, *_ = render_haadf("WSe2", 0.17, (320, 320), 21.0, dose=8.0)
    path = tmp_path / "uncal.npy"
    np.save(path, img)
    (im,) = read_image(path, material="WSe2")
    assert im.pixel_size_source == "fft"
    assert abs(im.pixel_size_A / 0.17 - 1) < 0.02
    assert 0 < im.pixel_size_uncertainty_A < 0.01 * 0.17
    assert im.metadata["lattice_constant_A"] == pytest.approx(3.282)
    # a stack is calibrated once from all its frames
    stack = tmp_path / "stack.npy"
    np.save(stack, np.stack([img, np.roll(img, 5, axis=1)]))
    ims = read_image(stack, material="WSe2")
    assert len(ims) == 2 and ims[0].pixel_size_A == ims[1].pixel_size_A


# ------------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_files(tmp_path):
    check_error(tmp_path / "missing.tif", "not found")
    jpg = tmp_path / "photo.jpg"
    jpg.write_bytes(b"\xff\xd8\xff\xe0")
    check_error(jpg, "unsupported extension")
    names = ["bad.tif", "bad.mrc", "bad.npy", "bad.png", "bad.dm3", "bad.ser"]
    if importlib.util.find_spec("h5py") is not None:
        names.append("bad.emd")
    for name in names:
        path = tmp_path / name
        path.write_bytes(b"not an image at all" * 10)
        check_error(path, "unreadable or corrupt", pixel_size_A=0.2)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    check_error(empty, "unreadable or corrupt", pixel_size_A=0.2)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    check_error(obj, "unreadable or corrupt", pixel_size_A=0.2)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros(10), "2-D image or a 3-D stack"),
        (np.zeros((2, 3, 8, 8)), "2-D image or a 3-D stack"),
        (np.zeros((8, 1)), "2-D image or a 3-D stack"),
        (np.zeros((8, 8), complex), "complex"),
        (np.full((8, 8), np.nan), "NaN"),
    ],
)
def test_clear_errors_for_wrong_shapes_and_values(tmp_path, array, match):
    path = tmp_path / "x.npy"
    np.save(path, array)
    check_error(path, match, pixel_size_A=0.2)


def test_clear_errors_for_bad_requests(tmp_path):
    path = tmp_path / "stack.npy"
    np.save(path, STACK)
    check_error(path, "out of range", pixel_size_A=0.2, frame=3)
    check_error(path, "either frame or sum_frames", pixel_size_A=0.2, frame=0, sum_frames=True)
    check_error(path, "no pixel size", frame=0)
    check_error(path, "positive", pixel_size_A=-1.0)
    check_error(path, "unknown material", material="NbS2")
    noise = tmp_path / "noise.npy"
    np.save(noise, RNG.poisson(10.0, (128, 128)).astype(np.float32))
    check_error(noise, "FFT calibration failed", material="MoS2")
    (squeezed,) = read_image(_save(tmp_path / "one.npy", STACK[:1]), pixel_size_A=0.2)
    assert squeezed.frame is None and squeezed.data.shape == (40, 50)
    assert math.isclose(squeezed.pixel_size_A, 0.2)


def _save(path, array):
    np.save(path, array)
    return path


# -------------------------------------------- TIFFs as acquisition software writes them


COMPRESSIONS = ["lzw", "deflate", "adobe_deflate", "zstd", "packbits", "jpeg"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compressed_tiffs_read(tmp_path, compression):
    """8-bit exports with every common compression (the real WSe2 set is 8-bit LZW)."""
    img = (STACK[0] * 255).astype(np.uint8)
    path = tmp_path / f"20MX 80kV ADF {compression}.tif"  # spaces, as microscopes name files
    tifffile.imwrite(path, img, compression=compression)
    (im,) = read_image(path, pixel_size_A=0.1)
    assert im.data.dtype == np.float32 and im.shape == img.shape
    if compression == "jpeg":  # lossy
        assert np.abs(im.data - img).mean() < 3.0
    else:
        np.testing.assert_array_equal(im.data, img)


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64]
)
def test_tiff_integer_and_float_data(tmp_path, dtype):
    scale = 1.0 if np.dtype(dtype).kind == "f" else 200
    img = (STACK[1] * scale).astype(dtype)
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, img, compression="zlib")
    (im,) = read_image(path, pixel_size_A=0.1)
    np.testing.assert_allclose(im.data, img.astype(np.float64), rtol=1e-6)
    assert im.metadata["original_dtype"] == np.dtype(dtype).name


def test_imagej_hyperstack_frames(tmp_path):
    data = RNG.random((2, 3, 40, 50)).astype(np.float32)  # T, Z, Y, X
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(
        path, data, imagej=True, resolution=(10, 10), metadata={"axes": "TZYX", "unit": "nm"}
    )
    ims = read_image(path)
    assert len(ims) == 6 and ims[4].frame == 4
    np.testing.assert_array_equal(ims[4].data, data[1, 1])
    assert ims[0].pixel_size_A == pytest.approx(1.0)
    assert ims[0].metadata["hyperstack_shape"] == [2, 3]


def test_ome_tiff_physical_size(tmp_path):
    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(
        path,
        STACK[0],
        metadata={"axes": "YX", "PhysicalSizeX": 0.018, "PhysicalSizeXUnit": "nm",
                  "PhysicalSizeY": 0.018, "PhysicalSizeYUnit": "nm"},
    )  # fmt: skip
    (im,) = read_image(path)
    assert im.pixel_size_A == pytest.approx(0.18)
    assert im.metadata["calibration"] == "ome"


def test_fei_tags_in_an_lzw_tiff(tmp_path):
    ini = "[Scan]\r\nPixelWidth=9.5e-012\r\nPixelHeight=9.5e-012\r\n"
    path = tmp_path / "velox export.tif"
    img = (STACK[2] * 255).astype(np.uint8)
    tifffile.imwrite(path, img, compression="lzw", extratags=[(34682, "s", 0, ini, True)])
    (im,) = read_image(path)
    assert im.pixel_size_A == pytest.approx(0.095) and im.pixel_size_source == "metadata"


# ------------------------------------------------ the file's calibration against the FFT


def test_file_calibration_checked_against_the_fft(tmp_path, caplog):
    img, *_ = render_haadf("WSe2", 0.17, (320, 320), 21.0, dose=8.0)
    good, bad = tmp_path / "good.tif", tmp_path / "bad.tif"
    for path, nm in ((good, 0.017), (bad, 0.019)):  # the second is 11.8 % off
        res = 1 / nm
        tifffile.imwrite(path, img, imagej=True, resolution=(res, res), metadata={"unit": "nm"})
    (im,) = read_image(good, material="WSe2")
    assert im.pixel_size_source == "metadata" and "calibration_warning" not in im.metadata
    assert abs(im.metadata["fft_mismatch"]) < 0.01 and im.lattice is not None
    with caplog.at_level("WARNING"):
        (im,) = read_image(bad, material="WSe2")
    assert im.pixel_size_A == pytest.approx(0.19) and im.pixel_size_source == "metadata"
    assert "+11" in im.metadata["calibration_warning"] and "using the file" in caplog.text
    (im,) = read_image(bad, material="WSe2", calibrate="fft")
    assert im.pixel_size_source == "fft" and abs(im.pixel_size_A / 0.17 - 1) < 0.005
    (im,) = read_image(bad, material="WSe2", calibrate="file")
    assert im.lattice is None and "fft_mismatch" not in im.metadata
    check_error(bad, "calibrate must be one of", calibrate="maybe")
    check_error(bad, "needs a material", calibrate="fft")


@pytest.mark.slow  # the default suite never reads ../shared/real/
def test_real_wse2_tiffs_read_and_calibrate():
    """The real 8-bit LZW WSe2 exports in ../shared/real/ (developers only; else skipped)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / ".." / "shared" / "real" / "wse2_80kV_adf"
    files = sorted(folder.glob("*.tif"))
    if not files:
        pytest.skip("no ../shared/real/wse2_80kV_adf (development data, not shipped)")
    (im,) = read_image(files[0], material="WSe2")
    assert im.pixel_size_source == "fft" and 0.09 < im.pixel_size_A < 0.1
