"""ExclusiveFL (docs/methods/exclusivefl.md): only clients that can hold the full EEN take part.

Level-K clients train every exit with the sum of cross-entropies; the server is plain FedAvg
among them (the base's element-wise mean over full models). As in the authors' code, a round
samples as many clients as the other methods do (``fraction-train`` of all nodes, e.g.
0.1 / 0.25 = 40% of the level-K nodes), all of them level K.
"""
from __future__ import annotations

from strategies.base import HeteroEENStrategy
from strategies.registry import register


@register("exclusivefl")
class ExclusiveFL(HeteroEENStrategy):
    objective = "sum_ce"

    def eligible(self, level: int) -> bool:
        return level == self.cfg.num_levels

    def sample(self, nodes: list[int], fraction: float) -> list[int]:
        """The same number of clients per round as the other methods, drawn among level K."""
        known = [n for n in nodes if n in self.nodes.levels]
        pool = [n for n in known if self.eligible(self.nodes.levels[n])]
        if pool:
            fraction = min(1.0, fraction * len(known) / len(pool))
        return super().sample(nodes, fraction)
