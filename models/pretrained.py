"""Pretrained weights for the early-exit ViT: timm / Hugging Face DeiT-ViT checkpoints, or the
project's own (``simulations.pretrain``).

``vit-pretrained`` names the source:

- a hub name (``timm/deit_tiny_patch16_224.fb_in1k``, ``hf-hub:...``): timm downloads it
  (``timm.create_model(name, pretrained=True)``);
- a local ``.safetensors`` / ``.pth`` / ``.bin`` file in timm's format: loaded through the same
  timm path a hub download takes, with the file in place of the download
  (``pretrained_cfg_overlay=dict(file=...)``), as architecture ``vit-pretrained-arch``;
- a local file written by ``simulations.pretrain`` (the EEN's own tensor names): loaded as is,
  except exit classifiers for another number of classes, which keep their initialisation.

A timm state dict is mapped onto the EEN's names: ``patch_embed.proj`` -> ``embed.proj``
(resampled to the model's patch size with timm's ``resample_patch_embed``, and adapted to the
model's input channels with ``adapt_input_conv``, e.g. one-channel log-mel audio), ``cls_token`` ->
``embed.cls``, ``pos_embed`` -> ``embed.pos`` (resampled to the model's patch grid with
``resample_abs_pos_embed``), ``blocks.<i>.attn.qkv`` split into ``q``, ``k``, ``v``, the final
``norm`` and ``head`` -> the last exit (the head only when the class count matches).
Intermediate exits are new and keep their initialisation. Anything else missing, left over or
of the wrong shape is an error that names the tensors.
"""
from __future__ import annotations

import os
from typing import Mapping

import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from torch import Tensor, nn

#: tensors of a timm ViT that the EEN has no place for and may drop
IGNORED = ("fc_norm.weight", "fc_norm.bias")


class PretrainedError(ValueError):
    """A checkpoint does not fit the model; the message names the tensors."""


def read_file(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return dict(state)


def is_een_state(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("exits.") for k in state) and "embed.proj.weight" in state


def timm_state(source: str, arch: str) -> dict[str, Tensor]:
    """A timm ViT's state dict, by hub name or from a local file in timm's format."""
    if os.path.exists(source):
        model = timm.create_model(arch, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=os.path.abspath(source)))
    else:
        model = timm.create_model(source, pretrained=True)
    return model.state_dict()


def from_timm(state: Mapping[str, Tensor], target: Mapping[str, Tensor], grid: int,
              patch: int) -> dict[str, Tensor]:
    """``state`` (timm names) as tensors named and shaped like ``target`` (the EEN's state),
    without the intermediate exits; the head only when its shape matches."""
    src = {k: v for k, v in state.items() if k not in IGNORED}
    out: dict[str, Tensor] = {}
    last = max(int(k.split(".")[1]) for k in target if k.startswith("exits."))

    def take(name: str) -> Tensor:
        if name not in src:
            raise PretrainedError(f"the checkpoint has no tensor {name!r}")
        return src.pop(name)

    w = take("patch_embed.proj.weight")
    in_chans = target["embed.proj.weight"].shape[1]
    if w.shape[1] != in_chans:  # e.g. RGB weights for one-channel log-mel inputs
        w = adapt_input_conv(in_chans, w, base_chans=w.shape[1])
    if w.shape[-1] != patch:
        w = resample_patch_embed(w, [patch, patch])
    out["embed.proj.weight"] = w
    out["embed.proj.bias"] = take("patch_embed.proj.bias")
    out["embed.cls"] = take("cls_token")
    pos = take("pos_embed")
    if pos.shape[1] != grid * grid + 1:
        pos = resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=1)
    out["embed.pos"] = pos
    blocks = sorted({int(k.split(".")[1]) for k in src if k.startswith("blocks.")})
    wanted = sorted({int(k.split(".")[1]) for k in target if k.startswith("blocks.")})
    if blocks != wanted:
        raise PretrainedError(f"the checkpoint has {len(blocks)} blocks, the model "
                              f"{len(wanted)}; set vit-blocks = {len(blocks)}")
    for i in blocks:
        p = f"blocks.{i}."
        for part in ("weight", "bias"):
            q, k, v = take(f"{p}attn.qkv.{part}").chunk(3, dim=0)
            out.update({f"{p}attn.q.{part}": q, f"{p}attn.k.{part}": k, f"{p}attn.v.{part}": v})
            for name in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                out[p + name + "." + part] = take(p + name + "." + part)
    out[f"exits.{last}.norm.weight"] = take("norm.weight")
    out[f"exits.{last}.norm.bias"] = take("norm.bias")
    head_w, head_b = take("head.weight"), take("head.bias")
    if tuple(head_w.shape) == tuple(target[f"exits.{last}.fc.weight"].shape):
        out[f"exits.{last}.fc.weight"], out[f"exits.{last}.fc.bias"] = head_w, head_b
    if src:
        raise PretrainedError(f"the checkpoint has tensors the model has no place for: "
                              f"{sorted(src)[:8]}")
    return out


def load_pretrained(model: nn.Module, source: str, arch: str, grid: int, patch: int) -> None:
    """Load ``source`` into ``model`` (an EEN ViT) in place; see the module doc."""
    target = model.state_dict()
    if os.path.exists(source) and is_een_state(state := read_file(source)):
        # the exits' classifiers are the pretraining task's: new ones when the classes differ
        loaded = {k: v for k, v in state.items()
                  if not (k.startswith("exits.") and ".fc." in k and k in target
                          and tuple(v.shape) != tuple(target[k].shape))}
    else:
        loaded = from_timm(timm_state(source, arch), target, grid, patch)
    unknown = sorted(set(loaded) - set(target))
    if unknown:
        raise PretrainedError(f"{source}: tensors the model does not have: {unknown[:8]}")
    wrong = sorted(k for k in loaded if tuple(loaded[k].shape) != tuple(target[k].shape))
    if wrong:
        raise PretrainedError(f"{source}: shapes differ for {wrong[:8]} (e.g. {wrong[0]}: "
                              f"{tuple(loaded[wrong[0]].shape)} in the checkpoint, "
                              f"{tuple(target[wrong[0]].shape)} in the model)")
    missing = sorted(k for k in set(target) - set(loaded)
                     if not k.startswith("exits."))
    if missing:
        raise PretrainedError(f"{source}: the checkpoint lacks {missing[:8]}")
    with torch.no_grad():
        for k, v in loaded.items():
            target[k].copy_(v.to(target[k].dtype))
