"""The run configuration: one frozen, validated dataclass built from ``context.run_config``.

Every error a user can make in ``--run-config`` is raised here, before any data is loaded or
a round starts, with a message that names the key and the valid choices. The defaults below
are the single source of truth; ``pyproject.toml`` repeats them for ``flwr run`` and a test
keeps the two identical.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

PARTITIONERS = ("iid", "dirichlet", "natural")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and the valid choices."""


@dataclass(frozen=True)
class RunConfig:
    # what to run
    strategy: str = "eefl"
    model: str = "cnn"
    dataset: str = "digits"
    input_column: str = ""
    label_column: str = ""
    # federation and data split
    num_server_rounds: int = 20
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_nodes: int = 2
    partitioner: str = "dirichlet"
    alpha: float = 1.0
    natural_id: str = "speaker"
    budget_ratios: str = "0.25,0.25,0.25,0.25"
    val_fraction: float = 0.2
    server_val_fraction: float = 0.1
    max_samples_per_client: int = 0
    max_test_samples: int = 0
    # local training
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 0.99
    momentum: float = 0.9
    weight_decay: float = 0.0001
    augment: bool = True
    # model
    image_size: int = 32
    cnn_width: int = 16
    cnn_blocks: int = 1
    vit_blocks: int = 12
    vit_dim: int = 192
    vit_heads: int = 3
    vit_patch: int = 4
    vit_mlp_ratio: float = 4.0
    # training policy (how exits are trained and read; any strategy)
    policy: str = "base"
    boosted_ensemble_weight: float = 0.2
    # evaluation and bookkeeping
    exit_p: float = 1.5
    eval_batch_size: int = 256
    seed: int = 1117
    device: str = "auto"
    out_dir: str = ""
    checkpoint_every: int = 1
    resume: str = ""
    # strategy-specific options (keys registered by strategy modules), as sorted pairs
    options: tuple[tuple[str, Any], ...] = ()

    # ------------------------------------------------------------------ derived views
    @property
    def level_ratios(self) -> tuple[float, ...]:
        return parse_ratios(self.budget_ratios)

    @property
    def num_levels(self) -> int:
        return len(self.level_ratios)

    def opt(self, key: str) -> Any:
        """A strategy option by its run-config key (its registered default if not set)."""
        given = dict(self.options)
        if key in given:
            return given[key]
        if key in STRATEGY_OPTIONS:
            return STRATEGY_OPTIONS[key]
        raise KeyError(f"unknown strategy option {key!r}; registered: {sorted(STRATEGY_OPTIONS)}")

    def as_run_config(self) -> dict[str, Any]:
        """The hyphenated ``run_config`` form (what pyproject and ``--run-config`` use)."""
        out = {to_key(f.name): getattr(self, f.name) for f in fields(self) if f.name != "options"}
        out.update({k: self.opt(k) for k in STRATEGY_OPTIONS})
        return out


#: run-config keys owned by strategy modules, with their defaults (see ``register_options``)
STRATEGY_OPTIONS: dict[str, Any] = {}


def register_options(defaults: Mapping[str, Any]) -> None:
    """Declare a strategy's own run-config keys (hyphenated, prefixed by the strategy name).

    Their defaults must also appear in pyproject's ``[tool.flwr.app.config]``.
    """
    for key, value in defaults.items():
        if key in STRATEGY_OPTIONS or to_key(key.replace("-", "_")) in _FIELDS_NAMES:
            raise ValueError(f"run-config key {key!r} is already defined")
        STRATEGY_OPTIONS[key] = value


def to_key(field_name: str) -> str:
    return field_name.replace("_", "-")


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"budget-ratios must be comma-separated numbers, got {text!r}") from None
    if any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ConfigError(f"budget-ratios must be non-negative and sum to 1, got {text!r}")
    return ratios


_FIELDS = {to_key(f.name): f for f in fields(RunConfig) if f.name != "options"}
_FIELDS_NAMES = set(_FIELDS)


def _coerce(key: str, value: Any, default: Any) -> Any:
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
    raise ConfigError(f"run-config key {key!r} must be a {kind.__name__}, got {value!r}")


def load_config(run_config: Mapping[str, Any], num_nodes: int | None = None) -> RunConfig:
    """Validate ``run_config`` (missing keys take defaults) and return the frozen config."""
    import strategies  # noqa: F401  (strategy modules register their option keys)

    unknown = sorted(set(run_config) - set(_FIELDS) - set(STRATEGY_OPTIONS))
    if unknown:
        valid = sorted([*_FIELDS, *STRATEGY_OPTIONS])
        raise ConfigError(f"unknown run-config keys {unknown}; valid keys: {', '.join(valid)}")
    values: dict[str, Any] = {}
    for key, f in _FIELDS.items():
        if key in run_config:
            values[f.name] = _coerce(key, run_config[key], f.default)
    options = tuple(sorted((k, _coerce(k, v, STRATEGY_OPTIONS[k]))
                           for k, v in run_config.items() if k in STRATEGY_OPTIONS))
    cfg = RunConfig(**values, options=options)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError on the first invalid value (checked in the order users set them)."""
    import strategies  # registry; imported here so config stays importable on its own
    from fedeen import data
    from models import registry as model_registry
    from models.base import POLICIES

    if cfg.strategy not in strategies.available():
        raise ConfigError(
            f"unknown strategy {cfg.strategy!r}; valid strategies: {', '.join(strategies.available())}")
    if cfg.model not in model_registry.available():
        raise ConfigError(
            f"unknown model {cfg.model!r}; valid models: {', '.join(model_registry.available())}")
    data.check_dataset_name(cfg.dataset)
    if cfg.partitioner not in PARTITIONERS:
        raise ConfigError(
            f"unknown partitioner {cfg.partitioner!r}; valid partitioners: {', '.join(PARTITIONERS)}")
    if cfg.policy not in POLICIES:
        raise ConfigError(f"unknown policy {cfg.policy!r}; valid policies: {', '.join(POLICIES)}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"unknown device {cfg.device!r}; valid devices: {', '.join(DEVICES)}")
    checks = [
        ("alpha", cfg.alpha > 0, "must be > 0"),
        ("num-server-rounds", cfg.num_server_rounds >= 1, "must be >= 1"),
        ("fraction-train", 0 < cfg.fraction_train <= 1, "must be in (0, 1]"),
        ("fraction-evaluate", 0 <= cfg.fraction_evaluate <= 1, "must be in [0, 1]"),
        ("min-nodes", cfg.min_nodes >= 1, "must be >= 1"),
        ("val-fraction", 0 <= cfg.val_fraction < 1, "must be in [0, 1)"),
        ("server-val-fraction", 0 < cfg.server_val_fraction < 1, "must be in (0, 1)"),
        ("max-samples-per-client", cfg.max_samples_per_client >= 0, "must be >= 0 (0 = all)"),
        ("max-test-samples", cfg.max_test_samples >= 0, "must be >= 0 (0 = all)"),
        ("local-epochs", cfg.local_epochs >= 1, "must be >= 1"),
        ("batch-size", cfg.batch_size >= 1, "must be >= 1"),
        ("lr", cfg.lr > 0, "must be > 0"),
        ("lr-decay", 0 < cfg.lr_decay <= 1, "must be in (0, 1]"),
        ("momentum", 0 <= cfg.momentum < 1, "must be in [0, 1)"),
        ("weight-decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("image-size", cfg.image_size >= 8, "must be >= 8"),
        ("cnn-width", cfg.cnn_width >= 1, "must be >= 1"),
        ("cnn-blocks", cfg.cnn_blocks >= 1, "must be >= 1"),
        ("vit-blocks", cfg.vit_blocks >= cfg.num_levels, f"must be >= the {cfg.num_levels} exits"),
        ("vit-dim", cfg.vit_dim % max(cfg.vit_heads, 1) == 0, "must be divisible by vit-heads"),
        ("vit-heads", cfg.vit_heads >= 1, "must be >= 1"),
        ("vit-patch", cfg.vit_patch >= 1 and cfg.image_size % cfg.vit_patch == 0,
         "must divide image-size"),
        ("vit-mlp-ratio", cfg.vit_mlp_ratio > 0, "must be > 0"),
        ("boosted-ensemble-weight", cfg.boosted_ensemble_weight > 0, "must be > 0"),
        ("exit-p", cfg.exit_p > 0, "must be > 0"),
        ("eval-batch-size", cfg.eval_batch_size >= 1, "must be >= 1"),
        ("checkpoint-every", cfg.checkpoint_every >= 0, "must be >= 0 (0 = only the last round)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"run-config {key} = {getattr(cfg, key.replace('-', '_'))!r} {why}")
    cfg.level_ratios  # noqa: B018  (raises ConfigError on a bad mix)
    if cfg.model == "cnn" and cfg.num_levels > 4:
        raise ConfigError(f"the cnn has 4 stages, so at most 4 budget levels; budget-ratios "
                          f"{cfg.budget_ratios!r} asks for {cfg.num_levels} (use model='vit')")
    if cfg.out_dir and not os.path.isabs(os.path.expanduser(cfg.out_dir)):
        raise ConfigError(
            f"out-dir must be an absolute path (the app runs from Flower's app cache), got {cfg.out_dir!r}")
    if cfg.resume:
        path = os.path.expanduser(cfg.resume)
        if not os.path.isabs(path):
            raise ConfigError(f"resume must be an absolute path to a run directory or its "
                              f"checkpoint.pt, got {cfg.resume!r}")
        if not os.path.exists(checkpoint_path(path)):
            raise ConfigError(f"resume: no checkpoint at {checkpoint_path(path)}")
    import strategies as _s
    _s.get(cfg.strategy).check_config(cfg)


def checkpoint_path(resume: str) -> str:
    path = os.path.expanduser(resume)
    return path if path.endswith(".pt") else os.path.join(path, "checkpoint.pt")


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    new = dataclasses.replace(cfg, **changes)
    validate(new)
    return new
