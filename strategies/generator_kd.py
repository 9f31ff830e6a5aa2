"""What DarkDistill and DarkDistill-PL share: clients that upload per-sample labels and
difficulties, per-level FedAvg, persistent server-side generators with their optimisers, the
server's device and seeded randomness, and the options both read (``darkdistill-*`` keys of
``GeneratorKDOptions``). Method pages: docs/methods/darkdistill.md, docs/methods/darkdistill-pl.md.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from fedeen.config import RunConfig
from fedeen.protocol import DIFFICULTY_RECORD, Instructions
from fedeen.runtime import resolve_device
from models.base import EarlyExitNet, SubmodelSpec
from models.family import EENFamily
from models.generator import LatentGenerator
from models.options import Options, option
from models.state import State, load_state, to_cpu, to_state, to_tensors
from strategies.base import ClientUpdate, HeteroEENStrategy


@dataclass(frozen=True)
class GeneratorKDOptions(Options):
    """Server-side generator and KD settings of both DarkDistill variants (authors' names in
    comments)."""

    prefix = "darkdistill"
    kd_iters: int = option(5, lambda v: v >= 1, "must be >= 1")           # kd_n_iters
    kd_lr: float = option(0.05, lambda v: v > 0, "must be > 0")           # kd_lr (SGD, no momentum)
    kd_weight_decay: float = option(0.001, lambda v: v >= 0, "must be >= 0")  # s_wd
    gen_lr: float = option(0.01, lambda v: v > 0, "must be > 0")          # g_lr (Adam)
    gen_iters: int = option(1, lambda v: v >= 1, "must be >= 1")          # g_n_iters
    gen_hidden: int = option(1000, lambda v: v >= 1, "must be >= 1")      # generator MLP width
    kd_dist_ratio: float = option(5.0, lambda v: v >= 0, "must be >= 0")  # kd_dist_ratio
    kd_angle_ratio: float = option(10.0, lambda v: v >= 0, "must be >= 0")  # kd_angle_ratio
    #: gradient-norm clip of server KD steps (0 = off); no source, see the method pages
    kd_max_grad_norm: float = option(5.0, lambda v: v >= 0, "must be >= 0 (0 = off)")


#: largest difficulty (exit-1 cross-entropy, in nats) a client may report: far above any real
#: value (log of the class count at chance, about 2.3 for 10 classes; tens when very wrong)
MAX_DIFFICULTY = 100.0


def server_model(family: EENFamily, spec: SubmodelSpec, state: Mapping[str, np.ndarray],
                 device: torch.device) -> EarlyExitNet:
    """A submodel with ``state`` loaded, on ``device``, BatchNorm in eval mode (server-side
    forward passes never use or update running statistics with synthetic batches)."""
    return load_state(family.build(spec), state).to(device).eval()


def uploaded_records(updates: Iterable[ClientUpdate]) -> dict[int, dict[str, np.ndarray]]:
    """Per level: the labels and difficulties its clients uploaded, concatenated."""
    parts: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    for u in updates:
        rec = u.records.get(DIFFICULTY_RECORD)
        if rec and len(rec.get("labels", ())) and len(rec["labels"]) == len(rec["difficulty"]):
            parts[u.level].append(rec)
    return {k: {"labels": np.concatenate([r["labels"] for r in rs]).astype(np.int64),
                "difficulty": np.concatenate([r["difficulty"] for r in rs]).astype(np.float32)}
            for k, rs in sorted(parts.items())}


def examples_per_level(updates: Iterable[ClientUpdate]) -> dict[int, int]:
    n: dict[int, int] = defaultdict(int)
    for u in updates:
        n[u.level] += u.num_examples
    return dict(n)


class Means:
    """Running means of named scalars (per-round server metrics)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)
            self.counts[k] += 1

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def clip_grads(opt: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the gradient norm of an optimiser's parameters (``max_norm`` <= 0: no clipping)."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)


class GeneratorKDStrategy(HeteroEENStrategy):
    """What DarkDistill and DarkDistill-PL share: server device, seeded randomness, clients
    that upload per-sample labels/difficulties, persistent generators and their optimisers.
    A subclass's option group holds a ``GeneratorKDOptions`` group named ``shared``."""

    objective = "sum_ce"

    def __init__(self, cfg: RunConfig, family: EENFamily) -> None:
        super().__init__(cfg, family)
        self.shared: GeneratorKDOptions = self.options.shared
        self.device = resolve_device(cfg)
        self.latent_shape = family.build(SubmodelSpec(1, 1.0)).latent_shape()
        self.generators: dict[int, LatentGenerator] = {}
        self.gen_opts: dict[int, torch.optim.Adam] = {}
        self.conditions: dict[int, dict[str, np.ndarray]] = {}
        self.level_examples: dict[int, int] = {}

    def expected_records(self, num_examples: int) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """One (label, difficulty) pair per training example."""
        return {DIFFICULTY_RECORD: {"labels": ((num_examples,), "iu"),
                                    "difficulty": ((num_examples,), "f")}}

    def record_problems(self, update: ClientUpdate) -> str | None:
        """The uploaded (label, difficulty) record must describe the client's training set:
        one pair per example, labels in range, difficulties finite (as float32, the type the
        server computes in) and within [0, MAX_DIFFICULTY]."""
        rec = update.records.get(DIFFICULTY_RECORD)
        if rec is None:
            return f"reply lacks its {DIFFICULTY_RECORD!r} record"
        labels, diff = rec.get("labels"), rec.get("difficulty")
        if labels is None or diff is None or labels.shape != diff.shape or labels.ndim != 1:
            return f"{DIFFICULTY_RECORD!r} record needs equally long 1-d 'labels' and 'difficulty'"
        if len(labels) != update.num_examples:
            return (f"{DIFFICULTY_RECORD!r} record has {len(labels)} pairs for "
                    f"{update.num_examples} examples")
        with np.errstate(over="ignore", invalid="ignore"):
            diff32 = diff.astype(np.float32)
        if labels.dtype.kind not in "iu" or not np.isfinite(diff32).all():
            return f"{DIFFICULTY_RECORD!r} record has non-integer labels or non-finite difficulties"
        if len(diff32) and (diff32.min() < 0 or diff32.max() > MAX_DIFFICULTY):
            return (f"{DIFFICULTY_RECORD!r} record has difficulties outside [0, {MAX_DIFFICULTY}] "
                    f"(min {diff32.min():.3g}, max {diff32.max():.3g})")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.family.cfg.num_classes):
            return f"{DIFFICULTY_RECORD!r} record has labels outside 0..{self.family.cfg.num_classes - 1}"
        return None

    def server_snapshot(self) -> Any:
        """Generators and their optimisers, copied (a discarded step must not train them)."""
        return {"generators": {k: copy.deepcopy(g.state_dict()) for k, g in self.generators.items()},
                "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in self.gen_opts.items()}}

    def restore_server_snapshot(self, snapshot: Any, state: State) -> None:
        for k, sd in snapshot["generators"].items():
            self.generators[k].load_state_dict(sd)
        for k, sd in snapshot["optimizers"].items():
            self.gen_opts[k].load_state_dict(sd)

    @property
    def levels(self) -> range:
        return range(1, self.cfg.num_levels + 1)

    def add_generator(self, key: int, difficulty_input: bool) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 131 + key)
            g = LatentGenerator(self.family.cfg.num_classes, self.latent_shape,
                                self.shared.gen_hidden, difficulty_input).to(self.device)
        self.generators[key] = g
        self.gen_opts[key] = torch.optim.Adam(g.parameters(), lr=self.shared.gen_lr)

    def round_rng(self, server_round: int) -> torch.Generator:
        """CPU generator for this round's server-side draws (conditions, noise)."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + server_round)

    def set_gen_lr(self, scale: float) -> None:
        for opt in self.gen_opts.values():
            for group in opt.param_groups:
                group["lr"] = self.shared.gen_lr * scale

    def kd_sgd(self, params: Iterable[Tensor], scale: float) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.shared.kd_lr * scale,
                               weight_decay=self.shared.kd_weight_decay)

    def instructions(self, server_round: int, level: int) -> Instructions:
        return super().instructions(server_round, level).replace(record_difficulty=True)

    def record_uploads(self, updates: list[ClientUpdate]) -> None:
        self.conditions = uploaded_records(updates)
        self.level_examples = examples_per_level(updates)

    def draw(self, key: int, batch: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch`` (label, difficulty) pairs drawn uniformly from level ``key``'s uploads."""
        cond = self.conditions[key]
        idx = torch.randint(0, len(cond["labels"]), (batch,), generator=rng).numpy()
        return (torch.from_numpy(cond["labels"][idx]).to(self.device),
                torch.from_numpy(cond["difficulty"][idx]).to(self.device))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "generators": {k: to_cpu(g.state_dict()) for k, g in self.generators.items()},
            "gen_optimizers": {k: to_cpu(o.state_dict()) for k, o in self.gen_opts.items()},
            "conditions": {k: to_tensors(c) for k, c in self.conditions.items()},
            "level_examples": dict(self.level_examples),
        })
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for k, sd in state["generators"].items():
            self.generators[k].load_state_dict(sd)
        for k, sd in state["gen_optimizers"].items():
            self.gen_opts[k].load_state_dict(sd)
        self.conditions = {k: to_state(c) for k, c in state["conditions"].items()}
        self.level_examples = dict(state["level_examples"])


