"""Real Flower simulations on Ray through ``flwr run`` (slow: about a minute each)."""
import time

import pytest

from simulations.flwr_local import flwr_run, stop_superlinks

pytestmark = pytest.mark.integration


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    yield home
    stop_superlinks(home)


def test_two_round_simulation_on_digits(tmp_path, flwr_home):
    run = flwr_run({"num-server-rounds": 2, "local-epochs": 3}, tmp_path / "runs", flwr_home,
                   num_supernodes=4, timeout=900)
    metrics = run.metrics()
    rounds = metrics["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert r["train"]["clients-ok"] == 4 and r["train"]["clients-failed"] == 0
    final = metrics["final"]
    accs = [final[f"acc-exit-{j}"] for j in range(1, 5)]
    assert all(a is not None for a in accs), "every exit's accuracy is reported"
    assert final["acc-mean"] > 0.2 and max(accs) > 0.3, f"not above chance (10%): {accs}"
    run_dir = run.run_dirs[-1]
    for name in ("config.json", "history.csv", "final_model.pt", "checkpoint.pt",
                 "exit_accuracy.png", "budget_curve.png"):
        assert (run_dir / name).exists(), name
    assert "[round 2/2]" in run.log


def test_split_pairs_in_a_ray_simulation(tmp_path, flwr_home):
    """Two of four simulated nodes are split pairs: each Ray actor starts its private cloud
    worker, which trains the cloud part and exits with the actor."""
    import subprocess

    run = flwr_run({"num-server-rounds": 1, "split-partitions": "2,3"}, tmp_path / "runs",
                   flwr_home, num_supernodes=4, timeout=900)
    train = run.metrics()["rounds"][0]["train"]
    assert train["clients-ok"] == 4 and train["clients-failed"] == 0
    assert train["split-pairs"] == 2 and train["split-mbytes"] > 0
    assert "split-pairs" in run.log
    stop_superlinks(flwr_home)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and private_workers():
        time.sleep(0.5)
    assert not private_workers(), "a private cloud worker outlived its Ray actor"


def private_workers() -> list[str]:
    import subprocess

    found = subprocess.run(["pgrep", "-f", "clients.cloud_worker --listen 127.0.0.1:0"],
                           capture_output=True, text=True).stdout.split()
    alive = []
    for pid in found:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass  # exited between pgrep and here
    return alive


def test_unknown_strategy_fails_with_the_valid_names(tmp_path, flwr_home):
    import strategies

    run = flwr_run({"strategy": "fedsomething"}, tmp_path / "runs", flwr_home, timeout=300)
    assert "unknown strategy 'fedsomething'" in run.log
    assert all(name in run.log for name in strategies.available())
    assert not run.run_dirs


def test_real_deployment_superlink_and_supernodes(tmp_path):
    """flower-superlink with TLS and SuperNode authentication + 4 registered flower-supernodes
    with budget-level in their node config; two of them are the edges of split pairs served
    by one cloud worker process."""
    from simulations.deploy_local import deploy

    rc, log = deploy({"num-server-rounds": 1, "out-dir": str(tmp_path / "runs")}, 4,
                     tmp_path / "deploy", timeout=900, split_nodes=frozenset({2, 3}))
    assert rc == 0, log[-3000:]
    assert "[round 1/1]" in log and "clients ok 4 failed 0" in log
    assert "running on https://" in (tmp_path / "deploy" / "superlink.log").read_text()
    served = (tmp_path / "deploy" / "cloud-worker.log").read_text()
    assert served.count("session") >= 2 and "done" in served, served
