"""Input front ends by name: what turns a dataset's raw input into the backbone's image.

The data layer names the front end its modality needs (``ModelConfig.frontend``); the models
know front ends only by that name.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from models.audio import LogMelFrontEnd
from models.registry import ModelConfig

#: name -> (builder of the module, or None for no front end; channels the backbone then sees)
_FRONTENDS: dict[str, Callable[[ModelConfig], tuple[nn.Module | None, int]]] = {
    "": lambda cfg: (None, cfg.in_chans),
    "logmel": lambda cfg: (LogMelFrontEnd(cfg.sample_rate, cfg.image_size), 1),
}


def available() -> list[str]:
    return sorted(_FRONTENDS)


def build_frontend(cfg: ModelConfig) -> tuple[nn.Module | None, int]:
    """The front end module for ``cfg`` and the channel count the backbone then sees."""
    try:
        return _FRONTENDS[cfg.frontend](cfg)
    except KeyError:
        raise KeyError(f"unknown front end {cfg.frontend!r}; valid: {available()}") from None
