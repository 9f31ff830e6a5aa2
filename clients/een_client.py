"""EENClient: the NumPyClient that trains and evaluates one budget-sized submodel.

The ClientApp adapter passes the arrays with their names (config ``param-keys``); the rest of
the config is the strategy's ``Instructions`` (spec, objective, learning rate, ...), read
strictly. Extra payloads for the server (e.g. DarkDistill's per-sample difficulty) are
collected in ``records`` and travel as their own named record.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from torch.nn import functional as F

from clients import l2w as l2w_policy
from clients import losses
from fedeen.config import RunConfig
from fedeen.data import ClientData, DatasetInfo, Tensors, hflip_for, modalities
from fedeen.protocol import DIFFICULTY_RECORD, Instructions
from models.base import EarlyExitNet, SubmodelSpec
from models.family import EENFamily
from models.state import load_state

PARAM_KEYS = "param-keys"


def split_config(config: dict[str, Any]) -> tuple[list[str], Instructions]:
    """The tensor names the adapter added and the strategy's instructions."""
    rest = {k: v for k, v in config.items() if k != PARAM_KEYS}
    return list(config[PARAM_KEYS]), Instructions.from_config(rest)


class EENClient(NumPyClient):
    def __init__(self, family: EENFamily, data: ClientData, cfg: RunConfig, info: DatasetInfo,
                 device: torch.device, client_seed: int) -> None:
        self.family, self.data, self.cfg, self.info = family, data, cfg, info
        self.device, self.client_seed = device, client_seed
        self.modality = modalities.get(info.modality)
        self.hflip = hflip_for(cfg, info)
        self.objective_state: dict[str, Any] = {}
        self.records: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ model I/O
    def load_model(self, parameters: list[np.ndarray], keys: list[str],
                   instructions: Instructions) -> EarlyExitNet:
        spec = SubmodelSpec(instructions.depth, instructions.width)
        expected = self.family.shapes(spec)
        if set(keys) != set(expected):
            raise ValueError(f"received tensors do not match spec {spec}: "
                             f"{len(set(keys) ^ set(expected))} names differ")
        model = load_state(self.family.build(spec), dict(zip(keys, parameters)))
        return model.to(self.device)

    @staticmethod
    def export(model: EarlyExitNet, keys: list[str]) -> list[np.ndarray]:
        state = model.state_dict()
        return [state[k].detach().cpu().numpy() for k in keys]

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [v.numpy() for v in self.family.build().state_dict().values()]

    # ------------------------------------------------------------------ training
    def start_round(self, parameters: list[np.ndarray], config: dict[str, Any]
                    ) -> tuple[list[str], Instructions, EarlyExitNet, torch.Generator,
                               losses.ObjectiveContext]:
        """What every fit starts with: the received model, this round's seeded generators,
        the difficulty record when the strategy asks for it, and the objective's context."""
        keys, instructions = split_config(config)
        model = self.load_model(parameters, keys, instructions)
        seed = self.client_seed * 100_003 + instructions.server_round
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if instructions.record_difficulty:
            self.records[DIFFICULTY_RECORD] = self.difficulty_record(model)
        received = {k: v.detach().clone() for k, v in model.named_parameters()}
        ctx = losses.ObjectiveContext(instructions, self.objective_state, model, received)
        return keys, instructions, model, gen, ctx

    def train_batches(self, gen: torch.Generator):
        """Every local epoch's shuffled, augmented training batches, one after the other."""
        for _epoch in range(self.cfg.local_epochs):
            yield from self.batches(self.data.train, gen, shuffle=True, augment=self.cfg.augment)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        t0 = time.perf_counter()
        keys, instructions, model, gen, ctx = self.start_round(parameters, config)
        objective = losses.get(instructions.objective)
        opt = torch.optim.SGD(model.parameters(), lr=instructions.lr,
                              momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        model.train()
        l2w = model.policy == "l2w"
        meta_opt = l2w_policy.meta_optimizer(model) if l2w else None
        total, count = 0.0, 0
        for step, (xb, yb) in enumerate(self.train_batches(gen)):
            if l2w and step % l2w_policy.META_EVERY == 0:
                l2w_policy.meta_step(model, xb, yb, opt, meta_opt)
            out = model(xb)
            if l2w:
                out.sample_weights = l2w_policy.sample_weights(model, out.logits, yb)
            loss = objective(out, yb, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        metrics = {"train-loss": total / max(count, 1), "train-seconds": time.perf_counter() - t0,
                   "level": instructions.level}
        return self.export(model, keys), len(self.data.train), metrics

    def batches(self, data: Tensors, gen: torch.Generator, shuffle: bool, augment: bool):
        n, bs = len(data), self.cfg.batch_size
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            if shuffle and len(idx) < 2:
                continue  # BatchNorm cannot train on a single sample
            xb, yb = data.x[idx], data.y[idx]
            if augment and self.modality.augment is not None:
                xb = self.modality.augment(xb, self.hflip, gen)
            yield xb.to(self.device), yb.to(self.device)

    @torch.no_grad()
    def difficulty_record(self, model: EarlyExitNet) -> dict[str, np.ndarray]:
        """Per training sample: label and difficulty, the cross-entropy at the first exit of
        the model as received this round (DarkDistill's difficulty assessment); and the
        per-element mean and mean square of the latent (``to_latent``) over the training set,
        the embedding statistics the server's generators are anchored to. One eval-mode pass
        without augmentation."""
        model.eval()
        diffs = []
        data = self.data.train
        total = torch.zeros(model.latent_shape(), dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, len(data), 256):
            xb = data.x[start:start + 256].to(self.device)
            yb = data.y[start:start + 256].to(self.device)
            latent = model.to_latent(xb)
            z = model.forward_latent(latent).logits[0]
            diffs.append(F.cross_entropy(z, yb, reduction="none").float().cpu())
            lat = latent.double()
            total += lat.sum(dim=0).cpu()
            total_sq += lat.pow(2).sum(dim=0).cpu()
        model.train()
        n = max(len(data), 1)
        return {"labels": data.y.numpy().astype(np.int64),
                "difficulty": torch.cat(diffs).numpy().astype(np.float32),
                "latent_mean": (total / n).numpy().astype(np.float32),
                "latent_sq_mean": (total_sq / n).numpy().astype(np.float32)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        keys, instructions = split_config(config)
        model = self.load_model(parameters, keys, instructions)
        val = self.data.val
        if len(val) == 0:
            return 0.0, 0, {}
        model.eval()
        correct = torch.zeros(model.num_exits)
        loss_sum = 0.0
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for xb, yb in self.batches(val, gen, shuffle=False, augment=False):
                out = model(xb)
                loss_sum += float(F.cross_entropy(out.logits[-1], yb, reduction="sum"))
                for j, z in enumerate(out.logits):
                    correct[j] += float((z.argmax(1) == yb).sum())
        n = len(val)
        metrics = {f"acc-exit-{j + 1}": float(correct[j]) / n for j in range(model.num_exits)}
        return loss_sum / n, n, metrics
