"""MSDNet's budgeted exit policy applied to one batch (DarkDistill's "difficulty ranges").

For an EEN with m exits the quotas are q_k = p^k / sum_l p^l (``fedeen.evaluation.quotas``,
p = ``cfg.exit_p``). On a batch of n samples exit k < m takes exactly floor(n * q_k) samples:
exit 1 the most confident ones by its own max-softmax, exit 2 the most confident by its own
max-softmax among those exit 1 left, and so on; the last exit takes all the rest (the
hardest). Easy samples go shallow, hard ones deep. This is the authors' ``exit_policy`` and the
rule ``fedeen.evaluation.fit_thresholds`` fits; we assign by rank instead of going through
thresholds and ``route`` because generated batches often saturate the softmax, and tied
confidences would break the exact per-exit counts.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from fedeen.evaluation import quotas


def exit_counts(n: int, num_exits: int, p: float) -> list[int]:
    """Samples each exit takes out of a batch of ``n``: floor(n q_k) for k < m, the rest last."""
    q = quotas(p, num_exits)
    counts = [int(math.floor(n * q[k])) for k in range(num_exits - 1)]
    return [*counts, n - sum(counts)]


@torch.no_grad()
def route_batch(logits: Sequence[Tensor], p: float) -> Tensor:
    """0-based exit index of every sample of the batch under the exit policy."""
    m, n = len(logits), len(logits[0])
    exit_at = torch.full((n,), m - 1, dtype=torch.long, device=logits[0].device)
    taken = torch.zeros(n, dtype=torch.bool, device=logits[0].device)
    for k, want in enumerate(exit_counts(n, m, p)[:-1]):
        conf = torch.softmax(logits[k].float(), dim=1).max(dim=1).values
        order = torch.argsort(conf, descending=True, stable=True)
        chosen = order[~taken[order]][:want]
        exit_at[chosen] = k
        taken[chosen] = True
    return exit_at


def routed_ce(logits: Sequence[Tensor], y: Tensor, exit_at: Tensor) -> Tensor:
    """Mean over the batch of each sample's cross-entropy at the exit it is routed to."""
    per_exit = torch.stack([torch.nn.functional.cross_entropy(z, y, reduction="none")
                            for z in logits])  # (m, n)
    return per_exit.gather(0, exit_at[None]).mean()
