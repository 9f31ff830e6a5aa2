"""ResNet-style early-exit CNN for small images: a stem, four stages, an exit after each.

Width scaling keeps the leading channels of every conv/BN/linear (HeteroFL/ScaleFL), so a
narrow submodel's tensors are leading slices of the global ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from models.base import EarlyExitNet, SubmodelSpec, scaled
from models.frontends import build_frontend
from models.options import Options, option
from models.registry import ModelConfig, register

STAGE_MULTIPLIERS = (1, 2, 4, 8)


@dataclass(frozen=True)
class CNNOptions(Options):
    """The CNN's size: base channels (doubled per stage) and residual blocks per stage."""

    prefix = "cnn"
    width: int = option(16, lambda v: v >= 1, "must be >= 1")
    blocks: int = option(1, lambda v: v >= 1, "must be >= 1")


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ConvExit(nn.Module):
    """Exit head: optional conv-BN-ReLU (intermediate exits), global pooling, linear."""

    def __init__(self, channels: int, num_classes: int, with_conv: bool) -> None:
        super().__init__()
        self.conv: nn.Module = nn.Identity()
        if with_conv:
            self.conv = nn.Sequential(
                nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.conv(x).mean(dim=(2, 3))
        return self.fc(feat), feat


class EarlyExitCNN(EarlyExitNet):
    """Depth = number of stages (and exits) kept; width = channel ratio."""

    def __init__(self, spec: SubmodelSpec, cfg: ModelConfig) -> None:
        if cfg.num_exits > len(STAGE_MULTIPLIERS):
            raise ValueError(f"the cnn has {len(STAGE_MULTIPLIERS)} stages, so at most "
                             f"{len(STAGE_MULTIPLIERS)} exits (budget levels); {cfg.num_exits} "
                             "asked for (use model='vit')")
        options = cfg.backbone or CNNOptions()
        frontend, in_chans = build_frontend(cfg)
        super().__init__(spec, cfg.num_exits, frontend)
        num_classes, num_exits = cfg.num_classes, cfg.num_exits
        self.in_chans, self.image_size = in_chans, cfg.image_size
        widths = [scaled(options.width * m, spec.width) for m in STAGE_MULTIPLIERS[:num_exits]]
        c0 = widths[0]
        self.embed = nn.Sequential(
            nn.Conv2d(in_chans, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)
        )
        self.blocks = nn.ModuleList()
        self.exits = nn.ModuleList()
        c_prev = c0
        for s in range(spec.depth):
            stride = 1 if s == 0 else 2
            layers = [BasicBlock(c_prev, widths[s], stride)]
            layers += [BasicBlock(widths[s], widths[s], 1) for _ in range(options.blocks - 1)]
            self.blocks.append(nn.Sequential(*layers))
            self.exits.append(ConvExit(widths[s], num_classes, with_conv=s < num_exits - 1))
            c_prev = widths[s]
        self.exit_after = list(range(1, spec.depth + 1))
        self._latent_channels = c0

    def to_latent(self, x: Tensor) -> Tensor:
        return self.embed(self.frontend(x))

    def latent_shape(self) -> tuple[int, ...]:
        return (self._latent_channels, self.image_size, self.image_size)

    def segment(self, h: Tensor, j: int, m: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        tapped, h = self.exit_tap(self.blocks[j - 1](h), j, m)
        out, feat = self.exits[j - 1](tapped)
        return h, out, feat


@register("cnn", options=CNNOptions)
def build_cnn(cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitNet:
    return EarlyExitCNN(spec, cfg)
