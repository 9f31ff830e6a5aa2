"""DarkDistill (KDD 2025; authors' code name ``darkflpg``); docs/methods/darkdistill.md.

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
  makes the weights nearly uniform; we implement the intended semantics.
- The difficulty is a scalar (CE at exit 1) and the generator's difficulty input is
  ``Linear(1 -> D)``, as the paper describes; the authors' code feeds a per-exit CE vector.
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

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedeen.config import RunConfig
from models.base import EarlyExitNet, EEOutput, SubmodelSpec
from models.family import EENFamily
from models.generator import LatentGenerator, diversity_loss, rms
from models.options import Options, group, option
from models.state import State, module_state, to_state, to_tensors
from models.submodel import scatter_mean, slice_state
from strategies.base import ClientUpdate
from strategies.generator_kd import (GeneratorKDOptions, GeneratorKDStrategy, Means, clip_grads,
                                     grad_norm, loss_grad_norm, server_model)
from strategies.kd_losses import rkd_loss
from strategies.registry import register
from fedeen.routing import route_batch, routed_ce

#: how the reverse KD weights the student exits: "soft" (softmax of difficulty matching on
#: the samples' real difficulties), "hard" (one-hot at its largest weight), "placeholder" (the
#: authors' released code: matching on integer bins drawn uniformly from 0..9, unrelated to
#: the samples), "uniform" (every exit with routed samples equally)
WEIGHTINGS = ("soft", "hard", "placeholder", "uniform")
#: the placeholder histogram's bins (the authors' ``diff_distribute`` of ten ones)
PLACEHOLDER_BINS = 10


@dataclass(frozen=True)
class DarkDistillOptions(Options):
    """DarkDistill's keys (``darkdistill-*``; authors' names in comments)."""

    prefix = "darkdistill"
    shared: GeneratorKDOptions = group(GeneratorKDOptions)
    server_epochs: int = option(2, lambda v: v >= 1, "must be >= 1")     # s_epoches
    batch_size: int = option(32, lambda v: v >= 2,                       # s_bs, per level
                             "must be >= 2 (RKD compares pairs)")
    server_lr_decay: float = option(1.0, lambda v: v > 0, "must be > 0")  # s_gamma
    difficulty_conditioning: bool = option(True)  # false = the "w/o DC" ablation
    reverse_kd: bool = option(True)               # false = the "w/o RKD" ablation
    weighting: str = option("soft", choices=WEIGHTINGS)  # sw_type


# ---------------------------------------------------------------------- the method's math
def merge_levels(global_state: Mapping[str, np.ndarray], level_models: Mapping[int, State],
                 examples: Mapping[int, int], shapes_of: Callable[[int], Mapping[str, tuple]]
                 ) -> tuple[State, dict[int, State]]:
    """DarkDistill's "agg after" merge (step 4 of the round above).

    Segment s of the global EEN = sum over levels k >= s of n^(k)/sum_{k'>=s} n^(k') W^(k)_s,
    i.e. every tensor averaged over the level models that hold it, weighted by the level's
    examples this round (levels without examples take no part; a tensor no such level holds
    keeps its value). The result is written back into every level model.
    """
    merged = scatter_mean(global_state, ((level_models[k], n) for k, n in sorted(examples.items())
                                         if n > 0 and k in level_models))
    return merged, {k: slice_state(merged, shapes_of(k)) for k in level_models}


def difficulty_weights(sample_difficulty: Tensor, exit_groups: list[Tensor],
                       weighting: str = "soft") -> Tensor:
    """Weights over student exits from difficulty matching (the reverse KD's exit weighting).

    ``exit_groups[j]`` holds the difficulties of the samples the student's exit policy routes
    to exit j. For every teaching sample i, dist_i(j) = |d_i - mean(group j)|, normalised over
    j; a_j = sum_i dist_i(j); weights = softmax(-a) ("hard": one-hot at the largest weight;
    "uniform": equal weights). Exits no sample was routed to get weight 0. "placeholder" is
    "soft" on whatever difficulties the caller passes (see ``weighting_difficulty``).
    """
    present = torch.tensor([len(g) > 0 for g in exit_groups], device=sample_difficulty.device)
    if weighting == "uniform":
        return present.float() / present.sum().clamp(min=1)
    means = torch.stack([g.float().mean() if len(g) else sample_difficulty.new_zeros(())
                         for g in exit_groups])
    dist = ((sample_difficulty.float()[:, None] - means[None, :]).abs() + 1e-6) * present
    dist = dist / dist.sum(dim=1, keepdim=True)
    a = dist.sum(dim=0).masked_fill(~present, float("inf"))
    w = torch.softmax(-a, dim=0)
    if weighting == "hard":
        w = F.one_hot(w.argmax(), len(exit_groups)).to(w.dtype)
    return w


def weighting_difficulty(difficulty: Tensor, weighting: str, rng: torch.Generator) -> Tensor:
    """The per-sample difficulties the exit weighting matches: the samples' own, or for
    "placeholder" integer bins drawn uniformly from 0..PLACEHOLDER_BINS-1 (what the authors'
    released code matches on: its difficulty histogram is a constant placeholder)."""
    if weighting != "placeholder":
        return difficulty
    bins = torch.randint(0, PLACEHOLDER_BINS, (len(difficulty),), generator=rng)
    return bins.to(difficulty.device, torch.float32)


def reverse_kd_pair_loss(teacher: EEOutput, teacher_exit: Tensor, student: EEOutput,
                         student_exit: Tensor, difficulty: Tensor, dist_ratio: float,
                         angle_ratio: float, weighting: str = "soft") -> tuple[Tensor, Tensor]:
    """(L_pair, the student exits' weights) of one (teacher, student) pair: the teacher's last
    exit teaches every student exit.

    I_T = samples routed to the teacher's last exit; each student exit j distils RKD from the
    teacher's last-exit features on I_T, weighted by ``difficulty_weights``; averaged over j.
    """
    last = teacher.num_exits - 1
    idx = torch.nonzero(teacher_exit == last).squeeze(1)
    if len(idx) < 2:
        return student.features[0].sum() * 0.0, student.features[0].new_zeros(student.num_exits)
    groups = [difficulty[student_exit == j] for j in range(student.num_exits)]
    w = difficulty_weights(difficulty[idx], groups, weighting)
    t_feat = teacher.features[last][idx].detach()
    losses = [w[j] * rkd_loss(student.features[j][idx], t_feat, dist_ratio, angle_ratio)
              for j in range(student.num_exits)]
    return torch.stack(losses).sum() / student.num_exits, w.detach()


def exit1_difficulty(difficulty_model: EarlyExitNet, latent: Tensor, y: Tensor) -> Tensor:
    """Per-sample difficulty of a latent: cross-entropy at exit 1 of the difficulty model."""
    return F.cross_entropy(difficulty_model.forward_latent(latent).logits[0], y, reduction="none")


def difficulty_generator_step(generator: LatentGenerator, opt: torch.optim.Optimizer,
                              teacher: EarlyExitNet, difficulty_model: EarlyExitNet, y: Tensor,
                              difficulty: Tensor, eps: Tensor, exit_p: float,
                              use_difficulty: bool = True,
                              anchor: Callable[[Tensor], tuple[Tensor, Any]] | None = None
                              ) -> dict[str, float]:
    """One Adam step of a level generator; returns its loss terms.

    L_G = CE at the exit the level model routes each sample to + MSE(measured difficulty,
    requested) (only when difficulty-conditional) + diversity (+ the scale anchor's term).
    ``anchor`` maps the raw output to (the latent the server uses, the anchor's loss).
    Only the generator's parameters receive gradients.
    """
    generator.train()
    raw = generator(y, eps, difficulty if use_difficulty else None)
    x, anchor_loss = anchor(raw) if anchor is not None else (raw, 0.0)
    out = teacher.forward_latent(x)
    ce = routed_ce(out.logits, y, route_batch(out.logits, exit_p))
    div = diversity_loss(eps, x)
    measured = exit1_difficulty(difficulty_model, x, y)
    mse = F.mse_loss(measured, difficulty.float())
    loss = ce + div + (mse if use_difficulty else 0.0) + anchor_loss
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=list(generator.parameters()))
    opt.step()
    return {"gen-loss": loss.item(), "gen-ce": ce.item(), "gen-div": div.item(),
            "gen-diff-mse": mse.item(), "gen-diff-req": float(difficulty.float().mean()),
            "gen-diff-meas": float(measured.detach().mean()),
            "gen-anchor-loss": float(anchor_loss)}


@register("darkdistill")
class DarkDistill(GeneratorKDStrategy):
    """Per-level models, difficulty-conditional generators, progressive reverse KD, merge."""

    Options = DarkDistillOptions

    def __init__(self, cfg: RunConfig, family: EENFamily) -> None:
        super().__init__(cfg, family)
        self.dc = self.options.difficulty_conditioning
        self.level_models: dict[int, State] = {}
        for k in self.levels:
            self.add_generator(k, difficulty_input=self.dc)

    # ------------------------------------------------------------------ level models
    def level_model(self, level: int) -> State:
        if level not in self.level_models:
            self.level_models[level] = slice_state(
                self.global_state, self.family.shapes(self.level_spec(level)))
        return self.level_models[level]

    def arrays_for(self, node_id: int, level: int) -> State:
        return self.level_model(level)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> State:
        """FedAvg within each level (the level models the reverse KD works on); returns their
        segment merge without KD, which the round keeps if the server step is discarded."""
        self.record_uploads(updates)
        for k in sorted({u.level for u in updates}):
            self.level_models[k] = self.average(self.level_model(k),
                                                     [u for u in updates if u.level == k])
        for k in self.levels:
            self.level_model(k)
        merged, _ = merge_levels(self.global_state, self.level_models, self.level_examples,
                                 self.level_shapes)
        return merged

    def level_shapes(self, level: int) -> dict[str, tuple[int, ...]]:
        return self.family.shapes(self.level_spec(level))

    def server_snapshot(self) -> Any:
        return {**super().server_snapshot(), "level_models": dict(self.level_models)}

    def restore_server_snapshot(self, snapshot: Any, state: State) -> None:
        """Generators back as they were; every level model becomes its slice of ``state``
        (the merge of the pre-KD level models)."""
        super().restore_server_snapshot(snapshot, state)
        self.level_models = {k: slice_state(state, self.level_shapes(k))
                             for k in snapshot["level_models"]}

    def server_step(self, server_round: int, state: State, updates: list[ClientUpdate]
                    ) -> tuple[State, dict[str, float]]:
        """Generators and reverse KD on the level models, then the segment merge."""
        metrics: dict[str, float] = {}
        if self.options.reverse_kd:
            metrics = self.distill(server_round)
        merged, self.level_models = merge_levels(
            state, self.level_models, self.level_examples, self.level_shapes)
        return merged, metrics

    # ------------------------------------------------------------------ generators and KD
    def distill(self, server_round: int) -> dict[str, float]:
        """Generator steps and progressive reverse KD on the level models, with the round's
        diagnostics (``diag-*``: latent scale, KD loss and gradient on generated and real
        inputs, exit weights; ``kd-*``: the students' move against weight decay alone)."""
        teachers = [k for k in self.levels
                    if self.level_examples.get(k, 0) > 0 and k in self.conditions]
        if not teachers:
            return {}
        dev, rng = self.device, self.round_rng(server_round)
        scale = self.options.server_lr_decay ** (server_round - 1)
        self.set_gen_lr(scale)
        pairs = [(k, k + 1) for k in teachers
                 if k + 1 in self.levels and self.level_examples.get(k + 1, 0) > 0]
        students = sorted({s for _, s in pairs})
        models = {k: server_model(self.family, self.level_spec(k), self.level_models[k], dev)
                  for k in sorted({*teachers, *students})}
        # the global model the clients measured their difficulties on (only exit 1 matters)
        exit1 = SubmodelSpec(1, 1.0)
        difficulty_model = server_model(
            self.family, exit1, slice_state(self.global_state, self.family.shapes(exit1)), dev)
        difficulty_model.requires_grad_(False)
        stats = {k: self.stats_of([k]) for k in teachers}
        sgd = {s: self.kd_sgd(models[s].parameters(), scale) for s in students}
        bs, p = self.options.batch_size, self.cfg.exit_p
        probe = self.probe_batch(server_round, bs)
        means = Means()
        for _epoch in range(self.options.server_epochs):
            conds = {k: self.draw(k, bs, rng) for k in teachers}
            for _ in range(self.shared.gen_iters):
                for k in teachers:
                    y, d = conds[k]
                    eps = self.generators[k].noise(bs, rng, dev)
                    means.add(difficulty_generator_step(
                        self.generators[k], self.gen_opts[k], models[k], difficulty_model, y, d,
                        eps, p, self.dc, anchor=lambda raw, k=k: self.anchored(raw, stats[k])))
            for i in range(self.shared.kd_iters if pairs else 0):
                means.add(self.reverse_kd_step(pairs, models, difficulty_model, conds, stats, sgd,
                                               rng, probe if i == 0 else None))
        means.add(self.latent_scale(teachers, models, stats, server_round, probe))
        steps = self.options.server_epochs * self.shared.kd_iters
        for s in students:
            after = module_state(models[s])
            names = [n for n, q in models[s].named_parameters() if q.grad is not None]
            means.add(self.kd_move_metrics(self.level_models[s], after, names, scale, steps))
            self.level_models[s] = after
        return means.result()

    def generate(self, k: int, y: Tensor, d: Tensor, stats: dict, rng: torch.Generator) -> Tensor:
        """A batch of level ``k``'s generator (eval mode, anchored), without gradients."""
        g = self.generators[k].eval()
        with torch.no_grad():
            raw = g(y, g.noise(len(y), rng, self.device), d if self.dc else None)
            return self.anchored(raw, stats[k])[0]

    def kd_objective(self, pairs: list[tuple[int, int]], models: dict[int, EarlyExitNet],
                     batches: dict[int, tuple[Tensor, Tensor]], rng: torch.Generator
                     ) -> tuple[Tensor, dict[str, float]]:
        """(L_KD = sum_k n^(k)/sum n * L_pair(k -> k+1), each pair's student-exit weights) on
        ``batches[k]`` = (latents, per-sample difficulties) of each teacher level."""
        total_n = sum(self.level_examples[k] for k, _ in pairs)
        loss = torch.zeros((), device=self.device)
        weights: dict[str, float] = {}
        weighting = self.options.weighting
        for k, s in pairs:
            x, difficulty = batches[k]
            with torch.no_grad():
                t_out = models[k].forward_latent(x)
                t_exit = route_batch(t_out.logits, self.cfg.exit_p)
            s_out = models[s].forward_latent(x)
            s_exit = route_batch(s_out.logits, self.cfg.exit_p)
            pair, w = reverse_kd_pair_loss(
                t_out, t_exit, s_out, s_exit, weighting_difficulty(difficulty, weighting, rng),
                self.shared.kd_dist_ratio, self.shared.kd_angle_ratio, weighting)
            loss = loss + self.level_examples[k] / total_n * pair
            weights.update({f"diag-w-p{k}-e{j}": float(v) for j, v in enumerate(w, start=1)})
        return loss, weights

    def reverse_kd_step(self, pairs: list[tuple[int, int]], models: dict[int, EarlyExitNet],
                        difficulty_model: EarlyExitNet, conds: dict[int, tuple[Tensor, Tensor]],
                        stats: dict, sgd: dict[int, torch.optim.SGD], rng: torch.Generator,
                        probe: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
        """One SGD step of L_KD on all student levels, on a fresh generated batch per pair.
        With ``probe`` (real validation inputs), the same loss and its gradient norm are first
        measured on their real embeddings (no step is taken on them)."""
        batches = {}
        for k, _ in pairs:
            y, d = conds[k]
            x = self.generate(k, y, d, stats, rng)
            with torch.no_grad():
                diff = d.float() if self.dc else exit1_difficulty(difficulty_model, x, y)
            batches[k] = (x, diff)
        params = [q for s in sgd for q in models[s].parameters()]
        metrics: dict[str, float] = {}
        if probe is not None:
            metrics.update(self.measure_on_real(pairs, models, difficulty_model, probe, params, rng))
        for opt in sgd.values():
            opt.zero_grad(set_to_none=True)
        loss, weights = self.kd_objective(pairs, models, batches, rng)
        metrics.update(weights)
        metrics["kd-loss"] = loss.item()
        if loss.requires_grad:
            loss.backward()
            if probe is not None:
                metrics.update({"diag-kd-loss-gen": loss.item(), "diag-kd-grad-gen": grad_norm(params)})
            for opt in sgd.values():
                clip_grads(opt, self.shared.kd_max_grad_norm)
                opt.step()
        return metrics

    def measure_on_real(self, pairs: list[tuple[int, int]], models: dict[int, EarlyExitNet],
                        difficulty_model: EarlyExitNet, probe: tuple[Tensor, Tensor],
                        params: list[Tensor], rng: torch.Generator) -> dict[str, float]:
        """KD loss and gradient norm on real embeddings: each teacher's own embedding of the
        probe images, their exit-1 difficulty on the difficulty model. Measurement only."""
        x, y = probe
        with torch.no_grad():
            diff = F.cross_entropy(difficulty_model(x).logits[0], y, reduction="none")
            batches = {k: (models[k].to_latent(x), diff) for k, _ in pairs}
        # the placeholder's bins come from their own generator: measuring must not shift the
        # training draws
        loss, _ = self.kd_objective(pairs, models, batches, self.diagnostic_rng(-1))
        return {"diag-kd-loss-real": loss.item(), "diag-kd-grad-real": loss_grad_norm(loss, params)}

    def latent_scale(self, teachers: list[int], models: dict[int, EarlyExitNet], stats: dict,
                     server_round: int, probe: tuple[Tensor, Tensor] | None) -> dict[str, float]:
        """Per level: RMS of a generated batch over RMS of the real embeddings (the probe's,
        through the level model's own embedding; the uploaded statistics without a probe)."""
        rng = self.diagnostic_rng(server_round)
        out = {}
        for k in teachers:
            y, d = self.draw(k, self.options.batch_size, rng)
            gen = rms(self.generate(k, y, d, stats, rng))
            if probe is not None:
                with torch.no_grad():
                    real = rms(models[k].to_latent(probe[0]))
            elif stats[k] is not None:
                real = stats[k].rms
            else:
                continue
            out[f"diag-rms-ratio-l{k}"] = gen / real if real > 0 else float("nan")
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["level_models"] = {k: to_tensors(m) for k, m in self.level_models.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.level_models = {k: to_state(m) for k, m in state["level_models"].items()}
