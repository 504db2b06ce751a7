"""``triples``: head/relation/tail rows from TSV, CSV or JSONL files (optionally gzipped).

One file (``path``) or one file per split (``splits: {train: ..., valid: ..., test: ...}``). Columns
are chosen by ``columns`` (positions for TSV/CSV without a header; names for JSONL or with
``header: true``). Optional label files (``entity_labels``, ``relation_labels``: TSV ``id, name``
and, for entities, optional further columns of aliases) give readable names.

Bad rows (a column count other than the header's, or without a header the first row's; empty
fields, undecodable bytes, malformed JSON) are reported with file and line: an error by default,
counted and sampled with ``on_error: skip``. Files that give no triple at all (empty, only a header,
every line quarantined) are named by :meth:`TriplesSource.why_no_triples` when ingest fails.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.readers import json_objects
from pipeline.uris import InputURI, URIPath, input_path

from .base import Entity, KnowledgeSource, Quarantine, Relation, SourceError, Triple, read_lines, source


class Columns(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head: int | str = 0
    relation: int | str = 1
    tail: int | str = 2


def _format_of(path: Path | URIPath) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    return {"tsv": "tsv", "txt": "tsv", "csv": "csv", "jsonl": "jsonl", "json": "jsonl"}.get(ext, "tsv")


@source("triples")
class TriplesSource(KnowledgeSource):
    """Triples from delimited or JSON-lines files."""

    path: InputURI | None = Field(default=None, description="one file of triples (all train unless "
                                                            "split); a path or a URI (s3://...)")
    splits: dict[Literal["train", "valid", "test"], InputURI] | None = Field(
        default=None, description="one file per split: {train: ..., valid: ..., test: ...}")
    format: Literal["auto", "tsv", "csv", "jsonl"] = Field(
        default="auto", description="auto: from the suffix (.tsv/.txt, .csv, .jsonl/.json)")
    header: bool = Field(default=False, description="TSV/CSV: the first line names the columns")
    columns: Columns = Field(default=Columns(), description="0-based positions, or names (with a "
                                                            "header, and for JSONL)")
    entity_labels: InputURI | None = Field(default=None, description="TSV: id, name[, alias, ...]")
    relation_labels: InputURI | None = Field(default=None, description="TSV: id, name")

    @model_validator(mode="after")
    def _one_of(self) -> "TriplesSource":
        if (self.path is None) == (self.splits is None):
            raise ValueError("give either 'path' or 'splits'")
        return self

    def files(self) -> list[Path | URIPath]:
        paths = [self.path] if self.path else list((self.splits or {}).values())
        paths += [p for p in (self.entity_labels, self.relation_labels) if p]
        return [input_path(p) for p in paths]

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        parts = [(None, self.path)] if self.path else list((self.splits or {}).items())
        for split, path in parts:
            yield from self._read(input_path(path), split, q)

    def _read(self, path: Path | URIPath, split: str | None, q: Quarantine) -> Iterator[Triple]:
        fmt = _format_of(path) if self.format == "auto" else self.format
        cols = (self.columns.head, self.columns.relation, self.columns.tail)
        if fmt == "jsonl":
            if any(isinstance(c, int) for c in cols):
                raise SourceError(f"{path}: JSONL needs column names, e.g. columns: "
                                  "{head: h, relation: r, tail: t}")
            for where, row, line in json_objects(path, q):
                yield from self._triple([row.get(c) for c in cols], where, split, line, q)
            return
        delim = "\t" if fmt == "tsv" else ","
        index: tuple[int, ...] | None = None
        # Every row has as many columns as the header (header: true) or, without one, as the first
        # row that can be read: a row that differs (a stray tab, a missing cell) is quarantined,
        # not read by position as if nothing were wrong. A file whose every row has more columns
        # than ``columns`` uses is fine.
        width: int | None = None
        for no, line in read_lines(path, q):
            if not line.strip():
                continue
            row = next(csv.reader(io.StringIO(line), delimiter=delim)) if fmt == "csv" \
                else line.split(delim)
            where = f"{path}:{no}"
            if self.header and index is None:
                index = self._header_index(row, cols, where)
                width = len(row)
                continue
            if index is None:
                if not all(isinstance(c, int) for c in cols):
                    raise SourceError(f"{path}: column names {cols} need header: true")
                index = tuple(int(c) for c in cols)
            if width is not None and len(row) != width:
                q.bad(where, f"expected {width} columns, found {len(row)}", line)
                continue
            if max(index) >= len(row):
                q.bad(where, f"expected at least {max(index) + 1} columns, found {len(row)}", line)
                continue
            width = len(row)
            yield from self._triple([row[i] for i in index], where, split, line, q)

    def why_no_triples(self, q: Quarantine) -> str:
        """Per file: empty, only a header, or how many lines were all quarantined (and why)."""
        parts = [(None, self.path)] if self.path else list((self.splits or {}).items())
        out = []
        for _, path in parts:
            path = input_path(path)
            fmt = _format_of(path) if self.format == "auto" else self.format
            count = Quarantine(str(path), "skip")  # undecodable lines are lines too
            lines = sum(1 for _, line in read_lines(path, count) if line.strip()) + count.count
            header = int(self.header and fmt != "jsonl")
            if lines == 0:
                out.append(f"{path}: file empty")
            elif lines <= header:
                out.append(f"{path}: only a header")
            else:
                out.append(f"{path}: all {lines - header} lines quarantined")
        why = ", ".join(out)
        return f"{why} ({q.reasons()})" if q.count else why

    @staticmethod
    def _header_index(row: list[str], cols: tuple, where: str) -> tuple[int, ...]:
        out = []
        for c in cols:
            if isinstance(c, int):
                out.append(c)
            elif c in row:
                out.append(row.index(c))
            else:
                raise SourceError(f"{where}: header has no column {c!r} (columns: {row})")
        return tuple(out)

    @staticmethod
    def _triple(values: list, where: str, split: str | None, line: str,
                q: Quarantine) -> Iterator[Triple]:
        clean = [str(v).strip() if v is not None else "" for v in values]
        empty = [str(c) for c, v in zip(("head", "relation", "tail"), clean) if not v]
        if empty:
            q.bad(where, f"empty field(s): {', '.join(empty)}", line)
            return
        yield Triple(clean[0], clean[1], clean[2], split=split, where=where)

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        for no, row in self._labels(self.entity_labels, q):
            yield Entity(row[0], name=row[1] if len(row) > 1 else "",
                         aliases=[a for a in row[2:] if a])

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        for no, row in self._labels(self.relation_labels, q):
            yield Relation(row[0], name=row[1] if len(row) > 1 else "")

    @staticmethod
    def _labels(path: str | None, q: Quarantine) -> Iterator[tuple[int, list[str]]]:
        if not path:
            return
        for no, line in read_lines(path, q):
            if not line.strip():
                continue
            row = [c.strip() for c in line.split("\t")]
            if not row[0]:
                q.bad(f"{path}:{no}", "empty id", line)
                continue
            yield no, row
