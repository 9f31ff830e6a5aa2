"""The hierarchical-training paper's backbones, VGG-16 and ResNet-18, as early-exit networks.

Built from torchvision's definitions (``torchvision.models.vgg.cfgs["D"]`` and
``torchvision.models.resnet.BasicBlock``) with the usual adaptation to 32x32 inputs: ResNet-18's
stem is one 3x3 convolution at stride 1 without max pooling, and both classifiers are global
average pooling + one linear layer (torchvision's 7x7-pooled, 4096-wide VGG classifier is
sized for 224x224 inputs). Parameters follow the project's naming:

- ``embed``: the stem (ResNet-18: conv-BN-ReLU; VGG-16: the first conv-BN-ReLU);
- ``blocks.<i>``: ResNet-18's four stages (two basic blocks each), VGG-16's five stages (the
  rest of the convolutions up to and including each max pooling);
- ``exits.<j>``: after the stage ``exit_blocks`` picks; intermediate exits are
  conv3x3-BN-ReLU, pooling and a linear layer (``models.cnn.ConvExit``), the last one pooling
  and a linear layer.

``<family>-width`` is the channel count of the first stage (64 in the papers), doubled per
stage up to 8x; a submodel's width ratio keeps the leading channels, so slicing, aggregation
and every strategy work on these models as on the project's own CNN.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import cfgs as vgg_cfgs

from models.base import EarlyExitNet, SubmodelSpec, exit_blocks, scaled
from models.cnn import ConvExit
from models.frontends import build_frontend
from models.options import Options, option
from models.registry import ModelConfig, register

RESNET18_STAGES = 4
RESNET18_BLOCKS_PER_STAGE = 2


@dataclass(frozen=True)
class ResNet18Options(Options):
    """ResNet-18's first-stage channel count (64 in the paper; later stages 2x, 4x, 8x)."""

    prefix = "resnet18"
    width: int = option(64, lambda v: v >= 1, "must be >= 1")


@dataclass(frozen=True)
class VGG16Options(Options):
    """VGG-16's first-stage channel count (64 in the paper; torchvision's config "D" scaled)."""

    prefix = "vgg16"
    width: int = option(64, lambda v: v >= 1, "must be >= 1")


class StagedEEN(EarlyExitNet):
    """An early-exit CNN whose blocks are stages and whose exits sit after some of them."""

    def __init__(self, spec: SubmodelSpec, cfg: ModelConfig, num_stages: int) -> None:
        frontend, in_chans = build_frontend(cfg)
        super().__init__(spec, cfg.num_exits, frontend)
        self.in_chans, self.image_size = in_chans, cfg.image_size
        self.exit_after = exit_blocks(num_stages, cfg.num_exits)[: spec.depth]

    def build_exits(self, channels: list[int], num_classes: int, num_exits: int) -> None:
        self.exits = nn.ModuleList(
            ConvExit(channels[b - 1], num_classes, with_conv=j < num_exits - 1)
            for j, b in enumerate(self.exit_after))

    def to_latent(self, x: Tensor) -> Tensor:
        return self.embed(self.frontend(x))

    def latent_shape(self) -> tuple[int, ...]:
        return (self._latent_channels, self.image_size, self.image_size)

    def segment(self, h: Tensor, j: int, m: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        start = self.exit_after[j - 2] if j > 1 else 0
        for block in self.blocks[start:self.exit_after[j - 1]]:
            h = block(h)
        tapped, h = self.exit_tap(h, j, m)
        out, feat = self.exits[j - 1](tapped)
        return h, out, feat


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """One VGG layer as torchvision's ``make_layers`` builds it with batch norm."""
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class EarlyExitVGG16(StagedEEN):
    def __init__(self, spec: SubmodelSpec, cfg: ModelConfig) -> None:
        options = cfg.backbone or VGG16Options()
        stages: list[list[int]] = [[]]
        for v in vgg_cfgs["D"]:
            if v == "M":
                stages.append([])
            else:
                stages[-1].append(scaled(int(v) * options.width // 64, spec.width))
        stages = [s for s in stages if s]
        super().__init__(spec, cfg, len(stages))
        c0 = stages[0][0]
        self.embed = nn.Sequential(*conv_bn_relu(self.in_chans, c0))
        self._latent_channels = c0
        self.blocks = nn.ModuleList()
        c_prev, first = c0, True
        for widths in stages[: self.exit_after[-1]]:
            layers: list[nn.Module] = []
            for c in (widths[1:] if first else widths):
                layers += conv_bn_relu(c_prev, c)
                c_prev = c
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))  # 1x1 stays
            self.blocks.append(nn.Sequential(*layers))
            first = False
        self.build_exits([s[-1] for s in stages], cfg.num_classes, cfg.num_exits)


class EarlyExitResNet18(StagedEEN):
    def __init__(self, spec: SubmodelSpec, cfg: ModelConfig) -> None:
        options = cfg.backbone or ResNet18Options()
        super().__init__(spec, cfg, RESNET18_STAGES)
        widths = [scaled(options.width * 2 ** s, spec.width) for s in range(RESNET18_STAGES)]
        c0 = widths[0]
        self.embed = nn.Sequential(nn.Conv2d(self.in_chans, c0, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(c0), nn.ReLU(inplace=True))
        self._latent_channels = c0
        self.blocks = nn.ModuleList()
        c_prev = c0
        for s in range(self.exit_after[-1]):
            stride = 1 if s == 0 else 2
            layers = []
            for b in range(RESNET18_BLOCKS_PER_STAGE):
                c_in = c_prev if b == 0 else widths[s]
                down = None
                if b == 0 and (stride != 1 or c_in != widths[s]):
                    down = nn.Sequential(nn.Conv2d(c_in, widths[s], 1, stride, bias=False),
                                         nn.BatchNorm2d(widths[s]))
                layers.append(BasicBlock(c_in, widths[s], stride if b == 0 else 1, down))
            self.blocks.append(nn.Sequential(*layers))
            c_prev = widths[s]
        self.build_exits(widths, cfg.num_classes, cfg.num_exits)


@register("vgg16", options=VGG16Options)
def build_vgg16(cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitNet:
    return EarlyExitVGG16(spec, cfg)


@register("resnet18", options=ResNet18Options)
def build_resnet18(cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitNet:
    return EarlyExitResNet18(spec, cfg)
