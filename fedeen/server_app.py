"""The ServerApp: validate the config, build family/strategy/data, run the rounds, write results.

However the round loop ends, metrics.json records it: ``"status": "completed"``, or
``"failed"`` with the ``"cause"`` (``RunFailed``, any other exception, or a run in which no
round accepted a single reply), and the last log line says which before an error is re-raised.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedeen.app_config import build_strategy, check_run, family_for, load_config
from fedeen.checkpoints import CheckpointError, open_checkpoint, set_aside_damaged
from fedeen.config import ConfigError, RunConfig, checkpoint_path
from fedeen.data import ServerData, load_server_data
from fedeen.evaluation import budget_curve, exit_accuracies, predict
from fedeen.protocol import to_record
from fedeen.results import FAILED, RunRecorder, exit_columns
from fedeen.rounds import RunFailed
from fedeen.runtime import resolve_device, seed_everything
from models.family import EENFamily
from models.state import load_state, to_state
from strategies.base import HeteroEENStrategy

app = ServerApp()


class CentralEvaluator:
    """Per-exit accuracy of the global EEN on the server's test split after every round.

    It keeps the exits' logits of the best-validation round (mean exit accuracy on the
    server's validation hold-out), so the budgeted curve is reported for the same round as the
    per-exit accuracies, as the authors do; the last round's curve is kept too.
    """

    def __init__(self, family: EENFamily, data: ServerData, cfg: RunConfig,
                 device: torch.device, strategy: HeteroEENStrategy) -> None:
        self.family, self.data, self.cfg, self.device = family, data, cfg, device
        self.strategy = strategy
        self.model = family.build()
        self.exit_costs = family.exit_costs()
        self.last: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.best: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.best_val = -1.0
        self.initial: dict[str, float] = {}  # round 0's metrics (the initial model)

    def logits(self, state: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every exit's (validation, test) logits; some strategies score an exit on its own
        level's model instead of the global one (``strategy.exit_states``)."""
        bs = self.cfg.eval_batch_size
        self.model.load_state_dict(state)
        val = predict(self.model, self.data.val, bs, self.device)
        test = predict(self.model, self.data.test, bs, self.device)
        for exit_k, sub_state in self.strategy.exit_states().items():
            sub = load_state(self.family.build(self.strategy.level_spec(exit_k)), sub_state)
            val[exit_k - 1] = predict(sub, self.data.val, bs, self.device)[exit_k - 1]
            test[exit_k - 1] = predict(sub, self.data.test, bs, self.device)[exit_k - 1]
        return val, test

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        val_logits, test_logits = self.last = self.logits(arrays.to_torch_state_dict())
        test_acc = exit_accuracies(test_logits, self.data.test.y)
        val_acc = exit_accuracies(val_logits, self.data.val.y)
        metrics = dict(zip(exit_columns(len(test_acc)), test_acc))
        metrics.update({"acc-mean": float(np.mean(test_acc)), "acc-std": float(np.std(test_acc)),
                        "val-acc-mean": float(np.mean(val_acc))})
        metrics.update(self.strategy.extra_central_metrics(test_logits, self.data.test.y))
        if server_round > 0 and metrics["val-acc-mean"] > self.best_val:
            self.best_val, self.best = metrics["val-acc-mean"], self.last
        if server_round == 0:
            self.initial = dict(metrics)
        return MetricRecord(metrics)

    def curve(self, best: bool = True):
        val, test = self.best if best and self.best[0] else self.last
        return budget_curve(val, test, self.data.test.y, self.exit_costs)


def run(grid: Grid, cfg: RunConfig) -> dict:
    """The whole server side of a run; returns the summary written to metrics.json."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg)
    data = load_server_data(cfg)
    family = family_for(cfg, data.info)
    strategy = build_strategy(cfg, family)
    strategy.use_server_data(data.val)
    evaluator = CentralEvaluator(family, data, cfg, device, strategy)
    if cfg.resume:
        initial, first_round, recorder = resume(cfg, strategy, evaluator)
    else:
        initial, first_round = family.init_state(cfg.seed), 1
        recorder = RunRecorder(cfg, family.num_exits, evaluator.exit_costs)
    log(logging.INFO, "fedeen: %s on %s (%d classes, %s), %s model, rounds %d..%d; run dir %s "
        "(setup %.1fs)", cfg.strategy, data.info.name, data.info.num_classes, data.info.modality,
        cfg.model, first_round, cfg.num_server_rounds, recorder.path, time.perf_counter() - t0)
    try:
        strategy.initialize(initial)
        result = strategy.start(grid, to_record(initial), num_rounds=cfg.num_server_rounds,
                                evaluate_fn=evaluator, observer=recorder,
                                first_round=first_round)
        check_trained(recorder.rounds, strategy.rejected)
        init_metrics = dict(result.evaluate_metrics_serverapp.get(0, {}))
        summary = recorder.finish(strategy.global_state, evaluator.curve(best=True),
                                  strategy.rejected, init_metrics, evaluator.curve(best=False))
    except BaseException as err:  # Ctrl-C too: metrics.json must say the run did not finish
        cause = failure_cause(err)
        record_failure(recorder, strategy, evaluator, cause)
        log(logging.ERROR, "fedeen: FAILED: %s", cause)
        raise
    final = summary["final"]
    log(logging.INFO, "fedeen: completed in %.1fs; final exits %s, mean %.2f ± %.2f; "
        "results in %s", time.perf_counter() - t0,
        " ".join(f"{100 * (final[c] or 0):.2f}" for c in exit_columns(family.num_exits)),
        100 * (final["acc-mean"] or 0), 100 * (final["acc-std"] or 0), recorder.path)
    return summary


def check_trained(rounds: list[dict], rejected: dict[int, list[str]]) -> None:
    """A run in which no round accepted a reply trained nothing: that is a failure."""
    if any(r["train"].get("clients-ok", 0) > 0 for r in rounds):
        return
    example = next(((node, why[0]) for node, why in rejected.items() if why), None)
    raise RunFailed(f"trained nothing: none of the {len(rounds)} rounds accepted a reply"
                    + (f" (e.g. node {example[0]}: {example[1]})" if example else ""))


def failure_cause(err: BaseException) -> str:
    """What metrics.json and the last log line say about why a run failed."""
    text = str(err).strip()
    if isinstance(err, RunFailed) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def record_failure(recorder: RunRecorder, strategy: HeteroEENStrategy,
                   evaluator: CentralEvaluator, cause: str) -> None:
    """metrics.json with status failed and the cause, and whatever else of the run can still
    be written; an error here is logged, never raised over the run's own."""
    curves = []
    for best in (True, False):
        try:
            curves.append(evaluator.curve(best=best))
        except Exception:  # no round was evaluated: there is no curve
            curves.append([])
    try:
        recorder.finish(strategy.global_state or None, curves[0], strategy.rejected,
                        evaluator.initial, curves[1], status=FAILED, cause=cause)
    except Exception as err:
        log(logging.ERROR, "fedeen: could not write metrics.json of the failed run in %s: "
            "%s: %s", recorder.path, type(err).__name__, err)


def resume(cfg: RunConfig, strategy: HeteroEENStrategy, evaluator: CentralEvaluator):
    """Global state, first round and recorder of a run continued from its checkpoint (the
    previous checkpoint when the latest is damaged; see fedeen.checkpoints)."""
    path = checkpoint_path(cfg.resume)
    try:
        ckpt = open_checkpoint(path, cfg.as_run_config(), cfg.num_server_rounds)
    except CheckpointError as err:
        raise ConfigError(f"resume: {err}") from None
    if ckpt.damaged:
        aside = set_aside_damaged(ckpt, path)
        log(logging.WARNING, "fedeen: %s; resuming from the previous checkpoint %s (round %d)%s",
            ckpt.damaged, ckpt.path, ckpt.round,
            f"; the damaged file is kept as {aside}" if aside else "")
    strategy.load_state_dict(ckpt.strategy_state)
    done = ckpt.round
    recorder = RunRecorder.resume(cfg, evaluator.family.num_exits, evaluator.exit_costs,
                                  Path(path).parent, done)
    best = recorder.best_round()
    if best is not None:
        evaluator.best_val = best["central"]["val-acc-mean"]
    state = to_state(ckpt.global_state)
    log(logging.INFO, "fedeen: resuming %s after round %d", ckpt.path, done)
    return state, done + 1, recorder


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(context.run_config)  # fails here, first, on any bad value
    check_run(cfg)  # the data and the out-dir, before the first round
    run(grid, cfg)
