"""The ClientApp adapter: names travel with arrays, records and objective state round-trip."""
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedeen.app_config import family_for, load_config
from fedeen.client_app import app, client_for
from fedeen.config import ConfigError
from fedeen.data import load_client_data, source_for
from inprocess import instructions  # (importing it also sets the process's task identity)
from models import SubmodelSpec
from models.submodel import slice_state

RC = {"max-samples-per-client": 40}


def message(depth: int, extra: dict | None = None, mtype=MessageType.TRAIN) -> Message:
    cfg = load_config(RC)
    fam = family_for(cfg, source_for(cfg).info)
    sub = slice_state(fam.init_state(0), fam.shapes(SubmodelSpec(depth)))
    config = instructions({"depth": depth, "lr": 0.05, "level": depth, **(extra or {})}).to_config()
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sub.items()}),
                               "config": ConfigRecord(config)}), message_type=mtype, dst_node_id=5)


def context(state=None) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 2, "num-partitions": 4},
                   state=state if state is not None else RecordDict(), run_config=dict(RC))


def test_train_reply_keeps_names_and_changes_weights():
    msg = message(2)
    reply = app(msg, context())
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    got = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert list(got) == list(sent)
    assert all(got[k].shape == sent[k].shape and got[k].dtype == sent[k].dtype for k in sent)
    assert any(not np.array_equal(got[k], sent[k]) for k in sent)
    m = reply.content["metrics"]
    assert m["num-examples"] > 0 and m["train-loss"] > 0


def test_difficulty_record_round_trips():
    cfg = load_config(RC)
    n = len(load_client_data(cfg, 2, 4).train)
    reply = app(message(1, {"record-difficulty": True}), context())
    rec = reply.content["difficulty"]
    labels, diff = rec["labels"].numpy(), rec["difficulty"].numpy()
    assert labels.shape == diff.shape == (n,)
    assert labels.dtype == np.int64 and diff.dtype == np.float32 and (diff >= 0).all()


def test_objective_state_persists_in_node_state():
    from clients import losses

    name = "test_counting_ce"
    if name not in losses.available():
        @losses.register(name)
        def counting(out, y, ctx):
            ctx.state["calls"] = np.asarray(ctx.state.get("calls", 0)) + 1
            return losses.sum_ce(out, y, ctx)

    state = RecordDict()
    app(message(1, {"objective": name}), context(state))
    first = int(state["objective-state"]["calls"].numpy())
    app(message(1, {"objective": name}), context(state))
    assert int(state["objective-state"]["calls"].numpy()) == 2 * first > 0


def test_evaluate_reports_every_local_exit():
    reply = app(message(3, mtype=MessageType.EVALUATE), context())
    m = reply.content["metrics"]
    assert {f"acc-exit-{j}" for j in (1, 2, 3)} <= set(m) and "acc-exit-4" not in m


def test_query_answers_the_budget_level():
    msg = Message(RecordDict({"config": ConfigRecord({"query": "budget-level"})}),
                  message_type=MessageType.QUERY, dst_node_id=5)
    assert app(msg, context()).content["metrics"]["budget-level"] == 3


def test_mismatched_arrays_fail_loudly():
    # the runtime turns this exception into an error reply, which the strategy rejects
    with pytest.raises(ValueError, match="do not match spec"):
        app(message(2, {"depth": 3}), context())


def test_node_without_partition_is_refused():
    ctx = Context(run_id=1, node_id=1, node_config={"budget-level": 2}, state=RecordDict(),
                  run_config={})
    with pytest.raises(ConfigError, match="partition-id and num-partitions"):
        client_for(ctx)
