"""Audio datasets: recordings with transcripts, and image-text sets turned into speech.

* ``audio_folder`` (:class:`AudioFolder`): audio files under ``root`` plus a transcript file: CSV or
  TSV with a header, JSON lines (a text or a list of texts per file), or CMU Sphinx
  ``transcription`` files (the format of Sphinx's test and training sets).
* ``hf_audio`` (:class:`HFAudio`): a Hugging Face ``datasets`` table of encoded files or decoded
  samples. ``Audio()`` decoding is never used, since it needs torchcodec and a system FFmpeg: rows
  are read in Arrow form, which hands the stored bytes over undecoded, and the speech stage decodes
  them with soundfile.
* ``spoken_captions`` (:class:`SpokenCaptions`): any other dataset's captions spoken by espeak-ng
  (:mod:`speech.tts`), one audio item per caption whose meta names its base item, so image and
  speech features can be joined later. Listing only writes down what to say; synthesis happens in
  ``load``, inside the Ray Data workers, and is deterministic (same caption and parameters, same
  samples). The speech stage passes its ``max_seconds`` to ``load``, so an overlong caption is
  refused before it is spoken rather than synthesised and then rejected.

Files and folders may be local paths or any fsspec URI (``s3://bucket/clips``); on a URI the audio
folder is listed once to check which files exist. Transcript files are metadata, so they are read
whole; items are then streamed out in file order.
Audio files are only checked to exist here: ``load`` returns the encoded file (or decoded samples)
and the speech stage decodes, so every dataset shares one bad-audio path. Records that cannot become
an item (a malformed line, a missing audio file, a repeated id) go to the quarantine with their
``file:line`` (``path[split] row i`` for tables). An empty transcript is not malformed: its item is
listed and the feature stage records the empty text.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from pipeline.datasets import (AudioClip, DatasetError, HFDataset, Item, MediaDataset, build_dataset,
                               dataset, hf_items, open_hf_dataset, open_hf_split, read_media, read_records,
                               split_conflict, unique_ids)
from pipeline.quarantine import Quarantine
from pipeline.readers import read_lines
from pipeline.uris import InputURI, URIPath, file_checker, input_path

from . import tts

# "<s> text </s> (fileid)" or "text (fileid)": the id is the last parenthesised word of the line.
_SPHINX_LINE = re.compile(r"^(?P<text>.*?)\s*\((?P<id>[^()\s]+)\)\s*$")
_SPHINX_MARKS = re.compile(r"^\s*<s>|</s>\s*$")


@dataset("audio_folder")
class AudioFolder(MediaDataset):
    """Audio files under ``root`` named by a transcript file (CSV, TSV, JSONL or CMU Sphinx).

    * CSV or TSV with a header row naming ``file_column`` and ``text_column``; JSON lines whose
      ``text_column`` is a string or a list of strings. Rows naming the same file add texts to it::

          file,text                                {"file": "a.wav", "text": ["hello", "hallo"]}
          clips/a.wav,hello there

    * CMU Sphinx ``transcription`` files, one utterance a line, the text optionally between ``<s>``
      and ``</s>``, the file id in parentheses at the end::

          <s> he was not an ill disposed young man </s> (sense_and_sensibility_01_austen_64kb-0880)
          <s> ten of clubs  </s> (001)

      The file id is the audio path relative to ``root`` without its extension:
      ``<root>/<fileid>.wav`` (``extension``). A transcript named ``transcription`` or
      ``*.transcription`` (CMU's ``cards.transcription``) is read as Sphinx, and is found by itself
      when ``transcripts`` is not given.

    Item id = the file as the transcript writes it (the Sphinx file id, or the normalised relative
    path); texts = the transcripts of that file in file order; media = the path relative to ``root``.
    A ``split`` column (CSV, TSV, JSONL; optional) is the file's split, ``meta["split"]``, which the
    fusion stages use instead of their hash split; a later row giving the same file another split
    is quarantined. Other columns are not kept.
    """

    modality: ClassVar[str] = "audio"
    root: InputURI = Field(description="folder of the audio files")
    transcripts: InputURI | None = Field(
        default=None, description="transcript file, relative to root or absolute (default: the one "
                                  "'transcription' or '*.transcription' file in root)")
    format: Literal["auto", "csv", "tsv", "jsonl", "sphinx"] = Field(
        default="auto", description="auto: by name (.csv, .tsv, .jsonl/.json/.ndjson, "
                                    "[*.]transcription)")
    file_column: str = Field(default="file", description="CSV/TSV/JSONL: the audio path column")
    text_column: str = Field(default="text", description="CSV/TSV/JSONL: the transcript column")
    extension: str = Field(default=".wav", description="Sphinx: appended to the file id")

    def _transcripts(self) -> Path | URIPath:
        root = input_path(self.root)
        if not root.is_dir():
            raise DatasetError(f"{root}: no such audio folder")
        if self.transcripts:
            path = input_path(self.transcripts)
            path = path if path.is_absolute() else root / self.transcripts
            if not path.is_file():
                raise DatasetError(f"{path}: no such transcript file")
            return path
        # The name first: on a URI each is_file() is a request.
        found = sorted(p for p in root.iterdir() if (
            p.name == "transcription" or p.suffix == ".transcription") and p.is_file())
        if len(found) != 1:
            raise DatasetError(f"{root}: found {len(found)} Sphinx transcription files "
                               f"({', '.join(p.name for p in found) or 'none'}); set transcripts")
        return found[0]

    def files(self) -> list[Path | URIPath]:
        # The transcript only: a stat of every clip would make the cache key cost a walk of the set.
        try:
            return [self._transcripts()]
        except DatasetError:
            return []  # the stage itself then fails with the message

    def load(self, media: str) -> bytes:
        return read_media(input_path(self.root) / media, "audio")

    def _format(self, path: Path | URIPath) -> str:
        if self.format != "auto":
            return self.format
        if path.name == "transcription" or path.suffix == ".transcription":
            return "sphinx"
        fmt = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
               ".ndjson": "jsonl"}.get(path.suffix.lower())
        if fmt is None:
            raise DatasetError(f"{path}: cannot tell the transcript format from the name; set "
                               f"format: csv, tsv, jsonl or sphinx")
        return fmt

    def items(self, q: Quarantine) -> Iterator[Item]:
        path = self._transcripts()
        root = input_path(self.root)
        exists = file_checker(root)
        fmt = self._format(path)
        records = self._sphinx(path, q) if fmt == "sphinx" else self._table(path, fmt, q)
        found: dict[str, Item] = {}
        missing: set[str] = set()
        for where, item_id, media, texts, meta in records:
            if media in missing or (media not in found and not exists(media)):
                missing.add(media)
                q.bad(where, "audio file not found", str(root / media))
                continue
            if media in found and (conflict := split_conflict(found[media], meta)):
                q.bad(where, conflict, media)
                continue
            found.setdefault(media, Item(id=item_id, media=media, meta=meta,
                                         where=where)).texts += texts
        yield from found.values()

    def _table(self, path: Path | URIPath, fmt: str, q: Quarantine
               ) -> Iterator[tuple[str, str, str, list[str], dict[str, Any]]]:
        """CSV, TSV or JSONL records; the item id is the normalised path; of the other columns only
        ``split`` is kept (the meta)."""
        for where, rel, texts, other in read_records(path, fmt, self.file_column, self.text_column,
                                                     q, params="file_column / text_column"):
            yield where, rel, rel, texts, {"split": other["split"]} if "split" in other else {}

    def _sphinx(self, path: Path | URIPath, q: Quarantine
                ) -> Iterator[tuple[str, str, str, list[str], dict[str, Any]]]:
        for no, line in read_lines(path, q):
            if not line.strip():
                continue
            where = f"{path}:{no}"
            m = _SPHINX_LINE.match(line.rstrip("\r\n"))
            if m is None:
                q.bad(where, "expected '<s> text </s> (fileid)'", line.rstrip("\r\n"))
                continue
            text = " ".join(_SPHINX_MARKS.sub("", m["text"]).split())
            yield where, m["id"], m["id"] + self.extension, [text], {}


@dataset("hf_audio")
class HFAudio(HFDataset):
    """A Hugging Face ``datasets`` table: a ``save_to_disk`` folder, or a Hub name (fails at once
    under ``HF_HUB_OFFLINE=1``). ``audio_column`` holds encoded files (bytes, or an ``Audio()``
    feature, read undecoded) or samples (a list of numbers with ``sampling_rate_column`` or
    ``sampling_rate``; or ``{"array", "sampling_rate"}``); ``text_column`` a string or a list of
    strings. Item media = the row number; item id = the ``id_column`` value, else the row number.
    Encoded files are raw bytes or ``{"bytes": ..., "path": ...}`` as the ``Audio()`` feature stores
    them (see the module docstring for why they are read undecoded).
    """

    modality: ClassVar[str] = "audio"
    audio_column: str = "audio"
    sampling_rate_column: str = Field(
        default="sampling_rate",
        description="per-row rate of sample arrays, used when the table has it")
    sampling_rate: int | None = Field(default=None, gt=0,
                                      description="rate of sample arrays when no column gives it")
    _rows: Any = PrivateAttr(default=None)  # the audio column in Arrow form, opened on first load()
    _kind: str | None = PrivateAttr(default=None)

    def _audio_kind(self, ds: Any) -> str:
        """How the audio column stores audio, from its feature type alone (no row is read):
        ``encoded`` (bytes or {"bytes", "path"}), ``array`` (numbers) or ``array_dict``."""
        import datasets

        if self.audio_column not in ds.column_names:
            raise DatasetError(f"{self.path}: no audio column {self.audio_column!r} (columns: "
                               f"{', '.join(ds.column_names)}); set audio_column")
        feat = ds.features[self.audio_column]
        if isinstance(feat, datasets.Audio) or (isinstance(feat, dict) and "bytes" in feat) or \
                (isinstance(feat, datasets.Value) and feat.dtype in ("binary", "large_binary")):
            return "encoded"
        if isinstance(feat, dict) and "array" in feat and "sampling_rate" in feat:
            return "array_dict"
        leaf = feat
        while isinstance(leaf, (datasets.List, datasets.LargeList)):
            leaf = leaf.feature
        if leaf is not feat and isinstance(leaf, datasets.Value) and \
                (leaf.dtype.startswith(("float", "int", "uint"))):
            if self.sampling_rate_column not in ds.column_names and self.sampling_rate is None:
                raise DatasetError(f"{self.path}: column {self.audio_column!r} holds samples; give "
                                   f"their rate with sampling_rate: or a {self.sampling_rate_column!r} "
                                   f"column")
            return "array"
        raise DatasetError(f"{self.path}: column {self.audio_column!r} is {feat}, not audio (expected "
                           f"bytes, an Audio() feature, or a list of samples)")

    def _name(self) -> str:
        return f"{self.path}[{self.split}]" if self.split else self.path

    def items(self, q: Quarantine) -> Iterator[Item]:
        return unique_ids(self._items(q), q)

    def _items(self, q: Quarantine) -> Iterator[Item]:
        ds, split = open_hf_split(self.path, self.split)
        self._audio_kind(ds)  # a column that holds no audio fails the listing, not every load
        missing = [c for c in (self.text_column, self.id_column) if c and c not in ds.column_names]
        if missing:
            raise DatasetError(f"{self.path}: no column {', '.join(map(repr, missing))} (columns: "
                               f"{', '.join(ds.column_names)}); set text_column / id_column")
        yield from hf_items(ds, self._name(), self.text_column, self.id_column, q, self.split_column,
                            split)

    def load(self, media: str) -> bytes | AudioClip:
        if self._rows is None:
            ds = open_hf_dataset(self.path, self.split)
            self._kind = self._audio_kind(ds)
            cols = [self.audio_column]
            if self._kind == "array" and self.sampling_rate_column in ds.column_names:
                cols.append(self.sampling_rate_column)
            # Arrow form: the stored values as they are, so no Audio() decoding (torchcodec) and
            # sample arrays come out as numpy without a detour through Python floats.
            self._rows = ds.select_columns(cols).with_format("arrow")
        where = f"{self._name()} row {media}"
        row = self._rows[int(media)]
        value = row.column(self.audio_column)[0]
        if not value.is_valid:
            raise ValueError(f"{where}: no audio (null)")
        if self._kind == "encoded":
            return self._encoded(value.as_py(), where)
        if self._kind == "array_dict":
            samples, rate = value["array"], value["sampling_rate"].as_py()
        else:
            samples = value
            rate = row.column(self.sampling_rate_column)[0].as_py() \
                if self.sampling_rate_column in row.column_names else self.sampling_rate
        if not rate or rate <= 0:
            raise ValueError(f"{where}: no sampling rate")
        return AudioClip(samples=_numpy(samples), sample_rate=int(rate))

    def _encoded(self, value: Any, where: str) -> bytes:
        if isinstance(value, bytes):
            return value
        if value.get("bytes"):   # an Audio() feature with embedded bytes
            return value["bytes"]
        if value.get("path"):    # an Audio() feature naming a file
            path = Path(value["path"])
            return read_media(path if path.is_absolute() else input_path(self.path) / value["path"],
                              "audio")
        raise ValueError(f"{where}: column {self.audio_column!r} holds neither bytes nor a path")


def _numpy(samples: Any) -> np.ndarray:
    """A list scalar of samples as an array: (n,), or (n, channels) for a list of frames."""
    import pyarrow as pa

    values = samples.values
    if pa.types.is_nested(values.type):  # frames of channels
        return np.asarray(samples.as_py())
    return values.to_numpy(zero_copy_only=False)


@dataset("spoken_captions")
class SpokenCaptions(MediaDataset):
    """The captions of another dataset, spoken by espeak-ng: one audio item per caption.

    Item id = ``<base id>#<k>`` (k-th caption of the base item); texts = that caption; meta = the
    base item's meta plus ``base_id``, ``base_media`` and ``base_type`` (these win over base meta of
    the same name, so the join keys are always there). A base item without captions is quarantined;
    an empty caption is listed (the feature stage records it) and its ``load`` raises.
    """

    modality: ClassVar[str] = "audio"
    base: dict[str, Any] = Field(description="the dataset whose captions are spoken, as a spec: "
                                             "{type: emoji, path: ...}")
    voice: str = Field(default="en-us", description="espeak-ng voice or language (speech.tts)")
    rate: int = Field(default=175, ge=tts.RATE_RANGE[0], le=tts.RATE_RANGE[1],
                      description="words per minute")
    pitch: int = Field(default=50, ge=tts.PITCH_RANGE[0], le=tts.PITCH_RANGE[1])
    seed: int = Field(default=0, ge=0, description="seeds the per-caption jitter")
    jitter: float = Field(default=0.0, ge=0, lt=1,
                          description="rate and pitch vary by up to this fraction per caption")
    captions: Literal["all", "first"] = Field(default="all",
                                              description="speak every caption or the first")
    _base: MediaDataset = PrivateAttr()

    @model_validator(mode="after")
    def _build_base(self) -> SpokenCaptions:
        try:
            self._base = build_dataset(self.base)
        except ValidationError as e:  # name the nested fields from here: base.<field>
            raise ValueError("; ".join(f"base.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                       for err in e.errors())) from None
        except (KeyError, ValueError) as e:  # an unknown type (the registry's message), no type
            raise ValueError(f"base: {e.args[0]}") from None
        return self

    def files(self) -> list[Path]:
        return self._base.files()

    def fingerprint(self) -> Any:
        # A new espeak-ng speaks differently: its version belongs to the key, next to the base's.
        try:
            engine = importlib.metadata.version("espeakng-loader")
        except importlib.metadata.PackageNotFoundError:
            engine = None
        return {"base": self._base.fingerprint(), "espeakng-loader": engine}

    def items(self, q: Quarantine) -> Iterator[Item]:
        try:  # once here rather than in every worker: no espeak-ng, or a misspelt voice
            tts.check_voice(self.voice)
        except (ImportError, ValueError) as e:
            raise DatasetError(f"spoken_captions: {e}") from None
        for item in self._base.items(q):
            captions = item.texts[:1] if self.captions == "first" else item.texts
            if not captions:
                q.bad(item.where or item.id, "no caption to speak", item.id)
                continue
            for k, caption in enumerate(captions):
                meta = {**item.meta, "base_id": item.id, "base_media": item.media,
                        "base_type": self._base.type}
                yield Item(id=f"{item.id}#{k}", media=json.dumps([caption, k, item.id],
                                                                 ensure_ascii=False),
                           texts=[caption], meta=meta, where=item.where)

    def load(self, media: str, max_seconds: float | None = None) -> AudioClip:
        """The caption spoken; with ``max_seconds``, a caption whose speech would be longer raises
        ``ValueError`` before or during synthesis (:func:`speech.tts.synthesize`), never after."""
        caption = json.loads(media)[0]
        if not caption.strip():
            raise ValueError("empty caption, nothing to synthesise")
        return tts.synthesize(caption, voice=self.voice, rate=self.rate, pitch=self.pitch,
                              seed=self.seed, jitter=self.jitter, max_seconds=max_seconds)
