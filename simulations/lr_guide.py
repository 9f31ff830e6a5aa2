"""The learning-rate guide of DarkDistill's convergence theorem, for a configured model and data.

    python -m simulations.lr_guide --experiment cifar10-cpu-vit [--set KEY=VALUE ...]

The theorem: with T local epochs, Q rounds, M exits and an L-smooth loss, DarkDistill reaches
a neighbourhood of a stationary point when the local learning rate γ satisfies

    1 / (T γ Q) <= γ <= 1 / (6 M^2 L T),   i.e.   1 / sqrt(T Q) <= γ <= 1 / (6 M^2 L T).

L is estimated as the largest eigenvalue of the Hessian of the client loss (the sum of every
exit's cross-entropy under the configured policy) at the initial global model (pretrained
weights included), by power iteration on Hessian-vector products, on ``--batches`` batches of
one client's training data; its spread over batches is printed and the largest is used. The
guide prints the interval, whether the configured ``lr`` lies in it and, when the interval is
empty, the smallest Q for which it is not: Q >= 36 M^4 L^2 T.
"""
from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedeen.app_config import family_for, load_config
from fedeen.data import load_client_data, source_for
from models.base import EarlyExitNet
from models.state import load_state
from simulations.experiments import experiment
from simulations.run_grid import parse_sets


def exit_loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(z, y) for z in model(x).logits)


def top_hessian_eigenvalue(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor,
                           iters: int = 20, seed: int = 0) -> float:
    """The Hessian eigenvalue of largest magnitude of the exit loss on one batch (power
    iteration on Hessian-vector products; the Rayleigh quotient of the last iterate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no double backward
        grads = torch.autograd.grad(exit_loss(model, x, y), params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g) for p in params]
    eig = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v))
        v = [t / norm for t in v]
        with sdpa_kernel(SDPBackend.MATH):
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eig = sum(float((a * b).sum()) for a, b in zip(hv, v))
        v = [t.detach() for t in hv]
    return eig


@dataclass(frozen=True)
class Guide:
    smoothness: float
    local_epochs: int
    rounds: int
    exits: int

    @property
    def low(self) -> float:
        return 1.0 / math.sqrt(self.local_epochs * self.rounds)

    @property
    def high(self) -> float:
        return 1.0 / (6 * self.exits ** 2 * self.smoothness * self.local_epochs)

    @property
    def min_rounds(self) -> int:
        """The smallest Q whose interval is not empty."""
        return math.ceil(36 * self.exits ** 4 * self.smoothness ** 2 * self.local_epochs)

    def report(self, lr: float) -> str:
        lines = [f"admissible local learning rates: [{self.low:.3g}, {self.high:.3g}] "
                 f"(T = {self.local_epochs}, Q = {self.rounds}, M = {self.exits}, "
                 f"L = {self.smoothness:.3g})"]
        if self.low > self.high:
            lines.append(f"the interval is empty: it opens at Q >= {self.min_rounds} rounds")
        inside = self.low <= lr <= self.high
        lines.append(f"configured lr = {lr:g}: {'inside' if inside else 'outside'} the interval")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--partition", type=int, default=0)
    p.add_argument("--num-partitions", type=int, default=8)
    args = p.parse_args(argv)
    overrides = {**experiment(args.experiment), **parse_sets(args.set)}
    cfg = load_config(overrides)
    family = family_for(cfg, source_for(cfg).info)
    model = load_state(family.build(), family.init_state(cfg.seed)).eval()
    data = load_client_data(cfg, args.partition, args.num_partitions).train
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data), generator=gen)
    eigs = []
    for b in range(args.batches):
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        if len(idx) < 2:
            break
        eigs.append(abs(top_hessian_eigenvalue(model, data.x[idx], data.y[idx], args.iters, b)))
    spread = statistics.pstdev(eigs) if len(eigs) > 1 else 0.0
    print(f"{args.experiment}: L (largest |Hessian eigenvalue| of the exit loss) over "
          f"{len(eigs)} batches of {cfg.batch_size}: max {max(eigs):.3g}, mean "
          f"{statistics.mean(eigs):.3g} ± {spread:.2g}")
    guide = Guide(max(eigs), cfg.local_epochs, cfg.num_server_rounds, family.num_exits)
    print(guide.report(cfg.lr))


if __name__ == "__main__":
    main()
