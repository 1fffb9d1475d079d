"""Fully convolutional networks trained on simgen stores, and column-level evaluation.

Modules: ``config`` (TrainConfig), ``stores`` (read-only store access), ``augment`` and
``data`` (normalisation, augmentation, datasets), ``models`` (U-Net, registry),
``losses``, ``train`` (Trainer, train_model, train_ensemble), ``predict`` (tiled inference,
ensembles), ``metrics`` (columns, matching, scores), ``evaluate``, ``report`` and ``cli``
(``simgen-train``); ``experiments`` analyses microscope images. ``training.label(image,
model, ...)`` labels one image from a notebook. Importing the package does not import
torch. See docs/training.md and docs/api.md.
"""

__all__ = ["label"]


def __getattr__(name: str):
    """``training.label`` (imported on first use, so ``import training`` stays cheap)."""
    if name == "label":
        from training.experiments.label import label

        return label
    raise AttributeError(f"module 'training' has no attribute {name!r}")
