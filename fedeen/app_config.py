"""The full run config and the objects that need the registries, at the top of the layers.

``load_config`` is what the ServerApp, the ClientApp and the runners call: it accepts every
core key, every backbone's and every registered strategy's options (``pyproject.toml`` lists
them all), and adds the checks that need the strategy registry and the data catalogue. It
imports ``strategies`` at module level, once, so the set of keys never depends on what was
imported before.
"""
from __future__ import annotations

from typing import Any, Mapping

import strategies
from fedeen.config import ConfigError, RunConfig, load_run_config
from fedeen.data import DatasetInfo, check_dataset_name
from fedeen.runtime import model_config
from models import EENFamily
from models import registry as model_registry
from strategies.base import HeteroEENStrategy


def load_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate ``run_config`` whole; raise ConfigError naming the key and the valid choices."""
    name = run_config.get("strategy", RunConfig.strategy)
    if name not in strategies.available():
        raise ConfigError(
            f"unknown strategy {name!r}; valid strategies: {', '.join(strategies.available())}")
    cfg = load_run_config(run_config, strategies.option_classes())
    check_dataset_name(cfg.dataset)
    strategies.get(cfg.strategy).check_config(cfg)
    return cfg


def default_run_config() -> dict[str, Any]:
    """Every run-config key with its default (what ``pyproject.toml`` must list)."""
    groups = [*model_registry.option_classes(), *strategies.option_classes()]
    return RunConfig(options=tuple(g() for g in dict.fromkeys(groups))).as_run_config()


def family_for(cfg: RunConfig, info: DatasetInfo) -> EENFamily:
    """The model family the configured strategy trains (it may pick a variant of ``model``)."""
    name = strategies.get(cfg.strategy).family_name(cfg)
    return EENFamily(name, model_config(cfg, info, name))


def build_strategy(cfg: RunConfig, family: EENFamily) -> HeteroEENStrategy:
    return strategies.get(cfg.strategy)(cfg, family)
