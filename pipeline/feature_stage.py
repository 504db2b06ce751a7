"""The plumbing every feature stage shares: its common parameters, the one-pass listing of a
dataset's items, and :func:`extract`, which streams item references through the stage's model
actors (Ray Data) into the artifact layout of :mod:`pipeline.features`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

from .datasets import MediaDataset, build_dataset
from .features import ITEM_SCHEMA, FeatureWriter, described


class FeatureStageParams(BaseModel):
    """The parameters every feature stage shares; a stage type adds its model's and sets
    :attr:`modality`."""

    model_config = ConfigDict(extra="forbid")
    modality: ClassVar[str] = ""
    modality_hint: ClassVar[str] = ""  # appended to the wrong-modality error

    dataset: SerializeAsAny[MediaDataset] = Field(
        description="a media dataset: {type: <dataset type>, ...}; types: `stele datasets`")
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
        per core of this node, each with a share of the cores as torch threads (several 1-thread
        actors beat one many-thread actor: BENCHMARKS.md). At most 8 on CPU, each with more threads
        then: every actor holds its own torch and model."""
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


ITEM_REF_SCHEMA = pa.schema([("id", pa.string()), ("media", pa.string())])


class Listing:
    """Lists a dataset's items once, streaming: writes ``items.parquet``, records listing problems and
    empty texts as rejected rows, and yields ``(id, media)`` tables for the featurizer actors.

    An item whose every text is empty keeps its features (it is still a valid item, e.g. a
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
    the model when all goes well: in a fresh ``stele run`` its imports would share the cores with
    the actors' start-up. ``explain()`` builds it here only when the stream fails: a bad name,
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
        # rejected counts items, rejected_rows and rejected_by_reason count rows (rejected_counts)
        **writer.rejected_counts(), "rejected_by_reason": writer.rejected_by_reason,
        **listing.summary(),
        "wall_extract_s": wall, "items_per_s": done / wall if wall > 0 else None,
        "steady_per_s": steady, "actors": min(actors, listing.chunks), "device": device,
        "described": description or {},
    }
