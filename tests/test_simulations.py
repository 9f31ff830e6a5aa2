"""The grid runner's bookkeeping (tables, resume) and the SuperLink clean-up helpers."""
import json
import subprocess
import sys
import time

from simulations.flwr_local import descendants, run_config_arg
from simulations.run_grid import cell_key, load_done, parse_value, write_tables


def row(strategy, alpha, exits, seed=1):
    return {"strategy": strategy, "dataset": "cifar10", "alpha": alpha, "seed": seed,
            "exits": exits, "mean": sum(exits) / len(exits), "std": 1.0, "round": 3,
            "wall_s": 10.0, "server_s_per_round": 0.5, "server_share": 0.25, "failed": 0}


def test_tables_average_seeds_and_sort_by_mean(tmp_path):
    rows = [row("eefl", 0.1, [10, 20, 30, 40], seed=1), row("eefl", 0.1, [20, 30, 40, 50], seed=2),
            row("depthfl", 0.1, [50, 50, 50, 50])]
    table = write_tables(rows, tmp_path).splitlines()
    assert table[2].startswith("| cifar10 | 0.1 | depthfl | 50.00")
    assert "| eefl | 15.00 | 25.00 | 35.00 | 45.00 | 30.00 ± 1.00 | 10 | 0.50 (25.0%) | 2 |" in table[3]
    assert (tmp_path / "results.csv").read_text().count("\n") == 4


def test_finished_cells_are_found_for_resume(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps(row("eefl", 1.0, [1, 2])) + "\n")
    assert cell_key(row("eefl", 1.0, [5])) in load_done(path)


def test_run_config_quoting():
    assert run_config_arg({"strategy": "eefl", "alpha": 0.1, "augment": False}) == \
        'strategy="eefl" alpha=0.1 augment=false'
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("x") == "x"


def test_descendants_finds_grandchildren():
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(50):
            if descendants(parent.pid):
                break
            time.sleep(0.1)
        kids = descendants(parent.pid)
        assert len(kids) == 1
    finally:
        for pid in descendants(parent.pid):
            subprocess.run(["kill", str(pid)])
        parent.kill()


def test_every_flwr_home_gets_its_own_local_superlink_ports(tmp_path):
    from simulations.flwr_local import flwr_env

    a, b = flwr_env(tmp_path / "a"), flwr_env(tmp_path / "b")
    keys = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")
    assert {a[k] for k in keys}.isdisjoint({b[k] for k in keys})
    assert [flwr_env(tmp_path / "a")[k] for k in keys] == [a[k] for k in keys]  # stable per home


def test_report_pairs_seeds_for_darkdistill_minus_the_best_other():
    """The best other strategy is chosen by seed-average; the difference is taken per seed
    (a seed-wise gain shows even when the spreads overlap)."""
    from simulations.report import grid_table

    def cell(strategy, seed, mean, last5):
        return {"strategy": strategy, "alpha": 1.0, "seed": seed, "mean": mean,
                "last5_mean": last5}

    cells = [cell("darkdistill", 1, 31, 30), cell("darkdistill", 2, 41, 40),
             cell("darkdistill", 3, 51, 50), cell("eefl", 1, 30, 29), cell("eefl", 2, 40, 41),
             cell("eefl", 3, 50, 49), cell("depthfl", 1, 10, 10)]
    text = "\n".join(grid_table("t", cells, "cmd"))
    assert "| darkdistill | 41.00 ± 10.00 | 40.00 ± 10.00 | 3 |" in text
    assert "best-val: 1.00 ± 0.00 against eefl (3 of 3 seeds positive)" in text
    assert "last 5: 0.33 ± 1.15 against eefl (2 of 3 seeds positive)" in text
