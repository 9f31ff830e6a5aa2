"""The registered backbones: ``cnn`` (ResNet-style) and ``vit`` (DeiT-style).

Audio datasets reuse both through the log-mel front end, selected by ``ModelConfig.modality``.
"""
from __future__ import annotations

from torch import nn

from models.audio import LogMelFrontEnd
from models.base import EarlyExitNet, SubmodelSpec
from models.cnn import EarlyExitCNN
from models.registry import ModelConfig, register
from models.vit import EarlyExitViT


def frontend_for(cfg: ModelConfig) -> tuple[nn.Module | None, int]:
    """The input front end and the channel count the backbone then sees."""
    if cfg.modality == "audio":
        return LogMelFrontEnd(cfg.sample_rate, cfg.image_size), 1
    return None, cfg.in_chans


@register("cnn")
def build_cnn(cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitNet:
    frontend, in_chans = frontend_for(cfg)
    return EarlyExitCNN(spec, cfg.num_classes, in_chans, cfg.image_size, cfg.cnn_width,
                        cfg.cnn_blocks, cfg.num_exits, frontend)


def build_vit_like(cls: type[EarlyExitViT], cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitViT:
    """Any ViT-shaped EEN class from the config (shared by ViT variants such as ReeFL's)."""
    frontend, in_chans = frontend_for(cfg)
    return cls(spec, cfg.num_classes, in_chans, cfg.image_size, cfg.vit_patch, cfg.vit_dim,
               cfg.vit_blocks, cfg.vit_heads, cfg.vit_mlp_ratio, cfg.num_exits, frontend)


@register("vit")
def build_vit(cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitNet:
    return build_vit_like(EarlyExitViT, cfg, spec)
