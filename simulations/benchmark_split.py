"""Benchmark of edge/cloud split training on CIFAR-10: hierarchical vs conventional.

    python -m simulations.benchmark_split --data ../shared/data/cifar10 --out results/split

The edge runs in this process and the cloud in a cloud-worker process, one torch thread
each, over the real transport with the link shaped (``--links``: Mbit/s and one-way ms).
For ResNet-18 and VGG-16 (``--width``, the first stage's channels) it writes, as JSON and a
Markdown table:

- ``timing``: seconds per epoch on a fixed subset (``--train-images``) of hierarchical
  (``--bits``-bit maps) and conventional split training (fp32 both ways) at every link, the
  runtime model's prediction beside each (``clients.split_runtime``, segment times measured
  here), and the reduction in percent;
- ``bytes``: bytes per batch on the wire at 4 and 32 bits;
- ``accuracy``: edge-exit and cloud-exit test accuracy after ``--epochs`` epochs of
  hierarchical training on ``--train-images`` images with 2-, 4-, 8- and 32-bit maps.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clients import losses
from clients.cloud_worker import spawn_local
from clients.split import CloudLink, Hyper, SplitSettings, side_optimizer, split_parts, train_edge
from clients.split_runtime import map_bytes, measure_segments, predict
from clients.transport import LinkModel
from fedeen.data.sources import load_source
from fedeen.protocol import Instructions
from models import EENFamily, ModelConfig, SubmodelSpec
from models.registry import get
from models.split import edge_forward

PAPER_REDUCTION = {"resnet18": 0.61, "vgg16": 0.29}
SPLIT_EXIT = {"resnet18": 1, "vgg16": 2}


def load_cifar(path: str, train_images: int, test_images: int):
    src = load_source(path)
    train = src.train.shuffle(seed=0).select(range(min(train_images, len(src.train))))
    test = src.test.shuffle(seed=0).select(range(min(test_images, len(src.test))))
    return src.tensors(train, 32), src.tensors(test, 32), src.info.num_classes


def batches_of(data, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    for s in range(0, len(data) - batch_size + 1, batch_size):
        idx = order[s:s + batch_size]
        yield data.x[idx], data.y[idx]


def run_epochs(family: EENFamily, address: str, settings: SplitSettings, data, epochs: int,
               batch_size: int, seed: int = 0):
    """Train a fresh model split at ``settings.split_exit``; (the model, seconds per epoch)."""
    torch.manual_seed(seed)
    model = family.build()
    names, cloud = split_parts(family, model.state_dict(), settings.split_exit)
    instr = Instructions(server_round=1, num_rounds=1, level=family.num_exits,
                         depth=family.num_exits, width=1.0, objective="sum_ce", lr=0.05)
    hyper = Hyper(0.05, 0.9, 5e-4)
    opt = side_optimizer(model, names, hyper)
    ctx = losses.ObjectiveContext(instr, {}, model, {})
    link = CloudLink(address, settings)
    seconds = []
    try:
        for epoch in range(epochs):
            link.open(family, SubmodelSpec(family.num_exits), cloud, instr, hyper, "bench")
            t0 = time.perf_counter()
            train_edge(model, batches_of(data, batch_size, seed + epoch), losses.get("sum_ce"),
                       ctx, opt, link)
            link.drain()  # the epoch ends when the cloud has trained on its last batch
            seconds.append(time.perf_counter() - t0)
            cloud, _ = link.close()
    finally:
        link.shutdown()
    state = dict(model.state_dict())
    state.update(cloud)
    model.load_state_dict(state)
    return model, seconds


@torch.no_grad()
def exit_accuracy(model, test, split_exit: int) -> tuple[float, float]:
    """(the edge's last exit, the cloud's last exit) test accuracy."""
    model.eval()
    edge = cloud = 0
    for s in range(0, len(test), 256):
        x, y = test.x[s:s + 256], test.y[s:s + 256]
        out = model(x).logits
        edge += int((out[split_exit - 1].argmax(1) == y).sum())
        cloud += int((out[-1].argmax(1) == y).sum())
    return edge / len(test), cloud / len(test)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10 (a hub name or a local folder)")
    p.add_argument("--out", default="results/split")
    p.add_argument("--models", default="resnet18,vgg16")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-images", type=int, default=640)
    p.add_argument("--acc-train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--links", default="10:20,100:5", help="MBPS:LATENCY_MS,...")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    address = spawn_local(threads=1)
    train, test, num_classes = load_cifar(args.data, max(args.train_images,
                                                         args.acc_train_images), args.test_images)
    timing_set = type(train)(train.x[:args.train_images], train.y[:args.train_images])
    acc_set = type(train)(train.x[:args.acc_train_images], train.y[:args.acc_train_images])
    links = [tuple(float(v) for v in item.split(":")) for item in args.links.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args), "timing": [], "bytes": [], "accuracy": []}
    for name in args.models.split(","):
        family = EENFamily(name, ModelConfig(num_classes=num_classes,
                                             backbone=get(name).options(width=args.width)))
        s = SPLIT_EXIT[name]
        x0 = timing_set.x[:args.batch_size]
        with torch.no_grad():
            h = edge_forward(family.build(), x0, s)[0]
        report["bytes"].append({"model": name, "split_exit": s, "map_values": h.numel(),
                                "bytes_4": map_bytes(h.numel(), 4),
                                "bytes_32": map_bytes(h.numel(), 32)})
        times = measure_segments(family.build(), x0)
        n_batches = args.train_images // args.batch_size
        for mbps, lat in links:
            link = LinkModel(mbps, lat)
            pred = {q.split_exit: q for q in predict(times, n_batches, args.batch_size,
                                                     num_classes, args.bits, mbps, lat)}[s]
            row = {"model": name, "split_exit": s, "rate_mbps": mbps, "latency_ms": lat,
                   "batches": n_batches, "paper_reduction": PAPER_REDUCTION[name]}
            for training, bits in (("hierarchical", args.bits), ("conventional", 32)):
                settings = SplitSettings(s, bits=bits, training=training, link=link,
                                         timeout_s=120.0)
                _, secs = run_epochs(family, address, settings, timing_set, 1, args.batch_size)
                row[f"{training}_s"] = secs[0]
            row["predicted_hierarchical_s"] = pred.hierarchical_s
            row["predicted_conventional_s"] = pred.conventional_s
            row["reduction"] = 1 - row["hierarchical_s"] / row["conventional_s"]
            row["predicted_reduction"] = pred.reduction
            report["timing"].append(row)
            print(json.dumps(row), flush=True)
        for bits in (2, 4, 8, 32):
            settings = SplitSettings(s, bits=bits, timeout_s=120.0)
            model, secs = run_epochs(family, address, settings, acc_set, args.epochs,
                                     args.batch_size)
            edge_acc, cloud_acc = exit_accuracy(model, test, s)
            row = {"model": name, "bits": bits, "epochs": args.epochs, "edge_exit_acc": edge_acc,
                   "cloud_exit_acc": cloud_acc}
            report["accuracy"].append(row)
            print(json.dumps(row), flush=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=1))
    (out / "benchmark.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    a = report["settings"]
    lines = [f"Edge and cloud one torch thread each; width {a['width']}; timing on "
             f"{a['train_images']} training images (batches of {a['batch_size']}), "
             f"hierarchical at {a['bits']} bits.", "",
             "| model | split after exit | link | hierarchical s/epoch (model) | conventional "
             "s/epoch (model) | reduction (model) | paper |", "|---|---|---|---|---|---|---|"]
    for r in report["timing"]:
        lines.append(f"| {r['model']} | {r['split_exit']} | {r['rate_mbps']:g} Mbit/s, "
                     f"{r['latency_ms']:g} ms | {r['hierarchical_s']:.1f} "
                     f"({r['predicted_hierarchical_s']:.1f}) | {r['conventional_s']:.1f} "
                     f"({r['predicted_conventional_s']:.1f}) | {100 * r['reduction']:.0f}% "
                     f"({100 * r['predicted_reduction']:.0f}%) | "
                     f"{100 * r['paper_reduction']:.0f}% |")
    lines += ["", "| model | split after exit | bytes/batch at 4 bits | at 32 bits |",
              "|---|---|---|---|"]
    for r in report["bytes"]:
        lines.append(f"| {r['model']} | {r['split_exit']} | {r['bytes_4']:,} | "
                     f"{r['bytes_32']:,} |")
    lines += ["", f"Test accuracy after {a['epochs']} epochs on {a['acc_train_images']} images "
              f"({a['test_images']} test images):", "",
              "| model | bits | edge exit | cloud exit |", "|---|---|---|---|"]
    for r in report["accuracy"]:
        lines.append(f"| {r['model']} | {r['bits']} | {100 * r['edge_exit_acc']:.1f}% | "
                     f"{100 * r['cloud_exit_acc']:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
