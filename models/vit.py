"""ViT/DeiT-style early-exit transformer: patch embedding, pre-LN blocks, CLS-token exits.

The blocks are timm's (``timm.models.vision_transformer.Block`` with timm's ``Mlp``), so a
timm or Hugging Face DeiT/ViT checkpoint of matching shape loads into the model
(``models.pretrained``); the attention keeps q, k and v as separate projections.

Width scaling (ScaleFL) scales the residual width and the MLP width by the ratio, each
rounded down to a multiple of the head count, and keeps the head count (the head dimension
shrinks), as the DarkDistill authors' ScaleFL does with a Hugging Face ViT config. Every
tensor of a narrow model is the leading slice of the full one (patch projection, CLS token
and positions, LayerNorms, q/k/v/projection, MLP, exit heads).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from timm.layers import Mlp
from timm.models.vision_transformer import Block as TimmBlock

from models.base import EarlyExitNet, SubmodelSpec, exit_blocks
from models.frontends import build_frontend
from models.options import OptionError, Options, option
from models.pretrained import load_pretrained
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
    #: LayerNorm epsilon: 1e-5 (torch's default) trains from scratch; DeiT/timm checkpoints
    #: were trained with 1e-6, which reproduces their outputs exactly
    norm_eps: float = option(1e-5, lambda v: 0 < v < 1, "must be in (0, 1)")
    #: initial weights: "" (random), a hub name or a local file (``models.pretrained``)
    pretrained: str = option("")
    #: the timm architecture a local timm-format file holds
    pretrained_arch: str = option("deit_tiny_patch16_224")

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
    """Multi-head self-attention with separate q, k and v projections.

    timm's ``Block`` takes it as its ``attn_layer``; timm's own attention fuses q, k and v in
    one ``qkv`` projection, whose leading slice would mix them, while width slicing needs
    every tensor of a narrow model to be a leading slice. A timm checkpoint's ``qkv`` is split
    into the three on loading (``models.pretrained``).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 head_dim: int | None = None, **_: object) -> None:
        super().__init__()
        self.heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.k = nn.Linear(dim, inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                             attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def Block(dim: int, heads: int, mlp_hidden: int, head_dim: int | None = None,
          norm_eps: float = 1e-5) -> nn.Module:  # noqa: N802
    """timm's pre-LN transformer block (``norm1``, ``attn``, ``norm2``, ``mlp.fc1/fc2``) with
    the separate-projection ``Attention`` (head dim ``head_dim``, default dim / heads) and an
    MLP of exactly ``mlp_hidden`` units (a width-scaled MLP need not be a multiple of dim)."""

    def mlp(in_features: int, hidden_features: int, act_layer, drop: float = 0.0,
            **_: object) -> nn.Module:
        return Mlp(in_features, mlp_hidden, act_layer=act_layer, drop=drop)

    attn: type[Attention] = Attention
    if head_dim is not None:  # timm builds the attention from a class
        class FixedHeadDim(Attention):
            def __init__(self, dim_: int, num_heads: int = 8, qkv_bias: bool = True,
                         **_: object) -> None:
                super().__init__(dim_, num_heads, qkv_bias, head_dim=head_dim)
        attn = FixedHeadDim
    return TimmBlock(dim, heads, qkv_bias=True, attn_layer=attn, mlp_layer=mlp,
                     norm_layer=partial(nn.LayerNorm, eps=norm_eps))


class TokenExit(nn.Module):
    """DeiT-style exit: LayerNorm + Linear on the CLS token."""

    def __init__(self, dim: int, num_classes: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
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
        self.blocks = nn.ModuleList(Block(dim, heads, m, norm_eps=options.norm_eps)
                                    for _ in range(self.exit_after[-1]))
        self.exits = nn.ModuleList(TokenExit(dim, num_classes, options.norm_eps)
                                   for _ in self.exit_after)
        self.options, self.patch = options, options.patch
        self.apply(_init_weights)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.embed(self.frontend(x))

    def latent_shape(self) -> tuple[int, ...]:
        return (self.embed.num_patches + 1, self.dim)

    def load_pretrained_weights(self) -> None:
        if self.options.pretrained:
            grid = int(round(self.embed.num_patches ** 0.5))
            load_pretrained(self, os.path.expanduser(self.options.pretrained),
                            self.options.pretrained_arch, grid, self.patch)

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
