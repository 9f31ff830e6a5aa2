"""ScaleFL (Ilhan et al., CVPR'23; docs/methods/scalefl.md): depth and width scaling.

Level k holds the first k exits at width ratio r_k (``scalefl-widths``, default the ReeFL /
BERT setting 0.4,0.55,0.75,1.0; the DarkDistill authors' ViT widths are d/(d+1) for a level
of d blocks, 0.75,0.857,0.9,1.0 on 12 blocks): every tensor is the leading slice of the
global one (CNN channels; ViT residual and MLP widths). Clients train with the ``scalefl``
objective: exit j weighted by j, the intermediate exits distilled from the local last exit
(KL at ``scalefl-temperature``, weight ``scalefl-gamma``) once ``scalefl-kd-start`` of the
rounds have passed, normalised by ``scalefl-loss-norm``. The server averages every element
over the clients whose slice holds it, weighted by examples, BatchNorm running statistics
included; that is the base's aggregation.

Deviation: exits stay where the family puts them for every method (e.g. after blocks
3/6/9/12 of 12). The DarkDistill authors give a level of d blocks d+1 blocks at width
d/(d+1) (exits after blocks 4/7/10/12 of 12); with one block per exit, as on the CPU-scale
backbones, the extra block would put two exits after the last block.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedeen.config import ConfigError, RunConfig
from fedeen.protocol import Instructions
from models.base import SubmodelSpec
from models.options import Options, option
from strategies.base import HeteroEENStrategy
from strategies.registry import register


#: ``scalefl-loss-norm`` value -> the client objective that normalises that way
LOSS_NORMS = {"k(k+1)/2": "scalefl", "k(k+1)": "scalefl-fl-ee"}


@dataclass(frozen=True)
class ScaleFLOptions(Options):
    prefix = "scalefl"
    widths: str = option("0.4,0.55,0.75,1.0")  # one width ratio per budget level
    temperature: float = option(3.0, lambda v: v > 0, "must be > 0")
    gamma: float = option(0.05, lambda v: v >= 0, "must be >= 0")
    kd_start: float = option(0.25, lambda v: 0 <= v <= 1,
                             "must be a fraction of the rounds in [0, 1]")
    #: the exit loss's normaliser: the official k(k+1)/2 or the DarkDistill authors' k(k+1)
    loss_norm: str = option("k(k+1)/2", choices=tuple(LOSS_NORMS))


def parse_widths(text: str, num_levels: int) -> tuple[float, ...]:
    """The width ratio of every level from ``scalefl-widths``; ConfigError when invalid."""
    try:
        widths = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"scalefl-widths must be comma-separated numbers, got {text!r}") from None
    if len(widths) != num_levels:
        raise ConfigError(f"scalefl-widths needs one ratio per budget level ({num_levels}), "
                          f"got {len(widths)} in {text!r}")
    if not all(0 < w <= 1 for w in widths):
        raise ConfigError(f"scalefl-widths ratios must be in (0, 1], got {text!r}")
    if widths[-1] != 1.0:
        raise ConfigError(f"the top level of scalefl-widths must be 1.0 (the global model is the "
                          f"full-width one and would keep untrained channels), got {text!r}")
    return widths


@register("scalefl")
class ScaleFL(HeteroEENStrategy):
    objective = "scalefl"
    Options = ScaleFLOptions

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        parse_widths(cfg.options_of(ScaleFLOptions).widths, cfg.num_levels)

    def level_spec(self, level: int) -> SubmodelSpec:
        widths = parse_widths(self.options.widths, self.cfg.num_levels)
        return SubmodelSpec(level, widths[level - 1])

    def instructions(self, server_round: int, level: int) -> Instructions:
        kd_on = server_round > self.options.kd_start * self.cfg.num_server_rounds
        return super().instructions(server_round, level).replace(
            objective=LOSS_NORMS[self.options.loss_norm],
            kd_gamma=self.options.gamma if kd_on else 0.0,
            kd_temperature=self.options.temperature)
