"""Central pretraining: an interrupted run resumes to the same weights as an uninterrupted one,
and its checkpoint initialises a ViT for fine-tuning on another class count."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models import EENFamily, ModelConfig
from models.vit import ViTOptions
from simulations import pretrain

ARGS = ["--experiment", "default", "--data", "digits", "--epochs", "2", "--max-train", "256",
        "--batch-size", "64", "--set", "model=vit", "--set", "vit-blocks=2",
        "--set", "vit-dim=32", "--set", "vit-heads=2", "--set", "image-size=8",
        "--set", "vit-patch=2", "--set", "budget-ratios=0.5,0.5"]


def test_an_interrupted_pretraining_resumes_exactly(tmp_path, monkeypatch):
    pretrain.main([*ARGS, "--out", str(tmp_path / "straight")])
    real_save = pretrain.save_atomic

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt  # killed right after the first epoch's state was written

    monkeypatch.setattr(pretrain, "save_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main([*ARGS, "--out", str(tmp_path / "resumed")])
    assert not (tmp_path / "resumed" / "pretrained.safetensors").exists()
    monkeypatch.setattr(pretrain, "save_atomic", real_save)
    pretrain.main([*ARGS, "--out", str(tmp_path / "resumed")])
    a = load_file(str(tmp_path / "straight" / "pretrained.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pretrained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "resumed" / "pretrain.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]


def test_the_checkpoint_initialises_a_vit_with_new_exit_classifiers(tmp_path):
    pretrain.main([*ARGS, "--epochs", "1", "--out", str(tmp_path / "pt")])
    ckpt = tmp_path / "pt" / "pretrained.safetensors"
    state = load_file(str(ckpt))
    fam = EENFamily("vit", ModelConfig(num_classes=3, in_chans=1, image_size=8, num_exits=2,
                                       backbone=ViTOptions(blocks=2, dim=32, heads=2, patch=2,
                                                           pretrained=str(ckpt))))
    init = fam.init_state(5)
    assert torch.equal(torch.as_tensor(init["blocks.1.mlp.fc1.weight"]),
                       state["blocks.1.mlp.fc1.weight"])
    assert tuple(init["exits.1.fc.weight"].shape) == (3, 32) != tuple(state["exits.1.fc.weight"].shape)
