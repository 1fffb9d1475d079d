"""Training and inference speed of the default U-Net on the current device.

``main()`` prints training throughput (samples/s: forward, backward and AdamW step on
batches of 8 random 128² crops, the CPU recipe's batch) and inference throughput
(megapixels/s of whole-image tiled prediction, 256² tiles with 32 px overlap). Synthetic
inputs: no store needed. Not pass/fail.
"""

from __future__ import annotations

import time


def bench_training(
    device=None,
    *,
    steps: int | None = None,
    batch: int = 8,
    crop: int = 128,
    depth: int = 3,
    width: int = 16,
    n_classes: int = 6,
) -> dict:
    """Time optimiser steps of the U-Net on random batches.

    Parameters
    ----------
    device : str or torch.device, optional
        Default: CUDA when available.
    steps : int, optional
        Timed steps (default 10 on CPU, 50 on CUDA), after 2 warm-up steps.
    batch, crop : int
        Batch size and crop side [px].
    depth, width, n_classes : int
        U-Net size.

    Returns
    -------
    dict
        ``device``, ``samples_per_s``, ``seconds_per_step``.
    """
    import torch

    from training.losses import SegmentationLoss
    from training.models import build_model
    from training.train import Trainer, resolve_device

    dev = resolve_device(device)
    steps = steps or (50 if dev.type == "cuda" else 10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, crop, crop, generator=g)
    y = torch.randint(0, n_classes, (batch, crop, crop), generator=g)
    loader = [{"image": x, "mask": y}] * (steps + 2)
    model = build_model("unet", n_classes=n_classes, depth=depth, width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model, opt, SegmentationLoss(), loader[:2], device=dev, amp=True)
    trainer.train_epoch()  # warm-up (allocations, cuDNN autotuning)
    trainer.train_loader = loader[2:]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    trainer.train_epoch()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    return {"device": str(dev), "samples_per_s": steps * batch / dt, "seconds_per_step": dt / steps}


def bench_inference(
    device=None,
    *,
    size: int | None = None,
    tile: int = 256,
    overlap: int = 32,
    depth: int = 3,
    width: int = 16,
    n_classes: int = 6,
) -> dict:
    """Time tiled whole-image prediction of one ``size × size`` image.

    Returns
    -------
    dict
        ``device``, ``megapixels_per_s``, ``seconds``, ``size``.
    """
    import numpy as np

    from training.models import build_model
    from training.predict import predict_probabilities
    from training.train import resolve_device

    dev = resolve_device(device)
    size = size or (2048 if dev.type == "cuda" else 512)
    model = build_model("unet", n_classes=n_classes, depth=depth, width=width).to(dev).eval()
    image = np.random.default_rng(0).poisson(10.0, (size, size)).astype(np.float32)
    predict_probabilities(model, image[:tile, :tile], tile=tile, overlap=overlap)  # warm-up
    t0 = time.perf_counter()
    predict_probabilities(
        model, image, tile=tile, overlap=overlap, batch_size=8, amp=dev.type == "cuda"
    )
    dt = time.perf_counter() - t0
    return {
        "device": str(dev),
        "megapixels_per_s": size * size / 1e6 / dt,
        "seconds": dt,
        "size": size,
    }


def main() -> dict:
    """Print training samples/s and inference megapixels/s on the current device."""
    import torch

    tr = bench_training()
    inf = bench_inference()
    threads = torch.get_num_threads()
    print(
        f"training  (U-Net depth 3 width 16, batch 8 × 128², {tr['device']}, "
        f"{threads} CPU threads): {tr['samples_per_s']:.1f} samples/s "
        f"({tr['seconds_per_step']:.3f} s/step)"
    )
    print(
        f"inference ({inf['size']}² image, 256² tiles, {inf['device']}): "
        f"{inf['megapixels_per_s']:.3f} megapixels/s ({inf['seconds']:.2f} s)"
    )
    return {"training": tr, "inference": inf}


if __name__ == "__main__":
    main()
