"""Stage 2: scan distortion (drift, jitter) of the image, and the labels moved with it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from simgen.acquisition.base import (
    CLIP_SIGMA,
    SPLINE_GUARD_PX,
    check_image,
    check_pixel_size,
    check_shape,
    clipped_normal,
    frame_time_s,
    nonneg_param,
    param_value,
    pixel_times_s,
    smooth_path,
)
from simgen.acquisition.config import (
    as_config,
)
from simgen.backend import get_array_module, to_numpy
from simgen.distributions import as_rng


# ---------------------------------------------------------------------------------------
# stage 2: scan distortion
# ---------------------------------------------------------------------------------------
def _scan_components(out_shape, params: Mapping[str, float], rng):
    """Smooth (drift) and jitter parts of the probe displacement [Å]: (sx, sy, jx, jy)."""
    h, w = check_shape(out_shape)
    dwell = param_value(params, "scan_dwell_time_us")
    fly = nonneg_param(params, "scan_flyback_time_us")
    if not dwell > 0:
        raise ValueError(f"params: scan_dwell_time_us must be > 0, got {dwell}")
    vx, vy = param_value(params, "drift_vx_A_per_s"), param_value(params, "drift_vy_A_per_s")
    nl_amp = nonneg_param(params, "drift_nonlinear_A")
    nl_tau = param_value(params, "drift_nonlinear_time_s")
    lx, ly = nonneg_param(params, "jitter_line_x_A"), nonneg_param(params, "jitter_line_y_A")
    jp = nonneg_param(params, "jitter_pixel_A")
    if nl_amp > 0 and not nl_tau > 0:
        raise ValueError(f"params: drift_nonlinear_time_s must be > 0, got {nl_tau}")

    r_nl, r_line, r_pix = as_rng(rng).spawn(3)
    t = pixel_times_s((h, w), dwell, fly)
    tc = t - t[-1, -1] / 2.0
    sx = vx * tc
    sy = vy * tc
    if nl_amp > 0:
        path = smooth_path(t, nl_tau, 2, r_nl)
        sx += nl_amp * path[0]
        sy += nl_amp * path[1]
    jx = np.zeros((h, w))
    jy = np.zeros((h, w))
    if lx > 0 or ly > 0:
        lines = clipped_normal(r_line, (2, h))
        jx += lx * lines[0][:, None]
        jy += ly * lines[1][:, None]
    if jp > 0:
        pix = clipped_normal(r_pix, (2, h, w))
        jx += jp * pix[0]
        jy += jp * pix[1]
    return sx, sy, jx, jy


def scan_displacement(
    out_shape, params: Mapping[str, float], *, pixel_size_A: float, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Displacement of the probe from the nominal raster at every recorded pixel.

    ``d(r, c) = v·(t − T/2) + A·n(t) + line(r) + pixel(r, c)`` with ``t = t(r, c)`` from
    :func:`pixel_times_s`, ``T`` the frame time, ``n`` a unit-variance smooth random path
    (autocorrelation ``exp(−Δt²/4τ²)``), ``line`` per-line offsets and ``pixel`` per-pixel
    offsets. The x and y components of every random term are drawn independently (abTEM
    1.0's seeded scan noise draws the same for both). Every Gaussian term is clipped at
    ±4σ.

    Parameters
    ----------
    out_shape : (int, int)
        Recorded image shape ``(H, W)``.
    params : mapping
        Needs ``scan_dwell_time_us, scan_flyback_time_us, drift_vx_A_per_s,
        drift_vy_A_per_s, drift_nonlinear_A, drift_nonlinear_time_s, jitter_line_x_A,
        jitter_line_y_A, jitter_pixel_A``.
    pixel_size_A : float
        Pixel size [Å] (only validated here; the result is in Å).
    rng : Generator, int or SeedSequence
        Three children are spawned: non-linear path, line jitter, pixel jitter.

    Returns
    -------
    dx_A, dy_A : ndarray of float64, shape (H, W)
        Probe displacement along x (columns) and y (rows) [Å].
    """
    check_pixel_size(pixel_size_A)
    sx, sy, jx, jy = _scan_components(out_shape, params, rng)
    return sx + jx, sy + jy


def _max_shift_A(values: Mapping[str, float], shape) -> float:
    """Bound of |displacement| [Å] for the given (largest) parameter values."""
    t_frame = frame_time_s(shape, values["scan_dwell_time_us"], values["scan_flyback_time_us"])
    common = CLIP_SIGMA * (values["drift_nonlinear_A"] + values["jitter_pixel_A"])
    bx = abs(values["drift_vx_A_per_s"]) * t_frame / 2 + CLIP_SIGMA * values["jitter_line_x_A"]
    by = abs(values["drift_vy_A_per_s"]) * t_frame / 2 + CLIP_SIGMA * values["jitter_line_y_A"]
    return max(bx, by) + common


_SCAN_KEYS = (
    "scan_dwell_time_us",
    "scan_flyback_time_us",
    "drift_vx_A_per_s",
    "drift_vy_A_per_s",
    "drift_nonlinear_A",
    "jitter_line_x_A",
    "jitter_line_y_A",
    "jitter_pixel_A",
)


def required_padding_px(config_or_params, shape, pixel_size_A: float) -> int:
    """Padding [px] the ideal image needs on each side for the scan distortion.

    The bound is ``max over x, y of |v|·T/2 + 4·(nonlinear + line jitter + pixel jitter)``
    (every Gaussian term is clipped at 4σ, so this is a guarantee), in pixels, rounded up,
    plus :data:`SPLINE_GUARD_PX` for the cubic spline.

    Parameters
    ----------
    config_or_params : AcquisitionConfig, mapping of config, or mapping of drawn values
        With a config the bound covers every value its distributions can draw (normals are
        clipped at ±4σ); with one sample's values (keys as :data:`DRAWN_PARAM_NAMES`) it is
        that sample's bound.
    shape : (int, int)
        Recorded image shape ``(H, W)``.
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    int
    """
    shape = check_shape(shape, "shape")
    p = check_pixel_size(pixel_size_A)
    if isinstance(config_or_params, Mapping) and "scan_dwell_time_us" in config_or_params:
        values = {k: param_value(config_or_params, k) for k in _SCAN_KEYS}
    else:
        bounds = as_config(config_or_params).bounds()
        values = {k: max(abs(bounds[k][0]), abs(bounds[k][1])) for k in _SCAN_KEYS}
    return int(math.ceil(_max_shift_A(values, shape) / p - 1e-9)) + SPLINE_GUARD_PX


@dataclass(frozen=True)
class ScanMapping:
    """The probe path of one recorded frame: recorded pixel → position in the ideal image.

    Recorded pixel (r, c) sampled the ideal image at row ``r + pad + dy_px[r, c]`` and
    column ``c + pad + dx_px[r, c]``, where the displacement is the sum of a smooth part
    (linear and non-linear drift, continuous in time) and a jitter part (per-line and
    per-pixel offsets, discontinuous between lines).

    Attributes
    ----------
    smooth_dx_px, smooth_dy_px : ndarray of float64, shape (H, W)
        Drift part of the probe displacement along x (columns) and y (rows) [px], host.
    jitter_dx_px, jitter_dy_px : ndarray of float64, shape (H, W)
        Jitter part [px], host.
    pad : int
        Padding of the ideal image on each side [px].
    pixel_size_A : float
        Pixel size [Å].
    label_sigma_A : float
        Width [Å] of the Gaussian column used by :func:`map_positions`.
    """

    smooth_dx_px: np.ndarray
    smooth_dy_px: np.ndarray
    jitter_dx_px: np.ndarray
    jitter_dy_px: np.ndarray
    pad: int
    pixel_size_A: float
    label_sigma_A: float = 0.5

    @cached_property
    def dx_px(self) -> np.ndarray:
        """Total displacement along x [px]."""
        return self.smooth_dx_px + self.jitter_dx_px

    @cached_property
    def dy_px(self) -> np.ndarray:
        """Total displacement along y [px]."""
        return self.smooth_dy_px + self.jitter_dy_px

    @property
    def out_shape(self) -> tuple[int, int]:
        return tuple(self.smooth_dx_px.shape)

    @property
    def has_jitter(self) -> bool:
        return bool(self.jitter_dx_px.any() or self.jitter_dy_px.any())

    def max_shift_px(self) -> float:
        """Largest probe displacement from the raster [px]."""
        return self._max_shift_px

    @cached_property
    def _max_shift_px(self) -> float:  # asked twice per sample; two full-frame passes
        dx, dy = self.dx_px, self.dy_px
        return float(max(dx.max(), -dx.min(), dy.max(), -dy.min()))


def distort_scan(
    ideal,
    out_shape,
    pad: int,
    params: Mapping[str, float],
    *,
    pixel_size_A: float,
    rng,
    label_sigma_A: float = 0.5,
):
    """Record the ideal image along the distorted probe path.

    Recorded pixel (r, c) is the ideal image interpolated (cubic spline, as
    ``map_coordinates`` order 3: :func:`~simgen.acquisition.interpolate.sample_cubic`) at
    the probe's true position, the raster position plus
    :func:`scan_displacement`. The ideal image must extend ``pad`` pixels beyond the
    recorded field on each side, and ``pad`` must exceed the largest displacement by 2 px,
    so nothing wraps or is extrapolated (:func:`required_padding_px` adds a wider margin).

    Parameters
    ----------
    ideal : ndarray (NumPy or CuPy), shape (H + 2·pad, W + 2·pad)
        Ideal image; its pixel (i, j) is the probe position (x0 + (j − pad)·p,
        y0 + (i − pad)·p).
    out_shape : (int, int)
        Recorded image shape ``(H, W)``.
    pad : int
        Padding of ``ideal`` on each side [px].
    params : mapping
        Drawn values (see :func:`scan_displacement`).
    pixel_size_A : float
        Pixel size [Å] of both images.
    rng : Generator, int or SeedSequence
    label_sigma_A : float
        Stored in the mapping for :func:`map_positions` [Å].

    Returns
    -------
    recorded : ndarray, shape (H, W), float64, on the device of ``ideal``
    mapping : ScanMapping

    Raises
    ------
    ValueError
        If shapes disagree or ``pad`` is too small for this sample's displacement.
    """
    check_image(ideal, "ideal")
    h, w = check_shape(out_shape)
    p = check_pixel_size(pixel_size_A)
    if isinstance(pad, bool) or not isinstance(pad, int | np.integer) or pad < 0:
        raise ValueError(f"pad: expected an integer >= 0, got {pad!r}")
    pad = int(pad)
    if tuple(ideal.shape) != (h + 2 * pad, w + 2 * pad):
        raise ValueError(
            f"ideal: shape {tuple(ideal.shape)} != out_shape + 2·pad = {(h + 2 * pad, w + 2 * pad)}"
        )
    if not label_sigma_A > 0:
        raise ValueError(f"label_sigma_A: must be > 0 Å, got {label_sigma_A!r}")
    xp = get_array_module(ideal)
    sx, sy, jx, jy = _scan_components((h, w), params, rng)
    mapping = ScanMapping(sx / p, sy / p, jx / p, jy / p, pad, p, float(label_sigma_A))
    shift = mapping.max_shift_px()
    if shift == 0.0:
        recorded = xp.asarray(ideal[pad : pad + h, pad : pad + w], dtype=xp.float64).copy()
        return recorded, mapping
    if shift > pad - 2:
        need = int(math.ceil(shift)) + SPLINE_GUARD_PX
        raise ValueError(
            f"pad: {pad} px is too small for this sample's scan displacement of {shift:.2f} px "
            f"(use required_padding_px; at least {need} px recommended)"
        )
    from simgen.acquisition.interpolate import sample_cubic

    rows = np.add(np.arange(h, dtype=np.float64)[:, None] + pad, mapping.dy_px)
    cols = np.add(np.arange(w, dtype=np.float64)[None, :] + pad, mapping.dx_px)
    recorded = sample_cubic(ideal, xp.asarray(rows), xp.asarray(cols))
    return recorded, mapping


def _bilinear_cell(field: np.ndarray, r: np.ndarray, c: np.ndarray):
    """The corner values of the cell holding each (r, c) (edge cells beyond the grid) and
    the position within it: ``(f00, f01, f10, f11, fr, fc)``."""
    h, w = field.shape
    r0 = np.clip(np.floor(r).astype(np.intp), 0, max(h - 2, 0))
    c0 = np.clip(np.floor(c).astype(np.intp), 0, max(w - 2, 0))
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    fr = r - r0 if h > 1 else np.zeros_like(r)
    fc = c - c0 if w > 1 else np.zeros_like(c)
    return field[r0, c0], field[r0, c1], field[r1, c0], field[r1, c1], fr, fc


def bilinear(field: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``field`` at (r, c), extrapolated linearly from the edge
    cells beyond the grid."""
    f00, f01, f10, f11, fr, fc = _bilinear_cell(field, r, c)
    top = f00 * (1 - fc) + f01 * fc
    bot = f10 * (1 - fc) + f11 * fc
    return top * (1 - fr) + bot * fr


def bilinear_gradient(field: np.ndarray, r: np.ndarray, c: np.ndarray):
    """Derivatives ``(∂/∂r, ∂/∂c)`` of :func:`bilinear`'s interpolant at (r, c) (the edge
    cells' beyond the grid)."""
    h, w = field.shape
    f00, f01, f10, f11, fr, fc = _bilinear_cell(field, r, c)
    d_r = (f10 - f00) * (1 - fc) + (f11 - f01) * fc if h > 1 else np.zeros_like(r)
    d_c = (f01 - f00) * (1 - fr) + (f11 - f10) * fr if w > 1 else np.zeros_like(c)
    return d_r, d_c


def map_positions(rows_ideal, cols_ideal, mapping: ScanMapping, *, chunk: int = 128):
    """Where columns of the ideal image appear in the recorded image.

    The probe path is ``p(r, c) = (r, c) + pad + s(r, c) + j(r, c)`` with ``s`` the smooth
    drift part and ``j`` the jitter part of the displacement (:class:`ScanMapping`).

    1. *Drift only*: the label is the exact solution of ``(r, c) + pad + s(r, c) = q``
       for the column at ideal-image position ``q``, found by fixed-point iteration
       ``(r, c) ← q − pad − s(r, c)`` on the bilinearly interpolated field (it contracts
       by ``|∇s|``, ≪ 1 for any realistic drift; until a step moves no label by 1e-7 px,
       at most 10 iterations). This is where the
       column's centre is sampled, i.e. the maximum of its distorted image.
    2. *With jitter* the map is discontinuous between lines (and between pixels): a column
       appears on several lines at slightly different x, and no single point maps to q.
       The label is then the intensity-weighted centre of a Gaussian column of width
       ``σ = mapping.label_sigma_A`` seen through the path,
       ``Σ w·(r, c) / Σ w`` with ``w = exp(−|p(r, c) − q|² / 2σ²)`` over the recorded pixels
       within ``4σ + max|j|``, where the drift part is replaced by its first-order Taylor
       expansion about the solution of step 1. The centre is thus the average over the
       lines that cross the column, weighted by how much of the column each line sees —
       what a peak finder (after smoothing over about a line) or a network sees — and it
       reduces to step 1 exactly when the jitter is zero. Windows reaching beyond the
       frame use the edge lines' jitter, so labels near the edges are not pulled inwards.

    Parameters
    ----------
    rows_ideal, cols_ideal : array_like of float, shape (N,)
        Column positions in ideal-image pixels (sub-pixel; row = y, col = x).
    mapping : ScanMapping
        From :func:`distort_scan`.
    chunk : int
        Columns processed at once in step 2 (memory ~ chunk·(10σ/p)²·8 bytes per array).

    Returns
    -------
    rows, cols : ndarray of float64, shape (N,)
        Positions in recorded-image pixels (NumPy, or CuPy when the inputs are CuPy).
    inside : ndarray of bool, shape (N,)
        The column lies on the recorded field (``−0.5 ≤ row < H − 0.5`` and likewise for
        col, i.e. within the area of the recorded pixels).
    """
    xp = get_array_module(rows_ideal)
    rq = np.asarray(to_numpy(rows_ideal), dtype=np.float64).ravel()
    cq = np.asarray(to_numpy(cols_ideal), dtype=np.float64).ravel()
    if rq.shape != cq.shape:
        raise ValueError(f"cols_ideal: shape {cq.shape} differs from rows_ideal {rq.shape}")
    if not (np.all(np.isfinite(rq)) and np.all(np.isfinite(cq))):
        raise ValueError("rows_ideal: positions must be finite")
    h, w = mapping.out_shape
    sdx, sdy = mapping.smooth_dx_px, mapping.smooth_dy_px
    rn, cn = rq - mapping.pad, cq - mapping.pad
    # 1. exact inverse of the smooth (drift) map
    rows, cols = rn.copy(), cn.copy()
    for _ in range(10):  # stops once converged to 1e-7 px (3-5 steps for real drift)
        new_rows = rn - bilinear(sdy, rows, cols)
        new_cols = cn - bilinear(sdx, new_rows, cols)
        step = max(np.abs(new_rows - rows).max(initial=0), np.abs(new_cols - cols).max(initial=0))
        rows, cols = new_rows, new_cols
        if step < 1e-7:
            break
    if mapping.has_jitter and rows.size:
        rows, cols = _jitter_centroid(rows, cols, rn, cn, mapping, max(int(chunk), 1))
    inside = (rows >= -0.5) & (rows < h - 0.5) & (cols >= -0.5) & (cols < w - 0.5)
    if xp is not np:  # pragma: no cover - GPU only
        return xp.asarray(rows), xp.asarray(cols), xp.asarray(inside)
    return rows, cols, inside


def _jitter_centroid(r0, c0, rn, cn, mapping: ScanMapping, chunk: int, per_line=None):
    """Step 2 of :func:`map_positions`: intensity-weighted centres with jitter.

    ``per_line`` (None: detected) takes the closed-form path for jitter that is constant
    along each line (:func:`_line_jitter_centroid`, for columns at least 1 px wide);
    otherwise the window's pixels are summed."""
    h, w = mapping.out_shape
    sdx, sdy = mapping.smooth_dx_px, mapping.smooth_dy_px
    jdx, jdy = mapping.jitter_dx_px.ravel(), mapping.jitter_dy_px.ravel()
    # Line jitter only (no per-pixel jitter): the jitter is one value per line, so a row
    # lookup replaces the per-pixel gathers (same values, same arithmetic).
    if per_line is None:
        per_line = bool(
            (mapping.jitter_dx_px == mapping.jitter_dx_px[:, :1]).all()
            and (mapping.jitter_dy_px == mapping.jitter_dy_px[:, :1]).all()
        )
    line_dx, line_dy = mapping.jitter_dx_px[:, 0], mapping.jitter_dy_px[:, 0]
    # Jacobian of the smooth part at the drift-only solution (the bilinear field's own)
    gyr, gyc = bilinear_gradient(sdy, r0, c0)
    gxr, gxc = bilinear_gradient(sdx, r0, c0)
    sig = mapping.label_sigma_A / mapping.pixel_size_A
    jmax = float(max(np.abs(jdx).max(), np.abs(jdy).max()))
    half = int(math.ceil(4.0 * sig + jmax))
    offs = np.arange(-half, half + 1)
    if per_line and sig >= 1.0:  # the closed form needs sigma >= 1 px (see there)
        return _line_jitter_centroid(r0, c0, (gyr, gyc, gxr, gxc), line_dx, line_dy, offs, sig, h)
    rows, cols = np.empty_like(r0), np.empty_like(c0)
    for s in range(0, r0.size, chunk):
        sl = slice(s, s + chunk)
        rc, cc0 = r0[sl], c0[sl]
        rr = np.rint(rc).astype(np.intp)[:, None] + offs  # (n, m)
        cc = np.rint(cc0).astype(np.intp)[:, None] + offs
        du = (rr - rc[:, None])[:, :, None]  # row offset from the drift-only solution
        dv = (cc - cc0[:, None])[:, None, :]
        ty = du * (1 + gyr[sl, None, None]) + dv * gyc[sl, None, None]
        tx = du * gxr[sl, None, None] + dv * (1 + gxc[sl, None, None])
        flat = np.clip(rr, 0, h - 1)[:, :, None] * w + np.clip(cc, 0, w - 1)[:, None, :]
        ey = jdy.take(flat)
        ey += ty
        ex = jdx.take(flat)
        ex += tx
        ey *= ey
        ex *= ex
        ey += ex
        ey *= -0.5 / (sig * sig)
        wgt = np.exp(ey, out=ey)
        tot = wgt.sum(axis=(1, 2))
        ok = tot > 1e-12
        safe = np.where(ok, tot, 1.0)
        r_new = np.einsum("nij,ni->n", wgt, rr.astype(np.float64)) / safe
        c_new = np.einsum("nij,nj->n", wgt, cc.astype(np.float64)) / safe
        rows[sl] = np.where(ok, r_new, rc)
        cols[sl] = np.where(ok, c_new, cc0)
    return rows, cols


def _line_jitter_centroid(r0, c0, grads, line_dx, line_dy, offs, sig, h):
    """:func:`_jitter_centroid` for jitter that is constant along each line, in closed
    form along the line.

    On window line ``i`` (row ``rr_i``, ``du = rr_i − r0``) the probe's offset from the
    column is linear in the column offset ``dv = c − c0``: ``ey = a + b·dv``,
    ``ex = c + d·dv`` with ``a = jy(rr_i) + du·(1 + ∂sy/∂r)``, ``b = ∂sy/∂c``,
    ``c = jx(rr_i) + du·∂sx/∂r``, ``d = 1 + ∂sx/∂c``. The Gaussian weight summed over the
    line's pixels is then a Gaussian integral: with ``A = b² + d²``, total
    ``sqrt(2π σ² / A) · exp(−(a d − c b)² / (2 σ² A))`` and centre ``dv = −(a b + c d)/A``.
    For σ ≥ 1 px the sum over integer ``dv`` equals the integral to ~exp(−2π²σ²) (Poisson
    summation; σ = 2.5 px by default: 1e-50), so this equals the pixel sum of the general
    path up to that path's window cut at ``4σ + max|jitter|`` (weights below e⁻⁸); lines
    are still summed one by one (each has its own jitter)."""
    gyr, gyc, gxr, gxc = grads
    rr = np.rint(r0).astype(np.intp)[:, None] + offs  # (n, lines)
    line = np.clip(rr, 0, h - 1)
    du = rr - r0[:, None]
    a = line_dy[line] + du * (1 + gyr)[:, None]
    c = line_dx[line] + du * gxr[:, None]
    b = gyc[:, None]
    d = (1 + gxc)[:, None]
    big_a = b * b + d * d
    wgt = np.exp(-((a * d - c * b) ** 2) / (2.0 * sig * sig * big_a))
    wgt *= np.sqrt(2.0 * math.pi * sig * sig / big_a)
    tot = wgt.sum(axis=1)
    ok = tot > 1e-12
    safe = np.where(ok, tot, 1.0)
    rows = (wgt * rr).sum(axis=1) / safe
    cols = c0 - (wgt * (a * b + c * d) / big_a).sum(axis=1) / safe
    return np.where(ok, rows, r0), np.where(ok, cols, c0)
