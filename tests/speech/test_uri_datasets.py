"""The audio datasets read from a URI (fsspec's memory://, the code path of s3://) list the same
items, quarantine the same records (naming the URI) and load the same audio as from local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.datasets import AudioClip, build_dataset
from tests.speech.test_datasets import SPHINX, listed, save, wav_bytes, write_wav
from tests.vision.test_uri_datasets import _png


def _same(spec: dict, root: Path, memory_uri) -> list:
    uri = memory_uri(root)
    remote = {k: v.replace(str(root), uri) if isinstance(v, str) else v for k, v in spec.items()}
    got = []
    for s, fix in ((spec, lambda x: x.replace(str(root), uri)), (remote, lambda x: x)):
        ds = build_dataset(s)
        items, q = listed(ds)
        loaded = [ds.load(i.media) for i in items]
        loaded = [(c.sample_rate, c.samples.tolist()) if isinstance(c, AudioClip) else c
                  for c in loaded]
        got.append(([(i.id, i.media, i.texts, i.meta, fix(i.where)) for i in items],
                    [(fix(e["where"]), e["reason"], fix(e["text"])) for e in q.examples], loaded,
                    [fix(str(f)) for f in ds.files()]))
    assert got[0][0], "the fixture lists items"
    assert got[1] == got[0]
    return got[1][1]


def test_audio_folder_sphinx_found_in_the_folder(tmp_path: Path, memory_uri) -> None:
    root = tmp_path / "cmu"
    write_wav(root / "a.wav")
    write_wav(root / "sub" / "b.wav", freq=220)
    (root / "train.transcription").write_text(SPHINX)
    bad = _same({"type": "audio_folder", "root": str(root)}, root, memory_uri)
    assert [r for _, r, _ in bad] == ["expected '<s> text </s> (fileid)'", "audio file not found"]
    assert bad[1][0].startswith("memory://") and bad[1][0].endswith("train.transcription:4")


def test_audio_folder_csv_relative_transcripts(tmp_path: Path, memory_uri) -> None:
    root = tmp_path / "set"
    for name in ("a.wav", "b.wav"):
        write_wav(root / "clips" / name)
    (root / "meta.csv").write_text("file,text\nclips/a.wav,hello\nclips/b.wav,bye\nclips/c.wav,x\n")
    _same({"type": "audio_folder", "root": str(root), "transcripts": "meta.csv"}, root, memory_uri)


def test_hf_audio_bytes_and_arrays(tmp_path: Path, memory_uri) -> None:
    path = save(tmp_path, "raw", {"audio": [wav_bytes(freq=300), wav_bytes(freq=600)],
                                  "text": ["a", "b"]})
    _same({"type": "hf_audio", "path": path}, Path(path), memory_uri)
    a = np.linspace(-0.5, 0.5, 80, dtype=np.float32)
    path = save(tmp_path, "arrays", {"audio": [a], "sampling_rate": [8000], "text": ["x"]})
    _same({"type": "hf_audio", "path": path}, Path(path), memory_uri)


def test_spoken_captions_base_on_a_uri_lists_like_a_local_one(tmp_path: Path, memory_uri) -> None:
    root = tmp_path / "img"
    _png(root / "a.png")
    (root / "c.csv").write_text("image,caption\na.png,a red square\n")
    uri = memory_uri(root)
    local = build_dataset({"type": "spoken_captions",
                           "base": {"type": "image_folder", "captions": str(root / "c.csv")}})
    remote = build_dataset({"type": "spoken_captions",
                            "base": {"type": "image_folder", "captions": f"{uri}/c.csv"}})
    assert [str(f) for f in remote.files()] == [f"{uri}/c.csv"]
    assert remote.fingerprint()["base"] != local.fingerprint()["base"]
