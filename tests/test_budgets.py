import pytest

from fedeen.budgets import level_counts, level_for_partition, node_level
from fedeen.config import ConfigError


def test_equal_mix_assigns_by_index():
    assert [level_for_partition(i, 8, (0.25,) * 4) for i in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_skewed_mix():
    ratios = (0.4, 0.3, 0.2, 0.1)
    assert level_counts(10, ratios) == [4, 3, 2, 1]
    assert [level_for_partition(i, 10, ratios) for i in range(10)] == [1] * 4 + [2] * 3 + [3] * 2 + [4]


def test_counts_always_sum_to_clients():
    for n in range(1, 30):
        assert sum(level_counts(n, (0.4, 0.3, 0.2, 0.1))) == n


def test_node_config_level_wins_and_is_checked():
    assert node_level({"budget-level": 3, "partition-id": 0, "num-partitions": 4}, (0.25,) * 4) == 3
    with pytest.raises(ConfigError, match="outside 1..4"):
        node_level({"budget-level": 5}, (0.25,) * 4)
    with pytest.raises(ConfigError, match="budget-level, or partition-id"):
        node_level({}, (0.25,) * 4)
