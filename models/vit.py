"""ViT/DeiT-style early-exit transformer: patch embedding, pre-LN blocks, CLS-token exits.

Width scaling (ScaleFL) scales the residual width and the MLP width by the ratio, each
rounded down to a multiple of the head count, and keeps the head count (the head dimension
shrinks), as the DarkDistill authors' ScaleFL does with a Hugging Face ViT config. Every
tensor of a narrow model is the leading slice of the full one (patch projection, CLS token
and positions, LayerNorms, q/k/v/projection, MLP, exit heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import EarlyExitNet, SubmodelSpec, exit_blocks
from models.frontends import build_frontend
from models.options import OptionError, Options, option
from models.registry import ModelConfig, register


@dataclass(frozen=True)
class ViTOptions(Options):
    """The ViT's size (DeiT-tiny by default; blocks 4, dim 64, heads 2 trains on a CPU)."""

    prefix = "vit"
    blocks: int = option(12, lambda v: v >= 1, "must be >= 1")
    dim: int = option(192, lambda v: v >= 1, "must be >= 1")
    heads: int = option(3, lambda v: v >= 1, "must be >= 1")
    patch: int = option(4, lambda v: v >= 1, "must be >= 1")
    mlp_ratio: float = option(4.0, lambda v: v > 0, "must be > 0")

    def check(self) -> None:
        if self.dim % self.heads:
            raise OptionError(self.key("dim"), self.dim,
                              f"must be divisible by {self.key('heads')} = {self.heads}")


class PatchEmbed(nn.Module):
    """Conv patchifier plus CLS token and learned positions; output is the latent sequence."""

    def __init__(self, in_chans: int, image_size: int, patch: int, dim: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch}")
        self.num_patches = (image_size // patch) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenExit(nn.Module):
    """DeiT-style exit: LayerNorm + Linear on the CLS token."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, cls: Tensor) -> Tensor:
        return self.fc(self.norm(cls))


class EarlyExitViT(EarlyExitNet):
    """``spec.depth`` exits are kept, i.e. blocks up to the exit at that depth."""

    def __init__(self, spec: SubmodelSpec, cfg: ModelConfig) -> None:
        options = cfg.backbone or ViTOptions()
        frontend, in_chans = build_frontend(cfg)
        super().__init__(spec, cfg.num_exits, frontend)
        heads, num_classes = options.heads, cfg.num_classes
        if options.dim % heads:
            raise ValueError(f"ViT dim {options.dim} is not divisible by its {heads} heads")
        dim = width_scaled(options.dim, spec.width, heads)
        m = width_scaled(int(options.dim * options.mlp_ratio), spec.width, heads)
        self.dim = dim
        self.embed = PatchEmbed(in_chans, cfg.image_size, options.patch, dim)
        all_exits = exit_blocks(options.blocks, cfg.num_exits)
        self.exit_after = all_exits[: spec.depth]
        self.blocks = nn.ModuleList(Block(dim, heads, dim // heads, m)
                                    for _ in range(self.exit_after[-1]))
        self.exits = nn.ModuleList(TokenExit(dim, num_classes) for _ in self.exit_after)
        self.apply(_init_weights)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.embed(self.frontend(x))

    def latent_shape(self) -> tuple[int, ...]:
        return (self.embed.num_patches + 1, self.dim)

    def segment(self, h: Tensor, j: int, m: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        start = self.exit_after[j - 2] if j > 1 else 0
        for block in self.blocks[start:self.exit_after[j - 1]]:
            h = block(h)
        tapped, h = self.exit_tap(h, j, m)
        cls = tapped[:, 0]
        return h, self.exits[j - 1](cls), cls


def width_scaled(n: int, width: float, multiple: int) -> int:
    """``n`` at width ratio ``width``, rounded down to a multiple of ``multiple`` (at least
    one multiple): int(n * width // multiple * multiple), the authors' rule."""
    if width >= 1.0:
        return n
    return max(multiple, int(n * width // multiple * multiple))


@register("vit", options=ViTOptions)
def build_vit(cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitNet:
    return EarlyExitViT(spec, cfg)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
