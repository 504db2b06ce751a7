"""speech.datasets: audio_folder, hf_audio, spoken_captions on tiny fixtures written here, plus the real
CMU Sphinx recordings of the shared data folder when STELE_DATA points at it."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from pipeline.datasets import (DATASETS, AudioClip, DatasetError, Item, MediaDataset, build_dataset,
                               dataset)
from pipeline.errors import StageFailed
from pipeline.quarantine import Quarantine
from speech import tts
from speech.datasets import AudioFolder, HFAudio, SpokenCaptions

needs_espeak = pytest.mark.skipif(importlib.util.find_spec("espeakng_loader") is None,
                                  reason="espeak-ng is the optional extra stele[tts]")


def wav_bytes(seconds: float = 0.2, sr: int = 16000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def write_wav(path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(**kw))
    return path


def listed(ds: MediaDataset, on_error: str = "skip") -> tuple[list[Item], Quarantine]:
    q = Quarantine(ds.type, on_error)
    return list(ds.items(q)), q


def test_registered_through_the_entry_point_group():
    names = DATASETS.all()
    assert {"audio_folder", "hf_audio", "spoken_captions"} <= set(names)
    assert all(names[n].modality == "audio" for n in ("audio_folder", "hf_audio", "spoken_captions"))


# ---------------------------------------------------------------- audio_folder: CMU Sphinx

SPHINX = """<s> hello world </s> (a)
good morning (sub/b)
a line without a file id
<s> nobody recorded this </s> (missing)
<s>  </s> (a)
"""


@pytest.fixture
def sphinx_folder(tmp_path: Path) -> Path:
    write_wav(tmp_path / "a.wav")
    write_wav(tmp_path / "sub" / "b.wav", freq=220)
    (tmp_path / "train.transcription").write_text(SPHINX)
    return tmp_path


def test_sphinx_transcription(sphinx_folder: Path):
    ds = build_dataset({"type": "audio_folder", "root": str(sphinx_folder)})
    items, q = listed(ds)
    path = sphinx_folder / "train.transcription"
    assert [(i.id, i.media, i.texts) for i in items] == [
        ("a", "a.wav", ["hello world", ""]),  # the empty transcript stays: the stage records it
        ("sub/b", "sub/b.wav", ["good morning"])]
    assert items[0].where == f"{path}:1"
    assert [(e["where"], e["reason"]) for e in q.examples] == [
        (f"{path}:3", "expected '<s> text </s> (fileid)'"),
        (f"{path}:4", "audio file not found")]
    assert ds.load("sub/b.wav") == (sphinx_folder / "sub" / "b.wav").read_bytes()
    assert ds.files() == [path]


def test_sphinx_on_error_raise_names_file_and_line(sphinx_folder: Path):
    ds = AudioFolder(root=str(sphinx_folder), transcripts="train.transcription")
    with pytest.raises(StageFailed, match=re.escape(f"{sphinx_folder / 'train.transcription'}:3")):
        listed(ds, on_error="raise")


def test_sphinx_file_is_found_only_when_unambiguous(tmp_path: Path):
    with pytest.raises(DatasetError, match="found 0 Sphinx transcription files"):
        listed(AudioFolder(root=str(tmp_path)))
    (tmp_path / "transcription").write_text("")
    (tmp_path / "other.transcription").write_text("")
    with pytest.raises(DatasetError, match="found 2 .*; set transcripts"):
        listed(AudioFolder(root=str(tmp_path)))
    with pytest.raises(DatasetError, match="no such audio folder"):
        listed(AudioFolder(root=str(tmp_path / "nope")))


def test_missing_audio_file_fails_to_load(tmp_path: Path):
    with pytest.raises(OSError, match="cannot read audio"):
        AudioFolder(root=str(tmp_path)).load("gone.wav")


# ---------------------------------------------------------------- audio_folder: CSV, TSV, JSONL

def test_csv_transcripts(tmp_path: Path):
    for name in ("a.wav", "b.wav"):
        write_wav(tmp_path / "clips" / name)
    (tmp_path / "meta.csv").write_text(
        "file,speaker,text\n"
        "clips/a.wav,s1,hello there\n"
        "clips/a.wav,s1,hi again\n"
        'clips/b.wav,s2,"quoted, with a comma"\n'
        "clips/b.wav,s2\n"
        "clips/c.wav,s3,no such clip\n")
    ds = AudioFolder(root=str(tmp_path), transcripts="meta.csv")
    items, q = listed(ds)
    assert [(i.id, i.texts) for i in items] == [("clips/a.wav", ["hello there", "hi again"]),
                                                ("clips/b.wav", ["quoted, with a comma"])]
    csv_path = tmp_path / "meta.csv"
    assert [(e["where"], e["reason"]) for e in q.examples] == [
        (f"{csv_path}:5", "expected 3 columns, found 2"),
        (f"{csv_path}:6", "audio file not found")]
    with pytest.raises(StageFailed, match=re.escape(f"{csv_path}:5: expected 3 columns")):
        listed(ds, on_error="raise")


def test_split_column_is_the_item_s_split(tmp_path: Path):
    for name in ("a.wav", "b.wav"):
        write_wav(tmp_path / name)
    (tmp_path / "t.csv").write_text("file,text,split,speaker\n"
                                    "a.wav,hello,train,s1\n"
                                    "b.wav,bye,test,s2\n"
                                    "b.wav,bye again,train,s2\n")
    items, q = listed(AudioFolder(root=str(tmp_path), transcripts="t.csv"))
    assert [(i.id, i.texts, i.meta) for i in items] == [("a.wav", ["hello"], {"split": "train"}),
                                                        ("b.wav", ["bye"], {"split": "test"})]
    assert [(e["where"], e["reason"]) for e in q.examples] == [
        (f"{tmp_path / 't.csv'}:4", f"split 'train' differs from 'test' given for this file at "
                                    f"{tmp_path / 't.csv'}:3")]
    (tmp_path / "u.jsonl").write_text('{"file": "a.wav", "text": ["one", "two"], "split": "val"}\n')
    items, _ = listed(AudioFolder(root=str(tmp_path), transcripts="u.jsonl"))
    assert [(i.texts, i.meta) for i in items] == [(["one", "two"], {"split": "val"})]


def test_tsv_with_other_column_names(tmp_path: Path):
    write_wav(tmp_path / "x.wav")
    (tmp_path / "t.tsv").write_text("path\tsentence\nx.wav\tone two\n")
    ds = AudioFolder(root=str(tmp_path), transcripts=str(tmp_path / "t.tsv"),
                     file_column="path", text_column="sentence")
    assert [(i.id, i.texts) for i in listed(ds)[0]] == [("x.wav", ["one two"])]
    with pytest.raises(DatasetError, match=r"t.tsv:1: header has no column 'file'"):
        listed(AudioFolder(root=str(tmp_path), transcripts="t.tsv"))


def test_jsonl_transcripts(tmp_path: Path):
    write_wav(tmp_path / "a.wav")
    lines = [json.dumps({"file": "a.wav", "text": ["hello", "hallo"]}), "{not json",
             json.dumps(["a list"]), json.dumps({"file": "a.wav"}),
             json.dumps({"file": "a.wav", "text": 3}), json.dumps({"file": "b.wav", "text": "x"})]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    items, q = listed(AudioFolder(root=str(tmp_path), transcripts="t.jsonl"))
    assert [(i.id, i.texts) for i in items] == [("a.wav", ["hello", "hallo"])]
    path = tmp_path / "t.jsonl"
    assert [(e["where"], e["reason"]) for e in q.examples] == [
        (f"{path}:2", "malformed JSON (Expecting property name enclosed in double quotes)"),
        (f"{path}:3", "expected a JSON object"),
        (f"{path}:4", "missing field 'text'"),
        (f"{path}:5", "field 'text' must be a string or a list of strings"),
        (f"{path}:6", "audio file not found")]


def test_unknown_transcript_suffix_asks_for_format(tmp_path: Path):
    (tmp_path / "t.dat").write_text("")
    with pytest.raises(DatasetError, match="set format"):
        listed(AudioFolder(root=str(tmp_path), transcripts="t.dat"))


# ---------------------------------------------------------------- hf_audio

def save(tmp_path: Path, name: str, columns: dict, features=None) -> str:
    import datasets

    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.save_to_disk(str(tmp_path / name))
    return str(tmp_path / name)


def test_hf_audio_arrays_with_a_rate_column(tmp_path: Path):
    a, b = np.linspace(-0.5, 0.5, 800, dtype=np.float32), np.full(400, 0.25, np.float32)
    path = save(tmp_path, "arrays", {"audio": [a, b], "sampling_rate": [16000, 8000],
                                     "text": [["one", "uno"], ["two"]], "key": ["k1", "k2"]})
    ds = HFAudio(path=path, id_column="key")
    items, q = listed(ds)
    assert [(i.id, i.media, i.texts, i.where) for i in items] == [
        ("k1", "0", ["one", "uno"], f"{path} row 0"), ("k2", "1", ["two"], f"{path} row 1")]
    clip = ds.load("1")
    assert isinstance(clip, AudioClip) and clip.sample_rate == 8000
    np.testing.assert_array_equal(clip.samples, b)


def test_hf_audio_arrays_need_a_rate(tmp_path: Path):
    path = save(tmp_path, "norate", {"audio": [np.zeros(10, np.float32)], "text": ["x"]})
    with pytest.raises(DatasetError, match="give their rate with sampling_rate"):
        listed(HFAudio(path=path))
    ds = HFAudio(path=path, sampling_rate=22050)
    assert listed(ds)[0][0].texts == ["x"]
    assert ds.load("0").sample_rate == 22050


def test_hf_audio_bytes_struct_and_audio_feature(tmp_path: Path):
    import datasets

    w1, w2 = wav_bytes(freq=300), wav_bytes(freq=600)
    raw = HFAudio(path=save(tmp_path, "raw", {"audio": [w1, w2], "text": ["a", "b"]}))
    assert raw.load("1") == w2
    struct = HFAudio(path=save(tmp_path, "struct", {"audio": [{"bytes": w1, "path": None}],
                                                     "text": ["a"]}))
    assert struct.load("0") == w1
    # An Audio() feature (as Hub audio sets store it) is read undecoded: no torchcodec needed.
    feat = datasets.Dataset.from_dict({"audio": [{"bytes": w2, "path": "b.wav"}], "text": ["b"]})
    feat = feat.cast_column("audio", datasets.Audio())
    feat.save_to_disk(str(tmp_path / "feature"))
    ds = HFAudio(path=str(tmp_path / "feature"))
    assert listed(ds)[0][0].texts == ["b"]
    assert ds.load("0") == w2


def test_hf_audio_bad_rows_and_columns(tmp_path: Path):
    path = save(tmp_path, "bad", {"audio": [wav_bytes(), None], "text": ["fine", None],
                                  "n": [1, 2]})
    ds = HFAudio(path=path)
    items, q = listed(ds)
    assert [i.id for i in items] == ["0"]
    assert q.examples[0]["where"] == f"{path} row 1"
    with pytest.raises(StageFailed, match=re.escape(f"{path} row 1: column 'text' must be")):
        listed(ds, on_error="raise")
    with pytest.raises(ValueError, match="row 1: no audio"):
        ds.load("1")
    with pytest.raises(DatasetError, match="column 'n' is .* not audio"):
        listed(HFAudio(path=path, audio_column="n"))
    with pytest.raises(DatasetError, match="no column 'caption'"):
        listed(HFAudio(path=path, text_column="caption"))


def test_hf_audio_splits_and_hub_names(tmp_path: Path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"audio": [wav_bytes()], "text": ["t"]}),
        "test": datasets.Dataset.from_dict({"audio": [wav_bytes()], "text": ["u"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match="choose a split"):
        listed(HFAudio(path=str(tmp_path / "dd")))
    assert listed(HFAudio(path=str(tmp_path / "dd"), split="test"))[0][0].texts == ["u"]
    assert listed(HFAudio(path=str(tmp_path / "dd"), split="test"))[0][0].meta == {"split": "test"}
    with pytest.raises(DatasetError, match="HF_HUB_OFFLINE=1"):
        listed(HFAudio(path="someone/some-audio-set"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a save_to_disk folder"):
        listed(HFAudio(path=str(tmp_path / "plain")))


def test_hf_audio_pickles_as_its_parameters(tmp_path: Path):
    path = save(tmp_path, "p", {"audio": [wav_bytes()], "text": ["x"]})
    ds = HFAudio(path=path)
    ds.load("0")  # opens and caches the table
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._rows is None and copy == HFAudio(path=path)
    assert copy.load("0") == ds.load("0")


# ---------------------------------------------------------------- spoken_captions

@dataset("fake_captioned_images")
class FakeCaptionedImages(MediaDataset):
    """Three images: two captions, one empty caption, none."""

    modality: ClassVar[str] = "image"
    path: str

    def items(self, q: Quarantine) -> Iterator[Item]:
        yield Item(id="img0", media="0.png", texts=["a red apple", "an apple on a table"],
                   meta={"category": "food", "base_id": "not me"}, where=f"{self.path}:1")
        yield Item(id="img1", media="1.png", texts=[""], where=f"{self.path}:2")
        yield Item(id="img2", media="2.png", texts=[], where=f"{self.path}:3")

    def load(self, media: str) -> bytes:
        return b"\x89PNG"

    def files(self) -> list[Path]:
        return [Path(self.path)]


@pytest.fixture
def base_spec(tmp_path: Path) -> dict:
    (tmp_path / "captions.txt").write_text("fake")
    return {"type": "fake_captioned_images", "path": str(tmp_path / "captions.txt")}


@needs_espeak
def test_spoken_captions_items_and_join_keys(base_spec: dict):
    ds = build_dataset({"type": "spoken_captions", "base": base_spec})
    items, q = listed(ds)
    assert [(i.id, i.texts) for i in items] == [("img0#0", ["a red apple"]),
                                                ("img0#1", ["an apple on a table"]),
                                                ("img1#0", [""])]
    assert items[1].meta == {"category": "food", "base_id": "img0", "base_media": "0.png",
                             "base_type": "fake_captioned_images"}
    assert items[0].where == f"{base_spec['path']}:1"
    assert [(e["where"], e["reason"]) for e in q.examples] == [(f"{base_spec['path']}:3",
                                                                "no caption to speak")]
    first, _ = listed(SpokenCaptions(base=base_spec, captions="first"))
    assert [i.id for i in first] == ["img0#0", "img1#0"]


@needs_espeak
def test_spoken_captions_load_synthesises_speech(base_spec: dict):
    ds = SpokenCaptions(base=base_spec, voice="en-gb", rate=160, seed=3, jitter=0.1)
    items, _ = listed(ds)
    clip = ds.load(items[0].media)
    assert isinstance(clip, AudioClip) and clip.sample_rate == 22050
    assert np.sqrt(np.mean(clip.samples.astype(np.float64) ** 2)) > 500
    expected = tts.synthesize("a red apple", voice="en-gb", rate=160, seed=3, jitter=0.1)
    np.testing.assert_array_equal(clip.samples, expected.samples)
    # what a Ray worker receives: the parameters, and the same speech from them
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds)).load(items[0].media).samples,
                                  clip.samples)
    with pytest.raises(ValueError, match="empty caption, nothing to synthesise"):
        ds.load(items[2].media)


def test_spoken_captions_refuses_an_overlong_caption_before_speaking_it(base_spec: dict, monkeypatch):
    """The issue's caption, far longer than any clip the stage keeps: with the stage's limit it is
    refused from its length, and espeak-ng is never asked."""
    def no_synthesis(request: dict) -> None:
        raise AssertionError(f"synthesised {len(request.get('text', ''))} characters")

    monkeypatch.setattr(tts, "_ask", no_synthesis)
    ds = SpokenCaptions(base=base_spec)
    media = json.dumps(["a red apple on a table " * 4348, 0, "img0"])
    with pytest.raises(ValueError, match=r"^caption of 100004 characters would speak for about \d+ s at "
                                         r"175 words per minute, longer than max_seconds=600; "
                                         r"not synthesised$"):
        ds.load(media, max_seconds=600)


@needs_espeak
def test_spoken_captions_unknown_voice_fails_the_listing(base_spec: dict):
    with pytest.raises(DatasetError, match="unknown espeak-ng voice 'klingonese'"):
        listed(SpokenCaptions(base=base_spec, voice="klingonese"))


def test_spoken_captions_without_espeak_names_the_extra(base_spec: dict, monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails as if not installed
    monkeypatch.setattr(tts, "_HELPER", None)
    with pytest.raises(DatasetError, match=re.escape("pip install 'stele[tts]'")):
        listed(SpokenCaptions(base=base_spec))


def test_spoken_captions_spec_errors_name_the_base():
    with pytest.raises(ValidationError, match="base: unknown media dataset 'nope'"):
        SpokenCaptions(base={"type": "nope"})
    with pytest.raises(ValidationError, match="base.path: Field required"):
        SpokenCaptions(base={"type": "fake_captioned_images"})
    with pytest.raises(ValidationError):
        SpokenCaptions(base={"type": "fake_captioned_images", "path": "x"}, rate=10)


def test_spoken_captions_files_and_fingerprint_follow_the_base(base_spec: dict):
    ds = SpokenCaptions(base=base_spec)
    assert ds.files() == [Path(base_spec["path"])]
    before = ds.fingerprint()
    Path(base_spec["path"]).write_text("fake, edited")
    after = ds.fingerprint()
    assert before["base"] != after["base"]
    assert set(after) == {"base", "espeakng-loader"}


@needs_espeak
def test_spoken_captions_over_image_folder(tmp_path: Path):
    if "image_folder" not in DATASETS.all():
        pytest.skip("vision's image_folder is not registered")
    (tmp_path / "dog.png").write_bytes(b"\x89PNG")
    (tmp_path / "captions.csv").write_text("image,caption\ndog.png,a dog runs\n")
    ds = SpokenCaptions(base={"type": "image_folder", "captions": str(tmp_path / "captions.csv")})
    items, _ = listed(ds)
    assert [(i.id, i.meta["base_media"], i.meta["base_type"]) for i in items] == [
        ("dog.png#0", "dog.png", "image_folder")]
    assert ds.load(items[0].media).samples.size > 0


# ---------------------------------------------------------------- the real recordings

@pytest.fixture
def speech_data() -> Path:
    root = os.environ.get("STELE_DATA")
    if not root:
        pytest.skip("STELE_DATA is not set (the shared real-data folder)")
    return Path(root) / "speech"


@pytest.mark.parametrize("subset, first", [
    ("librivox", "and mister john dashwood had then leisure to consider how much there might be "
                 "prudently in his power to do for them"),
    ("cards", "ten of clubs")])
def test_real_cmu_sphinx_sets(speech_data: Path, subset: str, first: str):
    ds = AudioFolder(root=str(speech_data / subset))
    items, q = listed(ds, on_error="raise")
    assert len(items) == 5 and q.count == 0
    assert items[0].texts == [first]
    for item in items:
        samples, sr = sf.read(io.BytesIO(ds.load(item.media)))
        assert sr == 16000 and len(samples) / sr > 1.0


@needs_espeak
def test_real_cards_spoken(speech_data: Path):
    ds = SpokenCaptions(base={"type": "audio_folder", "root": str(speech_data / "cards")})
    items, _ = listed(ds, on_error="raise")
    assert items[4].id == "005#0" and items[4].meta["base_media"] == "005.wav"
    long, short = ds.load(items[4].media), ds.load(items[0].media)  # 8 words vs 3
    assert len(long.samples) > 1.5 * len(short.samples)
