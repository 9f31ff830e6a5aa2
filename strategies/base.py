"""The heterogeneous-EEN strategy base: messaging, reply validation, aggregation, rounds.

A concrete strategy overrides only what makes it different: its option group (``Options``),
which nodes take part (``eligible``), what each level receives (``level_spec``,
``arrays_for``), the client objective and its parameters (``objective`` / ``instructions``),
how replies become a global state (``aggregate``) and any server-side step after it
(``server_step``, which takes the aggregated state and returns the new one). The base owns
every write to the global state. Everything is named by state-dict key. Node discovery and
sampling live in ``strategies.nodes``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedeen.config import RunConfig
from fedeen.protocol import NUM_EXAMPLES, Instructions, from_record, to_record
from fedeen.rounds import RoundObserver, RoundTimings
from models.base import SubmodelSpec
from models.family import EENFamily
from models.options import Options
from models.state import State
from models.submodel import reply_problems, scatter_mean, slice_state
from strategies.nodes import NodeDirectory


@dataclass(frozen=True)
class NoOptions(Options):
    """The option group of a strategy without options of its own."""


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


def relative_change(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> float:
    """||after - before|| / ||before|| over the float tensors of ``before``: how far a round
    (or a server-side step) moved a model, comparable across strategies."""
    keys = [k for k in before if k in after and np.issubdtype(before[k].dtype, np.floating)]
    diff = sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in keys)
    norm = sum(float(np.sum(before[k].astype(np.float64) ** 2)) for k in keys)
    return float(np.sqrt(diff / norm)) if norm > 0 else 0.0


class HeteroEENStrategy(Strategy):
    """Base of every fedeen strategy: element-wise averaging of depth-scaled submodels."""

    name: ClassVar[str] = "base"
    objective: ClassVar[str] = "sum_ce"
    #: the strategy's option group (keys ``<prefix>-<field>``); read as ``self.options``
    Options: ClassVar[type[Options]] = NoOptions

    def __init__(self, cfg: RunConfig, family: EENFamily) -> None:
        self.cfg, self.family = cfg, family
        self.options = cfg.options_of(type(self).Options)
        self._global_state: State = {}
        self.nodes = NodeDirectory(cfg.seed, cfg.num_levels)
        self.rejected: dict[int, list[str]] = {}
        self._sent: dict[int, int] = {}
        self._last_record: ArrayRecord | None = None
        self._step_seconds = 0.0
        self._last_train_updates: list[ClientUpdate] = []

    # ------------------------------------------------------------------ the global state
    @property
    def global_state(self) -> State:
        """The global EEN (read-only for subclasses: ``aggregate`` and ``server_step`` return
        new states and the base installs them)."""
        return self._global_state

    def initialize(self, state: Mapping[str, np.ndarray]) -> None:
        """Start from ``state`` (a fresh model or a checkpoint's)."""
        self._global_state = dict(state)
        self._last_record = None

    # ------------------------------------------------------------------ hooks
    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Reject run configs the method cannot run (raise ConfigError); none by default.
        Ranges of the strategy's own options are checked by its option group."""

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

    def instructions(self, server_round: int, level: int) -> Instructions:
        """What a level-``level`` client is told this round (spec, objective, learning rate)."""
        spec = self.level_spec(level)
        return Instructions(
            server_round=server_round, num_rounds=self.cfg.num_server_rounds, level=level,
            depth=spec.depth, width=spec.width, objective=self.objective,
            lr=self.cfg.lr * self.cfg.lr_decay ** (server_round - 1))

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> State:
        """Every element averaged over the replies that hold it, weighted by examples."""
        return scatter_mean(self.global_state, ((u.state, u.num_examples) for u in updates))

    def server_step(self, server_round: int, state: State, updates: list[ClientUpdate]
                    ) -> tuple[State, dict[str, float]]:
        """Server-side work after aggregation (distillation, ...): takes the aggregated state,
        returns the new global state and metrics to log. Identity by default."""
        return state, {}

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
        return self.nodes.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.nodes.load_state_dict(state)

    # ------------------------------------------------------------------ nodes
    def sample(self, nodes: list[int], fraction: float) -> list[int]:
        """This round's nodes among ``nodes`` (see ``NodeDirectory.sample``)."""
        return self.nodes.sample(nodes, fraction, self.eligible)

    # ------------------------------------------------------------------ Flower API
    def _sync_global(self, arrays: ArrayRecord) -> None:
        if arrays is not self._last_record:
            self._global_state = from_record(arrays)
            self._last_record = arrays

    def _messages(self, grid: Grid, server_round: int, fraction: float, config: ConfigRecord,
                  message_type: str) -> list[Message]:
        nodes = self.nodes.wait_for(grid, self.cfg.min_nodes)
        self.nodes.discover(grid, nodes, timeout=600)
        msgs = []
        for node in self.sample(nodes, fraction):
            level = self.nodes.levels[node]
            cfg = ConfigRecord({**dict(config),
                                **self.instructions(server_round, level).to_config()})
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
        n = metrics.get(NUM_EXAMPLES)
        if not isinstance(n, (int, float)) or n <= 0:
            return f"{NUM_EXAMPLES} must be a positive number, got {n!r}"
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
        return sorted(updates, key=lambda u: (u.level, self.nodes.key(u.node_id)))

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Aggregate validated updates, run the server step and install the new global state
        (the one place it is written during a run); returns the server-side metrics."""
        before = self.global_state
        aggregated = self.aggregate(server_round, updates)
        t0 = time.perf_counter()
        new_state, metrics = self.server_step(server_round, aggregated, updates)
        self._step_seconds = time.perf_counter() - t0
        self._global_state = new_state
        return {**metrics, "global-rel-change": relative_change(before, new_state)}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = self.collect(replies)
        self._last_train_updates = updates
        metrics: dict[str, Any] = {"clients-ok": len(updates),
                                   "clients-failed": len(replies) - len(updates)}
        if not updates:
            return None, MetricRecord(metrics)
        metrics.update(self.aggregate_updates(server_round, updates))
        total = sum(u.num_examples for u in updates)
        metrics["train-loss"] = sum(float(u.metrics.get("train-loss", 0.0)) * u.num_examples
                                    for u in updates) / total
        metrics[NUM_EXAMPLES] = total
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
            n = float(m.get(NUM_EXAMPLES, 0))
            for k, v in m.items():
                if k != NUM_EXAMPLES and isinstance(v, (int, float)):
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
