"""The L2W policy's client side: per-sample exit weights and the meta-network's update.

Every ``META_EVERY`` batches the meta-network (``model.meta``, ``models.l2w``) is updated as in
the DarkDistill authors' L2W: the batch is cut in halves A and B; a virtual SGD step of the
model on A's loss weighted by the meta-network (the client optimiser's lr, momentum buffer and
weight decay) gives parameters θ'(meta); on B the model at θ' routes each sample to an exit
with the budgeted exit policy (the most confident ones leave early, quotas p^k) and the meta
loss is the sum over exits of the mean cross-entropy of the samples routed there; its gradient
reaches the meta-network through θ' (second order), and Adam (lr 1e-3, weight decay 1e-4)
takes one step. Then the same with A and B swapped. The model itself is not changed by it.
Between meta steps the weights ``sample_weights`` scale every exit's cross-entropy in the
method's objective (``clients.losses.exit_ce``).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedeen.routing import route_batch
from models.base import EarlyExitNet
from models.l2w import exit_losses

META_EVERY = 10
META_LR, META_WEIGHT_DECAY = 1e-3, 1e-4
#: the authors' meta_p = 30, i.e. p = 30 / 20 in the exit quotas p^k
META_EXIT_P = 1.5


def sample_weights(model: EarlyExitNet, logits: list[Tensor], y: Tensor) -> Tensor:
    """The meta-network's weights for this batch (no gradient reaches it from the model's
    loss)."""
    with torch.no_grad():
        return model.meta(exit_losses(logits, y))


def meta_optimizer(model: EarlyExitNet) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.meta.parameters(), lr=META_LR, weight_decay=META_WEIGHT_DECAY)


def meta_step(model: EarlyExitNet, x: Tensor, y: Tensor, opt: torch.optim.SGD,
              meta_opt: torch.optim.Optimizer) -> float:
    """Both halves' meta updates on one batch; returns the mean meta loss (nan when the batch
    is too small to halve)."""
    if len(y) < 4:
        return float("nan")
    xa, xb = x.chunk(2)
    ya, yb = y.chunk(2)
    return 0.5 * (meta_half(model, xa, ya, xb, yb, opt, meta_opt)
                  + meta_half(model, xb, yb, xa, ya, opt, meta_opt))


def meta_half(model: EarlyExitNet, x_virtual: Tensor, y_virtual: Tensor, x_meta: Tensor,
              y_meta: Tensor, opt: torch.optim.SGD, meta_opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    names = [n for n, p in model.named_parameters()
             if p.requires_grad and not n.startswith("meta.")]
    params = dict(model.named_parameters())
    def fresh_buffers() -> dict[str, Tensor]:  # the virtual passes leave BN statistics alone
        return {n: b.clone() for n, b in model.named_buffers()}

    with sdpa_kernel(SDPBackend.MATH):  # second-order gradients through attention
        out = functional_call(model, {**params, **fresh_buffers()}, (x_virtual,))
        losses = exit_losses(out.logits, y_virtual)
        weighted = (model.meta(losses.detach()) * losses).mean(dim=0).sum()
        grads = torch.autograd.grad(weighted, [params[n] for n in names], create_graph=True,
                                    allow_unused=True)
        virtual = {}
        for n, g in zip(names, grads):
            p = params[n]
            if g is None:
                continue
            step = g + wd * p
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if momentum and buf is not None:
                step = momentum * buf + step
            virtual[n] = p - lr * step
        meta_logits = functional_call(model, {**virtual, **fresh_buffers()}, (x_meta,),
                                      strict=False).logits
        exit_at = route_batch([z.detach() for z in meta_logits], META_EXIT_P)
        loss = sum(F.cross_entropy(z[exit_at == j], y_meta[exit_at == j])
                   for j, z in enumerate(meta_logits) if bool((exit_at == j).any()))
        meta_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(model.meta.parameters()))
    meta_opt.step()
    return float(loss.detach())
