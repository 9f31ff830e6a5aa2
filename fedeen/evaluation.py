"""Central evaluation of the global EEN: per-exit (anytime) accuracy and the budgeted curve.

The budgeted curve follows MSDNet's dynamic evaluation: for p in {i/20}, exit quotas
q_k proportional to p^k are fitted as confidence thresholds on the server's validation
hold-out, then every test sample leaves at the first exit whose max-softmax passes its
threshold; we report accuracy against expected FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedeen.data import Tensors
from models.base import EarlyExitNet

CURVE_PS = tuple(i / 20 for i in range(1, 40))


@torch.no_grad()
def predict(model: EarlyExitNet, data: Tensors, batch_size: int, device: torch.device
            ) -> list[torch.Tensor]:
    """Every exit's logits on ``data`` (CPU tensors, one per exit)."""
    model.eval().to(device)
    chunks: list[list[torch.Tensor]] = [[] for _ in range(model.num_exits)]
    for start in range(0, len(data), batch_size):
        out = model(data.x[start:start + batch_size].to(device))
        for j, z in enumerate(out.logits):
            chunks[j].append(z.float().cpu())
    return [torch.cat(c) for c in chunks]


def exit_accuracies(logits: Sequence[torch.Tensor], y: torch.Tensor) -> list[float]:
    return [float((z.argmax(1) == y).float().mean()) for z in logits]


def quotas(p: float, num_exits: int) -> np.ndarray:
    """MSDNet exit quotas: q_k proportional to p^k, k = 1..M."""
    q = np.array([p ** k for k in range(1, num_exits + 1)], dtype=np.float64)
    return q / q.sum()


def fit_thresholds(val_logits: Sequence[torch.Tensor], q: np.ndarray) -> list[float]:
    """Confidence thresholds so that exit k takes q_k of the validation samples.

    Exit k takes, among the samples no earlier exit took, the most confident ones (by its
    own max-softmax), up to floor(n * q_k); the last exit takes the rest.
    """
    n = len(val_logits[0])
    taken = torch.zeros(n, dtype=torch.bool)
    thresholds = []
    for k, z in enumerate(val_logits[:-1]):
        conf = torch.softmax(z, 1).max(1).values
        want = int(np.floor(n * q[k]))
        order = torch.argsort(conf, descending=True)
        order = order[~taken[order]]
        if want <= 0 or len(order) == 0:
            thresholds.append(float("inf"))
            continue
        chosen = order[:want]
        taken[chosen] = True
        thresholds.append(float(conf[chosen[-1]]))
    thresholds.append(float("-inf"))
    return thresholds


def route(logits: Sequence[torch.Tensor], thresholds: Sequence[float]) -> torch.Tensor:
    """Index of the exit each sample leaves at under the thresholds."""
    n = len(logits[0])
    exit_at = torch.full((n,), len(logits) - 1, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for k, (z, t) in enumerate(zip(logits, thresholds)):
        conf = torch.softmax(z, 1).max(1).values
        leave = (~done) & (conf >= t)
        exit_at[leave] = k
        done |= leave
    return exit_at


@dataclass
class BudgetPoint:
    p: float
    accuracy: float
    flops: float
    exit_fractions: list[float]


def budget_curve(val_logits: Sequence[torch.Tensor], test_logits: Sequence[torch.Tensor],
                 test_y: torch.Tensor, exit_costs: Sequence[float],
                 ps: Sequence[float] = CURVE_PS) -> list[BudgetPoint]:
    m = len(test_logits)
    preds = torch.stack([z.argmax(1) for z in test_logits])  # (M, N)
    costs = torch.tensor(exit_costs[:m], dtype=torch.float64)
    points = []
    for p in ps:
        exit_at = route(test_logits, fit_thresholds(val_logits, quotas(p, m)))
        pred = preds.gather(0, exit_at[None]).squeeze(0)
        frac = torch.bincount(exit_at, minlength=m).double() / len(exit_at)
        points.append(BudgetPoint(p, float((pred == test_y).float().mean()),
                                  float((frac * costs).sum()), frac.tolist()))
    return points
