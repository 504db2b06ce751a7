"""The rdf source on tiny N-Triples and Turtle files."""

from __future__ import annotations

import pytest

import knowledge.sources.rdf  # noqa: F401 - registers "rdf"
from knowledge.sources import SOURCES, Quarantine, SourceError, build_source

EX = "http://example.org/"
RDFS = "http://www.w3.org/2000/01/rdf-schema#"
RDF_TYPE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type"
SKOS = "http://www.w3.org/2004/02/skos/core#"

TTL = f"""@prefix ex: <{EX}> .
@prefix rdfs: <{RDFS}> .
@prefix skos: <{SKOS}> .

ex:alice a ex:Person ;
    rdfs:label "Alice"@en, "Alicia"@es ;
    skos:altLabel "Ali"@en ;
    rdfs:comment "A person." ;
    ex:knows ex:bob ;
    ex:age 42 .
ex:bob ex:worksFor ex:acme .
ex:knows rdfs:label "knows"@en .
ex:carol rdfs:label "Carol" ; a ex:Person .
"""


def _read(src, on_error="raise"):
    q = Quarantine("rdf", on_error)
    return list(src.entities(q)), list(src.relations(q)), list(src.triples(q)), q


def test_turtle_mapping(tmp_path):
    p = tmp_path / "g.ttl"
    p.write_text(TTL)
    src = SOURCES.get("rdf")(path=str(p))
    ents, rels, triples, q = _read(src)
    assert [(t.head, t.relation, t.tail) for t in triples] == [
        (EX + "alice", EX + "knows", EX + "bob"),
        (EX + "bob", EX + "worksFor", EX + "acme"),
    ]  # no rdf:type edge, no literal-valued edge
    by_id = {e.id: e for e in ents}
    assert set(by_id) == {EX + "alice", EX + "bob", EX + "acme"}  # carol has no edge
    alice = by_id[EX + "alice"]
    assert alice.name == "Alice"
    assert alice.aliases == ["Alicia", "Ali"]
    assert alice.description == "A person."
    assert alice.types == [EX + "Person"]
    assert by_id[EX + "bob"].name == "" and by_id[EX + "bob"].types == []
    assert {r.id: r.name for r in rels} == {EX + "knows": "knows", EX + "worksFor": "worksFor"}
    assert q.count == 0
    assert src.files() == [p]


def test_ntriples_same_graph_and_build_source(tmp_path):
    p = tmp_path / "g.nt"
    p.write_text(
        f"<{EX}a> <{EX}r> <{EX}b> .\n"
        f"# a comment\n"
        f"<{EX}a> <{RDFS}label> \"A\" .\n"
        f"<{EX}a> <{RDF_TYPE}> <{EX}T> .\n"
        f"<{EX}b> <{EX}r> <{EX}c> .\n")
    src = build_source({"type": "rdf", "path": str(p)})
    ents, rels, triples, _ = _read(src)
    assert [(t.head, t.tail) for t in triples] == [(EX + "a", EX + "b"), (EX + "b", EX + "c")]
    assert [(e.id, e.name, e.types) for e in ents] == [
        (EX + "a", "A", [EX + "T"]), (EX + "b", "", []), (EX + "c", "", [])]
    assert [(r.id, r.name) for r in rels] == [(EX + "r", "r")]


def test_format_override_and_unknown_suffix(tmp_path):
    p = tmp_path / "g.rdfdata"
    p.write_text(f"<{EX}a> <{EX}r> <{EX}b> .\n")
    with pytest.raises(SourceError, match="format"):
        list(SOURCES.get("rdf")(path=str(p)).triples(Quarantine("rdf")))
    triples = list(SOURCES.get("rdf")(path=str(p), format="nt").triples(Quarantine("rdf")))
    assert len(triples) == 1


def test_turtle_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.ttl"
    p.write_text(f"@prefix ex: <{EX}> .\nex:a ex:r ex:b .\nex:a ex:r ;; ] .\n")
    src = SOURCES.get("rdf")(path=str(p))
    with pytest.raises(SourceError, match=rf"bad\.ttl:3: Turtle syntax error"):
        list(src.triples(Quarantine("rdf")))


def test_ntriples_bad_line_raises_then_skips(tmp_path):
    p = tmp_path / "bad.nt"
    p.write_text(f"<{EX}a> <{EX}r> <{EX}b> .\n<{EX}a> <{EX}r> oops .\n<{EX}b> <{EX}r> <{EX}c> .\n")
    src = SOURCES.get("rdf")(path=str(p))
    with pytest.raises(SourceError, match=r"bad\.nt:2: N-Triples syntax error"):
        list(src.triples(Quarantine("rdf")))

    src = SOURCES.get("rdf")(path=str(p), on_error="skip")
    ents, rels, triples, q = _read(src, "skip")
    assert len(triples) == 2
    s = q.summary()
    assert s["count"] == 1  # reported once although three streams were read
    assert s["examples"][0]["where"] == f"{p}:2"
    assert "oops" in s["examples"][0]["text"]


def test_blank_node_edges_are_quarantined(tmp_path):
    p = tmp_path / "b.ttl"
    p.write_text(f"@prefix ex: <{EX}> .\nex:a ex:r [ ex:s ex:b ] .\nex:a ex:r ex:c .\n")
    with pytest.raises(SourceError, match="blank node"):
        list(SOURCES.get("rdf")(path=str(p)).triples(Quarantine("rdf")))
    q = Quarantine("rdf", "skip")
    triples = list(SOURCES.get("rdf")(path=str(p), on_error="skip").triples(q))
    assert [(t.head, t.tail) for t in triples] == [(EX + "a", EX + "c")]
    assert q.count == 2  # a -> [] and [] -> b


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        list(SOURCES.get("rdf")(path=str(tmp_path / "none.nt")).triples(Quarantine("rdf")))


BLANKS_TTL = (f"@prefix ex: <{EX}> .\n"
              "ex:a ex:r ex:b .\n"
              "ex:a ex:r [ ex:s ex:c ] .\n"
              "\n"
              "ex:d ex:r\n"
              "    ex:e , [] .\n"
              "\"lit\" ex:r ex:f .\n"
              "ex:g \"p\" ex:h .\n")


def test_turtle_quarantine_records_name_the_line_and_read_the_same_every_run(tmp_path):
    p = tmp_path / "g.ttl"
    p.write_text(BLANKS_TTL)
    summaries = []
    for _ in range(2):  # two parses, as two runs would do them
        src = SOURCES.get("rdf")(path=str(p), on_error="skip")
        _, _, triples, q = _read(src, "skip")
        summaries.append(q.summary())
    assert summaries[0] == summaries[1]  # blank nodes are not named by random ids
    assert [(t.head, t.relation, t.tail) for t in triples] == [
        (EX + "a", EX + "r", EX + "b"), (EX + "d", EX + "r", EX + "e")]
    got = [(e["where"], e["reason"]) for e in summaries[0]["examples"]]
    assert got == [(f"{p}:3", "edge with a blank node (no stable id)"),
                   (f"{p}:3", "edge with a blank node (no stable id)"),
                   (f"{p}:6", "edge with a blank node (no stable id)"),
                   (f"{p}:7", "not an RDF statement (subject is a literal)"),
                   (f"{p}:8", "not an RDF statement (predicate is a literal)")]
    assert summaries[0]["examples"][3]["text"] == f'"lit" <{EX}r> <{EX}f>'


@pytest.mark.parametrize("body,line,what", [
    (b'ex:a ex:r ex:b .\nex:a ex:r "x"@1 .\n', 3, "not a valid language tag"),  # rdflib: ValueError
    (b'ex:a ex:r ex:b .\nex:a ex:r "\xff" .\n', 3, "undecodable bytes"),
    (b"ex:a ex:r ex:b .\n\n?x ex:r ex:b .\n", 4, "AttributeError"),  # an N3 variable
    (b'ex:a ex:r ex:b .\nex:a ex:r "x"^^"y" .\n', 3, "IndexError"),
])
def test_unparseable_turtle_names_file_and_line(tmp_path, body, line, what):
    p = tmp_path / "bad.ttl"
    p.write_bytes(f"@prefix ex: <{EX}> .\n".encode() + body)
    with pytest.raises(SourceError, match=rf"bad\.ttl:{line}: Turtle parse error.*{what}"):
        list(SOURCES.get("rdf")(path=str(p), on_error="skip").triples(Quarantine("rdf", "skip")))


def test_ntriples_reasons_group_lines_broken_the_same_way(tmp_path):
    p = tmp_path / "bad.nt"
    p.write_text(f"<{EX}a> <{EX}r> oops .\n"
                 f"<{EX}b> <{EX}r> nope .\n"
                 f"<{EX}a> <{EX}r> <{EX}b>\n"
                 f"<{EX}a> <{EX}r> \"\\UFFFFFFFF\" .\n"  # rdflib overflows on this escape
                 f"<{EX}b> <{EX}r> <{EX}c> .\n")
    ents, rels, triples, q = _read(SOURCES.get("rdf")(path=str(p), on_error="skip"), "skip")
    assert [(t.head, t.tail) for t in triples] == [(EX + "b", EX + "c")]
    assert q.by_reason == {
        "N-Triples syntax error (Unrecognised object type)": 2,
        "N-Triples syntax error (expected '.' at the end of the statement)": 1,
        "N-Triples syntax error (OverflowError: Python int too large to convert to C int)": 1}
    assert [e["where"] for e in q.examples] == [f"{p}:{i}" for i in range(1, 5)]
