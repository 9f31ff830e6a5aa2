"""ReeFL's early-exit ViT (Lee et al., ICML'24; docs/methods/reffl.md): one shared exit, ``ree``.

Instead of a classifier per exit, one recurrent exit module ("Ree") serves every depth. After
every block l it reads the CLS tokens so far, ``[client_token; c_1..c_l]`` plus learned
positions (one slot per block, plus the client token's), through one pre-LN transformer
layer; an exit at block l predicts ``head(m_0 + c_l)``; and the backbone's CLS token is replaced
by ``m_l`` (the output at the last position) before the next block ("modulation").

Parameters are ``embed.*``, ``blocks.<i>.*`` and ``ree.*`` (no ``exits.*``): ``ree.*`` falls in
depth segment 1, so every budget level holds it and element-wise averaging shares it among all
clients, as in ReeFL. Sizes follow the authors' config (``reeFL.yaml``): 8 heads over an
attention width of 16 in total (so 2 per head), MLP ratio 1.35. The layer reuses
``models.vit.Block``, whose attention scales by 1/sqrt(head dim); the authors' Ree scales by
1/sqrt(attention width) = 1/4: their attention logits are sqrt(2)/4 (about 0.35) times ours,
a constant factor that we do not copy.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import EEOutput, SubmodelSpec
from models.registry import ModelConfig, register
from models.vit import Block, EarlyExitViT, TokenExit, ViTOptions, _init_weights

REE_HEADS = 8
REE_ATTN_DIM = 16
REE_MLP_RATIO = 1.35


class Ree(nn.Module):
    """The shared recurrent exit: one transformer layer over [client token; CLS tokens]."""

    def __init__(self, dim: int, num_classes: int, max_tokens: int, heads: int = REE_HEADS,
                 attn_dim: int = REE_ATTN_DIM, mlp_ratio: float = REE_MLP_RATIO) -> None:
        super().__init__()
        heads = max(1, min(heads, attn_dim))
        self.client_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, max_tokens + 1, dim))
        self.layer = Block(dim, heads, int(dim * mlp_ratio), head_dim=attn_dim // heads)
        self.head = TokenExit(dim, num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.client_token, std=0.02)

    def forward(self, cls_tokens: Tensor) -> Tensor:
        """``cls_tokens`` (batch, l, dim) -> m (batch, l + 1, dim); m[:, 0] is the client slot."""
        b, n, _ = cls_tokens.shape
        x = torch.cat([self.client_token.expand(b, -1, -1), cls_tokens], dim=1)
        return self.layer(x + self.pos[:, : n + 1])


class EarlyExitReeViT(EarlyExitViT):
    """The ViT of ``models.vit`` with its per-exit heads replaced by one shared Ree exit."""

    def __init__(self, spec: SubmodelSpec, cfg: ModelConfig) -> None:
        super().__init__(spec, cfg)
        options = cfg.backbone or ViTOptions()
        del self.exits
        self.ree = Ree(self.dim, cfg.num_classes, max_tokens=options.blocks)

    def segment(self, h: Tensor, j: int, m: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError("the ReeFL ViT's shared exit reads the CLS tokens of every "
                                  "block so far, so it cannot run one exit segment alone")

    def forward_latent(self, z: Tensor) -> EEOutput:
        logits, feats = [], []
        h, e = z, 0
        cls_tokens: list[Tensor] = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)
            at_exit = e < len(self.exit_after) and i == self.exit_after[e]
            tapped, h = self.exit_tap(h, e + 1) if at_exit else (h, h)
            cls = tapped[:, 0]
            cls_tokens.append(cls)
            m = self.ree(torch.stack(cls_tokens, dim=1))
            if at_exit:
                feat = m[:, 0] + cls
                logits.append(self.ree.head(feat))
                feats.append(feat)
                e += 1
            if i < len(self.blocks):  # modulation: the CLS token becomes Ree's last output
                h = torch.cat([m[:, -1:], h[:, 1:]], dim=1)
        return self.output(logits, feats)


@register("vit-ree", options=ViTOptions)
def build_vit_ree(cfg: ModelConfig, spec: SubmodelSpec) -> EarlyExitReeViT:
    return EarlyExitReeViT(spec, cfg)
