"""What travels between the server and the clients, as one typed schema.

A train or evaluate message carries the submodel's arrays (record ``arrays``, named by
state-dict key) and ``Instructions`` (record ``config``); a reply carries the arrays, the
metrics (``num-examples`` and the client's measurements) and, for some strategies, extra
array records (``DIFFICULTY_RECORD``). Instructions are read back strictly: a missing or
misspelled key is an error, never a silent default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from models.options import coerce, key_for
from models.state import State

#: the server's one-time question to a node, and the keys of the answer
QUERY_LEVEL = "budget-level"
QUERY_PARTITION = "partition-id"
QUERY_TRAIN_EXAMPLES = "num-train-examples"  # bound on a train reply's num-examples
QUERY_EVAL_EXAMPLES = "num-eval-examples"    # bound on an evaluate reply's num-examples
#: reply metric: examples the client trained (or evaluated) on
NUM_EXAMPLES = "num-examples"
#: extra reply record of per-sample labels and difficulties (DarkDistill's uploads)
DIFFICULTY_RECORD = "difficulty"


class ProtocolError(ValueError):
    """A message does not follow the schema."""


@dataclass(frozen=True)
class Instructions:
    """What a client needs for one round: its submodel spec, objective and hyperparameters.

    Keys on the wire are the field names with ``-`` for ``_``. The objective's parameters
    (``kd_*``, ``feddyn_alpha``, ``grad_clip``) are read by the objective the strategy names.
    """

    server_round: int
    num_rounds: int
    level: int
    depth: int
    width: float
    objective: str
    lr: float
    record_difficulty: bool = False
    kd_gamma: float = 0.0
    kd_temperature: float = 1.0
    kd_rampup_rounds: int = 0
    feddyn_alpha: float = 0.0
    grad_clip: float = 0.0

    def to_config(self) -> dict[str, Any]:
        return {key_for("", f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Instructions":
        by_key = {key_for("", f.name): f for f in fields(cls)}
        unknown = sorted(set(config) - set(by_key))
        if unknown:
            raise ProtocolError(f"unknown instruction keys {unknown}; valid: {sorted(by_key)}")
        values = {}
        for key, f in by_key.items():
            if key in config:
                default = f.default if f.default is not dataclasses.MISSING else _example(f.type)
                values[f.name] = coerce(key, config[key], default)
            elif f.default is dataclasses.MISSING:
                raise ProtocolError(f"instructions lack {key!r}")
        return cls(**values)

    def replace(self, **changes: Any) -> "Instructions":
        return dataclasses.replace(self, **changes)


def _example(type_name: str) -> Any:
    """A value of the annotated type (annotations are strings here)."""
    return {"int": 0, "float": 0.0, "str": "", "bool": False}[type_name]


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A numpy state as a Flower ArrayRecord (C-contiguous copies where needed)."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    """A Flower ArrayRecord as a numpy state."""
    return {k: a.numpy() for k, a in record.items()}
