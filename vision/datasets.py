"""Image datasets: image/caption collections in the formats they are published in.

* ``image_folder``: images plus a captions file, CSV/TSV with a header or JSON lines; several rows
  for one image are several captions, and a JSONL field may also hold a list::

      image,caption                          {"file": "dogs/1.jpg", "captions": ["A dog.", "A pup."]}
      dogs/1.jpg,A dog runs.
      dogs/1.jpg,A brown dog on grass.

  An optional ``split`` column (``train``, ``val``, ``test``, ...) gives each image its split.
* ``coco``: COCO captions (``annotations/captions_train2017.json``), images in ``train2017/``.
* ``karpathy``: Karpathy's splits of Flickr8k/30k and COCO (``dataset_flickr30k.json``).

Where a dataset defines splits, each item's is ``meta["split"]``: Karpathy's, the COCO annotation
file's (``captions_val2017.json`` -> ``val``), a captions file's ``split`` column, a Hugging Face
table's ``split`` column or the ``DatasetDict`` split named (``validation`` -> ``val``). The fusion
stages use it instead of their hash split (:mod:`fusion.splits`): only ``train`` items pretrain,
and retrieval's ``split: test`` is the dataset's test set.
* ``hf_images``: a ``datasets`` table saved with ``save_to_disk``: an image column (``Image()``
  feature or bytes) and a text column (a string or a list of strings).
* ``emoji``: ``emoji.json`` (name, short names, category per emoji), with the images in ``img/``.

Each class's docstring gives its file layout. Every file and folder may be a local path or any
fsspec URI (``s3://bucket/coco/annotations/captions_val2017.json``); on a URI the images folder is
listed once to check which images exist, and each image is read with one request when it is
featurized. Annotation files are metadata, so they are read whole;
items are then streamed out in file order. Images are only checked to exist here: ``load`` returns
the encoded file and the vision stage decodes it, so every dataset shares one bad-image path.
Records that cannot become an item (a malformed line, a missing image, a repeated id) go to the
quarantine with their file and line, or ``file[index]`` where the format is one JSON document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, model_validator

from pipeline.datasets import (DatasetError, HFDataset, Item, MediaDataset, dataset, hf_items,
                               load_json, open_hf_dataset, open_hf_split, read_media, read_records,
                               split_conflict, unique_ids)
from pipeline.quarantine import Quarantine
from pipeline.uris import InputURI, URIPath, file_checker, input_path, open_input

Split = Literal["train", "val", "test", "restval"]


class CaptionedFolder(MediaDataset):
    """Media files under ``root`` named by a captions file: what ``image_folder`` and
    ``video_folder`` share. A subclass sets ``kind`` (the word errors use) and a ``<kind>_column``
    parameter, returned by :meth:`media_column`."""

    kind: ClassVar[str] = ""
    captions: InputURI = Field(description="captions file: .csv, .tsv or .jsonl")
    root: InputURI | None = Field(default=None, description="media folder (default: the captions "
                                                            "file's folder)")
    format: Literal["auto", "csv", "tsv", "jsonl"] = Field(
        default="auto", description="auto: by suffix (.json/.jsonl/.ndjson, .csv, .tsv), else a "
                                    "tab in the header means TSV")
    caption_column: str = "caption"

    def media_column(self) -> str:
        return getattr(self, f"{self.kind}_column")

    def files(self) -> list[Path | URIPath]:
        return [input_path(self.captions)]

    def _root(self) -> Path | URIPath:
        return input_path(self.root) if self.root else input_path(self.captions).parent

    def load(self, media: str) -> bytes:
        return read_media(self._root() / media, self.kind)

    def items(self, q: Quarantine) -> Iterator[Item]:
        path, root = input_path(self.captions), self._root()
        if not path.is_file():
            raise DatasetError(f"{path}: no such captions file")
        if not root.is_dir():
            raise DatasetError(f"{root}: no such {self.kind}s folder")
        exists = file_checker(root)
        found: dict[str, Item] = {}
        missing: set[str] = set()
        records = read_records(path, self._format(path), self.media_column(), self.caption_column, q,
                               params=f"{self.kind}_column / caption_column")
        for where, rel, texts, meta in records:
            if rel in missing or (rel not in found and not exists(rel)):
                missing.add(rel)
                q.bad(where, f"{self.kind} file not found", str(root / rel))
                continue
            if rel in found and (conflict := split_conflict(found[rel], meta)):
                q.bad(where, conflict, rel)
                continue
            found.setdefault(rel, Item(id=rel, media=rel, meta=meta, where=where)).texts += texts
        yield from found.values()

    def _format(self, path: Path | URIPath) -> str:
        fmt = self.format if self.format != "auto" else {
            ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
        }.get(path.suffix.lower())
        if fmt is None:  # e.g. Flickr8k's captions.txt, which is CSV
            with open_input(path, "r", encoding="utf-8", errors="replace") as f:
                fmt = "tsv" if "\t" in f.readline() else "csv"
        return fmt


@dataset("image_folder")
class ImageFolder(CaptionedFolder):
    """Images under ``root`` named by a captions file.

    CSV (``,``, quoted fields may span lines) or TSV (tab, no quoting) with a header row naming
    ``image_column`` and ``caption_column``; or JSON lines, one object per line, whose
    ``caption_column`` is a string or a list of strings. Image paths are relative to ``root``. Rows
    naming the same image add captions to it; the item id is the normalised relative path, and the
    other columns of the image's first row become its meta. A ``split`` column (optional) is the
    image's split (``meta["split"]``, which the fusion stages use instead of their hash split); a
    later row giving the same image another split is quarantined.
    """

    modality: ClassVar[str] = "image"
    kind: ClassVar[str] = "image"
    root: InputURI | None = Field(default=None, description="images folder (default: the captions "
                                                            "file's folder)")
    image_column: str = "image"


@dataset("coco")
class Coco(MediaDataset):
    """COCO captions: ``{"images": [{"id", "file_name", "width", "height"}, ...], "annotations":
    [{"image_id", "id", "caption"}, ...]}``. Item id = ``file_name``; texts = the captions of the
    image in file order; meta = ``image_id``, ``width``, ``height`` and ``split``, the split the
    file's name gives (``captions_train2017.json`` -> ``train``, ``captions_val2014.json`` ->
    ``val``, ``image_info_test2017.json`` -> ``test``; none for another name). A file without
    ``annotations`` (``image_info_test2017.json``) gives items without texts.
    """

    modality: ClassVar[str] = "image"
    annotations: InputURI = Field(description="captions JSON, e.g. "
                                              "annotations/captions_val2017.json")
    images: InputURI | None = Field(
        default=None, description="images folder (default: the split's folder beside annotations/, "
                                  "captions_val2017.json -> val2017)")

    @model_validator(mode="after")
    def _default_images(self) -> Coco:
        if self.images is None:
            ann = input_path(self.annotations)
            m = re.fullmatch(r"(?:captions|image_info)_(\w+)\.json", ann.name)
            if not m:
                raise ValueError(f"cannot tell the images folder from {ann.name!r} (expected "
                                 f"captions_<split>.json): set images")
            self.images = str(ann.parent.parent / m.group(1))
        return self

    def files(self) -> list[Path | URIPath]:
        return [input_path(self.annotations)]

    def fingerprint(self) -> Any:
        # Items carry the file's split in their meta since listing version 2: artifacts listed
        # before lack it, so they are not the same listing.
        return {"files": super().fingerprint(), "listing": 2}

    def load(self, media: str) -> bytes:
        return read_media(input_path(self.images) / media, "image")

    def items(self, q: Quarantine) -> Iterator[Item]:
        return unique_ids(self._items(q), q)

    def file_split(self) -> str | None:
        """The split the annotation file's name gives: ``train``, ``val`` or ``test``."""
        m = re.fullmatch(r"(?:captions|image_info)_(train|val|test)(?:\d{4})?\.json",
                         input_path(self.annotations).name)
        return m.group(1) if m else None

    def _items(self, q: Quarantine) -> Iterator[Item]:
        path, root = input_path(self.annotations), input_path(self.images)
        split = self.file_split()
        doc = load_json(path, dict)
        if not isinstance(doc.get("images"), list):
            raise DatasetError(f"{path}: no 'images' list (is this a COCO captions file?)")
        if not root.is_dir():
            raise DatasetError(f"{root}: no such images folder (set images)")
        exists = file_checker(root)
        ids = {im.get("id") for im in doc["images"] if isinstance(im, dict)}
        captions: dict[Any, list[str]] = {}
        for j, ann in enumerate(doc.get("annotations") or []):
            where = f"{path} annotations[{j}]"
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                q.bad(where, "expected an object with a string 'caption'", repr(ann))
            elif ann.get("image_id") not in ids:
                q.bad(where, f"unknown image id {ann.get('image_id')!r}", ann["caption"])
            else:
                captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        seen: set[Any] = set()
        for i, im in enumerate(doc["images"]):
            where = f"{path} images[{i}]"
            if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
                q.bad(where, "expected an object with 'id' and 'file_name'", repr(im))
            elif im["id"] in seen:  # its captions would be counted twice
                q.bad(where, "duplicate id", str(im["id"]))
            elif not exists(im["file_name"]):
                seen.add(im["id"])
                q.bad(where, "image file not found", str(root / im["file_name"]))
            else:
                seen.add(im["id"])
                meta = {"image_id": im["id"], "width": im.get("width"), "height": im.get("height")}
                if split:
                    meta["split"] = split
                yield Item(id=im["file_name"], media=im["file_name"],
                           texts=captions.get(im["id"], []), meta=meta, where=where)


@dataset("karpathy")
class Karpathy(MediaDataset):
    """Karpathy's split files (``dataset_coco.json``, ``dataset_flickr8k.json``,
    ``dataset_flickr30k.json``): ``{"images": [{"filename", "filepath" (COCO only), "split",
    "sentences": [{"raw", "tokens"}, ...], "imgid", "cocoid" (COCO only)}, ...]}``.

    Item id = ``filepath/filename``; meta = ``split``, ``imgid`` (and ``cocoid``). The 5k COCO
    ``restval`` images are by convention part of training; ``restval: keep`` keeps them apart.
    """

    modality: ClassVar[str] = "image"
    path: InputURI = Field(description="the split JSON, e.g. dataset_flickr30k.json")
    images: InputURI = Field(description="images folder (for COCO: the folder holding train2014/, "
                                    "val2014/)")
    split: Split | list[Split] | None = Field(default=None, description="only these splits "
                                                                        "(default: all)")
    restval: Literal["train", "keep"] = Field(default="train",
                                              description="count restval images as train, or keep "
                                                          "them as split 'restval'")
    text: Literal["raw", "tokens"] = Field(default="raw", description="the raw sentence, or its "
                                                                      "tokens joined by spaces")

    @model_validator(mode="after")
    def _restval_selectable(self) -> Karpathy:
        chosen = [self.split] if isinstance(self.split, str) else self.split or []
        if "restval" in chosen and self.restval == "train":
            raise ValueError("split 'restval' selects nothing while restval: train counts those "
                             "images as train; set restval: keep")
        return self

    def files(self) -> list[Path | URIPath]:
        return [input_path(self.path)]

    def load(self, media: str) -> bytes:
        return read_media(input_path(self.images) / media, "image")

    def items(self, q: Quarantine) -> Iterator[Item]:
        return unique_ids(self._items(q), q)

    def _items(self, q: Quarantine) -> Iterator[Item]:
        path, root = input_path(self.path), input_path(self.images)
        doc = load_json(path, dict)
        if not isinstance(doc.get("images"), list):
            raise DatasetError(f"{path}: no 'images' list (is this a Karpathy split file?)")
        if not root.is_dir():
            raise DatasetError(f"{root}: no such images folder")
        exists = file_checker(root)
        wanted = {self.split} if isinstance(self.split, str) else set(self.split or ())
        for i, im in enumerate(doc["images"]):
            where = f"{path} images[{i}]"
            if not isinstance(im, dict) or not im.get("filename") or \
                    not isinstance(im.get("sentences"), list):
                q.bad(where, "expected an object with 'filename' and a 'sentences' list", repr(im))
                continue
            split = im.get("split")
            if split == "restval" and self.restval == "train":
                split = "train"
            if wanted and split not in wanted:
                continue
            texts = [s.get(self.text) if isinstance(s, dict) else None for s in im["sentences"]]
            if any(t is None for t in texts):
                q.bad(where, f"a sentence without {self.text!r}", repr(im["sentences"]))
                continue
            texts = [" ".join(map(str, t)) if isinstance(t, list) else str(t) for t in texts]
            rel = "/".join(p for p in (im.get("filepath"), im["filename"]) if p)
            if not exists(rel):
                q.bad(where, "image file not found", str(root / rel))
                continue
            meta = {"split": split, "imgid": im.get("imgid")}
            if "cocoid" in im:
                meta["cocoid"] = im["cocoid"]
            yield Item(id=rel, media=rel, texts=[t.strip() for t in texts], meta=meta, where=where)


@dataset("hf_images")
class HFImages(HFDataset):
    """A Hugging Face ``datasets`` table: a ``save_to_disk`` folder, or a Hub name (fails at once
    under ``HF_HUB_OFFLINE=1``). ``image_column`` is an ``Image()`` feature or raw bytes;
    ``text_column`` a string or a list of strings. Item media = the row number; item id = the
    ``id_column`` value, else the row number.
    """

    modality: ClassVar[str] = "image"
    image_column: str = "image"
    _images: Any = PrivateAttr(default=None)  # the image column, opened on first load()

    def items(self, q: Quarantine) -> Iterator[Item]:
        return unique_ids(self._items(q), q)

    def _items(self, q: Quarantine) -> Iterator[Item]:
        ds, split = open_hf_split(self.path, self.split)
        missing = [c for c in (self.image_column, self.text_column, self.id_column)
                   if c and c not in ds.column_names]
        if missing:
            raise DatasetError(f"{self.path}: no column {', '.join(map(repr, missing))} (columns: "
                               f"{', '.join(ds.column_names)}); set image_column / text_column / "
                               f"id_column")
        name = f"{self.path}[{self.split}]" if self.split else self.path
        yield from hf_items(ds, name, self.text_column, self.id_column, q, self.split_column, split)

    def load(self, media: str) -> bytes:
        if self._images is None:
            import datasets

            ds = open_hf_dataset(self.path, self.split).select_columns([self.image_column])
            if isinstance(ds.features[self.image_column], datasets.Image):
                ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
            self._images = ds
        value = self._images[int(media)][self.image_column]
        if isinstance(value, dict) and value.get("bytes"):  # an Image() with embedded bytes
            return value["bytes"]
        if isinstance(value, dict) and value.get("path"):   # an Image() naming a file
            return read_media(Path(value["path"]), "image")
        if isinstance(value, bytes):
            return value
        raise ValueError(f"{self.path} row {media}: column {self.image_column!r} holds no image "
                         f"({type(value).__name__})")


@dataset("emoji")
class Emoji(MediaDataset):
    """A folder with ``emoji.json`` (a list of ``{"unified", "name", "short_names", "category",
    "subcategory", "image"}``) and the images in ``img/``. Item id = ``unified`` (else the image
    name); texts = ``name``, and with ``texts: name+short_names`` also each short name as words
    (``red_apple`` -> ``red apple``) unless it repeats the name; meta = ``category``,
    ``subcategory``, ``short_names``.
    """

    modality: ClassVar[str] = "image"
    path: InputURI = Field(description="folder holding emoji.json and img/")
    texts: Literal["name", "name+short_names"] = "name"

    def files(self) -> list[Path | URIPath]:
        return [input_path(self.path) / "emoji.json"]

    def load(self, media: str) -> bytes:
        return read_media(input_path(self.path) / "img" / media, "image")

    def items(self, q: Quarantine) -> Iterator[Item]:
        return unique_ids(self._items(q), q)

    def _items(self, q: Quarantine) -> Iterator[Item]:
        path = input_path(self.path) / "emoji.json"
        exists = file_checker(input_path(self.path) / "img")
        for i, e in enumerate(load_json(path, list)):
            where = f"{path}[{i}]"
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                q.bad(where, "expected an object with a string 'name'", repr(e))
                continue
            if not e.get("image"):
                q.bad(where, "no image", e["name"])
                continue
            file = input_path(self.path) / "img" / e["image"]
            if not exists(e["image"]):
                q.bad(where, "image file not found", str(file))
                continue
            short = [s for s in e.get("short_names") or [] if isinstance(s, str)]
            texts = [e["name"].strip()]
            if self.texts == "name+short_names":
                for words in (s.replace("_", " ").strip() for s in short):
                    if words.lower() not in {t.lower() for t in texts}:
                        texts.append(words)
            meta = {"category": e.get("category"), "subcategory": e.get("subcategory"),
                    "short_names": short}
            yield Item(id=str(e.get("unified") or Path(e["image"]).stem), media=e["image"],
                       texts=texts, meta=meta, where=where)
