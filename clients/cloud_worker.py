"""The cloud worker: a long-lived process that trains the cloud part of every edge it serves.

    python -m clients.cloud_worker --listen 0.0.0.0:7700 [--threads N] [--session-timeout S]

One ROUTER socket serves any number of edges, one session each (``clients.split``); a
session lives from an edge's ``open`` to its ``close``. An edge that disconnects or stops
sending is dropped after ``--session-timeout`` seconds of silence, and a malformed or
failing request is answered with an ``error`` naming the problem: neither stops the worker.
The link model an edge announces also shapes the worker's large replies (conventional
training's gradients, the trained cloud part) by delaying them; acknowledgements are not
shaped. Objective state (e.g. FedDyn's) is kept per client key across that client's sessions.

``spawn_local`` starts a private worker on 127.0.0.1 for simulation: once per process,
reused across rounds, stopped when the process exits (and, should that process be killed,
it notices within a second that its parent is gone and exits too).
"""
from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys
import time
from typing import Any

import torch
import zmq

from clients.split import CloudSession
from clients.transport import LinkModel, Message, decode, encode, parse_address

READY_LINE = "cloud worker listening on "


class CloudWorker:
    def __init__(self, listen: str, session_timeout: float = 120.0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        endpoint = parse_address(listen)
        host, _, port = endpoint.rpartition(":")
        if port == "0":
            self.port = self.sock.bind_to_random_port(host)
        else:
            self.sock.bind(endpoint)
            self.port = int(port)
        self.address = f"{host.removeprefix('tcp://')}:{self.port}"
        self.session_timeout = session_timeout
        self.sessions: dict[bytes, CloudSession] = {}
        self.objective_states: dict[str, dict[str, Any]] = {}
        self.served = 0

    def reply(self, ident: bytes, frames: list[bytes], link: LinkModel | None = None) -> None:
        if link is not None and link.shaped:
            nbytes = sum(len(f) for f in frames)
            time.sleep(link.transfer_seconds(nbytes) + link.latency_ms / 1000.0)
        self.sock.send_multipart([ident] + frames)

    def handle(self, ident: bytes, msg: Message) -> None:
        session = self.sessions.get(ident)
        if msg.kind == "ping":
            self.reply(ident, encode("pong", {"sessions": len(self.sessions)}))
        elif msg.kind == "open":
            key = str(msg.meta.get("client", ident.hex()))
            state = self.objective_states.setdefault(key, {})
            self.sessions[ident] = CloudSession(msg.meta, msg.tensors, state)
            self.reply(ident, encode("ready"))
        elif session is None:
            raise ValueError(f"{msg.kind!r} outside a session (send 'open' first)")
        elif msg.kind == "batch":
            session.last_seen = time.monotonic()
            edge = sorted((k for k in msg.tensors if k.startswith("z")), key=lambda k: int(k[1:]))
            loss, grad = session.step(msg.tensors["h"], msg.tensors["y"],
                                      [msg.tensors[k] for k in edge])
            meta = {"index": msg.meta.get("index"), "loss": loss}
            if grad is None:
                self.reply(ident, encode("ack", meta))
            else:
                self.reply(ident, encode("grad", meta, {"grad": grad}), session.settings.link)
        elif msg.kind == "close":
            del self.sessions[ident]
            meta = {"loss_sum": session.loss_sum, "count": session.count,
                    "intervals": session.intervals}
            self.reply(ident, encode("result", meta, session.result()), session.settings.link)
            self.served += 1
            print(f"cloud worker: session {self.served} done ({session.family.name} "
                  f"{session.spec}, {session.count} examples)", flush=True)
        else:
            raise ValueError(f"unknown message kind {msg.kind!r}")

    def drop_idle(self) -> None:
        now = time.monotonic()
        for ident in [i for i, s in self.sessions.items()
                      if now - s.last_seen > self.session_timeout]:
            del self.sessions[ident]
            print(f"cloud worker: dropped session {ident.hex()} after "
                  f"{self.session_timeout:g} s of silence", file=sys.stderr, flush=True)

    def serve(self, max_seconds: float | None = None, parent_pid: int = 0) -> None:
        """Answer requests (for ``max_seconds``, or until stopped); with ``parent_pid``, stop
        when that process is gone (a private worker must not outlive its client)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while deadline is None or time.monotonic() < deadline:
            if parent_pid and os.getppid() != parent_pid:
                return
            if self.sock.poll(500):
                ident, *frames = self.sock.recv_multipart()
                try:
                    self.handle(ident, decode(frames))
                except Exception as e:  # the worker outlives any one request
                    self.sessions.pop(ident, None)
                    self.reply(ident, encode("error", {"message": f"{type(e).__name__}: {e}"}))
            self.drop_idle()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:7700",
                        help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default)")
    parser.add_argument("--session-timeout", type=float, default=120.0,
                        help="seconds of silence after which an edge's session is dropped")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="exit when this process (the one that started the worker) is gone")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    worker = CloudWorker(args.listen, args.session_timeout)
    print(f"{READY_LINE}{worker.address}", flush=True)
    try:
        worker.serve(parent_pid=args.parent_pid)
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()


_LOCAL: dict[str, Any] = {}


def spawn_local(threads: int = 1, timeout: float = 60.0) -> str:
    """The address of this process's private cloud worker on 127.0.0.1, started on first use
    and stopped at exit."""
    proc = _LOCAL.get("proc")
    if proc is not None and proc.poll() is None:
        return _LOCAL["address"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, "-m", "clients.cloud_worker", "--listen",
                             "127.0.0.1:0", "--threads", str(threads),
                             "--parent-pid", str(os.getpid())],
                            stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.startswith(READY_LINE):
            break
    if not line.startswith(READY_LINE):
        proc.kill()
        raise RuntimeError(f"the local cloud worker did not start within {timeout:g} s "
                           f"(exit code {proc.poll()})")
    _LOCAL.update(proc=proc, address=line[len(READY_LINE):].strip())
    atexit.register(stop_local)
    return _LOCAL["address"]


def stop_local() -> None:
    proc = _LOCAL.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
