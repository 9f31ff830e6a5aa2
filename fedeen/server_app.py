"""The ServerApp: validate the config, build family/strategy/data, run the rounds, write results."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

import strategies
from fedeen.config import RunConfig, load_config
from fedeen.data import ServerData, load_server_data
from fedeen.evaluation import budget_curve, exit_accuracies, predict
from fedeen.results import RunRecorder, exit_columns
from fedeen.runtime import family_for, resolve_device, seed_everything
from models.family import EENFamily
from strategies.base import HeteroEENStrategy, to_record

app = ServerApp()


class CentralEvaluator:
    """Per-exit accuracy of the global EEN on the server's test split after every round."""

    def __init__(self, family: EENFamily, data: ServerData, cfg: RunConfig,
                 device: torch.device, strategy: HeteroEENStrategy) -> None:
        self.family, self.data, self.cfg, self.device = family, data, cfg, device
        self.strategy = strategy
        self.model = family.build()
        self.exit_costs = family.exit_costs()
        self.last_val: list[torch.Tensor] = []
        self.last_test: list[torch.Tensor] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        bs = self.cfg.eval_batch_size
        self.last_test = predict(self.model, self.data.test, bs, self.device)
        self.last_val = predict(self.model, self.data.val, bs, self.device)
        test_acc = exit_accuracies(self.last_test, self.data.test.y)
        val_acc = exit_accuracies(self.last_val, self.data.val.y)
        metrics = dict(zip(exit_columns(len(test_acc)), test_acc))
        metrics.update({"acc-mean": float(np.mean(test_acc)), "acc-std": float(np.std(test_acc)),
                        "val-acc-mean": float(np.mean(val_acc))})
        metrics.update(self.strategy.extra_central_metrics(self.last_test, self.data.test.y))
        return MetricRecord(metrics)

    def curve(self):
        return budget_curve(self.last_val, self.last_test, self.data.test.y, self.exit_costs)


def run(grid: Grid, cfg: RunConfig) -> dict:
    """The whole server side of a run; returns the summary written to metrics.json."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg)
    data = load_server_data(cfg)
    family = family_for(cfg, data.info)
    strategy = strategies.get(cfg.strategy)(cfg, family)
    evaluator = CentralEvaluator(family, data, cfg, device, strategy)
    recorder = RunRecorder(cfg, family.num_exits, evaluator.exit_costs)
    log(logging.INFO, "fedeen: %s on %s (%d classes, %s), %s model, %d rounds; run dir %s "
        "(setup %.1fs)", cfg.strategy, data.info.name, data.info.num_classes, data.info.modality,
        cfg.model, cfg.num_server_rounds, recorder.path, time.perf_counter() - t0)
    initial = family.init_state(cfg.seed)
    strategy.global_state = initial
    result = strategy.start(grid, to_record(initial), num_rounds=cfg.num_server_rounds,
                            evaluate_fn=evaluator, observer=recorder)
    init_metrics = dict(result.evaluate_metrics_serverapp.get(0, {}))
    summary = recorder.finish(strategy.global_state, evaluator.curve(), strategy.rejected,
                              init_metrics)
    final = summary["final"]
    log(logging.INFO, "fedeen: done in %.1fs; final exits %s, mean %.2f ± %.2f; results in %s",
        time.perf_counter() - t0,
        " ".join(f"{100 * (final[c] or 0):.2f}" for c in exit_columns(family.num_exits)),
        100 * (final["acc-mean"] or 0), 100 * (final["acc-std"] or 0), recorder.path)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(context.run_config)  # fails here, first, on any bad value
    run(grid, cfg)
