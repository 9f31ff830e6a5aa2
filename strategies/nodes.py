"""Which nodes exist, their budget levels, and who trains this round (apart from the rounds,
as Flower keeps its sampling helpers apart from ``FedAvg``).

Flower's node ids are random in every run, so sampling and reply order are keyed by each
node's stable key (its partition id when it reports one) to make runs reproducible from the
seed.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Iterable, Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedeen.protocol import QUERY_LEVEL, QUERY_PARTITION

NODE_WAIT_SECONDS = 600.0


class NodeDirectory:
    """Budget level and stable key of every node that answered the level query; the sampler."""

    def __init__(self, seed: int, num_levels: int) -> None:
        self.num_levels = num_levels
        self.levels: dict[int, int] = {}
        self.keys: dict[int, int] = {}
        self.rng = random.Random(seed)

    def key(self, node: int) -> int:
        return self.keys.get(node, node)

    def discover(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
        """Ask each node whose level we do not know yet, once; cache the answers."""
        unknown = [n for n in node_ids if n not in self.levels]
        if not unknown:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord({"query": QUERY_LEVEL})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(logging.WARNING, "node %s did not report its budget level: %s", node,
                    reply.error.reason)
                continue
            level = int(reply.content["metrics"][QUERY_LEVEL])
            if not 1 <= level <= self.num_levels:
                log(logging.WARNING, "node %s reported budget level %s outside 1..%s; ignored",
                    node, level, self.num_levels)
                continue
            self.levels[node] = level
            key = int(reply.content["metrics"].get(QUERY_PARTITION, -1))
            self.keys[node] = key if key >= 0 else node

    def wait_for(self, grid: Grid, min_nodes: int, timeout: float = NODE_WAIT_SECONDS) -> list[int]:
        """The connected nodes, once at least ``min_nodes`` are (error after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} node(s) connected after {timeout:.0f}s but min-nodes = "
                    f"{min_nodes}; start more SuperNodes (num-supernodes in simulation) "
                    "or lower min-nodes")
            log(logging.INFO, "waiting for nodes: %d connected, %d required", len(nodes),
                min_nodes)
            time.sleep(1)
        return nodes

    def sample(self, nodes: list[int], fraction: float, eligible: Callable[[int], bool]) -> list[int]:
        """Sample among eligible nodes, redrawing (as the authors' sampler) until every
        eligible level present in the population is represented, when the sample allows it."""
        pool = sorted((n for n in nodes if n in self.levels and eligible(self.levels[n])),
                      key=self.key)
        if not pool:
            return []
        size = max(1, int(round(fraction * len(pool))))
        levels = {self.levels[n] for n in pool}
        chosen = self.rng.sample(pool, size)
        for _ in range(100):
            if size < len(levels) or {self.levels[n] for n in chosen} == levels:
                break
            chosen = self.rng.sample(pool, size)
        return sorted(chosen, key=self.key)

    def state_dict(self) -> dict[str, Any]:
        return {"node_levels": dict(self.levels), "node_keys": dict(self.keys),
                "rng": self.rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.levels = dict(state["node_levels"])
        self.keys = dict(state.get("node_keys", {}))
        self.rng.setstate(state["rng"])
