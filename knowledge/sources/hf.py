"""A Hugging Face ``datasets`` table of (head, relation, tail) rows as a knowledge source.

``path`` is one of (https://huggingface.co/docs/datasets/loading):

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds
  ``dataset_dict.json`` or ``state.json``): read with ``datasets.load_from_disk``;
- one local data file (``.parquet``, ``.csv``, ``.json``/``.jsonl``, optionally compressed): read with
  ``load_dataset(<format>, data_files=path)``. ``datasets`` calls the rows of a lone file "train";
  that is not a predefined split, so such rows get no split (unless a split column says one);
- a local folder of data files: ``load_dataset(folder)``, whose splits come from the file names
  (``train.parquet``, ``valid.parquet``, ...);
- the first two on any fsspec URI as well (``s3://bucket/kg.parquet``, a ``save_to_disk`` folder on
  ``s3://``: ``datasets`` copies it into a local temporary folder first); a URI folder of data files
  is not read (give its files, or save it with ``save_to_disk``);
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
from pipeline.uris import InputURI, URIPath, input_files, input_path

from .base import KnowledgeSource, Quarantine, SourceError, Triple, source

SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid",
               "test": "test"}
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json",
                ".jsonl": "json", ".ndjson": "json"}
COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}


@source("hf")
class HFSource(KnowledgeSource):
    """A Hugging Face datasets table (local folder or files, or a Hub name) of triples."""

    path: InputURI = Field(description="save_to_disk folder, data file or folder (a path or a "
                                       "URI), or a Hub dataset name")
    hub_config: str | None = Field(default=None, description="a Hub dataset's configuration")
    head_column: str = "head"
    relation_column: str = "relation"
    tail_column: str = "tail"
    split_column: str = Field(default="split",
                              description="used when the table has it; else the dataset's splits")

    def files(self) -> list[Path | URIPath]:
        p = input_path(self.path)
        if p.is_file():
            return [p]
        if p.is_dir():
            return input_files(p)
        return []  # a Hub dataset: its revision, not local files, decides what is read

    def _load(self) -> dict[str | None, "object"]:
        """``{split name or None: Dataset}``."""
        import datasets

        p = input_path(self.path)
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
                if isinstance(p, URIPath):
                    return {None: _load_remote_file(p, fmt, kw)}
                # A lone file is no predefined split: drop datasets' default "train" name.
                return {None: datasets.load_dataset(fmt, data_files=str(p), split="train", **kw)}
            elif isinstance(p, URIPath) and p.is_dir():
                raise SourceError(f"{p}: a folder of data files is read from local disk only; on a "
                                  f"URI give one data file, or a save_to_disk folder")
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


def _load_remote_file(p: URIPath, fmt: str, kw: dict) -> "object":
    """A data file on a URI, parsed by the same ``datasets`` loader as a local one: ``datasets``
    would fetch a URL itself, but not under ``HF_HUB_OFFLINE=1``, and into its cache for good. Here
    the file is copied into a temporary folder and loaded into memory, and the folder removed."""
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory(prefix="stele-hf-") as tmp:
        local = Path(tmp) / p.name
        p.fs.get_file(p.fs_path, str(local))
        return datasets.load_dataset(fmt, data_files=str(local), split="train", keep_in_memory=True,
                                     cache_dir=str(Path(tmp) / "cache"), **kw)
