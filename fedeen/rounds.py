"""Per-round bookkeeping shared by the round loop and its observers (results, benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np


class RunFailed(RuntimeError):
    """The run cannot go on (e.g. rounds without any accepted reply); the message says why."""


@dataclass
class RoundTimings:
    configure: float = 0.0
    clients: float = 0.0
    aggregate: float = 0.0
    server_step: float = 0.0
    federated_eval: float = 0.0
    central_eval: float = 0.0
    total: float = 0.0
    client_train_max: float = 0.0
    client_train_sum: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


class ServerState(Protocol):
    """What an observer may read of the server: the global EEN and the state to checkpoint."""

    @property
    def global_state(self) -> Mapping[str, np.ndarray]: ...

    def state_dict(self) -> dict[str, Any]: ...


class RoundObserver:
    """Receives one call per round (results writer, progress log); no-op by default."""

    def round_done(self, server_round: int, central: dict | None, train: dict, evaluate: dict,
                   timings: RoundTimings, server: ServerState) -> None:
        pass
