"""An EEN family: one global model and the submodel of every spec, with cached shapes."""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

import torch

from models import registry
from models.base import EarlyExitNet, SubmodelSpec, count_forward_flops
from models.l2w import MetaNet
from models.registry import ModelConfig
from models.state import State, module_state

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EXIT = re.compile(r"^exits\.(\d+)\.")


class EENFamily:
    """Builds submodels by spec and answers questions about their named tensors."""

    def __init__(self, name: str, cfg: ModelConfig) -> None:
        family = registry.get(name)
        if cfg.backbone is None:
            cfg = dataclasses.replace(cfg, backbone=family.options())
        elif not isinstance(cfg.backbone, family.options):
            raise TypeError(f"model {name!r} takes {family.options.__name__}, "
                            f"got {type(cfg.backbone).__name__}")
        self.name, self.cfg = name, cfg
        self._builder = family.builder
        self.global_spec = SubmodelSpec(cfg.num_exits, 1.0)
        self.exit_after = list(self._meta(self.global_spec).exit_after)
        self._shapes = lru_cache(maxsize=None)(self._compute_shapes)

    @property
    def num_exits(self) -> int:
        return self.cfg.num_exits

    def build(self, spec: SubmodelSpec | None = None) -> EarlyExitNet:
        spec = spec or self.global_spec
        model = self.with_policy_modules(self._builder(self.cfg, spec), spec)
        return model.set_policy(self.cfg.policy, self.cfg.boost_weight)

    def with_policy_modules(self, model: EarlyExitNet, spec: SubmodelSpec) -> EarlyExitNet:
        """The policy's own trained modules: L2W's meta-network (``meta.*``) over the
        submodel's exits."""
        if self.cfg.policy == "l2w":
            model.add_module("meta", MetaNet(spec.depth))
        return model

    def _meta(self, spec: SubmodelSpec) -> EarlyExitNet:
        with torch.device("meta"):
            return self.with_policy_modules(self._builder(self.cfg, spec), spec)

    def _compute_shapes(self, spec: SubmodelSpec) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._meta(spec).state_dict().items()}

    def shapes(self, spec: SubmodelSpec | None = None) -> dict[str, tuple[int, ...]]:
        """Named tensor shapes a client of ``spec`` holds (the contract of its replies)."""
        return self._shapes(spec or self.global_spec)

    def init_state(self, seed: int) -> State:
        """The global model's initial state: seeded random, then any pretrained weights."""
        torch.manual_seed(seed)
        model = self.build()
        model.load_pretrained_weights()
        return module_state(model)

    def segment_of(self, key: str) -> int:
        """1-based depth segment a tensor lives in: the first exit whose submodel needs it."""
        if m := _EXIT.match(key):
            return int(m.group(1)) + 1
        if m := _BLOCK.match(key):
            block = int(m.group(1)) + 1
            return next(j for j, b in enumerate(self.exit_after, start=1) if block <= b)
        return 1

    def example_input(self, batch: int = 1) -> torch.Tensor:
        if self.cfg.frontend == "logmel":  # one second of waveform
            return torch.zeros(batch, self.cfg.sample_rate)
        return torch.zeros(batch, self.cfg.in_chans, self.cfg.image_size, self.cfg.image_size)

    def exit_costs(self) -> list[float]:
        """Forward FLOPs (full width) of the model cut at each exit, i.e. the cost of leaving there."""
        x = self.example_input()
        return [float(count_forward_flops(self.build(SubmodelSpec(d, 1.0)), x))
                for d in range(1, self.num_exits + 1)]
