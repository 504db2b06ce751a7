"""A knowledge source from a separate package, exactly as the README's recipe shows it.

It reads a toy "family tree" format: one line per person, ``name: parent, parent``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from knowledge.sources import Entity, KnowledgeSource, Quarantine, Relation, Triple, read_lines, source


@source("family")
class FamilySource(KnowledgeSource):
    """People and their parents from a ``name: parent, parent`` file."""

    path: str

    def files(self) -> list[Path]:
        return [Path(self.path)]  # edits to the file re-run ingest

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        for _, name, _ in self._rows(q):
            yield Entity(name.lower(), name=name, types=["person"])

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        yield Relation("parent", name="has parent")

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        for where, name, parents in self._rows(q):
            for p in parents:
                yield Triple(name.lower(), "parent", p.lower(), where=where)

    def _rows(self, q: Quarantine) -> Iterator[tuple[str, str, list[str]]]:
        for no, line in read_lines(self.path, q):
            name, sep, rest = line.partition(":")
            if not sep or not name.strip():
                q.bad(f"{self.path}:{no}", "expected 'name: parent, parent'", line)
                continue
            yield f"{self.path}:{no}", name.strip(), [p.strip() for p in rest.split(",") if p.strip()]
