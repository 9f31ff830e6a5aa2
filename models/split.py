"""A submodel cut at an exit for edge/cloud training: which tensors each side holds and runs.

The edge holds the front end, the stem, the blocks up to exit ``s`` and exits 1..s; the cloud
holds the rest (depth segments ``s+1..``). Both sides build the same submodel and each uses
only its part, so the cut needs nothing from a backbone beyond ``EarlyExitNet.segment``.
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from models.base import EarlyExitNet, EEOutput
from models.family import EENFamily


def check_split(model: EarlyExitNet, split_exit: int) -> None:
    """A clear error when ``model`` cannot be cut after exit ``split_exit``."""
    if not 1 <= split_exit < model.num_exits:
        raise ValueError(f"split exit must be in 1..{model.num_exits - 1} for a submodel with "
                         f"{model.num_exits} exits (the cloud needs at least one); "
                         f"got {split_exit}")
    if type(model).segment is EarlyExitNet.segment or getattr(model, "ree", None) is not None:
        raise ValueError(f"{type(model).__name__} cannot be split: its exits do not run one "
                         "segment at a time (ReeFL's shared recurrent exit reads every block)")


def edge_keys(family: EENFamily, keys: Iterable[str], split_exit: int) -> list[str]:
    """The tensors of ``keys`` the edge holds: depth segments 1..``split_exit``."""
    return [k for k in keys if family.segment_of(k) <= split_exit]


def cloud_keys(family: EENFamily, keys: Iterable[str], split_exit: int) -> list[str]:
    return [k for k in keys if family.segment_of(k) > split_exit]


def edge_forward(model: EarlyExitNet, x: Tensor, split_exit: int
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(the feature map at the split point, exits 1..s raw logits, their features).

    Under ``boosted`` the edge's exits are rescaled as a model of ``split_exit`` exits: no
    gradient from deeper exits reaches the edge.
    """
    return model.forward_exits(model.to_latent(x), 1, split_exit, m=split_exit)


def cloud_forward(model: EarlyExitNet, h: Tensor, edge_logits: list[Tensor], split_exit: int
                  ) -> EEOutput:
    """Every exit's output from the split-point map ``h`` (received, so no gradient leaves
    the cloud): the edge exits' raw logits as received (detached), the cloud's computed.
    Boosting then composes them as in the whole model, the edge's part a constant. The edge
    exits' features stay on the edge (empty here); client objectives read logits only."""
    _, logits, feats = model.forward_exits(h, split_exit + 1, model.num_exits)
    edge = [z.detach() for z in edge_logits]
    return model.output(edge + logits, [h.new_zeros(len(h), 0) for _ in edge] + feats)
