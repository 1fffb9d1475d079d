"""The compiled peak scatter equals the bincount it replaces, bit for bit."""

from __future__ import annotations

import math

import numpy as np

from simgen.rasterize import PeakPatches


def _patches(n=300, half=5, grid=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, grid[1], n)
    v = rng.uniform(0, grid[0], n)
    s = rng.uniform(0.8, 1.6, n)
    iu, iv = np.floor(u), np.floor(v)
    d = np.arange(-half, half + 1, dtype=np.float64)
    gx = np.exp(-0.5 * ((d[None, :] - (u - iu)[:, None]) / s[:, None]) ** 2)
    gy = np.exp(-0.5 * ((d[None, :] - (v - iv)[:, None]) / s[:, None]) ** 2)
    return iu, iv, gx, gy, 2.0 * math.pi * s * s, rng.uniform(0.1, 2.0, n)


def _bincount(iu, iv, gx, gy, norm, weights, grid, subset=None):
    ny, nx = grid
    half = (gx.shape[1] - 1) // 2
    di = np.arange(-half, half + 1)
    rows = (iv.astype(np.int64)[:, None] + di) % ny
    cols = (iu.astype(np.int64)[:, None] + di) % nx
    flat = rows[:, :, None] * nx + cols[:, None, :]
    shape = gy[:, :, None] * gx[:, None, :] / norm[:, None, None]
    vals = weights[:, None, None] * shape
    if subset is not None:
        flat, vals = flat[subset], vals[subset]
    return np.bincount(flat.ravel(), weights=vals.ravel(), minlength=ny * nx).reshape(ny, nx)


def test_the_scatter_is_the_bincount_bit_for_bit_and_wraps_periodically():
    grid = (64, 80)
    iu, iv, gx, gy, norm, w = _patches(grid=grid)
    patches = PeakPatches(iu, iv, gx, gy, norm, grid)
    dens = patches.density(w)
    np.testing.assert_array_equal(dens, _bincount(iu, iv, gx, gy, norm, w, grid))
    subset = np.array([3, 17, 250])
    np.testing.assert_array_equal(
        patches.density(w, subset=subset), _bincount(iu, iv, gx, gy, norm, w, grid, subset)
    )
    # every patch lands whole on the periodic grid: the total is the weights' sum
    per_peak = gy.sum(axis=1) * gx.sum(axis=1) / norm
    assert math.isclose(dens.sum(), float((w * per_peak).sum()), rel_tol=1e-12)
    # a peak at the corner wraps onto the opposite edges
    corner = PeakPatches(np.zeros(1), np.zeros(1), gx[:1], gy[:1], norm[:1], grid)
    d = corner.density(np.ones(1))
    assert d[0, 0] > 0 and d[-1, -1] > 0 and d[-1, 0] > 0 and d[grid[0] // 2, grid[1] // 2] == 0
