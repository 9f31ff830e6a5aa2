"""ReeFL (Lee et al., ICML'24; docs/methods/reffl.md), the DarkDistill paper's "RefFL".

The model is the ViT with one shared recurrent exit (``models.ree``, family ``vit-ree``)
instead of per-exit heads; CLS tokens are modulated by it after every block. Depth scaling as
EEFL; the ``ree.*`` module lies in depth segment 1, so every client holds it and the base's
element-wise mean averages it over all sampled clients, the rest over their holders.

Clients train the ``reefl`` objective: the sum of exit CEs plus KL_1 from the exit with the
lowest moving-average training loss to every other exit, with element-wise gradient clipping
(``reffl-grad-clip``, 1.0 as the authors; done by parameter hooks the objective installs).
The learning rate is ``reffl-lr`` (0.005, as in FL-EE's ReeFL runs), decayed like ``lr``.
``reffl-kd-rampup-rounds`` > 0 ramps the KL weight up as DepthFL's lambda_t (the authors' code
does so over 300 rounds when no constant weight is configured); the default 0 keeps the weight
1 of the paper and FL-EE.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedeen.config import ConfigError, RunConfig
from fedeen.protocol import Instructions
from models.options import Options, option
from strategies.base import HeteroEENStrategy
from strategies.registry import register


@dataclass(frozen=True)
class ReeFLOptions(Options):
    prefix = "reffl"
    lr: float = option(0.005, lambda v: v > 0, "must be > 0")
    grad_clip: float = option(1.0, lambda v: v >= 0, "must be >= 0 (0 = no clipping)")
    kd_rampup_rounds: int = option(0, lambda v: v >= 0, "must be >= 0 (0 = no ramp-up)")


@register("reffl", "reefl")
class ReeFL(HeteroEENStrategy):
    objective = "reefl"
    Options = ReeFLOptions

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        if cfg.model != "vit":
            raise ConfigError(f"strategy {cfg.strategy!r} (ReeFL) needs model='vit': its shared "
                              f"exit reads the CLS tokens of a transformer; got model={cfg.model!r}")

    @classmethod
    def family_name(cls, cfg: RunConfig) -> str:
        return "vit-ree"  # check_config admits only model='vit'

    def instructions(self, server_round: int, level: int) -> Instructions:
        return super().instructions(server_round, level).replace(
            lr=self.options.lr * self.cfg.lr_decay ** (server_round - 1),
            grad_clip=self.options.grad_clip, kd_rampup_rounds=self.options.kd_rampup_rounds)
