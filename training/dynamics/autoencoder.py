"""A small convolutional autoencoder on atom-centred patches of the stack itself.

No labels: the network learns to compress the local image around a site (patch of
2.4 b x 2.4 b sampled on a fixed 16 x 16 grid, so the physical scale does not depend on
the pixel size) into a few latent numbers. A site whose neighbourhood changes between
frames (a vacancy appearing next to it, a dopant arriving) moves in latent space; the
instability score (:mod:`training.dynamics.instability`) uses that motion.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PATCH = 16  #: patch side [samples]
PATCH_EXTENT_BONDS = 2.4  #: patch side [bond lengths]


def extract_patches(image, xy, bond_px: float, scale: float = 1.0) -> np.ndarray:
    """Patches ``(N, 16, 16)`` float32 centred on ``xy`` (bilinear), divided by ``scale``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    step = PATCH_EXTENT_BONDS * bond_px / PATCH
    g = (np.arange(PATCH) - (PATCH - 1) / 2) * step
    gx, gy = np.meshgrid(g, g)
    rows = xy[:, 1, None, None] + gy[None]
    cols = xy[:, 0, None, None] + gx[None]
    vals = ndimage.map_coordinates(
        np.asarray(image, dtype=np.float64), [rows.ravel(), cols.ravel()], order=1, mode="nearest"
    )
    return (vals.reshape(len(xy), PATCH, PATCH) / scale).astype(np.float32)


def _model(latent_dim: int):
    import torch
    from torch import nn

    class AutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 8 x 8
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),  # 4 x 4
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(16 * 16, latent_dim),
            )
            self.decoder = nn.Sequential(
                nn.Linear(latent_dim, 16 * 16),
                nn.ReLU(),
                nn.Unflatten(1, (16, 4, 4)),
                nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1),  # 8 x 8
                nn.ReLU(),
                nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),  # 16 x 16
                nn.ReLU(),
                nn.Conv2d(8, 1, 3, padding=1),
            )

        def forward(self, x):
            z = self.encoder(x)
            return self.decoder(z), z

    torch.manual_seed(0)
    return AutoEncoder()


def train_autoencoder(
    patches, *, latent_dim: int = 8, steps: int = 300, batch: int = 128, rng=0, lr: float = 3e-3
):
    """Train the autoencoder on ``patches`` ``(N, 16, 16)``; returns ``(model, losses)``.

    Deterministic for a given ``rng`` (batches drawn from it; weights seeded)."""
    import torch

    rng = np.random.default_rng(rng)
    x = np.asarray(patches, dtype=np.float32)
    mean, std = float(x.mean()), float(x.std()) + 1e-6
    model = _model(latent_dim)
    model.norm = (mean, std)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.from_numpy((x - mean) / std)[:, None]
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(data), size=min(batch, len(data))))
        xb = data[idx]
        recon, _ = model(xb)
        loss = torch.mean((recon - xb) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return model, np.asarray(losses)


def encode(model, patches, *, batch: int = 4096) -> np.ndarray:
    """Latent vectors ``(N, latent_dim)`` of ``patches``."""
    import torch

    mean, std = model.norm
    x = (np.asarray(patches, dtype=np.float32) - mean) / std
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch):
            out.append(model.encoder(torch.from_numpy(x[s : s + batch])[:, None]).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def stack_latents(
    frames, tracks, scales, *, latent_dim=8, steps=300, n_train=20000, rng=0, progress=None
):
    """Train on patches of the stack and encode every (frame, site) in view.

    Returns
    -------
    latent : ndarray, shape (T, S, latent_dim)
        NaN where the site is out of view.
    losses : ndarray
        Training loss per step.
    """
    rng = np.random.default_rng(rng)
    t_count, n = tracks.in_view.shape
    bond = tracks.bond_px
    pairs = np.argwhere(tracks.in_view)
    pick = pairs[rng.choice(len(pairs), size=min(n_train, len(pairs)), replace=False)]
    train = []
    for f in np.unique(pick[:, 0]):
        sites = pick[pick[:, 0] == f, 1]
        train.append(extract_patches(frames[f], tracks.xy[f, sites], bond, scales[f]))
    model, losses = train_autoencoder(
        np.concatenate(train), latent_dim=latent_dim, steps=steps, rng=rng
    )
    latent = np.full((t_count, n, latent_dim), np.nan, dtype=np.float32)
    for f in range(t_count):
        v = np.flatnonzero(tracks.in_view[f])
        latent[f, v] = encode(model, extract_patches(frames[f], tracks.xy[f, v], bond, scales[f]))
        if progress is not None:
            progress(f)
    return latent, losses
