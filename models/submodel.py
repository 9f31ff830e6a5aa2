"""Slicing the global state to a submodel and scattering replies back, all by tensor name.

Every strategy goes through these helpers: a submodel is the leading slice of each named
global tensor it holds (depth picks names, width picks slice sizes), and aggregation averages
each global element over the replies that hold it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from models.state import State


def leading_slice(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


def slice_state(global_state: Mapping[str, np.ndarray],
                shapes: Mapping[str, tuple[int, ...]]) -> State:
    """The submodel of ``shapes`` cut out of ``global_state`` (contiguous copies)."""
    missing = [k for k in shapes if k not in global_state]
    if missing:
        raise KeyError(f"global state lacks {len(missing)} tensors of the submodel, e.g. {missing[:3]}")
    return {k: np.array(global_state[k][leading_slice(s)], order="C") for k, s in shapes.items()}


def reply_problems(reply: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                   dtypes: Mapping[str, np.dtype]) -> list[str]:
    """Why a client's reply cannot be aggregated for its spec (empty list if it can)."""
    problems = []
    extra = sorted(set(reply) - set(shapes))
    missing = sorted(set(shapes) - set(reply))
    if extra:
        problems.append(f"{len(extra)} tensors outside its spec, e.g. {extra[:3]}")
    if missing:
        problems.append(f"{len(missing)} tensors of its spec missing, e.g. {missing[:3]}")
    for k in sorted(set(reply) & set(shapes)):
        a = reply[k]
        if tuple(a.shape) != tuple(shapes[k]):
            problems.append(f"{k}: shape {tuple(a.shape)} != expected {tuple(shapes[k])}")
        elif a.dtype != dtypes[k]:
            problems.append(f"{k}: dtype {a.dtype} != expected {dtypes[k]}")
        elif a.dtype.kind == "f" and not np.isfinite(a).all():
            problems.append(f"{k}: non-finite values")
    return problems


class ElementwiseMean:
    """Weighted mean of every global element over the replies whose slice covers it."""

    def __init__(self, global_state: Mapping[str, np.ndarray]) -> None:
        self.global_state = global_state
        self.total: dict[str, np.ndarray] = {}
        self.weight: dict[str, np.ndarray] = {}

    def add(self, state: Mapping[str, np.ndarray], weight: float) -> None:
        for k, a in state.items():
            if k not in self.total:
                g = self.global_state[k]
                self.total[k] = np.zeros(g.shape, dtype=np.float64)
                self.weight[k] = np.zeros(g.shape, dtype=np.float64)
            sl = leading_slice(a.shape)
            self.total[k][sl] += weight * a.astype(np.float64)
            self.weight[k][sl] += weight

    def result(self) -> State:
        """New global state; elements no reply held keep their previous value."""
        out: State = {}
        for k, g in self.global_state.items():
            if k not in self.total:
                out[k] = g.copy()
                continue
            w = self.weight[k]
            mean = np.divide(self.total[k], w, out=np.zeros_like(w), where=w > 0)
            if g.dtype.kind in "iu":
                mean = np.rint(mean)
            out[k] = np.where(w > 0, mean, g).astype(g.dtype)
        return out


def scatter_mean(global_state: Mapping[str, np.ndarray],
                 updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> State:
    acc = ElementwiseMean(global_state)
    for state, weight in updates:
        acc.add(state, weight)
    return acc.result()
