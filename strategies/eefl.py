"""EEFL: plain early-exit FedAvg over depth-scaled submodels (docs/methods/eefl.md).

Every client trains all of its exits with the sum of cross-entropies; the server averages
each tensor over the clients that hold it, weighted by examples. It is exactly the base.
"""
from __future__ import annotations

from strategies.base import HeteroEENStrategy
from strategies.registry import register


@register("eefl")
class EEFL(HeteroEENStrategy):
    objective = "sum_ce"
