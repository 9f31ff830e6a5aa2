"""Server-side latent generators of DarkDistill (difficulty-conditional) and DarkDistill-PL
(label-conditional), and FedGen's diversity loss.

A generator maps uniform noise eps ~ U(0,1)^D (D = number of classes, as in the authors'
``Generator_LATENT``), a label embedding and, when difficulty-conditional, ``Linear(1 -> D)``
of the requested difficulty to a latent that ``EarlyExitNet.forward_latent`` consumes:

- token latents (ViT, shape ``(tokens, dim)``): exactly the authors' MLP,
  ``Linear(in -> hidden) + BN1d + ReLU -> Linear(hidden -> tokens * dim)``, reshaped to the
  token sequence (CLS and positions included: it replaces the patch embedding's output).
- feature-map latents (CNN, shape ``(C, H, W)``, the stem's output). DESIGN CHOICE (no source:
  the authors only ran transformers): the same MLP produces a map at a quarter of the
  resolution, ``(max(C, 16), ceil(H/4), ceil(W/4))``, and a small decoder upsamples it
  (nearest x2, Conv3x3 + BN + ReLU, nearest to H x W, Conv3x3 -> C). A full-resolution MLP
  head would need ``hidden * C * H * W`` weights (16M for a 16x32x32 stem); this one needs
  about 70x fewer, and the conv layers give the map the local smoothness of real stem outputs.
  The last layer is linear (no ReLU) so that no output unit can die.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class LatentGenerator(nn.Module):
    """``G(y, eps[, d]) -> latent`` of shape ``(batch, *latent_shape)``."""

    def __init__(self, num_classes: int, latent_shape: Sequence[int], hidden: int = 1000,
                 difficulty_input: bool = True) -> None:
        super().__init__()
        self.num_classes = self.noise_dim = num_classes
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.difficulty_input = difficulty_input
        d = num_classes
        self.label_emb = nn.Embedding(num_classes, d)
        self.diff_proj = nn.Linear(1, d) if difficulty_input else None
        in_dim = 3 * d if difficulty_input else 2 * d
        if len(self.latent_shape) == 2:
            self.low_shape = self.latent_shape
            self.decoder: nn.Module | None = None
        elif len(self.latent_shape) == 3:
            c, h, w = self.latent_shape
            cg = max(c, 16)
            self.low_shape = (cg, math.ceil(h / 4), math.ceil(w / 4))
            self.decoder = _ConvDecoder(cg, c, (math.ceil(h / 2), math.ceil(w / 2)), (h, w))
        else:
            raise ValueError(f"no generator for latents of shape {self.latent_shape}")
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, math.prod(self.low_shape)))

    def noise(self, batch: int, gen: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> Tensor:
        """eps ~ U(0, 1)^D, drawn on the CPU from ``gen`` (reproducible on any device)."""
        return torch.rand(batch, self.noise_dim, generator=gen).to(device)

    def forward(self, y: Tensor, eps: Tensor, difficulty: Tensor | None = None) -> Tensor:
        parts = [eps, self.label_emb(y)]
        if self.difficulty_input:
            if difficulty is None:
                raise ValueError("this generator is difficulty-conditional: pass the difficulty")
            parts.append(self.diff_proj(difficulty.float().reshape(-1, 1)))
        out = self.mlp(torch.cat(parts, dim=1)).view(len(y), *self.low_shape)
        return out if self.decoder is None else self.decoder(out)


class _ConvDecoder(nn.Module):
    def __init__(self, c_in: int, c_out: int, mid_size: tuple[int, int],
                 out_size: tuple[int, int]) -> None:
        super().__init__()
        self.mid_size, self.out_size = mid_size, out_size
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_in, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(c_in), nn.ReLU())
        self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(F.interpolate(x, size=self.mid_size, mode="nearest"))
        return self.conv2(F.interpolate(x, size=self.out_size, mode="nearest"))


def diversity_loss(eps: Tensor, latent: Tensor) -> Tensor:
    """FedGen's diversity loss: exp(-mean_{a,b} ||eps_a - eps_b||^2_mean * |x_a - x_b|_mean).

    Small when samples drawn from distant noise are far apart (per-element mean squared
    distance of the noises, per-element mean absolute distance of the outputs).
    """
    x = latent.reshape(len(latent), -1)
    noise_dist = (eps[:, None, :] - eps[None, :, :]).pow(2).mean(dim=2)
    out_dist = torch.cdist(x, x, p=1) / x.shape[1]
    return torch.exp(-(noise_dist * out_dist).mean())


#: how a generator's output scale is held to the clients' embedding statistics
SCALE_ANCHORS = ("normalize", "stat-loss", "off")


def standardize_to(latent: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-5) -> Tensor:
    """Output normalisation: every element (token position x channel, or channel x pixel)
    standardised over the batch, then given the clients' mean and standard deviation,
    ``mean + std * (x - batch mean) / batch std``. The batch's first two moments then equal
    the real embeddings' whatever the generator's raw scale, so no loss term can inflate them."""
    mu = latent.mean(dim=0, keepdim=True)
    var = latent.var(dim=0, unbiased=False, keepdim=True)
    return mean + std * (latent - mu) * torch.rsqrt(var + eps)


def statistic_loss(latent: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Moment matching against the clients' embedding statistics (DeepInversion's feature
    statistic loss in relative form): ``(||m_b - mean||^2 + ||s_b - std||^2) / ||std||^2``
    with m_b, s_b the batch mean and standard deviation of every element. 0 when the batch
    has the real moments; about (r - 1)^2 when its scale is r times the real one."""
    mu = latent.mean(dim=0)
    sd = latent.var(dim=0, unbiased=False).add(1e-8).sqrt()
    scale = std.pow(2).sum().clamp(min=1e-12)
    return ((mu - mean).pow(2).sum() + (sd - std).pow(2).sum()) / scale


def rms(x: Tensor) -> float:
    """Root mean square of all elements (the latent scale the diagnostics compare)."""
    return float(x.detach().float().pow(2).mean().sqrt())
