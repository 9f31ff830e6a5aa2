"""Model families by name (``register`` / ``get`` / ``available``), as in timm and torchvision.

A family is registered with its builder and the ``Options`` group of its backbone (shared by
variants: ``vit`` and ``vit-ree`` both read ``ViTOptions``), so the run config knows every
backbone's keys from this registry alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from models.base import BOOST_WEIGHT, EarlyExitNet, SubmodelSpec
from models.options import Options


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build any submodel of a family; shared by server and clients.

    ``frontend`` names the input front end (``models.frontends``): "" feeds images of
    ``in_chans`` channels straight to the backbone; "logmel" turns ``sample_rate``-Hz
    waveforms into one-channel log-mel images. ``backbone`` is the family's options group
    (its defaults when None).
    """

    num_classes: int
    in_chans: int = 3
    image_size: int = 32
    frontend: str = ""
    sample_rate: int = 16000
    num_exits: int = 4
    policy: str = "base"  # how exits are trained and read: "base" or "boosted" (BoostNet)
    boost_weight: float = BOOST_WEIGHT
    backbone: Options | None = field(default=None)


Builder = Callable[[ModelConfig, SubmodelSpec], EarlyExitNet]


@dataclass(frozen=True)
class Family:
    builder: Builder
    options: type[Options]


_FAMILIES: dict[str, Family] = {}


def register(name: str, options: type[Options]) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        _FAMILIES[name] = Family(fn, options)
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_FAMILIES)


def get(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(available())}") from None


def option_classes() -> list[type[Options]]:
    """Every registered backbone's options group, once each, in registration order."""
    return list(dict.fromkeys(f.options for f in _FAMILIES.values()))
