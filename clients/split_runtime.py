"""The runtime model of split training: expected epoch time per split point, and the best one.

    python -m clients.split_runtime --model resnet18 --batch-size 32 --batches 100 \\
        --rate-mbps 10 --latency-ms 20 --bits 4 [--cloud-speedup 4] [--width 64]

Per-segment forward and backward times are measured on this machine (the edge); the cloud
runs ``--cloud-speedup`` times faster (or pass times measured there). For a split after exit
s, with t_e(s) the edge's forward and backward of segments 1..s (their exits included),
t_c(s) the cloud's of segments s+1..M, b_k(s) the bytes of the split-point map at k bits
and R the link rate:

- hierarchical (pipelined: edge, link and cloud work on different batches at once, no
  gradient back): N * max(t_e, b_k/R, t_c) + the pipeline's fill, (t_e + b_k/R + latency +
  t_c) - max(...), once per epoch;
- conventional split learning (each batch waits for its gradient):
  N * (t_e + 2 * b_32/R + 2 * latency + t_c).

Labels and the edge exits' logits travel with the map and are counted. Which stage bounds
the pipeline is printed beside each split point.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from clients.quantize import SCALE_BYTES
from models.base import EarlyExitNet
from models.family import EENFamily
from models.registry import ModelConfig, get


@dataclass(frozen=True)
class SegmentTimes:
    """Seconds per batch of each exit segment's forward and backward, and the bytes of the
    map each segment hands on (fp32)."""

    forward: list[float]
    backward: list[float]
    map_values: list[int]


def measure_segments(model: EarlyExitNet, x: torch.Tensor, repeats: int = 5) -> SegmentTimes:
    """Median forward and backward seconds of each segment on ``x`` (one batch)."""
    model.train()
    fwd: list[list[float]] = [[] for _ in range(model.num_exits)]
    bwd: list[list[float]] = [[] for _ in range(model.num_exits)]
    sizes = []
    for r in range(repeats + 1):  # the first pass warms up
        h = model.to_latent(x).detach()
        for j in range(1, model.num_exits + 1):
            h_in = h.detach().requires_grad_(True)
            t0 = time.perf_counter()
            h, z, _ = model.segment(h_in, j)
            t1 = time.perf_counter()
            (z.sum() + h.sum()).backward()
            t2 = time.perf_counter()
            if r:
                fwd[j - 1].append(t1 - t0)
                bwd[j - 1].append(t2 - t1)
            else:
                sizes.append(h.numel())
        model.zero_grad(set_to_none=True)
    return SegmentTimes([statistics.median(v) for v in fwd],
                        [statistics.median(v) for v in bwd], sizes)


@dataclass(frozen=True)
class Prediction:
    split_exit: int
    map_bytes: int
    hierarchical_s: float
    conventional_s: float
    bound_by: str

    @property
    def reduction(self) -> float:
        return 1.0 - self.hierarchical_s / self.conventional_s


def map_bytes(values: int, bits: int) -> int:
    return values * 4 if bits == 32 else -(-values * bits // 8) + SCALE_BYTES


def predict(times: SegmentTimes, batches: int, batch_size: int, num_classes: int, bits: int,
            rate_mbps: float, latency_ms: float, cloud_speedup: float = 1.0) -> list[Prediction]:
    """Expected epoch seconds of both schemes for every split point (see the module doc)."""
    m = len(times.forward)
    lat = latency_ms / 1000.0
    rate = rate_mbps * 1e6 / 8 if rate_mbps > 0 else float("inf")
    out = []
    for s in range(1, m):
        t_e = sum(times.forward[:s]) + sum(times.backward[:s])
        t_c = (sum(times.forward[s:]) + sum(times.backward[s:])) / cloud_speedup
        extras = batch_size * 8 + s * batch_size * num_classes * 4  # labels, edge logits
        b_k = map_bytes(times.map_values[s - 1], bits) + extras
        b_32 = map_bytes(times.map_values[s - 1], 32)
        stages = {"edge": t_e, "link": b_k / rate, "cloud": t_c}
        slowest = max(stages.values())
        fill = t_e + b_k / rate + lat + t_c - slowest
        hier = batches * slowest + fill
        conv = batches * (t_e + (b_32 + extras) / rate + b_32 / rate + 2 * lat + t_c)
        out.append(Prediction(s, b_k, hier, conv, max(stages, key=stages.get)))
    return out


def best(predictions: list[Prediction]) -> Prediction:
    return min(predictions, key=lambda p: p.hierarchical_s)


def table(predictions: list[Prediction]) -> str:
    lines = ["| split after exit | bytes/batch | hierarchical s/epoch | conventional s/epoch "
             "| reduction | bound by |", "|---|---|---|---|---|---|"]
    for p in predictions:
        lines.append(f"| {p.split_exit} | {p.map_bytes:,} | {p.hierarchical_s:.2f} | "
                     f"{p.conventional_s:.2f} | {100 * p.reduction:.0f}% | {p.bound_by} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=0, help="backbone width (0: its default)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--exits", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100, help="batches per epoch")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rate-mbps", type=float, default=10.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--cloud-speedup", type=float, default=1.0,
                        help="how many times faster the cloud runs a segment than this machine")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = get(args.model).options
    backbone = options(width=args.width) if args.width else options()
    family = EENFamily(args.model, ModelConfig(num_classes=args.num_classes,
                                               num_exits=args.exits, backbone=backbone))
    x = torch.randn(args.batch_size, 3, 32, 32)
    times = measure_segments(family.build(), x)
    preds = predict(times, args.batches, args.batch_size, args.num_classes, args.bits,
                    args.rate_mbps, args.latency_ms, args.cloud_speedup)
    print(f"{args.model}: {args.batches} batches of {args.batch_size}, {args.bits}-bit maps, "
          f"{args.rate_mbps:g} Mbit/s, {args.latency_ms:g} ms, cloud {args.cloud_speedup:g}x")
    print(table(preds))
    b = best(preds)
    print(f"best split point: after exit {b.split_exit} ({b.hierarchical_s:.2f} s per epoch, "
          f"{100 * b.reduction:.0f}% less than conventional split learning there)")


if __name__ == "__main__":
    main()
