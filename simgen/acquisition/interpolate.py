"""Cubic-spline sampling of an image along a scan path (the inner loop of the scan stage).

:func:`sample_cubic` equals ``scipy.ndimage.map_coordinates(image, [rows, cols], order=3,
mode="nearest")`` to the last digits (the same spline coefficients; the 16 taps are summed
in another order) where every tap lies inside the image. On the CPU the taps are summed by
a small compiled loop (numba, a dependency of abTEM): about 5× faster than SciPy's generic
``geometric_transform``, which computed the weights of every tap through a callback-style
loop. On a GPU, CuPy's ``map_coordinates`` does it.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from simgen.backend import get_array_module, get_scipy_submodule

#: Edge padding before the spline prefilter, as SciPy's ``map_coordinates`` does for
#: ``mode="nearest"`` (the recursive filter's boundary condition then reads the edge
#: values; with the pole ``-0.268`` its influence is 1e-7 after 12 px).
PREFILTER_PAD_PX = 12


#: Pole of the cubic B-spline's recursive prefilter.
CUBIC_POLE = math.sqrt(3.0) - 2.0


def spline_coefficients(image):
    """Cubic B-spline coefficients of ``image`` (float64), edge-padded by
    :data:`PREFILTER_PAD_PX` on each side, as ``map_coordinates`` prefilters (SciPy's
    ``spline_filter(mode="nearest")``; on the CPU a compiled copy of its recursion, equal
    to 1e-14)."""
    xp = get_array_module(image)
    q = PREFILTER_PAD_PX
    if xp is not np:  # pragma: no cover - GPU only
        ndimage = get_scipy_submodule(xp, "ndimage")
        padded = xp.pad(xp.asarray(image, dtype=xp.float64), q, mode="edge")
        return ndimage.spline_filter(padded, 3, output=xp.float64, mode="nearest")
    m, n = image.shape
    coef = np.empty((m + 2 * q, n + 2 * q), dtype=np.float64)
    coef[q : q + m, q : q + n] = image  # edge padding, written in place
    coef[:q, q : q + n] = image[:1]
    coef[q + m :, q : q + n] = image[-1:]
    coef[:, :q] = coef[:, q : q + 1]
    coef[:, q + n :] = coef[:, q + n - 1 : q + n]
    _prefilter_columns(coef, CUBIC_POLE)
    _prefilter_rows(coef, CUBIC_POLE)
    return coef


def sample_cubic(image, rows, cols):
    """The image's cubic spline at fractional positions (row = y, col = x) [px].

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), shape (M, N)
        The image; converted to float64.
    rows, cols : ndarray, shape (H, W)
        Positions in ``image``'s pixels, every one at least 1 px inside its edges (the
        caller guarantees it: the scan stage's padding).

    Returns
    -------
    ndarray of float64, shape (H, W), on the device of ``image``

    Raises
    ------
    ValueError
        If a position lies within 1 px of the edge or outside, or the shapes differ.
    """
    xp = get_array_module(image)
    if image.ndim != 2:
        raise ValueError(f"image: expected a 2-D array, got shape {tuple(image.shape)}")
    if rows.shape != cols.shape:
        raise ValueError(f"cols: shape {tuple(cols.shape)} differs from rows {rows.shape}")
    m, n = image.shape
    lo_r, hi_r = float(rows.min()), float(rows.max())
    lo_c, hi_c = float(cols.min()), float(cols.max())
    if not (lo_r >= 1 and hi_r <= m - 2 and lo_c >= 1 and hi_c <= n - 2):
        raise ValueError(
            f"rows/cols: positions must lie 1 px inside the {m}x{n} image, got rows "
            f"{lo_r:.2f}..{hi_r:.2f}, cols {lo_c:.2f}..{hi_c:.2f}"
        )
    if xp is not np:  # pragma: no cover - GPU only
        ndimage = get_scipy_submodule(xp, "ndimage")
        coords = xp.stack([xp.asarray(rows, dtype=xp.float64), xp.asarray(cols, dtype=xp.float64)])
        return ndimage.map_coordinates(
            xp.asarray(image, dtype=xp.float64), coords, order=3, mode="nearest"
        )
    coef = spline_coefficients(image)
    out = np.empty(rows.shape, dtype=np.float64)
    _cubic_taps(
        coef,
        np.ascontiguousarray(rows, dtype=np.float64),
        np.ascontiguousarray(cols, dtype=np.float64),
        float(PREFILTER_PAD_PX),
        out,
    )
    return out


#: The tap loop, compiled on first use (numba caches it on disk).
@numba.njit(cache=True, nogil=True)
def _cubic_taps(coef, rows, cols, offset, out):  # pragma: no cover - compiled
    h, w = rows.shape
    for i in range(h):
        for j in range(w):
            y = rows[i, j] + offset
            x = cols[i, j] + offset
            iy = int(np.floor(y))
            ix = int(np.floor(x))
            fy = y - iy
            fx = x - ix
            # cubic B-spline weights of taps -1, 0, +1, +2 (they sum to 1)
            gy = 1.0 - fy
            wy0 = gy * gy * gy / 6.0
            wy3 = fy * fy * fy / 6.0
            wy1 = 2.0 / 3.0 - fy * fy * (1.0 - 0.5 * fy)
            wy2 = 1.0 - wy0 - wy1 - wy3
            gx = 1.0 - fx
            wx0 = gx * gx * gx / 6.0
            wx3 = fx * fx * fx / 6.0
            wx1 = 2.0 / 3.0 - fx * fx * (1.0 - 0.5 * fx)
            wx2 = 1.0 - wx0 - wx1 - wx3
            acc = 0.0
            for a in range(4):
                r = iy - 1 + a
                row = (
                    coef[r, ix - 1] * wx0
                    + coef[r, ix] * wx1
                    + coef[r, ix + 1] * wx2
                    + coef[r, ix + 2] * wx3
                )
                if a == 0:
                    acc += wy0 * row
                elif a == 1:
                    acc += wy1 * row
                elif a == 2:
                    acc += wy2 * row
                else:
                    acc += wy3 * row
            out[i, j] = acc


# The prefilter: gain 6, then per line a causal and an anti-causal first-order recursion
# with SciPy's initial values for mode "nearest" (a reflected line; Unser 1999).
@numba.njit(cache=True, nogil=True)
def _prefilter_rows(c, z):  # pragma: no cover - compiled
    n = c.shape[1]
    zn = z**n
    for r in range(c.shape[0]):
        row = c[r]
        for i in range(n):
            row[i] *= 6.0
        first = row[0]
        acc = row[0] + zn * row[n - 1]
        zi = z
        for i in range(1, n):
            if abs(zi) < 1e-20:  # the rest adds nothing at float64 precision
                break
            acc += zi * (row[i] + zn * row[n - 1 - i])
            zi *= z
        row[0] = acc * z / (1.0 - zn * zn) + first
        for i in range(1, n):
            row[i] += z * row[i - 1]
        row[n - 1] *= z / (z - 1.0)
        for i in range(n - 2, -1, -1):
            row[i] = z * (row[i + 1] - row[i])


@numba.njit(cache=True, nogil=True)
def _prefilter_columns(c, z):  # pragma: no cover - compiled
    # the same recursion along axis 0, every column at once (row-major memory order)
    n, m = c.shape
    zn = z**n
    for i in range(n):
        for j in range(m):
            c[i, j] *= 6.0
    acc = np.empty(m)
    for j in range(m):
        acc[j] = c[0, j] + zn * c[n - 1, j]
    zi = z
    for i in range(1, n):
        if abs(zi) < 1e-20:
            break
        for j in range(m):
            acc[j] += zi * (c[i, j] + zn * c[n - 1 - i, j])
        zi *= z
    for j in range(m):
        c[0, j] = acc[j] * z / (1.0 - zn * zn) + c[0, j]
    for i in range(1, n):
        for j in range(m):
            c[i, j] += z * c[i - 1, j]
    for j in range(m):
        c[n - 1, j] *= z / (z - 1.0)
    for i in range(n - 2, -1, -1):
        for j in range(m):
            c[i, j] = z * (c[i + 1, j] - c[i, j])


def interp_paths(times, grid, paths):
    """``np.interp(times, grid, path)`` for every row of ``paths`` at once, bit for bit
    (the same bracketing interval and slope formula), for an increasing ``grid`` that
    brackets every time.

    Parameters
    ----------
    times : ndarray of float64
        Query points (any shape), within ``[grid[0], grid[-1]]``.
    grid : ndarray of float64, shape (n,)
        Increasing sample points, evenly spaced (the search starts from that guess).
    paths : ndarray of float64, shape (k, n)

    Returns
    -------
    ndarray of float64, shape (k, *times.shape)
    """
    t = np.ascontiguousarray(times, dtype=np.float64).ravel()
    grid = np.ascontiguousarray(grid, dtype=np.float64)
    paths = np.ascontiguousarray(paths, dtype=np.float64)
    if t.size and (t.min() < grid[0] or t.max() > grid[-1]):
        raise ValueError("times: outside the grid")
    out = np.empty((paths.shape[0], t.size), dtype=np.float64)
    _interp_rows(t, grid, paths, out)
    return out.reshape(paths.shape[0], *np.shape(times))


@numba.njit(cache=True, nogil=True)
def _interp_rows(t, grid, paths, out):  # pragma: no cover - compiled
    n = grid.size
    k = paths.shape[0]
    step = (grid[n - 1] - grid[0]) / (n - 1)
    slopes = np.empty((k, n - 1))
    for r in range(k):
        for j in range(n - 1):
            slopes[r, j] = (paths[r, j + 1] - paths[r, j]) / (grid[j + 1] - grid[j])
    for i in range(t.size):
        x = t[i]
        if x == grid[n - 1]:  # np.interp returns the last value there
            for r in range(k):
                out[r, i] = paths[r, n - 1]
            continue
        j = min(max(int((x - grid[0]) / step), 0), n - 2)
        while j > 0 and grid[j] > x:
            j -= 1
        while j < n - 2 and grid[j + 1] <= x:
            j += 1
        for r in range(k):
            out[r, i] = slopes[r, j] * (x - grid[j]) + paths[r, j]
