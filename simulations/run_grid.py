"""Run a grid of strategies x datasets x alphas x seeds through Flower's simulation engine.

Each cell is a real ``flwr run`` (Ray) in an isolated FLWR_HOME; completed cells are appended
to ``cells.jsonl`` so an interrupted grid resumes where it stopped. The results table (mean ±
std over exits per strategy and setting, as in the DarkDistill paper) holds completed cells
only and is written as Markdown and CSV after every cell; failed cells (their run's
metrics.json says ``"status": "failed"``, or there is none) are listed with their cause at the
end, are run again next time, and make the exit code 1.

    python -m simulations.run_grid --experiment cifar10-cpu-vit \
        --strategies eefl,depthfl --alphas 0.1,1,1000 --seeds 1117 --out /tmp/grid
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedeen.app_config import check_run, load_config
from simulations.experiments import experiment
from simulations.flwr_local import flwr_run, stop_superlinks


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments as run-config overrides (values typed by ``parse_value``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        out[key] = parse_value(value)
    return out


def cell_key(c: dict[str, Any]) -> str:
    """A cell's identity: its grid coordinates and a digest of every other override. A
    dataset given as a local path counts by its folder name, so a grid resumes from another
    checkout."""
    dataset = Path(str(c["dataset"])).name
    return f"{c['strategy']}|{dataset}|{c['alpha']}|{c['seed']}|{c.get('settings', '')}"


def settings_digest(overrides: dict[str, Any]) -> str:
    """Digest of a grid's overrides (a local dataset path by its folder name, as in
    ``cell_key``)."""
    portable = {k: Path(str(v)).name if k == "dataset" else v for k, v in overrides.items()}
    return hashlib.sha1(json.dumps(portable, sort_keys=True).encode()).hexdigest()[:10]


def load_done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {cell_key(r): r for r in rows}


#: rounds whose mean test accuracy is the second reading of a cell (besides best validation)
LAST_ROUNDS = 5


def summarise(metrics: dict[str, Any], which: str) -> dict[str, Any]:
    """A cell's row: per-exit accuracies of the ``which`` round (``best_val`` or ``final``),
    the per-exit mean over the last LAST_ROUNDS rounds, timings, and every round's server
    diagnostics (``diag-*``, ``kd-*``) as series."""
    n = metrics["num_exits"]
    pick = metrics[which] or metrics["final"]
    accs = [100 * pick[f"acc-exit-{j}"] for j in range(1, n + 1)]
    rounds = metrics["rounds"]
    tail = [r["central"] for r in rounds if "acc-exit-1" in r.get("central", {})][-LAST_ROUNDS:]
    last = [float(np.mean([100 * c[f"acc-exit-{j}"] for c in tail])) if tail else float("nan")
            for j in range(1, n + 1)]
    keys = sorted({k for r in rounds for k in r["train"] if k.startswith(("diag-", "kd-"))})
    server = sum(r["timings"]["aggregate"] + r["timings"]["server_step"] for r in rounds)
    total = sum(r["timings"]["total"] for r in rounds)
    return {"exits": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            f"last{LAST_ROUNDS}_exits": last, f"last{LAST_ROUNDS}_mean": float(np.mean(last)),
            "diagnostics": {k: [r["train"].get(k) for r in rounds] for k in keys},
            "round": pick.get("round"), "wall_s": metrics["wall_seconds"],
            "server_share": server / total if total else 0.0,
            "server_s_per_round": server / max(len(rounds), 1),
            "failed": sum(r["train"].get("clients-failed", 0) for r in rounds),
            "run_dir": metrics["run_dir"]}


def write_tables(rows: list[dict[str, Any]], out: Path) -> str:
    """CSV of every cell and a Markdown table (seeds averaged) in the paper's form."""
    n = max((len(r["exits"]) for r in rows), default=0)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "dataset", "alpha", "seed", *[f"exit{j}" for j in range(1, n + 1)],
                    "mean", "std", "round", "wall_s", "server_s_per_round", "server_share", "failed"])
        for r in rows:
            w.writerow([r["strategy"], r["dataset"], r["alpha"], r["seed"],
                        *[f"{a:.2f}" for a in r["exits"]], f"{r['mean']:.2f}", f"{r['std']:.2f}",
                        r["round"], f"{r['wall_s']:.0f}", f"{r['server_s_per_round']:.2f}",
                        f"{r['server_share']:.3f}", r["failed"]])
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["alpha"], r["strategy"]), []).append(r)
    lines = ["| dataset | alpha | strategy | " + " | ".join(f"exit {j}" for j in range(1, n + 1))
             + " | mean ± std | wall s | server s/round (share) | seeds |",
             "|---|---|---|" + "---|" * n + "---|---|---|---|"]
    for (dataset, alpha, strategy), cells in sorted(groups.items(),
                                                     key=lambda kv: (kv[0][0], float(kv[0][1]),
                                                                     -np.mean([c["mean"] for c in kv[1]]))):
        exits = np.mean([c["exits"] for c in cells], axis=0)
        mean, std = np.mean([c["mean"] for c in cells]), np.mean([c["std"] for c in cells])
        wall = np.mean([c["wall_s"] for c in cells])
        srv = np.mean([c["server_s_per_round"] for c in cells])
        share = np.mean([c["server_share"] for c in cells])
        lines.append(f"| {dataset} | {alpha} | {strategy} | "
                     + " | ".join(f"{a:.2f}" for a in exits)
                     + f" | {mean:.2f} ± {std:.2f} | {wall:.0f} | {srv:.2f} ({100 * share:.1f}%) | {len(cells)} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="default", help="named settings (simulations/experiments.py)")
    p.add_argument("--strategies", default="eefl")
    p.add_argument("--datasets", default="", help="comma-separated; default: the experiment's")
    p.add_argument("--alphas", default="1.0")
    p.add_argument("--seeds", default="1117")
    p.add_argument("--num-supernodes", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run-config override (repeatable)")
    p.add_argument("--report", choices=["best_val", "final"], default="best_val",
                   help="per-exit accuracies of the best-validation round (authors) or the last")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)

    base = {**experiment(args.experiment), **parse_sets(args.set)}
    datasets = [d for d in args.datasets.split(",") if d] or [base.get("dataset", "digits")]
    digest = settings_digest(base)
    cells = [{"strategy": s, "dataset": d, "alpha": float(a), "seed": int(seed), "settings": digest}
             for d in datasets for a in args.alphas.split(",") for seed in args.seeds.split(",")
             for s in args.strategies.split(",")]
    for c in cells:  # validate every cell (config, data, federation) before the first Ray start
        check_run(load_config({**base, "strategy": c["strategy"], "dataset": c["dataset"],
                               "alpha": c["alpha"], "seed": c["seed"],
                               "out-dir": str(args.out.resolve() / "runs")}),
                  args.num_supernodes)
    args.out.mkdir(parents=True, exist_ok=True)
    done_path = args.out / "cells.jsonl"
    done = load_done(done_path)
    home = args.out / "flwr-home"
    rows = list(done.values())
    failed: list[tuple[str, str]] = []
    try:
        for i, c in enumerate(cells, start=1):
            tag = (f"[{i}/{len(cells)}] {c['strategy']} on {Path(c['dataset']).name} "
                   f"alpha={c['alpha']:g} seed={c['seed']}")
            if cell_key(c) in done:
                print(f"{tag}: done earlier, skipped", flush=True)
                continue
            print(f"{tag}: running ...", flush=True)
            overrides = {**base, **{k: v for k, v in c.items() if k != "settings"}}
            run = flwr_run(overrides, args.out / "runs", home, args.num_supernodes, args.timeout)
            if run.status != "completed":
                failed.append((tag, run.cause or "unknown"))
                print(f"{tag}: FAILED (exit code {run.returncode}) after {run.seconds:.0f}s: "
                      f"{run.cause}", flush=True)
                continue
            summary = summarise(run.metrics(), args.report)
            row = {**c, "dataset": Path(c["dataset"]).name, **summary, "wall_s": run.seconds}
            rows.append(row)
            with open(done_path, "a") as fh:
                fh.write(json.dumps({**row, "dataset": c["dataset"]}) + "\n")
            print(f"{tag}: exits {' '.join(f'{a:.2f}' for a in row['exits'])} | mean "
                  f"{row['mean']:.2f} ± {row['std']:.2f} | {run.seconds:.0f}s", flush=True)
            write_tables([{**r, "dataset": Path(r["dataset"]).name} for r in rows], args.out)
    finally:
        stop_superlinks(home)
    table = write_tables([{**r, "dataset": Path(r["dataset"]).name} for r in rows], args.out)
    print(table)
    print(f"tables: {args.out / 'results.md'} and {args.out / 'results.csv'} "
          f"({len(rows)} completed cells)")
    if failed:
        print(f"{len(failed)} cell(s) FAILED (not in the tables; run again to retry):")
        for tag, cause in failed:
            print(f"  {tag}: {cause}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
