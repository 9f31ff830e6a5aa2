"""The ClientApp: one small adapter between Flower Messages and the EENClient (a NumPyClient).

Arrays arrive named; the adapter hands them to the NumPyClient as a list together with their
names (config ``param-keys``) and names the reply's arrays the same way, so nothing depends on
list positions across the wire. Extra payloads the client collected become their own records.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.cloud_worker import spawn_local
from clients.een_client import PARAM_KEYS, EENClient
from clients.split import SplitSettings
from clients.split_client import SplitClient
from clients.transport import LinkModel, parse_address
from fedeen.app_config import family_for, load_config
from fedeen.budgets import node_level
from fedeen.config import ConfigError, RunConfig, split_partition_ids
from fedeen.data import load_client_data, source_for
from fedeen.protocol import (NUM_EXAMPLES, QUERY_EVAL_EXAMPLES, QUERY_LEVEL, QUERY_PARTITION,
                             QUERY_TRAIN_EXAMPLES, from_record, to_record)
from fedeen.runtime import resolve_device

app = ClientApp()


@lru_cache(maxsize=4)
def _client(cfg: RunConfig, partition_id: int, num_partitions: int,
            split: tuple[str, int] | None = None) -> EENClient:
    """One client per node and run config per process: data is decoded once. ``split`` =
    (cloud address, split exit) makes it the edge of a split pair."""
    info = source_for(cfg).info
    data = load_client_data(cfg, partition_id, num_partitions)
    args = (family_for(cfg, info), data, cfg, info, resolve_device(cfg))
    seed = cfg.seed * 1000 + partition_id
    if split is None:
        return EENClient(*args, client_seed=seed)
    address, split_exit = split
    if address == LOCAL_CLOUD:
        address = spawn_local()
    settings = SplitSettings(
        split_exit=split_exit, bits=cfg.split_bits, max_ahead=cfg.split_max_ahead,
        training=cfg.split_training, timeout_s=cfg.split_timeout_s,
        link=LinkModel(cfg.split_link_mbps, cfg.split_link_latency_ms))
    return SplitClient(*args, client_seed=seed, cloud_address=address, settings=settings)


LOCAL_CLOUD = "local"
CLIENT_MODES = ("plain", "split")


def split_mode(cfg: RunConfig, node_config: Mapping[str, Any], partition_id: int
               ) -> tuple[str, int] | None:
    """(cloud address, split exit) when this node is the edge of a split pair, else None.

    A SuperNode's node config decides (``client-mode = "split"``, ``cloud-address =
    "HOST:PORT"`` or ``"local"``, optional ``split-exit``); without ``client-mode`` the run
    config's ``split-partitions`` does, with a private local cloud worker (simulation)."""
    mode = str(node_config.get("client-mode", "")).strip()
    if mode and mode not in CLIENT_MODES:
        raise ConfigError(f"node config client-mode must be one of {', '.join(CLIENT_MODES)}, "
                          f"got {mode!r}")
    if not mode:
        mode = "split" if partition_id in split_partition_ids(cfg) else "plain"
    if mode == "plain":
        return None
    address = str(node_config.get("cloud-address", LOCAL_CLOUD)).strip() or LOCAL_CLOUD
    if address != LOCAL_CLOUD:
        try:
            parse_address(address)
        except ValueError as err:
            raise ConfigError(f"node config cloud-address: {err}") from None
    try:
        split_exit = int(node_config.get("split-exit", cfg.split_exit))
    except (TypeError, ValueError):
        raise ConfigError(f"node config split-exit must be an integer, got "
                          f"{node_config.get('split-exit')!r}") from None
    if split_exit < 1:
        raise ConfigError(f"split-exit must be >= 1, got {split_exit}")
    return address, split_exit


def client_config(context: Context) -> RunConfig:
    """The run config as a client reads it: ``resume`` names a file on the server, which a
    client neither has nor needs."""
    return load_config({k: v for k, v in context.run_config.items() if k != "resume"})


def client_for(context: Context) -> EENClient:
    cfg = client_config(context)
    nc = context.node_config
    if "partition-id" not in nc or "num-partitions" not in nc:
        raise ConfigError("the SuperNode's node config needs partition-id and num-partitions "
                          f"(which part of the data this node holds); got {dict(nc)}")
    partition_id = int(nc["partition-id"])
    return _client(cfg, partition_id, int(nc["num-partitions"]),
                   split_mode(cfg, nc, partition_id))


def _unpack(msg: Message) -> tuple[list[str], list[Any], dict[str, Any]]:
    state = from_record(msg.content["arrays"])
    keys = list(state)
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    config[PARAM_KEYS] = keys
    return keys, [state[k] for k in keys], config


def _metrics(values: dict[str, Any], num_examples: int) -> MetricRecord:
    clean = {k: v for k, v in values.items() if isinstance(v, (int, float, list))}
    return MetricRecord({**clean, NUM_EXAMPLES: int(num_examples)})


OBJECTIVE_STATE = "objective-state"


def _load_objective_state(context: Context) -> dict[str, Any]:
    if OBJECTIVE_STATE in context.state.array_records:
        return from_record(context.state[OBJECTIVE_STATE])
    return {}


def _save_objective_state(context: Context, state: dict[str, Any]) -> None:
    if state:
        context.state[OBJECTIVE_STATE] = to_record(state)


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = client_for(context)
    keys, params, config = _unpack(msg)
    client.records = {}
    client.objective_state = _load_objective_state(context)
    new_params, n, metrics = client.fit(params, config)
    _save_objective_state(context, client.objective_state)
    content = RecordDict({
        "arrays": to_record(dict(zip(keys, new_params))),
        "metrics": _metrics(metrics, n),
    })
    for name, arrays in client.records.items():
        content[name] = to_record(arrays)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client = client_for(context)
    _, params, config = _unpack(msg)
    loss, n, metrics = client.evaluate(params, config)
    return Message(RecordDict({"metrics": _metrics({**metrics, "loss": loss}, n)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answers the server's one-time question: this node's budget level, its stable key and
    how many examples it holds (the server's bound on its replies' example counts)."""
    cfg = client_config(context)
    level = node_level(context.node_config, cfg.level_ratios)
    key = int(context.node_config.get(QUERY_PARTITION, -1))
    client = client_for(context)
    return Message(RecordDict({"metrics": MetricRecord({
                                   QUERY_LEVEL: level, QUERY_PARTITION: key,
                                   QUERY_TRAIN_EXAMPLES: len(client.data.train),
                                   QUERY_EVAL_EXAMPLES: len(client.data.val)}),
                               "config": ConfigRecord({"answer": QUERY_LEVEL})}),
                   reply_to=msg)
