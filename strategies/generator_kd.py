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
from fedeen.data import Tensors
from fedeen.protocol import DIFFICULTY_RECORD, Instructions
from fedeen.runtime import resolve_device
from models.base import EarlyExitNet, SubmodelSpec
from models.family import EENFamily
from models.generator import SCALE_ANCHORS, LatentGenerator, standardize_to, statistic_loss
from models.options import Options, option
from models.state import State, load_state, to_cpu, to_state, to_tensors
from strategies.base import ClientUpdate, HeteroEENStrategy, relative_change


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
    #: how generated latents are held to the clients' embedding statistics: "normalize"
    #: (output standardised to them), "stat-loss" (the authors' intended, commented-out
    #: statistic loss), "off" (the authors' released behaviour; the ablation)
    scale_anchor: str = option("normalize", choices=SCALE_ANCHORS)
    stat_loss_weight: float = option(1.0, lambda v: v >= 0, "must be >= 0")  # with stat-loss


#: largest difficulty (exit-1 cross-entropy, in nats) a client may report: far above any real
#: value (log of the class count at chance, about 2.3 for 10 classes; tens when very wrong)
MAX_DIFFICULTY = 100.0
#: largest root mean square a client's embedding statistics may report for one element: real
#: embeddings (patch tokens, stem feature maps) are of order 1
MAX_LATENT_RMS = 1e3
LATENT_STATS = ("latent_mean", "latent_sq_mean")


@dataclass(frozen=True)
class LatentStats:
    """Per-element mean and standard deviation of the real latents (example-weighted over
    the clients that uploaded them)."""

    mean: Tensor
    std: Tensor

    @property
    def rms(self) -> float:
        return float((self.mean.pow(2) + self.std.pow(2)).mean().sqrt())


def server_model(family: EENFamily, spec: SubmodelSpec, state: Mapping[str, np.ndarray],
                 device: torch.device) -> EarlyExitNet:
    """A submodel with ``state`` loaded, on ``device``, BatchNorm in eval mode (server-side
    forward passes never use or update running statistics with synthetic batches)."""
    return load_state(family.build(spec), state).to(device).eval()


def uploaded_records(updates: Iterable[ClientUpdate]) -> dict[int, dict[str, np.ndarray]]:
    """Per level: the labels and difficulties its clients uploaded, concatenated, and the
    example-weighted mean of their latent statistics."""
    parts: dict[int, list[tuple[dict[str, np.ndarray], int]]] = defaultdict(list)
    for u in updates:
        rec = u.records.get(DIFFICULTY_RECORD)
        if rec and len(rec.get("labels", ())) and len(rec["labels"]) == len(rec["difficulty"]):
            parts[u.level].append((rec, u.num_examples))
    out = {}
    for k, rs in sorted(parts.items()):
        out[k] = {"labels": np.concatenate([r["labels"] for r, _ in rs]).astype(np.int64),
                  "difficulty": np.concatenate([r["difficulty"] for r, _ in rs]).astype(np.float32)}
        if all(name in r for r, _ in rs for name in LATENT_STATS):
            total = sum(n for _, n in rs)
            for name in LATENT_STATS:
                out[k][name] = (sum(r[name].astype(np.float64) * n for r, n in rs) / total
                                ).astype(np.float32)
    return out


def pooled_stats(conditions: Mapping[int, Mapping[str, np.ndarray]], levels: Iterable[int],
                 device: torch.device) -> LatentStats | None:
    """Latent statistics of ``levels`` pooled by their example counts (the uploads' label
    counts); None when one of them uploaded none."""
    levels = [k for k in levels if k in conditions]
    if not levels or not all(name in conditions[k] for k in levels for name in LATENT_STATS):
        return None
    n = np.array([len(conditions[k]["labels"]) for k in levels], dtype=np.float64)
    mean = sum(w * conditions[k]["latent_mean"].astype(np.float64) for w, k in zip(n, levels)) / n.sum()
    sq = sum(w * conditions[k]["latent_sq_mean"].astype(np.float64) for w, k in zip(n, levels)) / n.sum()
    std = np.sqrt(np.maximum(sq - mean ** 2, 0.0))
    return LatentStats(torch.as_tensor(mean, dtype=torch.float32, device=device),
                       torch.as_tensor(std, dtype=torch.float32, device=device))


def latent_stats_problem(rec: Mapping[str, np.ndarray]) -> str | None:
    """Why uploaded latent statistics are unusable: missing, non-finite, a negative mean
    square, a variance clearly below zero (mean square < mean^2), or an element's RMS above
    MAX_LATENT_RMS."""
    mean, sq = rec.get("latent_mean"), rec.get("latent_sq_mean")
    if mean is None or sq is None or mean.shape != sq.shape:
        return f"{DIFFICULTY_RECORD!r} record needs equally shaped latent_mean and latent_sq_mean"
    with np.errstate(over="ignore", invalid="ignore"):
        mean64, sq64 = mean.astype(np.float64), sq.astype(np.float64)
        if not (np.isfinite(mean64).all() and np.isfinite(sq64).all()):
            return f"{DIFFICULTY_RECORD!r} record has non-finite latent statistics"
        if sq64.min() < 0 or (sq64 < mean64 ** 2 * (1 - 1e-3) - 1e-6).any():
            return f"{DIFFICULTY_RECORD!r} record has latent statistics with a negative variance"
        top = float(np.sqrt(sq64.max()))
    if top > MAX_LATENT_RMS:
        return (f"{DIFFICULTY_RECORD!r} record has a latent element of RMS {top:.3g} "
                f"(> {MAX_LATENT_RMS:g})")
    return None


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


def l2_norm(tensors: Iterable[Tensor | None]) -> float:
    """L2 norm of several tensors taken together (None entries count as zero)."""
    sq = [t.detach().float().pow(2).sum() for t in tensors if t is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def grad_norm(params: Iterable[Tensor]) -> float:
    """L2 norm of the gradients held by ``params``."""
    return l2_norm(p.grad for p in params)


def loss_grad_norm(loss: Tensor, params: list[Tensor], retain_graph: bool = False) -> float:
    """L2 norm of d loss / d params, without touching the parameters' ``.grad``
    (``retain_graph``: the caller backpropagates ``loss`` afterwards)."""
    if not loss.requires_grad:
        return 0.0
    return l2_norm(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph))


def weight_decay_only_change(before: Mapping[str, np.ndarray], param_names: Iterable[str],
                             lr: float, weight_decay: float, steps: int) -> float:
    """How far ``steps`` SGD steps (no momentum) would move a model if only weight decay
    acted: every parameter times (1 - lr wd)^steps, buffers unchanged; ``relative_change``
    of that. The KD's own move is compared with it."""
    factor = (1.0 - lr * weight_decay) ** steps
    names = set(param_names)
    return relative_change(before, {k: v * factor if k in names else v for k, v in before.items()})


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
        self.probe: Tensors | None = None

    def expected_records(self, num_examples: int) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """One (label, difficulty) pair per training example, and the latent statistics."""
        return {DIFFICULTY_RECORD: {"labels": ((num_examples,), "iu"),
                                    "difficulty": ((num_examples,), "f"),
                                    **{name: (self.latent_shape, "f") for name in LATENT_STATS}}}

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
        return latent_stats_problem(rec)

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

    # ------------------------------------------------------------------ scale anchor
    def stats_of(self, levels: Iterable[int]) -> LatentStats | None:
        """The real latents' statistics of ``levels`` this round (None: none uploaded)."""
        return pooled_stats(self.conditions, levels, self.device)

    def anchored(self, raw: Tensor, stats: LatentStats | None) -> tuple[Tensor, Tensor | float]:
        """(the generator output the server uses, the anchor's loss term) under
        ``darkdistill-scale-anchor``: "normalize" standardises ``raw`` to ``stats``,
        "stat-loss" adds the weighted statistic loss, "off" leaves both alone."""
        anchor = self.shared.scale_anchor
        if stats is None or anchor == "off":
            return raw, 0.0
        if anchor == "normalize":
            return standardize_to(raw, stats.mean, stats.std), 0.0
        return raw, self.shared.stat_loss_weight * statistic_loss(raw, stats.mean, stats.std)

    # ------------------------------------------------------------------ diagnostics
    def use_server_data(self, val: Tensors) -> None:
        """The server's validation hold-out: real inputs the diagnostics measure the KD on
        (never trained on)."""
        self.probe = val if len(val) >= 2 else None

    def probe_batch(self, server_round: int, size: int) -> tuple[Tensor, Tensor] | None:
        """``size`` real validation examples for this round's diagnostics, drawn from their
        own seeded generator (the training draws do not depend on whether they are made)."""
        if self.probe is None:
            return None
        idx = torch.randperm(len(self.probe), generator=self.diagnostic_rng(server_round))[:size]
        return self.probe.x[idx].to(self.device), self.probe.y[idx].to(self.device)

    def diagnostic_rng(self, server_round: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 7_919 + server_round + 17)

    def kd_move_metrics(self, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                        param_names: Iterable[str], scale: float, steps: int) -> dict[str, float]:
        """The KD's relative move of a student, what weight decay alone would have moved it
        (on ``param_names``, the parameters the KD steps updated: SGD leaves a parameter
        without a gradient alone, weight decay included), and their ratio."""
        moved = relative_change(before, after)
        wd_only = weight_decay_only_change(before, param_names, self.shared.kd_lr * scale,
                                           self.shared.kd_weight_decay, steps)
        return {"kd-rel-change": moved, "kd-wd-rel-change": wd_only,
                "kd-move-over-wd": moved / wd_only if wd_only > 0 else float("nan")}

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


