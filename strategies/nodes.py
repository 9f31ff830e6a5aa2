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

from fedeen.protocol import QUERY_LEVEL
from strategies.replies import query_answer

NODE_WAIT_SECONDS = 600.0


class NodeDirectory:
    """Budget level and stable key of every node that answered the level query; the sampler."""

    def __init__(self, seed: int, num_levels: int) -> None:
        self.num_levels = num_levels
        self.levels: dict[int, int] = {}
        self.keys: dict[int, int] = {}
        #: examples each node declared it holds (train, evaluation): bounds on its replies
        self.train_examples: dict[int, int] = {}
        self.eval_examples: dict[int, int] = {}
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
        asked = set(unknown)
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            answer = self._read_answer(reply) if node in asked else "it was not asked"
            if isinstance(answer, str):
                log(logging.WARNING, "node %s: no usable budget-level answer (%s); it is not "
                    "sampled until it answers", node, answer)
                continue
            asked.discard(node)  # one answer per node
            level, key, train_n, eval_n = answer
            self.levels[node] = level
            self.keys[node] = key if key is not None else node
            self.train_examples[node], self.eval_examples[node] = train_n, eval_n

    def _read_answer(self, reply: Message) -> tuple[int, int | None, int, int] | str:
        try:
            if reply.has_error():
                return f"client error: {reply.error.reason}"
            if "metrics" not in reply.content.metric_records:
                return "the answer lacks its 'metrics' record"
            return query_answer(dict(reply.content["metrics"]), self.num_levels)
        except Exception as err:  # noqa: BLE001 - an unreadable answer is the node's fault
            return f"unreadable answer ({type(err).__name__}: {err})"

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
                "train_examples": dict(self.train_examples),
                "eval_examples": dict(self.eval_examples), "rng": self.rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.levels = dict(state["node_levels"])
        self.keys = dict(state.get("node_keys", {}))
        self.train_examples = dict(state.get("train_examples", {}))
        self.eval_examples = dict(state.get("eval_examples", {}))
        self.rng.setstate(state["rng"])
