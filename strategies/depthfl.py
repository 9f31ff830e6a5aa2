"""DepthFL (Kim et al., ICLR'23; docs/methods/depthfl.md): depth scaling with mutual
self-distillation among the local exits, optionally FedDyn.

Clients train the ``depthfl`` objective: every local exit's CE plus, with the sigmoid ramp-up
weight lambda_t over ``depthfl-rampup-rounds`` (Flower: 300; 0 = full weight, as FL-EE's
lambda = 1), KL at ``depthfl-temperature`` from every other local exit. The server averages
each tensor over the clients holding it, weighted by examples (FL-EE; Flower's baseline takes
the unweighted mean).

``depthfl-feddyn`` adds FedDyn (alpha ``depthfl-feddyn-alpha``) as Flower's default DepthFL:
clients add -<theta, g_i> + alpha/2 ||theta - theta_global||^2 and update g_i after training
(see ``clients.losses.feddyn_penalty`` for how that runs without a client hook); the server
keeps h and, per element held by m of the N clients of the federation,
h <- h - alpha (m/N)(theta_bar - theta_old), theta = theta_bar - h/alpha. This applies to the
model's parameters (Flower: every tensor named weight/bias, i.e. the same set for its ResNet;
for the ViT this also covers the CLS token and positions); BatchNorm statistics are plain
averages.

Inference as in the paper: besides every single exit, the ensemble (mean of all exits'
logits), reported by ``extra_central_metrics``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedeen.config import RunConfig
from fedeen.protocol import Instructions
from models.options import Options, option
from models.state import State
from models.submodel import ElementwiseMean
from strategies.base import ClientUpdate, HeteroEENStrategy
from strategies.registry import register


@dataclass(frozen=True)
class DepthFLOptions(Options):
    prefix = "depthfl"
    temperature: float = option(1.0, lambda v: v > 0, "must be > 0")
    rampup_rounds: int = option(300, lambda v: v >= 0, "must be >= 0 (0 = no ramp-up)")
    feddyn: bool = option(False)
    feddyn_alpha: float = option(0.1, lambda v: v > 0, "must be > 0")


def ensemble_accuracy(logits: Sequence[torch.Tensor], y: torch.Tensor) -> float:
    """Accuracy of the mean of all exits' logits (DepthFL's ensemble inference)."""
    mean = torch.stack([z.float() for z in logits]).mean(dim=0)
    return float((mean.argmax(dim=1) == y).float().mean())


def feddyn_server_update(h: State, old: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray],
                         counts: Mapping[str, np.ndarray], keys, alpha: float,
                         num_clients: int) -> State:
    """FedDyn's server step on ``keys``: h <- h - alpha (m/N)(mean - old); theta = mean - h/alpha
    where an element was held (m > 0), else the old value. Updates ``h`` in place."""
    out = dict(mean)
    for k in keys:
        if k not in counts:
            continue
        m = counts[k]
        hk = h.get(k, np.zeros(old[k].shape, dtype=np.float64))
        hk = hk - alpha * (m / num_clients) * (mean[k].astype(np.float64) - old[k])
        h[k] = hk
        out[k] = np.where(m > 0, mean[k] - hk / alpha, old[k]).astype(old[k].dtype)
    return out


@register("depthfl")
class DepthFL(HeteroEENStrategy):
    objective = "depthfl"
    Options = DepthFLOptions

    def __init__(self, cfg: RunConfig, family) -> None:
        super().__init__(cfg, family)
        self.h: State = {}
        with torch.device("meta"):
            self.param_keys = {n for n, _ in family.build().named_parameters()}

    def instructions(self, server_round: int, level: int) -> Instructions:
        alpha = self.options.feddyn_alpha if self.options.feddyn else 0.0
        return super().instructions(server_round, level).replace(
            kd_temperature=self.options.temperature,
            kd_rampup_rounds=self.options.rampup_rounds, feddyn_alpha=alpha)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> State:
        mean = super().aggregate(server_round, updates)
        if not self.options.feddyn:
            return mean
        holders = ElementwiseMean(self.global_state)
        for u in updates:
            holders.add(u.state, 1.0)
        return feddyn_server_update(self.h, self.global_state, mean, holders.weight,
                                    self.param_keys, self.options.feddyn_alpha,
                                    max(len(self.nodes.levels), 1))

    def extra_central_metrics(self, logits: Sequence[torch.Tensor], y: torch.Tensor
                              ) -> dict[str, float]:
        return {"acc-ensemble": ensemble_accuracy(logits, y)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "feddyn_h": dict(self.h)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.h = dict(state.get("feddyn_h", {}))
