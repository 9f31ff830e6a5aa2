"""Run ``flwr run .`` as a subprocess in an isolated FLWR_HOME and clean up after it.

`flwr run` starts a detached local SuperLink that outlives the run; we stop it by PID, found
through its command line, which names this FLWR_HOME (never by process name). Flower's local
SuperLink listens on fixed ports (127.0.0.1:39091, control 39093) whatever FLWR_HOME says, so
two runs on one machine would talk to the same one: every FLWR_HOME gets its own free ports
(kept in ``<FLWR_HOME>/local-ports.json``), passed to Flower through
FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and FLWR_LOCAL_CONTROL_API_PORT.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

PROJECT = Path(__file__).resolve().parents[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_config_arg(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ports(flwr_home: Path) -> tuple[int, int]:
    """(SuperLink HTTP API, control API) ports of this FLWR_HOME's local SuperLink."""
    path = flwr_home / "local-ports.json"
    if path.exists():
        ports = json.loads(path.read_text())
        return int(ports["superlink"]), int(ports["control"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    ports = {"superlink": free_port(), "control": free_port()}
    path.write_text(json.dumps(ports))
    return ports["superlink"], ports["control"]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # flwr starts flower-superlink / flower-superexec by name: put this interpreter's scripts
    # first on PATH, so a venv that was never activated (CI) still finds its own executables.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *(p for p in env.get("PATH", "").split(os.pathsep)
                                             if p and p != bindir)])
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
               PYTHONUNBUFFERED="1")
    superlink, control = local_ports(flwr_home)
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(superlink),
               FLWR_LOCAL_CONTROL_API_PORT=str(control))
    return env


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of SuperLinks started for ``flwr_home`` (their command line names it)."""
    marker = str(flwr_home).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in cmd and marker in cmd:
            pids.append(int(entry.name))
    return pids


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children first found by their parent PID)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_superlinks(flwr_home: Path, wait: float = 10.0) -> list[int]:
    """Stop the SuperLinks of ``flwr_home`` and everything they started (SuperExec, a
    simulation still running with its Ray processes), all by PID."""
    roots = superlink_pids(flwr_home)
    pids = [p for root in roots for p in (*descendants(root), root)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + wait
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return roots


def run_status(run_dir: Path | None) -> tuple[str, str | None]:
    """("completed", None) or ("failed", cause) as a run directory's metrics.json says; a run
    without a readable metrics.json failed before it could write one."""
    if run_dir is None:
        return "failed", "the run wrote no run directory"
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return "failed", f"no readable {path} ({type(err).__name__}: {err})"
    status = metrics.get("status", "completed")  # runs before statuses only wrote it at the end
    return status, None if status == "completed" else metrics.get("cause", "no cause recorded")


@dataclass
class FlwrRun:
    returncode: int
    seconds: float
    log: str
    run_dirs: list[Path]

    @property
    def status(self) -> str:
        """"completed" or "failed", from the run's metrics.json ("failed" without one)."""
        return run_status(self.run_dirs[-1] if self.run_dirs else None)[0]

    @property
    def cause(self) -> str | None:
        """Why the run failed (None if it completed), with the log's tail when the run left
        no metrics.json to say it."""
        status, cause = run_status(self.run_dirs[-1] if self.run_dirs else None)
        if status == "completed":
            return None
        return cause if self.run_dirs else f"{cause}; log tail:\n{self.log[-3000:]}"

    def metrics(self) -> dict[str, Any]:
        if not self.run_dirs:
            raise RuntimeError("the run wrote no run directory; log tail:\n" + self.log[-3000:])
        return json.loads((self.run_dirs[-1] / "metrics.json").read_text())


def flwr_run(overrides: dict[str, Any], out_dir: Path, flwr_home: Path, num_supernodes: int = 4,
             timeout: float = 3600, echo: bool = False, extra_args: Iterable[str] = ()) -> FlwrRun:
    """``flwr run . --stream`` with ``overrides``; results land in a fresh ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.iterdir())
    overrides = {**overrides, "out-dir": str(out_dir)}
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(PROJECT), "--stream",
           "--federation-config",
           f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
           "--run-config", run_config_arg(overrides), *extra_args]
    t0 = time.perf_counter()
    lines = []
    proc = subprocess.Popen(cmd, cwd=PROJECT, env=flwr_env(flwr_home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)  # also fires when the run prints nothing
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    if time.perf_counter() - t0 >= timeout:
        lines.append(f"fedeen: flwr run killed after {timeout:.0f}s\n")
    new = sorted(p for p in set(out_dir.iterdir()) - before if p.is_dir())  # even unfinished
    return FlwrRun(proc.returncode or 0, time.perf_counter() - t0, "".join(lines), new)


def main() -> None:
    """``python -m simulations.flwr_local stop``: stop the SuperLink `flwr run` left behind."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["stop", "list"])
    parser.add_argument("--flwr-home", default=os.environ.get("FLWR_HOME", "~/.flwr"))
    args = parser.parse_args()
    home = Path(os.path.expanduser(args.flwr_home)).resolve()
    if args.action == "list":
        print(" ".join(map(str, superlink_pids(home))) or "none")
    else:
        stopped = stop_superlinks(home)
        print(f"stopped SuperLink PIDs: {stopped}" if stopped else f"no SuperLink for {home}")


if __name__ == "__main__":
    main()
