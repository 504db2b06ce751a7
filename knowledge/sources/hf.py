"""A Hugging Face ``datasets`` table of (head, relation, tail) rows as a knowledge source.

``path`` is one of (https://huggingface.co/docs/datasets/loading):

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds
  ``dataset_dict.json`` or ``state.json``): read with ``datasets.load_from_disk``;
- one local data file (``.parquet``, ``.csv``, ``.json``/``.jsonl``, optionally compressed): read with
  ``load_dataset(<format>, data_files=path)``. ``datasets`` calls the rows of a lone file "train";
  that is not a predefined split, so such rows get no split (unless a split column says one);
- a local folder of data files: ``load_dataset(folder)``, whose splits come from the file names
  (``train.parquet``, ``valid.parquet``, ...);
- otherwise a Hub dataset name (with ``hub_config``). With ``HF_HUB_OFFLINE=1`` (or
  ``HF_DATASETS_OFFLINE=1``) set this fails at once with a clear message instead of trying the
  network.

Mapping: each row is one triple from ``head_column``, ``relation_column``, ``tail_column`` (values
turned to strings). ``Triple.split`` comes from ``split_column`` when the table has one, else from the
dataset's own split names; ``train`` / ``validation`` (or ``valid``, ``dev``) / ``test`` map to
train / valid / test (an empty split value: no split). A row with an empty or missing field, or
an unknown split value, is quarantined as ``path[split] row i`` (``i`` 0-based, as in
``dataset[i]``); a whole split with an unknown name is quarantined once. Entities and relations are
not declared: ingest names them by their ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from pipeline.datasets import hf_offline

from .base import KnowledgeSource, Quarantine, SourceError, Triple, source

SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid",
               "test": "test"}
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json",
                ".jsonl": "json", ".ndjson": "json"}
COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}


@source("hf")
class HFSource(KnowledgeSource):
    """A Hugging Face datasets table (local folder or files, or a Hub name) of triples."""

    path: str = Field(description="save_to_disk folder, data file or folder, or a Hub dataset name")
    hub_config: str | None = Field(default=None, description="a Hub dataset's configuration")
    head_column: str = "head"
    relation_column: str = "relation"
    tail_column: str = "tail"
    split_column: str = Field(default="split",
                              description="used when the table has it; else the dataset's splits")

    def files(self) -> list[Path]:
        p = Path(self.path)
        if p.is_file():
            return [p]
        if p.is_dir():
            return sorted(f for f in p.rglob("*") if f.is_file())
        return []  # a Hub dataset: its revision, not local files, decides what is read

    def _load(self) -> dict[str | None, "object"]:
        """``{split name or None: Dataset}``."""
        import datasets

        p = Path(self.path)
        try:
            if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
                ds = datasets.load_from_disk(str(p))
            elif p.is_file():
                suffixes = [s for s in p.suffixes if s not in COMPRESSION]
                fmt = FILE_FORMATS.get(suffixes[-1] if suffixes else "")
                if fmt is None:
                    raise SourceError(f"{p}: not a data file datasets can read (use "
                                      f"{', '.join(FILE_FORMATS)}) nor a save_to_disk folder")
                kw = {"delimiter": "\t"} if ".tsv" in p.suffixes else {}
                # A lone file is no predefined split: drop datasets' default "train" name.
                return {None: datasets.load_dataset(fmt, data_files=str(p), split="train", **kw)}
            elif p.is_dir():
                ds = datasets.load_dataset(str(p))
            else:
                if hf_offline():
                    raise SourceError(f"{self.path!r} is not a local file or folder, and as a Hub "
                                      f"dataset name it cannot be fetched: HF_HUB_OFFLINE=1 is set")
                ds = datasets.load_dataset(self.path, self.hub_config)
        except SourceError:
            raise
        except (OSError, ValueError) as e:  # includes datasets' not-found and offline errors
            raise SourceError(f"{self.path}: cannot load the dataset: {type(e).__name__}: {e}") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            return dict(ds)
        return {None: ds}

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        cols = (self.head_column, self.relation_column, self.tail_column)
        for split, ds in self._load().items():
            where = f"{self.path}[{split}]" if split else self.path
            missing = [c for c in cols if c not in ds.column_names]
            if missing:
                raise SourceError(f"{where}: no column {', '.join(map(repr, missing))} (columns: "
                                  f"{', '.join(ds.column_names)}); set head_column / "
                                  f"relation_column / tail_column")
            split_col = self.split_column if self.split_column in ds.column_names else None
            fixed = None
            if split is not None and split_col is None:
                fixed = SPLIT_NAMES.get(split)
                if fixed is None:
                    q.bad(where, f"unknown split name {split!r} (expected train, validation or "
                                 f"test)", f"{ds.num_rows} rows")
                    continue
            i = 0
            read = list(cols) + ([split_col] if split_col else [])
            for batch in ds.select_columns(read).iter(batch_size=10_000):
                for row in zip(*(batch[c] for c in read)):
                    yield from self._row(row, split_col, fixed, f"{where} row {i}", q)
                    i += 1

    def _row(self, row, split_col, fixed, where, q) -> Iterator[Triple]:
        values = [None if v is None else str(v).strip() for v in row[:3]]
        if not all(values):
            empty = [c for c, v in zip((self.head_column, self.relation_column, self.tail_column),
                                       values) if not v]
            q.bad(where, f"empty {', '.join(empty)}", repr(row))
            return
        split = fixed
        if split_col:
            raw = row[3]
            split = SPLIT_NAMES.get(str(raw).strip().lower()) if raw not in (None, "") else None
            if raw not in (None, "") and split is None:
                q.bad(where, f"unknown split value {raw!r} (expected train, validation or test)",
                      repr(row))
                return
        yield Triple(values[0], values[1], values[2], split=split, where=where)
