"""InclusiveFL (Liu et al., KDD'22, "No One Left Behind"; docs/methods/inclusivefl.md).

Depth scaling; clients train only their deepest exit (``last_exit_ce``), or with
``inclusivefl-train-exits = all`` every local exit under the training policy, as the
DarkDistill authors ran it (then each smaller level's own exit head is group-specific with
its top block, and the other exit heads are shared like any tensor). The server, as the
ReeFL authors' re-implementation:

1. FedAvg within each budget level (weighted by examples) gives the group's pseudo-gradient
   Delta^(k) = theta^(k)_old - theta^(k)_avg on every parameter it holds.
2. The top block of every smaller level k < K (block b_k, 1-based) is group-specific: the
   server keeps level k's own copy (``self.private[k]``) and sends it to level-k clients; the
   global model's copy of that block is the one the deeper levels share. Each exit head is
   owned by the level whose last exit it is (only that level trains it), so exit head k is
   updated from level k alone; it lives in the global state, and deeper levels receive it
   without training it.
3. Momentum distillation, levels processed from the deepest down: for k < K, on every
   parameter of level k's top block (exit heads excluded),
   Delta_top^(k) <- beta * mean_{l in M_k} Delta_l^(k+1) + (1 - beta) * Delta_top^(k),
   beta = ``inclusivefl-beta``, where Delta^(k+1) is level k+1's pseudo-gradient after its own
   distillation (so knowledge cascades down, as in the ReeFL authors' code), and only when
   level k+1 took part this round.
   Mapping blocks to the top block: a tensor of block l is matched to the top-block tensor
   with the same name inside its block (``blocks.<l>.<name>`` to ``blocks.<b_k - 1>.<name>``)
   and the same shape. M_k is the blocks level k+1 adds (b_k+1 .. b_{k+1}; ReeFL; FL-EE also
   counts block b_k). ViT blocks all have one shape, so this is exactly the mean over the
   added blocks. A CNN "block" is a stage, and the stage that level k+1 adds has twice the
   channels of level k's top stage, so no tensor matches: there a top-block tensor takes
   level k+1's pseudo-gradient of the same block (b_k, which level k+1 holds in its shared
   form) as its M_k. The same fallback applies to any tensor without a same-shaped match.
4. Server optimiser on the pseudo-gradient, per level (own Adam moments per level, as both
   reference codes): ``inclusivefl-server-opt`` = "sgd" (theta <- theta_old - Delta) or "adam"
   (FedAdam, beta1 0.9, beta2 0.999, tau 1e-6, eta 1e-3, no bias correction). Buffers
   (BatchNorm statistics) take the group average.
5. Shared tensors: the average of the levels' new values over the levels holding them,
   weighted by the levels' sample counts.

The global model (checkpointed) is the largest model. Central evaluation scores exit k < K on
level k's own model (``level_state(k)``, with its private top block), as the ReeFL authors do:
in the global model exit head k would read the deeper levels' shared copy of block b_k,
which no client trains it with. ``inclusivefl-evaluate-on = global`` scores every exit on the
global model instead, as the DarkDistill authors do (with every exit trained, the global
exit heads are the deeper levels' shared copies, trained on that shared block).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from fedeen.config import RunConfig
from fedeen.protocol import Instructions
from models.options import Options, option
from models.state import State
from models.submodel import ElementwiseMean, slice_state
from strategies.base import ClientUpdate, HeteroEENStrategy
from strategies.registry import register

SERVER_OPTIMIZERS = ("sgd", "adam")
#: ``inclusivefl-train-exits`` value -> the client objective
TRAIN_EXITS = {"last": "last_exit_ce", "all": "sum_ce"}
EVALUATE_ON = ("level-models", "global")


@dataclass(frozen=True)
class InclusiveFLOptions(Options):
    prefix = "inclusivefl"
    beta: float = option(0.2, lambda v: 0 <= v <= 1, "must be in [0, 1]")
    server_opt: str = option("sgd", choices=SERVER_OPTIMIZERS)
    #: "last": clients train their deepest exit only (the paper, ReeFL's port); "all": every
    #: local exit under the training policy (the DarkDistill authors' runs)
    train_exits: str = option("last", choices=tuple(TRAIN_EXITS))
    #: "level-models": exit k < K scored on level k's own model (ReeFL's port); "global":
    #: every exit on the global model (the DarkDistill authors' runs)
    evaluate_on: str = option("level-models", choices=EVALUATE_ON)


ADAM_BETA1, ADAM_BETA2, ADAM_TAU, ADAM_ETA = 0.9, 0.999, 1e-6, 1e-3


@register("inclusivefl")
class InclusiveFL(HeteroEENStrategy):
    objective = "last_exit_ce"
    Options = InclusiveFLOptions

    def __init__(self, cfg: RunConfig, family) -> None:
        super().__init__(cfg, family)
        self.private: dict[int, State] = {}
        self.adam_m: dict[int, State] = {}
        self.adam_v: dict[int, State] = {}
        with torch.device("meta"):
            self.param_keys = {n for n, _ in family.build().named_parameters()}

    # ------------------------------------------------------------------ who holds what
    def top_prefix(self, level: int) -> str:
        return f"blocks.{self.family.exit_after[level - 1] - 1}."

    def level_keys(self, level: int) -> list[str]:
        return list(self.family.shapes(self.level_spec(level)))

    @property
    def all_exits(self) -> bool:
        return self.options.train_exits == "all"

    def private_keys(self, level: int) -> list[str]:
        """Level ``level``'s group-specific tensors (none for the top level): its top block,
        and with every exit trained also its own exit head (its last segment, as the
        DarkDistill authors keep it)."""
        if level == self.cfg.num_levels:
            return []
        own = (self.top_prefix(level),) + ((f"exits.{level - 1}.",) if self.all_exits else ())
        return [k for k in self.level_keys(level) if k.startswith(own)]

    def shared_keys(self, level: int) -> list[str]:
        """What ``level`` averages into the global model: all it holds but its private part
        and, when clients train their last exit only, the exit heads of smaller levels
        (which it does not train)."""
        private = set(self.private_keys(level))
        foreign = () if self.all_exits else tuple(f"exits.{j}." for j in range(level - 1))
        return [k for k in self.level_keys(level)
                if k not in private and not (foreign and k.startswith(foreign))]

    def instructions(self, server_round: int, level: int) -> Instructions:
        return super().instructions(server_round, level).replace(
            objective=TRAIN_EXITS[self.options.train_exits])

    def level_state(self, level: int) -> State:
        """Level ``level``'s model: the global tensors with its own top block."""
        state = slice_state(self.global_state, self.family.shapes(self.level_spec(level)))
        state.update({k: v.copy() for k, v in self.private.get(level, {}).items()})
        return state

    def arrays_for(self, node_id: int, level: int) -> State:
        return self.level_state(level)

    def exit_states(self) -> dict[int, State]:
        if self.options.evaluate_on == "global":
            return {}
        return {k: self.level_state(k) for k in range(1, self.cfg.num_levels)}

    # ------------------------------------------------------------------ aggregation
    def momentum(self, level: int, deeper: Mapping[str, np.ndarray],
                 own: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """mean_{l in M_k} Delta_l^(k+1) for every parameter of level ``level``'s top block."""
        prefix = self.top_prefix(level)
        added = range(self.family.exit_after[level - 1], self.family.exit_after[level])
        out = {}
        for key in self.private_keys(level):
            if key not in own or not key.startswith(prefix):  # exit heads take no momentum
                continue
            name = key[len(prefix):]
            same = [deeper[f"blocks.{b}.{name}"] for b in added
                    if deeper.get(f"blocks.{b}.{name}", np.empty(0)).shape == own[key].shape]
            if not same and key in deeper:
                same = [deeper[key]]
            if same:
                out[key] = np.mean(same, axis=0)
        return out

    def server_opt(self, level: int, old: State, delta: Mapping[str, np.ndarray]) -> State:
        """New parameters of ``level`` from its pseudo-gradient (SGD step 1, or FedAdam)."""
        if self.options.server_opt == "sgd":
            return {k: (old[k] - d).astype(old[k].dtype) for k, d in delta.items()}
        m, v = self.adam_m.setdefault(level, {}), self.adam_v.setdefault(level, {})
        new = {}
        for k, d in delta.items():
            m[k] = (ADAM_BETA1 * m.get(k, 0.0) + (1 - ADAM_BETA1) * d).astype(np.float32)
            v[k] = (ADAM_BETA2 * v.get(k, 0.0) + (1 - ADAM_BETA2) * d * d).astype(np.float32)
            new[k] = (old[k] - ADAM_ETA * m[k] / (np.sqrt(v[k]) + ADAM_TAU)).astype(old[k].dtype)
        return new

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> State:
        groups: dict[int, list[ClientUpdate]] = defaultdict(list)
        for u in updates:
            groups[u.level].append(u)
        beta = self.options.beta
        deltas: dict[int, dict[str, np.ndarray]] = {}
        shared = ElementwiseMean(self.global_state)
        for level in sorted(groups, reverse=True):
            old = self.level_state(level)
            avg = self.average(old, groups[level])
            delta = {k: old[k].astype(np.float64) - avg[k] for k in old if k in self.param_keys}
            if level + 1 in deltas:
                for k, mom in self.momentum(level, deltas[level + 1], delta).items():
                    delta[k] = beta * mom + (1 - beta) * delta[k]
            deltas[level] = delta
            new = {**avg, **self.server_opt(level, old, delta)}
            shared.add({k: new[k] for k in self.shared_keys(level)},
                       sum(u.num_examples for u in groups[level]))
            if level < self.cfg.num_levels:
                self.private[level] = {k: new[k] for k in self.private_keys(level)}
        return shared.result()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "private": self.private, "adam_m": self.adam_m,
                "adam_v": self.adam_v}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.private = dict(state.get("private", {}))
        self.adam_m = dict(state.get("adam_m", {}))
        self.adam_v = dict(state.get("adam_v", {}))
