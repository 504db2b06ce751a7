"""The knowledge-source interface and its registry.

A source is one pydantic model (its fields are the source's parameters, validated like stage
parameters) registered under a short name. It yields three kinds of records, with ids local to the
source; ``knowledge.ingest`` namespaces them (``wordnet:dog.n.01``), merges sources and builds the
KnowledgeGraph tables::

    @source("acme")
    class AcmeSource(KnowledgeSource):
        path: str

        def entities(self, q):  yield Entity("e1", name="Example", aliases=["Ex"])
        def relations(self, q): yield Relation("r1", name="related to")
        def triples(self, q):   yield Triple("e1", "r1", "e2")

Entities and relations that triples mention but the source does not declare are added by ingest
(named by their id), so a bare triple file is a complete source.

Bad input never disappears silently: a source reports each unusable item to the :class:`Quarantine`
it is given, with file, line and reason. With ``on_error: raise`` (the default) the first one stops the
run with that message; with ``on_error: skip`` items are counted and the first ones kept for the
manifest. Items are counted by reason, so a reason names the kind of problem; one built from an
exception goes through :func:`pipeline.quarantine.describe`, which keeps it the same from run to run.

File parameters name a local path or any fsspec URI (``s3://bucket/kg.tsv``): type them
:data:`~pipeline.uris.InputURI` (checked before anything runs) and read them with
:func:`read_lines`, :func:`~pipeline.uris.input_path` or :func:`~pipeline.uris.open_input`.

Third-party packages add sources through the ``stele.sources`` entry-point group, like stage types.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import StageFailed
from pipeline.quarantine import Quarantine as _Quarantine
from pipeline.readers import read_lines  # noqa: F401 - re-exported: sources read files with it
from pipeline.registry import Registry
from pipeline.uris import URIPath, inputs_fingerprint

SPLITS = ("train", "valid", "test")


@dataclass
class Entity:
    id: str
    name: str = ""
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    types: list[str] = field(default_factory=list)


@dataclass
class Relation:
    id: str
    name: str = ""


@dataclass
class Triple:
    head: str
    relation: str
    tail: str
    split: str | None = None  # "train" / "valid" / "test" when the source predefines splits
    where: str = ""  # "file:line" it came from, for error messages about it later


class SourceError(StageFailed):
    """Unusable input, with file and line in the message."""


class Quarantine(_Quarantine):
    """:class:`pipeline.quarantine.Quarantine` raising :class:`SourceError`."""

    error = SourceError

    def reasons(self) -> str:
        """The reasons of the quarantined items and how often each occurred, on one line:
        ``'empty field(s): relation' x2, 'expected 3 columns, found 4' x1``."""
        return ", ".join(f"{r!r} x{n}" for r, n in self.by_reason.items())


class KnowledgeSource(BaseModel):
    """Base class of every source; subclasses add their parameters as fields."""

    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str] = ""

    type: str = ""
    namespace: str | None = Field(default=None, description="id prefix (default: the source type)")
    on_error: Literal["raise", "skip"] = Field(
        default="raise", description="raise on the first unusable item, or skip and count")

    def model_post_init(self, context: Any) -> None:
        if not self.type:
            self.type = self.name

    @property
    def ns(self) -> str:
        return self.namespace or self.type

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        return iter(())

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        return iter(())

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        raise NotImplementedError

    def why_no_triples(self, q: Quarantine) -> str:
        """Why this source gave no triple, for the error of an ingest whose graph has none; ``q`` is
        the source's quarantine. Sources that know their files better (empty, only a header)
        override it."""
        files = ", ".join(map(str, self.files()))
        files = f"{files}: " if files else ""
        if q.count:
            return f"{files}no triples, {q.count} item(s) quarantined ({q.reasons()})"
        return f"{files}no triples"

    def fingerprint(self) -> Any:
        """Content that decides the cache key besides the parameters: by default the content of the
        files :meth:`files` lists (size and ETag or checksum for files on a URI), so edited data
        re-runs ingest."""
        return inputs_fingerprint(self.files())

    def files(self) -> list[Path | URIPath]:
        """Files this source reads (for the fingerprint): local paths, or URIs
        (:func:`~pipeline.uris.input_path`)."""
        return []


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


SOURCES: Registry[type[KnowledgeSource]] = Registry(group="stele.sources", kind="knowledge source",
                                                     qualname=_qualname)


def source(name: str):
    """Register a :class:`KnowledgeSource` subclass under ``name`` (its ``type:`` in pipelines)."""

    def deco(cls: type[KnowledgeSource]) -> type[KnowledgeSource]:
        if not (isinstance(cls, type) and issubclass(cls, KnowledgeSource)):
            raise TypeError(f"@source({name!r}) decorates a KnowledgeSource subclass, got {cls!r}")
        cls.name = name
        return SOURCES.register(name, cls)

    return deco


def build_source(spec: dict[str, Any]) -> KnowledgeSource:
    """A validated source from its pipeline entry (``{type: triples, path: ...}``). An unknown
    or missing type is a ``ValueError`` (with a did-you-mean), so that inside a stage's parameters
    it becomes a validation error of the pipeline (``file:line: field: message``, exit 2)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError("each source needs a 'type:' (see `stele sources`)")
    try:
        cls = SOURCES.get(spec["type"])
    except KeyError as e:  # a ValueError: a pipeline's validation reports it as file:line, exit 2
        raise ValueError(f"{e.args[0]}; see `stele sources`") from None
    return cls.model_validate(spec)
