"""Reading client replies as untrusted input: pure checks the strategy base runs before it
decodes or aggregates anything (docs/trust-model.md).

Every function returns the value it read or a string that says what is wrong; none raises on
bad input of the expected Flower types, and the base still runs them inside one guard.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord

from fedeen.protocol import QUERY_EVAL_EXAMPLES, QUERY_LEVEL, QUERY_PARTITION, QUERY_TRAIN_EXAMPLES

#: bytes an .npy header may add to an array's payload (numpy writes 128 or a multiple)
NPY_HEADER_BYTES = 4096


def is_finite_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def example_count(value: Any, declared: int | None) -> int | str:
    """A reply's example count: a finite whole number >= 1, at most what the node declared."""
    if not is_finite_scalar(value) or float(value) != int(value) or value < 1:
        return f"num-examples must be a whole number >= 1, got {value!r}"
    if declared is not None and value > declared:
        return f"num-examples = {int(value)} exceeds the {declared} the node declared"
    return int(value)


def finite_scalars(metrics: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
    """(the finite scalar metrics, the names of the dropped ones)."""
    kept = {k: float(v) for k, v in metrics.items() if is_finite_scalar(v)}
    return kept, sorted(set(metrics) - set(kept))


def record_layout_problem(record: ArrayRecord, expected: Mapping[str, tuple[tuple[int, ...], str]]
                          ) -> str | None:
    """Why an array record does not have exactly the ``expected`` arrays, each of shape and
    dtype kind(s) ``(shape, kinds)`` (``kinds`` as numpy's ``dtype.kind`` letters), read from
    the record's metadata before any payload is decoded (None if it does)."""
    names = set(record.keys())
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        return (f"{len(extra)} arrays outside its spec (e.g. {extra[:3]}), "
                f"{len(missing)} missing (e.g. {missing[:3]})")
    for name, (shape, kinds) in expected.items():
        array = record[name]
        try:
            dtype = np.dtype(array.dtype)
        except TypeError:
            return f"{name}: unknown dtype {array.dtype!r}"
        if tuple(array.shape) != tuple(shape) or dtype.kind not in kinds:
            return f"{name}: shape {tuple(array.shape)} / {dtype} where {tuple(shape)} / " \
                   f"kind {kinds} is expected"
        if len(array.data) > int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + NPY_HEADER_BYTES:
            return f"{name}: {len(array.data)} payload bytes for a {tuple(shape)} {dtype} array"
    return None


def is_whole(value: Any, low: float = 0) -> bool:
    return is_finite_scalar(value) and float(value) == int(value) and value >= low


def query_answer(metrics: Mapping[str, Any], num_levels: int
                 ) -> tuple[int, int | None, int, int] | str:
    """(budget level, stable key or None, declared training and evaluation examples) from a
    node's answer to the level query, or why it is unusable."""
    level = metrics.get(QUERY_LEVEL)
    if not is_whole(level, 1) or level > num_levels:
        return f"budget level {level!r} is not a whole number in 1..{num_levels}"
    key = metrics.get(QUERY_PARTITION)
    counts = [metrics.get(QUERY_TRAIN_EXAMPLES), metrics.get(QUERY_EVAL_EXAMPLES)]
    if not all(is_whole(n) for n in counts):
        return (f"declared {QUERY_TRAIN_EXAMPLES} / {QUERY_EVAL_EXAMPLES} {counts} are not "
                "whole numbers >= 0")
    return int(level), int(key) if is_whole(key) else None, int(counts[0]), int(counts[1])
