"""Process-level helpers shared by the server and the clients: seeding, device, model config."""
from __future__ import annotations

import random

import numpy as np
import torch

from fedeen.config import RunConfig
from fedeen.data import DatasetInfo, modalities
from models import registry as model_registry
from models.registry import ModelConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def model_config(cfg: RunConfig, info: DatasetInfo, family: str) -> ModelConfig:
    """What model family ``family`` needs to build its submodels for this run and dataset."""
    return ModelConfig(
        num_classes=info.num_classes, in_chans=info.in_chans, image_size=cfg.image_size,
        frontend=modalities.get(info.modality).frontend, sample_rate=info.sample_rate or 16000,
        num_exits=cfg.num_levels, policy=cfg.policy, boost_weight=cfg.boosted_ensemble_weight,
        backbone=cfg.options_of(model_registry.get(family).options))
