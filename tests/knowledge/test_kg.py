"""The KnowledgeGraph artifact's readers (knowledge/kg.py): any fsspec location, only the columns a
caller needs, the same rows in the same order as the whole-table API."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from knowledge.kg import (ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph, read_table,
                          read_triples, split_counts)


def _kg(m: int = 500) -> KnowledgeGraph:
    rng = np.random.default_rng(0)
    n, r = 40, 5
    entities = pa.table({"idx": list(range(n)), "id": [f"t:e{i}" for i in range(n)],
                         "name": [f"e{i}" for i in range(n)], "aliases": [[] for _ in range(n)],
                         "description": [""] * n, "types": [[] for _ in range(n)],
                         "source": ["t"] * n}, schema=ENTITY_SCHEMA)
    relations = pa.table({"idx": list(range(r)), "id": [f"t:r{i}" for i in range(r)],
                          "name": [f"r{i}" for i in range(r)], "source": ["t"] * r},
                         schema=RELATION_SCHEMA)
    triples = pa.table({"head": rng.integers(n, size=m).astype(np.int32),
                        "relation": rng.integers(r, size=m).astype(np.int32),
                        "tail": rng.integers(n, size=m).astype(np.int32),
                        "split": rng.choice(["train", "train", "train", "valid", "test"], m)},
                       schema=TRIPLE_SCHEMA)
    return KnowledgeGraph(entities, relations, triples)


@pytest.fixture(params=["path", "file", "memory"])
def located(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[KnowledgeGraph, str]:
    """A graph saved as a local folder, under a ``file://`` URI, and in fsspec's in-memory
    filesystem (standing in for a remote store), with its triples in several row groups."""
    kg = _kg()
    if request.param == "memory":
        uri = f"memory://kg-{uuid.uuid4().hex}"
        fsspec.filesystem("memory").mkdirs(uri, exist_ok=True)
        request.addfinalizer(lambda: fsspec.filesystem("memory").rm(uri, recursive=True))
    else:
        uri = str(tmp_path) if request.param == "path" else f"file://{tmp_path}"
    kg.save(uri)
    # many row groups, so that reading batch by batch has to keep the file's order across them
    with fsspec.open(f"{uri}/triples.parquet", "wb") as f:
        pq.write_table(kg.triples, f, row_group_size=37)
    return kg, uri


def test_load_and_save_round_trip_any_location(located: tuple[KnowledgeGraph, str]) -> None:
    kg, uri = located
    back = KnowledgeGraph.load(uri)
    for name in ("entities", "relations", "triples"):
        assert getattr(back, name).equals(getattr(kg, name)), name


def test_read_triples_equals_split_array_in_one_pass(located: tuple[KnowledgeGraph, str]) -> None:
    kg, uri = located
    train, valid, everything, test = read_triples(uri, "train", "valid", None, "test")
    for got, split in ((train, "train"), (valid, "valid"), (everything, None), (test, "test")):
        want = kg.split_array(split)
        assert got.dtype == np.int64 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    (alone,) = read_triples(uri, "train")
    np.testing.assert_array_equal(alone, train)
    (none,) = read_triples(uri, "nonexistent")
    assert none.shape == (0, 3) and none.dtype == np.int64


def test_split_counts_and_column_reads(located: tuple[KnowledgeGraph, str]) -> None:
    kg, uri = located
    counts = split_counts(uri)
    assert counts == {s: len(kg.split_array(s)) for s in ("train", "valid", "test")}
    assert sum(counts.values()) == kg.triples.num_rows
    ents = read_table(uri, "entities", ["idx", "id", "name"])
    assert ents.column_names == ["idx", "id", "name"]
    assert ents.equals(kg.entities.select(["idx", "id", "name"]))
