"""The edge <-> cloud link: ZeroMQ messages, a token-bucket shaper and the edge's channel.

Why ZeroMQ (pyzmq): feature maps flow one way in a pipeline and the edge must not wait for
the network; ZeroMQ queues and sends in its own I/O thread, reconnects by itself, carries
multi-frame binary messages without copies and routes many edges to one long-lived cloud
worker (DEALER on the edge, ROUTER on the cloud), over TCP between hosts. torch.distributed
needs a fixed group formed up front (a new edge cannot join a running worker), and gRPC
would add code generation for what is a byte pipe.

A message is frames ``[header, blob...]``: the header is JSON (the message ``kind``, its
metadata and one descriptor per blob); a blob is a tensor's bytes, raw or k-bit packed
(``clients.quantize``). Nothing on the wire is unpickled, so a worker never runs code an
edge sent. The link model (``LinkModel``) shapes what a side sends: a message leaves when
the token bucket allows and arrives ``latency`` later, so measured wall times include the
transfer; by default nothing is shaped.
"""
from __future__ import annotations

import collections
import json
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
import zmq
from torch import Tensor

from clients.quantize import Quantized, dequantize

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64,
           "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
           "uint8": torch.uint8, "bool": torch.bool}


class LinkError(ConnectionError):
    """The other side did not answer in time or answered with an error."""


@dataclass(frozen=True)
class LinkModel:
    """A token bucket: ``rate_mbps`` megabits per second (0 = unlimited), ``burst_bytes``
    sent at once at most, and a one-way ``latency_ms`` added to every message."""

    rate_mbps: float = 0.0
    latency_ms: float = 0.0
    burst_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.rate_mbps < 0 or self.latency_ms < 0 or self.burst_bytes < 1:
            raise ValueError(f"link rate, latency and burst must be non-negative: {self}")

    @property
    def shaped(self) -> bool:
        return self.rate_mbps > 0 or self.latency_ms > 0

    def transfer_seconds(self, nbytes: int) -> float:
        """Time a message of ``nbytes`` occupies the link (without latency)."""
        return nbytes * 8 / (self.rate_mbps * 1e6) if self.rate_mbps > 0 else 0.0

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)


class TokenBucket:
    """When each message of one sender arrives under a ``LinkModel``.

    Tokens (bytes) accrue at the link rate up to ``burst_bytes``; a message takes its size
    in tokens, running into debt when it is larger, and has left once the debt is repaid.
    Arrival = that moment + latency. Arrivals never overtake each other.
    """

    def __init__(self, link: LinkModel) -> None:
        self.link = link
        self.tokens = float(link.burst_bytes)
        self.last = 0.0

    def due(self, nbytes: int, now: float) -> float:
        link = self.link
        if not link.shaped:
            return now
        if link.rate_mbps <= 0:
            return now + link.latency_ms / 1000.0
        rate = link.rate_mbps * 1e6 / 8  # bytes per second
        if self.last:
            self.tokens = min(float(link.burst_bytes), self.tokens + rate * (now - self.last))
        self.last = now
        self.tokens -= nbytes
        return now + max(0.0, -self.tokens / rate) + link.latency_ms / 1000.0


# ---------------------------------------------------------------------- encoding
def tensor_blob(name: str, value: Tensor | np.ndarray | Quantized) -> tuple[dict, bytes]:
    if isinstance(value, Quantized):
        return ({"name": name, "shape": list(value.shape), "bits": value.bits,
                 "lo": value.lo, "step": value.step}, value.payload)
    t = torch.as_tensor(value).detach().to("cpu").contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise TypeError(f"tensor {name!r} has dtype {dtype}, which the link does not carry")
    raw = t.view(torch.uint8) if t.dtype == torch.bfloat16 else t
    return {"name": name, "shape": list(t.shape), "dtype": dtype}, raw.numpy().tobytes()


def encode(kind: str, meta: Mapping[str, Any] | None = None,
           tensors: Mapping[str, Any] | None = None) -> list[bytes]:
    descs, blobs = [], []
    for name, value in (tensors or {}).items():
        desc, blob = tensor_blob(name, value)
        descs.append(desc)
        blobs.append(blob)
    header = {"kind": kind, "meta": dict(meta or {}), "tensors": descs}
    return [json.dumps(header).encode()] + blobs


@dataclass
class Message:
    kind: str
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    nbytes: int


def decode(frames: list[bytes]) -> Message:
    """A message from its frames; a malformed one raises ``ValueError`` naming the problem."""
    try:
        header = json.loads(frames[0])
        kind, meta, descs = header["kind"], header["meta"], header["tensors"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"malformed message header: {e}") from None
    if len(descs) != len(frames) - 1:
        raise ValueError(f"message {kind!r} declares {len(descs)} tensors, carries "
                         f"{len(frames) - 1}")
    tensors = {}
    for desc, blob in zip(descs, frames[1:]):
        shape = tuple(int(s) for s in desc["shape"])
        n = int(np.prod(shape)) if shape else 1
        if "bits" in desc:
            bits = int(desc["bits"])
            need = n * 4 if bits == 32 else -(-n * bits // 8)
            if len(blob) != need:
                raise ValueError(f"tensor {desc['name']!r}: {len(blob)} bytes for {n} values "
                                 f"at {bits} bits (expected {need})")
            tensors[desc["name"]] = dequantize(Quantized(bytes(blob), shape, bits,
                                                         float(desc["lo"]), float(desc["step"])))
            continue
        dtype = _DTYPES.get(desc.get("dtype", ""))
        if dtype is None:
            raise ValueError(f"tensor {desc.get('name')!r}: unknown dtype {desc.get('dtype')!r}")
        elem = torch.empty((), dtype=dtype).element_size()
        if len(blob) != n * elem:
            raise ValueError(f"tensor {desc['name']!r}: {len(blob)} bytes for shape {shape} "
                             f"of {desc['dtype']}")
        buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        tensors[desc["name"]] = buf.view(dtype).reshape(shape).clone()
    return Message(kind, meta, tensors, sum(len(f) for f in frames))


def parse_address(address: str) -> str:
    """``host:port`` (or a full ``tcp://`` URL) as a ZeroMQ TCP endpoint."""
    text = address.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"cloud address must be HOST:PORT, got {address!r}")
    return f"tcp://{host}:{port}"


# ---------------------------------------------------------------------- the edge's channel
class EdgeChannel:
    """A DEALER socket to one cloud worker, owned by an I/O thread that sends each message
    when the link model lets it arrive, so the caller never waits for the network.

    ``send`` returns at once; ``recv`` waits at most ``timeout`` seconds for the next reply.
    """

    def __init__(self, address: str, link: LinkModel | None = None) -> None:
        self.address = address
        self.endpoint = parse_address(address)
        self.bucket = TokenBucket(link or LinkModel())
        self.ctx = zmq.Context()
        self._outbox: collections.deque[tuple[float, list[bytes]]] = collections.deque()
        self._inbox: queue.Queue[list[bytes]] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_addr = f"inproc://wake-{id(self)}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._run, name="edge-link", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                ready = []
                with self._lock:
                    while self._outbox and self._outbox[0][0] <= now:
                        ready.append(self._outbox.popleft()[1])
                    wait = self._outbox[0][0] - now if self._outbox else 0.2
                for frames in ready:
                    sock.send_multipart(frames, copy=False)
                events = dict(poller.poll(max(1, int(min(wait, 0.2) * 1000))))
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                if sock in events:
                    while sock.poll(0):
                        self._inbox.put(sock.recv_multipart())
        finally:
            sock.close(linger=0)

    def send(self, frames: list[bytes]) -> int:
        """Queue ``frames``; returns their size in bytes (what the link carries)."""
        nbytes = sum(len(f) for f in frames)
        with self._lock:
            self._outbox.append((self.bucket.due(nbytes, time.monotonic()), frames))
        self._wake_tx.send(b"")
        self.bytes_sent += nbytes
        return nbytes

    def recv(self, timeout: float) -> Message:
        try:
            frames = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise LinkError(f"the cloud worker at {self.address} did not answer within "
                            f"{timeout:g} s") from None
        msg = decode(frames)
        if msg.kind == "error":
            raise LinkError(f"the cloud worker at {self.address} answered: "
                            f"{msg.meta.get('message')}")
        return msg

    def close(self) -> None:
        self._stop.set()
        try:
            self._wake_tx.send(b"", flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._thread.join(timeout=5)
        self._wake_tx.close(linger=0)
        self._wake_rx.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> "EdgeChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
