"""The ClientApp: one small adapter between Flower Messages and the EENClient (a NumPyClient).

Arrays arrive named; the adapter hands them to the NumPyClient as a list together with their
names (config ``param-keys``) and names the reply's arrays the same way, so nothing depends on
list positions across the wire. Extra payloads the client collected become their own records.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.een_client import PARAM_KEYS, EENClient
from fedeen.budgets import node_level
from fedeen.config import ConfigError, RunConfig, load_config
from fedeen.data import load_client_data, source_for
from fedeen.runtime import family_for, resolve_device

app = ClientApp()


@lru_cache(maxsize=4)
def _client(cfg: RunConfig, partition_id: int, num_partitions: int) -> EENClient:
    """One client per node and run config per process: data is decoded once."""
    info = source_for(cfg).info
    data = load_client_data(cfg, partition_id, num_partitions)
    return EENClient(family_for(cfg, info), data, cfg, info, resolve_device(cfg),
                     client_seed=cfg.seed * 1000 + partition_id)


def client_for(context: Context) -> EENClient:
    cfg = load_config(context.run_config)
    nc = context.node_config
    if "partition-id" not in nc or "num-partitions" not in nc:
        raise ConfigError("the SuperNode's node config needs partition-id and num-partitions "
                          f"(which part of the data this node holds); got {dict(nc)}")
    return _client(cfg, int(nc["partition-id"]), int(nc["num-partitions"]))


def _unpack(msg: Message) -> tuple[list[str], list[Any], dict[str, Any]]:
    arrays = msg.content["arrays"]
    keys = list(arrays.keys())
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    config[PARAM_KEYS] = keys
    return keys, [arrays[k].numpy() for k in keys], config


def _metrics(values: dict[str, Any], num_examples: int) -> MetricRecord:
    clean = {k: v for k, v in values.items() if isinstance(v, (int, float, list))}
    return MetricRecord({**clean, "num-examples": int(num_examples)})


OBJECTIVE_STATE = "objective-state"


def _load_objective_state(context: Context) -> dict[str, Any]:
    if OBJECTIVE_STATE in context.state.array_records:
        return {k: a.numpy() for k, a in context.state[OBJECTIVE_STATE].items()}
    return {}


def _save_objective_state(context: Context, state: dict[str, Any]) -> None:
    if state:
        context.state[OBJECTIVE_STATE] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in state.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = client_for(context)
    keys, params, config = _unpack(msg)
    client.records = {}
    client.objective_state = _load_objective_state(context)
    new_params, n, metrics = client.fit(params, config)
    _save_objective_state(context, client.objective_state)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in zip(keys, new_params)}),
        "metrics": _metrics(metrics, n),
    })
    for name, arrays in client.records.items():
        content[name] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client = client_for(context)
    _, params, config = _unpack(msg)
    loss, n, metrics = client.evaluate(params, config)
    return Message(RecordDict({"metrics": _metrics({**metrics, "loss": loss}, n)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answers the server's one-time question about this node's budget level."""
    cfg = load_config(context.run_config)
    level = node_level(context.node_config, cfg.level_ratios)
    key = int(context.node_config.get("partition-id", -1))
    return Message(RecordDict({"metrics": MetricRecord({"budget-level": level,
                                                        "partition-id": key}),
                               "config": ConfigRecord({"answer": "budget-level"})}),
                   reply_to=msg)
