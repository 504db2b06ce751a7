"""The media-dataset interface and its registry (entry-point group ``stele.datasets``).

A media dataset lists *items*: an id, a reference to one piece of media (an image or an audio clip),
one or more texts (captions, transcripts, names) and free metadata. Listing is cheap and happens once,
streamed; reading the media happens later, inside Ray Data workers, through :meth:`MediaDataset.load`.
So a dataset of any size never passes through one process's memory, and the same dataset object works
on every node of a cluster (it is a pydantic model: it pickles as its parameters)::

    @dataset("acme")
    class AcmeImages(MediaDataset):
        modality: ClassVar[str] = "image"
        root: str

        def items(self, q):
            for no, line in enumerate(open(Path(self.root) / "captions.txt"), 1):
                name, caption = line.rstrip("\\n").split("\\t")
                yield Item(id=name, media=name, texts=[caption], where=f"captions.txt:{no}")

        def load(self, media):
            return (Path(self.root) / media).read_bytes()

``load`` returns the encoded file (``bytes``) or, for audio that is already decoded, an
:class:`AudioClip`. Decoding, validation and conversion belong to the feature stages (``vision``,
``speech``), so every dataset gets the same bad-media handling for free.

A listing problem (a malformed caption line, a missing file named in an annotation) goes to the
:class:`~pipeline.quarantine.Quarantine` with its file and line; media stages default to
``on_error: skip``, because one bad image in a million should not stop an extraction run, and every
skipped item is listed in the stage's ``rejected`` table.

This module knows nothing about images or audio: the engine stays free of domain knowledge, and the
vision, speech and fusion packages all share one item type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import StageFailed
from .fingerprint import files_fingerprint
from .quarantine import Quarantine
from .registry import Registry


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


class MediaDataset(BaseModel):
    """Base class of every media dataset; subclasses add their parameters as fields."""

    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""     # "image" or "audio"

    type: str = ""
    on_error: Literal["raise", "skip"] = Field(
        default="skip", description="unusable records: skip and list them in the rejected table "
                                    "(default), or raise on the first")

    def model_post_init(self, context: Any) -> None:
        if not self.type:
            self.type = self.name

    def items(self, q: Quarantine) -> Iterator[Item]:
        """Every item, in a stable order; unusable records go to ``q`` with file and line."""
        raise NotImplementedError

    def load(self, media: str) -> bytes | AudioClip:
        """The media an item refers to: encoded file bytes, or a decoded :class:`AudioClip`.

        Called in Ray Data workers; raise ``OSError``/``ValueError`` with a readable message for
        media that cannot be read, and the stage records it as a rejected item.
        """
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Local files whose size and modification time decide the cache key (the annotation
        files; media files too where listing them is cheap)."""
        return []

    def fingerprint(self) -> Any:
        return files_fingerprint(self.files())


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


DATASETS: Registry[type[MediaDataset]] = Registry(group="stele.datasets", kind="media dataset",
                                                   qualname=_qualname)


def dataset(name: str):
    """Register a :class:`MediaDataset` subclass under ``name`` (its ``type:`` in pipelines)."""

    def deco(cls: type[MediaDataset]) -> type[MediaDataset]:
        if not (isinstance(cls, type) and issubclass(cls, MediaDataset)):
            raise TypeError(f"@dataset({name!r}) decorates a MediaDataset subclass, got {cls!r}")
        if cls.modality not in ("image", "audio"):
            raise TypeError(f"@dataset({name!r}): set modality = 'image' or 'audio' on {cls.__name__}")
        cls.name = name
        return DATASETS.register(name, cls)

    return deco


def build_dataset(spec: dict[str, Any]) -> MediaDataset:
    """A validated dataset from its pipeline entry (``{type: coco, annotations: ...}``)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError("a dataset needs a 'type:' (see `stele datasets`)")
    return DATASETS.get(spec["type"]).model_validate(spec)
