"""Pretrained ViT weights: a timm DeiT checkpoint saved in timm's formats loads through timm's
own pretrained-loading path and reproduces timm's outputs, at 224/16 and resampled to 32/4."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from models import EENFamily, ModelConfig
from models.pretrained import PretrainedError
from models.vit import ViTOptions


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    """A timm DeiT-tiny (random weights: no network here) saved as .safetensors and .pth."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    d = tmp_path_factory.mktemp("deit")
    save_file(model.state_dict(), str(d / "deit.safetensors"))
    torch.save(model.state_dict(), d / "deit.pth")
    return model, d


def een(source, image_size: int, patch: int, num_classes: int = 1000, **options):
    fam = EENFamily("vit", ModelConfig(num_classes=num_classes, image_size=image_size,
                                       backbone=ViTOptions(patch=patch, norm_eps=1e-6,
                                                           pretrained=str(source), **options)))
    model = fam.build()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in fam.init_state(1).items()})
    return model.eval()


@pytest.mark.parametrize("name", ["deit.safetensors", "deit.pth"])
def test_timm_checkpoint_reproduces_timms_outputs_at_224(deit, name):
    timm_model, d = deit
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(een(d / name, 224, 16)(x).logits[-1], timm_model(x),
                                   rtol=1e-5, atol=1e-5)


def test_resampled_to_32_by_4_matches_timms_own_resampling(deit):
    _, d = deit
    small = timm.create_model("deit_tiny_patch16_224", pretrained=True, img_size=32,
                              patch_size=4,
                              pretrained_cfg_overlay=dict(file=str(d / "deit.safetensors"))).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(een(d / "deit.safetensors", 32, 4)(x).logits[-1], small(x),
                                   rtol=1e-5, atol=1e-5)


def test_new_class_count_keeps_the_backbone_and_a_fresh_head(deit):
    _, d = deit
    model = een(d / "deit.pth", 32, 4, num_classes=10)
    assert model.exits[-1].fc.weight.shape == (10, 192)
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(d / "deit.pth")))
    torch.testing.assert_close(model.blocks[5].mlp.fc1.weight, ref.blocks[5].mlp.fc1.weight)


def test_rgb_weights_adapt_to_one_channel_inputs_as_timm_does(deit):
    _, d = deit
    options = ViTOptions(patch=4, norm_eps=1e-6, pretrained=str(d / "deit.pth"))
    fam = EENFamily("vit", ModelConfig(num_classes=10, in_chans=1, image_size=32,
                                       backbone=options))
    mono = timm.create_model("deit_tiny_patch16_224", pretrained=True, in_chans=1, img_size=32,
                             patch_size=4, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(d / "deit.pth")))
    got = torch.as_tensor(fam.init_state(0)["embed.proj.weight"])
    torch.testing.assert_close(got, mono.patch_embed.proj.weight.detach())


def test_mismatched_checkpoints_are_errors_naming_the_problem(deit, tmp_path):
    _, d = deit
    with pytest.raises(PretrainedError, match="vit-blocks = 12"):
        een(d / "deit.pth", 32, 4, blocks=6)
    with pytest.raises(PretrainedError, match="shapes differ"):
        een(d / "deit.pth", 32, 4, dim=96, heads=3)
    wide = timm.create_model("deit_small_patch16_224", pretrained=False)
    torch.save(wide.state_dict(), tmp_path / "small.pth")
    with pytest.raises(Exception, match="size mismatch|shapes differ"):
        een(tmp_path / "small.pth", 32, 4)


def test_the_projects_own_checkpoint_loads_as_is(tmp_path):
    fam = EENFamily("vit", ModelConfig(num_classes=10, backbone=ViTOptions(blocks=4, dim=64,
                                                                           heads=2)))
    state = {k: torch.as_tensor(v) + 1.0 if torch.as_tensor(v).is_floating_point() else
             torch.as_tensor(v) for k, v in fam.init_state(3).items()}
    save_file(state, str(tmp_path / "een.safetensors"))
    fam2 = EENFamily("vit", ModelConfig(num_classes=10, backbone=ViTOptions(
        blocks=4, dim=64, heads=2, pretrained=str(tmp_path / "een.safetensors"))))
    loaded = fam2.init_state(99)
    assert all(torch.equal(torch.as_tensor(loaded[k]), state[k]) for k in state)
