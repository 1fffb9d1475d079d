"""Fully convolutional networks trained on simgen stores, and column-level evaluation.

Modules: ``config`` (TrainConfig), ``stores`` (read-only store access), ``augment`` and
``data`` (normalisation, augmentation, datasets), ``models`` (U-Net, registry),
``losses``, ``train`` (Trainer, train_model, train_ensemble), ``predict`` (tiled inference,
ensembles), ``metrics`` (columns, matching, scores), ``evaluate``, ``report`` and ``cli``
(``simgen-train``). Importing the package does not import torch. See docs/training.md.
"""
