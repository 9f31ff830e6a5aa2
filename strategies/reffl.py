"""ReeFL (Lee et al., ICML'24; methods.md section 10), the DarkDistill paper's "RefFL".

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
1 of methods.md and FL-EE.
"""
from __future__ import annotations

from typing import Any

from fedeen.config import ConfigError, RunConfig, register_options
from strategies.base import HeteroEENStrategy
from strategies.registry import register

register_options({
    "reffl-lr": 0.005,
    "reffl-grad-clip": 1.0,
    "reffl-kd-rampup-rounds": 0,
})


@register("reffl", "reefl")
class ReeFL(HeteroEENStrategy):
    objective = "reefl"

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        if cfg.model != "vit":
            raise ConfigError(f"strategy {cfg.strategy!r} (ReeFL) needs model='vit': its shared "
                              f"exit reads the CLS tokens of a transformer; got model={cfg.model!r}")
        if cfg.opt("reffl-lr") <= 0:
            raise ConfigError("reffl-lr must be > 0")
        if cfg.opt("reffl-grad-clip") < 0:
            raise ConfigError("reffl-grad-clip must be >= 0 (0 = no clipping)")
        if cfg.opt("reffl-kd-rampup-rounds") < 0:
            raise ConfigError("reffl-kd-rampup-rounds must be >= 0 (0 = no ramp-up)")

    @classmethod
    def family_name(cls, cfg: RunConfig) -> str:
        return "vit-ree"  # check_config admits only model='vit'

    def client_config(self, server_round: int, level: int) -> dict[str, Any]:
        return {**super().client_config(server_round, level),
                "lr": self.cfg.opt("reffl-lr") * self.cfg.lr_decay ** (server_round - 1),
                "grad-clip": float(self.cfg.opt("reffl-grad-clip")),
                "kd-rampup-rounds": int(self.cfg.opt("reffl-kd-rampup-rounds"))}
