"""Peaks and disks onto grids: the density the incoherent model convolves with the probe
(:class:`PeakPatches`) and the class mask's disks (:func:`paint_disks`).

Each peak is a separable patch ``gy[p, a] · gx[p, b] / norm[p]`` of ``(2h + 1)²`` pixels
around its pixel ``(iv[p], iu[p])``, wrapped periodically. :class:`PeakPatches` holds the
patches once; :meth:`PeakPatches.density` adds them up with a weight per peak. On the CPU a
compiled loop (numba) does it without building the ``n × (2h+1)²`` value and index arrays
a ``bincount`` needs; the sums are the same float64 operations in the same order, so both
give the same density bit for bit. On a GPU, CuPy's ``bincount`` does it.
"""

from __future__ import annotations

import numba
import numpy as np

from simgen.backend import get_array_module


class PeakPatches:
    """Patches of ``n`` peaks on a ``(ny, nx)`` periodic grid.

    Parameters
    ----------
    iu, iv : ndarray of float64, shape (n,)
        Grid column and row of each peak's patch centre (whole numbers).
    gx, gy : ndarray of float64, shape (n, 2h + 1)
        The patch's profile along x (columns) and y (rows), offsets ``-h..h``.
    norm : ndarray of float64, shape (n,)
        Each patch is divided by it (``2π s²`` for a unit-integral Gaussian [px²]).
    grid_shape : (int, int)
        ``(ny, nx)``.
    """

    def __init__(self, iu, iv, gx, gy, norm, grid_shape):
        self.xp = get_array_module(gx)
        self.iu, self.iv, self.gx, self.gy, self.norm = iu, iv, gx, gy, norm
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.half = (gx.shape[1] - 1) // 2
        self._flat = self._shape = None

    def density(self, weights, subset=None):
        """``Σ_p w_p · patch_p`` on the grid, float64 ``(ny, nx)``.

        ``subset``: indices of the only peaks with a non-zero weight (the sum is the same,
        bit for bit: adding zeros changes no float sum).
        """
        xp = self.xp
        ny, nx = self.grid_shape
        if xp is np:
            index = np.arange(self.iu.size) if subset is None else np.asarray(subset, np.intp)
            out = np.zeros((ny, nx), dtype=np.float64)
            _scatter(
                out,
                np.ascontiguousarray(self.iu, np.float64),
                np.ascontiguousarray(self.iv, np.float64),
                np.ascontiguousarray(self.gx, np.float64),
                np.ascontiguousarray(self.gy, np.float64),
                np.ascontiguousarray(self.norm, np.float64),
                np.ascontiguousarray(weights, np.float64),
                index,
            )
            return out
        flat, shape = self._patches()  # pragma: no cover - GPU only
        if subset is None:  # pragma: no cover - GPU only
            vals, where = (weights[:, None, None] * shape).ravel(), flat
        else:  # pragma: no cover - GPU only
            vals = (weights[subset, None, None] * shape[subset]).ravel()
            where = flat.reshape(shape.shape[0], -1)[subset].ravel()
        density = xp.bincount(where, weights=vals, minlength=ny * nx)  # pragma: no cover
        return density.reshape(ny, nx)  # pragma: no cover - GPU only

    def _patches(self):  # pragma: no cover - GPU only
        """Values and flat grid indices of every patch pixel (the ``bincount`` form)."""
        if self._flat is None:
            xp = self.xp
            ny, nx = self.grid_shape
            di = xp.arange(-self.half, self.half + 1, dtype=xp.int64)
            cols = (self.iu.astype(xp.int64)[:, None] + di[None, :]) % nx
            rows = (self.iv.astype(xp.int64)[:, None] + di[None, :]) % ny
            self._flat = (rows[:, :, None] * nx + cols[:, None, :]).ravel()
            self._shape = self.gy[:, :, None] * self.gx[:, None, :] / self.norm[:, None, None]
        return self._flat, self._shape


@numba.njit(cache=True, nogil=True)
def _scatter(out, iu, iv, gx, gy, norm, weights, index):  # pragma: no cover - compiled
    # the bincount's arithmetic and order: peak by peak, row by row, column by column,
    # out[r, c] += w · ((gy · gx) / norm)
    ny, nx = out.shape
    m = gx.shape[1]
    half = (m - 1) // 2
    for k in range(index.size):
        p = index[k]
        w = weights[p]
        r0 = int(iv[p]) - half
        c0 = int(iu[p]) - half
        for a in range(m):
            r = (r0 + a) % ny
            ya = gy[p, a]
            for b in range(m):
                c = (c0 + b) % nx
                out[r, c] += w * ((ya * gx[p, b]) / norm[p])


def paint_disks(rows, cols, class_ids, shape, radius_px: float) -> np.ndarray:
    """:func:`simgen.labels.class_mask` on the CPU: each pixel within ``radius_px`` of a
    column takes the class of the nearest one, exact ties the first listed (columns are
    painted in order and only a strictly nearer one takes a pixel over; the distances are
    the same float64 expressions).

    Parameters
    ----------
    rows, cols : ndarray of float64, shape (N,)
    class_ids : ndarray of int64, shape (N,)
    shape : (int, int)
    radius_px : float

    Returns
    -------
    ndarray of uint8, shape ``shape``
    """
    h, w = shape
    mask = np.zeros((h, w), dtype=np.uint8)
    best = np.full((h, w), np.inf)
    _paint(
        mask,
        best,
        np.ascontiguousarray(rows, np.float64),
        np.ascontiguousarray(cols, np.float64),
        np.ascontiguousarray(class_ids, np.int64),
        float(radius_px),
        int(np.ceil(radius_px)),
    )
    return mask


@numba.njit(cache=True, nogil=True)
def _paint(mask, best, rows, cols, ids, radius, half):  # pragma: no cover - compiled
    h, w = mask.shape
    r2 = radius * radius
    for k in range(rows.size):
        r0 = int(np.rint(rows[k])) - half
        c0 = int(np.rint(cols[k])) - half
        for a in range(2 * half + 1):
            rr = r0 + a
            if rr < 0 or rr >= h:
                continue
            dr = (rr - rows[k]) ** 2
            for b in range(2 * half + 1):
                cc = c0 + b
                if cc < 0 or cc >= w:
                    continue
                d2 = dr + (cc - cols[k]) ** 2
                if d2 <= r2 and d2 < best[rr, cc]:
                    best[rr, cc] = d2
                    mask[rr, cc] = ids[k]
