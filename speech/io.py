"""Audio decoding with soundfile (libsndfile, bundled in its wheel: no FFmpeg) and torchaudio resampling.

torchaudio 2.9+ routes ``torchaudio.load`` and ``save`` through torchcodec, which needs a system
FFmpeg, so files are read with soundfile and torchaudio is used for the signal processing only.

Every clip comes out mono float32 at the target rate, or raises :class:`~vision.io.MediaError`-like
:class:`AudioError` with the reason the stage records: an empty file, bytes libsndfile cannot decode,
a WAV or AIFF file cut short (its header promises more samples than it holds, which libsndfile
reads as a shorter clip without a word), a clip with no samples, non-finite samples, silence (peak
below ``min_peak``: a transcript paired with silence is wrong data, not a quiet speaker), or a clip
longer than ``max_seconds`` (one item must not take a worker's memory).
"""

from __future__ import annotations

import io
import struct
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


# Data sizes a writer leaves when it cannot seek back to fill them in (it wrote to a pipe): the length
# is unknown rather than promised, and readers take the samples up to the end of the file.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)

# WAVE format tags whose block_align is one frame (PCM, IEEE float, A-law, mu-law, extensible);
# in compressed formats a block holds many frames, so only bytes can be compared.
_WAV_FRAME_TAGS = {1, 3, 6, 7, 0xFFFE}

# AIFF-C compression types that store plain samples (a frame is channels x sample bytes).
_AIFC_PLAIN = {b"NONE", b"sowt", b"twos", b"raw ", b"in24", b"in32", b"fl32", b"FL32", b"fl64",
               b"FL64"}


def _wav_data(data: bytes) -> tuple[int, int, int] | None:
    """``(bytes of samples the data chunk promises, bytes present, bytes per frame or 0)``."""
    pos, frame, ds64 = 12, 0, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"ds64" and body + 16 <= len(data):  # RF64: the real sizes, 64-bit
            ds64 = struct.unpack_from("<Q", data, body + 8)[0]
        elif cid == b"fmt " and body + 14 <= len(data):
            tag, _, _, _, align = struct.unpack_from("<HHIIH", data, body)
            frame = align if tag in _WAV_FRAME_TAGS else 0
        elif cid == b"data":
            if data[:4] == b"RF64" and size == 0xFFFFFFFF and ds64 is not None:
                size = ds64
            elif size in _UNKNOWN_SIZES:
                return None
            return size, len(data) - body, frame
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


def _aiff_data(data: bytes) -> tuple[int, int, int] | None:
    """As :func:`_wav_data`, from the SSND chunk (after its offset and block size words)."""
    pos, frame = 12, 0
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from(">I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"COMM" and body + 8 <= len(data):
            channels, _, bits = struct.unpack_from(">hIh", data, body)
            kind = data[body + 18:body + 22] if data[8:12] == b"AIFC" else b"NONE"
            frame = channels * ((bits + 7) // 8) if kind in _AIFC_PLAIN and channels > 0 else 0
        elif cid == b"SSND" and body + 8 <= len(data):
            offset = struct.unpack_from(">I", data, body)[0]
            if size in _UNKNOWN_SIZES or size < 8 + offset:
                return None
            return size - 8 - offset, max(0, len(data) - (body + 8 + offset)), frame
        pos = body + size + (size & 1)
    return None


def check_length(data: bytes) -> None:
    """Raise :class:`AudioError` when a WAV (RIFF, RF64) or AIFF header promises more sample data
    than the file holds: a download or copy cut short. libsndfile reads what is there and reports
    the shorter length as the file's own, so a transcript would be paired with a fragment of its
    recording; the header's promise is the only trace of the loss. Other formats pass unchecked."""
    tag, form = data[:4], data[8:12]
    if tag in (b"RIFF", b"RF64") and form == b"WAVE":
        kind, found = "WAV", _wav_data(data)
    elif tag == b"FORM" and form in (b"AIFF", b"AIFC"):
        kind, found = "AIFF", _aiff_data(data)
    else:
        return
    if found is None:  # no sample chunk found, or a length left open: libsndfile judges the file
        return
    promised, held, frame = found
    if frame:
        if held // frame < promised // frame:
            raise AudioError(f"truncated {kind}: its header promises {promised // frame} frames "
                             f"({promised} bytes of samples) but the file holds {held // frame} "
                             f"frames ({held} bytes)")
    elif held < promised:
        raise AudioError(f"truncated {kind}: its header promises {promised} bytes of samples but "
                         f"the file holds {held}")


def decode_audio(media: bytes | AudioClip, *, sample_rate: int = 16000, min_peak: float = 1e-4,
                 max_seconds: float | None = 600.0) -> Decoded:
    """Mono float32 samples at ``sample_rate`` from encoded bytes or an :class:`AudioClip`."""
    if isinstance(media, AudioClip):
        x, sr = np.asarray(media.samples), int(media.sample_rate)
    else:
        if not media:
            raise AudioError("empty file (0 bytes)")
        import soundfile as sf

        check_length(media)
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
