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


@pytest.mark.parametrize("line,reason", [(2, "expected 3 columns, found 2"),
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
    assert set(q.summary()["by_reason"]) == {"expected 3 columns, found 2",
                                             "empty field(s): relation",
                                             "undecodable bytes (invalid start byte at byte 0)"}


def test_missing_file_and_bad_params(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        read(build_source({"type": "triples", "path": str(tmp_path / "nope.tsv")}))
    with pytest.raises(ValueError, match="either 'path' or 'splits'"):
        build_source({"type": "triples"})
    # a ValueError, so that a pipeline's parameter validation reports it as file:line, exit 2
    with pytest.raises(ValueError, match=r"unknown knowledge source 'tripels' \(did you mean 'triples'"):
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


def test_byte_order_mark_is_not_part_of_the_first_id(tmp_path: Path) -> None:
    f = tmp_path / "bom.tsv"  # a spreadsheet export: UTF-8 with a byte-order mark
    f.write_bytes("\ufeffa\tr\tb\nb\tr\tc\n".encode())
    _, _, triples, q = read(build_source({"type": "triples", "path": str(f)}))
    assert [(t.head, t.relation, t.tail) for t in triples] == [("a", "r", "b"), ("b", "r", "c")]
    assert q.count == 0
    from knowledge.ingest import build_graph

    g, _ = build_graph([build_source({"type": "triples", "path": str(f)})], valid=0, test=0)
    assert g.entity_ids() == ["triples:a", "triples:b", "triples:c"]


@pytest.mark.parametrize("header", [False, True])
def test_a_row_with_another_column_count_is_quarantined(tmp_path: Path, header: bool) -> None:
    f = tmp_path / "kg.tsv"
    rows = ["a\tr\tb", "b\tr\tc\tstray", "c\tr\ta"]  # line 2 (3 with a header): a 4th column
    f.write_text("\n".join((["h\tr\tt"] if header else []) + rows) + "\n")
    spec = {"type": "triples", "path": str(f), "header": header,
            **({"columns": {"head": "h", "relation": "r", "tail": "t"}} if header else {})}
    no = 3 if header else 2
    with pytest.raises(SourceError, match=rf"kg.tsv:{no}: expected 3 columns, found 4"):
        read(build_source(spec))
    _, _, triples, q = read(build_source({**spec, "on_error": "skip"}), "skip")
    assert [(t.head, t.tail) for t in triples] == [("a", "b"), ("c", "a")]
    assert q.summary()["by_reason"] == {"expected 3 columns, found 4": 1}
    assert q.examples[0]["where"] == f"{f}:{no}" and q.examples[0]["text"] == "b\tr\tc\tstray"


def test_a_row_with_fewer_columns_than_the_header_is_quarantined(tmp_path: Path) -> None:
    f = tmp_path / "kg.csv"  # the columns used are there, but the row lacks the header's 'note'
    f.write_text("h,r,t,note\na,r,b,x\nb,r,c\n")
    spec = {"type": "triples", "path": str(f), "header": True, "on_error": "skip",
            "columns": {"head": "h", "relation": "r", "tail": "t"}}
    _, _, triples, q = read(build_source(spec), "skip")
    assert [(t.head, t.tail) for t in triples] == [("a", "b")]
    assert q.examples == [{"where": f"{f}:3", "reason": "expected 4 columns, found 3",
                           "text": "b,r,c"}]


def test_every_row_with_extra_columns_is_a_valid_file(tmp_path: Path) -> None:
    f = tmp_path / "kg.tsv"  # a 4-column file read by position: nothing odd about it
    f.write_text("a\tr\tb\t0.9\nb\tr\tc\t0.5\n\nc\tr\ta\t0.1\n")
    src = build_source({"type": "triples", "path": str(f),
                        "columns": {"head": 0, "relation": 1, "tail": 2}})
    _, _, triples, q = read(src)
    assert len(triples) == 3 and q.count == 0
    g = tmp_path / "kg2.tsv"  # a first row too short to read is no reference for the others
    g.write_text("a\tr\nb\tr\tc\t1\nc\tr\ta\t2\n")
    _, _, triples, q = read(build_source({"type": "triples", "path": str(g), "on_error": "skip"}),
                            "skip")
    assert [(t.head, t.tail) for t in triples] == [("b", "c"), ("c", "a")]
    assert q.summary()["by_reason"] == {"expected at least 3 columns, found 2": 1}


def test_countryinfo_bad_file_is_quarantined_with_its_line(tmp_path: Path, monkeypatch) -> None:
    import knowledge.sources.countryinfo as countryinfo

    (tmp_path / "france.json").write_text(json.dumps(
        {"name": "France", "ISO": {"alpha3": "FRA"}, "capital": "Paris", "region": "Europe"}))
    (tmp_path / "broken.json").write_text('{\n  "name": "Broken",\n  "capital": \n}\n')
    (tmp_path / "list.json").write_text('["not", "a", "country"]\n')
    monkeypatch.setattr(countryinfo, "_data_dir", lambda: tmp_path)
    ents, _, triples, q = read(build_source({"type": "countryinfo", "on_error": "skip"}), "skip")
    assert ("FRA", "capital", "city/Paris") in {(t.head, t.relation, t.tail) for t in triples}
    assert [(e["where"], e["reason"]) for e in q.examples] == [
        (f"{tmp_path / 'broken.json'}:4", "not valid JSON (Expecting value)"),
        (f"{tmp_path / 'list.json'}:1", "expected a JSON object, found list")]
