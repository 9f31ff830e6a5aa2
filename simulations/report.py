"""The README's result tables, from the grids' ``cells.jsonl`` files (run_grid writes them).

Every cell is read two ways: the test accuracy of the best-validation round (the DarkDistill
authors' protocol) and the mean test accuracy of the last five rounds (which a single lucky
round cannot move). A table cell is the mean over exits, then mean ± standard deviation over
seeds. "DarkDistill minus the best other" pairs the seeds: for each seed, DarkDistill's mean
minus that of the strategy with the best seed-average; reported as mean ± standard deviation
of those differences and how many seeds were positive.

    python -m simulations.report --commands | bash     # run (or resume) every grid
    python -m simulations.report --results results --out results/tables.md --readme README.md
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from simulations.run_grid import LAST_ROUNDS

#: a cell's second reading: the mean over exits of the last rounds' test accuracy
LAST = f"last{LAST_ROUNDS}_mean"
READINGS = (("mean", "best-val"), (LAST, f"last {LAST_ROUNDS}"))
MAIN = "darkdistill"


def load_cells(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_setting(cells: Iterable[dict]) -> dict[float, dict[str, dict[int, dict]]]:
    """alpha -> strategy -> seed -> cell."""
    out: dict[float, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for c in cells:
        out[float(c["alpha"])][c["strategy"]][int(c["seed"])] = c
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def paired(main: dict[int, dict], other: dict[int, dict], key: str) -> list[float]:
    seeds = sorted(set(main) & set(other))
    return [main[s][key] - other[s][key] for s in seeds]


def grid_table(title: str, cells: list[dict], command: str) -> list[str]:
    """Per alpha: every strategy under both readings, then DarkDistill minus the best other."""
    lines = [f"#### {title}", "", f"`{command}`", ""]
    if not cells:
        return lines + ["(no completed cells yet)", ""]
    for alpha, strategies in sorted(by_setting(cells).items()):
        lines += [f"α = {alpha:g}", "",
                  "| strategy | best-val round | last 5 rounds | seeds |", "|---|---|---|---|"]
        order = sorted(strategies, key=lambda s: -np.mean([c["mean"] for c in strategies[s].values()]))
        for s in order:
            seeds = strategies[s]
            lines.append(f"| {s} | {fmt([c['mean'] for c in seeds.values()])} | "
                         f"{fmt([c[LAST] for c in seeds.values()])} | {len(seeds)} |")
        if MAIN in strategies and len(strategies) > 1:
            parts = []
            for key, label in READINGS:
                others = {s: v for s, v in strategies.items() if s != MAIN}
                best = max(others, key=lambda s: np.mean([c[key] for c in others[s].values()]))
                diffs = paired(strategies[MAIN], others[best], key)
                pos = sum(d > 0 for d in diffs)
                parts.append(f"{label}: {fmt(diffs)} against {best} "
                             f"({pos} of {len(diffs)} seeds positive)")
            lines += ["", f"DarkDistill minus the best other, paired over seeds — " + "; ".join(parts)]
        lines.append("")
    return lines


def ablation_table(title: str, main: list[dict], rows: list[tuple[str, list[dict], str]],
                   alpha: float) -> list[str]:
    """DarkDistill's main cells against each ablation's, paired by seed."""
    ref = {int(c["seed"]): c for c in main if c["strategy"] == MAIN and float(c["alpha"]) == alpha}
    lines = [f"#### {title}", "",
             "| variant | best-val round | last 5 rounds | minus main (best-val) | "
             "minus main (last 5) | seeds | command |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| main (anchor on, soft weights) | {fmt([c['mean'] for c in ref.values()])} | "
                 f"{fmt([c[LAST] for c in ref.values()])} | | | {len(ref)} | see above |")
    for name, cells, command in rows:
        got = {int(c["seed"]): c for c in cells if float(c["alpha"]) == alpha}
        lines.append(f"| {name} | {fmt([c['mean'] for c in got.values()])} | "
                     f"{fmt([c[LAST] for c in got.values()])} | "
                     f"{fmt(paired(got, ref, 'mean'))} | {fmt(paired(got, ref, LAST))} | "
                     f"{len(got)} | `{command}` |")
    return lines + [""]


def series(cells: list[dict], key: str, ratio_of: str | None = None) -> list[float]:
    """A diagnostic (or the ratio of two) over the rounds after the first, all seeds."""
    values = []
    for c in cells:
        diag = c.get("diagnostics", {})
        a = diag.get(key, [])
        b = diag.get(ratio_of, []) if ratio_of else [1.0] * len(a)
        values += [x / y for x, y in list(zip(a, b))[1:] if x is not None and y]
    return values


def series_range(cells: list[dict], key: str, ratio_of: str | None = None) -> str:
    """min / median / max over rounds (after the first) and seeds."""
    values = series(cells, key, ratio_of)
    if not values:
        return "–"
    return f"{np.min(values):.3g} / {np.median(values):.3g} / {np.max(values):.3g}"


def share(values: list[float], test) -> str:
    return f"{sum(map(test, values))} of {len(values)}" if values else "–"


def diagnostics_table(title: str, variants: list[tuple[str, list[dict]]], alpha: float,
                      levels: int = 4) -> list[str]:
    lines = [f"#### {title}", "",
             "min / median / max over rounds 2-20 and seeds.", "",
             "| variant | KD grad norm, generated / real | rounds within 3x | "
             "KD loss, generated / real | KD move / weight decay alone | rounds >= 5x | "
             f"latent RMS ratio (generated / real), levels 1-{levels} |",
             "|---|---|---|---|---|---|---|"]
    for name, cells in variants:
        cells = [c for c in cells if c["strategy"] == MAIN and float(c["alpha"]) == alpha]
        rms = "; ".join(series_range(cells, f"diag-rms-ratio-l{k}") for k in range(1, levels + 1))
        grads = series(cells, "diag-kd-grad-gen", ratio_of="diag-kd-grad-real")
        moves = series(cells, "kd-move-over-wd")
        lines.append(f"| {name} ({len(cells)} seeds) | "
                     f"{series_range(cells, 'diag-kd-grad-gen', ratio_of='diag-kd-grad-real')} | "
                     f"{share(grads, lambda r: 1 / 3 <= r <= 3)} | "
                     f"{series_range(cells, 'diag-kd-loss-gen', ratio_of='diag-kd-loss-real')} | "
                     f"{series_range(cells, 'kd-move-over-wd')} | {share(moves, lambda r: r >= 5)} | "
                     f"{rms} |")
    return lines + [""]


GRID = "python -m simulations.run_grid --experiment {exp} --strategies {strategies} " \
       "--alphas {alphas} --seeds {seeds} {extra}--out results/{out}"
ALL = "darkdistill,darkdistill-pl,eefl,depthfl,scalefl,inclusivefl,exclusivefl,reffl"
SEEDS = "1117,2024,42"
#: DarkDistill's ablations on the ViT at alpha = 1: (row, results folder, override)
ABLATIONS = [
    ("scale anchor off (authors' release)", "vit-ablation-anchor-off", "darkdistill-scale-anchor=off"),
    ("scale anchor: statistic loss", "vit-ablation-anchor-stat-loss", "darkdistill-scale-anchor=stat-loss"),
    ("w/o DC", "vit-ablation-wo-dc", "darkdistill-difficulty-conditioning=false"),
    ("w/o RKD", "vit-ablation-wo-rkd", "darkdistill-reverse-kd=false"),
    ("weighting: placeholder (authors' release)", "vit-ablation-weighting-placeholder",
     "darkdistill-weighting=placeholder"),
    ("weighting: uniform", "vit-ablation-weighting-uniform", "darkdistill-weighting=uniform"),
]


def grid_command(exp: str, alphas: str, out: str, strategies: str = ALL, seeds: str = SEEDS,
                 override: str = "") -> str:
    return GRID.format(exp=exp, strategies=strategies, alphas=alphas, seeds=seeds, out=out,
                       extra=f"--set {override} " if override else "")


def commands() -> list[str]:
    """Every grid behind the tables, in the order that yields the headline figures first
    (each resumes where it stopped): ``python -m simulations.report --commands | bash``."""
    return [
        grid_command("cifar10-cpu-vit", "1", "vit-boosted"),
        *[grid_command("cifar10-cpu-vit", "1", folder, MAIN, override=o) for _, folder, o in ABLATIONS],
        grid_command("cifar10-cpu-cnn", "0.1,1", "cnn-boosted"),
        grid_command("cifar10-cpu-cnn", "0.1,1", "cnn-darkdistill-no-kd-clip", MAIN,
                     override="darkdistill-kd-max-grad-norm=0"),
        grid_command("cifar10-cpu-vit", "0.1,1000", "vit-boosted"),
        grid_command("cifar10-cpu-vit", "0.1,1,1000", "vit-base", seeds="1117", override="policy=base"),
        grid_command("cifar10-cpu-cnn", "0.1,1", "cnn-base", seeds="1117", override="policy=base"),
    ]


def report(results: Path) -> str:
    cells = lambda name: load_cells(results / name / "cells.jsonl")  # noqa: E731
    out = ["## Results tables (generated by `python -m simulations.report`)", ""]
    out += grid_table("ViT, boosted policy, 1 local epoch (three seeds)", cells("vit-boosted"),
                      grid_command("cifar10-cpu-vit", "0.1,1,1000", "vit-boosted"))
    out += grid_table("CNN, boosted policy, 1 local epoch (three seeds)", cells("cnn-boosted"),
                      grid_command("cifar10-cpu-cnn", "0.1,1", "cnn-boosted"))
    out += grid_table("ViT, base policy (one seed)", cells("vit-base"),
                      grid_command("cifar10-cpu-vit", "0.1,1,1000", "vit-base", seeds="1117",
                                   override="policy=base"))
    out += grid_table("CNN, base policy (one seed)", cells("cnn-base"),
                      grid_command("cifar10-cpu-cnn", "0.1,1", "cnn-base", seeds="1117",
                                   override="policy=base"))
    rows = [(name, cells(folder), grid_command("cifar10-cpu-vit", "1", folder, MAIN, override=o))
            for name, folder, o in ABLATIONS]
    out += ablation_table("DarkDistill ablations, ViT, α = 1 (three seeds)", cells("vit-boosted"),
                          rows, 1.0)
    clip = [("KD gradient clip off", cells("cnn-darkdistill-no-kd-clip"),
             grid_command("cifar10-cpu-cnn", "0.1,1", "cnn-darkdistill-no-kd-clip", MAIN,
                          override="darkdistill-kd-max-grad-norm=0"))]
    for alpha in (0.1, 1.0):
        out += ablation_table(f"DarkDistill on the CNN with and without the KD gradient clip "
                              f"(clip 5 = main), α = {alpha:g}", cells("cnn-boosted"), clip, alpha)
    out += diagnostics_table("DarkDistill server-KD diagnostics, ViT, α = 1",
                             [("anchor on (normalize)", cells("vit-boosted")),
                              ("statistic loss", cells("vit-ablation-anchor-stat-loss")),
                              ("anchor off", cells("vit-ablation-anchor-off"))], 1.0)
    out += diagnostics_table("DarkDistill server-KD diagnostics, CNN, α = 1",
                             [("clip 5", cells("cnn-boosted")),
                              ("clip off", cells("cnn-darkdistill-no-kd-clip"))], 1.0)
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def into_readme(readme: str, tables: str) -> str:
    """``readme`` with the text between its results markers replaced by ``tables``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise SystemExit(f"the README needs one {BEGIN} ... {END} pair")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    body = tables.split("\n", 2)[2] if tables.startswith("## ") else tables
    return f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path, default=Path("results/tables.md"))
    p.add_argument("--readme", type=Path, default=None,
                   help="also replace the README's text between the results markers")
    p.add_argument("--commands", action="store_true",
                   help="print the grid commands behind the tables instead, one per line")
    args = p.parse_args(argv)
    if args.commands:
        print("\n".join(commands()))
        return 0
    text = report(args.results)
    args.out.write_text(text)
    if args.readme is not None:
        args.readme.write_text(into_readme(args.readme.read_text(), text))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
