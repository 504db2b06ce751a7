"""The media-dataset interface and its registry (entry-point group ``stele.datasets``).

A media dataset lists *items*: an id, a reference to one piece of media (an image or an audio clip),
one or more texts (captions, transcripts, names) and free metadata. Listing is cheap, streamed and
done once; the media are read later, inside Ray Data workers, through :meth:`MediaDataset.load`, so
no dataset passes through one process's memory, and the same object (a pydantic model: it pickles as
its parameters) works on every node of a cluster::

    @dataset("acme")
    class AcmeImages(MediaDataset):
        modality: ClassVar[str] = "image"
        root: InputURI                      # a local folder or a URI (s3://...)

        def items(self, q):
            for no, line in read_lines(input_path(self.root) / "captions.txt", q):
                name, caption = line.split("\\t")
                yield Item(id=name, media=name, texts=[caption], where=f"captions.txt:{no}")

        def load(self, media):
            return read_media(input_path(self.root) / media, "image")

Files and folders a dataset names are local paths or any fsspec URI (``s3://bucket/coco/...``): the
readers here take both (:mod:`pipeline.uris`), and a parameter typed
:data:`~pipeline.uris.InputURI` is checked before anything runs. ``load`` returns the encoded file
(``bytes``) or a decoded :class:`AudioClip`; decoding belongs to
the feature stages, so every dataset gets the same bad-media handling, and the engine stays free of
domain knowledge. Listing problems go to the :class:`~pipeline.quarantine.Quarantine` with file and
line; media stages default to ``on_error: skip`` (one bad file in a million should not stop a run)
and list every skipped item in their ``rejected`` table. The readers datasets share live here, so
all report a problem in the same words: :func:`read_media`, :func:`load_json`, :func:`read_records`,
:func:`text_list`, :func:`unique_ids`; for Hugging Face tables :class:`HFDataset`,
:func:`open_hf_dataset`, :func:`hf_items` and :func:`hf_offline`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from .errors import StageFailed
from .quarantine import Quarantine
from .readers import json_objects, read_lines
from .registry import Registry
from .uris import InputURI, URIPath, input_files, input_path, inputs_fingerprint, open_input


@dataclass
class Item:
    id: str
    media: str                       # what the dataset's load() reads: a path, a row number, ...
    texts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""                  # "file:line" of the record, for messages about it


@dataclass
class AudioClip:
    """Decoded audio: ``samples`` (n,) or (n, channels), float or int PCM, at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int


class DatasetError(StageFailed):
    """A dataset that cannot be read at all (missing folder, unparsable annotation file)."""


class DatasetQuarantine(Quarantine):
    """:class:`~pipeline.quarantine.Quarantine` raising :class:`DatasetError`."""

    error = DatasetError


class MediaDataset(BaseModel):
    """Base class of every media dataset; subclasses add their parameters as fields."""

    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""     # "image", "audio" or "video"

    type: str = ""
    on_error: Literal["raise", "skip"] = Field(
        default="skip", description="unusable records: skip and list them in the rejected table "
                                    "(default), or raise on the first")

    def model_post_init(self, context: Any) -> None:
        if not self.type:
            self.type = self.name

    def __getstate__(self) -> dict[str, Any]:
        # Ray ships the dataset to every worker: send the parameters, and reset what a private
        # attribute with a default caches (an opened table), so that each worker opens it itself (a
        # memory map of the same files). One without a default is built from the parameters at
        # validation (spoken_captions' base dataset), which unpickling does not repeat: it travels.
        state = super().__getstate__()
        private = dict(state["__pydantic_private__"] or {})  # a copy: self keeps its caches
        for name, attr in type(self).__private_attributes__.items():
            default = attr.get_default()
            if default is not PydanticUndefined:
                private[name] = default
        state["__pydantic_private__"] = private
        return state

    def items(self, q: Quarantine) -> Iterator[Item]:
        """Every item, in a stable order; unusable records go to ``q`` with file and line."""
        raise NotImplementedError

    def load(self, media: str) -> bytes | AudioClip:
        """The media an item refers to: encoded file bytes, or a decoded :class:`AudioClip`.

        Called in Ray Data workers; raise ``OSError``/``ValueError`` with a readable message for
        media that cannot be read, and the stage records it as a rejected item.
        """
        raise NotImplementedError

    def files(self) -> list[Path | URIPath]:
        """Files whose content (size and ETag or checksum on a URI) decides the
        cache key (the annotation files; media files too where listing them is cheap)."""
        return []

    def fingerprint(self) -> Any:
        return inputs_fingerprint(self.files())


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


DATASETS: Registry[type[MediaDataset]] = Registry(group="stele.datasets", kind="media dataset",
                                                   qualname=_qualname)


def dataset(name: str):
    """Register a :class:`MediaDataset` subclass under ``name`` (its ``type:`` in pipelines)."""

    def deco(cls: type[MediaDataset]) -> type[MediaDataset]:
        if not (isinstance(cls, type) and issubclass(cls, MediaDataset)):
            raise TypeError(f"@dataset({name!r}) decorates a MediaDataset subclass, got {cls!r}")
        if cls.modality not in ("image", "audio", "video"):
            raise TypeError(f"@dataset({name!r}): set modality = 'image', 'audio' or 'video' on "
                            f"{cls.__name__}")
        cls.name = name
        return DATASETS.register(name, cls)

    return deco


def build_dataset(spec: dict[str, Any]) -> MediaDataset:
    """A validated dataset from its pipeline entry (``{type: coco, annotations: ...}``). An
    unknown or missing type is a ``ValueError`` (with a did-you-mean), so that inside a stage's
    parameters it becomes a validation error of the pipeline (``file:line: field: message``,
    exit 2)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError("a dataset needs a 'type:' (see `stele datasets`)")
    try:
        cls = DATASETS.get(spec["type"])
    except KeyError as e:
        raise ValueError(f"{e.args[0]}; see `stele datasets`") from None
    return cls.model_validate(spec)


def read_media(path: Path | URIPath | str, kind: str) -> bytes:
    """The bytes of a media file (local or on a URI); an ``OSError`` naming the ``kind``
    (``image``, ``audio``) and file otherwise, which the feature stage records as a rejected
    item."""
    path = input_path(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read {kind} {path}: {e.strerror or e}") from e


def load_json(path: Path | URIPath, kind: type) -> Any:
    """A whole JSON document of the expected top-level type, or a :class:`DatasetError`."""
    try:
        with open_input(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    if not isinstance(doc, kind):
        raise DatasetError(f"{path}: expected a JSON {kind.__name__}, found {type(doc).__name__}")
    return doc


def text_list(value: Any) -> list[str] | None:
    """A text field (caption, transcript) as a list of stripped strings; None if it is neither a
    string nor a list of strings. Empty strings stay: the feature stage records them."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    return None


def split_conflict(item: Item, meta: dict[str, Any]) -> str | None:
    """Why a further record of ``item`` (a captions file's row naming the same file) cannot add to
    it: it gives another ``split`` than the item's first record did (an item is in one split, and
    a silent choice could put a test image into training). None when it can."""
    first, this = (str(m.get("split") or "").strip() for m in (item.meta, meta))
    if first == this:
        return None
    return (f"split {this or '(none)'!r} differs from {first or '(none)'!r} given for this file at "
            f"{item.where}")


def unique_ids(items: Iterator[Item], q: Quarantine) -> Iterator[Item]:
    """Items with ids not seen before: ids name features and texts downstream, so a repeat would
    silently merge two pieces of media. Each repeat goes to ``q`` as ``duplicate id``."""
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            q.bad(item.where, "duplicate id", item.id)
            continue
        seen.add(item.id)
        yield item


def read_records(path: Path | URIPath, fmt: Literal["csv", "tsv", "jsonl"], media_column: str,
                 text_column: str, q: Quarantine, *, params: str
                 ) -> Iterator[tuple[str, str, list[str], dict[str, Any]]]:
    """``(where, media path, texts, other columns)`` of each usable record of a file that names
    media files and their texts.

    CSV (``,``, quoted fields may span lines) or TSV (tab, no quoting) with a header row naming both
    columns; or JSON lines, one object per line, whose ``text_column`` is a string or a list of
    strings. ``where`` is ``file:line`` (a record's first line); the media path is stripped and
    normalised (``./a//b.jpg`` -> ``a/b.jpg``), so two spellings of one file name one item. A bad
    record goes to ``q``. A header without the columns raises a :class:`DatasetError` that says to
    set ``params``: the dataset's parameters for the two columns (``"file_column / text_column"``).
    """
    media, txt = media_column, text_column
    rows = json_objects(path, q) if fmt == "jsonl" else \
        _table_rows(path, fmt == "tsv", (media, txt), q, params)
    for where, row, line in rows:
        if media not in row or txt not in row:  # JSON only: a table row has every header column
            q.bad(where, f"missing field {media if media not in row else txt!r}", line)
        elif not isinstance(row[media], str) or not row[media].strip():
            q.bad(where, f"field {media!r} must be a non-empty path" if fmt == "jsonl" else
                  f"empty {media!r}", line)
        elif (texts := text_list(row[txt])) is None:  # JSON only: a table cell is a string
            q.bad(where, f"field {txt!r} must be a string or a list of strings", line)
        else:
            meta = {k: v for k, v in row.items() if k not in (media, txt)}
            yield where, Path(os.path.normpath(row[media].strip())).as_posix(), texts, meta


def _table_rows(path: Path | URIPath, tsv: bool, required: tuple[str, ...], q: Quarantine,
                params: str) -> Iterator[tuple[str, dict[str, str], str]]:
    """``(where, {column: value}, line)`` of each non-blank row after the header."""
    first: list[int | None] = [None]  # first line of the record being read (may span lines)

    def text() -> Iterator[str]:
        for no, line in read_lines(path, q, keep_ends=True):
            first[0] = first[0] or no
            yield line

    reader = csv.reader(text(), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header: list[str] | None = None
    for row in reader:
        where, line, first[0] = f"{path}:{first[0]}", ("\t" if tsv else ",").join(row), None
        if not row:
            continue
        if header is None:
            header = [h.strip() for h in row]
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetError(f"{where}: header has no column {', '.join(map(repr, missing))} "
                                   f"(columns: {header}); set {params}")
            continue
        if len(row) != len(header):
            q.bad(where, f"expected {len(header)} columns, found {len(row)}", line)
            continue
        yield where, dict(zip(header, row)), line


def hf_offline() -> bool:
    """Whether Hugging Face downloads are switched off (``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE``): a Hub name then fails at once rather than after network retries."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def open_hf_dataset(path: str, split: str | None) -> Any:
    """One ``datasets.Dataset`` (:func:`open_hf_split` without the split's name)."""
    return open_hf_split(path, split)[0]


def open_hf_split(path: str, split: str | None) -> tuple[Any, str | None]:
    """One ``datasets.Dataset`` and the ``DatasetDict`` split named for it (None for a table without
    splits, or a lone split taken by default): a ``save_to_disk`` folder (local, or on a URI: ``datasets`` copies it into a local
    temporary folder), or a Hub name (a :class:`DatasetError` at once when :func:`hf_offline`).
    ``split`` picks from a ``DatasetDict``; it may be left out when there is one split, and must be
    for a table without splits."""
    import datasets

    p = input_path(path)
    try:
        if p.is_dir():
            if not ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
                raise DatasetError(f"{p}: not a save_to_disk folder (no state.json or "
                                   f"dataset_dict.json)")
            ds = datasets.load_from_disk(str(p))
        elif isinstance(p, URIPath):
            raise DatasetError(f"{p}: no such save_to_disk folder")
        elif hf_offline():
            raise DatasetError(f"{path!r} is not a local folder, and as a Hub dataset name it cannot "
                               f"be fetched: HF_HUB_OFFLINE=1 is set")
        else:
            ds = datasets.load_dataset(path)
    except (OSError, ValueError) as e:  # datasets' not-found and offline errors
        raise DatasetError(f"{path}: cannot load the dataset: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        chosen = split or (next(iter(ds)) if len(ds) == 1 else None)
        if chosen not in ds:
            raise DatasetError(f"{path}: choose a split with split: (it has {', '.join(ds)})")
        # The split the user named; a lone split taken by default says nothing about held-out
        # items (often "train" for a whole table), so its items keep the hash split.
        return ds[chosen], split
    if split:
        raise DatasetError(f"{path}: one dataset without splits; remove split: {split}")
    return ds, None


# Hugging Face names its validation split "validation"; stele's splits (Karpathy's) call it "val".
SPLIT_ALIASES = {"validation": "val"}


def hf_items(ds: Any, name: str, text_column: str, id_column: str | None, q: Quarantine,
             split_column: str | None = None, split: str | None = None) -> Iterator[Item]:
    """An item per row of a ``datasets.Dataset``: media = the row number, id = the ``id_column``
    value (else the row number), texts = ``text_column`` (a string or a list of strings), and
    ``meta["split"]`` the row's ``split_column`` value where the table has that column and the row
    a value, else ``split`` (the ``DatasetDict`` split named for it), else none; ``validation`` is
    stele's ``val`` (:data:`SPLIT_ALIASES`). Only those columns are read, so listing never touches
    the media. A bad row goes to ``q`` as ``<name> row <i>``."""
    cols = [text_column] + ([id_column] if id_column else [])
    by_row = split_column is not None and split_column in ds.column_names and split_column not in cols
    cols += [split_column] if by_row else []
    i = 0
    for batch in ds.select_columns(cols).iter(batch_size=1000):
        for row in zip(*(batch[c] for c in cols)):
            where = f"{name} row {i}"
            texts = text_list(row[0])
            row_split = str(row[-1]).strip() if by_row and row[-1] is not None else ""
            row_split = row_split or split
            meta = {"split": SPLIT_ALIASES.get(row_split, row_split)} if row_split else {}
            if texts is None:
                q.bad(where, f"column {text_column!r} must be a string or a list of strings",
                      repr(row[0]))
            elif id_column and row[1] in (None, ""):
                q.bad(where, f"empty {id_column!r}", repr(row))
            else:
                yield Item(id=str(row[1]) if id_column else str(i), media=str(i), texts=texts,
                           meta=meta, where=where)
            i += 1


class HFDataset(MediaDataset):
    """Base of the datasets that read a Hugging Face ``datasets`` table (``hf_images``,
    ``hf_audio``): its parameters besides the media column, which subclasses add with ``load``."""

    path: InputURI = Field(description="save_to_disk folder (a path or a URI), or a Hub dataset "
                                       "name")
    split: str | None = Field(default=None, description="split of a DatasetDict (needed when it "
                                                        "has several); its items carry it as their "
                                                        "split")
    text_column: str = "text"
    id_column: str | None = None
    split_column: str | None = Field(default="split", description="column giving each row's own "
                                     "split (train, val, test, ...), read where the table has it")

    def files(self) -> list[Path | URIPath]:
        p = input_path(self.path)
        # a Hub dataset: its revision, not local files, decides what is read
        return input_files(p) if p.is_dir() else []

    def fingerprint(self) -> Any:
        # Items carry their split in their meta since listing version 2: artifacts listed before
        # lack it, so they are not the same listing.
        return {"files": super().fingerprint(), "listing": 2}
