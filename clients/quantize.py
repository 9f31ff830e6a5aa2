"""k-bit feature-map quantisation for the edge -> cloud link, packed to k bits per value.

Uniform min-max quantisation with one scale per batch (per tensor): q = round((x - lo) / s),
s = (hi - lo) / (2^k - 1), so |x - dequantize(q)| <= s / 2. Values are packed bit-plane-free
into ceil(n k / 8) bytes; with the two fp32 numbers (lo, s) a k-bit map costs k/32 of its
fp32 size plus 8 bytes. ``bits = 32`` sends the fp32 tensor as it is. No gradient flows
back through the link, so no straight-through estimator is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: bytes of the per-batch scale header (lo and step, fp32)
SCALE_BYTES = 8
VALID_BITS = tuple(range(1, 17)) + (32,)


def check_bits(bits: int) -> int:
    if bits not in VALID_BITS:
        raise ValueError(f"feature-map bits must be 1..16 or 32 (no quantisation); got {bits}")
    return bits


@dataclass(frozen=True)
class Quantized:
    """A tensor on the wire: packed codes (or raw fp32 bytes), its shape and scale."""

    payload: bytes
    shape: tuple[int, ...]
    bits: int
    lo: float = 0.0
    step: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes this tensor costs on the wire (payload + scale header when quantised)."""
        return len(self.payload) + (SCALE_BYTES if self.bits != 32 else 0)


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned ``codes`` < 2^bits, ``bits`` bits each, little-endian bit order."""
    planes = (codes.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack(payload: bytes, n: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(payload, np.uint8), count=n * bits, bitorder="little")
    planes = flat.reshape(n, bits).astype(np.uint32)
    return (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def quantize(x: Tensor, bits: int) -> Quantized:
    check_bits(bits)
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
    shape = tuple(arr.shape)
    if bits == 32:
        return Quantized(arr.tobytes(), shape, 32)
    lo, hi = float(arr.min()) if arr.size else 0.0, float(arr.max()) if arr.size else 0.0
    levels = (1 << bits) - 1
    step = (hi - lo) / levels if hi > lo else 1.0
    codes = np.clip(np.rint((arr.ravel().astype(np.float64) - lo) / step), 0, levels)
    return Quantized(pack(codes, bits), shape, bits, lo, step)


def dequantize(q: Quantized) -> Tensor:
    n = int(np.prod(q.shape)) if q.shape else 1
    if q.bits == 32:
        arr = np.frombuffer(q.payload, np.float32, count=n).copy()
    else:
        arr = (unpack(q.payload, n, q.bits) * q.step + q.lo).astype(np.float32)
    return torch.from_numpy(arr.reshape(q.shape))


def max_error(q: Quantized) -> float:
    """The bound on |x - dequantize(quantize(x))|: half a step (0 for fp32), before the
    final rounding to fp32 (which adds at most |x| * 2^-24)."""
    return 0.0 if q.bits == 32 else q.step / 2
