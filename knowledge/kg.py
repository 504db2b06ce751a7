"""KnowledgeGraph: the Arrow tables every knowledge stage reads and writes.

An artifact of ``knowledge.ingest`` holds::

    entities.parquet   idx (int32, 0..n-1), id ("wordnet:dog.n.01"), name, aliases (list), description,
                       types (list), source
    relations.parquet  idx (int32), id ("wordnet:@"), name, source
    triples.parquet    head, relation, tail (int32 indices into the tables above), split
                       ("train" | "valid" | "test")

Indices are contiguous, so embedding tables are indexed by them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


@dataclass
class KnowledgeGraph:
    entities: pa.Table
    relations: pa.Table
    triples: pa.Table

    @classmethod
    def load(cls, path: str | Path) -> "KnowledgeGraph":
        path = Path(path)
        return cls(**{k: pq.read_table(path / f) for k, f in FILES.items()})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        for k, f in FILES.items():
            pq.write_table(getattr(self, k), path / f)

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
        return np.stack([t[c].to_numpy().astype(np.int64) for c in ("head", "relation", "tail")],
                        axis=1) if t.num_rows else np.zeros((0, 3), dtype=np.int64)

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

