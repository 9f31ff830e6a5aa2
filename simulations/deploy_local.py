"""A real deployment on this machine: one SuperLink, N SuperNodes with their budget levels,
and ``flwr run`` against them (no simulation engine, no Ray).

Secure by default: a fresh CA and SuperLink certificate (TLS), one key pair per SuperNode,
registered with the SuperLink before the nodes start (``--enable-supernode-auth``), all made
by ``simulations.secure`` in the work folder; ``--insecure`` skips both for a quick try.

Each SuperNode gets ``--node-config "partition-id=i num-partitions=N budget-level=k"``, as an
operator would set per device; the server learns each level through its query message. All
processes are started here and stopped by PID at the end. The exit code is non-zero when
``flwr run`` fails or the run's metrics.json does not say ``"status": "completed"``.

    python -m simulations.deploy_local --nodes 4 --set num-server-rounds=2

``--split-nodes 1,3`` also starts a cloud worker and makes those SuperNodes the edges of split
pairs (node config ``client-mode="split" cloud-address="127.0.0.1:<port>"``).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedeen.budgets import level_for_partition
from fedeen.app_config import check_run, load_config
from simulations.flwr_local import PROJECT, flwr_env, free_port, run_config_arg, run_status
from simulations.run_grid import parse_sets
from simulations.secure import make_certificates, make_node_keys


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def deploy(overrides: dict, nodes: int, work: Path, timeout: float = 1800,
           split_nodes: frozenset[int] = frozenset(), secure: bool = True
           ) -> tuple[int, str]:
    """Start everything, run, stop everything. ``secure``: TLS with a fresh CA and SuperNode
    authentication with one registered key per node; else plain ``--insecure``."""
    bindir = Path(sys.executable).parent
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = flwr_env(home)
    link_port = free_port()
    connection = f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    link_flags, node_flags = ["--insecure"], [["--insecure"] for _ in range(nodes)]
    if secure:
        tls = make_certificates(work / "tls", ["127.0.0.1", "localhost"])
        keys = make_node_keys(work / "keys", nodes)
        connection = f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{tls["ca"]}"\n'
        link_flags = ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                      "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth"]
        node_flags = [["--root-certificates", str(tls["ca"]), "--auth-supernode-private-key",
                       str(private)] for private, _ in keys]
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedeen-deploy"\n\n[superlink.fedeen-deploy]\n{connection}')
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, args: list[str]) -> None:
        log = open(work / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=work, start_new_session=True))

    cfg = load_config(overrides)
    check_run(cfg, nodes)  # data, out-dir and federation size, before any process starts
    ratios = cfg.level_ratios
    try:
        start("superlink", ["flower-superlink", *link_flags,
                            "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(link_port),
                            "--database", str(work / "state.db")])
        wait_for_port(link_port)
        if secure:  # register every SuperNode's public key before it connects
            for i, (_, public) in enumerate(keys):
                done = subprocess.run([str(bindir / "flwr"), "supernode", "register",
                                       str(public), "fedeen-deploy"], env=env, cwd=work,
                                      capture_output=True, text=True, timeout=120)
                if done.returncode:
                    return done.returncode, f"registering node {i}'s key failed:\n" \
                                            f"{done.stdout}{done.stderr}"
        split_config = ""
        if split_nodes:  # one cloud worker serves every split SuperNode
            cloud_port = free_port()
            start("cloud-worker", ["python", "-m", "clients.cloud_worker", "--listen",
                                   f"127.0.0.1:{cloud_port}"])
            wait_for_port(cloud_port)
            split_config = f' client-mode="split" cloud-address="127.0.0.1:{cloud_port}"'
        for i in range(nodes):
            level = level_for_partition(i, nodes, ratios)
            node_config = f"partition-id={i} num-partitions={nodes} budget-level={level}"
            if i in split_nodes:
                node_config += split_config
            start(f"supernode{i}", ["flower-supernode", *node_flags[i], "--superlink",
                                    f"127.0.0.1:{link_port}", "--port", str(free_port()),
                                    "--node-config", node_config])
        cmd = [str(bindir / "flwr"), "run", str(PROJECT), "fedeen-deploy", "--stream",
               "--run-config", run_config_arg({**overrides, "min-nodes": nodes})]
        done = subprocess.run(cmd, env=env, cwd=PROJECT, capture_output=True, text=True,
                              timeout=timeout)
        return done.returncode, done.stdout + done.stderr
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for log in logs:
            log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no SuperNode authentication (a quick try on loopback)")
    p.add_argument("--split-nodes", default="", metavar="I,J",
                   help="SuperNodes (partition ids) that train as edge/cloud split pairs with "
                        "one local cloud worker")
    args = p.parse_args(argv)
    split_nodes = frozenset(int(i) for i in args.split_nodes.split(",") if i.strip())
    overrides = parse_sets(args.set)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedeen-deploy-"))
    overrides.setdefault("out-dir", str(work / "runs"))
    out = Path(os.path.expanduser(str(overrides["out-dir"])))
    before = set(out.iterdir()) if out.is_dir() else set()
    t0 = time.perf_counter()
    rc, log = deploy(overrides, args.nodes, work, split_nodes=split_nodes,
                     secure=not args.insecure)
    print(log)
    new = sorted(p for p in set(out.iterdir()) - before if p.is_dir()) if out.is_dir() else []
    status, cause = run_status(new[-1] if new else None)
    print(f"deployment run {status} (flwr exit code {rc}) in {time.perf_counter() - t0:.1f}s"
          f"{': ' + cause if cause else ''}; logs in {work}")
    return rc or (0 if status == "completed" else 1)


if __name__ == "__main__":
    raise SystemExit(main())
