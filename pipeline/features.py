"""The on-disk layout of a feature artifact: per item, a sequence of feature vectors with a
location each, written by feature stages and read by the models that consume them.

A feature stage of any modality writes the same layout, so a consumer does not care which one it
gets (a location is a normalised box: a region of an image, or ``(t_start / T, 0, t_end / T, 1)``
for a time span)::

    features/part-00000.parquet   id           string
                                  n_regions    int32
                                  features     large_binary: (R, dim) float16, one blob per item
                                  boxes        large_binary: (R, 4) float32, one blob per item
                                  + the stage's own columns (sizes, durations, ...)
    items.parquet                 id, media, texts (list<string>), meta (JSON): every listed item
    rejected.parquet              id, where, kind (listing | media | text), reason: nothing usable
                                  is dropped without a row here; one item can have several rows
                                  (its media and each empty text), see :func:`rejected_counts`

When the stage wrote a global token (``global_token`` in the manifest), it is region 0 with the box
of the whole input.

A tensor column holds each item's array as raw little-endian bytes, row-major, and says what they
are in its field metadata (``stele.tensor``: ``{"dtype": "<f2", "shape": [null, dim]}``), as the
bottom-up-attention TSVs of ViLBERT and LXMERT store base64 blobs beside ``num_boxes``; not nested
float lists, which Parquet encodes value by value (``bench/feature_layout.py`` measures both).
:class:`FeatureSet` reads them back as numpy arrays without a copy. float16 halves the size of the
largest column; consumers compute in float32 or bf16 anyway.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .quarantine import stable_reason

ITEM_SCHEMA = pa.schema([("id", pa.string()), ("media", pa.string()), ("texts", pa.list_(pa.string())),
                         ("meta", pa.string())])
REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("where", pa.string()), ("kind", pa.string()),
                             ("reason", pa.string())])


# Schema metadata key of a featurizer's description of itself (see region_schema).
DESCRIBE_KEY = b"stele.describe"


# Field metadata key of a tensor column (see tensor_field).
TENSOR_KEY = b"stele.tensor"


def tensor_field(name: str, dtype: Any, width: int) -> pa.Field:
    """A column of per-row ``(n, width)`` arrays of ``dtype``, each stored as one blob."""
    spec = {"dtype": np.dtype(dtype).newbyteorder("<").str, "shape": [None, int(width)]}
    return pa.field(name, pa.large_binary(), metadata={TENSOR_KEY: json.dumps(spec)})


def tensor_spec(field: pa.Field, where: str = "") -> tuple[np.dtype, int]:
    """``(dtype, width)`` of a :func:`tensor_field`; a clear error for any other column."""
    meta = field.metadata or {}
    if TENSOR_KEY not in meta:
        raise ValueError(f"{where}column {field.name!r} is {field.type}, not a stele tensor column "
                         f"(no {TENSOR_KEY.decode()} metadata): features written by an older stele "
                         f"(nested float lists) must be extracted again")
    spec = json.loads(meta[TENSOR_KEY])
    return np.dtype(spec["dtype"]), int(spec["shape"][-1])


def pack_rows(arrays: list[np.ndarray], counts: list[int], dtype: np.dtype,
              width: int) -> pa.LargeBinaryArray:
    """One blob per row: ``arrays`` (the non-empty rows, in order) concatenated as ``dtype``; a row
    whose count is 0 gets an empty blob. Built from two buffers, without a per-row copy."""
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
    if dtype == np.float16:
        flat = _half(flat)
    flat = np.ascontiguousarray(flat, dtype=dtype.newbyteorder("<"))
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(np.asarray(counts, np.int64) * (width * dtype.itemsize), out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(counts),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def unpack_rows(column: pa.Array, dtype: np.dtype, width: int) -> list[np.ndarray]:
    """The ``(n, width)`` arrays of a tensor column (one chunk, possibly sliced): read-only views
    into its data buffer, no copy."""
    if column.null_count:
        raise ValueError(f"tensor column has {column.null_count} null row(s)")
    offsets = np.frombuffer(column.buffers()[1], np.int64, len(column) + 1, column.offset * 8)
    data = column.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    row = width * dtype.itemsize
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        if (b - a) % row:
            raise ValueError(f"a blob of {b - a} bytes is not a whole number of {width}-wide "
                             f"{dtype.name} rows")
        out.append(data[a:b].view(dtype).reshape(-1, width))
    return out


def region_schema(dim: int, extra: list[tuple[str, pa.DataType]] = (),
                  describe: dict[str, Any] | None = None) -> pa.Schema:
    """Schema of the rows a featurizer returns: features plus ``error`` (null when it worked).

    ``describe`` (JSON-able: ``dim``, ``warnings`` and what else the manifest should say about the
    model) rides along as schema metadata on every output table, so the stage learns what its
    actors built from their first batch, without building the model itself (:func:`extract`)."""
    schema = pa.schema([
        ("id", pa.string()), ("n_regions", pa.int32()),
        tensor_field("features", np.float16, dim),
        tensor_field("boxes", np.float32, 4),
        *extra,
        ("error", pa.string()),
    ])
    if describe is not None:
        schema = schema.with_metadata({DESCRIBE_KEY: json.dumps({"dim": dim, **describe})})
    return schema


def described(table: pa.Table) -> dict[str, Any] | None:
    """The featurizer's ``describe`` carried by one of its output tables (None when absent)."""
    meta = table.schema.metadata or {}
    return json.loads(meta[DESCRIBE_KEY]) if DESCRIBE_KEY in meta else None


def region_table(schema: pa.Schema, rows: list[dict[str, Any]]) -> pa.Table:
    """Arrow table from ``{"id", "features": (R, D) array, "boxes": (R, 4) array, ..., "error"}``
    dicts; a failed row has ``error`` set and no features (empty blobs, ``n_regions`` 0)."""
    dim = tensor_spec(schema.field("features"))[1]
    cols: dict[str, list] = {name: [] for name in schema.names}
    feats, boxes, counts = [], [], []
    for r in rows:
        f = r.get("features")
        n = 0 if f is None else len(f)
        counts.append(n)
        if n:
            feats.append(np.asarray(f).reshape(n, dim))
            boxes.append(np.asarray(r["boxes"], dtype=np.float32).reshape(n, 4))
        for name in schema.names:
            if name not in ("features", "boxes", "n_regions"):
                cols[name].append(r.get(name))
    cols["features"] = pack_rows(feats, counts, np.dtype(np.float16), dim)
    cols["boxes"] = pack_rows(boxes, counts, np.dtype(np.float32), 4)
    cols["n_regions"] = counts
    return pa.table({k: cols[k] for k in schema.names}, schema=schema)


def _half(values: np.ndarray) -> np.ndarray:
    """``values`` as float16, converted by torch: vectorised (F16C), where numpy's ``astype``
    converts one value at a time, at a noticeable share of a featurizer's call (BENCHMARKS.md,
    "Feature extraction on Ray Data vs a plain PyTorch loop"). Both round to nearest even. Only
    featurizers call this, and they have torch loaded; the stage process never does."""
    if values.dtype == np.float16:
        return values
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).half().numpy()


def usable(table: pa.Table) -> pa.Table:
    """The rows of a featurizer's output whose ``error`` is null: the table itself (no copy) when
    every row worked, the common case; a filtered copy otherwise."""
    if table["error"].null_count == table.num_rows:
        return table
    return table.filter(pc.is_null(table["error"]))


# Columns written without Parquet min/max statistics (see FeatureWriter.add).
UNSTATISTICAL = ("features", "boxes")


def rejected_counts(path: Path) -> dict[str, Any]:
    """The rejected table counted by item, as a manifest reports it: ``rejected`` = distinct items
    with at least one row, ``rejected_by_kind`` = distinct items per kind, ``rejected_rows`` = rows.

    An item whose media failed and whose text was empty is one rejected item with two rows: counting
    rows would count it twice. A listing record has no id (it never became an item): each distinct
    ``where`` counts once. An item can appear under two kinds, so the per-kind counts may add up to
    more than ``rejected``.
    Reads the ``id``, ``where`` and ``kind`` columns only, after the writer has closed the file."""
    t = pq.read_table(path, columns=["id", "where", "kind"])
    named = t.filter(pc.is_valid(t["id"]))
    unnamed = t.filter(pc.is_null(t["id"]))
    by_kind: dict[str, int] = {}
    for part, key in ((named, "id"), (unnamed, "where")):
        if part.num_rows:
            counts = part.group_by("kind").aggregate([(key, "count_distinct")])
            for kind, n in zip(counts["kind"].to_pylist(), counts[f"{key}_count_distinct"].to_pylist()):
                by_kind[kind] = by_kind.get(kind, 0) + n
    items = pc.count_distinct(named["id"]).as_py() + pc.count_distinct(unnamed["where"]).as_py()
    return {"rejected": items, "rejected_rows": t.num_rows,
            "rejected_by_kind": dict(sorted(by_kind.items()))}


class FeatureWriter:
    """Splits featurizer output into feature shards and rejected rows, writing as it goes (bounded
    memory): shards of ``rows_per_shard`` rows under ``out/features/``."""

    def __init__(self, out: Path, rows_per_shard: int = 2048):
        self.dir = Path(out) / "features"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.rejected_path = Path(out) / "rejected.parquet"
        self.rejected = pq.ParquetWriter(self.rejected_path, REJECTED_SCHEMA)
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self.shards = 0
        self.items = 0
        self.regions = 0
        self.rejected_by_reason: dict[str, int] = {}  # rows, not items: see rejected_counts()

    def reject(self, rows: list[dict[str, Any]]) -> None:
        """Rows of ``{"id", "where", "kind", "reason"}``. Reasons are made stable (one line, no
        object addresses such as PIL's ``<_io.BytesIO object at 0x...>``), so that the counts by
        reason are the same on every run."""
        rows = [{**r, "reason": stable_reason(r["reason"])} for r in rows]
        for r in rows:
            self.rejected_by_reason[r["reason"]] = self.rejected_by_reason.get(r["reason"], 0) + 1
        if rows:
            self.rejected.write_table(pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA))

    def add(self, table: pa.Table) -> None:
        ok = usable(table)
        if ok.num_rows < table.num_rows:
            failed = table.filter(pc.is_valid(table["error"]))
            self.reject([{"id": i, "where": i, "kind": "media", "reason": e}
                         for i, e in zip(failed["id"].to_pylist(), failed["error"].to_pylist())])
        ok = ok.drop_columns(["error"]).replace_schema_metadata(None)  # the manifest says it
        start = 0
        while start < ok.num_rows:
            if self._writer is None:
                path = self.dir / f"part-{self.shards:05d}.parquet"
                # No dictionary encoding: feature blobs never repeat, and hashing each one to
                # find out is wasted work. No min/max statistics for the blobs: no reader
                # filters on them, and a binary column's min and max are whole values, copied
                # into the footer of every row group.
                self._writer = pq.ParquetWriter(
                    path, ok.schema, use_dictionary=False,
                    write_statistics=[n for n in ok.schema.names if n not in UNSTATISTICAL])
                self.shards += 1
                self._in_shard = 0
            take = min(ok.num_rows - start, self.rows_per_shard - self._in_shard)
            part = ok.slice(start, take)
            self._writer.write_table(part)
            self.items += take
            self.regions += int(pc.sum(part["n_regions"]).as_py() or 0)
            self._in_shard += take
            start += take
            if self._in_shard >= self.rows_per_shard:
                self._writer.close()
                self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.rejected.close()

    def rejected_counts(self) -> dict[str, Any]:
        """:func:`rejected_counts` of what was written (call after :meth:`close`)."""
        return rejected_counts(self.rejected_path)


@dataclass
class FeatureSet:
    """Read side of a feature artifact: ``FeatureSet(path)``, then iterate or look items up."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.manifest = json.loads((self.path / "manifest.json").read_text()) \
            if (self.path / "manifest.json").exists() else {}
        self.shards = sorted((self.path / "features").glob("part-*.parquet"))

    @property
    def dim(self) -> int:
        schema = pq.read_schema(self.shards[0])
        return tensor_spec(schema.field("features"), f"{self.shards[0]}: ")[1]

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """``(id, features (R, dim) float16, boxes (R, 4) float32)`` of every item: read-only
        views into the batch just read (``np.array(f)`` to keep a writable copy)."""
        import pyarrow.dataset as ds

        for shard in self.shards:
            # The dataset scanner, one row group at a time: ParquetFile.iter_batches decodes the
            # same blobs more slowly (BENCHMARKS.md, "feature blobs instead of nested float lists").
            file = ds.dataset(shard, format="parquet")
            f_spec = tensor_spec(file.schema.field("features"), f"{shard}: ")
            b_spec = tensor_spec(file.schema.field("boxes"), f"{shard}: ")
            for batch in file.to_batches(columns=["id", "n_regions", "features", "boxes"],
                                         use_threads=False):
                feats = unpack_rows(batch.column("features"), *f_spec)
                boxes = unpack_rows(batch.column("boxes"), *b_spec)
                n = batch.column("n_regions").to_pylist()
                for i, f, b, r in zip(batch.column("id").to_pylist(), feats, boxes, n):
                    if len(f) != r or len(b) != r:
                        raise ValueError(f"{shard}: item {i!r} has n_regions {r} but "
                                         f"{len(f)} feature and {len(b)} box rows")
                    yield i, f, b

    def load(self, ids: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{id: (features, boxes)}`` for ``ids`` (all items when None)."""
        want = None if ids is None else set(ids)
        return {i: (f, b) for i, f, b in self if want is None or i in want}

    def items(self) -> pa.Table:
        return pq.read_table(self.path / "items.parquet")

    def rejected(self) -> pa.Table:
        return pq.read_table(self.path / "rejected.parquet")
