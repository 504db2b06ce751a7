"""``speech.features`` end to end on Ray Data: output equals a plain loop; bad clips are recorded."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.context import StageContext
from pipeline.features import FeatureSet
from pipeline.registry import Resources
from speech.features import LogMel, SSLEncoder, with_global
from speech.io import decode_audio
from speech.stages import SpeechFeaturesParams, features

from .tiny import TINY_W2V


def _tone(sr: int, seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


GOOD = {"a.wav": (16000, 1.0, 1), "b.wav": (44100, 0.5, 1), "c.wav": (8000, 0.7, 2),
        "d.flac": (22050, 0.3, 1)}
BAD = {"corrupt.wav": "corrupt or unsupported", "zero.wav": "empty file",
       "nosamples.wav": "empty clip", "silent.wav": "silent clip",
       "truncated.wav": "truncated WAV: its header promises 16000 frames (32000 bytes of samples) "
                        "but the file holds 8 frames (16 bytes)"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    for k, (name, (sr, sec, ch)) in enumerate(GOOD.items()):
        x = _tone(sr, sec, 300 + 100 * k)
        sf.write(root / name, np.stack([x, x], 1) if ch == 2 else x, sr)
    sf.write(root / "corrupt.wav", _tone(16000, 0.5, 440), 16000)
    data = (root / "corrupt.wav").read_bytes()
    (root / "corrupt.wav").write_bytes(data[:12] + b"garbage!" * 8)
    (root / "zero.wav").write_bytes(b"")
    sf.write(root / "nosamples.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "silent.wav", np.zeros(8000, np.float32), 16000)
    sf.write(root / "truncated.wav", _tone(16000, 1.0, 440), 16000, subtype="PCM_16")
    (root / "truncated.wav").write_bytes((root / "truncated.wav").read_bytes()[:44 + 16])
    with open(root / "transcripts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "text"])
        for name in [*GOOD, *BAD]:
            w.writerow([name, f"the clip {name}"])
        w.writerow(["a.wav", ""])  # an empty transcript
        w.writerow(["zero.wav", ""])  # and one of an item whose audio is rejected too
    return root


def _run(tmp_path: Path, folder: Path, **params) -> tuple[dict, Path]:
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="sf", key="k", out=out, inputs={}, resources=Resources(),
                       state_uri=str(tmp_path / "state"), log=logging.getLogger("test.sf"))
    ds = {"type": "audio_folder", "root": str(folder), "transcripts": "transcripts.csv"}
    metrics = features(ctx, SpeechFeaturesParams.model_validate({"dataset": ds, **params}))
    (out / "manifest.json").write_text(json.dumps({"metrics": metrics}))
    return metrics, out


def test_logmel_stage_equals_plain_loop_and_records_bad_clips(ray_local, tmp_path, folder):
    metrics, out = _run(tmp_path, folder, batch_size=2, actors=2)
    fs = FeatureSet(out)
    got = fs.load()
    assert sorted(got) == sorted(GOOD) and fs.dim == 80
    lm = LogMel()
    for name, (feats, boxes) in got.items():
        clip = decode_audio((folder / name).read_bytes())
        ref, ref_boxes = with_global(*lm(clip.samples))
        assert feats.shape == ref.shape and feats.dtype == np.float16
        np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=1e-3, atol=2e-2)
        np.testing.assert_allclose(boxes, ref_boxes, atol=1e-6)
        # 25 ms windows every 10 ms, no centre padding: 1 + (n - 400) // 160 frames (+ global)
        assert feats.shape[0] == 1 + 1 + (clip.samples.size - 400) // 160
        assert boxes[1, 0] == 0 and boxes[-1, 2] <= 1 and (np.diff(boxes[1:, 0]) > 0).all()

    rejected = {r["where"]: r for r in fs.rejected().to_pylist()}
    for name, reason in BAD.items():
        assert reason in rejected[name]["reason"], rejected[name]
    assert rejected["a.wav#1"]["kind"] == "text" and rejected["zero.wav#1"]["kind"] == "text"
    # zero.wav has two rows (its audio, its empty text) and is one rejected item
    assert metrics["items"] == len(GOOD) and metrics["rejected"] == len(BAD) + 1
    assert metrics["rejected_rows"] == len(BAD) + 2
    assert metrics["rejected_by_kind"] == {"media": len(BAD), "text": 2}
    assert metrics["resampled_from"] == {"8000": 1, "22050": 1, "44100": 1}
    assert metrics["audio_seconds"] == pytest.approx(2.5, abs=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("espeakng_loader") is None,
                    reason="espeak-ng is the optional extra stele[tts]")
def test_a_caption_too_long_to_keep_is_rejected_without_being_spoken(ray_local, tmp_path):
    """The stage's max_seconds reaches the synthesis in the actors: the long caption's row says it
    was not synthesised (before, it was spoken in full and then rejected as a long clip)."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")  # only listed, never read
    (tmp_path / "captions.csv").write_text("image,caption\na.png,a red apple\n"
                                           "b.png," + "a red apple on a wooden table " * 10 + "\n")
    ds = {"type": "spoken_captions",
          "base": {"type": "image_folder", "captions": str(tmp_path / "captions.csv")}}
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="sf", key="k", out=out, inputs={}, resources=Resources(),
                       state_uri=str(tmp_path / "state"), log=logging.getLogger("test.sf"))
    metrics = features(ctx, SpeechFeaturesParams.model_validate(
        {"dataset": ds, "max_seconds": 5, "actors": 1}))
    assert metrics["items"] == 1 and metrics["rejected"] == 1
    (row,) = FeatureSet(out).rejected().to_pylist()
    assert row["id"] == "b.png#0" and row["kind"] == "media"
    assert re.fullmatch(r"caption of 299 characters would speak for about 13 s at 175 words per "
                        r"minute, longer than max_seconds=5; not synthesised", row["reason"])


def test_frame_stacking_reaches_the_target_rate(ray_local, tmp_path, folder):
    metrics, out = _run(tmp_path, folder, target_rate_hz=25, global_token=False)
    assert metrics["stack"] == 4 and metrics["frame_rate_hz"] == 25 and metrics["dim"] == 320
    feats, boxes = FeatureSet(out).load(["a.wav"])["a.wav"]
    assert feats.shape == ((1 + (16000 - 400) // 160) // 4, 320)
    # a stacked frame spans its 4 windows: 3 hops + one window = 55 ms of a 1 s clip
    np.testing.assert_allclose(boxes[0], [0, 0, 0.055, 1], atol=1e-6)
    np.testing.assert_allclose(boxes[1, 0], 0.04, atol=1e-6)


def test_ssl_encoder_stage_with_random_weights_warns(ray_local, tmp_path, folder):
    metrics, out = _run(tmp_path, folder, features="ssl", encoder="wav2vec2_model",
                        encoder_config=TINY_W2V, limit=2)
    assert metrics["weights"] == "random" and any("RANDOM" in w for w in metrics["warnings"])
    feats, boxes = FeatureSet(out).load(["a.wav"])["a.wav"]
    # 20 ms frames, 25 ms receptive field: 1 + (16000 - 400) // 320 = 49 frames (+ global)
    assert feats.shape == (1 + 49, 32)
    np.testing.assert_allclose(boxes[1], [0, 0, 400 / 16000, 1], atol=1e-6)


def test_ssl_weights_file_round_trips(tmp_path):
    import torch
    from safetensors.torch import save_file

    with pytest.warns(UserWarning, match="RANDOM"):
        enc = SSLEncoder("wav2vec2_model", config=TINY_W2V)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    loaded = SSLEncoder("wav2vec2_model", weights=str(path), config=TINY_W2V)
    x = _tone(16000, 0.5, 440)
    np.testing.assert_allclose(loaded(x)[0], enc(x)[0], atol=1e-6)
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit"):
        SSLEncoder("wav2vec2_model", weights=str(tmp_path / "bad.pt"), config=TINY_W2V)
    with pytest.raises(ValueError, match="unknown encoder architecture"):
        SSLEncoder("os.system")


def test_an_image_dataset_is_refused_at_validation(tmp_path):
    with pytest.raises(ValueError, match="not audio items.*spoken_captions"):
        SpeechFeaturesParams.model_validate(
            {"dataset": {"type": "image_folder", "captions": str(tmp_path / "c.csv")}})


def test_weights_that_do_not_fit_fail_in_the_stages_words(ray_local, tmp_path, folder):
    """The actors fail to load the weights; the stage then builds the encoder in its own process,
    whose error (naming the file) is the one raised, not Ray's actor death; no shard is written."""
    import torch
    from safetensors.torch import save_file

    save_file({"nope": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors do not fit torchaudio's wav2vec2_model"):
        _run(tmp_path, folder, features="ssl", encoder="wav2vec2_model", encoder_config=TINY_W2V,
             weights=str(tmp_path / "bad.safetensors"), limit=2)
    assert not list((tmp_path / "out" / "features").glob("*.parquet"))
