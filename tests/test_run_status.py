"""Every run records how it ended: metrics.json says "completed", or "failed" with the cause,
the last log line says the same, and the project's runners exit non-zero on a failure."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import Error, Message, MessageType
from flwr.serverapp.strategy import Result

import fedeen.server_app
import simulations.benchmark_round as benchmark_round
import simulations.deploy_local as deploy_local
import simulations.run_grid as run_grid
from fedeen.app_config import load_config
from fedeen.rounds import RoundTimings, RunFailed
from fedeen.server_app import run
from inprocess import InProcessGrid
from simulations.flwr_local import FlwrRun

RC = {"max-samples-per-client": 40, "max-test-samples": 100, "local-epochs": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


class FailingClientsGrid(InProcessGrid):
    """Every node answers its training message with an error (it answers queries)."""

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                self.sent.append(msg)
                replies.append(Message(Error(code=0, reason="CUDA out of memory"), reply_to=msg))
            else:
                replies.extend(super().send_and_receive([msg], timeout))
        return replies


def metrics_of(out: Path) -> dict:
    (path,) = out.glob("*/metrics.json")
    return json.loads(path.read_text())


def last_fedeen_line(caplog) -> str:
    return [r.getMessage() for r in caplog.records if r.name == "flwr"][-1]


def test_a_completed_run_says_completed_in_metrics_json_and_its_last_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    summary = run(InProcessGrid(RC, 4), load_config({**RC, "num-server-rounds": 1,
                                                     "out-dir": str(tmp_path)}))
    metrics = metrics_of(tmp_path)
    assert summary["status"] == metrics["status"] == "completed" and "cause" not in metrics
    assert last_fedeen_line(caplog).startswith("fedeen: completed in ")


def test_a_run_where_every_client_fails_ends_failed_with_the_cause(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    with pytest.raises(RunFailed) as err:
        run(FailingClientsGrid(RC, 4), load_config({**RC, "num-server-rounds": 2,
                                                    "out-dir": str(tmp_path)}))
    metrics = metrics_of(tmp_path)
    assert metrics["status"] == "failed" and metrics["cause"] == str(err.value)
    assert "CUDA out of memory" in json.dumps(metrics["failed_replies"])
    assert last_fedeen_line(caplog) == f"fedeen: FAILED: {err.value}"


def test_a_round_loop_that_ends_without_ever_accepting_a_reply_is_a_failure(tmp_path,
                                                                            monkeypatch):
    real_build = fedeen.server_app.build_strategy

    def build_lenient(cfg, family):
        """A strategy whose loop goes on through rounds that accepted nothing."""
        strategy = real_build(cfg, family)

        def rounds_without_replies(grid, arrays, num_rounds, evaluate_fn, observer, first_round):
            strategy.rejected = {1001: ["client error: disk full"]}
            for rnd in range(first_round, num_rounds + 1):
                observer.round_done(rnd, dict(evaluate_fn(rnd, arrays)),
                                    {"clients-ok": 0, "clients-failed": 4}, {}, RoundTimings(),
                                    strategy)
            return Result()
        strategy.start = rounds_without_replies
        return strategy

    monkeypatch.setattr(fedeen.server_app, "build_strategy", build_lenient)
    with pytest.raises(RunFailed, match=r"trained nothing: none of the 2 rounds accepted a reply "
                                        r"\(e.g. node 1001: client error: disk full\)") as err:
        run(InProcessGrid(RC, 4), load_config({**RC, "num-server-rounds": 2,
                                               "out-dir": str(tmp_path)}))
    metrics = metrics_of(tmp_path)
    assert (metrics["status"], metrics["cause"]) == ("failed", str(err.value))


@pytest.mark.parametrize("error,cause", [
    (RunFailed("3 rounds in a row without an accepted reply"),
     "3 rounds in a row without an accepted reply"),
    (ValueError("server step diverged"), "ValueError: server step diverged"),
])
def test_an_error_in_the_round_loop_is_recorded_with_the_files_so_far_and_re_raised(
        tmp_path, caplog, monkeypatch, error, cause):
    real_build = fedeen.server_app.build_strategy

    def build_failing(cfg, family):
        strategy = real_build(cfg, family)
        start = strategy.start

        def one_round_then_fail(*args, **kwargs):
            start(*args, **{**kwargs, "num_rounds": 1})
            raise error
        strategy.start = one_round_then_fail
        return strategy

    monkeypatch.setattr(fedeen.server_app, "build_strategy", build_failing)
    caplog.set_level(logging.INFO, logger="flwr")
    with pytest.raises(type(error)):
        run(InProcessGrid(RC, 4), load_config({**RC, "num-server-rounds": 3,
                                               "out-dir": str(tmp_path)}))
    metrics = metrics_of(tmp_path)
    assert (metrics["status"], metrics["cause"]) == ("failed", cause)
    assert [r["round"] for r in metrics["rounds"]] == [1]
    run_dir = Path(metrics["run_dir"])
    assert all((run_dir / f).exists() for f in ("final_model.pt", "history.csv",
                                                "checkpoint.pt", "budget_curve.png"))
    assert last_fedeen_line(caplog) == f"fedeen: FAILED: {cause}"


# ---------------------------------------------------------------------- the runners
def write_metrics(run_dir: Path, status: str, strategy: str = "eefl") -> Path:
    run_dir.mkdir(parents=True)
    rounds = [{"round": 1, "train": {"clients-failed": 0},
               "timings": {"aggregate": 0.1, "server_step": 0.0, "total": 1.0}}]
    metrics = {"status": status, "run_dir": str(run_dir), "num_exits": 2, "wall_seconds": 1.0,
               "final": {"round": 1, "acc-exit-1": 0.5, "acc-exit-2": 0.7},
               "best_val": None, "rounds": rounds, "config": {"strategy": strategy}}
    if status == "failed":
        metrics["cause"] = "trained nothing: none of the 1 rounds accepted a reply"
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_flwr_run_status_comes_from_metrics_json_and_is_failed_without_one(tmp_path):
    ok = FlwrRun(0, 1.0, "", [write_metrics(tmp_path / "a", "completed")])
    bad = FlwrRun(0, 1.0, "", [write_metrics(tmp_path / "b", "failed")])
    crashed = FlwrRun(1, 1.0, "Traceback: killed", [tmp_path / "c"])
    nothing = FlwrRun(1, 1.0, "Traceback: bad config", [])
    assert (ok.status, ok.cause) == ("completed", None)
    assert (bad.status, bad.cause) == ("failed", "trained nothing: none of the 1 rounds "
                                                 "accepted a reply")
    assert crashed.status == "failed" and "metrics.json" in crashed.cause
    assert nothing.status == "failed" and "bad config" in nothing.cause


def test_run_grid_tabulates_only_completed_cells_and_exits_non_zero_on_a_failed_one(
        tmp_path, monkeypatch, capsys):
    def fake_flwr_run(overrides, out_dir, home, num_supernodes, timeout):
        strategy = overrides["strategy"]
        status = "failed" if strategy == "depthfl" else "completed"
        return FlwrRun(0, 2.0, "", [write_metrics(out_dir / strategy, status, strategy)])

    monkeypatch.setattr(run_grid, "flwr_run", fake_flwr_run)
    monkeypatch.setattr(run_grid, "stop_superlinks", lambda home: [])
    rc = run_grid.main(["--strategies", "eefl,depthfl", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    table = (tmp_path / "results.md").read_text()
    assert "| eefl |" in table and "depthfl" not in table
    assert "depthfl" not in (tmp_path / "results.csv").read_text()
    assert [json.loads(x)["strategy"] for x in (tmp_path / "cells.jsonl").read_text().splitlines()
            ] == ["eefl"]  # a failed cell runs again next time
    assert "1 cell(s) FAILED" in out and "depthfl" in out and "trained nothing" in out


def test_benchmark_and_deployment_exit_non_zero_when_the_run_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark_round, "flwr_run", lambda overrides, out, home, n: FlwrRun(
        0, 1.0, "", [write_metrics(out / "run", "failed")]))
    monkeypatch.setattr(benchmark_round, "stop_superlinks", lambda home: [])
    assert benchmark_round.main(["--out", str(tmp_path / "bench")]) == 1

    def fake_deploy(overrides, nodes, work, split_nodes=frozenset(), secure=True):
        write_metrics(Path(overrides["out-dir"]) / "run", "failed")
        return 0, "flwr run finished"

    monkeypatch.setattr(deploy_local, "deploy", fake_deploy)
    assert deploy_local.main(["--work", str(tmp_path / "deploy")]) == 1
