"""Splits of a source: the server's validation hold-out, the clients' partitions
(flwr-datasets partitioners) and the test set, as ready-to-train tensors.

Everything is cached per process: a Ray actor builds its partition once per run.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from fedeen.config import ConfigError, RunConfig
from fedeen.data.sources import DatasetInfo, Source, Tensors, load_source


def source_for(cfg: RunConfig) -> Source:
    return load_source(cfg.dataset, cfg.input_column, cfg.label_column)


def hflip_for(cfg: RunConfig, info: DatasetInfo) -> bool:
    """Whether training batches may be flipped: ``augment-hflip``, or ("auto") the dataset's
    declared property."""
    if cfg.augment_hflip == "auto":
        return info.hflip
    return cfg.augment_hflip == "true"


@lru_cache(maxsize=4)
def _client_pool_and_server_val(dataset: str, input_col: str, label_col: str,
                                fraction: float, seed: int):
    """Hold out the server's validation set (exit thresholds, best round) from the train split."""
    src = load_source(dataset, input_col, label_col)
    split = src.train.train_test_split(test_size=fraction, seed=seed)
    return split["train"], split["test"]


def make_partitioner(cfg: RunConfig, num_partitions: int, label_col: str):
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           NaturalIdPartitioner)

    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=label_col,
                                    alpha=cfg.alpha, min_partition_size=2, self_balancing=False,
                                    seed=cfg.seed)
    return NaturalIdPartitioner(partition_by=cfg.natural_id)


@lru_cache(maxsize=4)
def _partitioner(cfg: RunConfig, num_partitions: int):
    src = source_for(cfg)
    pool, _ = _client_pool_and_server_val(cfg.dataset, cfg.input_column, cfg.label_column,
                                          cfg.server_val_fraction, cfg.seed)
    if cfg.partitioner == "natural" and cfg.natural_id not in pool.column_names:
        raise ConfigError(f"natural-id column {cfg.natural_id!r} not in dataset {cfg.dataset!r}; "
                          f"columns: {pool.column_names}")
    partitioner = make_partitioner(cfg, num_partitions, src.label_column)
    partitioner.dataset = pool
    if cfg.partitioner == "natural" and partitioner.num_partitions != num_partitions:
        raise ConfigError(f"natural partitioning by {cfg.natural_id!r} gives "
                          f"{partitioner.num_partitions} partitions but the federation has "
                          f"{num_partitions} nodes; run with num-supernodes="
                          f"{partitioner.num_partitions}")
    return partitioner


@dataclass
class ClientData:
    train: Tensors
    val: Tensors


@lru_cache(maxsize=2)
def load_client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """A node's partition, split into train and validation tensors."""
    src = source_for(cfg)
    part = _partitioner(cfg, num_partitions).load_partition(partition_id)
    if cfg.max_samples_per_client and len(part) > cfg.max_samples_per_client:
        part = part.shuffle(seed=cfg.seed).select(range(cfg.max_samples_per_client))
    if cfg.val_fraction > 0 and len(part) >= 5:
        split = part.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
        train, val = split["train"], split["test"]
    else:
        train, val = part, part.select([])
    return ClientData(src.tensors(train, cfg.image_size), _tensors_or_empty(src, val, cfg))


def _tensors_or_empty(src: Source, ds, cfg: RunConfig) -> Tensors:
    if len(ds):
        return src.tensors(ds, cfg.image_size)
    return Tensors(torch.empty(0), torch.empty(0, dtype=torch.long))


@dataclass
class ServerData:
    info: DatasetInfo
    val: Tensors
    test: Tensors


def load_server_data(cfg: RunConfig) -> ServerData:
    """The server's validation hold-out and the (optionally capped) test split."""
    src = source_for(cfg)
    _, server_val = _client_pool_and_server_val(cfg.dataset, cfg.input_column, cfg.label_column,
                                                cfg.server_val_fraction, cfg.seed)
    test = src.test
    cap = cfg.max_test_samples
    if cap and len(test) > cap:
        test = test.shuffle(seed=cfg.seed).select(range(cap))
    if cap and len(server_val) > cap:
        server_val = server_val.shuffle(seed=cfg.seed).select(range(cap))
    return ServerData(src.info, src.tensors(server_val, cfg.image_size),
                      src.tensors(test, cfg.image_size))
