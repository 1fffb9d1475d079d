"""Segmentation losses: class-weighted cross-entropy plus soft Dice."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simgen.labels import UNLABELLED as IGNORE_LABEL  # no loss on unlabelled pixels


def class_weights_from_frequencies(
    counts, power: float = 0.5, max_weight: float = 20.0
) -> np.ndarray:
    """Cross-entropy class weights from pixel counts: ``w_c ∝ f_c^-power``.

    The weights are scaled so that the frequency-weighted mean weight is 1 (the loss keeps
    the scale of unweighted cross-entropy), then capped at ``max_weight``. Classes absent
    from the counts get weight ``max_weight`` — they carry no cross-entropy term in training
    anyway, so the value only matters if they appear later.

    Parameters
    ----------
    counts : array_like of int, shape (n_classes,)
        Pixels of each class.
    power : float
        0 gives equal weights, 0.5 inverse square root, 1 inverse frequency.
    max_weight : float
        Upper bound of a weight.

    Returns
    -------
    ndarray of float64, shape (n_classes,)
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"counts: expected non-negative pixel counts per class, got {counts}")
    freq = counts / counts.sum()
    present = freq > 0
    w = np.full(freq.shape, float(max_weight))
    w[present] = freq[present] ** -power
    w[present] /= np.sum(freq[present] * w[present])
    return np.minimum(w, max_weight)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0):
    """Multi-class soft Dice loss ``1 − mean_c (2|P∩G| + s) / (|P| + |G| + s)``.

    Sums run over the whole batch; every class (background included) counts equally, and
    a class absent from both prediction and target scores 1.

    Parameters
    ----------
    logits : Tensor, shape (B, K, H, W)
    target : Tensor of int64, shape (B, H, W)
    smooth : float
        Additive smoothing ``s``.

    Returns
    -------
    Tensor
        Scalar loss in [0, 1].
    """
    k = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    valid = target != IGNORE_LABEL
    onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).to(probs.dtype)
    if not bool(valid.all()):  # unlabelled pixels count for no class
        keep = valid.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * keep, onehot * keep
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + smooth) / (total + smooth)).mean()


class SegmentationLoss(nn.Module):
    """``CE(weights) + dice_weight · Dice`` on logits and integer masks.

    Parameters
    ----------
    class_weights : array_like of float, optional
        Cross-entropy weight per class; ``None`` for unweighted.
    dice_weight : float
        Weight of :func:`soft_dice_loss` (0 = cross-entropy only).
    """

    def __init__(self, class_weights=None, dice_weight: float = 1.0):
        super().__init__()
        w = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", w)
        self.dice_weight = float(dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss (computed in float32 even under autocast)."""
        logits = logits.float()
        if self.class_weights is not None and self.class_weights.numel() != logits.shape[1]:
            raise ValueError(
                f"class_weights: {self.class_weights.numel()} weights for {logits.shape[1]} classes"
            )
        if bool((target == IGNORE_LABEL).all()):  # nothing labelled: no gradient, no NaN
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=IGNORE_LABEL)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target)
        return loss
