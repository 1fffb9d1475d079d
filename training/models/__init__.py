"""Fully convolutional networks and a small registry to build them by name.

Each model is a plain ``nn.Module`` taking ``in_channels`` and ``n_classes`` plus its own
keyword arguments; :func:`build_model` looks the class up in :data:`MODELS`. Add another
network with ``@register_model("name")`` on its class.
"""

from __future__ import annotations

from torch import nn

from training.models.unet import UNet, fused_for_inference

MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str):
    """Class decorator adding a model to :data:`MODELS` under ``name``."""

    def deco(cls):
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = cls
        return cls

    return deco


register_model("unet")(UNet)


def build_model(name: str, **cfg) -> nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name : str
        Key of :data:`MODELS` (e.g. ``"unet"``).
    **cfg
        Keyword arguments of the model class (``in_channels``, ``n_classes``, ...).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    ValueError
        For an unknown name or an argument the model does not take.
    """
    if name not in MODELS:
        raise ValueError(f"model: unknown name {name!r}; available: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](**cfg)
    except TypeError as err:
        raise ValueError(f"model {name!r}: {err}") from None


__all__ = ["MODELS", "UNet", "build_model", "fused_for_inference", "register_model"]
