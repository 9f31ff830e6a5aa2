"""Where a round's time goes, and what Flower costs over a plain PyTorch loop.

1. Runs ``flwr run .`` (Ray simulation) with the default config (or overrides) and reads the
   per-round phase timings the strategy records: configure (slicing + serialising messages),
   the client phase (Flower send/receive wall, which contains the clients' training), the
   clients' own training seconds, aggregation + server step, and central evaluation.
2. Runs the same local training in one plain PyTorch process: the same partitions, submodel
   specs, objective and seeds (EENClient.fit on each node's partition, one after another,
   torch using every core), round after round with the same aggregation.
3. Prints the split and the ratio of a steady-state Flower round's wall time to the plain
   loop's training time for one round (target <= 1.3).

    python -m simulations.benchmark_round [--rounds 6] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from clients.een_client import PARAM_KEYS
from fedeen.app_config import build_strategy, check_run, load_config
from fedeen.budgets import level_for_partition
from fedeen.client_app import _client
from models.submodel import slice_state
from simulations.flwr_local import flwr_run, stop_superlinks
from simulations.run_grid import parse_sets
from strategies.base import ClientUpdate


def plain_loop(overrides: dict, num_nodes: int, rounds: int) -> list[float]:
    """Seconds of local training per round, without Flower, for the same clients."""
    cfg = load_config(overrides)
    clients = [_client(cfg, i, num_nodes) for i in range(num_nodes)]
    strategy = build_strategy(cfg, clients[0].family)
    strategy.initialize(strategy.family.init_state(cfg.seed))
    per_round = []
    for rnd in range(1, rounds + 1):
        updates, t_train = [], 0.0
        for pid, client in enumerate(clients):
            level = level_for_partition(pid, num_nodes, cfg.level_ratios)
            spec = strategy.level_spec(level)
            sub = slice_state(strategy.global_state, strategy.family.shapes(spec))
            config = {**strategy.instructions(rnd, level).to_config(), PARAM_KEYS: list(sub)}
            t0 = time.perf_counter()
            params, n, metrics = client.fit(list(sub.values()), config)
            t_train += time.perf_counter() - t0
            updates.append(ClientUpdate(pid, level, spec, dict(zip(sub, params)), n, metrics))
        strategy.aggregate_updates(rnd, updates)
        per_round.append(t_train)
    return per_round


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--num-supernodes", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    overrides = {"num-server-rounds": args.rounds, **parse_sets(args.set)}
    out = args.out or Path(tempfile.mkdtemp(prefix="fedeen-bench-"))
    check_run(load_config({**overrides, "out-dir": str(out.resolve() / "runs")}),
              args.num_supernodes)
    home = out / "flwr-home"
    try:
        run = flwr_run(overrides, out / "runs", home, args.num_supernodes)
    finally:
        stop_superlinks(home)
    if run.status != "completed":
        print(f"flwr run FAILED (exit code {run.returncode}) after {run.seconds:.1f}s: "
              f"{run.cause}")
        return 1
    metrics = run.metrics()
    rounds = metrics["rounds"]
    steady = rounds[1:] if len(rounds) > 1 else rounds

    def med(key: str) -> float:
        return statistics.median(r["timings"][key] for r in steady)

    total, clients, configure = med("total"), med("clients"), med("configure")
    train_sum, train_max = med("client_train_sum"), med("client_train_max")
    aggregate, step = med("aggregate"), med("server_step")
    evaluation = med("central_eval") + med("federated_eval")
    plain = plain_loop(overrides, args.num_supernodes, args.rounds)
    plain_steady = statistics.median(plain[1:] if len(plain) > 1 else plain)
    concurrency = min(args.num_supernodes, 2)
    train_wall = train_sum / concurrency
    print(f"flwr run: {run.seconds:.1f}s wall for {len(rounds)} rounds "
          f"(first round {rounds[0]['timings']['total']:.2f}s incl. actor start-up and data loading)")
    print(f"steady-state round (median of rounds 2..{len(rounds)}): {total:.3f}s")
    print(f"  client training      {train_wall:.3f}s  (sum over {args.num_supernodes} clients "
          f"{train_sum:.3f}s on {concurrency} parallel actors; slowest client {train_max:.3f}s)")
    print(f"  aggregation          {aggregate + step:.3f}s  (server step {step:.3f}s)")
    print(f"  evaluation           {evaluation:.3f}s  (central, every exit + budget inputs)")
    print(f"  framework overhead   {total - train_wall - aggregate - step - evaluation:.3f}s  "
          f"(configure {configure:.3f}s + client phase beyond training "
          f"{clients - train_wall:.3f}s)")
    print(f"plain PyTorch loop, same local training: {plain_steady:.3f}s per round "
          f"(rounds: {' '.join(f'{t:.2f}' for t in plain)})")
    print(f"ratio steady Flower round / plain loop: {total / plain_steady:.2f}x (target <= 1.3x)")
    print(f"run directory: {metrics['run_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
