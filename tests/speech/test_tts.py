"""speech.tts: espeak-ng through ctypes (skipped without the optional extra stele[tts])."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("espeakng_loader", reason="espeak-ng is the optional extra stele[tts]")

from speech import tts  # noqa: E402
from speech.tts import list_voices, synthesize  # noqa: E402


def seconds(clip) -> float:
    return len(clip.samples) / clip.sample_rate


def rms(clip) -> float:
    return float(np.sqrt(np.mean(clip.samples.astype(np.float64) ** 2)))


def test_speech_is_audible_mono_22050_hz():
    clip = synthesize("a red apple")
    assert clip.sample_rate == 22050
    assert clip.samples.ndim == 1 and clip.samples.dtype == np.int16
    assert 0.3 < seconds(clip) < 3.0
    assert rms(clip) > 500  # int16 full scale is 32767; silence is 0


def test_a_longer_caption_gives_a_longer_clip():
    short = synthesize("apple")
    long = synthesize("a red apple on a wooden table next to a tall glass of cold water")
    assert seconds(long) > 3 * seconds(short)


def test_same_arguments_give_identical_samples_whatever_was_spoken_before():
    first = synthesize("a red apple", seed=7, jitter=0.2)
    synthesize("something else entirely, to move espeak-ng's internal state on")
    again = synthesize("a red apple", seed=7, jitter=0.2)
    np.testing.assert_array_equal(first.samples, again.samples)
    plain = [synthesize("hello world") for _ in range(2)]
    np.testing.assert_array_equal(plain[0].samples, plain[1].samples)


def test_seeds_vary_the_voice():
    lengths = {len(synthesize("a red apple", seed=s, jitter=0.3).samples) for s in range(4)}
    assert len(lengths) > 1


def test_rate_and_voice_change_the_duration():
    text = "the quick brown fox jumps over the lazy dog"
    fast, slow = synthesize(text, rate=350), synthesize(text, rate=120)
    assert seconds(fast) < 0.6 * seconds(slow)
    assert len(synthesize(text, voice="de").samples) != len(synthesize(text).samples)


def test_max_seconds_refuses_long_text_unspoken_and_stops_speech_at_the_limit():
    with pytest.raises(ValueError, match=r"caption of 6000 characters would speak for about 257 s "
                                         r"at 175 words per minute, longer than max_seconds=60; "
                                         r"not synthesised"):
        synthesize("word " * 1200, max_seconds=60)
    # Numbers read out speak slower than the length estimate says: the cap during synthesis
    # catches them, at the limit.
    text = "1234567 " * 20
    assert tts.estimate_seconds(text, 175) < 10 < seconds(synthesize(text))
    with pytest.raises(ValueError, match=r"caption of 160 characters speaks for longer than "
                                         r"max_seconds=10; synthesis stopped at the limit"):
        synthesize(text, max_seconds=10)
    # text within the limit comes out as without one, sample for sample
    np.testing.assert_array_equal(synthesize("a red apple", max_seconds=10).samples,
                                  synthesize("a red apple").samples)


def test_language_codes_work_as_voices():
    assert rms(synthesize("good morning", voice="en-gb")) > 500


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_raises(text):
    with pytest.raises(ValueError, match="empty text"):
        synthesize(text)


def test_unknown_voice_names_close_ones():
    with pytest.raises(ValueError, match=r"unknown espeak-ng voice 'en-usa'.*'en-us'"):
        synthesize("hello", voice="en-usa")


def test_out_of_range_parameters_raise():
    with pytest.raises(ValueError, match="rate 1000"):
        synthesize("hello", rate=1000)
    with pytest.raises(ValueError, match="pitch -1"):
        synthesize("hello", pitch=-1)


def test_list_voices():
    voices = list_voices()
    assert len(voices) > 50
    assert any("en-us" in v["languages"] for v in voices)


def test_the_helper_process_restarts_after_dying():
    synthesize("one")
    tts._HELPER.proc.kill()
    tts._HELPER.proc.wait()
    assert rms(synthesize("two")) > 500


def test_a_forked_process_starts_its_own_helper():
    expected = synthesize("hello world").samples
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must not talk through its parent's pipes
        try:
            os.write(w, b"1" if np.array_equal(synthesize("hello world").samples, expected) else b"0")
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"1"
    np.testing.assert_array_equal(synthesize("hello world").samples, expected)
