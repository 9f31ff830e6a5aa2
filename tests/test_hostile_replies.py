"""Hostile and broken client replies: each is rejected (or its bad metric dropped) with a
reason naming it, the round completes with the good replies, and the global model equals
their aggregate bit for bit. DarkDistill's records are checked too, and a server step that
turns non-finite is discarded."""
from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord,
                      RecordDict)

from fedeen.protocol import DIFFICULTY_RECORD, QUERY_LEVEL, to_record
from inprocess import (HostileGrid, InProcessGrid, first_matrix, make_strategy, rebuild, set_matrix,
                       train_round, with_arrays, with_metric)

FAST = {"num-server-rounds": 1, "max-samples-per-client": 40, "max-test-samples": 40}
DD = {**FAST, "strategy": "darkdistill", "darkdistill-server-epochs": 1, "image-size": 16}

pytestmark = pytest.mark.usefixtures("one_thread")


def oversized_payload(reply, original):
    """An array whose metadata says (2,) but whose payload is 4 MB."""
    arrays = dict(reply.content["arrays"])
    key = first_matrix({k: a.numpy() for k, a in arrays.items()})
    good = arrays[key]
    arrays[key] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype,
                        data=good.data + b"\0" * 4_000_000)
    return [rebuild(reply, original, arrays=ArrayRecord(arrays))]


def error_reply(reply, original):
    return [Message(Error(code=0, reason="dropped by the test"), reply_to=original)]


# kind -> (tamper, accepted?, words of the rejection)
TRAIN_CASES = {
    "num-examples NaN": (with_metric(num_examples=float("nan")), False, "num-examples"),
    "num-examples inf": (with_metric(num_examples=float("inf")), False, "num-examples"),
    "num-examples list": (with_metric(num_examples=[1.0, 2.0]), False, "num-examples"),
    "num-examples 0.5": (with_metric(num_examples=0.5), False, "num-examples"),
    "num-examples 0": (with_metric(num_examples=0), False, "num-examples"),
    "num-examples negative": (with_metric(num_examples=-3), False, "num-examples"),
    "num-examples 1e12": (with_metric(num_examples=1e12), False, "exceeds"),
    "train-loss list": (with_metric(train_loss=[1.0, 2.0]), True, ""),
    "train-seconds list": (with_metric(train_seconds=[1.0]), True, ""),
    "train-loss NaN": (with_metric(train_loss=float("nan")), True, ""),
    "tensor NaN": (with_arrays(set_matrix(np.nan)), False, "non-finite"),
    "tensor inf": (with_arrays(set_matrix(np.inf)), False, "non-finite"),
    "tensor shape": (with_arrays(set_matrix(shape=True)), False, "shape"),
    "tensor dtype": (with_arrays(set_matrix(dtype=np.float64)), False, "float64"),
    "extra tensor": (with_arrays(lambda a: a.update({"blocks.99.w": np.zeros(3, np.float32)})),
                     False, "outside its spec"),
    "missing tensor": (with_arrays(lambda a: a.pop(first_matrix(a))), False, "missing"),
    "oversized payload": (oversized_payload, False, "payload bytes"),
    "extra array record": (lambda r, o: [rebuild(r, o, junk=ArrayRecord(
        {"x": Array(np.zeros(10_000, np.float32))}))], False, "records"),
    "extra config record": (lambda r, o: [rebuild(r, o, note=ConfigRecord({"a": 1}))], False,
                            "records"),
    "no metrics record": (lambda r, o: [Message(RecordDict({"arrays": r.content["arrays"]}),
                                                reply_to=o)], False, "'metrics'"),
    "no arrays record": (lambda r, o: [Message(RecordDict({"metrics": r.content["metrics"]}),
                                               reply_to=o)], False, "'arrays'"),
    "same reply twice": (lambda r, o: [r, rebuild(r, o)], True, "second reply"),
    "client error": (error_reply, False, "client error"),
}


def final_state(rc, tamper, kind=MessageType.TRAIN):
    strategy = make_strategy(rc)
    grid = HostileGrid(rc, tamper, kind)
    _, (arrays, metrics) = train_round(strategy, grid)
    assert arrays is not None, "the round must complete with the good replies"
    return strategy, grid, {k: a.numpy() for k, a in arrays.items()}, metrics


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_a_hostile_train_reply_never_changes_what_the_good_replies_give(case):
    tamper, accepted, needle = TRAIN_CASES[case]
    strategy, grid, state, metrics = final_state(FAST, tamper)
    node = grid.node_ids[0]
    if accepted:  # the reply's model is fine: the round equals an untouched round
        _, _, expected, _ = final_state(FAST, lambda r, o: [r])
    else:         # the round equals one where that node's reply never came
        _, _, expected, _ = final_state(FAST, error_reply)
        assert any(needle in why for why in strategy.rejected[node]), strategy.rejected
    if needle and accepted:
        assert any(needle in why for why in strategy.rejected[node]), strategy.rejected
    assert metrics["clients-ok"] == (4 if accepted else 3)
    assert all(math.isfinite(v) for v in metrics.values())
    assert state.keys() == expected.keys()
    for k in state:
        assert np.array_equal(state[k], expected[k]), f"{case}: {k} differs"


def test_a_reply_from_a_node_that_was_not_asked_is_rejected():
    def impostor(reply, original):
        fake = rebuild(reply, original)
        fake.metadata._src_node_id = 424242  # not a sampled node (Flower has no setter)
        return [reply, fake]
    strategy = make_strategy(FAST)
    _, (_, metrics) = train_round(strategy, HostileGrid(FAST, impostor))
    assert "not asked this round" in strategy.rejected[424242][0]
    assert metrics["clients-ok"] == 4


# ---------------------------------------------------------------------- evaluate replies
EVAL = {**FAST, "fraction-evaluate": 1.0}
EVAL_CASES = {
    "accuracy 1e9": (with_metric(acc_exit_1=1e9), "outside"),
    "negative examples": (with_metric(num_examples=-5), "num-examples"),
    "examples list": (with_metric(num_examples=[3.0]), "num-examples"),
    "accuracy NaN": (with_metric(acc_exit_1=float("nan")), "not finite"),
    "too many examples": (with_metric(num_examples=10**9), "exceeds"),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_a_hostile_evaluate_reply_is_rejected_and_the_others_are_averaged(case):
    tamper, needle = EVAL_CASES[case]

    def evaluate(strategy, grid):
        msgs = strategy.configure_evaluate(1, to_record(strategy.global_state), ConfigRecord(),
                                           grid)
        return strategy.aggregate_evaluate(1, grid.send_and_receive(msgs))

    strategy = make_strategy(EVAL)
    grid = HostileGrid(EVAL, tamper, MessageType.EVALUATE)
    got = dict(evaluate(strategy, grid))
    assert any(needle in why for why in strategy.rejected[grid.node_ids[0]])
    clean = make_strategy(EVAL)
    want = dict(evaluate(clean, HostileGrid(EVAL, error_reply, MessageType.EVALUATE)))
    assert got == want and all(0 <= v <= 1 for k, v in got.items() if k.startswith("acc-"))


# ---------------------------------------------------------------------- query answers
@pytest.mark.parametrize("answer", [{}, {QUERY_LEVEL: float("nan")}, {QUERY_LEVEL: [1.0]},
                                    {QUERY_LEVEL: 9}, None, {QUERY_LEVEL: 1}],
                         ids=["no level", "NaN level", "list level", "level 9", "no metrics",
                              "no example counts"])
def test_a_bad_level_answer_leaves_that_node_out_and_the_round_goes_on(answer):
    def tamper(reply, original):
        if answer is None:
            return [Message(RecordDict({}), reply_to=original)]
        return [rebuild(reply, original, metrics=MetricRecord(answer))]
    strategy = make_strategy(FAST)
    grid = HostileGrid(FAST, tamper, MessageType.QUERY)
    msgs, (arrays, metrics) = train_round(strategy, grid)
    assert grid.node_ids[0] not in strategy.nodes.levels
    assert {m.metadata.dst_node_id for m in msgs} == set(grid.node_ids[1:])
    assert arrays is not None and metrics["clients-ok"] == 3


# ---------------------------------------------------------------------- DarkDistill's records
def with_record(labels=None, difficulty=None):
    def tamper(reply, original):
        rec = {k: a.numpy() for k, a in reply.content[DIFFICULTY_RECORD].items()}
        if labels is not None:
            rec["labels"] = labels(rec["labels"])
        if difficulty is not None:
            rec["difficulty"] = difficulty(rec["difficulty"])
        return [rebuild(reply, original, **{DIFFICULTY_RECORD: ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in rec.items()})})]
    return tamper


RECORD_CASES = {
    "difficulty 1e38 (finite float32)": with_record(difficulty=lambda d: np.full_like(d, 1e38)),
    "difficulty 1e300 (inf as float32)": with_record(
        difficulty=lambda d: np.full(d.shape, 1e300, np.float64)),
    "negative difficulty": with_record(difficulty=lambda d: -np.abs(d) - 1),
    "NaN difficulty": with_record(difficulty=lambda d: np.full_like(d, np.nan)),
    "2,000,000 pairs": with_record(labels=lambda y: np.zeros(2_000_000, np.int64),
                                   difficulty=lambda d: np.ones(2_000_000, np.float32)),
    "label out of range": with_record(labels=lambda y: y + 100),
    "no record": lambda r, o: [rebuild(r, o, **{DIFFICULTY_RECORD: None})],
}


@pytest.mark.parametrize("case", RECORD_CASES)
def test_a_poisoned_difficulty_record_is_rejected_and_darkdistill_stays_finite(case):
    strategy, grid, state, metrics = final_state(DD, RECORD_CASES[case])
    assert strategy.rejected.get(grid.node_ids[0]), case
    assert metrics["clients-ok"] == 3
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
    for level in strategy.level_models.values():
        assert all(np.isfinite(v).all() for v in level.values() if v.dtype.kind == "f")
    for g in strategy.generators.values():
        assert all(t.isfinite().all() for t in g.state_dict().values() if t.is_floating_point())
    _, _, expected, _ = final_state(DD, error_reply)
    assert all(np.array_equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("strategy_name", ["darkdistill", "darkdistill-pl"])
def test_a_server_step_that_turns_non_finite_is_discarded(strategy_name, monkeypatch):
    rc = {**DD, "strategy": strategy_name}
    strategy = make_strategy(rc)
    generators_before = {k: {n: t.clone() for n, t in g.state_dict().items()}
                         for k, g in strategy.generators.items()}
    step = type(strategy).server_step

    def poisoned(self, server_round, state, updates):
        new, metrics = step(self, server_round, state, updates)
        for g in self.generators.values():  # as a diverging step would
            for p in g.parameters():
                p.data.fill_(float("nan"))
        return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                for k, v in new.items()}, metrics

    monkeypatch.setattr(type(strategy), "server_step", poisoned)
    _, (arrays, metrics) = train_round(strategy, InProcessGrid(rc, 4))
    assert metrics["server-step-discarded"] == 1
    state = {k: a.numpy() for k, a in arrays.items()}
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
    for k, g in strategy.generators.items():
        for n, t in g.state_dict().items():
            assert t.equal(generators_before[k][n]), "a discarded step must not train generators"
