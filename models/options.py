"""Typed option groups: frozen dataclasses whose fields are run-config keys.

A backbone (``models/``) or a strategy (``strategies/``) declares its hyperparameters as one
``Options`` subclass next to its class. The run-config key of a field is derived by one rule,

    key = f"{prefix}-{field name with '_' written as '-'}"      (``key_for``)

so ``DarkDistillOptions.kd_lr`` with prefix ``darkdistill`` is ``darkdistill-kd-lr``, and a
search for either the key or the field name finds where the value is used. A field may hold
another ``Options`` group (shared options, e.g. the keys both DarkDistill variants read); its
keys follow that group's own prefix. Range checks sit in the field's metadata (``option``);
checks that involve several fields go in ``check``.

This module is the bottom layer's on purpose: backbones declare options too, and ``models``
imports nothing from the rest of the project.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Iterator, Mapping, TypeVar

O = TypeVar("O", bound="Options")


class OptionError(ValueError):
    """An option value is invalid; ``key`` is its run-config key."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"run-config {key} = {value!r} {why}")
        self.key, self.value, self.why = key, value, why


def option(default: Any, check: Callable[[Any], bool] | None = None, why: str = "",
           choices: tuple = ()) -> Any:
    """A dataclass field with a default and an optional range check or list of choices."""
    return dataclasses.field(default=default,
                             metadata={"check": check, "why": why, "choices": tuple(choices)})


def key_for(prefix: str, field_name: str) -> str:
    """The run-config key of ``field_name`` in a group with ``prefix`` (the one rule)."""
    name = field_name.replace("_", "-")
    return f"{prefix}-{name}" if prefix else name


def coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (run configs carry TOML/CLI scalars)."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise OptionError(key, value, f"must be a {kind.__name__}")


@dataclass(frozen=True)
class Options:
    """Base of every option group; subclasses set ``prefix`` and declare fields."""

    prefix: ClassVar[str] = ""

    @classmethod
    def _entries(cls) -> Iterator[tuple[str, dataclasses.Field]]:
        for f in fields(cls):
            if not _is_group(f):
                yield key_for(cls.prefix, f.name), f

    @classmethod
    def _groups(cls) -> Iterator[tuple[dataclasses.Field, type["Options"]]]:
        for f in fields(cls):
            if _is_group(f):
                yield f, f.default_factory  # type: ignore[misc]

    @classmethod
    def groups(cls) -> list[type["Options"]]:
        """This group and every group it holds, nested ones first."""
        out: list[type[Options]] = []
        for _f, group in cls._groups():
            out += group.groups()
        return [*out, cls]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key this group (and the groups it holds) reads, with its default."""
        out: dict[str, Any] = {}
        for _f, group in cls._groups():
            out.update(group.defaults())
        out.update({key: f.default for key, f in cls._entries()})
        return out

    @classmethod
    def from_run_config(cls: type[O], run_config: Mapping[str, Any]) -> O:
        """The group's values from ``run_config`` (absent keys take defaults), checked."""
        values: dict[str, Any] = {}
        for f, group in cls._groups():
            values[f.name] = group.from_run_config(run_config)
        for key, f in cls._entries():
            value = coerce(key, run_config[key], f.default) if key in run_config else f.default
            _check_field(key, value, f)
            values[f.name] = value
        obj = cls(**values)
        obj.check()
        return obj

    def check(self) -> None:
        """Checks across fields; raise ``OptionError`` naming the key. None by default."""

    def as_run_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f, _group in self._groups():
            out.update(getattr(self, f.name).as_run_config())
        out.update({key: getattr(self, f.name) for key, f in self._entries()})
        return out

    def key(self, field_name: str) -> str:
        """The run-config key of one of this group's fields (for error messages)."""
        return key_for(self.prefix, field_name)


def group(cls: type[O]) -> Any:
    """A field that holds another option group (its keys keep that group's prefix)."""
    return dataclasses.field(default_factory=cls, metadata={"group": True})


def _is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("group"))


def _check_field(key: str, value: Any, f: dataclasses.Field) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(key, value, "must be a finite number")
    choices = f.metadata.get("choices") or ()
    if choices and value not in choices:
        raise OptionError(key, value, f"is not valid; valid: {', '.join(map(str, choices))}")
    check = f.metadata.get("check")
    if check is not None and not check(value):
        raise OptionError(key, value, f.metadata.get("why") or "is out of range")


def all_defaults(groups: Iterator[type[Options]] | list[type[Options]]) -> dict[str, Any]:
    """The keys of several groups; a key declared twice must have one default."""
    out: dict[str, Any] = {}
    for g in groups:
        for key, value in g.defaults().items():
            if key in out and out[key] != value:
                raise ValueError(f"run-config key {key!r} is declared twice with different "
                                 f"defaults ({out[key]!r}, {value!r})")
            out[key] = value
    return out
