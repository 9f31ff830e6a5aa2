"""Decoders from stored inputs (encoded images, WAV files) to arrays and tensors."""
from __future__ import annotations

import io
import wave

import numpy as np
import torch
from PIL import Image


def ref_bytes(ref) -> bytes:
    """The bytes of a datasets-style reference (``{bytes, path}`` dict) or raw bytes."""
    data = ref.get("bytes") if isinstance(ref, dict) else ref
    if data is None:
        with open(ref["path"], "rb") as fh:
            data = fh.read()
    return data


def decode_image_refs(refs: list, in_chans: int) -> torch.Tensor:
    """Encoded images (dicts with bytes/path, raw bytes) -> uint8 (N, C, H, W)."""
    mode = "RGB" if in_chans == 3 else "L"
    arrays = [np.asarray(Image.open(io.BytesIO(ref_bytes(r))).convert(mode)) for r in refs]
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def image_channels(ref) -> int:
    """1 for grayscale datasets, else 3 (palette/alpha images are read as RGB)."""
    return 1 if Image.open(io.BytesIO(ref_bytes(ref))).mode in ("L", "1", "I;16") else 3


def decode_wav(ref: dict) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV reference -> (float waveform in [-1, 1), sample rate)."""
    data = ref.get("bytes")
    fh = io.BytesIO(data) if data is not None else open(ref["path"], "rb")
    with wave.open(fh) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return frames.astype(np.float32) / 32768.0, w.getframerate()


def fit_clip(clip: np.ndarray, length: int) -> np.ndarray:
    """Pad with zeros or centre-crop a waveform to ``length`` samples."""
    if len(clip) >= length:
        start = (len(clip) - length) // 2
        return clip[start:start + length]
    return np.pad(clip, (0, length - len(clip)))
