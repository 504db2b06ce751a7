"""``pykeen``: the link-prediction benchmarks shipped inside the PyKEEN wheel, with standard splits.

Nations (14 entities, 55 relations, 1592/199/201 triples), Kinships (104, 25, 8544/1068/1074) and
UMLS (135, 46, 5216/652/661) — Kok & Domingos 2007 via PyKEEN (Ali et al. 2021). The files are read
straight from the installed package (``pip install pykeen``), without importing PyKEEN itself (slow)
and without network access; every other PyKEEN dataset downloads, so it is not offered here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from .base import KnowledgeSource, Quarantine, SourceError, Triple, read_lines, source

SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}


def pykeen_dataset_dir(dataset: str) -> Path:
    spec = importlib.util.find_spec("pykeen")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the 'pykeen' source reads the datasets inside the PyKEEN wheel: "
                          "pip install pykeen (or stele[bench])")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / dataset
    if not folder.is_dir():
        raise SourceError(f"{folder}: this PyKEEN version does not ship {dataset!r}")
    return folder


@source("pykeen")
class PyKEENSource(KnowledgeSource):
    """Nations, Kinships or UMLS with their standard train/valid/test splits."""

    dataset: Literal["nations", "kinships", "umls"] = "nations"

    def files(self) -> list[Path]:
        folder = pykeen_dataset_dir(self.dataset)
        return [folder / f for f in SPLIT_FILES.values()]

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        folder = pykeen_dataset_dir(self.dataset)
        for split, name in SPLIT_FILES.items():
            path = folder / name
            for no, line in read_lines(path, q):
                if not line.strip():
                    continue
                row = line.split("\t")
                if len(row) != 3 or not all(x.strip() for x in row):
                    q.bad(f"{path}:{no}", "expected 3 non-empty tab-separated fields", line)
                    continue
                yield Triple(row[0].strip(), row[1].strip(), row[2].strip(), split=split,
                             where=f"{path}:{no}")
