"""Budget levels: which level a node is, from its node config, and the spec of each level.

In deployment an operator sets ``budget-level`` on each SuperNode; in simulation the level is
derived from ``partition-id`` by index, as in the authors' code (the first 25% of clients are
level 1, ...), so that the device mix follows ``budget-ratios``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedeen.config import ConfigError


def level_for_partition(partition_id: int, num_partitions: int, ratios: Sequence[float]) -> int:
    """1-based level of ``partition_id`` when partitions are assigned to levels by index."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    counts = level_counts(num_partitions, ratios)
    upper = 0
    for level, count in enumerate(counts, start=1):
        upper += count
        if partition_id < upper:
            return level
    return len(ratios)


def level_counts(num_clients: int, ratios: Sequence[float]) -> list[int]:
    """Clients per level by largest remainder, so counts sum to ``num_clients`` exactly."""
    raw = [r * num_clients for r in ratios]
    counts = [int(x) for x in raw]
    order = sorted(range(len(ratios)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    return counts


def node_level(node_config: Mapping[str, Any], ratios: Sequence[float]) -> int:
    """A node's budget level: ``budget-level`` if set, else derived from its partition."""
    if "budget-level" in node_config:
        level = int(node_config["budget-level"])
        if not 1 <= level <= len(ratios):
            raise ConfigError(f"node config budget-level={level} is outside 1..{len(ratios)}")
        return level
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ConfigError("node config needs budget-level, or partition-id and num-partitions")
    return level_for_partition(int(node_config["partition-id"]),
                               int(node_config["num-partitions"]), ratios)
