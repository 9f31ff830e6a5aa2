"""The heterogeneous-EEN strategy base: messaging, sampling, validation, aggregation, rounds.

A concrete strategy overrides only what makes it different: which nodes take part
(``eligible``), what each level receives (``level_spec``, ``arrays_for``), the client objective
(``objective`` / ``client_config``), how replies become the global state (``aggregate``) and any
server-side step after it (``server_step``). Everything is named by state-dict key.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedeen.config import RunConfig
from models.base import SubmodelSpec
from models.family import EENFamily
from models.submodel import State, reply_problems, scatter_mean, slice_state

QUERY_LEVEL = "budget-level"
QUERY_KEY = "partition-id"
NODE_WAIT_SECONDS = 600.0


@dataclass
class ClientUpdate:
    """One validated training reply, in global names."""

    node_id: int
    level: int
    spec: SubmodelSpec
    state: State
    num_examples: int
    metrics: dict[str, Any]
    records: dict[str, State] = field(default_factory=dict)


@dataclass
class RoundTimings:
    configure: float = 0.0
    clients: float = 0.0
    aggregate: float = 0.0
    server_step: float = 0.0
    federated_eval: float = 0.0
    central_eval: float = 0.0
    total: float = 0.0
    client_train_max: float = 0.0
    client_train_sum: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


class RoundObserver:
    """Receives one call per round (results writer, progress log); no-op by default."""

    def round_done(self, server_round: int, central: dict | None, train: dict, evaluate: dict,
                   timings: RoundTimings, strategy: "HeteroEENStrategy") -> None:
        pass


def relative_change(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> float:
    """||after - before|| / ||before|| over the float tensors of ``before``: how far a round
    (or a server-side step) moved a model, comparable across strategies."""
    keys = [k for k in before if k in after and np.issubdtype(before[k].dtype, np.floating)]
    diff = sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in keys)
    norm = sum(float(np.sum(before[k].astype(np.float64) ** 2)) for k in keys)
    return float(np.sqrt(diff / norm)) if norm > 0 else 0.0


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: a.numpy() for k, a in record.items()}


class HeteroEENStrategy(Strategy):
    """Base of every fedeen strategy: element-wise averaging of depth-scaled submodels."""

    name: ClassVar[str] = "base"
    objective: ClassVar[str] = "sum_ce"

    def __init__(self, cfg: RunConfig, family: EENFamily) -> None:
        self.cfg, self.family = cfg, family
        self.global_state: State = {}
        self.node_levels: dict[int, int] = {}
        # stable per-node keys (partition ids): Flower's node ids are random in every run, so
        # sampling and reply order are keyed by these to make runs reproducible from the seed
        self.node_keys: dict[int, int] = {}
        self.rng = random.Random(cfg.seed)
        self.rejected: dict[int, list[str]] = {}
        self._sent: dict[int, int] = {}
        self._last_record: ArrayRecord | None = None
        self._step_seconds = 0.0
        self._last_train_updates: list[ClientUpdate] = []

    # ------------------------------------------------------------------ hooks
    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Reject run configs the method cannot run (raise ConfigError); none by default."""

    @classmethod
    def family_name(cls, cfg: RunConfig) -> str:
        """The model family this method trains for ``cfg.model`` (a variant if it needs one)."""
        return cfg.model

    def level_spec(self, level: int) -> SubmodelSpec:
        """Depth scaling: level k holds the first k exits at full width."""
        return SubmodelSpec(level, 1.0)

    def eligible(self, level: int) -> bool:
        return True

    def arrays_for(self, node_id: int, level: int) -> State:
        return slice_state(self.global_state, self.family.shapes(self.level_spec(level)))

    def client_config(self, server_round: int, level: int) -> dict[str, Any]:
        spec = self.level_spec(level)
        return {
            "server-round": server_round,
            "num-rounds": self.cfg.num_server_rounds,
            "level": level,
            "depth": spec.depth,
            "width": spec.width,
            "objective": self.objective,
            "lr": self.cfg.lr * self.cfg.lr_decay ** (server_round - 1),
        }

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> State:
        """Every element averaged over the replies that hold it, weighted by examples."""
        return scatter_mean(self.global_state, ((u.state, u.num_examples) for u in updates))

    def server_step(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """Server-side work after aggregation (distillation, ...); returns metrics to log."""
        return {}

    def exit_states(self) -> dict[int, State]:
        """Exits to evaluate on another model than the global one: {exit (1-based): state of
        the submodel of that depth}. None by default (InclusiveFL: each level's own model)."""
        return {}

    def record_problems(self, update: ClientUpdate) -> str | None:
        """Why a reply's extra records are unusable (None if they are fine or unused)."""
        return None

    def extra_central_metrics(self, logits: list, y: Any) -> dict[str, float]:
        """Method-specific central metrics from every exit's test logits (none by default)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Server-side state beyond the global model, for checkpoints."""
        return {"node_levels": dict(self.node_levels), "node_keys": dict(self.node_keys),
                "rng": self.rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.node_levels = dict(state["node_levels"])
        self.node_keys = dict(state.get("node_keys", {}))
        self.rng.setstate(state["rng"])

    # ------------------------------------------------------------------ nodes and levels
    def discover_levels(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
        """Ask each node whose level we do not know yet, once; cache the answers."""
        unknown = [n for n in node_ids if n not in self.node_levels]
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
            if not 1 <= level <= self.cfg.num_levels:
                log(logging.WARNING, "node %s reported budget level %s outside 1..%s; ignored",
                    node, level, self.cfg.num_levels)
                continue
            self.node_levels[node] = level
            key = int(reply.content["metrics"].get(QUERY_KEY, -1))
            self.node_keys[node] = key if key >= 0 else node

    def node_key(self, node: int) -> int:
        return self.node_keys.get(node, node)

    def wait_for_nodes(self, grid: Grid, timeout: float = NODE_WAIT_SECONDS) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.cfg.min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} node(s) connected after {timeout:.0f}s but min-nodes = "
                    f"{self.cfg.min_nodes}; start more SuperNodes (num-supernodes in simulation) "
                    "or lower min-nodes")
            log(logging.INFO, "waiting for nodes: %d connected, %d required", len(nodes),
                self.cfg.min_nodes)
            time.sleep(1)
        return nodes

    def sample(self, nodes: list[int], fraction: float) -> list[int]:
        """Sample among eligible nodes, redrawing (as the authors' sampler) until every
        eligible level present in the population is represented, when the sample allows it."""
        pool = sorted((n for n in nodes if n in self.node_levels
                       and self.eligible(self.node_levels[n])), key=self.node_key)
        if not pool:
            return []
        size = max(1, int(round(fraction * len(pool))))
        levels = {self.node_levels[n] for n in pool}
        chosen = self.rng.sample(pool, size)
        for _ in range(100):
            if size < len(levels) or {self.node_levels[n] for n in chosen} == levels:
                break
            chosen = self.rng.sample(pool, size)
        return sorted(chosen, key=self.node_key)

    # ------------------------------------------------------------------ Flower API
    def _sync_global(self, arrays: ArrayRecord) -> None:
        if arrays is not self._last_record:
            self.global_state = from_record(arrays)
            self._last_record = arrays

    def _messages(self, grid: Grid, server_round: int, fraction: float, config: ConfigRecord,
                  message_type: str) -> list[Message]:
        nodes = self.wait_for_nodes(grid)
        self.discover_levels(grid, nodes, timeout=600)
        msgs = []
        for node in self.sample(nodes, fraction):
            level = self.node_levels[node]
            cfg = ConfigRecord({**dict(config), **self.client_config(server_round, level)})
            content = RecordDict({"arrays": to_record(self.arrays_for(node, level)), "config": cfg})
            msgs.append(Message(content=content, message_type=message_type, dst_node_id=node))
            self._sent[node] = level
        return msgs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sync_global(arrays)
        return self._messages(grid, server_round, self.cfg.fraction_train, config,
                              MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.cfg.fraction_evaluate <= 0:
            return []
        self._sync_global(arrays)
        return self._messages(grid, server_round, self.cfg.fraction_evaluate, config,
                              MessageType.EVALUATE)

    def validate_reply(self, msg: Message) -> ClientUpdate | str:
        """The reply as a ClientUpdate, or why it is rejected."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if node not in self._sent:
            return "reply from a node that was not sent a model"
        content = msg.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return "reply lacks its 'arrays' or 'metrics' record"
        metrics = dict(content["metrics"])
        n = metrics.get("num-examples")
        if not isinstance(n, (int, float)) or n <= 0:
            return f"num-examples must be a positive number, got {n!r}"
        level = self._sent[node]
        spec = self.level_spec(level)
        state = from_record(content["arrays"])
        dtypes = {k: self.global_state[k].dtype for k in self.family.shapes(spec)}
        problems = reply_problems(state, self.family.shapes(spec), dtypes)
        if problems:
            return "; ".join(problems[:5])
        records = {name: from_record(rec) for name, rec in content.array_records.items()
                   if name != "arrays"}
        update = ClientUpdate(node, level, spec, state, int(n), metrics, records)
        return self.record_problems(update) or update

    def collect(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        updates = []
        for msg in replies:
            result = self.validate_reply(msg)
            if isinstance(result, str):
                node = msg.metadata.src_node_id
                self.rejected.setdefault(node, []).append(result)
                log(logging.WARNING, "rejected reply from node %s: %s", node, result)
            else:
                updates.append(result)
        # arrival order varies between runs; the server's float sums and draws must not
        return sorted(updates, key=lambda u: (u.level, self.node_key(u.node_id)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = self.collect(replies)
        self._last_train_updates = updates
        metrics: dict[str, Any] = {"clients-ok": len(updates),
                                   "clients-failed": len(replies) - len(updates)}
        if not updates:
            return None, MetricRecord(metrics)
        before = self.global_state
        self.global_state = self.aggregate(server_round, updates)
        t0 = time.perf_counter()
        metrics.update(self.server_step(server_round, updates))
        self._step_seconds = time.perf_counter() - t0
        metrics["global-rel-change"] = relative_change(before, self.global_state)
        total = sum(u.num_examples for u in updates)
        metrics["train-loss"] = sum(float(u.metrics.get("train-loss", 0.0)) * u.num_examples
                                    for u in updates) / total
        metrics["num-examples"] = total
        record = to_record(self.global_state)
        self._last_record = record
        return record, MetricRecord(metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Per-exit accuracy averaged over the clients holding that exit, by examples."""
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            m = dict(msg.content["metrics"])
            n = float(m.get("num-examples", 0))
            for k, v in m.items():
                if k != "num-examples" and isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + n * float(v)
                    weights[k] = weights.get(k, 0.0) + n
        if not sums:
            return None
        return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})

    def summary(self) -> None:
        log(logging.INFO, "%s: %d budget levels %s, objective %s, model %s", self.name,
            self.cfg.num_levels, [self.level_spec(k) for k in range(1, self.cfg.num_levels + 1)],
            self.objective, self.family.name)

    # ------------------------------------------------------------------ the rounds
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              observer: RoundObserver | None = None, first_round: int = 1) -> Result:
        """Flower's round loop, timed phase by phase and reported to ``observer``."""
        self.summary()
        observer = observer or RoundObserver()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        arrays = initial_arrays
        if evaluate_fn and first_round == 1:
            res = evaluate_fn(0, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for rnd in range(first_round, num_rounds + 1):
            t = RoundTimings()
            t_start = time.perf_counter()
            messages = list(self.configure_train(rnd, arrays, train_config, grid))
            t1 = time.perf_counter()
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            t2 = time.perf_counter()
            self._step_seconds = 0.0
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            t3 = time.perf_counter()
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            eval_metrics = None
            eval_msgs = list(self.configure_evaluate(rnd, arrays, evaluate_config, grid))
            if eval_msgs:
                eval_metrics = self.aggregate_evaluate(
                    rnd, grid.send_and_receive(eval_msgs, timeout=timeout))
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[rnd] = eval_metrics
            t4 = time.perf_counter()
            central = evaluate_fn(rnd, arrays) if evaluate_fn else None
            if central is not None:
                result.evaluate_metrics_serverapp[rnd] = central
            t5 = time.perf_counter()
            train_secs = [float(u.metrics.get("train-seconds", 0.0)) for u in self._last_train_updates]
            t.configure, t.clients = t1 - t_start, t2 - t1
            t.server_step = self._step_seconds
            t.aggregate = t3 - t2 - t.server_step
            t.federated_eval, t.central_eval, t.total = t4 - t3, t5 - t4, t5 - t_start
            t.client_train_max = max(train_secs, default=0.0)
            t.client_train_sum = sum(train_secs)
            observer.round_done(rnd, dict(central) if central is not None else None,
                                dict(train_metrics or {}), dict(eval_metrics or {}), t, self)
        return result
