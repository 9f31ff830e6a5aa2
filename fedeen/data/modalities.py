"""Input modalities by name: how a decoded batch becomes model input and how it is augmented.

A dataset source declares its modality; everything modality-specific (tensor preparation,
augmentation, the model's input front end) is answered here, so adding a modality is one
``register`` call and no other module compares modality names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from fedeen.data.augment import augment_images


@dataclass(frozen=True)
class Modality:
    """``prepare`` turns decoded inputs into model input at ``image_size``; ``augment``
    randomises a training batch (``hflip``: horizontal flips allowed); ``frontend`` names the
    model front end (``models.frontends``) that reads this input."""

    name: str
    prepare: Callable[[Tensor, int], Tensor]
    augment: Callable[[Tensor, bool, torch.Generator], Tensor] | None
    frontend: str


_MODALITIES: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    if modality.name in _MODALITIES:
        raise ValueError(f"modality {modality.name!r} is already registered")
    _MODALITIES[modality.name] = modality
    return modality


def get(name: str) -> Modality:
    try:
        return _MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; valid: {', '.join(sorted(_MODALITIES))}") from None


def prepare_images(x: Tensor, image_size: int) -> Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] at the model's input size."""
    x = x.float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.sub_(0.5).div_(0.5).contiguous()


IMAGE = register(Modality("image", prepare_images, augment_images, frontend=""))
#: fixed-length float waveforms (N, T); the model's log-mel front end makes them images
AUDIO = register(Modality("audio", lambda x, image_size: x, None, frontend="logmel"))
