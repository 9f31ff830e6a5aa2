"""Log-mel spectrogram front end in plain torch, so keyword spotting reuses the image backbones.

It has no trainable parameters and registers its buffers as non-persistent: it never appears
in a state dict, so the audio models share the exact parameter names of the image ones.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 20.0) -> Tensor:
    """Triangular HTK-mel filters, shape (n_mels, n_fft // 2 + 1)."""
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mels = torch.linspace(to_mel(f_min), to_mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (bins[None] - lower) / (centre - lower)
    down = (upper - bins[None]) / (upper - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0)


class LogMelFrontEnd(nn.Module):
    """Waveform (B, T) -> normalised log-mel image (B, 1, size, size)."""

    def __init__(self, sample_rate: int, image_size: int, n_mels: int = 40,
                 win_ms: float = 32.0, hop_ms: float = 16.0) -> None:
        super().__init__()
        self.n_fft = 2 ** math.ceil(math.log2(sample_rate * win_ms / 1000))
        self.hop = int(sample_rate * hop_ms / 1000)
        self.image_size = image_size
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("fbank", mel_filterbank(self.n_fft, n_mels, sample_rate),
                             persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, return_complex=True)
        mel = torch.matmul(self.fbank, spec.abs().pow(2))
        logmel = torch.log(mel + 1e-6)
        logmel = (logmel - logmel.mean(dim=(1, 2), keepdim=True)) / (
            logmel.std(dim=(1, 2), keepdim=True) + 1e-5)
        img = logmel.unsqueeze(1)
        return F.interpolate(img, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False)
