"""ResNet-style early-exit CNN for small images: a stem, four stages, an exit after each.

Width scaling keeps the leading channels of every conv/BN/linear (HeteroFL/ScaleFL), so a
narrow submodel's tensors are leading slices of the global ones.
"""
from __future__ import annotations

from torch import Tensor, nn

from models.base import EarlyExitNet, EEOutput, SubmodelSpec, scaled

STAGE_MULTIPLIERS = (1, 2, 4, 8)


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

    def __init__(
        self,
        spec: SubmodelSpec,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        base_width: int = 16,
        blocks_per_stage: int = 1,
        num_exits: int = 4,
        frontend: nn.Module | None = None,
    ) -> None:
        super().__init__(spec, num_exits, frontend)
        self.in_chans, self.image_size = in_chans, image_size
        widths = [scaled(base_width * m, spec.width) for m in STAGE_MULTIPLIERS[:num_exits]]
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
            layers += [BasicBlock(widths[s], widths[s], 1) for _ in range(blocks_per_stage - 1)]
            self.blocks.append(nn.Sequential(*layers))
            self.exits.append(ConvExit(widths[s], num_classes, with_conv=s < num_exits - 1))
            c_prev = widths[s]
        self.exit_after = list(range(1, spec.depth + 1))
        self._latent_channels = c0

    def to_latent(self, x: Tensor) -> Tensor:
        return self.embed(self.frontend(x))

    def latent_shape(self) -> tuple[int, ...]:
        return (self._latent_channels, self.image_size, self.image_size)

    def forward_latent(self, z: Tensor) -> EEOutput:
        logits, feats = [], []
        h = z
        for j, (block, head) in enumerate(zip(self.blocks, self.exits), start=1):
            tapped, h = self.exit_tap(block(h), j)
            out, feat = head(tapped)
            logits.append(out)
            feats.append(feat)
        return self.output(logits, feats)
