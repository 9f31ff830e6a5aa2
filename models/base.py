"""Shared vocabulary of every early-exit backbone: specs, outputs and the model contract.

A backbone is cut into ``blocks`` and carries one classifier per exit in ``exits``; its
parameters are named ``embed.*``, ``blocks.<i>.*`` and ``exits.<j>.*`` so that a submodel
spec alone decides which named tensors (and which leading slice of each) a client holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SubmodelSpec:
    """A budget level's share of the global EEN: the first ``depth`` exits at ``width``."""

    depth: int
    width: float = 1.0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"submodel depth must be >= 1, got {self.depth}")
        if not 0.0 < self.width <= 1.0:
            raise ValueError(f"submodel width must be in (0, 1], got {self.width}")


@dataclass
class EEOutput:
    """Every exit's logits and the feature its classifier read (CLS token / pooled map)."""

    logits: list[Tensor]
    features: list[Tensor]
    #: per-sample, per-exit loss weights (batch, exits) under the L2W policy, else None
    sample_weights: Tensor | None = None

    @property
    def num_exits(self) -> int:
        return len(self.logits)


def exit_blocks(num_blocks: int, num_exits: int) -> list[int]:
    """1-based block indices after which the exits sit, evenly spaced (12 blocks -> 3,6,9,12)."""
    if num_blocks < num_exits:
        raise ValueError(
            f"a backbone with {num_blocks} blocks cannot carry {num_exits} exits; "
            f"use at least {num_exits} blocks"
        )
    return [round(num_blocks * (j + 1) / num_exits) for j in range(num_exits)]


def scaled(n: int, width: float) -> int:
    """Leading-slice size of a dimension of size ``n`` at width ratio ``width`` (>= 1)."""
    return max(1, int(round(n * width)))


#: how the exits are trained and read (docs/methods/policies.md); orthogonal to the FL method
POLICIES = ("base", "boosted", "l2w")
#: BoostNet's ensemble weight w (the DarkDistill authors' value)
BOOST_WEIGHT = 0.2


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (BoostNet's gradient rescaling)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    return _GradScale.apply(x, scale) if scale != 1.0 else x


def boosted_logits(logits: Sequence[Tensor], weight: float) -> list[Tensor]:
    """BoostNet's additive exits: z^_j = stopgrad(e_{j-1}) + z_j, e_j = w (z_j + e_{j-1}), e_0 = 0.

    Each exit corrects the (frozen) running ensemble of the shallower ones; training and
    inference both read z^_j.
    """
    out, ensemble = [], None
    for z in logits:
        out.append(z if ensemble is None else z + ensemble)
        ensemble = weight * (z.detach() if ensemble is None else z.detach() + ensemble)
    return out


class EarlyExitNet(nn.Module):
    """Base class: ``to_latent`` maps inputs to the latent space, ``forward_latent`` runs the rest.

    The split matters for server-side generators (DarkDistill), which produce latents and
    feed them straight to ``forward_latent``.
    """

    #: 1-based block index after which each held exit sits
    exit_after: Sequence[int]

    def __init__(self, spec: SubmodelSpec, num_exits: int, frontend: nn.Module | None) -> None:
        super().__init__()
        if not 1 <= spec.depth <= num_exits:
            raise ValueError(f"{type(self).__name__} depth must be in 1..{num_exits}, "
                             f"got {spec.depth}")
        self.frontend = frontend if frontend is not None else nn.Identity()
        self.policy, self.boost_weight = "base", BOOST_WEIGHT

    def set_policy(self, policy: str, boost_weight: float = BOOST_WEIGHT) -> "EarlyExitNet":
        if policy not in POLICIES:
            raise ValueError(f"unknown training policy {policy!r}; valid: {', '.join(POLICIES)}")
        self.policy, self.boost_weight = policy, boost_weight
        return self

    def exit_tap(self, h: Tensor, j: int, m: int | None = None) -> tuple[Tensor, Tensor]:
        """(what exit ``j`` (1-based) reads, what the next block reads) from the output ``h``.

        Under ``boosted`` the exit's gradient into the backbone is scaled by 1/(m-j+1) and the
        gradient from deeper exits by (m-j)/(m-j+1), m = the exits trained together (this
        model's, unless a split edge trains only its own; BoostNet's form).
        """
        if self.policy != "boosted":
            return h, h
        m = self.num_exits if m is None else m
        tapped = grad_scale(h, 1.0 / (m - j + 1))
        return tapped, grad_scale(tapped, float(m - j))

    def output(self, logits: list[Tensor], features: list[Tensor]) -> "EEOutput":
        if self.policy == "boosted":
            logits = boosted_logits(logits, self.boost_weight)
        return EEOutput(logits, features)

    def to_latent(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def segment(self, h: Tensor, j: int, m: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Exit ``j``'s segment (1-based): the blocks after exit j-1 up to exit j, then exit j.

        Returns (what the next segment reads, exit j's raw logits, its feature); ``m`` as in
        ``exit_tap``. A backbone whose exits depend on each other beyond the residual stream
        (ReeFL's recurrent exit) does not implement it and overrides ``forward_latent``.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run exit by exit")

    def forward_exits(self, h: Tensor, first: int, last: int, m: int | None = None
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Segments ``first``..``last`` from ``h``: (the stream after exit ``last``, their raw
        logits, their features). A split model runs 1..s on the edge and s+1..M on the cloud."""
        logits, feats = [], []
        for j in range(first, last + 1):
            h, z, f = self.segment(h, j, m)
            logits.append(z)
            feats.append(f)
        return h, logits, feats

    def forward_latent(self, z: Tensor) -> EEOutput:
        _, logits, feats = self.forward_exits(z, 1, self.num_exits)
        return self.output(logits, feats)

    def latent_shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> EEOutput:
        return self.forward_latent(self.to_latent(x))

    def load_pretrained_weights(self) -> None:
        """Load the pretrained weights the backbone's options name, if any (the global
        model's initialisation; a backbone without pretrained weights keeps its random one)."""

    @property
    def num_exits(self) -> int:
        return len(self.exit_after)


def count_forward_flops(model: nn.Module, example: Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (batch of one), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    model.train(was_training)
    return int(counter.get_total_flops())
