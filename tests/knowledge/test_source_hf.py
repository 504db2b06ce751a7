"""The hf source on tiny save_to_disk folders and parquet/csv/jsonl files."""

from __future__ import annotations

import json

import datasets
import pytest

import knowledge.sources.hf  # noqa: F401 - registers "hf"
from knowledge.sources import SOURCES, Quarantine, SourceError, build_source


def _triples(src, q=None):
    return [(t.head, t.relation, t.tail, t.split) for t in src.triples(q or Quarantine("hf"))]


def test_save_to_disk_splits(tmp_path):
    rows = lambda h: {"head": [h], "relation": ["r"], "tail": ["t"]}  # noqa: E731
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows("a")),
                          "validation": datasets.Dataset.from_dict(rows("b")),
                          "test": datasets.Dataset.from_dict(rows("c"))}).save_to_disk(tmp_path / "dd")
    src = SOURCES.get("hf")(path=str(tmp_path / "dd"))
    assert _triples(src) == [("a", "r", "t", "train"), ("b", "r", "t", "valid"),
                             ("c", "r", "t", "test")]
    assert (tmp_path / "dd" / "dataset_dict.json") in src.files()


def test_single_dataset_with_split_column_and_custom_columns(tmp_path):
    datasets.Dataset.from_dict({"s": ["a", "b", "c"], "p": ["r1", "r2", "r1"], "o": [1, 2, 3],
                                "split": ["train", "validation", None]}).save_to_disk(tmp_path / "d")
    src = build_source({"type": "hf", "path": str(tmp_path / "d"), "head_column": "s",
                        "relation_column": "p", "tail_column": "o"})
    assert _triples(src) == [("a", "r1", "1", "train"), ("b", "r2", "2", "valid"),
                             ("c", "r1", "3", None)]


def test_lone_files_have_no_split(tmp_path):
    csv = tmp_path / "kg.csv"
    csv.write_text("head,relation,tail\na,r,b\nb,r,c\n")
    assert _triples(SOURCES.get("hf")(path=str(csv))) == [("a", "r", "b", None),
                                                        ("b", "r", "c", None)]
    jl = tmp_path / "kg.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"head": "a", "relation": "r", "tail": "b", "split": "test"}]) + "\n")
    assert _triples(SOURCES.get("hf")(path=str(jl))) == [("a", "r", "b", "test")]
    pq = tmp_path / "kg.parquet"
    datasets.Dataset.from_dict({"head": ["x"], "relation": ["y"], "tail": ["z"]}).to_parquet(pq)
    assert _triples(SOURCES.get("hf")(path=str(pq))) == [("x", "y", "z", None)]


def test_folder_of_split_files(tmp_path):
    (tmp_path / "kg").mkdir()
    for split, h in (("train", "a"), ("valid", "b"), ("test", "c")):
        (tmp_path / "kg" / f"{split}.csv").write_text(f"head,relation,tail\n{h},r,t\n")
    got = sorted(_triples(SOURCES.get("hf")(path=str(tmp_path / "kg"))), key=lambda t: t[0])
    assert got == [("a", "r", "t", "train"), ("b", "r", "t", "valid"), ("c", "r", "t", "test")]


def test_empty_fields_quarantined_with_row(tmp_path):
    csv = tmp_path / "kg.csv"
    csv.write_text("head,relation,tail,split\na,r,b,train\nc,,d,train\ne,r, ,test\nf,r,g,later\n")
    with pytest.raises(SourceError, match=r"kg\.csv row 1: empty relation"):
        _triples(SOURCES.get("hf")(path=str(csv)))
    q = Quarantine("hf", "skip")
    assert _triples(SOURCES.get("hf")(path=str(csv), on_error="skip"), q) == [
        ("a", "r", "b", "train")]
    s = q.summary()
    assert s["count"] == 3
    assert [e["where"] for e in s["examples"]] == [f"{csv} row 1", f"{csv} row 2", f"{csv} row 3"]
    assert s["by_reason"] == {"empty relation": 1, "empty tail": 1,
                              "unknown split value 'later' (expected train, validation or test)": 1}


def test_missing_column(tmp_path):
    csv = tmp_path / "kg.csv"
    csv.write_text("subject,predicate,object\na,r,b\n")
    with pytest.raises(SourceError, match="no column 'head', 'relation', 'tail'.*subject"):
        _triples(SOURCES.get("hf")(path=str(csv)))


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE=1"):
        _triples(SOURCES.get("hf")(path="someone/some-kg"))
    assert SOURCES.get("hf")(path="someone/some-kg").files() == []
