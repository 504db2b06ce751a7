"""The `triples`, `pykeen` and `countryinfo` sources on their real formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from knowledge.sources import SOURCES, Quarantine, SourceError, build_source


def read(src, on_error: str = "raise"):
    q = Quarantine(src.type, on_error)
    return list(src.entities(q)), list(src.relations(q)), list(src.triples(q)), q


def test_tsv_with_labels_and_gzip(tmp_path: Path) -> None:
    f = tmp_path / "kg.tsv.gz"
    with gzip.open(f, "wt") as g:
        g.write("a\tlikes\tb\nb\tlikes\tc\n\nc\tknows\ta\n")
    (tmp_path / "ent.tsv").write_text("a\tAlice\tAl\tAli\nb\tBob\n")
    (tmp_path / "rel.tsv").write_text("likes\tlikes (verb)\n")
    src = build_source({"type": "triples", "path": str(f), "entity_labels": str(tmp_path / "ent.tsv"),
                        "relation_labels": str(tmp_path / "rel.tsv")})
    ents, rels, triples, q = read(src)
    assert [(t.head, t.relation, t.tail, t.split) for t in triples] == [
        ("a", "likes", "b", None), ("b", "likes", "c", None), ("c", "knows", "a", None)]
    assert triples[2].where.endswith("kg.tsv.gz:4")
    assert ents[0].name == "Alice" and ents[0].aliases == ["Al", "Ali"] and ents[1].aliases == []
    assert rels[0].name == "likes (verb)"
    assert q.count == 0 and set(src.files()) == {f, tmp_path / "ent.tsv", tmp_path / "rel.tsv"}


def test_csv_header_columns_and_splits(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        (tmp_path / f"{split}.csv").write_text('s,p,o,extra\n"x, y",rel,z,1\n')
    src = SOURCES.get("triples")(splits={"train": str(tmp_path / "train.csv"),
                                         "valid": str(tmp_path / "valid.csv")},
                                 header=True, columns={"head": "s", "relation": "p", "tail": "o"})
    _, _, triples, _ = read(src)
    assert [(t.head, t.split) for t in triples] == [("x, y", "train"), ("x, y", "valid")]


def test_jsonl_columns(tmp_path: Path) -> None:
    f = tmp_path / "kg.jsonl"
    f.write_text(json.dumps({"h": "a", "r": "r1", "t": "b"}) + "\n")
    src = build_source({"type": "triples", "path": str(f),
                        "columns": {"head": "h", "relation": "r", "tail": "t"}})
    assert [(t.head, t.tail) for t in read(src)[2]] == [("a", "b")]
    with pytest.raises(SourceError, match="JSONL needs column names"):
        read(build_source({"type": "triples", "path": str(f)}))


BAD_LINES = ("a\tr\tb\n"
             "only\ttwo\n"                       # line 2: wrong column count
             "a\t\tb\n"                          # line 3: empty field
             ).encode() + b"\xff\xfe\tr\tb\n"    # line 4: undecodable bytes


@pytest.mark.parametrize("line,reason", [(2, "expected at least 3 columns, found 2"),
                                         (3, "empty field(s): relation"),
                                         (4, "undecodable bytes")])
def test_bad_lines_raise_with_file_and_line(tmp_path: Path, line: int, reason: str) -> None:
    f = tmp_path / "bad.tsv"
    lines = BAD_LINES.split(b"\n")
    f.write_bytes(lines[0] + b"\n" + lines[line - 1] + b"\n")
    with pytest.raises(SourceError) as e:
        read(build_source({"type": "triples", "path": str(f)}))
    assert f"{f}:2: {reason}" in str(e.value)


def test_bad_lines_skipped_are_counted_with_examples(tmp_path: Path) -> None:
    f = tmp_path / "bad.tsv"
    f.write_bytes(BAD_LINES)
    _, _, triples, q = read(build_source({"type": "triples", "path": str(f), "on_error": "skip"}),
                            "skip")
    assert len(triples) == 1 and q.count == 3
    assert [e["where"] for e in q.summary()["examples"]] == [f"{f}:2", f"{f}:3", f"{f}:4"]
    assert set(q.summary()["by_reason"]) == {"expected at least 3 columns, found 2",
                                             "empty field(s): relation",
                                             "undecodable bytes (invalid start byte at byte 0)"}


def test_missing_file_and_bad_params(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        read(build_source({"type": "triples", "path": str(tmp_path / "nope.tsv")}))
    with pytest.raises(ValueError, match="either 'path' or 'splits'"):
        build_source({"type": "triples"})
    with pytest.raises(KeyError, match="unknown knowledge source 'tripels'"):
        build_source({"type": "tripels"})


@pytest.mark.parametrize("dataset,counts,entities", [("nations", (1592, 199, 201), 14),
                                                     ("kinships", (8544, 1068, 1074), 104),
                                                     ("umls", (5216, 652, 661), 135)])
def test_pykeen_datasets_with_standard_splits(dataset: str, counts: tuple, entities: int) -> None:
    pytest.importorskip("pykeen")
    _, _, triples, q = read(build_source({"type": "pykeen", "dataset": dataset}))
    got = tuple(sum(t.split == s for t in triples) for s in ("train", "valid", "test"))
    assert got == counts and q.count == 0
    assert len({t.head for t in triples} | {t.tail for t in triples}) == entities


def test_countryinfo_facts() -> None:
    pytest.importorskip("countryinfo")
    ents, rels, triples, q = read(build_source({"type": "countryinfo"}))
    by_id = {e.id: e for e in ents}
    assert by_id["FRA"].name == "France" and "French Republic" in by_id["FRA"].aliases
    assert by_id["FRA"].types == ["country"]
    facts = {(t.head, t.relation, t.tail) for t in triples}
    assert ("FRA", "capital", "city/Paris") in facts and ("FRA", "borders", "DEU") in facts
    assert ("FRA", "currency", "currency/EUR") in facts and ("DEU", "region", "region/Europe") in facts
    assert 6000 < len(triples) < 7000 and len(rels) == 7 and q.count == 0
