"""Cheap on-tensor augmentation for image batches (random shifts, optional flips)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def augment_images(x: Tensor, hflip: bool, generator: torch.Generator) -> Tensor:
    """Random crop after padding by 1/8 of the side, plus horizontal flips if allowed.

    The padding is 0 in normalised units, i.e. mid-grey (the dataset-agnostic mean), not
    black."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return out
