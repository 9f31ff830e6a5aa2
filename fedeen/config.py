"""The run configuration: one frozen, validated dataclass built from ``context.run_config``.

``RunConfig`` holds the keys every run reads (federation, data, training, evaluation,
bookkeeping) as typed fields, and the option groups of the backbones and of the strategies
(``models.options.Options``) as typed objects: ``cfg.options_of(ViTOptions).dim``. This module
knows the backbones' groups from the model registry (the layer below) and takes the
strategies' groups from its caller, so nothing here depends on what was imported before:
``fedeen.app_config.load_config`` (at the top, beside the apps) passes every registered
strategy's group and adds the checks that need the registries and the data.

Run-config keys are the field names with ``-`` for ``_`` (``num-server-rounds``); an option
group's keys carry its prefix (``vit-dim``, ``darkdistill-kd-lr``; ``models.options.key_for``).
The defaults below and in the option groups are the source of truth; ``pyproject.toml``
repeats them for ``flwr run`` and a test keeps the two equal.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, TypeVar

import torch

from fedeen.checkpoints import CheckpointError, check_resumable
from models import EENFamily, ModelConfig
from models import registry as model_registry
from models.base import POLICIES
from models.options import Options, OptionError, all_defaults, coerce, key_for

PARTITIONERS = ("iid", "dirichlet", "natural")
AGGREGATIONS = ("mean", "median", "trimmed-mean")
DEVICES = ("auto", "cpu", "cuda")
HFLIP_CHOICES = ("auto", "true", "false")
O = TypeVar("O", bound=Options)


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
    max_failed_rounds: int = 3
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
    augment_hflip: str = "auto"
    # robustness of the server against bad updates (docs/trust-model.md)
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    update_norm_bound: float = 0.0
    # model input and training policy (how exits are trained and read; any strategy)
    image_size: int = 32
    policy: str = "base"
    boosted_ensemble_weight: float = 0.2
    # edge/cloud split training (clients.split): which simulated nodes are split pairs and how
    # they train; a SuperNode's node config (client-mode, cloud-address, split-exit) wins
    split_partitions: str = ""
    split_exit: int = 1
    split_bits: int = 4
    split_max_ahead: int = 4
    split_training: str = "hierarchical"
    split_link_mbps: float = 0.0
    split_link_latency_ms: float = 0.0
    split_timeout_s: float = 30.0
    # evaluation and bookkeeping
    exit_p: float = 1.5
    eval_batch_size: int = 256
    seed: int = 1117
    device: str = "auto"
    out_dir: str = ""
    checkpoint_every: int = 1
    resume: str = ""
    # option groups: every backbone's, and the strategies' the caller passed
    options: tuple[Options, ...] = dataclasses.field(
        default_factory=lambda: tuple(g() for g in model_registry.option_classes()))

    # ------------------------------------------------------------------ derived views
    @property
    def level_ratios(self) -> tuple[float, ...]:
        return parse_ratios(self.budget_ratios)

    @property
    def num_levels(self) -> int:
        return len(self.level_ratios)

    def options_of(self, group: type[O]) -> O:
        """The values of one option group (a backbone's or a strategy's)."""
        for obj in self.options:
            if type(obj) is group:
                return obj
        raise KeyError(f"this run config holds no {group.__name__}; it holds "
                       f"{[type(o).__name__ for o in self.options]}")

    def as_run_config(self) -> dict[str, Any]:
        """The hyphenated ``run_config`` form (what pyproject and ``--run-config`` use)."""
        out = {key_for("", f.name): getattr(self, f.name) for f in core_fields()}
        for obj in self.options:
            out.update(obj.as_run_config())
        return out


def core_fields() -> list[dataclasses.Field]:
    return [f for f in fields(RunConfig) if f.name != "options"]


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"budget-ratios must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(r) and r >= 0 for r in ratios) \
            or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ConfigError(f"budget-ratios must be non-negative and sum to 1, got {text!r}")
    return ratios


def load_run_config(run_config: Mapping[str, Any],
                    strategy_groups: Iterable[type[Options]] = ()) -> RunConfig:
    """Validate ``run_config`` (missing keys take defaults) and return the frozen config.

    ``strategy_groups`` are the option groups whose keys are accepted besides the core and
    backbone keys; an unknown key is an error that lists the valid ones.
    """
    groups = [*model_registry.option_classes(), *strategy_groups]
    groups = list(dict.fromkeys(groups))
    core = {key_for("", f.name): f for f in core_fields()}
    group_keys = all_defaults(groups)
    unknown = sorted(set(run_config) - set(core) - set(group_keys))
    if unknown:
        valid = sorted([*core, *group_keys])
        raise ConfigError(f"unknown run-config keys {unknown}; valid keys: {', '.join(valid)}")
    try:
        values = {f.name: coerce(key, run_config[key], f.default)
                  for key, f in core.items() if key in run_config}
        options = tuple(g.from_run_config(run_config) for g in groups)
    except OptionError as err:
        raise ConfigError(str(err)) from None
    cfg = RunConfig(**values, options=options)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError on the first invalid core value (checked in the order users set them)."""
    choices = [("model", cfg.model, model_registry.available(), "models"),
               ("partitioner", cfg.partitioner, PARTITIONERS, "partitioners"),
               ("policy", cfg.policy, POLICIES, "policies"),
               ("device", cfg.device, DEVICES, "devices"),
               ("augment-hflip", cfg.augment_hflip, HFLIP_CHOICES, "values"),
               ("aggregation", cfg.aggregation, AGGREGATIONS, "aggregations")]
    for key, value, valid, plural in choices:
        if value not in valid:
            raise ConfigError(f"unknown {key} {value!r}; valid {plural}: {', '.join(valid)}")
    for f in core_fields():
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"run-config {key_for('', f.name)} = {value!r} must be a finite number")
    checks = [
        ("alpha", cfg.alpha > 0, "must be > 0"),
        ("num-server-rounds", cfg.num_server_rounds >= 1, "must be >= 1"),
        ("fraction-train", 0 < cfg.fraction_train <= 1, "must be in (0, 1]"),
        ("fraction-evaluate", 0 <= cfg.fraction_evaluate <= 1, "must be in [0, 1]"),
        ("min-nodes", cfg.min_nodes >= 1, "must be >= 1"),
        ("max-failed-rounds", cfg.max_failed_rounds >= 1, "must be >= 1"),
        ("trim-fraction", 0 <= cfg.trim_fraction < 0.5, "must be in [0, 0.5)"),
        ("update-norm-bound", cfg.update_norm_bound == 0 or cfg.update_norm_bound >= 1,
         "must be 0 (off) or >= 1 (a multiple of the round's median update norm)"),
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
        ("boosted-ensemble-weight", cfg.boosted_ensemble_weight > 0, "must be > 0"),
        ("exit-p", cfg.exit_p > 0, "must be > 0"),
        ("eval-batch-size", cfg.eval_batch_size >= 1, "must be >= 1"),
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("checkpoint-every", cfg.checkpoint_every >= 0, "must be >= 0 (0 = only the last round)"),
        ("split-exit", cfg.split_exit >= 1, "must be >= 1 (the exit after which the cloud "
         "takes over)"),
        ("split-bits", cfg.split_bits in tuple(range(1, 17)) + (32,),
         "must be 1..16 or 32 (no quantisation)"),
        ("split-max-ahead", cfg.split_max_ahead >= 1, "must be >= 1 batch"),
        ("split-training", cfg.split_training in SPLIT_TRAININGS,
         f"must be one of {', '.join(SPLIT_TRAININGS)}"),
        ("split-link-mbps", cfg.split_link_mbps >= 0, "must be >= 0 (0 = unshaped)"),
        ("split-link-latency-ms", cfg.split_link_latency_ms >= 0, "must be >= 0"),
        ("split-timeout-s", cfg.split_timeout_s > 0, "must be > 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"run-config {key} = {getattr(cfg, key.replace('-', '_'))!r} {why}")
    cfg.level_ratios  # noqa: B018  (raises ConfigError on a bad mix)
    split_partition_ids(cfg)
    check_model_builds(cfg)
    if cfg.out_dir and not os.path.isabs(os.path.expanduser(cfg.out_dir)):
        raise ConfigError(
            f"out-dir must be an absolute path (the app runs from Flower's app cache), got {cfg.out_dir!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available here; use 'auto' "
                          "(GPU when present) or 'cpu'")
    if cfg.resume:
        path = os.path.expanduser(cfg.resume)
        if not os.path.isabs(path):
            raise ConfigError(f"resume must be an absolute path to a run directory or its "
                              f"checkpoint.pt, got {cfg.resume!r}")
        try:  # readable, whole, same config, rounds left: fails before any data loads
            check_resumable(checkpoint_path(path), cfg.as_run_config(), cfg.num_server_rounds)
        except CheckpointError as err:
            raise ConfigError(f"resume: {err}") from None


SPLIT_TRAININGS = ("hierarchical", "conventional")


def split_partition_ids(cfg: RunConfig) -> frozenset[int]:
    """The partitions that act as edge/cloud split pairs (``split-partitions``, comma list)."""
    text = cfg.split_partitions.strip()
    if not text:
        return frozenset()
    try:
        ids = frozenset(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"split-partitions must be comma-separated partition ids, got "
                          f"{cfg.split_partitions!r}") from None
    if min(ids) < 0:
        raise ConfigError(f"split-partitions must be >= 0, got {cfg.split_partitions!r}")
    return ids


def check_model_builds(cfg: RunConfig) -> None:
    """The configured backbone can carry ``cfg.num_levels`` exits at ``image-size`` (built on
    the meta device, so nothing is allocated)."""
    family = model_registry.get(cfg.model)
    model_cfg = ModelConfig(num_classes=2, image_size=cfg.image_size, num_exits=cfg.num_levels,
                            backbone=cfg.options_of(family.options))
    try:
        EENFamily(cfg.model, model_cfg).shapes()
    except ValueError as err:
        raise ConfigError(f"model {cfg.model!r} cannot be built with budget-ratios "
                          f"{cfg.budget_ratios!r} ({cfg.num_levels} exits) and its options: "
                          f"{err}") from None


def checkpoint_path(resume: str) -> str:
    path = os.path.expanduser(resume)
    return path if path.endswith(".pt") else os.path.join(path, "checkpoint.pt")

