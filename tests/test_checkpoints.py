"""Checkpoints load without running code and give strategies back exactly what they saved; a
damaged latest checkpoint falls back to the previous one; bad resume files fail at config time;
every run file is written whole."""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import fedeen.server_app
from fedeen.app_config import load_config
from fedeen.checkpoints import (atomic_write, damaged_path, open_checkpoint, previous_path,
                                read_checkpoint, save_checkpoint)
from fedeen.config import ConfigError
from fedeen.server_app import run
from inprocess import InProcessGrid

RC = {"max-samples-per-client": 40, "max-test-samples": 100, "local-epochs": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_identical(a, b, where="state"):
    """Same types all the way down, same dtypes, shapes and bytes."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} came back as {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), where
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture
def no_data_loads(monkeypatch):
    """Fails the test if a run gets as far as loading its data."""
    def refuse(cfg):
        raise AssertionError("data was loaded before the bad resume file was reported")
    monkeypatch.setattr(fedeen.server_app, "load_server_data", refuse)


def resume_config(run_dir: Path, rounds: int = 3) -> dict:
    return {**RC, "num-server-rounds": rounds, "resume": str(run_dir)}


# ---------------------------------------------------------------------- what a checkpoint keeps
def test_strategy_state_comes_back_with_exactly_the_types_it_was_saved_with(tmp_path):
    state = {
        "rng": random.Random(3).getstate(),                      # tuples of ints and None
        "feddyn_h": {"w": np.arange(6, dtype=np.float64).reshape(2, 3)},
        "private": {3: {"conv": np.ones((2, 2), np.float32)}},   # int keys, nested dicts
        "adam_v": OrderedDict(b=np.array([np.nan, -0.0, 1e-30], np.float32)),
        "odd": [np.arange(3, dtype=">i4"), np.zeros((0, 4), np.float16),
                np.array([True, False]), np.array(2.5), np.asfortranarray(np.eye(3)),
                np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), np.arange(4, dtype=np.uint16)],
        "scalars": (np.float32(1.5), np.int64(7), 3, 0.5, "x", None, True),
        "tensor": torch.arange(4, dtype=torch.bfloat16),
        "levels": {1, 2},
    }
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, 4, {"strategy": "x"}, {"w": torch.ones(2)}, state)
    ckpt = read_checkpoint(path)  # torch.load(weights_only=True)
    assert ckpt["round"] == 4 and ckpt["config"] == {"strategy": "x"}
    assert_identical(state, ckpt["strategy_state"])


def test_a_state_the_safe_loader_would_refuse_is_rejected_when_saved_and_replaces_nothing(
        tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, 1, {}, {}, {"ok": 1})
    with pytest.raises(TypeError, match=r"\['gen'\]\['opt'\]: cannot checkpoint an object"):
        save_checkpoint(path, 2, {}, {}, {"gen": {"opt": object()}})
    assert read_checkpoint(path)["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------------- unsafe and bad files
class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def crafted(kind: str, marker: Path, path: Path) -> None:
    """A checkpoint-shaped file at ``path`` whose unpickling creates ``marker``."""
    payload = {"round": 1, "config": {}, "global_state": {}, "strategy_state": Payload(marker)}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))  # what torch.load parses
    else:
        torch.save(payload, path)


def unpickle_unsafely(kind: str, path: Path) -> None:
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_crafted_pickle_runs_no_code_and_is_rejected_naming_the_file(tmp_path, kind,
                                                                       no_data_loads):
    live = tmp_path / "payload-works"
    crafted(kind, live, tmp_path / "control.pt")
    unpickle_unsafely(kind, tmp_path / "control.pt")
    assert live.exists(), "the payload must be live for this test to mean anything"
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    crafted(kind, marker, run_dir / "checkpoint.pt")
    with pytest.raises(ConfigError) as err:
        run(InProcessGrid(RC, 4), load_config(resume_config(run_dir)))
    assert not marker.exists(), "loading the crafted checkpoint ran its code"
    assert f"{run_dir / 'checkpoint.pt'}: refused" in str(err.value)


@pytest.mark.parametrize("content,why", [
    (b"", "empty file"),
    (b"\x00garbage, not a checkpoint" * 10, "unreadable"),
    ("torch-without-keys", r"lacks \['config', 'global_state', 'strategy_state'\]"),
])
def test_empty_garbage_or_incomplete_resume_files_fail_at_config_time_naming_the_file(
        tmp_path, content, why, no_data_loads):
    path = tmp_path / "checkpoint.pt"
    if content == "torch-without-keys":
        torch.save({"round": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + why):
        run(InProcessGrid(RC, 4), load_config(resume_config(tmp_path)))


def test_a_finished_checkpoint_leaves_nothing_to_run_at_config_time(tmp_path, no_data_loads):
    done = load_config({**RC, "num-server-rounds": 2}).as_run_config()
    save_checkpoint(tmp_path / "checkpoint.pt", 2, done, {}, {})
    with pytest.raises(ConfigError, match=r"at round 2 and num-server-rounds is 2: nothing left"):
        run(InProcessGrid(RC, 4), load_config(resume_config(tmp_path, rounds=2)))
    load_config(resume_config(tmp_path, rounds=3))  # one round left: fine


def test_when_both_checkpoints_are_damaged_the_error_names_both_files(tmp_path):
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError) as err:
        load_config(resume_config(tmp_path))
    assert str(tmp_path / "checkpoint.pt") in str(err.value)
    assert str(tmp_path / "checkpoint.prev.pt") in str(err.value)


# ---------------------------------------------------------------------- falling back
def test_a_crash_between_the_two_renames_leaves_the_previous_checkpoint_to_resume_from(
        tmp_path):
    cfg = load_config({**RC, "num-server-rounds": 3}).as_run_config()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, 1, cfg, {}, {"n": np.arange(2)})
    save_checkpoint(path, 2, cfg, {}, {"n": np.arange(3)})
    assert read_checkpoint(previous_path(path))["round"] == 1
    os.replace(path, previous_path(path))  # as if killed after the first rename
    ckpt = open_checkpoint(path, cfg, 3)
    assert (ckpt.round, ckpt.path) == (2, previous_path(path)) and "no such file" in ckpt.damaged


def test_a_truncated_checkpoint_resumes_from_the_previous_one_and_ends_like_an_uninterrupted_run(
        tmp_path, caplog):
    rc = {**RC, "num-server-rounds": 2, "out-dir": str(tmp_path)}
    straight = run(InProcessGrid(RC, 4), load_config(rc))
    run_dir = Path(straight["run_dir"])
    model = torch.load(run_dir / "final_model.pt", weights_only=True)
    latest = run_dir / "checkpoint.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # killed mid-write (without atomic writes)
    caplog.set_level(logging.INFO, logger="flwr")
    resumed = run(InProcessGrid(RC, 4), load_config({**rc, "resume": str(run_dir)}))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(latest) in w and "resuming from the previous checkpoint" in w
               and "(round 1)" in w for w in warnings), warnings
    assert damaged_path(latest).read_bytes() == data[: len(data) // 2]
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert resumed["final"] == straight["final"]
    again = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert all(torch.equal(model[k], again[k]) for k in model)
    assert read_checkpoint(latest)["round"] == 2 and read_checkpoint(previous_path(latest))


# ---------------------------------------------------------------------- atomic files
def test_an_interrupted_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}')

    def killed_midway(fh):
        fh.write(b'{"new": tr')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed_midway)
    assert path.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_every_run_file_is_written_to_a_temporary_and_renamed_into_place(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    summary = run(InProcessGrid(RC, 4), load_config({**RC, "num-server-rounds": 2,
                                                     "out-dir": str(tmp_path)}))
    run_dir = Path(summary["run_dir"])
    renamed = {dst.name for src, dst in renames
               if dst.parent == run_dir and src.parent == run_dir
               and (src.name.startswith(f".{dst.name}.") or dst.name == "checkpoint.prev.pt")}
    files = {p.name for p in run_dir.iterdir()}
    assert files - renamed == {"rounds.jsonl"}  # the one append-only log
    assert {"config.json", "metrics.json", "history.csv", "checkpoint.pt", "checkpoint.prev.pt",
            "final_model.pt", "exit_accuracy.png", "budget_curve.png"} <= files
    assert read_checkpoint(run_dir / "checkpoint.prev.pt")["round"] == 1
