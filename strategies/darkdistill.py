"""DarkDistill (KDD 2025; authors' code name ``darkflpg``), methods.md section 2.

Round structure (server side):

1. each client of level k receives the level model W^(k), trains it (sum of exit CEs) and
   uploads it together with every training sample's label and difficulty (cross-entropy at
   exit 1 of the model as received; the generic client's ``record-difficulty`` record);
2. ``aggregate``: FedAvg *within* each level, W^(k) <- sum_i n_i/n^(k) W_i;
3. ``server_step``, ``darkdistill-server-epochs`` (2) times:
   a. conditions: ``darkdistill-batch-size`` (32) (label, difficulty) pairs drawn from those
      the level's clients uploaded this round;
   b. one Adam step per level generator G_k on
      CE at the routed exit of W^(k) + MSE(CE at exit 1 of D, requested difficulty)
      + FedGen diversity, where D is the global model the clients measured their difficulties
      on (only its exit 1 matters, so D is built as the depth-1 submodel);
   c. ``darkdistill-kd-iters`` (5) SGD steps of progressive reverse KD, shallow -> deep: for
      each adjacent pair (teacher W^(k), student W^(k+1)) on a batch of G_k, the samples that
      W^(k)'s exit policy sends to its last exit teach every student exit with RKD distance
      (x5) and angle (x10) losses on exit features, student exits weighted by how close their
      routed samples' mean difficulty is to those samples' difficulties (softmax(-a));
      pairs weighted by n^(k) / sum n;
4. merge ("agg after"): every tensor averaged over the level models that hold it, weighted by
   n^(k) (= segment s averaged over levels k >= s), written back into every level model; the
   full-depth result is the global EEN.

Deviations and choices:

- Difficulty-matching weights use each generated sample's REAL continuous difficulty (the
  requested condition, i.e. a real client sample's measured CE; with difficulty conditioning
  off, the CE that D measures on the generated sample). The authors' code with
  ``sw=distance`` uses a placeholder instead (a bin drawn from a uniform histogram), which
  makes the weights nearly uniform; methods.md asks for the intended semantics.
- The difficulty is a scalar (CE at exit 1) and the generator's difficulty input is
  ``Linear(1 -> D)``, as in methods.md; the authors' code feeds a per-exit CE vector.
- A sample's difficulty is measured by the client on the model as received, in eval mode and
  without augmentation, in one forward pass before training (the issue's "cross-entropy at
  the first exit of the model they received"); the authors record the loss during the last
  local epoch, on the model being trained.
- Server-side forward passes keep BatchNorm layers in eval mode (running statistics are
  neither used from nor written by synthetic batches); this only matters for the CNN.
- Generators' Adam states persist across rounds (and in checkpoints); the authors rebuild the
  optimisers every round. Learning rates follow lr * ``darkdistill-server-lr-decay``^(round-1).
- Student levels with no clients this round take no part in the reverse KD: the merge gives
  them zero weight, so distilling into them would be discarded work.
- Server KD steps clip the gradient norm at ``darkdistill-kd-max-grad-norm`` (5; 0 = off).
  Not in the source: without it DarkDistill-PL's CNN global model diverged to NaN within one
  round (RKD plus the |increase| term, which ascends the CE of easier batches).
- With ``darkdistill-reverse-kd = false`` (the "w/o RKD" ablation) generators are not trained
  either (nothing would use them); the round is per-level FedAvg + merge.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedeen.config import ConfigError, RunConfig, register_options
from fedeen.runtime import resolve_device
from models.base import EarlyExitNet, EEOutput, SubmodelSpec
from models.family import EENFamily
from models.generator import LatentGenerator, diversity_loss
from models.submodel import State, scatter_mean, slice_state
from strategies.base import ClientUpdate, HeteroEENStrategy, relative_change
from strategies.kd_losses import rkd_loss
from strategies.registry import register
from strategies.routing import route_batch, routed_ce

OPTIONS: dict[str, Any] = {
    "darkdistill-server-epochs": 2,        # s_epoches
    "darkdistill-batch-size": 32,          # s_bs (generated batch per level)
    "darkdistill-kd-iters": 5,             # kd_n_iters
    "darkdistill-kd-lr": 0.05,             # kd_lr (SGD, no momentum)
    "darkdistill-kd-weight-decay": 0.001,  # s_wd
    "darkdistill-gen-lr": 0.01,            # g_lr (Adam)
    "darkdistill-gen-iters": 1,            # g_n_iters
    "darkdistill-gen-hidden": 1000,        # generator MLP width
    "darkdistill-kd-dist-ratio": 5.0,      # kd_dist_ratio
    "darkdistill-kd-angle-ratio": 10.0,    # kd_angle_ratio
    "darkdistill-kd-max-grad-norm": 5.0,   # safety clip of server KD steps (0 = off; not in source)
    "darkdistill-server-lr-decay": 1.0,    # s_gamma
    "darkdistill-difficulty-conditioning": True,  # false = "w/o DC" ablation
    "darkdistill-reverse-kd": True,        # false = "w/o RKD" ablation
    "darkdistill-weighting": "soft",       # sw_type: soft | hard
}
register_options(OPTIONS)
DIFFICULTY = "difficulty"


# ---------------------------------------------------------------------- shared helpers
def to_torch(family: EENFamily, spec: SubmodelSpec, state: Mapping[str, np.ndarray],
             device: torch.device) -> EarlyExitNet:
    """A submodel with ``state`` loaded, on ``device``, BatchNorm in eval mode."""
    model = family.build(spec)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    return model.to(device).eval()


def to_numpy(model: torch.nn.Module) -> State:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def to_cpu(obj: Any) -> Any:
    """Tensors inside nested dicts/lists/tuples moved to the CPU (for checkpoints)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def state_to_tensors(state: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def tensors_to_state(tensors: Mapping[str, Any]) -> State:
    return {k: (v.numpy() if isinstance(v, Tensor) else np.asarray(v)).copy()
            for k, v in tensors.items()}


def uploaded_records(updates: Iterable[ClientUpdate]) -> dict[int, dict[str, np.ndarray]]:
    """Per level: the labels and difficulties its clients uploaded, concatenated."""
    parts: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    for u in updates:
        rec = u.records.get(DIFFICULTY)
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


def level_fedavg(base: Mapping[str, np.ndarray], updates: Iterable[ClientUpdate]) -> State:
    """FedAvg of one level's uploads (every one holds all of ``base``'s tensors)."""
    return scatter_mean(base, ((u.state, u.num_examples) for u in updates))


def merge_levels(global_state: Mapping[str, np.ndarray], level_models: Mapping[int, State],
                 examples: Mapping[int, int], shapes_of: Callable[[int], Mapping[str, tuple]]
                 ) -> tuple[State, dict[int, State]]:
    """DarkDistill's "agg after" merge (methods.md 2.1 step 6).

    Segment s of the global EEN = sum over levels k >= s of n^(k)/sum_{k'>=s} n^(k') W^(k)_s,
    i.e. every tensor averaged over the level models that hold it, weighted by the level's
    examples this round (levels without examples take no part; a tensor no such level holds
    keeps its value). The result is written back into every level model.
    """
    merged = scatter_mean(global_state, ((level_models[k], n) for k, n in sorted(examples.items())
                                         if n > 0 and k in level_models))
    return merged, {k: slice_state(merged, shapes_of(k)) for k in level_models}


def difficulty_weights(sample_difficulty: Tensor, exit_groups: list[Tensor],
                       hard: bool = False) -> Tensor:
    """Weights over student exits from difficulty matching (methods.md 2.6 step 4).

    ``exit_groups[j]`` holds the difficulties of the samples the student's exit policy routes
    to exit j. For every teaching sample i, dist_i(j) = |d_i - mean(group j)|, normalised over
    j; a_j = sum_i dist_i(j); weights = softmax(-a) (``hard``: one-hot at the largest weight).
    Exits no sample was routed to get weight 0.
    """
    present = torch.tensor([len(g) > 0 for g in exit_groups], device=sample_difficulty.device)
    means = torch.stack([g.float().mean() if len(g) else sample_difficulty.new_zeros(())
                         for g in exit_groups])
    dist = ((sample_difficulty.float()[:, None] - means[None, :]).abs() + 1e-6) * present
    dist = dist / dist.sum(dim=1, keepdim=True)
    a = dist.sum(dim=0).masked_fill(~present, float("inf"))
    w = torch.softmax(-a, dim=0)
    if hard:
        w = F.one_hot(w.argmax(), len(exit_groups)).to(w.dtype)
    return w


def reverse_kd_pair_loss(teacher: EEOutput, teacher_exit: Tensor, student: EEOutput,
                         student_exit: Tensor, difficulty: Tensor, dist_ratio: float,
                         angle_ratio: float, hard: bool = False) -> Tensor:
    """L_pair of methods.md 2.6 step 5: the teacher's last exit teaches every student exit.

    I_T = samples routed to the teacher's last exit; each student exit j distils RKD from the
    teacher's last-exit features on I_T, weighted by ``difficulty_weights``; averaged over j.
    """
    last = teacher.num_exits - 1
    idx = torch.nonzero(teacher_exit == last).squeeze(1)
    if len(idx) < 2:
        return student.features[0].sum() * 0.0
    groups = [difficulty[student_exit == j] for j in range(student.num_exits)]
    w = difficulty_weights(difficulty[idx], groups, hard)
    t_feat = teacher.features[last][idx].detach()
    losses = [w[j] * rkd_loss(student.features[j][idx], t_feat, dist_ratio, angle_ratio)
              for j in range(student.num_exits)]
    return torch.stack(losses).sum() / student.num_exits


def exit1_difficulty(dm: EarlyExitNet, latent: Tensor, y: Tensor) -> Tensor:
    """Per-sample difficulty of a latent: cross-entropy at exit 1 of the difficulty model."""
    return F.cross_entropy(dm.forward_latent(latent).logits[0], y, reduction="none")


def difficulty_generator_step(generator: LatentGenerator, opt: torch.optim.Optimizer,
                              teacher: EarlyExitNet, dm: EarlyExitNet, y: Tensor,
                              difficulty: Tensor, eps: Tensor, exit_p: float,
                              use_difficulty: bool = True) -> dict[str, float]:
    """One Adam step of a level generator (methods.md 2.5); returns its loss terms.

    L_G = CE at the exit the level model routes each sample to + MSE(measured difficulty,
    requested) (only when difficulty-conditional) + diversity. Only the generator's
    parameters receive gradients.
    """
    generator.train()
    x = generator(y, eps, difficulty if use_difficulty else None)
    out = teacher.forward_latent(x)
    ce = routed_ce(out.logits, y, route_batch(out.logits, exit_p))
    div = diversity_loss(eps, x)
    measured = exit1_difficulty(dm, x, y)
    mse = F.mse_loss(measured, difficulty.float())
    loss = ce + div + (mse if use_difficulty else 0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=list(generator.parameters()))
    opt.step()
    return {"gen-loss": loss.item(), "gen-ce": ce.item(), "gen-div": div.item(),
            "gen-diff-mse": mse.item(), "gen-diff-req": float(difficulty.float().mean()),
            "gen-diff-meas": float(measured.detach().mean())}


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


def check_positive(cfg: RunConfig, ints: Iterable[str], floats: Iterable[str]) -> None:
    for key in ints:
        if int(cfg.opt(key)) < 1:
            raise ConfigError(f"run-config {key} = {cfg.opt(key)!r} must be >= 1")
    for key in floats:
        if not float(cfg.opt(key)) > 0:
            raise ConfigError(f"run-config {key} = {cfg.opt(key)!r} must be > 0")


class GeneratorKDStrategy(HeteroEENStrategy):
    """What DarkDistill and DarkDistill-PL share: server device, seeded randomness, clients
    that upload per-sample labels/difficulties, persistent generators and their optimisers."""

    objective = "sum_ce"

    def __init__(self, cfg: RunConfig, family: EENFamily) -> None:
        super().__init__(cfg, family)
        self.device = resolve_device(cfg)
        self.latent_shape = family.build(SubmodelSpec(1, 1.0)).latent_shape()
        self.generators: dict[int, LatentGenerator] = {}
        self.gen_opts: dict[int, torch.optim.Adam] = {}
        self.conditions: dict[int, dict[str, np.ndarray]] = {}
        self.level_examples: dict[int, int] = {}

    def record_problems(self, update: ClientUpdate) -> str | None:
        """The uploaded (label, difficulty) record must describe the client's training set."""
        rec = update.records.get(DIFFICULTY)
        if rec is None:
            return f"reply lacks its {DIFFICULTY!r} record"
        labels, diff = rec.get("labels"), rec.get("difficulty")
        if labels is None or diff is None or labels.shape != diff.shape or labels.ndim != 1:
            return f"{DIFFICULTY!r} record needs equally long 1-d 'labels' and 'difficulty'"
        if labels.dtype.kind not in "iu" or not np.isfinite(diff).all():
            return f"{DIFFICULTY!r} record has non-integer labels or non-finite difficulties"
        if len(labels) and (labels.min() < 0 or labels.max() >= self.family.cfg.num_classes):
            return f"{DIFFICULTY!r} record has labels outside 0..{self.family.cfg.num_classes - 1}"
        return None

    @property
    def levels(self) -> range:
        return range(1, self.cfg.num_levels + 1)

    def opt(self, name: str) -> Any:
        return self.cfg.opt(f"darkdistill-{name}")

    def add_generator(self, key: int, difficulty_input: bool) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 131 + key)
            g = LatentGenerator(self.family.cfg.num_classes, self.latent_shape,
                                int(self.opt("gen-hidden")), difficulty_input).to(self.device)
        self.generators[key] = g
        self.gen_opts[key] = torch.optim.Adam(g.parameters(), lr=float(self.opt("gen-lr")))

    def round_rng(self, server_round: int) -> torch.Generator:
        """CPU generator for this round's server-side draws (conditions, noise)."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + server_round)

    def set_gen_lr(self, scale: float) -> None:
        for opt in self.gen_opts.values():
            for group in opt.param_groups:
                group["lr"] = float(self.opt("gen-lr")) * scale

    def kd_sgd(self, params: Iterable[Tensor], scale: float) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=float(self.opt("kd-lr")) * scale,
                               weight_decay=float(self.opt("kd-weight-decay")))

    def client_config(self, server_round: int, level: int) -> dict[str, Any]:
        return {**super().client_config(server_round, level), "record-difficulty": True}

    def record_uploads(self, updates: list[ClientUpdate]) -> None:
        self.conditions = uploaded_records(updates)
        self.level_examples = examples_per_level(updates)

    def draw(self, key: int, batch: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch`` (label, difficulty) pairs drawn uniformly from level ``key``'s uploads."""
        cond = self.conditions[key]
        idx = torch.randint(0, len(cond["labels"]), (batch,), generator=rng).numpy()
        return (torch.from_numpy(cond["labels"][idx]).to(self.device),
                torch.from_numpy(cond["difficulty"][idx]).to(self.device))

    @classmethod
    def check_common(cls, cfg: RunConfig) -> None:
        check_positive(cfg, ["darkdistill-kd-iters", "darkdistill-gen-iters",
                             "darkdistill-gen-hidden"],
                       ["darkdistill-kd-lr", "darkdistill-gen-lr", "darkdistill-server-lr-decay"])
        for key in ("darkdistill-kd-weight-decay", "darkdistill-kd-max-grad-norm"):
            if float(cfg.opt(key)) < 0:
                raise ConfigError(f"run-config {key} = {cfg.opt(key)!r} must be >= 0")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "generators": {k: to_cpu(g.state_dict()) for k, g in self.generators.items()},
            "gen_optimizers": {k: to_cpu(o.state_dict()) for k, o in self.gen_opts.items()},
            "conditions": {k: state_to_tensors(c) for k, c in self.conditions.items()},
            "level_examples": dict(self.level_examples),
        })
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for k, sd in state["generators"].items():
            self.generators[k].load_state_dict(sd)
        for k, sd in state["gen_optimizers"].items():
            self.gen_opts[k].load_state_dict(sd)
        self.conditions = {k: tensors_to_state(c) for k, c in state["conditions"].items()}
        self.level_examples = dict(state["level_examples"])


@register("darkdistill")
class DarkDistill(GeneratorKDStrategy):
    """Per-level models, difficulty-conditional generators, progressive reverse KD, merge."""

    def __init__(self, cfg: RunConfig, family: EENFamily) -> None:
        super().__init__(cfg, family)
        self.dc = bool(self.opt("difficulty-conditioning"))
        self.level_models: dict[int, State] = {}
        for k in self.levels:
            self.add_generator(k, difficulty_input=self.dc)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        cls.check_common(cfg)
        check_positive(cfg, ["darkdistill-server-epochs", "darkdistill-batch-size"], [])
        if int(cfg.opt("darkdistill-batch-size")) < 2:
            raise ConfigError("run-config darkdistill-batch-size must be >= 2 (RKD compares pairs)")
        if cfg.opt("darkdistill-weighting") not in ("soft", "hard"):
            raise ConfigError(f"run-config darkdistill-weighting = "
                              f"{cfg.opt('darkdistill-weighting')!r}; valid: soft, hard")

    # ------------------------------------------------------------------ level models
    def level_model(self, level: int) -> State:
        if level not in self.level_models:
            self.level_models[level] = slice_state(
                self.global_state, self.family.shapes(self.level_spec(level)))
        return self.level_models[level]

    def arrays_for(self, node_id: int, level: int) -> State:
        return self.level_model(level)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> State:
        """FedAvg within each level; the global model changes only in ``server_step``."""
        self.record_uploads(updates)
        for k in sorted({u.level for u in updates}):
            self.level_models[k] = level_fedavg(self.level_model(k),
                                                [u for u in updates if u.level == k])
        return self.global_state

    def server_step(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for k in self.levels:
            self.level_model(k)
        if self.opt("reverse-kd"):
            metrics = self.distill(server_round)
        self.global_state, self.level_models = merge_levels(
            self.global_state, self.level_models, self.level_examples,
            lambda k: self.family.shapes(self.level_spec(k)))
        return metrics

    # ------------------------------------------------------------------ generators and KD
    def distill(self, server_round: int) -> dict[str, float]:
        """Generator steps and progressive reverse KD on the level models (methods.md 2.4-2.6)."""
        teachers = [k for k in self.levels
                    if self.level_examples.get(k, 0) > 0 and k in self.conditions]
        if not teachers:
            return {}
        dev, rng = self.device, self.round_rng(server_round)
        scale = float(self.opt("server-lr-decay")) ** (server_round - 1)
        self.set_gen_lr(scale)
        pairs = [(k, k + 1) for k in teachers
                 if k + 1 in self.levels and self.level_examples.get(k + 1, 0) > 0]
        students = sorted({s for _, s in pairs})
        models = {k: to_torch(self.family, self.level_spec(k), self.level_models[k], dev)
                  for k in sorted({*teachers, *students})}
        dm = to_torch(self.family, SubmodelSpec(1, 1.0),
                      slice_state(self.global_state, self.family.shapes(SubmodelSpec(1, 1.0))), dev)
        dm.requires_grad_(False)
        sgd = {s: self.kd_sgd(models[s].parameters(), scale) for s in students}
        bs, p = int(self.opt("batch-size")), self.cfg.exit_p
        stats = Means()
        for _epoch in range(int(self.opt("server-epochs"))):
            conds = {k: self.draw(k, bs, rng) for k in teachers}
            for _ in range(int(self.opt("gen-iters"))):
                for k in teachers:
                    y, d = conds[k]
                    eps = self.generators[k].noise(bs, rng, dev)
                    stats.add(difficulty_generator_step(
                        self.generators[k], self.gen_opts[k], models[k], dm, y, d, eps, p, self.dc))
            for _ in range(int(self.opt("kd-iters")) if pairs else 0):
                stats.add({"kd-loss": self.reverse_kd_step(pairs, models, dm, conds, sgd, rng)})
        for s in students:
            after = to_numpy(models[s])
            stats.add({"kd-rel-change": relative_change(self.level_models[s], after)})
            self.level_models[s] = after
        return stats.result()

    def reverse_kd_step(self, pairs: list[tuple[int, int]], models: dict[int, EarlyExitNet],
                        dm: EarlyExitNet, conds: dict[int, tuple[Tensor, Tensor]],
                        sgd: dict[int, torch.optim.SGD], rng: torch.Generator) -> float:
        """One SGD step of L_KD = sum_k n^(k)/sum n * L_pair(k -> k+1) on all student levels."""
        total_n = sum(self.level_examples[k] for k, _ in pairs)
        for opt in sgd.values():
            opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for k, s in pairs:
            y, d = conds[k]
            g = self.generators[k].eval()
            with torch.no_grad():
                x = g(y, g.noise(len(y), rng, self.device), d if self.dc else None)
                t_out = models[k].forward_latent(x)
                t_exit = route_batch(t_out.logits, self.cfg.exit_p)
                difficulty = d.float() if self.dc else exit1_difficulty(dm, x, y)
            s_out = models[s].forward_latent(x)
            s_exit = route_batch(s_out.logits, self.cfg.exit_p)
            pair = reverse_kd_pair_loss(
                t_out, t_exit, s_out, s_exit, difficulty, float(self.opt("kd-dist-ratio")),
                float(self.opt("kd-angle-ratio")), self.opt("weighting") == "hard")
            loss = loss + self.level_examples[k] / total_n * pair
        if loss.requires_grad:
            loss.backward()
            for opt in sgd.values():
                clip_grads(opt, float(self.opt("kd-max-grad-norm")))
                opt.step()
        return loss.item()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["level_models"] = {k: state_to_tensors(m) for k, m in self.level_models.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.level_models = {k: tensors_to_state(m) for k, m in state["level_models"].items()}
