"""Model families by name (``register`` / ``get`` / ``available``), as in timm and torchvision."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from models.base import BOOST_WEIGHT, EarlyExitNet, SubmodelSpec


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build any submodel of a family; shared by server and clients."""

    num_classes: int
    in_chans: int = 3
    image_size: int = 32
    modality: str = "image"  # "image" or "audio" (waveform input through a log-mel front end)
    sample_rate: int = 16000
    num_exits: int = 4
    cnn_width: int = 16
    cnn_blocks: int = 1
    vit_blocks: int = 12
    vit_dim: int = 192
    vit_heads: int = 3
    vit_patch: int = 4
    vit_mlp_ratio: float = 4.0
    policy: str = "base"  # how exits are trained and read: "base" or "boosted" (BoostNet)
    boost_weight: float = BOOST_WEIGHT


Builder = Callable[[ModelConfig, SubmodelSpec], EarlyExitNet]
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model family {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_BUILDERS)


def get(name: str) -> Builder:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(available())}") from None
