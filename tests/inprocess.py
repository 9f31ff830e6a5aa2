"""In-process stand-ins shared by the tests: a Grid whose messages go straight to the
ClientApp, a strategy built and initialised from a run config, and a Grid that lets one node
send hostile replies.

They let unit tests drive a strategy through whole rounds with real client code and no Ray,
and fake individual replies (broken, hostile) where a test needs them.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord, RecordDict)
from flwr.supercore.task_identity import TaskIdentity

from fedeen.app_config import build_strategy, family_for, load_config
from fedeen.client_app import app as client_app
from fedeen.data import source_for
from fedeen.protocol import Instructions, to_record
from strategies.base import HeteroEENStrategy

# Messages take their run and task identity from the process, as inside a real ServerApp.
TaskIdentity.run_id = 1
TaskIdentity.task_id = 1
TaskIdentity.node_id = 0  # the server


class InProcessGrid:
    def __init__(self, run_config: dict, num_nodes: int,
                 tamper: Callable[[Message], Message] | None = None,
                 node_configs: list[dict] | None = None, first_node_id: int = 1000) -> None:
        self.run_config = run_config
        self.node_ids = [first_node_id + i for i in range(num_nodes)]
        self.node_configs = node_configs or [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.tamper = tamper
        self.sent: list[Message] = []
        self.node_states = {n: RecordDict() for n in self.node_ids}  # like a SuperNode's

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            i = self.node_ids.index(msg.metadata.dst_node_id)
            ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id,
                          node_config=dict(self.node_configs[i]),
                          state=self.node_states[msg.metadata.dst_node_id],
                          run_config=dict(self.run_config))
            reply = client_app(msg, ctx)
            if self.tamper is not None:
                reply = self.tamper(reply)
            replies.append(reply)
        return replies


def make_strategy(run_config: dict) -> HeteroEENStrategy:
    """The configured strategy, initialised with the seeded global model."""
    cfg = load_config(run_config)
    strategy = build_strategy(cfg, family_for(cfg, source_for(cfg).info))
    strategy.initialize(strategy.family.init_state(cfg.seed))
    return strategy


def train_round(strategy: HeteroEENStrategy, grid: InProcessGrid, rnd: int = 1):
    """One training round through the Flower API: (messages sent, aggregate_train's result)."""
    msgs = list(strategy.configure_train(rnd, to_record(strategy.global_state), ConfigRecord(),
                                         grid))
    return msgs, strategy.aggregate_train(rnd, grid.send_and_receive(msgs))


def instructions(values: dict | None = None) -> Instructions:
    """Instructions for objective tests: a level-1 client in round 1, with ``values`` (wire
    keys, e.g. ``{"kd-gamma": 0.5}``) set."""
    base = Instructions(server_round=1, num_rounds=1, level=1, depth=1, width=1.0,
                        objective="sum_ce", lr=0.1).to_config()
    return Instructions.from_config({**base, **(values or {})})


# ---------------------------------------------------------------------- hostile replies
class HostileGrid(InProcessGrid):
    """Node 0's first reply of ``kind`` goes through ``tamper(reply, original) -> replies``."""

    def __init__(self, rc, tamper, kind=MessageType.TRAIN):
        super().__init__(rc, 4)
        self.hostile, self.kind, self.done = tamper, kind, False

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        out = []
        for msg, reply in zip(messages, replies):
            if (not self.done and msg.metadata.message_type == self.kind
                    and msg.metadata.dst_node_id == self.node_ids[0]):
                self.done = True
                out += self.hostile(reply, msg)
            else:
                out.append(reply)
        return out


def rebuild(reply: Message, original: Message, arrays=None, metrics=None, **records) -> Message:
    """A reply to ``original`` with ``reply``'s records, some replaced (None drops one)."""
    content = {name: reply.content[name] for name in reply.content}
    content.update({k: v for k, v in (("arrays", arrays), ("metrics", metrics)) if v is not None})
    content.update(records)
    return Message(RecordDict({k: v for k, v in content.items() if v is not None}),
                   reply_to=original)


def with_metric(**changes):
    def tamper(reply, original):
        metrics = dict(reply.content["metrics"])
        metrics.update({k.replace("_", "-"): v for k, v in changes.items()})
        return [rebuild(reply, original, metrics=MetricRecord(metrics))]
    return tamper


def with_arrays(edit):
    def tamper(reply, original):
        arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        edit(arrays)
        return [rebuild(reply, original, arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}))]
    return tamper


def first_matrix(arrays):
    return next(k for k, v in arrays.items() if v.dtype.kind == "f" and v.ndim > 1)


def set_matrix(value=None, shape=None, dtype=None):
    def edit(arrays):
        key = first_matrix(arrays)
        if value is not None:
            arrays[key] = np.full_like(arrays[key], value)
        if shape is not None:
            arrays[key] = arrays[key][:1]
        if dtype is not None:
            arrays[key] = arrays[key].astype(dtype)
    return edit
