"""Client objectives: plain functions of (exit outputs, labels, context), chosen by name.

The strategy names the objective in each client's config; clients hold no method-specific
branches. ``ObjectiveContext.state`` persists across batches and rounds on one client, for
objectives that keep running statistics.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedeen.protocol import Instructions
from models.base import EEOutput


@dataclass
class ObjectiveContext:
    """What an objective may read besides outputs and labels.

    ``config`` is the strategy's instructions for this round; ``state`` persists on the
    node across rounds (the ClientApp keeps it in ``context.state``; store numpy arrays or
    floats); ``model`` and ``received`` (the parameters as received this round) serve
    parameter regularisers such as FedDyn's.
    """

    config: Instructions
    state: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    received: dict[str, Tensor] = field(default_factory=dict)


Objective = Callable[[EEOutput, Tensor, ObjectiveContext], Tensor]
_OBJECTIVES: dict[str, Objective] = {}


def register(name: str) -> Callable[[Objective], Objective]:
    def wrap(fn: Objective) -> Objective:
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        _OBJECTIVES[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_OBJECTIVES)


def get(name: str) -> Objective:
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; valid objectives: {', '.join(available())}") from None


def kl_distill(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean; teacher detached."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher.detach() / t, dim=1),
                    reduction="batchmean") * (t * t)


def exit_ce(out: EEOutput, j: int, y: Tensor) -> Tensor:
    """Exit ``j``'s cross-entropy (0-based; negative from the end), the batch mean, each
    sample weighted by the L2W policy's weight for it at that exit when there is one. Every
    objective's label term goes through here, so the policy composes with every method."""
    z = out.logits[j]
    if out.sample_weights is None:
        return F.cross_entropy(z, y)
    w = out.sample_weights[:, j % out.num_exits]
    return (w * F.cross_entropy(z, y, reduction="none")).mean()


def all_exit_ce(out: EEOutput, y: Tensor) -> list[Tensor]:
    return [exit_ce(out, j, y) for j in range(out.num_exits)]


@register("sum_ce")
def sum_ce(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """Every local exit trained on the labels (EEFL, ExclusiveFL, DarkDistill's base policy)."""
    return torch.stack(all_exit_ce(out, y)).sum()


@register("last_exit_ce")
def last_exit_ce(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """Only the deepest local exit (InclusiveFL)."""
    return exit_ce(out, -1, y)


# ---------------------------------------------------------------------- baselines' objectives
def consistency_ramp(server_round: float, rampup_rounds: float) -> float:
    """Sigmoid ramp-up of a distillation weight, exp(-5 (1 - min(t, R)/R)^2) (DepthFL, from
    Flower's baseline); ``rampup_rounds`` <= 0 means the full weight from the start."""
    if rampup_rounds <= 0:
        return 1.0
    phase = 1.0 - min(max(server_round, 0.0), rampup_rounds) / rampup_rounds
    return math.exp(-5.0 * phase * phase)


_PER_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def once_per_model(ctx: ObjectiveContext, name: str, setup: Callable[[], Any]) -> Any:
    """``setup()`` run once for the model being trained (the client builds one per round),
    its result cached for the later batches: tensors, hooks an objective installs."""
    done = _PER_MODEL.setdefault(ctx.model, {})
    if name not in done:
        done[name] = setup()
    return done[name]


def clip_grad_values(ctx: ObjectiveContext, clip: float) -> None:
    """Element-wise gradient clipping to [-clip, clip] (``clip_grad_value_``) without touching
    the client: a hook on every parameter clamps its whole gradient of each backward pass
    (autograd sums all contributions to a leaf before its hooks run)."""
    if clip <= 0 or ctx.model is None:
        return

    def setup() -> bool:
        for p in ctx.model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: g.clamp(-clip, clip))
        return True

    once_per_model(ctx, "grad-clip", setup)


FEDDYN_PREFIX = "feddyn-g."


def feddyn_penalty(ctx: ObjectiveContext, alpha: float) -> Tensor:
    """FedDyn's client regulariser  -<theta, g_i> + alpha/2 ||theta - theta_global||^2.

    ``g_i`` (one array per parameter, in ``ctx.state`` under ``feddyn-g.<name>``) is updated
    once training ends, g_i <- g_i - alpha (theta_i - theta_global), as in Flower's DepthFL
    baseline. The client has no end-of-training hook, so the update runs in a
    ``state_dict`` post-hook on the model: the client reads its trained model out through
    ``state_dict()`` to send it. The hook starts from the g_i of the round's start, so a
    repeated read gives the same g_i.
    """
    model = ctx.model

    def setup() -> dict[str, tuple[Tensor, Tensor]]:
        terms = {}
        for name, p in model.named_parameters():
            g0 = ctx.state.get(FEDDYN_PREFIX + name)
            g0 = torch.zeros_like(p) if g0 is None else torch.as_tensor(g0, dtype=p.dtype,
                                                                         device=p.device)
            terms[name] = (g0, ctx.received[name].to(p.device))

        def update_g(module, state_dict, prefix, local_metadata) -> None:
            with torch.no_grad():
                for n, q in module.named_parameters():
                    g, theta0 = terms[n]
                    ctx.state[FEDDYN_PREFIX + n] = (g - alpha * (q - theta0)).cpu().numpy()

        model.register_state_dict_post_hook(update_g)
        return terms

    terms = once_per_model(ctx, "feddyn", setup)
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        g, theta0 = terms[name]
        total = total - (p * g).sum() + 0.5 * alpha * (p - theta0).pow(2).sum()
    return total


@register("depthfl")
def depthfl(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """DepthFL: every exit's CE plus mutual self-distillation from every other local exit,
    sum_i [CE(z_i) + lambda_t/(k-1) sum_{j!=i} KL_T(z_j.detach || z_i)], lambda_t ramped up
    over ``kd-rampup-rounds``; plus FedDyn's regulariser when ``feddyn-alpha`` > 0."""
    k = out.num_exits
    ce = torch.stack(all_exit_ce(out, y)).sum()
    loss = ce
    if k > 1:
        lam = consistency_ramp(float(ctx.config.server_round),
                               float(ctx.config.kd_rampup_rounds))
        t = ctx.config.kd_temperature
        kd = sum(kl_distill(zi, zj, t) for i, zi in enumerate(out.logits)
                 for j, zj in enumerate(out.logits) if j != i)
        loss = loss + lam / (k - 1) * kd
    alpha = ctx.config.feddyn_alpha
    if alpha > 0:
        loss = loss + feddyn_penalty(ctx, alpha)
    return loss


def scalefl_loss(out: EEOutput, y: Tensor, ctx: ObjectiveContext, divisor: float) -> Tensor:
    """ScaleFL's weighted exit loss before normalisation divided by ``divisor``:
    [sum_{j<k} j (CE(z_j) + gamma KL_T(z_k.detach || z_j)) + k CE(z_k)] / divisor.
    ``kd-gamma`` is 0 before the strategy turns distillation on."""
    k = out.num_exits
    gamma, t = ctx.config.kd_gamma, ctx.config.kd_temperature
    last = out.logits[-1]
    loss = k * exit_ce(out, -1, y)
    for j, z in enumerate(out.logits[:-1], start=1):
        term = exit_ce(out, j - 1, y)
        if gamma > 0:
            term = term + gamma * kl_distill(z, last, t)
        loss = loss + j * term
    return loss / divisor


@register("scalefl")
def scalefl(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """ScaleFL, normalised by the exit weights' sum k(k+1)/2 (the official code): exit j
    weighted by j, the intermediate exits also distilled from the local last exit."""
    k = out.num_exits
    return scalefl_loss(out, y, ctx, k * (k + 1) / 2)


@register("scalefl-fl-ee")
def scalefl_fl_ee(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """ScaleFL normalised by k(k+1), as the DarkDistill authors' port runs it (half the
    official loss, so half the effective learning rate)."""
    k = out.num_exits
    return scalefl_loss(out, y, ctx, k * (k + 1))


REEFL_MA, REEFL_ROUND = "reefl-ma", "reefl-round"


@register("reefl")
def reefl(out: EEOutput, y: Tensor, ctx: ObjectiveContext) -> Tensor:
    """ReeFL: every exit's CE plus KL_1 from the teacher exit t to every other exit, t = the
    exit with the lowest moving-average training CE (0.8 old + 0.2 batch, reset to zero at
    the start of each round as in the authors' ``dynamic_ma``; updated before t is chosen).
    ``grad-clip`` > 0 clips gradients element-wise (the authors clip at 1.0)."""
    clip_grad_values(ctx, ctx.config.grad_clip)
    ces = all_exit_ce(out, y)
    rnd = float(ctx.config.server_round)
    ma = ctx.state.get(REEFL_MA)
    if ma is None or len(ma) != len(ces) or float(ctx.state.get(REEFL_ROUND, -1.0)) != rnd:
        ma = np.zeros(len(ces))
    ma = 0.8 * np.asarray(ma, dtype=np.float64) + 0.2 * np.array([float(c.detach()) for c in ces])
    ctx.state[REEFL_MA], ctx.state[REEFL_ROUND] = ma, rnd
    loss = torch.stack(ces).sum()
    if len(ces) > 1:
        t = int(np.argmin(ma))
        lam = consistency_ramp(rnd, float(ctx.config.kd_rampup_rounds))
        kd = sum(kl_distill(z, out.logits[t], 1.0) for j, z in enumerate(out.logits) if j != t)
        loss = loss + lam * kd
    return loss
