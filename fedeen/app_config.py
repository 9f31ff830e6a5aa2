"""The full run config and the objects that need the registries, at the top of the layers.

``load_config`` is what the ServerApp, the ClientApp and the runners call: it accepts every
core key, every backbone's and every registered strategy's options (``pyproject.toml`` lists
them all), and adds the checks that need the strategy registry and the data catalogue. It
imports ``strategies`` at module level, once, so the set of keys never depends on what was
imported before.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import strategies
from fedeen.config import ConfigError, RunConfig, load_run_config
from fedeen.data import DatasetInfo, check_dataset_name, source_for
from fedeen.results import DEFAULT_OUT
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


def check_run(cfg: RunConfig, num_nodes: int | None = None) -> None:
    """The checks that need the data, the file system or the federation's size (``num_nodes``
    when known, as in simulation): run before any round starts, and by the project's runners
    before Flower starts Ray."""
    out = Path(os.path.expanduser(cfg.out_dir or DEFAULT_OUT))
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(f"out-dir {str(out)!r} is not writable: {err}") from None
    try:
        source = source_for(cfg)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader error means "not a dataset we read"
        raise ConfigError(f"dataset {cfg.dataset!r} cannot be read as a dataset: "
                          f"{type(err).__name__}: {err}") from None
    labels = np.asarray(source.train[source.label_column])
    classes = len(np.unique(labels))
    if source.info.num_classes < 2 or classes < 2:
        raise ConfigError(f"dataset {cfg.dataset!r} has {classes} class(es) in its training "
                          "split; an early-exit classifier needs at least 2")
    if cfg.partitioner == "natural" and cfg.natural_id not in source.train.column_names:
        raise ConfigError(f"natural-id column {cfg.natural_id!r} is not in dataset "
                          f"{cfg.dataset!r}; columns: {source.train.column_names}")
    if num_nodes is None:
        return
    if cfg.min_nodes > num_nodes:
        raise ConfigError(f"min-nodes = {cfg.min_nodes} but the federation has {num_nodes} "
                          "nodes; lower min-nodes or start more nodes")
    pool = int(len(labels) * (1 - cfg.server_val_fraction))
    per_node = {"iid": 1, "dirichlet": 2}.get(cfg.partitioner, 0)  # Dirichlet: >= 2 each
    if pool < per_node * num_nodes:
        raise ConfigError(f"dataset {cfg.dataset!r} leaves {pool} training samples for "
                          f"{num_nodes} nodes; the {cfg.partitioner} partitioner needs at least "
                          f"{per_node * num_nodes}")
    if cfg.partitioner == "natural":
        groups = len(np.unique(np.asarray(source.train[cfg.natural_id])))
        if groups != num_nodes:
            raise ConfigError(f"natural partitioning by {cfg.natural_id!r} gives {groups} "
                              f"partitions but the federation has {num_nodes} nodes; run with "
                              f"num-supernodes={groups}")


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
