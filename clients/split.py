"""Edge/cloud split training of one early-exit submodel (Sepehri et al., hierarchical training).

Per batch the edge runs its part (stem, blocks up to exit ``s``, exits 1..s), sends the
split-point feature map, k-bit quantised, with the labels and its exits' raw logits to the
cloud, and takes its own optimizer step on its exits' loss at once; the cloud runs the rest,
its loss and its step. No gradient goes back and raw inputs never leave the edge. The edge
may run ahead of the cloud by at most ``max_ahead`` batches: every batch the cloud finishes
returns one credit (an ``ack``), and the edge waits for a credit when it has none.

``conventional`` is split learning as the paper compares against: fp32 activations up, the
gradient of the cloud loss with respect to them back down, the edge waiting for it before
its backward pass; the whole network is then trained end to end.

Both sides apply the strategy's client objective to the exits they train: the edge to its
exits alone, the cloud to all exits with the edge's logits as received (constants), so terms
from a cloud exit into an edge exit (DepthFL's mutual distillation, ScaleFL's distillation
from the last exit) have no effect, as no gradient crosses the split.

Messages (``clients.transport``): edge -> cloud ``open`` (model, spec, cloud part, settings),
``batch``, ``close``, ``ping``; cloud -> edge ``ready``, ``ack``, ``grad``, ``result``,
``pong``, ``error``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from clients import losses
from clients.quantize import check_bits, quantize
from clients.transport import EdgeChannel, LinkError, LinkModel, encode
from fedeen.protocol import Instructions
from models import registry
from models.base import EarlyExitNet, SubmodelSpec
from models.family import EENFamily
from models.registry import ModelConfig
from models.split import check_split, cloud_forward, cloud_keys, edge_forward, edge_keys
from models.state import load_state

TRAININGS = ("hierarchical", "conventional")


@dataclass(frozen=True)
class SplitSettings:
    """How a split pair trains: the exit after which the cloud takes over, the feature-map
    bits, how far the edge may run ahead, the training scheme, the link and the timeout."""

    split_exit: int = 1
    bits: int = 4
    max_ahead: int = 4
    training: str = "hierarchical"
    link: LinkModel = field(default_factory=LinkModel)
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.split_exit < 1:
            raise ValueError(f"split exit must be >= 1, got {self.split_exit}")
        if self.max_ahead < 1:
            raise ValueError(f"max-ahead must be >= 1 batch, got {self.max_ahead}")
        if self.training not in TRAININGS:
            raise ValueError(f"split training must be one of {TRAININGS}, got {self.training!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"split timeout must be > 0 s, got {self.timeout_s}")


# ---------------------------------------------------------------------- model description
def family_meta(family: EENFamily) -> dict[str, Any]:
    """The family's name and config as JSON, enough for the cloud to build the same models."""
    cfg = dataclasses.asdict(family.cfg)
    return {"family": family.name, "config": cfg}


def family_from_meta(meta: Mapping[str, Any]) -> EENFamily:
    name = meta["family"]
    cfg = dict(meta["config"])
    options = registry.get(name).options
    cfg["backbone"] = options(**(cfg.get("backbone") or {}))
    return EENFamily(name, ModelConfig(**cfg))


@dataclass(frozen=True)
class Hyper:
    """The local optimiser (SGD) of both sides."""

    lr: float
    momentum: float
    weight_decay: float


def side_optimizer(model: EarlyExitNet, names: Iterable[str], hyper: Hyper
                   ) -> torch.optim.Optimizer:
    wanted = set(names)
    params = [p for n, p in model.named_parameters() if n in wanted]
    return torch.optim.SGD(params, lr=hyper.lr, momentum=hyper.momentum,
                           weight_decay=hyper.weight_decay)


# ---------------------------------------------------------------------- the cloud's side
class CloudSession:
    """One edge's training on the cloud: the submodel (its cloud part loaded), its optimiser
    and objective. ``step`` trains on one received batch."""

    def __init__(self, meta: Mapping[str, Any], state: Mapping[str, Tensor],
                 objective_state: dict[str, Any]) -> None:
        self.family = family_from_meta(meta["model"])
        self.spec = SubmodelSpec(int(meta["depth"]), float(meta["width"]))
        self.settings = settings_from_meta(meta["settings"])
        self.instructions = Instructions.from_config(meta["instructions"])
        model = self.family.build(self.spec)
        check_split(model, self.settings.split_exit)
        keys = cloud_keys(self.family, model.state_dict(), self.settings.split_exit)
        if set(state) != set(keys):
            raise ValueError(f"the cloud part of {self.family.name} at {self.spec} has "
                             f"{len(keys)} tensors, {len(set(state) ^ set(keys))} names differ "
                             "from what arrived")
        full = dict(model.state_dict())
        full.update(state)
        self.model = load_state(model, full)
        self.keys = keys
        self.model.train()
        self.objective = losses.get(self.instructions.objective)
        received = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        self.ctx = losses.ObjectiveContext(self.instructions, objective_state, self.model,
                                           received)
        self.opt = side_optimizer(self.model, keys, Hyper(**meta["hyper"]))
        self.loss_sum, self.count = 0.0, 0
        self.intervals: list[tuple[float, float]] = []
        self.last_seen = time.monotonic()

    def step(self, h: Tensor, y: Tensor, edge_logits: list[Tensor]) -> tuple[float, Tensor | None]:
        """One cloud step; returns its loss and, in conventional training, d loss / d h."""
        t0 = time.time()
        loss, grad = cloud_step(self.model, h, y, edge_logits, self.objective, self.ctx,
                                self.opt, self.settings)
        self.loss_sum += loss * len(y)
        self.count += len(y)
        self.intervals.append((t0, time.time()))
        return loss, grad

    def result(self) -> dict[str, Tensor]:
        state = self.model.state_dict()
        return {k: state[k] for k in self.keys}


def cloud_step(model: EarlyExitNet, h: Tensor, y: Tensor, edge_logits: list[Tensor],
               objective: losses.Objective, ctx: losses.ObjectiveContext,
               opt: torch.optim.Optimizer, settings: SplitSettings) -> tuple[float, Tensor | None]:
    """The cloud's forward, loss, backward and step on one batch. ``h`` and the edge logits
    are cut from whatever graph they came with, so the cloud loss reaches no edge tensor;
    in conventional training the gradient with respect to ``h`` is returned instead."""
    conventional = settings.training == "conventional"
    h = h.detach().requires_grad_(conventional)
    out = cloud_forward(model, h, [z.detach() for z in edge_logits], settings.split_exit)
    loss = objective(out, y, ctx)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), (h.grad if conventional else None)


def settings_from_meta(meta: Mapping[str, Any]) -> SplitSettings:
    values = dict(meta)
    values["link"] = LinkModel(**values.get("link", {}))
    return SplitSettings(**values)


def settings_meta(settings: SplitSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


# ---------------------------------------------------------------------- the edge's side
class CloudLink:
    """The edge's session with its cloud worker over an ``EdgeChannel``."""

    def __init__(self, address: str, settings: SplitSettings) -> None:
        self.address, self.settings = address, settings
        self.channel = EdgeChannel(address, settings.link)
        self.outstanding = 0

    def expect(self, kind: str) -> Any:
        msg = self.channel.recv(self.settings.timeout_s)
        if msg.kind != kind:
            raise LinkError(f"the cloud worker at {self.address} sent {msg.kind!r} where "
                            f"{kind!r} was due")
        return msg

    def open(self, family: EENFamily, spec: SubmodelSpec, cloud_state: Mapping[str, Tensor],
             instructions: Instructions, hyper: Hyper, client_key: str) -> None:
        meta = {"model": family_meta(family), "depth": spec.depth, "width": spec.width,
                "settings": settings_meta(self.settings),
                "instructions": instructions.to_config(), "hyper": dataclasses.asdict(hyper),
                "client": client_key}
        self.channel.send(encode("open", meta, cloud_state))
        self.expect("ready")

    def send_batch(self, index: int, h: Tensor, y: Tensor, edge_logits: list[Tensor]) -> int:
        """Queue one batch for the cloud, after waiting for a credit when ``max_ahead``
        batches are still unanswered; returns its bytes on the wire."""
        while self.outstanding >= self.settings.max_ahead:
            self.collect_ack()
        bits = 32 if self.settings.training == "conventional" else self.settings.bits
        tensors: dict[str, Any] = {"h": quantize(h, bits), "y": y}
        tensors.update({f"z{j}": z.detach() for j, z in enumerate(edge_logits)})
        self.outstanding += 1
        return self.channel.send(encode("batch", {"index": index}, tensors))

    def collect_ack(self) -> None:
        self.expect("ack")
        self.outstanding -= 1

    def receive_grad(self) -> Tensor:
        msg = self.expect("grad")
        self.outstanding -= 1
        return msg.tensors["grad"]

    def drain(self) -> None:
        """Wait until the cloud has trained on every batch sent."""
        while self.outstanding:
            self.collect_ack()

    def close(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Ends the session: the trained cloud part and the cloud's record."""
        self.drain()
        self.channel.send(encode("close"))
        msg = self.expect("result")
        return msg.tensors, msg.meta

    def shutdown(self) -> None:
        self.channel.close()


@dataclass
class EdgeRecord:
    """What the edge measured in one session; ``intervals`` are its compute spans (forward,
    then backward and step of each batch), without the time spent waiting on the link."""

    loss_sum: float = 0.0
    count: int = 0
    bytes_sent: int = 0
    intervals: list[tuple[float, float]] = field(default_factory=list)


def train_edge(model: EarlyExitNet, batches: Iterable[tuple[Tensor, Tensor]],
               objective: losses.Objective, ctx: losses.ObjectiveContext,
               opt: torch.optim.Optimizer, link: CloudLink) -> EdgeRecord:
    """The edge's loop over ``batches`` (hierarchical or conventional, per the link's
    settings). Returns the edge's record; the cloud's comes with ``link.close()``."""
    s = link.settings.split_exit
    conventional = link.settings.training == "conventional"
    rec = EdgeRecord()
    model.train()
    for i, (xb, yb) in enumerate(batches):
        t0 = time.time()
        h, logits, feats = edge_forward(model, xb, s)
        loss = objective(model.output(logits, feats), yb, ctx)
        rec.intervals.append((t0, time.time()))
        rec.bytes_sent += link.send_batch(i, h, yb, logits)  # may wait for a credit
        if conventional:
            grad = link.receive_grad()
        t0 = time.time()
        opt.zero_grad(set_to_none=True)
        if conventional:
            (loss + (h * grad.to(h.device)).sum()).backward()
        else:
            loss.backward()
        opt.step()
        rec.intervals.append((t0, time.time()))
        rec.loss_sum += float(loss.detach()) * len(yb)
        rec.count += len(yb)
    return rec


def split_parts(family: EENFamily, state: Mapping[str, Tensor], split_exit: int
                ) -> tuple[list[str], dict[str, Tensor]]:
    """(the edge's tensor names, the cloud part's tensors) of a submodel state."""
    return edge_keys(family, state, split_exit), {k: state[k] for k in
                                                  cloud_keys(family, state, split_exit)}
