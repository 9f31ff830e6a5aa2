"""Run files that survive a crash, and checkpoints that load without running code.

- Every file of a run directory is written whole or not at all: ``atomic_write`` writes a
  temporary file in the same folder, syncs it and renames it into place (``os.replace``), so
  a kill mid-write leaves the previous version, never a truncated one. ``rounds.jsonl`` is the
  exception: an append-only log, one flushed JSON line per round (``append_line``).
- ``save_checkpoint`` keeps the checkpoint it replaces as ``checkpoint.prev.pt``;
  ``open_checkpoint`` falls back to it when the latest one is damaged or missing.
- Checkpoints are read with ``torch.load(weights_only=True)``, which refuses any pickled
  object but tensors and plain containers, so a crafted file cannot run code. Strategy states
  hold numpy arrays (FedDyn's ``h``, InclusiveFL's Adam moments, ...), which that loader
  refuses: ``encode`` replaces each by a tagged dict holding its bytes in a tensor and
  ``decode`` restores it, dtype, shape and all, so a strategy gets back exactly what it saved.

This module sits in the core beside ``config.py``, which imports it (``resume`` is checked at
config time), so it raises its own ``CheckpointError`` and ``config.py`` turns it into a
``ConfigError``.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import numpy as np
import torch

#: run-config keys a resumed run may change; every other key must equal the checkpoint's
RESUMABLE_CHANGES = frozenset({"num-server-rounds", "resume", "out-dir", "device",
                               "checkpoint-every"})
#: what a checkpoint holds
CHECKPOINT_KEYS = ("round", "config", "global_state", "strategy_state")
NDARRAY_TAG = "__ndarray__"
#: lines of torch.load's errors that say nothing about the file
TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the file(s) and why."""


# ---------------------------------------------------------------------- atomic files
def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file in the same
    folder, which is synced and renamed over ``path``; on any error it is removed."""
    os.replace(_write_temporary(Path(path), write), path)
    _sync_folder(Path(path).parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def append_line(path: Path | str, line: str) -> None:
    """Append one line to a log and push it to the disk (a crash loses at most that line)."""
    with open(path, "a") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_temporary(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- encoding
PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype,
         torch.device)


def encode(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with every numpy array and scalar replaced by a tagged dict that
    ``torch.load(weights_only=True)`` accepts; raises TypeError naming the place of anything
    that loader would refuse."""
    if isinstance(obj, np.ndarray):
        return _encode_array(obj, where, scalar=False)
    if isinstance(obj, np.generic):
        return _encode_array(np.asarray(obj), where, scalar=True)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, PLAIN):
        return obj
    if type(obj) in (dict, OrderedDict):
        for key in obj:
            _check_key(key, where)
        return type(obj)((k, encode(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(encode(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) is set:
        for item in obj:
            _check_key(item, where)
        return set(obj)
    raise TypeError(f"{where}: cannot checkpoint an object of type {type(obj).__name__} "
                    "(a state_dict may hold tensors, numpy arrays, numbers, strings, None and "
                    "dicts, lists, tuples and sets of them)")


def _check_key(key: Any, where: str) -> None:
    if type(key) is tuple:
        for part in key:
            _check_key(part, where)
    elif not isinstance(key, PLAIN) or isinstance(key, np.generic):
        raise TypeError(f"{where}: cannot checkpoint the key {key!r} of type "
                        f"{type(key).__name__} (use str, int, float, bool or tuples of them)")


def _encode_array(arr: np.ndarray, where: str, scalar: bool) -> dict[str, Any]:
    if arr.dtype.hasobject:
        raise TypeError(f"{where}: cannot checkpoint a numpy array of Python objects "
                        f"(dtype {arr.dtype})")
    data = torch.from_numpy(np.frombuffer(arr.tobytes(), dtype=np.uint8).copy())
    tagged = {NDARRAY_TAG: data, "dtype": np.lib.format.dtype_to_descr(arr.dtype),
              "shape": list(arr.shape)}
    if scalar:
        tagged["scalar"] = True
    return tagged


def decode(obj: Any) -> Any:
    """The inverse of ``encode``: tagged dicts back to numpy arrays and scalars."""
    if type(obj) in (dict, OrderedDict):
        if NDARRAY_TAG in obj:
            dtype = np.lib.format.descr_to_dtype(obj["dtype"])
            arr = np.frombuffer(obj[NDARRAY_TAG].numpy().tobytes(), dtype=dtype)
            arr = arr.reshape(obj["shape"]).copy()
            return arr[()] if obj.get("scalar") else arr
        return type(obj)((k, decode(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(decode(v) for v in obj)
    return obj


# ---------------------------------------------------------------------- save and load
def previous_path(path: Path | str) -> Path:
    """``checkpoint.pt`` -> ``checkpoint.prev.pt``: the checkpoint before the latest."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def damaged_path(path: Path | str) -> Path:
    """Where a damaged latest checkpoint is set aside once a run resumed without it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.damaged{path.suffix}")


def save_checkpoint(path: Path | str, server_round: int, config: Mapping[str, Any],
                    global_state: Mapping[str, torch.Tensor], strategy_state: Mapping[str, Any]
                    ) -> None:
    """Write a checkpoint atomically; the one it replaces becomes ``checkpoint.prev.pt``.

    The new file is complete on disk before the old one moves; a crash between the two
    renames leaves only ``checkpoint.prev.pt``, which ``open_checkpoint`` then uses."""
    path = Path(path)
    payload = encode({"round": int(server_round), "config": dict(config),
                      "global_state": dict(global_state),
                      "strategy_state": dict(strategy_state)})
    tmp = _write_temporary(path, lambda fh: torch.save(payload, fh))
    try:
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """One checkpoint file, loaded with ``weights_only=True`` (no code runs) and decoded;
    CheckpointError naming the file when it is unreadable or lacks a part."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many types on truncated, foreign or unsafe files
        text = str(err)
        unsafe = re.search(r"GLOBAL (\S+)", text)
        if isinstance(err, pickle.UnpicklingError) and unsafe:
            raise CheckpointError(f"{path}: refused, it would load {unsafe.group(1)}, which "
                                  "is neither a tensor nor a plain container: not a fedeen "
                                  "checkpoint, or tampered with (it was not unpickled)") from None
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        reason = next((x for x in lines if not x.startswith(TORCH_BOILERPLATE)),
                      lines[0] if lines else "")
        raise CheckpointError(f"{path}: unreadable as a checkpoint, damaged or truncated "
                              f"({type(err).__name__}: {reason.split('. ')[0][:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing} (a checkpoint holds "
                              f"{list(CHECKPOINT_KEYS)})")
    try:
        ckpt = decode(ckpt)
    except Exception as err:  # a tagged array with a bad dtype or shape
        raise CheckpointError(f"{path}: a numpy array in it cannot be decoded ({err})") from None
    problems = [k for k, t in (("round", int), ("config", dict), ("global_state", dict),
                               ("strategy_state", dict)) if not isinstance(ckpt[k], t)]
    if problems:
        raise CheckpointError(f"{path}: {problems} have the wrong type")
    return ckpt


@dataclass
class Checkpoint:
    """A checkpoint to resume from; ``damaged`` says why the latest file was passed over."""

    path: Path
    round: int
    config: dict[str, Any]
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    damaged: str | None = None


def open_checkpoint(path: Path | str, run_config: Mapping[str, Any], num_rounds: int
                    ) -> Checkpoint:
    """The checkpoint a run with ``run_config`` resumes from: ``path`` or, when that file is
    damaged or missing, its ``checkpoint.prev.pt``. CheckpointError when neither can be read,
    when the run config differs in a key outside RESUMABLE_CHANGES, or when the checkpoint's
    round leaves nothing to run."""
    path = Path(path)
    damaged = None
    try:
        ckpt = read_checkpoint(path)
        used = path
    except CheckpointError as err:
        prev = previous_path(path)
        if not path.exists() and not prev.exists():
            raise CheckpointError(f"no checkpoint at {path}") from None
        try:
            ckpt = read_checkpoint(prev)
        except CheckpointError as prev_err:
            raise CheckpointError(f"neither checkpoint can be used: {err}; {prev_err}") from None
        damaged, used = str(err), prev
    changed = sorted(k for k, v in run_config.items()
                     if k not in RESUMABLE_CHANGES and ckpt["config"].get(k) != v)
    if changed:
        raise CheckpointError(f"the run config differs from the checkpoint's in {changed} "
                              f"({used}); only {sorted(RESUMABLE_CHANGES)} may change")
    if ckpt["round"] >= num_rounds:
        raise CheckpointError(f"{used} is at round {ckpt['round']} and num-server-rounds is "
                              f"{num_rounds}: nothing left to run")
    return Checkpoint(used, ckpt["round"], ckpt["config"], ckpt["global_state"],
                      ckpt["strategy_state"], damaged)


def check_resumable(path: Path | str, run_config: Mapping[str, Any], num_rounds: int) -> None:
    """``open_checkpoint``'s checks, for config validation. Every load of a run config (the
    ClientApp's too, on every message) calls it, so the answer is kept per state of the
    files: a checkpoint is read again only after it changed."""
    path = Path(path)
    files = tuple(_stat(p) for p in (path, previous_path(path)))
    _check_cached(str(path), files, tuple(sorted(run_config.items())), num_rounds)


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@lru_cache(maxsize=16)
def _check_cached(path: str, files: tuple, run_config: tuple, num_rounds: int) -> None:
    open_checkpoint(path, dict(run_config), num_rounds)


def set_aside_damaged(ckpt: Checkpoint, requested: Path | str) -> Path | None:
    """Move a damaged latest checkpoint to ``checkpoint.damaged.pt`` once the run resumed from
    the previous one, so the next save does not rotate it over the good previous file."""
    requested = Path(requested)
    if ckpt.damaged is None or not requested.exists():
        return None
    target = damaged_path(requested)
    os.replace(requested, target)
    return target
