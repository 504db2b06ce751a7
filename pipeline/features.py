"""The on-disk layout of a region-feature artifact, shared by ``vision.features`` and
``speech.features`` and read by the fusion encoders.

Fusion encoders (ViLBERT, LXMERT and the speech-text variant) take, per item, a sequence of feature
vectors with a location each: image regions with their boxes, or audio frames with their time spans.
Both are stored the same way, so the encoders do not care which modality they get::

    features/part-00000.parquet   id           string
                                  n_regions    int32
                                  features     large_binary: (R, dim) float16, one blob per item
                                  boxes        large_binary: (R, 4) float32, one blob per item
                                  + modality columns (width/height, or duration_s/sample_rate)
    items.parquet                 id, media, texts (list<string>), meta (JSON): every listed item
    rejected.parquet              id, where, kind (listing | media | text), reason: nothing usable
                                  is dropped without a row here

Boxes are normalised ``(x1, y1, x2, y2)`` in [0, 1] of the original image; for audio they are
``(t_start / T, 0, t_end / T, 1)`` so that time spans are "boxes" too. When the stage wrote a global
token (``global_token`` in the manifest), it is region 0 with the box of the whole visible input.

A tensor column holds each item's array as raw little-endian bytes, row-major, and says what they
are in its field metadata (``stele.tensor``: ``{"dtype": "<f2", "shape": [null, dim]}``), as the
bottom-up-attention TSVs of ViLBERT and LXMERT store base64 blobs beside ``num_boxes``. Not nested
float lists: Parquet encodes those value by value, with two repetition levels each (in memory, 32
images of 50 x 1280 values: 44.8 against 3.8 ms; from rows to file and back, 2.6-2.8x the write
and 1.9-2.3x the read time: ``bench/feature_layout.py``, BENCHMARKS.md), and one stage process
writes what every actor computes. :class:`FeatureSet` reads them back as numpy arrays without a
copy. float16 halves the size of the largest column; the encoders compute in float32 or bf16 anyway.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

from .datasets import MediaDataset, build_dataset

class FeatureStageParams(BaseModel):
    """The parameters every feature stage shares; ``vision.features`` and ``speech.features`` add
    their model's and set :attr:`modality`."""

    model_config = ConfigDict(extra="forbid")
    modality: ClassVar[str] = ""
    modality_hint: ClassVar[str] = ""  # appended to the wrong-modality error

    dataset: SerializeAsAny[MediaDataset] = Field(
        description="a media dataset: {type: emoji, path: ...}; types: `stele datasets`")
    batch_size: int = Field(default=32, ge=1)
    actors: int | Literal["auto"] = Field(
        default="auto", description="Ray Data actors, each with its own model; auto: one per GPU "
                                    "when the cluster has GPUs, else one per core, at most 8")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    threads: int | Literal["auto"] = Field(
        default="auto", description="torch intra-op threads per actor; auto: the node's cores "
                                    "shared among the actors (at least cpus_per_actor)")
    gpus_per_actor: float | None = Field(default=None, ge=0,
                                         description="default: 1 when the cluster has GPUs, else 0")
    limit: int | None = Field(default=None, ge=1, description="only the first N items")
    rows_per_shard: int = Field(default=2048, ge=1)

    @field_validator("dataset", mode="before")
    @classmethod
    def _build(cls, v: Any) -> Any:
        return build_dataset(v) if isinstance(v, dict) else v

    @field_validator("dataset")
    @classmethod
    def _modality(cls, v: MediaDataset) -> MediaDataset:
        if cls.modality and v.modality != cls.modality:
            raise ValueError(f"dataset type {v.type!r} holds {v.modality} items, not "
                             f"{cls.modality} items{cls.modality_hint}")
        return v

    @field_validator("actors", "threads")
    @classmethod
    def _at_least_one(cls, v: int | str, info: Any) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"{info.field_name} must be at least 1 (or auto)")
        return v

    def placement(self) -> tuple[int, float, str, int]:
        """``(actors, GPUs per actor, torch device, intra-op threads per actor)``.

        ``actors: auto`` fills the GPUs (one actor per ``gpus_per_actor``); without GPUs, one actor
        per core of this node, each with a share of the cores as torch threads: on 2 cores two
        1-thread actors beat one 2-thread actor (images 0.87-0.90x against 0.75-0.80x of the plain
        loop end to end, clips 0.77-1.03x against 0.69-0.89x; BENCHMARKS.md, session 11). At most 8
        on CPU, each with more threads then: every actor holds its own torch and model."""
        import os

        from .raydata import cluster_gpus, threads_for

        n_gpus = cluster_gpus()
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else min(1.0, n_gpus)
        actors = self.actors
        if actors == "auto":
            actors = (max(1, math.floor(n_gpus / gpus + 1e-9)) if gpus > 0
                      else max(1, min(8, os.cpu_count() or 1)))
        threads = (threads_for(actors, self.cpus_per_actor) if self.threads == "auto"
                   else self.threads)
        return actors, gpus, "cuda" if gpus > 0 else "cpu", threads


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
    converts one value at a time (1.4 against 10.9 ms for a batch of 64 clips x 302 log-mel frames
    x 80, a tenth of the actor's call). Both round to nearest even. Only featurizers call this,
    and they have torch loaded; the stage process never does."""
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


class FeatureWriter:
    """Splits featurizer output into feature shards and rejected rows, writing as it goes (bounded
    memory): shards of ``rows_per_shard`` rows under ``out/features/``."""

    def __init__(self, out: Path, rows_per_shard: int = 2048):
        self.dir = Path(out) / "features"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.rejected = pq.ParquetWriter(Path(out) / "rejected.parquet", REJECTED_SCHEMA)
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self.shards = 0
        self.items = 0
        self.regions = 0
        self.rejected_by_reason: dict[str, int] = {}

    def reject(self, rows: list[dict[str, Any]]) -> None:
        """Rows of ``{"id", "where", "kind", "reason"}``."""
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
            # same blobs in twice the time (12.7 against 6.8 ms per 64 clips).
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


ITEM_REF_SCHEMA = pa.schema([("id", pa.string()), ("media", pa.string())])


class Listing:
    """Lists a dataset's items once, streaming: writes ``items.parquet``, records listing problems and
    empty texts as rejected rows, and yields ``(id, media)`` tables for the featurizer actors.

    An item whose every text is empty keeps its features (it is still a valid image or clip, e.g. a
    retrieval candidate) and is counted as ``items_without_text``; each empty text is a rejected row
    of kind ``text`` (``where`` = ``<id>#<index>``).
    """

    def __init__(self, dataset: Any, out: Path, writer: FeatureWriter, *, limit: int | None = None,
                 chunk: int = 256):
        from .datasets import DatasetQuarantine

        self.dataset, self.writer, self.limit, self.chunk = dataset, writer, limit, chunk
        self.items_writer = pq.ParquetWriter(Path(out) / "items.parquet", ITEM_SCHEMA)
        self.quarantine = DatasetQuarantine(f"dataset {dataset.type}", dataset.on_error,
                                            sink=self._listing_bad)
        self.items = self.texts = self.empty_texts = self.items_without_text = 0
        self.chunks = 0  # tables yielded: the blocks, one model batch each

    def _listing_bad(self, where: str, reason: str, text: str) -> None:
        self.writer.reject([{"id": None, "where": where, "kind": "listing",
                             "reason": reason + (f": {text[:200]!r}" if text else "")}])

    def __iter__(self) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        refs: list[dict[str, str]] = []
        try:
            for item in self.dataset.items(self.quarantine):
                if self.limit is not None and self.items >= self.limit:
                    break
                self.items += 1
                texts = []
                for k, t in enumerate(item.texts):
                    if t is None or not str(t).strip():
                        self.empty_texts += 1
                        self.writer.reject([{"id": item.id, "where": f"{item.id}#{k}",
                                             "kind": "text", "reason": "empty text"}])
                    else:
                        texts.append(str(t))
                self.texts += len(texts)
                self.items_without_text += not texts
                rows.append({"id": item.id, "media": item.media, "texts": texts,
                             "meta": json.dumps(item.meta, ensure_ascii=False, default=str)})
                refs.append({"id": item.id, "media": item.media})
                if len(refs) >= self.chunk:
                    yield self._flush(rows, refs)
            if refs:
                yield self._flush(rows, refs)
        finally:
            self.items_writer.close()

    def _flush(self, rows: list, refs: list) -> pa.Table:
        self.items_writer.write_table(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA))
        table = pa.Table.from_pylist(refs, schema=ITEM_REF_SCHEMA)
        self.chunks += 1
        rows.clear()
        refs.clear()
        return table

    def summary(self) -> dict[str, Any]:
        q = self.quarantine.summary()
        return {"items_listed": self.items, "texts": self.texts, "empty_texts": self.empty_texts,
                "items_without_text": self.items_without_text,
                "listing_rejected": q["count"], "listing_rejected_by_reason": q["by_reason"]}


def extract(ctx: Any, params: FeatureStageParams, actor_cls: type, *, stage_type: str, desc: str,
            on_batch: Callable[[pa.Table], None] | None = None,
            explain: Callable[[], Any] | None = None) -> dict[str, Any]:
    """The body every feature stage shares: list ``params.dataset`` into ``ctx.out``, stream the
    item references through ``actor_cls(params, device, threads)`` actors
    (:func:`pipeline.raydata.stream_map`), write the shards and the rejected table, and return the
    counts for the manifest.

    ``on_batch(table)`` sees each output table before it is written (for modality-specific counts).
    What the actors built (``dim``, data config, weights, ``warnings``: their
    :func:`region_schema` ``describe``) comes back with their first batch as
    ``counts["described"]``; its warnings are logged then. The stage's own process never builds
    the model when all goes well: in a fresh ``stele run`` its torch and timm imports would share
    the cores with the actor's (300 images, fresh processes: start-up 16.9-17.4 s with such a
    check, 14.8-15.7 s without; BENCHMARKS.md, session 10). ``explain()`` builds it here only when the stream fails: a bad name,
    weights file or mode then fails again in the stage's own words, which win over Ray's report
    of the actor's death; when ``explain()`` succeeds (the failure was not the model's), Ray's
    error is raised.
    Raises :class:`~pipeline.errors.StageFailed` when no item at all was usable, naming the reasons.
    """
    import time

    from .errors import StageFailed
    from .raydata import stream_map

    actors, gpus, device, threads = params.placement()
    ctx.log.info("%s: %d actor(s) on %s, %d torch threads each", stage_type, actors, device,
                 threads)
    writer = FeatureWriter(ctx.out, params.rows_per_shard)
    # One block per model batch: Ray Data hands blocks to actors, so blocks larger than a batch
    # would leave actors idle on small datasets.
    listing = Listing(params.dataset, ctx.out, writer, limit=params.limit, chunk=params.batch_size)
    done = first_rows = 0
    t0 = time.perf_counter()
    t_first = None
    description: dict[str, Any] | None = None

    def explained(stream: Iterator[pa.Table]) -> Iterator[pa.Table]:
        # Only the stream's own failures (Ray's), not the writer's, are worth a model build here.
        try:
            yield from stream
        except Exception:
            if explain is None:
                raise
            try:
                explain()
            except Exception as clear:
                raise clear from None
            raise

    try:
        stream = stream_map(listing, actor_cls,
                            fn_kwargs={"params": params, "device": device, "threads": threads},
                            actors=actors, cpus_per_actor=params.cpus_per_actor,
                            gpus_per_actor=gpus, batch_size=params.batch_size)
        for out in explained(stream):
            if t_first is None:
                t_first, first_rows = time.perf_counter(), out.num_rows
                description = described(out) or {}
                for w in description.get("warnings", []):
                    ctx.log.warning("%s", w)
                ctx.log.info("%s: the actors built %s", stage_type,
                             {k: v for k, v in description.items() if k != "warnings"})
            if on_batch is not None:
                on_batch(out)
            writer.add(out)
            done += out.num_rows
            # stream_map has listed every item before the first batch comes back: the total is known.
            ctx.report_progress(desc, done, listing.items)
    finally:
        writer.close()
    wall = time.perf_counter() - t0
    if writer.items == 0:
        raise StageFailed(f"{stage_type}: no usable item in dataset {params.dataset.type!r} "
                          f"({listing.items} listed; "
                          f"rejected: {writer.rejected_by_reason})")
    steady = None
    if t_first is not None and done > first_rows and time.perf_counter() > t_first:
        steady = (done - first_rows) / (t0 + wall - t_first)
    return {
        "items": writer.items, "regions": writer.regions,
        "regions_per_item": writer.regions / writer.items, "shards": writer.shards,
        "rejected": sum(writer.rejected_by_reason.values()),
        "rejected_by_reason": writer.rejected_by_reason, **listing.summary(),
        "wall_extract_s": wall, "items_per_s": done / wall if wall > 0 else None,
        "steady_per_s": steady, "actors": min(actors, listing.chunks), "device": device,
        "described": description or {},
    }
