"""Conversions between numpy states (what travels and is aggregated) and torch tensors.

A *state* maps tensor names (state-dict keys) to numpy arrays; every module that crosses
between the two worlds goes through these helpers.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

State = dict[str, np.ndarray]


def to_tensors(state: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """CPU tensors holding copies of the arrays (safe to keep or save)."""
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def to_state(tensors: Mapping[str, Any]) -> State:
    """Numpy copies of tensors (or arrays), moved to the CPU."""
    return {k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)).copy()
            for k, v in tensors.items()}


def module_state(model: nn.Module) -> State:
    """A module's state dict as a numpy state."""
    return to_state(model.state_dict())


def load_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    """Load a numpy state into ``model`` (strict: every name must match); returns the model."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    return model


def to_cpu(obj: Any) -> Any:
    """Tensors inside nested dicts/lists/tuples moved to the CPU (for checkpoints)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
