"""Relational knowledge distillation (Park et al., CVPR 2019) on exit features.

Both losses compare relations *within* a batch, so student and teacher features may have
different widths (a CNN's exits do). Smooth-L1 between the student's and the teacher's
relation matrices; the teacher side is detached. As in the RKD reference code (and the
DarkDistill authors' copy of it): distances are normalised by their mean over off-diagonal
pairs, angles are the cosines of all triplets (anchor at the middle point).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise Euclidean distances of the rows of ``e`` (zero diagonal)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=d.dtype))


def _mean_normalised(d: Tensor) -> Tensor:
    pos = d[d > 0]
    return d / pos.mean() if pos.numel() else d


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise RKD: smooth-L1 between mean-normalised pairwise distance matrices."""
    if len(student) < 2:
        return student.sum() * 0.0
    with torch.no_grad():
        t = _mean_normalised(pdist(teacher.detach().float()))
    s = _mean_normalised(pdist(student.float()))
    return F.smooth_l1_loss(s, t)


def _angles(e: Tensor) -> Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (n, n, c): e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise RKD: smooth-L1 between the cosines of every triplet's angle."""
    if len(student) < 3:
        return student.sum() * 0.0
    with torch.no_grad():
        t = _angles(teacher.detach().float())
    return F.smooth_l1_loss(_angles(student.float()), t)


def rkd_loss(student: Tensor, teacher: Tensor, dist_ratio: float, angle_ratio: float) -> Tensor:
    """``dist_ratio * distance + angle_ratio * angle`` (DarkDistill uses 5 and 10)."""
    return dist_ratio * rkd_distance(student, teacher) + angle_ratio * rkd_angle(student, teacher)
