"""The image datasets read from a URI (fsspec's memory://, the code path of s3://) list the same
items, quarantine the same records (naming the URI) and load the same bytes as from local files."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

import vision.datasets  # noqa: F401 - registers the image datasets
from pipeline.datasets import DatasetError, build_dataset
from pipeline.quarantine import Quarantine
from tests.vision.test_datasets import _coco, _emoji, _png, _sent


def _view(spec: dict, swap: tuple[str, str] | None = None):
    """Items (with where), the quarantined records, each item's loaded bytes and the dataset;
    ``swap`` = (local root, URI) is replaced in the local run's strings to compare them."""
    ds = build_dataset(spec)
    q = Quarantine(ds.type, "skip")
    items = list(ds.items(q))
    fix = (lambda s: s.replace(*swap)) if swap else (lambda s: s)
    listed = [(i.id, i.media, i.texts, i.meta, fix(i.where)) for i in items]
    bad = [(fix(e["where"]), e["reason"], fix(e["text"])) for e in q.examples]
    return listed, bad, [ds.load(i.media) for i in items], ds


def _same(spec: dict, root: Path, memory_uri) -> list:
    """The dataset on ``root`` and on a memory:// copy of it: same items, quarantine and bytes."""
    uri = memory_uri(root)
    remote = {k: v.replace(str(root), uri) if isinstance(v, str) else v for k, v in spec.items()}
    assert remote != spec
    local_view = _view(spec, (str(root), uri))
    remote_view = _view(remote)
    assert remote_view[:3] == local_view[:3]
    ds = remote_view[3]
    assert [str(f) for f in ds.files()] == [str(f).replace(str(root), uri)
                                            for f in local_view[3].files()]
    assert ds.fingerprint() == ds.fingerprint() != local_view[3].fingerprint()
    assert local_view[0], "the fixture lists items"
    return remote_view[1]


def test_image_folder(tmp_path: Path, memory_uri) -> None:
    root = tmp_path / "set"
    _png(root / "a.png")
    _png(root / "sub" / "b.png", "blue")
    (root / "captions.csv").write_bytes(b'image,caption,license\na.png,  A red square.  ,cc0\n'
                                        b'sub/b.png,"A blue one, small",by\n./a.png,"two\nlines",x\n'
                                        b'gone.png,missing,x\na.png,\xff bad,x\n')
    bad = _same({"type": "image_folder", "captions": str(root / "captions.csv")}, root, memory_uri)
    assert [r for _, r, _ in bad] == ["image file not found",
                                      "undecodable bytes (invalid start byte at byte 6)"]
    assert bad[0][0].startswith("memory://") and bad[0][0].endswith("captions.csv:6")
    (root / "caps.jsonl").write_text(json.dumps({"file": "sub/b.png", "captions": ["x", "y"]}) + "\n")
    _same({"type": "image_folder", "captions": str(root / "caps.jsonl"), "root": str(root),
           "image_column": "file", "caption_column": "captions"}, root, memory_uri)
    (root / "flickr.txt").write_text("image,caption\na.png,A dog.\n")  # no suffix: sniffed
    _same({"type": "image_folder", "captions": str(root / "flickr.txt")}, root, memory_uri)


def test_coco_default_images_folder(tmp_path: Path, memory_uri) -> None:
    ann = _coco(tmp_path / "coco")
    bad = _same({"type": "coco", "annotations": str(ann)}, tmp_path / "coco", memory_uri)
    assert ("image file not found" in [r for _, r, _ in bad])
    uri = memory_uri(tmp_path / "coco")
    ds = build_dataset({"type": "coco", "annotations": f"{uri}/annotations/captions_val2017.json"})
    assert ds.images == f"{uri}/val2017"  # derived on the URI, kept as one


def test_karpathy(tmp_path: Path, memory_uri) -> None:
    root = tmp_path / "k"
    for name in ("1.jpg", "2.jpg"):
        _png(root / "flickr30k-images" / name)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "train", "imgid": 0, "sentences": [_sent("A dog runs.")]},
        {"filename": "2.jpg", "split": "test", "imgid": 1, "sentences": [_sent("A cat.")]},
        {"filename": "4.jpg", "split": "train", "imgid": 3, "sentences": [_sent("Gone.")]}]}))
    _same({"type": "karpathy", "path": str(root / "dataset_flickr30k.json"),
           "images": str(root / "flickr30k-images")}, root, memory_uri)


def test_emoji(tmp_path: Path, memory_uri) -> None:
    root = _emoji(tmp_path)
    bad = _same({"type": "emoji", "path": str(root), "texts": "name+short_names"}, root,
                memory_uri)
    assert "image file not found" in [r for _, r, _ in bad]


def test_hf_images_save_to_disk(tmp_path: Path, memory_uri) -> None:
    raw = [_png(tmp_path / n, c).read_bytes() for n, c in (("a.png", "red"), ("b.png", "blue"))]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"png": raw, "text": [["one", "uno"], ["two"]], "key": ["k1", "k2"]})}).save_to_disk(
        str(tmp_path / "dd"))
    _same({"type": "hf_images", "path": str(tmp_path / "dd"), "image_column": "png",
           "id_column": "key"}, tmp_path / "dd", memory_uri)
    with pytest.raises(DatasetError, match="no such save_to_disk folder"):
        list(build_dataset({"type": "hf_images", "path": "memory://nowhere/dd"}).items(
            Quarantine("x")))


def test_missing_remote_folders_and_files(memory_uri, tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("image,caption\n")
    uri = memory_uri(tmp_path / "c.csv")
    with pytest.raises(DatasetError, match=r"memory://.*/nope: no such images folder"):
        list(build_dataset({"type": "image_folder", "captions": uri,
                            "root": uri.replace("c.csv", "nope")}).items(Quarantine("x")))
    with pytest.raises(OSError, match=r"cannot read image memory://.*/gone\.png"):
        build_dataset({"type": "image_folder", "captions": uri}).load("gone.png")
