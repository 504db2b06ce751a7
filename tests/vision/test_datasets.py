"""The image datasets on tiny fixtures in their real formats, and on the shared emoji data."""

from __future__ import annotations

import io
import json
import os
import pickle
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image
from pydantic import ValidationError

import vision.datasets  # noqa: F401 - registers the image datasets
from pipeline.datasets import DATASETS, DatasetError, build_dataset
from pipeline.errors import StageFailed
from pipeline.quarantine import Quarantine

IMAGE_DATASETS = ["image_folder", "coco", "karpathy", "hf_images", "emoji"]


def _png(path: Path, color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), color).save(path)
    return path


def _list(ds, q: Quarantine | None = None):
    q = q or Quarantine(ds.type, ds.on_error)
    return list(ds.items(q)), q


def _opens(data: bytes) -> tuple[int, int]:
    assert isinstance(data, bytes)
    return Image.open(io.BytesIO(data)).size


def _where(q: Quarantine) -> list[tuple[str, str]]:
    return [(e["where"], e["reason"]) for e in q.summary()["examples"]]


# image_folder

def test_image_folder_csv_groups_captions_and_keeps_meta(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.png", "blue")
    cap = tmp_path / "captions.csv"
    cap.write_text('image,caption,license\n'
                   'a.png,  A red square.  ,cc0\n'
                   'sub/b.png,"A blue one, small",by\n'
                   './a.png,"two\nlines",other\n'
                   'a.png,,cc0\n')
    ds = build_dataset({"type": "image_folder", "captions": str(cap)})
    items, q = _list(ds)
    assert [(i.id, i.texts, i.meta) for i in items] == [
        ("a.png", ["A red square.", "two\nlines", ""], {"license": "cc0"}),
        ("sub/b.png", ["A blue one, small"], {"license": "by"}),
    ]
    assert [i.where for i in items] == [f"{cap}:2", f"{cap}:3"]
    assert _opens(ds.load(items[1].media)) == (4, 3)
    assert q.count == 0 and ds.files() == [cap]


def test_image_folder_split_column_and_a_row_that_contradicts_it(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    cap = tmp_path / "captions.csv"
    cap.write_text("image,caption,split\n"
                   "a.png,A one.,train\n"
                   "b.png,A two., test \n"
                   "a.png,A one again.,train\n"
                   "a.png,A one in test?,test\n"
                   "c.png,No split.,\n")
    items, q = _list(build_dataset({"type": "image_folder", "captions": str(cap)}))
    assert [(i.id, i.texts, i.meta) for i in items] == [
        ("a.png", ["A one.", "A one again."], {"split": "train"}),
        ("b.png", ["A two."], {"split": " test "}),   # fusion.splits.own_split strips it
        ("c.png", ["No split."], {"split": ""})]      # and reads an empty one as none
    assert _where(q) == [(f"{cap}:5", f"split 'test' differs from 'train' given for this file at "
                                      f"{cap}:2")]


def test_image_folder_tsv_and_jsonl_with_custom_columns_and_root(tmp_path):
    _png(tmp_path / "imgs" / "x.png")
    tsv = tmp_path / "meta" / "caps.tsv"
    tsv.parent.mkdir()
    tsv.write_text('file\ttext\nx.png\tsays "hi"\n')
    ds = build_dataset({"type": "image_folder", "captions": str(tsv),
                        "root": str(tmp_path / "imgs"), "image_column": "file",
                        "caption_column": "text"})
    assert [(i.id, i.texts) for i in _list(ds)[0]] == [("x.png", ['says "hi"'])]

    jl = tmp_path / "caps.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"file": "imgs/x.png", "captions": ["one", " two "], "source": "web"},
        {"file": "imgs/x.png", "captions": "three"}]) + "\n\n")
    ds = build_dataset({"type": "image_folder", "captions": str(jl), "image_column": "file",
                        "caption_column": "captions"})
    items, _ = _list(ds)
    assert [(i.id, i.texts, i.meta) for i in items] == [
        ("imgs/x.png", ["one", "two", "three"], {"source": "web"})]
    assert _opens(ds.load(items[0].media)) == (4, 3)


def test_image_folder_bad_rows_go_to_quarantine_with_file_and_line(tmp_path):
    _png(tmp_path / "a.png")
    cap = tmp_path / "c.csv"
    cap.write_bytes(b"image,caption\n"
                    b"a.png,ok\n"
                    b"a.png,too,many\n"
                    b"gone.png,missing\n"
                    b",no image\n"
                    b"a.png,\xff bad utf-8\n"
                    b"gone.png,again\n")
    items, q = _list(build_dataset({"type": "image_folder", "captions": str(cap)}))
    assert [(i.id, i.texts) for i in items] == [("a.png", ["ok"])]
    assert _where(q) == [(f"{cap}:3", "expected 2 columns, found 3"),
                         (f"{cap}:4", "image file not found"),
                         (f"{cap}:5", "empty 'image'"),
                         (f"{cap}:6", "undecodable bytes (invalid start byte at byte 6)"),
                         (f"{cap}:7", "image file not found")]

    jl = tmp_path / "c.jsonl"
    jl.write_text('{"image": "a.png", "caption": "ok"}\n{"image": "a.png"\n[1]\n'
                  '{"image": "a.png"}\n{"image": "a.png", "caption": 3}\n')
    items, q = _list(build_dataset({"type": "image_folder", "captions": str(jl)}))
    assert len(items) == 1
    assert _where(q) == [(f"{jl}:2", "malformed JSON (Expecting ',' delimiter)"),
                         (f"{jl}:3", "expected a JSON object"),
                         (f"{jl}:4", "missing field 'caption'"),
                         (f"{jl}:5", "field 'caption' must be a string or a list of strings")]

    with pytest.raises(StageFailed, match=rf"{cap}:3: expected 2 columns"):
        _list(build_dataset({"type": "image_folder", "captions": str(cap), "on_error": "raise"}))


def test_image_folder_unusable_files(tmp_path):
    cap = tmp_path / "c.csv"
    cap.write_text("file,text\n")
    with pytest.raises(DatasetError, match=r"c\.csv:1: header has no column 'image', 'caption'"):
        _list(build_dataset({"type": "image_folder", "captions": str(cap)}))
    with pytest.raises(DatasetError, match="no such captions file"):
        _list(build_dataset({"type": "image_folder", "captions": str(tmp_path / "none.csv")}))
    ds = build_dataset({"type": "image_folder", "captions": str(cap)})
    with pytest.raises(OSError, match=r"cannot read image .*gone\.png"):
        ds.load("gone.png")


# coco

def _coco(tmp_path: Path) -> Path:
    _png(tmp_path / "val2017" / "000000000009.jpg")
    _png(tmp_path / "val2017" / "000000000025.jpg")
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({
        "images": [{"id": 9, "file_name": "000000000009.jpg", "width": 4, "height": 3},
                   {"id": 25, "file_name": "000000000025.jpg", "width": 4, "height": 3},
                   {"id": 30, "file_name": "000000000030.jpg", "width": 4, "height": 3},
                   {"id": 9, "file_name": "copy.jpg"},
                   {"file_name": "no_id.jpg"}],
        "annotations": [{"image_id": 9, "id": 1, "caption": "Bins of food. "},
                        {"image_id": 25, "id": 2, "caption": "A giraffe."},
                        {"image_id": 9, "id": 3, "caption": "Food in boxes."},
                        {"image_id": 77, "id": 4, "caption": "Orphan."}]}))
    return ann


def test_coco_captions_per_image_default_images_folder(tmp_path):
    ann = _coco(tmp_path)
    ds = build_dataset({"type": "coco", "annotations": str(ann)})
    assert ds.images == str(tmp_path / "val2017") and ds.files() == [ann]
    items, q = _list(ds)
    assert [(i.id, i.texts, i.meta) for i in items] == [
        ("000000000009.jpg", ["Bins of food.", "Food in boxes."],
         {"image_id": 9, "width": 4, "height": 3, "split": "val"}),   # captions_val2017.json
        ("000000000025.jpg", ["A giraffe."], {"image_id": 25, "width": 4, "height": 3, "split": "val"})]
    assert _opens(ds.load(items[0].media)) == (4, 3)
    assert _where(q) == [(f"{ann} annotations[3]", "unknown image id 77"),
                         (f"{ann} images[2]", "image file not found"),
                         (f"{ann} images[3]", "duplicate id"),
                         (f"{ann} images[4]", "expected an object with 'id' and 'file_name'")]
    with pytest.raises(StageFailed, match=r"annotations\[3\]: unknown image id 77"):
        _list(build_dataset({"type": "coco", "annotations": str(ann), "on_error": "raise"}))


def test_coco_split_comes_from_the_annotation_file_name(tmp_path):
    ann = _coco(tmp_path)
    for name, split in (("captions_train2017.json", "train"), ("captions_val2014.json", "val"),
                        ("image_info_test2017.json", "test"), ("captions_trainval.json", None)):
        ds = build_dataset({"type": "coco", "annotations": str(ann.parent / name),
                            "images": str(tmp_path / "val2017")})
        assert ds.file_split() == split, name
    # the listing changed (items carry the split): not the key of a listing made before
    ds = build_dataset({"type": "coco", "annotations": str(ann)})
    assert ds.fingerprint()["listing"] == 2


def test_coco_explicit_images_and_unusable_files(tmp_path):
    ann = _coco(tmp_path)
    odd = tmp_path / "caps.json"
    odd.write_text(ann.read_text())
    with pytest.raises(ValidationError, match="set images"):
        build_dataset({"type": "coco", "annotations": str(odd)})
    items, _ = _list(build_dataset({"type": "coco", "annotations": str(odd),
                                    "images": str(tmp_path / "val2017")}))
    assert len(items) == 2 and all("split" not in i.meta for i in items)  # the name gives none
    odd.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"caps\.json:2:12: malformed JSON"):
        _list(build_dataset({"type": "coco", "annotations": str(odd), "images": str(tmp_path)}))
    with pytest.raises(DatasetError, match="no such images folder"):
        _list(build_dataset({"type": "coco", "annotations": str(ann),
                             "images": str(tmp_path / "nope")}))


# karpathy

def _sent(raw: str) -> dict:
    return {"raw": raw, "tokens": raw.lower().rstrip(".").split()}


def test_karpathy_flickr_splits_and_texts(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        _png(tmp_path / "flickr30k-images" / name)
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": "1.jpg", "split": "train", "imgid": 0, "sentids": [0, 1],
         "sentences": [_sent("A dog runs."), _sent(" Two dogs. ")]},
        {"filename": "2.jpg", "split": "test", "imgid": 1, "sentences": [_sent("A cat.")]},
        {"filename": "3.jpg", "split": "val", "imgid": 2, "sentences": [{"tokens": ["x"]}]},
        {"filename": "4.jpg", "split": "train", "imgid": 3, "sentences": [_sent("Gone.")]},
        {"filename": "1.jpg", "split": "train", "imgid": 4, "sentences": []}]}))
    spec = {"type": "karpathy", "path": str(path), "images": str(tmp_path / "flickr30k-images")}
    ds = build_dataset(spec)
    items, q = _list(ds)
    assert [(i.id, i.texts, i.meta) for i in items] == [
        ("1.jpg", ["A dog runs.", "Two dogs."], {"split": "train", "imgid": 0}),
        ("2.jpg", ["A cat."], {"split": "test", "imgid": 1})]
    assert _opens(ds.load("2.jpg")) == (4, 3)
    assert _where(q) == [(f"{path} images[2]", "a sentence without 'raw'"),
                         (f"{path} images[3]", "image file not found"),
                         (f"{path} images[4]", "duplicate id")]
    items, _ = _list(build_dataset({**spec, "split": "test", "text": "tokens"}))
    assert [(i.id, i.texts) for i in items] == [("2.jpg", ["a cat"])]
    with pytest.raises(StageFailed, match=r"images\[2\]: a sentence without 'raw'"):
        _list(build_dataset({**spec, "on_error": "raise"}))
    with pytest.raises(ValidationError):
        build_dataset({**spec, "split": "dev"})
    with pytest.raises(ValidationError, match="set restval: keep"):
        build_dataset({**spec, "split": ["val", "restval"]})


def test_karpathy_coco_filepath_and_restval(tmp_path):
    _png(tmp_path / "train2014" / "COCO_train2014_1.jpg")
    _png(tmp_path / "val2014" / "COCO_val2014_2.jpg")
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": "COCO_train2014_1.jpg", "split": "train",
         "imgid": 0, "cocoid": 1, "sentences": [_sent("One.")]},
        {"filepath": "val2014", "filename": "COCO_val2014_2.jpg", "split": "restval",
         "imgid": 1, "cocoid": 2, "sentences": [_sent("Two.")]}]}))
    spec = {"type": "karpathy", "path": str(path), "images": str(tmp_path), "split": ["train"]}
    items, _ = _list(build_dataset(spec))
    assert [(i.id, i.meta) for i in items] == [
        ("train2014/COCO_train2014_1.jpg", {"split": "train", "imgid": 0, "cocoid": 1}),
        ("val2014/COCO_val2014_2.jpg", {"split": "train", "imgid": 1, "cocoid": 2})]
    items, _ = _list(build_dataset({**spec, "split": "restval", "restval": "keep"}))
    assert [(i.id, i.meta["split"]) for i in items] == [("val2014/COCO_val2014_2.jpg", "restval")]


# hf_images

def _hf(tmp_path: Path, **columns) -> datasets.Dataset:
    files = [str(_png(tmp_path / f"{n}.png", c)) for n, c in (("a", "red"), ("b", "blue"))]
    return datasets.Dataset.from_dict({"image": files, **columns}).cast_column(
        "image", datasets.Image())


def test_hf_images_save_to_disk_with_image_feature(tmp_path):
    _hf(tmp_path, caption=[["a red one", " red "], ["a blue one"]], key=["r", "b"]).save_to_disk(
        tmp_path / "d")
    ds = build_dataset({"type": "hf_images", "path": str(tmp_path / "d"), "text_column": "caption",
                        "id_column": "key"})
    items, q = _list(ds)
    assert [(i.id, i.media, i.texts) for i in items] == [("r", "0", ["a red one", "red"]),
                                                          ("b", "1", ["a blue one"])]
    assert items[1].where == f"{tmp_path / 'd'} row 1" and q.count == 0
    assert Image.open(io.BytesIO(ds.load("1"))).getpixel((0, 0)) == (0, 0, 255)
    again = pickle.loads(pickle.dumps(ds))  # what Ray ships to workers, after a load() here
    assert again._images is None and _opens(again.load("0")) == (4, 3)
    assert (tmp_path / "d" / "state.json") in ds.files()


def test_hf_images_dict_splits_bytes_column_and_bad_rows(tmp_path):
    raw = [_png(tmp_path / n).read_bytes() for n in ("a.png", "b.png")]
    train = datasets.Dataset.from_dict({"png": raw + raw[:1], "text": ["one", None, "three"],
                                        "key": ["k", "k2", "k"]})
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(tmp_path / "dd")
    spec = {"type": "hf_images", "path": str(tmp_path / "dd"), "image_column": "png",
            "id_column": "key"}
    with pytest.raises(DatasetError, match="choose a split.*train, test"):
        _list(build_dataset(spec))
    ds = build_dataset({**spec, "split": "train"})
    items, q = _list(ds)
    assert [(i.id, i.media, i.texts) for i in items] == [("k", "0", ["one"])]
    where = f"{tmp_path / 'dd'}[train]"
    assert _where(q) == [(f"{where} row 1", "column 'text' must be a string or a list of strings"),
                         (f"{where} row 2", "duplicate id")]
    assert _opens(ds.load("2")) == (4, 3)
    with pytest.raises(StageFailed, match=r"\[train\] row 1: column 'text'"):
        _list(build_dataset({**spec, "split": "train", "on_error": "raise"}))
    with pytest.raises(DatasetError, match="no column 'caption'.*png, text, key"):
        _list(build_dataset({**spec, "split": "test", "text_column": "caption"}))


def test_hf_images_items_carry_their_split(tmp_path):
    """A ``split`` column gives each row's split (Flickr30k's Hugging Face copy has one); without it,
    rows carry the DatasetDict split named with ``split:``, Hugging Face's ``validation`` as stele's
    ``val``; a table with neither (or a lone split taken by default) carries none. The fusion stages use it instead of their hash split."""
    _hf(tmp_path, text=["r", "b"], split=["test", " "]).save_to_disk(tmp_path / "col")
    items, _ = _list(build_dataset({"type": "hf_images", "path": str(tmp_path / "col")}))
    assert [i.meta for i in items] == [{"split": "test"}, {}]     # a blank value is no split
    items, _ = _list(build_dataset({"type": "hf_images", "path": str(tmp_path / "col"),
                                    "split_column": None}))
    assert [i.meta for i in items] == [{}, {}]
    one = _hf(tmp_path, text=["r", "b"])
    datasets.DatasetDict({"validation": one}).save_to_disk(tmp_path / "dd")
    items, _ = _list(build_dataset({"type": "hf_images", "path": str(tmp_path / "dd"),
                                    "split": "validation"}))
    assert [i.meta for i in items] == [{"split": "val"}, {"split": "val"}]
    items, _ = _list(build_dataset({"type": "hf_images", "path": str(tmp_path / "dd")}))
    assert [i.meta for i in items] == [{}, {}]     # a lone split taken by default: no split of its own
    one.save_to_disk(tmp_path / "plain")
    items, _ = _list(build_dataset({"type": "hf_images", "path": str(tmp_path / "plain")}))
    assert [i.meta for i in items] == [{}, {}]


def test_hf_images_hub_name_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = build_dataset({"type": "hf_images", "path": "nlphuji/flickr30k"})
    assert ds.files() == []
    start = time.monotonic()
    with pytest.raises(DatasetError, match="'nlphuji/flickr30k' is not a local.*HF_HUB_OFFLINE"):
        _list(ds)
    assert time.monotonic() - start < 5
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a save_to_disk folder"):
        _list(build_dataset({"type": "hf_images", "path": str(tmp_path / "plain")}))


# emoji

def _emoji(tmp_path: Path) -> Path:
    root = tmp_path / "emoji"
    _png(root / "img" / "1f34e.png")
    _png(root / "img" / "1f1ea-1f1ec.png", "green")
    entry = {"category": "Food & Drink", "subcategory": "food-fruit"}
    (root / "emoji.json").write_text(json.dumps([
        {"unified": "1F34E", "name": "RED APPLE", "short_names": ["apple", "red_apple"],
         "image": "1f34e.png", **entry},
        {"unified": "1F1EA-1F1EC", "name": "Egypt Flag", "short_names": ["flag-eg", "egypt_flag"],
         "category": "Flags", "subcategory": "country-flag", "image": "1f1ea-1f1ec.png"},
        {"unified": "1F34F", "name": "GREEN APPLE", "short_names": [], "image": "1f34f.png"},
        {"unified": "1F350", "name": "PEAR", "short_names": ["pear"]},
        {"unified": "1F34E", "name": "RED APPLE AGAIN", "image": "1f34e.png"},
        {"unified": "1F351"}], indent=1))
    return root


def test_emoji_texts_meta_and_bad_entries(tmp_path):
    root = _emoji(tmp_path)
    ds = build_dataset({"type": "emoji", "path": str(root)})
    items, q = _list(ds)
    assert [(i.id, i.texts, i.meta) for i in items] == [
        ("1F34E", ["RED APPLE"], {"category": "Food & Drink", "subcategory": "food-fruit",
                                  "short_names": ["apple", "red_apple"]}),
        ("1F1EA-1F1EC", ["Egypt Flag"], {"category": "Flags", "subcategory": "country-flag",
                                         "short_names": ["flag-eg", "egypt_flag"]})]
    assert _opens(ds.load(items[1].media)) == (4, 3)
    js = root / "emoji.json"
    assert ds.files() == [js]
    assert _where(q) == [(f"{js}[2]", "image file not found"), (f"{js}[3]", "no image"),
                         (f"{js}[4]", "duplicate id"),
                         (f"{js}[5]", "expected an object with a string 'name'")]
    items, _ = _list(build_dataset({"type": "emoji", "path": str(root),
                                    "texts": "name+short_names"}))
    assert [i.texts for i in items] == [["RED APPLE", "apple"], ["Egypt Flag", "flag-eg"]]
    with pytest.raises(StageFailed, match=rf"{js}\[2\]: image file not found"):
        _list(build_dataset({"type": "emoji", "path": str(root), "on_error": "raise"}))


@pytest.mark.skipif(not os.environ.get("STELE_DATA"), reason="STELE_DATA (shared data) not set")
def test_real_shared_emoji():
    root = Path(os.environ["STELE_DATA"]) / "emoji"
    if not (root / "emoji.json").is_file():
        pytest.skip(f"{root}/emoji.json absent")
    ds = build_dataset({"type": "emoji", "path": str(root), "texts": "name+short_names"})
    items, q = _list(ds)
    assert len(items) + q.count == len(json.loads((root / "emoji.json").read_text()))
    assert len(items) > 1800 and len({i.id for i in items}) == len(items)
    apple = next(i for i in items if i.id == "1F34E")
    assert apple.texts[0] == "RED APPLE" and apple.meta["category"] == "Food & Drink"
    assert _opens(ds.load(apple.media)) == (64, 64)


# the registry

@pytest.mark.parametrize("name", sorted(set(DATASETS.all()) | set(IMAGE_DATASETS)))
def test_every_builtin_is_registered_with_a_modality(name):
    cls = DATASETS.get(name)
    assert cls.name == name and cls.modality in ("image", "audio", "video")
    assert (cls.__doc__ or "").strip(), f"{name}: no docstring for `stele datasets`"
    if name in IMAGE_DATASETS:
        assert cls.modality == "image"
    assert not [k for k in DATASETS.plugin_errors if k.startswith("vision ")]


# bench/make_emoji_two_styles.py: the emoji set with a second art style for its training emoji

def test_make_emoji_two_styles_keeps_the_hash_split_and_adds_only_training_twins(tmp_path):
    import csv
    import subprocess
    import sys

    from fusion.splits import split_of

    src, second = tmp_path / "emoji", tmp_path / "twemoji"
    entries = []
    for k in range(12):
        _png(src / "img" / f"e{k}.png")
        if k != 3:                       # one emoji the second style lacks
            _png(second / f"e{k}.png", "blue")
        entries.append({"unified": f"E{k}", "name": f" Emoji {k} ", "image": f"e{k}.png"})
    entries.append({"unified": "E99", "name": "No Image", "image": "missing.png"})
    (src / "emoji.json").write_text(json.dumps(entries))
    script = Path(__file__).parents[2] / "bench" / "make_emoji_two_styles.py"
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(script), str(src), str(second), "--out", str(out),
                    "--held-out-share", "0.4"], check=True, capture_output=True, text=True, timeout=600)
    rows = list(csv.DictReader(open(out / "captions.csv", encoding="utf-8")))
    want = {f"E{k}": split_of(f"E{k}", 0.4, 0) for k in range(12)}
    assert "test" in want.values() and "train" in want.values()   # the share splits 12 both ways
    noto = {r["emoji"]: r for r in rows if r["style"] == "noto"}
    assert {e: r["split"] for e, r in noto.items()} == want       # the pipelines' own hash split
    assert all(r["caption"] == f"Emoji {r['emoji'][1:]}" for r in rows)
    twins = {r["emoji"] for r in rows if r["style"] == "twitter"}
    assert twins == {e for e, s in want.items() if s == "train"} - {"E3"}   # training emoji only
    assert all(r["split"] == "train" for r in rows if r["style"] == "twitter")
    # read back as the pipelines read it: one item per image, its split in the meta
    items, q = _list(build_dataset({"type": "image_folder", "captions": str(out / "captions.csv")}))
    assert q.count == 0 and len(items) == len(rows) == 12 + len(twins)
    assert {i.meta["split"] for i in items if i.id.startswith("twitter/")} == {"train"}
