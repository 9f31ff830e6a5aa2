"""Strategies by name: ``register`` / ``get`` / ``available`` (duplicates rejected), and the
option groups of the registered strategies."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

from models.options import Options

if TYPE_CHECKING:
    from strategies.base import HeteroEENStrategy

S = TypeVar("S", bound="type[HeteroEENStrategy]")
_STRATEGIES: dict[str, "type[HeteroEENStrategy]"] = {}


def register(*names: str) -> Callable[[S], S]:
    """Register a strategy class under its name and any aliases."""

    def wrap(cls: S) -> S:
        for name in names:
            if name in _STRATEGIES:
                raise ValueError(f"strategy {name!r} is already registered")
        for name in names:
            _STRATEGIES[name] = cls
        cls.name = names[0]
        return cls

    return wrap


def unregister(name: str) -> None:
    """Remove a name (for tests that register a strategy of their own)."""
    _STRATEGIES.pop(name, None)


def available() -> list[str]:
    return sorted(_STRATEGIES)


def get(name: str) -> "type[HeteroEENStrategy]":
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid strategies: {', '.join(available())}") from None


def option_classes() -> list[type[Options]]:
    """The option group of every registered strategy, once each."""
    return list(dict.fromkeys(cls.Options for cls in _STRATEGIES.values()))
