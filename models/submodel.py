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


def _holder_stack(global_array: np.ndarray, arrays: list[np.ndarray]) -> np.ndarray:
    """(replies, *global shape) float64, NaN where a reply's slice does not cover an element."""
    stack = np.full((len(arrays), *global_array.shape), np.nan)
    for i, a in enumerate(arrays):
        stack[(i, *leading_slice(a.shape))] = a
    return stack


def _robust_state(global_state: Mapping[str, np.ndarray], states: list[Mapping[str, np.ndarray]],
                  reduce) -> State:
    out: State = {}
    for k, g in global_state.items():
        held = [s[k] for s in states if k in s]
        if not held:
            out[k] = g.copy()
            continue
        stack = _holder_stack(g, held)
        value = reduce(stack)
        if g.dtype.kind in "iu":
            value = np.rint(value)
        out[k] = np.where(np.isnan(value), g, value).astype(g.dtype)
    return out


def scatter_median(global_state: Mapping[str, np.ndarray],
                   states: Iterable[Mapping[str, np.ndarray]]) -> State:
    """Coordinate-wise median over the replies that hold each element (unweighted); elements
    nobody holds keep their value."""
    def median(stack: np.ndarray) -> np.ndarray:
        held = ~np.isnan(stack).all(axis=0)
        out = np.full(stack.shape[1:], np.nan)
        out[held] = np.nanmedian(stack[:, held], axis=0)
        return out

    return _robust_state(global_state, list(states), median)


def scatter_trimmed_mean(global_state: Mapping[str, np.ndarray],
                         states: Iterable[Mapping[str, np.ndarray]], fraction: float) -> State:
    """Coordinate-wise trimmed mean: of the m replies holding an element, the floor(fraction m)
    smallest and largest values are dropped and the rest averaged (unweighted)."""
    def trimmed(stack: np.ndarray) -> np.ndarray:
        ordered = np.sort(stack, axis=0)  # NaN (not held) sorts last
        m = (~np.isnan(stack)).sum(axis=0)
        k = np.floor(fraction * m).astype(int)
        rank = np.arange(len(stack)).reshape(-1, *([1] * (stack.ndim - 1)))
        keep = (rank >= k) & (rank < m - k)
        total = np.where(keep, ordered, 0.0).sum(axis=0)
        count = keep.sum(axis=0)
        return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)

    return _robust_state(global_state, list(states), trimmed)


def update_norm(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``state - reference`` over the float tensors (a client's update)."""
    total = 0.0
    for k, a in state.items():
        if a.dtype.kind == "f":
            total += float(np.sum((a.astype(np.float64) - reference[k]) ** 2))
    return float(np.sqrt(total))


def scale_update(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 factor: float) -> State:
    """``reference + factor (state - reference)`` on float tensors; other tensors as sent back."""
    out: State = {}
    for k, a in state.items():
        if a.dtype.kind == "f":
            ref = reference[k].astype(np.float64)
            out[k] = (ref + factor * (a.astype(np.float64) - ref)).astype(a.dtype)
        else:
            out[k] = a
    return out
