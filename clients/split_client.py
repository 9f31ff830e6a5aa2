"""SplitClient: an ``EENClient`` whose training runs as an edge/cloud pair (``clients.split``).

To the federation it is an ordinary client: it receives its level's whole submodel and
returns it whole, the edge part trained here and the cloud part trained by its cloud worker,
so split pairs and plain clients take part in the same run. Evaluation runs the whole
submodel in this process (a measurement; the cloud is not needed for it). A submodel with no
exit beyond the split point (a level whose depth is at most ``split-exit``) trains here
alone, as a plain client. When the cloud cannot be reached the round's training fails with
an error naming its address after at most ``split-timeout-s`` seconds; the edge still
classifies with its own exits.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from clients import losses
from clients.een_client import EENClient, split_config
from clients.split import CloudLink, Hyper, SplitSettings, side_optimizer, split_parts, train_edge
from models.base import SubmodelSpec
from models.split import check_split


class SplitClient(EENClient):
    def __init__(self, *args: Any, cloud_address: str, settings: SplitSettings,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cloud_address, self.settings = cloud_address, settings

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        _, instructions = split_config(config)
        if instructions.depth <= self.settings.split_exit:
            params, n, metrics = super().fit(parameters, config)
            return params, n, {**metrics, "split-active": 0}
        t0 = time.perf_counter()
        keys, instructions, model, gen, ctx = self.start_round(parameters, config)
        s = self.settings.split_exit
        check_split(model, s)
        if model.policy == "l2w":
            raise ValueError("split pairs do not train under the l2w policy: its meta-network "
                             "reads every exit's loss, on both sides of the split")
        edge_names, cloud_state = split_parts(self.family, model.state_dict(), s)
        hyper = Hyper(instructions.lr, self.cfg.momentum, self.cfg.weight_decay)
        opt = side_optimizer(model, edge_names, hyper)
        link = CloudLink(self.cloud_address, self.settings)
        try:
            link.open(self.family, SubmodelSpec(instructions.depth, instructions.width),
                      cloud_state, instructions, hyper, client_key=str(self.client_seed))
            rec = train_edge(model, self.train_batches(gen), losses.get(instructions.objective),
                             ctx, opt, link)
            trained_cloud, cloud_meta = link.close()
        finally:
            link.shutdown()
        merged = dict(model.state_dict())
        merged.update({k: v.to(merged[k].device, merged[k].dtype)
                       for k, v in trained_cloud.items()})
        count = max(int(cloud_meta["count"]), 1)
        metrics = {"train-loss": float(cloud_meta["loss_sum"]) / count,
                   "edge-train-loss": rec.loss_sum / max(rec.count, 1),
                   "train-seconds": time.perf_counter() - t0, "level": instructions.level,
                   "split-active": 1, "split-bytes": rec.bytes_sent}
        return [merged[k].detach().cpu().numpy() for k in keys], len(self.data.train), metrics
