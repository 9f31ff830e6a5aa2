"""Client objectives: plain functions of (exit outputs, labels, context), chosen by name.

The strategy names the objective in each client's config; clients hold no method-specific
branches. ``ObjectiveContext.state`` persists across batches and rounds on one client, for
objectives that keep running statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.nn import functional as F

from models.base import EEOutput


@dataclass
class ObjectiveContext:
    """What an objective may read besides outputs and labels.

    ``config`` is the strategy's per-client config for this round; ``state`` persists on the
    node across rounds (the ClientApp keeps it in ``context.state``; store numpy arrays or
    floats); ``model`` and ``received`` (the parameters as received this round) serve
    parameter regularisers such as FedDyn's.
    """

    config: Mapping[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    received: dict[str, Tensor] = field(default_factory=dict)

    def get(self, key: str, default: Any) -> Any:
        return type(default)(self.config.get(key, default))


Objective = Callable[[EEOutput, Tensor, ObjectiveContext], Tensor]
_OBJECTIVES: dict[str, Objective] = {}


def register(name: str) -> Callable[[Objective], Objective]:
    def wrap(fn: Objective) -> Objective:
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        _OBJECTIVES[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_OBJECTIVES)


def get(name: str) -> Objective:
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; valid objectives: {', '.join(available())}") from None


def kl_distill(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean; teacher detached."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher.detach() / t, dim=1),
                    reduction="batchmean") * (t * t)


@register("sum_ce")
def sum_ce(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """Every local exit trained on the labels (EEFL, ExclusiveFL, DarkDistill's base policy)."""
    return torch.stack([F.cross_entropy(z, y) for z in out.logits]).sum()


@register("last_exit_ce")
def last_exit_ce(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """Only the deepest local exit (InclusiveFL)."""
    return F.cross_entropy(out.logits[-1], y)
