"""Wikidata (any Wikibase) JSON dump as a knowledge source, read as a stream.

Format (https://www.wikidata.org/wiki/Wikidata:Database_download#JSON_dumps_(recommended) and
https://doc.wikimedia.org/Wikibase/master/php/docs_topics_json.html): ``latest-all.json`` (``.gz``
or ``.bz2``) is one JSON array with one entity object per line: the first line is ``[``, the last
``]``, every entity line but the last ends with ``,``. An entity looks like::

    {"type":"item","id":"Q42","labels":{"en":{"language":"en","value":"Douglas Adams"}},
     "descriptions":{"en":{...}},"aliases":{"en":[{"language":"en","value":"DNA"}]},
     "claims":{"P31":[{"mainsnak":{"snaktype":"value","property":"P31","datatype":"wikibase-item",
        "datavalue":{"value":{"entity-type":"item","numeric-id":5,"id":"Q5"},
                     "type":"wikibase-entityid"}},"type":"statement","rank":"normal"}]}, ...},

The file is read line by line (never whole), so a dump of any size streams in constant memory.

Mapping:

- Entities are the items (``Q...``): label / aliases / description in ``language``.
- Triples are the claims whose main snak has an item value (``datavalue.type ==
  "wikibase-entityid"`` with ``entity-type`` ``item``): (item, property id, value item). Claims
  with ``somevalue`` / ``novalue`` snaks or literal values (strings, dates, quantities) are not
  edges; deprecated-rank statements are left out as Wikidata marks them as known to be wrong.
  Qualifiers and references are not mapped. ``properties`` restricts the property ids kept.
- Relations are the property ids (``P31``), named by the labels of the property entities (``P...``)
  found in the dump; properties without one are named by ingest from their ids.
- ``max_entities`` stops after that many items (property entities do not count), e.g. to sample.

A line that is not JSON, or not an entity object, is quarantined with its line number. Entities,
relations and triples each read the file; every bad line is reported once per source object.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field, PrivateAttr

from pipeline.quarantine import describe
from pipeline.uris import InputURI, URIPath, input_path, open_input

from .base import Entity, KnowledgeSource, Quarantine, Relation, SourceError, Triple, source


@source("wikidata")
class WikidataSource(KnowledgeSource):
    """A Wikidata (Wikibase) JSON dump, streamed: labels, aliases, descriptions, item claims."""

    path: InputURI = Field(description="the dump (.json, .json.gz, .json.bz2); a path or a URI")
    language: str = Field(default="en", description="language of labels, aliases, descriptions")
    properties: list[str] | None = Field(default=None,
                                         description="property ids to keep (default: all)")
    max_entities: int | None = Field(default=None, description="stop after this many items")

    _reported: set = PrivateAttr(default_factory=set)
    _property_names: dict[str, str] | None = PrivateAttr(default=None)

    def files(self) -> list[Path | URIPath]:
        return [input_path(self.path)]

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        path = input_path(self.path)
        if not path.is_file():
            raise SourceError(f"{path}: no such file")
        compression = {".gz": "gzip", ".bz2": "bz2"}.get(path.suffix)
        with open_input(path, "rb", compression=compression) as f:
            yield from enumerate(f, 1)

    def _bad(self, q: Quarantine, where: str, reason: str, text: str) -> None:
        if where not in self._reported:
            self._reported.add(where)
            q.bad(where, reason, text)

    def _entities(self, q: Quarantine) -> Iterator[dict]:
        """The entity objects of the dump, items up to ``max_entities``; records property labels."""
        names: dict[str, str] = {}
        items = 0
        for no, raw in self._lines():
            line = raw.strip().rstrip(b",")
            if line in (b"", b"[", b"]"):
                continue
            try:
                ent = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                self._bad(q, f"{self.path}:{no}", f"not JSON ({describe(e)})",
                          raw.decode("utf-8", "replace"))
                continue
            if not isinstance(ent, dict) or not isinstance(ent.get("id"), str):
                self._bad(q, f"{self.path}:{no}", "not an entity object (no 'id')",
                          raw.decode("utf-8", "replace"))
                continue
            ent["_line"] = no
            if ent.get("type") == "property":
                label = self._text(ent.get("labels"))
                if label:
                    names[ent["id"]] = label
            elif ent.get("type") == "item":
                if self.max_entities is not None and items >= self.max_entities:
                    return  # stopping early: property names seen so far are not a complete set
                items += 1
            yield ent
        self._property_names = names

    def _text(self, by_lang) -> str:
        v = (by_lang or {}).get(self.language)
        return v.get("value", "") if isinstance(v, dict) else ""

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        for ent in self._entities(q):
            if ent.get("type") != "item":
                continue
            aliases = [a.get("value", "") for a in (ent.get("aliases") or {}).get(self.language, [])
                       if isinstance(a, dict)]
            yield Entity(ent["id"], name=self._text(ent.get("labels")), aliases=aliases,
                         description=self._text(ent.get("descriptions")))

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        if self._property_names is None:  # no full pass yet: one that only looks at labels
            for _ in self._entities(q):
                pass
            if self._property_names is None:  # max_entities stopped it before the end
                self._property_names = {}
        allowed = set(self.properties) if self.properties is not None else None
        for pid, name in self._property_names.items():
            if allowed is None or pid in allowed:
                yield Relation(pid, name=name)

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        allowed = set(self.properties) if self.properties is not None else None
        for ent in self._entities(q):
            if ent.get("type") != "item":
                continue
            where = f"{self.path}:{ent['_line']}"
            claims = ent.get("claims") or {}
            if not isinstance(claims, dict):
                self._bad(q, where, "'claims' is not an object", ent["id"])
                continue
            for pid, statements in claims.items():
                if allowed is not None and pid not in allowed:
                    continue
                for st in statements if isinstance(statements, list) else [statements]:
                    try:
                        tail = _item_value(st)
                    except (AttributeError, TypeError, ValueError, KeyError) as e:
                        self._bad(q, f"{where}:{pid}", f"malformed {pid} claim ({describe(e)})",
                                  json.dumps(st)[:200])
                        continue
                    if tail is not None:
                        yield Triple(ent["id"], pid, tail, where=where)


def _item_value(statement) -> str | None:
    """The item id a statement's main snak points at, or None for any other kind of claim;
    raises on a statement that is not shaped like one."""
    if statement.get("rank") == "deprecated":
        return None
    dv = statement["mainsnak"].get("datavalue") or {}
    if dv.get("type") != "wikibase-entityid":
        return None
    value = dv["value"]
    if value.get("entity-type", "item") != "item":
        return None  # properties, lexemes, forms, senses as values are not items
    if "id" in value:
        return str(value["id"])
    return f"Q{int(value['numeric-id'])}"  # older dumps carry only the number
