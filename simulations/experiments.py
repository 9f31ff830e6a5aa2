"""Named experiment settings for the grid runner (run-config overrides)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The DarkDistill authors' main setting: the boosted training policy, 1 local epoch.
MAIN_POLICY: dict[str, Any] = {"policy": "boosted", "local-epochs": 1}

# The CPU scale used for the tables in the README (with --num-supernodes 8: 2 clients per
# budget level): a small DeiT-style ViT (4 blocks, dim 64, 2 heads, MLP ratio 2, patch 4 on
# 32x32, exits after blocks 1-4), at most 400 samples per client (80/20 train/validation),
# 20 rounds, 2000 test images (and 2000 server-validation images).
CPU_VIT: dict[str, Any] = {
    "model": "vit", "vit-blocks": 4, "vit-dim": 64, "vit-heads": 2, "vit-patch": 4,
    "vit-mlp-ratio": 2.0, "max-samples-per-client": 400, "max-test-samples": 2000,
    "num-server-rounds": 20, "batch-size": 32,
}

# The baselines as the DarkDistill authors ran them (lehaoqu/FL-EE; docs/methods/*.md):
# DepthFL with lambda = 1, T = 1 from the first round; ScaleFL with the T = 3 of their logs,
# gamma = 1, no delay, widths d/(d+1) of their 12-block levels, loss normalised by k(k+1);
# InclusiveFL training every exit and scored on the global model.
AS_IN_DARKDISTILL: dict[str, Any] = {
    "depthfl-rampup-rounds": 0,
    "scalefl-temperature": 3.0, "scalefl-gamma": 1.0, "scalefl-kd-start": 0.0,
    "scalefl-widths": "0.75,0.857,0.9,1.0", "scalefl-loss-norm": "k(k+1)",
    "inclusivefl-train-exits": "all", "inclusivefl-evaluate-on": "global",
}

# The local CIFAR-10 files: natural images, so random horizontal flips as for the hub's CIFAR-10.
LOCAL_CIFAR10: dict[str, Any] = {"dataset": str(SHARED_DATA / "cifar10"), "augment-hflip": "true"}

# The DarkDistill paper's GPU setting (for a machine with a GPU and a network; run with
# --num-supernodes 100, i.e. 100 clients, 10 sampled per round): DeiT-tiny pretrained on
# ImageNet at 224x224 (timm's weights by hub name, LayerNorm eps 1e-6 as DeiT was trained),
# 12 blocks with exits after 3/6/9/12, 500 rounds, 1 local epoch, boosted.
PAPER_GPU: dict[str, Any] = {
    "model": "vit", "vit-blocks": 12, "vit-dim": 192, "vit-heads": 3, "vit-patch": 16,
    "vit-mlp-ratio": 4.0, "vit-norm-eps": 1e-6, "image-size": 224,
    "vit-pretrained": "timm/deit_tiny_patch16_224.fb_in1k",
    "num-server-rounds": 500, "fraction-train": 0.1, "min-nodes": 10, "batch-size": 32,
    **MAIN_POLICY, **AS_IN_DARKDISTILL,
}

# The CPU ViT of the tables fine-tuned from the project's central pretraining on the local
# ImageNet stand-in (python -m simulations.pretrain --experiment cifar10-cpu-vit --data
# ../shared/data/tiny-imagenet-pretrain --epochs 10 --out ~/fedeen-pretrain/cpu-vit).
CPU_PRETRAINED = "~/fedeen-pretrain/cpu-vit/pretrained.safetensors"

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cifar10-cpu-vit": {**LOCAL_CIFAR10, **CPU_VIT, **MAIN_POLICY, **AS_IN_DARKDISTILL},
    "cifar10-cpu-cnn": {**LOCAL_CIFAR10, "model": "cnn",
                        "cnn-width": 16, "max-samples-per-client": 400,
                        "max-test-samples": 2000, "num-server-rounds": 15,
                        **MAIN_POLICY, **AS_IN_DARKDISTILL},
    "fsdd-cpu-cnn": {"dataset": str(SHARED_DATA / "fsdd"), "model": "cnn", "cnn-width": 16,
                     "num-server-rounds": 15, **MAIN_POLICY, **AS_IN_DARKDISTILL},
    "cifar10-cpu-vit-pretrained": {**LOCAL_CIFAR10, **CPU_VIT, **MAIN_POLICY,
                                   **AS_IN_DARKDISTILL, "vit-pretrained": CPU_PRETRAINED},
    "paper-gpu-cifar100": {**PAPER_GPU, "dataset": "cifar100"},
    "paper-gpu-svhn": {**PAPER_GPU, "dataset": "svhn"},
    "paper-gpu-speech-commands": {**PAPER_GPU, "dataset": "speech_commands"},
}


def experiment(name: str) -> dict[str, Any]:
    try:
        return dict(EXPERIMENTS[name])
    except KeyError:
        raise SystemExit(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}") from None
