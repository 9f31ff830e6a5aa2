"""Process-level helpers shared by the ServerApp and ClientApp: seeding, device, model family."""
from __future__ import annotations

import random

import numpy as np
import torch

from fedeen.config import RunConfig
from fedeen.data import DatasetInfo
from models.family import EENFamily
from models.registry import ModelConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def model_config(cfg: RunConfig, info: DatasetInfo) -> ModelConfig:
    return ModelConfig(
        num_classes=info.num_classes, in_chans=info.in_chans, image_size=cfg.image_size,
        modality=info.modality, sample_rate=info.sample_rate or 16000,
        num_exits=cfg.num_levels, cnn_width=cfg.cnn_width, cnn_blocks=cfg.cnn_blocks,
        vit_blocks=cfg.vit_blocks, vit_dim=cfg.vit_dim, vit_heads=cfg.vit_heads,
        vit_patch=cfg.vit_patch, vit_mlp_ratio=cfg.vit_mlp_ratio, policy=cfg.policy,
        boost_weight=cfg.boosted_ensemble_weight)


def family_for(cfg: RunConfig, info: DatasetInfo) -> EENFamily:
    """The family the configured strategy trains (it may pick a variant of ``cfg.model``)."""
    import strategies

    return EENFamily(strategies.get(cfg.strategy).family_name(cfg), model_config(cfg, info))
