"""U-Net (Ronneberger et al. 2015) for per-pixel classification of STEM images.

A plain ``nn.Module``: no training logic, no config objects. Input ``[B, C, H, W]`` of any
size (padded internally to a multiple of ``2**depth`` and cropped back), output logits
``[B, n_classes, H, W]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each followed by normalisation and ReLU.

    Parameters
    ----------
    in_channels, out_channels : int
    norm : {"batch", "group", "none"}
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch"):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with configurable depth and width.

    Parameters
    ----------
    in_channels : int
        Channels of the input image (1 for HAADF).
    n_classes : int
        Output classes (class 0 = background).
    depth : int
        Number of 2× down-sampling steps; the bottleneck sees ``H / 2**depth``.
    width : int
        Channels of the first level, doubled at each level down.
    norm : {"batch", "group", "none"}
        Normalisation after each convolution.
    dropout : float
        Dropout probability at the bottleneck.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        depth: int = 3,
        width: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"width: must be >= 1, got {width}")
        if n_classes < 2:
            raise ValueError(f"n_classes: must be >= 2, got {n_classes}")
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm: expected batch, group or none, got {norm!r}")
        self.depth = depth
        chans = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for c in chans[:-1]:
            self.down.append(ConvBlock(c_in, c, norm))
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(chans[-2], chans[-1], norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(chans[level + 1], chans[level], 2, stride=2))
            self.up_blocks.append(ConvBlock(2 * chans[level], chans[level], norm))
        self.head = nn.Conv2d(chans[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n_classes, H, W]`` of a batch ``[B, in_channels, H, W]``."""
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]


@torch.no_grad()
def fused_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with every batch normalisation that directly
    follows a convolution folded into that convolution's weights and bias.

    In eval mode a batch norm is a per-channel affine map with its running statistics, so
    ``BN(conv(x)) = conv'(x)`` exactly up to float rounding (~1e-6 relative); the copy does
    one pass less over every activation. ``model`` itself is not changed (it may still be
    trained); a model in training mode comes back as an unfused copy in eval mode.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        In eval mode.
    """
    import copy

    fused = copy.deepcopy(model).eval()
    if model.training:
        return fused
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, conv), (b, norm) in zip(children, children[1:], strict=False):
            if not (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and norm.track_running_stats
                and norm.running_var is not None
            ):
                continue
            gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
            beta = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
            scale = gamma / torch.sqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            new = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                padding_mode=conv.padding_mode,
            ).to(device=conv.weight.device, dtype=conv.weight.dtype)  # fmt: skip
            new.weight.copy_(conv.weight * scale[:, None, None, None])
            new.bias.copy_((bias - norm.running_mean) * scale + beta)
            setattr(module, a, new.eval())
            setattr(module, b, nn.Identity())
    return fused
