"""Audio decoding: formats soundfile reads, resampling, and a precise reason for unusable clips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from pipeline.datasets import AudioClip
from speech.io import AudioError, decode_audio


def _wav(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _tone(sr: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_16k_wav_round_trips():
    x = _tone(16000)
    d = decode_audio(_wav(x, 16000))
    assert d.sample_rate == d.source_rate == 16000 and d.channels == 1
    np.testing.assert_allclose(d.samples, x, atol=1e-4)  # 16-bit PCM quantisation
    assert d.duration_s == pytest.approx(0.5)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 48000])
def test_unusual_rates_are_resampled_keeping_duration_and_pitch(sr):
    d = decode_audio(_wav(_tone(sr), sr), sample_rate=16000)
    assert d.source_rate == sr and d.sample_rate == 16000
    assert abs(d.samples.size - 8000) <= 2
    spectrum = np.abs(np.fft.rfft(d.samples))
    assert np.argmax(spectrum) * 16000 / d.samples.size == pytest.approx(440, abs=3)


def test_stereo_is_downmixed_and_flac_and_int_clips_work():
    x = np.stack([_tone(16000), _tone(16000)], 1)
    d = decode_audio(_wav(x, 16000, "FLAC"))
    assert d.channels == 2 and d.samples.ndim == 1
    pcm = (_tone(16000) * 32767).astype(np.int16)
    d = decode_audio(AudioClip(pcm, 16000))
    assert np.abs(d.samples).max() == pytest.approx(0.5, abs=1e-3)


def test_zero_byte_file():
    with pytest.raises(AudioError, match="empty file"):
        decode_audio(b"")


def test_corrupt_wav():
    data = _wav(_tone(16000), 16000)
    with pytest.raises(AudioError, match="corrupt or unsupported"):
        decode_audio(b"RIFF\x00\x00\x00\x00WAVEjunk" + data[44:200])
    with pytest.raises(AudioError, match="corrupt or unsupported"):
        decode_audio(b"definitely not audio")


def test_empty_clip():
    with pytest.raises(AudioError, match="empty clip"):
        decode_audio(_wav(np.zeros(0, np.float32), 16000))


def test_silent_clip():
    with pytest.raises(AudioError, match="silent clip"):
        decode_audio(_wav(np.zeros(16000, np.float32), 16000))
    assert decode_audio(_wav(np.zeros(16000, np.float32), 16000), min_peak=0).duration_s == 1.0


def test_too_long_and_non_finite():
    with pytest.raises(AudioError, match="longer than max_seconds"):
        decode_audio(_wav(_tone(16000, 2.0), 16000), max_seconds=1.0)
    x = _tone(16000)
    x[10] = np.nan
    with pytest.raises(AudioError, match="non-finite"):
        decode_audio(AudioClip(x, 16000))


def test_a_wav_cut_short_is_rejected_naming_what_its_header_promised():
    """The issue's file: a header for a second of audio over a few frames of data. libsndfile reads
    it as a clip of those frames without complaint, so the header has to be compared with the bytes."""
    full = _wav(_tone(16000, 1.0), 16000, subtype="PCM_16")
    cut = full[:44 + 8 * 2]  # the 44-byte header and 8 16-bit frames
    assert sf.read(io.BytesIO(cut))[0].shape == (8,)  # why: soundfile says nothing
    with pytest.raises(AudioError, match=r"^truncated WAV: its header promises 16000 frames \(32000 "
                                         r"bytes of samples\) but the file holds 8 frames \(16 bytes\)$"):
        decode_audio(cut)


@pytest.mark.parametrize("fmt,subtype,channels,kind", [
    ("WAV", "FLOAT", 2, "WAV"), ("WAV", "PCM_24", 1, "WAV"), ("RF64", "PCM_16", 1, "WAV"),
    ("AIFF", "PCM_16", 2, "AIFF"), ("WAV", "IMA_ADPCM", 1, "WAV")])
def test_truncated_wav_rf64_and_aiff_are_rejected_and_whole_ones_are_not(fmt, subtype, channels, kind):
    x = _tone(16000, 1.0)
    data = _wav(np.stack([x] * channels, 1) if channels > 1 else x, 16000, fmt, subtype)
    assert decode_audio(data).duration_s == pytest.approx(1.0, abs=0.02)  # ADPCM pads a block
    assert decode_audio(data + b"trailing").duration_s == pytest.approx(1.0, abs=0.02)
    # ADPCM blocks hold many frames: only bytes can be compared
    unit = "bytes of samples" if subtype == "IMA_ADPCM" else "frames"
    with pytest.raises(AudioError, match=rf"truncated {kind}: its header promises \d+ {unit}"):
        decode_audio(data[:len(data) // 2])


def test_a_streamed_wav_with_an_open_length_is_read_to_its_end():
    """A writer on a pipe cannot go back to fill in the sizes and leaves 0xFFFFFFFF: that is no
    promise, and the file is not truncated."""
    data = bytearray(_wav(_tone(16000), 16000, subtype="PCM_16"))
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"  # RIFF size and data size
    assert decode_audio(bytes(data)).duration_s == pytest.approx(0.5)
