"""Central pretraining of an early-exit backbone, the stand-in for ImageNet pretraining.

    python -m simulations.pretrain --experiment cifar10-cpu-vit \\
        --data ../shared/data/tiny-imagenet-pretrain --epochs 30 --out ~/fedeen-pretrain/vit

Trains the configured backbone (the experiment's model and run-config overrides, ``--set``
to change them) with every exit, under the configured policy (sum of the exits'
cross-entropies; BoostNet's form under ``boosted``), on the dataset ``--data`` (a hub name or
a local folder), with SGD (momentum 0.9, weight decay 5e-4), a cosine learning-rate schedule,
random crops and flips. A progress bar shows each epoch; after each one the state (model,
optimiser, epoch, random generators) is saved, so running the same command again resumes
where it stopped. It writes ``pretrained.safetensors`` (the model with the EEN's tensor names)
and ``pretrain.json`` (settings, per-epoch loss, test accuracy per exit, seconds). Fine-tune
from it with ``vit-pretrained = "<out>/pretrained.safetensors"`` (the exit classifiers are
replaced when the class count differs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm import tqdm

from fedeen.app_config import family_for, load_config
from fedeen.data.augment import augment_images
from fedeen.data.sources import load_source
from simulations.experiments import experiment
from simulations.run_grid import parse_sets


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


@torch.no_grad()
def exit_accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> list[float]:
    model.eval()
    correct = None
    for s in range(0, len(y), batch):
        logits = model(x[s:s + batch]).logits
        hits = torch.stack([(z.argmax(1) == y[s:s + batch]).sum() for z in logits])
        correct = hits if correct is None else correct + hits
    model.train()
    return (correct.float() / len(y)).tolist()


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="cifar10-cpu-vit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", required=True, help="pretraining dataset (hub name or folder)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--max-train", type=int, default=0, help="cap on training images (0 = all)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {**experiment(args.experiment), **parse_sets(args.set), "dataset": args.data}
    cfg = load_config(overrides)
    src = load_source(args.data)
    family = family_for(cfg, src.info)
    train_ds = src.train
    if args.max_train:
        train_ds = train_ds.shuffle(seed=cfg.seed).select(range(min(args.max_train,
                                                                    len(train_ds))))
    train, test = src.tensors(train_ds, cfg.image_size), src.tensors(src.test, cfg.image_size)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    torch.manual_seed(cfg.seed)
    model = family.build()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    record = {"settings": {**vars(args), "out": str(out), "run_config": overrides,
                           "model": family.name, "num_classes": src.info.num_classes},
              "epochs": []}
    start = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["settings"] != record["settings"]:
            raise SystemExit(f"{state_path} was written with other settings; use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, record = state["epoch"], state["record"]
        print(f"resuming after epoch {start} of {args.epochs}")
    steps_per_epoch = len(train) // args.batch_size
    total = steps_per_epoch * args.epochs
    hflip = src.info.hflip or cfg.augment_hflip == "true"
    model.train()
    for epoch in range(start, args.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=gen)
        loss_sum = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   unit="batch", leave=False)
        for i in bar:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(args.lr, epoch * steps_per_epoch + i, total)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = augment_images(train.x[idx], hflip, gen)
            loss = sum(F.cross_entropy(z, train.y[idx]) for z in model(x).logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss_sum / (i + 1):.3f}")
        accs = exit_accuracy(model, test.x, test.y)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(steps_per_epoch, 1),
               "test_acc": accs, "seconds": time.perf_counter() - t0}
        record["epochs"].append(row)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {row['loss']:.3f}, test accuracy per exit "
              f"{' / '.join(f'{100 * a:.1f}' for a in accs)}%, {row['seconds']:.0f} s",
              flush=True)
        save_atomic({"settings": record["settings"], "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     "epoch": epoch + 1, "record": record}, state_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "pretrained.safetensors"))
    (out / "pretrain.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out / 'pretrained.safetensors'}")


if __name__ == "__main__":
    main()
