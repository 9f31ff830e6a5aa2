"""The strategy base driven through whole rounds in-process (real client code, no Ray)."""
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

import strategies
from inprocess import InProcessGrid, make_strategy, train_round
from fedeen.app_config import load_config
from fedeen.data import source_for
from fedeen.app_config import family_for
from fedeen.protocol import to_record
from strategies.base import ClientUpdate

FAST = {"num-server-rounds": 1, "max-test-samples": 100}




def test_each_node_gets_its_own_submodel_and_levels_are_queried_once(out_dir):
    rc = {**FAST, "out-dir": out_dir}
    grid = InProcessGrid(rc, 8)
    strategy = make_strategy(rc)
    msgs, (arrays, metrics) = train_round(strategy, grid)
    queries = [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]
    assert len(queries) == 8
    levels = {m.metadata.dst_node_id: m.content["config"]["depth"] for m in msgs}
    assert sorted(levels.values()) == [1, 1, 2, 2, 3, 3, 4, 4]
    for m in msgs:
        keys = set(m.content["arrays"].keys())
        assert keys == set(strategy.family.shapes(strategy.level_spec(m.content["config"]["level"])))
    assert metrics["clients-ok"] == 8 and metrics["clients-failed"] == 0
    train_round(strategy, grid, 2)
    assert len([m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]) == 8


def test_reply_without_examples_is_rejected(out_dir):
    strategy = make_strategy({**FAST, "out-dir": out_dir})
    msg = Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 0})}),
                  message_type=MessageType.TRAIN, dst_node_id=7)
    strategy._sent[msg.metadata.src_node_id] = 1  # pretend this node was sent a model
    result = strategy.validate_reply(msg)
    assert isinstance(result, str) and "num-examples" in result


def test_aggregate_weights_by_examples_over_holders(out_dir):
    strategy = make_strategy({**FAST, "out-dir": out_dir})
    fam = strategy.family
    g = strategy.global_state
    key = "exits.0.fc.bias"
    shapes1 = fam.shapes(strategy.level_spec(1))
    s1 = {k: np.zeros(s, g[k].dtype) for k, s in shapes1.items()}
    s2 = {k: np.ones(s, g[k].dtype) for k, s in fam.shapes(strategy.level_spec(2)).items()}
    ups = [ClientUpdate(1, 1, strategy.level_spec(1), s1, 30, {}),
           ClientUpdate(2, 2, strategy.level_spec(2), s2, 10, {})]
    new = strategy.aggregate(1, ups)
    np.testing.assert_allclose(new[key], 10 / 40)          # held by both: weighted mean
    np.testing.assert_allclose(new["exits.1.fc.bias"], 1)  # held by level 2 only
    np.testing.assert_array_equal(new["exits.3.fc.bias"], g["exits.3.fc.bias"])  # by nobody


SMALL_VIT = {"model": "vit", "vit-blocks": 4, "vit-dim": 32, "vit-heads": 2, "image-size": 16}


@pytest.mark.parametrize("name", strategies.available())
def test_every_registered_strategy_runs_a_round_in_process(name, out_dir):
    from fedeen.config import ConfigError
    from fedeen.server_app import run

    rc = {**FAST, "strategy": name, "out-dir": out_dir, "max-samples-per-client": 60}
    try:
        cfg = load_config(rc)
    except ConfigError:  # a method that needs the ViT backbone
        rc.update(SMALL_VIT)
        cfg = load_config(rc)
    summary = run(InProcessGrid(rc, 4), cfg)
    assert summary["rounds"][0]["train"]["clients-failed"] == 0
    assert summary["rounds"][0]["train"]["global-rel-change"] > 0
    assert all(summary["final"][f"acc-exit-{j}"] is not None for j in range(1, 5))


def test_relative_change_on_a_hand_made_case():
    from strategies.base import relative_change

    before = {"w": np.array([3.0, 4.0], np.float32), "steps": np.array([7], np.int64)}
    after = {"w": np.array([3.0, 4.5], np.float32), "steps": np.array([9], np.int64)}
    assert relative_change(before, after) == pytest.approx(0.5 / 5.0)  # int buffers ignored
    assert relative_change(before, before) == 0.0
