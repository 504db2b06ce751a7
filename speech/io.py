"""Audio decoding with soundfile (libsndfile, bundled in its wheel: no FFmpeg) and torchaudio resampling.

torchaudio 2.9+ routes ``torchaudio.load`` and ``save`` through torchcodec, which needs a system
FFmpeg, so files are read with soundfile and torchaudio is used for the signal processing only.

Every clip comes out mono float32 at the target rate, or raises :class:`~vision.io.MediaError`-like
:class:`AudioError` with the reason the stage records: an empty file, bytes libsndfile cannot decode,
a clip with no samples, non-finite samples, silence (peak below ``min_peak``: a transcript paired with
silence is wrong data, not a quiet speaker), or a clip longer than ``max_seconds`` (one item must not
take a worker's memory).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipeline.datasets import AudioClip


class AudioError(ValueError):
    """Audio that cannot be used; the message is the reason recorded for it."""


@dataclass
class Decoded:
    samples: np.ndarray     # (n,) float32 mono at ``sample_rate``
    sample_rate: int
    source_rate: int        # the rate the file had
    channels: int
    duration_s: float


def _pcm_to_float(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    return x.astype(np.float32, copy=False)


def decode_audio(media: bytes | AudioClip, *, sample_rate: int = 16000, min_peak: float = 1e-4,
                 max_seconds: float | None = 600.0) -> Decoded:
    """Mono float32 samples at ``sample_rate`` from encoded bytes or an :class:`AudioClip`."""
    if isinstance(media, AudioClip):
        x, sr = np.asarray(media.samples), int(media.sample_rate)
    else:
        if not media:
            raise AudioError("empty file (0 bytes)")
        import soundfile as sf

        try:
            x, sr = sf.read(io.BytesIO(media), dtype="float32", always_2d=False)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioError(f"corrupt or unsupported audio ({e})") from None
    if sr <= 0:
        raise AudioError(f"invalid sample rate {sr}")
    x = _pcm_to_float(x)
    channels = 1 if x.ndim == 1 else x.shape[1]
    if x.ndim == 2:
        x = x.mean(axis=1)  # a downmix; speech features are mono
    if x.size == 0:
        raise AudioError("empty clip (0 samples)")
    duration = x.size / sr
    if max_seconds is not None and duration > max_seconds:
        raise AudioError(f"clip of {duration:.1f} s is longer than max_seconds={max_seconds:g}")
    if not np.isfinite(x).all():
        raise AudioError("non-finite samples (NaN or inf)")
    peak = float(np.abs(x).max())
    if peak < min_peak:
        raise AudioError(f"silent clip (peak amplitude {peak:.2e} < min_peak={min_peak:g})")
    if sr != sample_rate:
        import torch
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), sr, sample_rate).numpy()
    return Decoded(np.ascontiguousarray(x, dtype=np.float32), sample_rate, sr, channels, duration)
