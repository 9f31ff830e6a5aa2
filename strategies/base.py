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
from fedeen.rounds import RoundObserver, RoundTimings, RunFailed
from models.base import SubmodelSpec
from models.family import EENFamily
from models.options import Options
from models.state import State
from models.submodel import (reply_problems, scale_update, scatter_mean, scatter_median,
                             scatter_trimmed_mean, slice_state, update_norm)
from strategies.nodes import NodeDirectory
from strategies.replies import example_count, finite_scalars, record_layout_problem

#: metrics an evaluate reply may report and their valid range
EVAL_RANGES = {"acc-": (0.0, 1.0), "loss": (0.0, float("inf"))}


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
        # this round's messages: node -> level sent, and the nodes that already replied
        self._sent: dict[int, int] = {}
        self._replied: set[int] = set()
        self._sent_eval: dict[int, int] = {}
        self._replied_eval: set[int] = set()
        self._last_record: ArrayRecord | None = None
        self._step_seconds = 0.0
        self._train_seconds: list[float] = []

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
        """Every element averaged over the replies that hold it (``average``)."""
        return self.average(self.global_state, updates)

    def average(self, base: Mapping[str, np.ndarray], updates: list[ClientUpdate]) -> State:
        """The ``aggregation`` of the run over the replies holding each element of ``base``:
        the mean weighted by examples (default), or the unweighted coordinate-wise median or
        trimmed mean; elements nobody holds keep ``base``'s value."""
        if self.cfg.aggregation == "median":
            return scatter_median(base, [u.state for u in updates])
        if self.cfg.aggregation == "trimmed-mean":
            return scatter_trimmed_mean(base, [u.state for u in updates], self.cfg.trim_fraction)
        return scatter_mean(base, ((u.state, u.num_examples) for u in updates))

    def server_step(self, server_round: int, state: State, updates: list[ClientUpdate]
                    ) -> tuple[State, dict[str, float]]:
        """Server-side work after aggregation (distillation, ...): takes the aggregated state,
        returns the new global state and metrics to log. Identity by default."""
        return state, {}

    def exit_states(self) -> dict[int, State]:
        """Exits to evaluate on another model than the global one: {exit (1-based): state of
        the submodel of that depth}. None by default (InclusiveFL: each level's own model)."""
        return {}

    def use_server_data(self, val: Any) -> None:
        """The server's validation hold-out (``fedeen.data.Tensors``), for strategies whose
        server step measures itself on real inputs; unused by default."""

    def expected_records(self, num_examples: int) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """Extra array records a train reply of ``num_examples`` examples must carry: record
        name -> {array name: (shape, dtype kinds)}; none by default. Anything else is refused."""
        return {}

    def record_problems(self, update: ClientUpdate) -> str | None:
        """Why a reply's extra records are unusable (None if they are fine or unused)."""
        return None

    def server_snapshot(self) -> Any:
        """Server-side state that ``server_step`` changes besides the global model, copied, so
        that a step whose result is not finite can be undone; None by default."""
        return None

    def restore_server_snapshot(self, snapshot: Any, state: State) -> None:
        """Undo a discarded ``server_step``: restore ``snapshot``; ``state`` is the aggregated
        state the round keeps instead."""

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
        return msgs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sync_global(arrays)
        msgs = self._messages(grid, server_round, self.cfg.fraction_train, config,
                              MessageType.TRAIN)
        self._sent = {m.metadata.dst_node_id: self.nodes.levels[m.metadata.dst_node_id]
                      for m in msgs}
        self._replied = set()
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.cfg.fraction_evaluate <= 0:
            return []
        self._sync_global(arrays)
        msgs = self._messages(grid, server_round, self.cfg.fraction_evaluate, config,
                              MessageType.EVALUATE)
        self._sent_eval = {m.metadata.dst_node_id: self.nodes.levels[m.metadata.dst_node_id]
                           for m in msgs}
        self._replied_eval = set()
        return msgs

    # ------------------------------------------------------------------ replies (untrusted)
    def validate_reply(self, msg: Message) -> ClientUpdate | str:
        """The train reply as a ClientUpdate, or why it is rejected. Any exception while
        reading it is the reply's fault and becomes a rejection."""
        try:
            return self._read_train_reply(msg)
        except Exception as err:  # noqa: BLE001
            return f"unreadable reply ({type(err).__name__}: {err})"

    @staticmethod
    def first_reply_problem(msg: Message, sent: Mapping[int, int], replied: set[int]) -> str | None:
        """Why ``msg`` is not the first, error-free reply of a node that was asked this round
        (and marks its node as having replied)."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if node not in sent:
            return "reply from a node that was not asked this round"
        if node in replied:
            return "a second reply from this node in this round"
        replied.add(node)
        return None

    def _read_train_reply(self, msg: Message) -> ClientUpdate | str:
        node = msg.metadata.src_node_id
        problem = self.first_reply_problem(msg, self._sent, self._replied)
        if problem:
            return problem
        content = msg.content
        if set(content.metric_records) != {"metrics"} or "arrays" not in content.array_records:
            return "a train reply needs one 'metrics' record and an 'arrays' record"
        n = example_count(content["metrics"].get(NUM_EXAMPLES), self.nodes.train_examples.get(node))
        if isinstance(n, str):
            return n
        level = self._sent[node]
        spec = self.level_spec(level)
        shapes = self.family.shapes(spec)
        dtypes = {k: self.global_state[k].dtype for k in shapes}
        problem = record_layout_problem(content["arrays"], {k: (s, dtypes[k].kind)
                                                            for k, s in shapes.items()})
        if problem:
            return f"arrays: {problem}"
        expected = self.expected_records(n)
        extra = set(content.array_records) - {"arrays"}
        if extra != set(expected) or content.config_records:
            return (f"records {sorted(extra | set(content.config_records))} where "
                    f"{sorted(expected)} are expected")
        for name, layout in expected.items():
            problem = record_layout_problem(content[name], layout)
            if problem:
                return f"{name}: {problem}"
        state = from_record(content["arrays"])
        problems = reply_problems(state, shapes, dtypes)
        if problems:
            return "; ".join(problems[:5])
        metrics, dropped = finite_scalars(dict(content["metrics"]))
        if dropped:
            log(logging.WARNING, "node %s: metrics %s are not finite scalars; not aggregated",
                node, dropped)
        records = {name: from_record(content[name]) for name in expected}
        update = ClientUpdate(node, level, spec, state, n, metrics, records)
        return self.record_problems(update) or update

    def collect(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        updates = []
        for msg in replies:
            result = self.validate_reply(msg)
            if isinstance(result, str):
                self.reject(msg.metadata.src_node_id, result)
            else:
                updates.append(result)
        # arrival order varies between runs; the server's float sums and draws must not
        updates = sorted(updates, key=lambda u: (u.level, self.nodes.key(u.node_id)))
        return self.bound_updates(updates)

    def reject(self, node: int, why: str) -> None:
        self.rejected.setdefault(node, []).append(why)
        log(logging.WARNING, "rejected reply from node %s: %s", node, why)

    def bound_updates(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """With ``update-norm-bound`` b > 0: every update whose norm (from the model its node
        was sent) exceeds b times the round's median update norm is scaled down to that."""
        bound = self.cfg.update_norm_bound
        if bound <= 0 or len(updates) < 2:
            return updates
        sent = [self.arrays_for(u.node_id, u.level) for u in updates]
        norms = [update_norm(u.state, ref) for u, ref in zip(updates, sent)]
        limit = bound * float(np.median(norms))
        for u, ref, norm in zip(updates, sent, norms):
            if norm > limit > 0:
                log(logging.WARNING, "node %s: update norm %.3g scaled to %.3g (%g x median)",
                    u.node_id, norm, limit, bound)
                u.state = scale_update(u.state, ref, limit / norm)
        return updates

    def aggregate_updates(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Aggregate validated updates, run the server step and install the new global state
        (the one place it is written during a run); returns the server-side metrics. A server
        step whose result is not finite is discarded: the round keeps the aggregated state."""
        before = self.global_state
        aggregated = self.aggregate(server_round, updates)
        snapshot = self.server_snapshot()
        t0 = time.perf_counter()
        new_state, metrics = self.server_step(server_round, aggregated, updates)
        self._step_seconds = time.perf_counter() - t0
        bad = [k for k, v in new_state.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            log(logging.WARNING, "round %d: the server step produced non-finite values in %d "
                "tensors (e.g. %s); discarded, the round keeps the aggregated model",
                server_round, len(bad), bad[:3])
            self.restore_server_snapshot(snapshot, aggregated)
            new_state = aggregated
            metrics = {**{k: v for k, v in metrics.items() if np.isfinite(v)},
                       "server-step-discarded": 1}
        self._global_state = new_state
        return {**metrics, "global-rel-change": relative_change(before, new_state)}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = self.collect(replies)
        self._train_seconds = [u.metrics.get("train-seconds", 0.0) for u in updates]
        metrics: dict[str, Any] = {"clients-ok": len(updates),
                                   "clients-failed": len(replies) - len(updates)}
        if not updates:
            return None, MetricRecord(metrics)
        metrics.update(self.aggregate_updates(server_round, updates))
        total = sum(u.num_examples for u in updates)
        metrics["train-loss"] = sum(u.metrics.get("train-loss", 0.0) * u.num_examples
                                    for u in updates) / total
        metrics[NUM_EXAMPLES] = total
        pairs = [u for u in updates if u.metrics.get("split-active") == 1]
        if pairs:  # edge/cloud split pairs that trained with their cloud (clients.split)
            metrics["split-pairs"] = len(pairs)
            metrics["split-mbytes"] = sum(float(u.metrics.get("split-bytes", 0.0))
                                          for u in pairs) / 1e6
        record = to_record(self.global_state)
        self._last_record = record
        return record, MetricRecord(metrics)

    def _read_eval_reply(self, msg: Message) -> tuple[int, dict[str, float]] | str | None:
        """(examples, metrics) of an evaluate reply, None for a node with nothing to
        evaluate, or why it is rejected."""
        node = msg.metadata.src_node_id
        problem = self.first_reply_problem(msg, self._sent_eval, self._replied_eval)
        if problem:
            return problem
        if "metrics" not in msg.content.metric_records:
            return "an evaluate reply needs a 'metrics' record"
        metrics = dict(msg.content["metrics"])
        if metrics.get(NUM_EXAMPLES) == 0 and len(metrics) == 1:
            return None
        n = example_count(metrics.pop(NUM_EXAMPLES, None), self.nodes.eval_examples.get(node))
        if isinstance(n, str):
            return n
        kept, dropped = finite_scalars(metrics)
        if dropped:
            return f"metrics {dropped} are not finite scalars"
        for key, value in kept.items():
            low, high = next((r for p, r in EVAL_RANGES.items() if key.startswith(p)),
                             (-np.inf, np.inf))
            if not low <= value <= high:
                return f"{key} = {value!r} is outside [{low}, {high}]"
        return n, kept

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Per-exit accuracy averaged over the clients holding that exit, by examples."""
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for msg in replies:
            try:
                result = self._read_eval_reply(msg)
            except Exception as err:  # noqa: BLE001 - the reply's fault, not the server's
                result = f"unreadable reply ({type(err).__name__}: {err})"
            if isinstance(result, str):
                self.reject(msg.metadata.src_node_id, result)
                continue
            if result is None:
                continue
            n, metrics = result
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + n * v
                weights[k] = weights.get(k, 0.0) + n
        if not sums:
            return None
        return MetricRecord({k: sums[k] / weights[k] for k in sums})

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
        idle_rounds: list[int] = []  # consecutive rounds without an accepted reply
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
            idle_rounds = idle_rounds + [rnd] if new_arrays is None else []
            if len(idle_rounds) >= self.cfg.max_failed_rounds:
                raise RunFailed(self.idle_cause(idle_rounds))
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
            train_secs = self._train_seconds
            t.configure, t.clients = t1 - t_start, t2 - t1
            t.server_step = self._step_seconds
            t.aggregate = t3 - t2 - t.server_step
            t.federated_eval, t.central_eval, t.total = t4 - t3, t5 - t4, t5 - t_start
            t.client_train_max = max(train_secs, default=0.0)
            t.client_train_sum = sum(train_secs)
            observer.round_done(rnd, dict(central) if central is not None else None,
                                dict(train_metrics or {}), dict(eval_metrics or {}), t, self)
        if idle_rounds and idle_rounds[0] == first_round:
            raise RunFailed(self.idle_cause(idle_rounds))  # not one round trained anything
        return result

    def idle_cause(self, rounds: list[int]) -> str:
        reasons = sorted({why for whys in self.rejected.values() for why in whys[-1:]})
        return (f"no client reply was accepted in rounds {rounds[0]}..{rounds[-1]} "
                f"(max-failed-rounds = {self.cfg.max_failed_rounds}); last rejections: "
                f"{'; '.join(reasons[:5]) or 'none (no node was sampled)'}")
