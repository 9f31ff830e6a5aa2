"""Who trains each round: sampling keyed by the seed and stable node keys, a stable reply
order, and a clear error when too few nodes connect."""
import pytest
from flwr.app import ConfigRecord

from fedeen.protocol import to_record
from inprocess import InProcessGrid, make_strategy
from strategies.base import ClientUpdate

RC = {"fraction-train": 0.5, "max-samples-per-client": 30, "max-test-samples": 100}


def sampled_partitions(first_node_id: int) -> list[int]:
    grid = InProcessGrid(RC, 8, first_node_id=first_node_id)
    strategy = make_strategy(RC)
    msgs = strategy.configure_train(1, to_record(strategy.global_state), ConfigRecord(), grid)
    return sorted(m.metadata.dst_node_id - first_node_id for m in msgs)


def test_sampling_depends_on_the_seed_not_on_flowers_random_node_ids():
    assert sampled_partitions(1000) == sampled_partitions(987_654_321) != []


def test_replies_are_aggregated_in_a_stable_order():
    strategy = make_strategy(RC)
    strategy.nodes.keys = {10: 2, 11: 1, 12: 0}
    ups = [ClientUpdate(n, lvl, strategy.level_spec(lvl), {}, 1, {}) for n, lvl in
           [(10, 2), (11, 2), (12, 1)]]
    strategy._sent = {10: 2, 11: 2, 12: 1}
    strategy.validate_reply = lambda msg: msg  # the updates stand in for validated replies
    assert [u.node_id for u in strategy.collect(reversed(ups))] == [12, 11, 10]


def test_too_few_nodes_fail_with_a_clear_error():
    strategy = make_strategy({"min-nodes": 3})
    with pytest.raises(RuntimeError, match="min-nodes = 3"):
        strategy.nodes.wait_for(InProcessGrid({}, 2), strategy.cfg.min_nodes, timeout=0.01)
