"""Learning-to-Weight's meta-network (Han et al., ECCV'22, as the DarkDistill authors run it).

An MLP reads a sample's cross-entropy at each of the model's k exits and gives each exit a
weight for that sample: w = 1 + 0.8 (t - mean_j t_j), t = tanh(MLP(losses)) (one hidden layer,
``hidden`` units, ReLU). It lives in the model as ``meta.*`` when the policy is ``l2w``, so it
travels, is sliced (a level-k client's net reads and writes its k exits: the leading slice of
the global one's first and last layer) and is averaged like every other parameter.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: the authors' hidden size and weight spread
META_HIDDEN = 500
WEIGHT_SPREAD = 0.8


class MetaNet(nn.Module):
    def __init__(self, num_exits: int, hidden: int = META_HIDDEN) -> None:
        super().__init__()
        self.hidden = nn.Linear(num_exits, hidden)
        self.out = nn.Linear(hidden, num_exits)

    def forward(self, losses: Tensor) -> Tensor:
        """Per-sample, per-exit weights (batch, k) from per-sample exit losses (batch, k)."""
        t = torch.tanh(self.out(F.relu(self.hidden(losses))))
        return 1.0 + WEIGHT_SPREAD * (t - t.mean(dim=1, keepdim=True))


def exit_losses(logits: list[Tensor], y: Tensor) -> Tensor:
    """Every sample's cross-entropy at every exit, (batch, exits)."""
    return torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits], dim=1)
