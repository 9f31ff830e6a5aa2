"""DarkDistill-PL (KDD 2025, the "parallel" variant; authors' code name ``darkflpa2``),
docs/methods/darkdistill-pl.md.

- Clients receive slices of the global EEN (as every per-segment method) and upload their
  models plus per-sample labels (the generic ``record-difficulty`` record; only its labels
  are used).
- ``aggregate``: the usual per-segment average of the uploads into the global EEN (the base),
  and, as teachers only, per-level FedAvg models W^(k) of this round's uploads.
- ``server_step``, ``darkdistill-pl-server-epochs`` (2) times:
  a. one label-conditional generator G_j per exit j; labels drawn from the pooled labels of
     the levels that own exit j (= the n^(k)-weighted mixture of their label distributions),
     ``darkdistill-pl-batch-size`` (16) per generator;
  b. one joint Adam step of all generators on
     CE(t_j(x_j), y) + diversity - g_gap * mean(delta(x_j) - delta(x_{j-1})) (j > 1), where
     t_j = sum_{k>=j} n^(k)/sum n * z^(k)_j is the example-weighted ensemble of exit j over
     the level models holding it and delta(x) the per-exit CE vector of the global model
     ("increase": deeper exits' generators must produce harder samples);
  c. ``darkdistill-kd-iters`` (5) SGD steps of the global model on
     sum_s sum_{t in {s-1,s,s+1}} [5 RKD_dist + 10 RKD_angle](h^G_s(x_t), ensemble feature_t)
     + g_gap * sum_{j>1} |mean(delta(x_j) - delta(x_{j-1}))|.
  Every global exit s distils from its own and the adjacent exits' generated batches, all
  exits in parallel. We take the student feature of exit s itself (the intended h^G_s); the
  authors' code takes that of exit min(t+1, M) for every s sharing t.

Choices (beyond DarkDistill's, which apply here too: BatchNorm in eval mode on the server,
persistent generator Adam states, seeded server randomness):
- ``darkdistill-pl-increase = false`` drops both "increase" terms (generator and KD), the
  paper's "w/o increasing difficulty" ablation.
- Server learning rates decay by ``darkdistill-pl-server-lr-decay`` (0.99, the scripts'
  s_gamma) per round; generator lr, KD lr, weight decay, iterations and RKD ratios are the
  ``darkdistill-*`` options.
- Exits whose owning levels sent nothing this round get no generator step and teach nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedeen.config import RunConfig
from models.base import EarlyExitNet, EEOutput
from models.family import EENFamily
from models.generator import diversity_loss, rms
from models.options import Options, group, option
from models.state import State, module_state
from strategies.base import ClientUpdate
from strategies.generator_kd import (GeneratorKDOptions, GeneratorKDStrategy, Means, clip_grads,
                                     loss_grad_norm, server_model)
from strategies.kd_losses import rkd_loss
from strategies.registry import register


@dataclass(frozen=True)
class DarkDistillPLOptions(Options):
    """DarkDistill-PL's keys (``darkdistill-pl-*``) and the shared ``darkdistill-*`` ones."""

    prefix = "darkdistill-pl"
    shared: GeneratorKDOptions = group(GeneratorKDOptions)
    server_epochs: int = option(2, lambda v: v >= 1, "must be >= 1")
    batch_size: int = option(16, lambda v: v >= 2, "must be >= 2")  # bs / 2 of the scripts
    server_lr_decay: float = option(0.99, lambda v: v > 0, "must be > 0")  # s_gamma
    increase: bool = option(True)  # false = the "w/o increasing difficulty" ablation
    gap_weight: float = option(1.0, lambda v: v >= 0, "must be >= 0")  # g_gap


def exit_ce(out: EEOutput, y: Tensor) -> Tensor:
    """delta(x): per-sample, per-exit cross-entropy, shape (batch, exits)."""
    return torch.stack([F.cross_entropy(z, y, reduction="none") for z in out.logits], dim=1)


def increase_gaps(deltas: list[Tensor | None]) -> list[Tensor]:
    """mean(delta(x_j) - delta(x_{j-1}).detach()) for consecutive exits that both have a batch."""
    return [(deltas[j] - deltas[j - 1].detach()).mean()
            for j in range(1, len(deltas)) if deltas[j] is not None and deltas[j - 1] is not None]


def ensemble_weights(owners: dict[int, list[int]], examples: dict[int, int]
                     ) -> dict[int, list[float]]:
    """Per exit j, the weight n^(k) / sum_{i in owners} n^(i) of each owning level k in the
    exit's ensemble teacher."""
    return {j: [examples[k] / sum(examples[i] for i in ks) for k in ks] for j, ks in owners.items()}


def adjacent_kd_loss(student_feats: dict[int, list[Tensor]], teacher_feats: dict[int, Tensor],
                     num_exits: int, dist_ratio: float, angle_ratio: float) -> Tensor:
    """sum_s sum_{t in {s-1,s,s+1}} RKD(h^G_s(x_t), teacher feature_t) (0-based exits).

    ``student_feats[t]`` are the global model's exit features on batch x_t; batches without
    a teacher (missing keys) are skipped.
    """
    terms = [rkd_loss(student_feats[t][s], teacher_feats[t], dist_ratio, angle_ratio)
             for s in range(num_exits) for t in (s - 1, s, s + 1)
             if 0 <= t < num_exits and t in teacher_feats]
    return torch.stack(terms).sum()


@register("darkdistill-pl")
class DarkDistillPL(GeneratorKDStrategy):
    """Per-segment averaging, then exit-wise parallel distillation from level ensembles."""

    Options = DarkDistillPLOptions

    def __init__(self, cfg: RunConfig, family: EENFamily) -> None:
        super().__init__(cfg, family)
        self.teachers: dict[int, State] = {}
        for j in range(1, family.num_exits + 1):
            self.add_generator(j, difficulty_input=False)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> State:
        self.record_uploads(updates)
        self.teachers = {}
        for k in sorted({u.level for u in updates}):
            level = [u for u in updates if u.level == k]
            self.teachers[k] = self.average(level[0].state, level)
        return super().aggregate(server_round, updates)

    def server_step(self, server_round: int, state: State, updates: list[ClientUpdate]
                    ) -> tuple[State, dict[str, float]]:
        """Exit generators and parallel KD into the aggregated global EEN."""
        owners = {j: [k for k in self.teachers if k >= j and k in self.conditions]
                  for j in range(1, self.family.num_exits + 1)}
        owners = {j: ks for j, ks in owners.items() if ks}
        if not owners:
            return state, {}
        dev, rng = self.device, self.round_rng(server_round)
        scale = self.options.server_lr_decay ** (server_round - 1)
        self.set_gen_lr(scale)
        models = {k: server_model(self.family, self.level_spec(k), s, dev)
                  for k, s in self.teachers.items()}
        for m in models.values():
            m.requires_grad_(False)
        student = server_model(self.family, self.family.global_spec, state, dev)
        sgd = self.kd_sgd(student.parameters(), scale)
        weights = ensemble_weights(owners, self.level_examples)
        labels = {j: np.concatenate([self.conditions[k]["labels"] for k in ks])
                  for j, ks in owners.items()}
        bs = self.options.batch_size
        ensemble = functools.partial(self.ensemble, models, owners, weights)
        stats = {j: self.stats_of(ks) for j, ks in owners.items()}
        probe = self.probe_batch(server_round, bs)
        before = module_state(student)
        means = Means()
        for _epoch in range(self.options.server_epochs):
            y = {j: torch.from_numpy(labels[j][torch.randint(0, len(labels[j]), (bs,),
                                                             generator=rng).numpy()]).to(dev)
                 for j in owners}
            for _ in range(self.shared.gen_iters):
                means.add(self.generator_step(owners, y, ensemble, student, stats, rng))
            means.add(self.kd_steps(owners, y, ensemble, student, sgd, stats, rng, probe))
        after = module_state(student)
        trained = [n for n, q in student.named_parameters() if q.grad is not None]
        means.add(self.kd_move_metrics(before, after, trained,
                                       scale, self.options.server_epochs * self.shared.kd_iters))
        means.add(self.latent_scale(owners, y, student, stats, server_round, probe))
        return after, means.result()

    @staticmethod
    def ensemble(models: dict[int, EarlyExitNet], owners: dict[int, list[int]],
                 weights: dict[int, list[float]], j: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher of exit j on x: example-weighted mean of exit j's logits and features over
        the level models that hold it."""
        outs = [models[k].forward_latent(x) for k in owners[j]]
        z = sum(w * o.logits[j - 1] for w, o in zip(weights[j], outs))
        h = sum(w * o.features[j - 1] for w, o in zip(weights[j], outs))
        return z, h

    def _deltas(self, student: EarlyExitNet, xs: dict[int, Tensor], y: dict[int, Tensor]
                ) -> tuple[dict[int, EEOutput], list[Tensor | None]]:
        outs = {j: student.forward_latent(x) for j, x in xs.items()}
        deltas = [exit_ce(outs[j], y[j]) if j in outs else None
                  for j in range(1, self.family.num_exits + 1)]
        return outs, deltas

    def generator_step(self, owners: dict[int, list[int]], y: dict[int, Tensor], ensemble,
                       student: EarlyExitNet, stats: dict, rng: torch.Generator
                       ) -> dict[str, float]:
        """One joint Adam step of all exit generators (outputs anchored to the statistics of
        the levels that own the exit)."""
        gens = [self.generators[j] for j in owners]
        xs, ce, div, anchor = {}, [], [], []
        for j in owners:
            g = self.generators[j].train()
            eps = g.noise(len(y[j]), rng, self.device)
            xs[j], anchor_loss = self.anchored(g(y[j], eps), stats[j])
            anchor.append(torch.as_tensor(anchor_loss, device=self.device, dtype=torch.float32))
            ce.append(F.cross_entropy(ensemble(j, xs[j])[0], y[j]))
            div.append(diversity_loss(eps, xs[j]))
        _, deltas = self._deltas(student, xs, y)
        gaps = increase_gaps(deltas) if self.options.increase else []
        gap = torch.stack(gaps).sum() if gaps else torch.zeros((), device=self.device)
        loss = torch.stack(ce).sum() + torch.stack(div).sum() + torch.stack(anchor).sum() \
            - self.options.gap_weight * gap
        for j in owners:
            self.gen_opts[j].zero_grad(set_to_none=True)
        loss.backward(inputs=[p for g in gens for p in g.parameters()])
        for j in owners:
            self.gen_opts[j].step()
        metrics = {"gen-loss": loss.item(), "gen-ce": torch.stack(ce).mean().item(),
                   "gen-div": torch.stack(div).mean().item(), "gen-gap": gap.item(),
                   "gen-anchor-loss": torch.stack(anchor).sum().item()}
        metrics.update({f"gen-diff-e{j}": deltas[j - 1].mean().item() for j in owners})
        return metrics

    def kd_steps(self, owners: dict[int, list[int]], y: dict[int, Tensor], ensemble,
                 student: EarlyExitNet, sgd: torch.optim.SGD, stats: dict, rng: torch.Generator,
                 probe: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
        """``darkdistill-kd-iters`` (``shared.kd_iters``) SGD steps of the global model on fixed
        generated batches. With ``probe`` (real validation inputs), the first step's RKD loss
        and gradient norm are also measured on their real embeddings (no step on them)."""
        xs = self.generate(owners, y, stats, rng)
        with torch.no_grad():
            t_feats = {j - 1: ensemble(j, xs[j])[1] for j in owners}
        params = list(student.parameters())
        means = Means()
        for i in range(self.shared.kd_iters):
            if i == 0 and probe is not None:
                means.add(self.measure_on_real(owners, ensemble, student, probe, params))
            outs, deltas = self._deltas(student, xs, y)
            kd = self.rkd(outs, t_feats)
            gaps = increase_gaps(deltas) if self.options.increase else []
            gap = torch.stack([g.abs() for g in gaps]).sum() if gaps else kd * 0.0
            loss = kd + self.options.gap_weight * gap
            if i == 0 and probe is not None:
                means.add({"diag-kd-loss-gen": kd.item(),
                           "diag-kd-grad-gen": loss_grad_norm(kd, params, retain_graph=True)})
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            clip_grads(sgd, self.shared.kd_max_grad_norm)
            sgd.step()
            means.add({"kd-loss": loss.item(), "kd-rkd": kd.item(), "kd-gap": gap.item()})
        return means.result()

    def generate(self, owners: dict[int, list[int]], y: dict[int, Tensor], stats: dict,
                 rng: torch.Generator) -> dict[int, Tensor]:
        """Every exit generator's batch (eval mode, anchored), without gradients."""
        xs = {}
        with torch.no_grad():
            for j in owners:
                g = self.generators[j].eval()
                xs[j] = self.anchored(g(y[j], g.noise(len(y[j]), rng, self.device)), stats[j])[0]
        return xs

    def rkd(self, outs: dict[int, EEOutput], t_feats: dict[int, Tensor]) -> Tensor:
        return adjacent_kd_loss({j - 1: o.features for j, o in outs.items()}, t_feats,
                                self.family.num_exits, self.shared.kd_dist_ratio,
                                self.shared.kd_angle_ratio)

    def measure_on_real(self, owners: dict[int, list[int]], ensemble, student: EarlyExitNet,
                        probe: tuple[Tensor, Tensor], params: list[Tensor]) -> dict[str, float]:
        """The RKD loss and its gradient norm with every exit's batch replaced by the real
        embeddings of the probe images (the global model's embedding). Measurement only."""
        with torch.no_grad():
            x = student.to_latent(probe[0])
            t_feats = {j - 1: ensemble(j, x)[1] for j in owners}
        out = student.forward_latent(x)
        kd = self.rkd({j: out for j in owners}, t_feats)
        return {"diag-kd-loss-real": kd.item(), "diag-kd-grad-real": loss_grad_norm(kd, params)}

    def latent_scale(self, owners: dict[int, list[int]], y: dict[int, Tensor],
                     student: EarlyExitNet, stats: dict, server_round: int,
                     probe: tuple[Tensor, Tensor] | None) -> dict[str, float]:
        """Per exit generator: RMS of a generated batch over RMS of the real embeddings (the
        probe's through the global model's embedding; the uploaded statistics without one)."""
        xs = self.generate(owners, y, stats, self.diagnostic_rng(server_round))
        if probe is not None:
            with torch.no_grad():
                real = {j: rms(student.to_latent(probe[0])) for j in owners}
        else:
            real = {j: stats[j].rms for j in owners if stats[j] is not None}
        return {f"diag-rms-ratio-e{j}": rms(xs[j]) / real[j] for j in owners
                if real.get(j, 0) > 0}
