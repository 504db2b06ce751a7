"""The wikidata source on a tiny dump in exactly the format of latest-all.json."""

from __future__ import annotations

import bz2
import gzip
import json

import pytest

import knowledge.sources.wikidata  # noqa: F401 - registers "wikidata"
from knowledge.sources import SOURCES, Quarantine, SourceError, build_source


def _label(lang, value):
    return {lang: {"language": lang, "value": value}}


def _claim(subject, pid, value, rank="normal", snaktype="value", datatype="wikibase-item"):
    snak = {"snaktype": snaktype, "property": pid, "datatype": datatype}
    if snaktype == "value":
        snak["datavalue"] = value
    return {"mainsnak": snak, "type": "statement", "id": f"{subject}$1", "rank": rank}


def _item_value(qid):
    return {"value": {"entity-type": "item", "numeric-id": int(qid[1:]), "id": qid},
            "type": "wikibase-entityid"}


ENTITIES = [
    {"type": "item", "id": "Q42", "labels": {**_label("en", "Douglas Adams"), **_label("fr", "D. A.")},
     "descriptions": _label("en", "English author"),
     "aliases": {"en": [{"language": "en", "value": "DNA"},
                        {"language": "en", "value": "Douglas Noel Adams"}]},
     "claims": {
         "P31": [_claim("Q42", "P31", _item_value("Q5"))],
         "P27": [_claim("Q42", "P27", {"value": {"entity-type": "item", "numeric-id": 145},
                                         "type": "wikibase-entityid"}),  # old dumps: no "id"
                 _claim("Q42", "P27", _item_value("Q30"), rank="deprecated")],
         "P569": [_claim("Q42", "P569", {"value": {"time": "+1952-03-11T00:00:00Z"}, "type": "time"},
                         datatype="time")],
         "P735": [_claim("Q42", "P735", None, snaktype="somevalue")],
         "P1647": [_claim("Q42", "P1647", {"value": {"entity-type": "property", "numeric-id": 1,
                                                     "id": "P1"}, "type": "wikibase-entityid"},
                          datatype="wikibase-property")],
     },
     "sitelinks": {"enwiki": {"site": "enwiki", "title": "Douglas Adams", "badges": []}},
     "lastrevid": 1, "modified": "2024-01-01T00:00:00Z"},
    {"type": "property", "datatype": "wikibase-item", "id": "P31",
     "labels": _label("en", "instance of"), "descriptions": {}, "aliases": {}, "claims": {}},
    {"type": "item", "id": "Q5", "labels": _label("en", "human"), "descriptions": {}, "aliases": {},
     "claims": {"P279": [_claim("Q5", "P279", _item_value("Q215627"))]}, "sitelinks": {}},
    {"type": "item", "id": "Q145", "labels": _label("de", "Vereinigtes Königreich"),
     "descriptions": {}, "aliases": {}, "claims": {}, "sitelinks": {}},
]


def write_dump(path, entities=ENTITIES, extra_lines=(), opener=open):
    """The dump's layout: '[' line, one entity per line ending with ',', last entity bare, ']'."""
    lines = [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in entities]
    lines[1:1] = list(extra_lines)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")
    return path


def _read(src, q):
    ents = {e.id: e for e in src.entities(q)}
    rels = {r.id: r.name for r in src.relations(q)}
    return ents, rels, [(t.head, t.relation, t.tail) for t in src.triples(q)]


@pytest.mark.parametrize("suffix,opener", [("", open), (".gz", gzip.open), (".bz2", bz2.open)])
def test_dump_mapping(tmp_path, suffix, opener):
    p = write_dump(tmp_path / f"latest-all.json{suffix}", opener=opener)
    src = SOURCES.get("wikidata")(path=str(p))
    ents, rels, triples = _read(src, Quarantine("wikidata"))
    assert triples == [("Q42", "P31", "Q5"), ("Q42", "P27", "Q145"), ("Q5", "P279", "Q215627")]
    assert list(ents) == ["Q42", "Q5", "Q145"]  # items only, not the property
    q42 = ents["Q42"]
    assert (q42.name, q42.aliases, q42.description) == (
        "Douglas Adams", ["DNA", "Douglas Noel Adams"], "English author")
    assert ents["Q145"].name == ""  # no English label
    assert rels == {"P31": "instance of"}
    assert src.files() == [p]


def test_language_properties_and_max_entities(tmp_path):
    p = write_dump(tmp_path / "latest-all.json")
    src = build_source({"type": "wikidata", "path": str(p), "language": "fr",
                        "properties": ["P27", "P279"]})
    ents, rels, triples = _read(src, Quarantine("wikidata"))
    assert ents["Q42"].name == "D. A." and ents["Q42"].description == ""
    assert triples == [("Q42", "P27", "Q145"), ("Q5", "P279", "Q215627")]
    assert rels == {}
    src = SOURCES.get("wikidata")(path=str(p), max_entities=1)
    ents, rels, triples = _read(src, Quarantine("wikidata"))
    assert list(ents) == ["Q42"] and [t[0] for t in triples] == ["Q42", "Q42"]
    assert rels == {}  # P31's entity comes after the first item: not read


def test_bad_json_line(tmp_path):
    p = write_dump(tmp_path / "latest-all.json", extra_lines=['{"type":"item","id":"Q9",', "[1, 2]"])
    with pytest.raises(SourceError, match=r"latest-all\.json:3: not JSON"):
        list(SOURCES.get("wikidata")(path=str(p)).entities(Quarantine("wikidata")))
    q = Quarantine("wikidata", "skip")
    src = SOURCES.get("wikidata")(path=str(p), on_error="skip")
    ents, _, triples = _read(src, q)
    assert list(ents) == ["Q42", "Q5", "Q145"] and len(triples) == 3
    s = q.summary()
    assert s["count"] == 2  # once each, although three passes read the file
    assert [e["where"] for e in s["examples"]] == [f"{p}:3", f"{p}:4"]
    assert s["examples"][1]["reason"] == "not an entity object (no 'id')"


def test_malformed_claim(tmp_path):
    bad = {"type": "item", "id": "Q1", "labels": {}, "claims": {
        "P31": [{"mainsnak": {"snaktype": "value", "property": "P31",
                              "datavalue": {"value": "Q5", "type": "wikibase-entityid"}},
                 "type": "statement", "rank": "normal"}]}}
    p = write_dump(tmp_path / "latest-all.json", entities=[bad, ENTITIES[2]])
    with pytest.raises(SourceError, match=r"latest-all\.json:2:P31: malformed P31 claim"):
        list(SOURCES.get("wikidata")(path=str(p)).triples(Quarantine("wikidata")))
    q = Quarantine("wikidata", "skip")
    triples = list(SOURCES.get("wikidata")(path=str(p), on_error="skip").triples(q))
    assert [(t.head, t.tail) for t in triples] == [("Q5", "Q215627")] and q.count == 1


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        list(SOURCES.get("wikidata")(path=str(tmp_path / "x.json")).triples(Quarantine("w")))


def test_malformed_claim_reason_names_what_is_missing(tmp_path):
    bad = {"type": "item", "id": "Q1", "labels": {}, "claims": {
        "P31": [{"type": "statement", "rank": "normal"}],  # no mainsnak
        "P279": [{"type": "statement", "rank": "normal"}]}}
    p = write_dump(tmp_path / "latest-all.json", entities=[bad, ENTITIES[2]])
    q = Quarantine("wikidata", "skip")
    list(SOURCES.get("wikidata")(path=str(p), on_error="skip").triples(q))
    assert q.by_reason == {"malformed P31 claim (missing key 'mainsnak')": 1,
                           "malformed P279 claim (missing key 'mainsnak')": 1}
