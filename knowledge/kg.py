"""KnowledgeGraph: the Arrow tables every knowledge stage reads and writes.

An artifact of ``knowledge.ingest`` holds::

    entities.parquet   idx (int32, 0..n-1), id ("wordnet:dog.n.01"), name, aliases (list), description,
                       types (list), source
    relations.parquet  idx (int32), id ("wordnet:@"), name, source
    triples.parquet    head, relation, tail (int32 indices into the tables above), split
                       ("train" | "valid" | "test")

Indices are contiguous, so embedding tables are indexed by them directly.

The artifact may live in any fsspec location (a local folder, ``s3://...``): :meth:`KnowledgeGraph.load`
reads it whole, while :func:`read_table`, :func:`read_triples` and :func:`split_counts` read only the
columns a caller needs, so that a training worker can fetch its triples straight from the store and a
driver can count them without holding them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import torch

ENTITY_SCHEMA = pa.schema([
    ("idx", pa.int32()), ("id", pa.string()), ("name", pa.string()),
    ("aliases", pa.list_(pa.string())), ("description", pa.string()),
    ("types", pa.list_(pa.string())), ("source", pa.string()),
])
RELATION_SCHEMA = pa.schema([
    ("idx", pa.int32()), ("id", pa.string()), ("name", pa.string()), ("source", pa.string()),
])
TRIPLE_SCHEMA = pa.schema([
    ("head", pa.int32()), ("relation", pa.int32()), ("tail", pa.int32()), ("split", pa.string()),
])
FILES = {"entities": "entities.parquet", "relations": "relations.parquet",
         "triples": "triples.parquet"}
TRIPLE_COLUMNS = ("head", "relation", "tail")


def _open(uri: str | Path, name: str,
          mode: str = "rb") -> contextlib.AbstractContextManager[str | IO]:
    """Table ``name`` (a key of ``FILES``) of the artifact at ``uri``, for pyarrow to read or write:
    a local file as its path, so that pyarrow uses its own file reader (memory-mapped, threaded)
    as it did before remote URIs were accepted; anything else as an fsspec file object."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    path = f"{root.rstrip('/')}/{FILES[name]}"
    if isinstance(fs, LocalFileSystem):
        return contextlib.nullcontext(path)
    return fs.open(path, mode)


def read_table(uri: str | Path, name: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Table ``name`` (``entities``, ``relations`` or ``triples``) of the artifact at ``uri``, a
    local folder or any fsspec URI; only ``columns`` when given."""
    with _open(uri, name) as f:
        return pq.read_table(f, columns=list(columns) if columns is not None else None)


def _triples_array(t: pa.Table) -> np.ndarray:
    return np.stack([t[c].to_numpy().astype(np.int64) for c in TRIPLE_COLUMNS], axis=1) \
        if t.num_rows else np.zeros((0, 3), dtype=np.int64)


def read_triples(uri: str | Path, *splits: str | None) -> tuple[np.ndarray, ...]:
    """One ``(n, 3)`` int64 array of (head, relation, tail) per split asked for (``None``: every
    split), read from the artifact at ``uri`` (local folder or fsspec URI) in one pass over its row
    groups and only the columns needed. Rows keep the file's order, so each array equals
    :meth:`KnowledgeGraph.split_array` of the loaded graph."""
    filtered = any(s is not None for s in splits)
    columns = [*TRIPLE_COLUMNS, "split"] if filtered else list(TRIPLE_COLUMNS)
    parts: list[list[pa.RecordBatch]] = [[] for _ in splits]
    with _open(uri, "triples") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        # batch by batch, so the peak is the arrays asked for plus one batch, not the whole table
        for batch in pf.iter_batches(columns=columns):
            for part, split in zip(parts, splits):
                part.append(batch if split is None else batch.filter(pc.equal(batch["split"], split)))
    schema = pa.schema([schema.field(c) for c in columns])
    return tuple(_triples_array(pa.Table.from_batches(p, schema=schema)) for p in parts)


def split_counts(uri: str | Path) -> dict[str, int]:
    """How many triples each split of the artifact at ``uri`` holds, reading only the ``split``
    column (row counts alone would come from the Parquet footer, but not per split)."""
    counts: dict[str, int] = {}
    with _open(uri, "triples") as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=["split"]):
            for row in pc.value_counts(batch["split"]).to_pylist():
                counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
    return counts


@dataclass
class KnowledgeGraph:
    entities: pa.Table
    relations: pa.Table
    triples: pa.Table

    @classmethod
    def load(cls, uri: str | Path) -> "KnowledgeGraph":
        """The whole graph from an artifact folder: a local path or any fsspec URI."""
        return cls(**{k: read_table(uri, k) for k in FILES})

    def save(self, uri: str | Path) -> None:
        """Write the three tables into an existing folder (a local path or any fsspec URI)."""
        for k in FILES:
            with _open(uri, k, "wb") as f:
                pq.write_table(getattr(self, k), f)

    @property
    def num_entities(self) -> int:
        return self.entities.num_rows

    @property
    def num_relations(self) -> int:
        return self.relations.num_rows

    def split_array(self, split: str | None = None) -> np.ndarray:
        """``(n, 3)`` int64 array of (head, relation, tail) indices, for one split or all."""
        t = self.triples
        if split is not None:
            mask = pc.equal(t["split"], split)
            t = t.filter(mask)
        return _triples_array(t)

    def split_tensor(self, split: str | None = None) -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.split_array(split))

    def entity_ids(self) -> list[str]:
        return self.entities["id"].to_pylist()

    def relation_ids(self) -> list[str]:
        return self.relations["id"].to_pylist()

    def entity_index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entity_ids())}

    def __repr__(self) -> str:
        counts = {s: int(pc.sum(pc.equal(self.triples["split"], s)).as_py() or 0)
                  for s in ("train", "valid", "test")}
        return (f"KnowledgeGraph(num_entities={self.num_entities}, "
                f"num_relations={self.num_relations}, triples={counts})")

