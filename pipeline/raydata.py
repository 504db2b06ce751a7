"""The one way stele stages run per-item work on Ray Data: a stream of Arrow tables in, through a pool
of actors, a stream of Arrow tables out.

Stage code looks like this (three layers, as in Ray's own examples: a callable class per batch, a
helper that wires Ray Data, and a thin stage function that consumes the stream)::

    class Featurize:                     # built once per actor: load the model here
        def __init__(self, params): ...
        def __call__(self, batch: pa.Table) -> pa.Table: ...

    for out in stream_map(item_tables, Featurize, fn_kwargs={"params": p}, actors=2):
        writer.add(out)

Why this shape:

- The inputs go into the object store as they are listed (:func:`stream_map` keeps only references),
  so the stage process never holds a dataset, however large; Ray spills the object store to disk
  when needed.
- The outputs come back to the stage's own process and are written there, into the artifact's work
  folder. Actors never write files, so a cluster needs no shared filesystem for the result, and the
  artifact becomes visible only when the stage commits it (manifest last), never half-written.
- Ray Data's own progress bars are turned off: the stage reports progress on the live table instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa


def cluster_gpus() -> float:
    """GPUs in the Ray cluster this process is connected to (0 when none)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def stream_map(tables: Iterable[pa.Table], fn_cls: type, *, fn_kwargs: dict[str, Any] | None = None,
               actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
               batch_size: int = 32, calls_per_actor: int = 4) -> Iterator[pa.Table]:
    """``fn_cls(**fn_kwargs)(batch)`` over every row of ``tables`` with ``actors`` Ray actors (no
    more than there are tables); yields the output tables in the order of the input rows.

    ``batch_size`` rows go to each call: that is the model's batch. ``fn_cls.__call__`` receives and
    returns a ``pyarrow.Table`` (rows it cannot process should come back flagged, not vanish: the
    caller decides how to record them).

    ``calls_per_actor`` Ray tasks run at once in each actor, but ``fn_cls.__call__`` only ever in
    one of them, on one thread (Ray Data's ``max_concurrent_calls_per_actor`` without
    ``enable_true_multi_threading``; the featurizers are not thread-safe): Ray's own per-task work
    (fetching the input block, putting the output table into the object store) overlaps the model's
    next call instead of following it, as Ray's docs advise for a GPU fed by CPU batching; a
    1-actor feature stage ran faster in every round with 4 than with 1. No more tasks than that are
    in flight on an actor (Ray Data's default is twice as many): the actor that is up first would
    take them all before the others start, and a queue behind the running calls gained nothing
    measurable (BENCHMARKS.md, "Feature extraction on Ray Data vs a plain PyTorch loop",
    ``calls_per_actor``).

    Outputs keep the input order (Ray Data's ``preserve_order``): an artifact written from the
    stream is then the same file on every run. In completion order, a feature shard's rows came out
    in a different order on each fresh run, and a model trained on it saw different batches (two
    fresh demo runs differed in every multimodal figure).
    """
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = True
    ds = _dataset(tables)
    if ds is None:
        return
    # One block is one model batch, and an actor without a block would only cost its start.
    actors = min(actors, ds.num_blocks())
    ds = ds.map_batches(
        fn_cls, fn_constructor_kwargs=fn_kwargs or {}, batch_size=batch_size,
        batch_format="pyarrow", zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=actors,
                                           max_concurrent_calls_per_actor=calls_per_actor,
                                           max_tasks_in_flight_per_actor=calls_per_actor),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
    for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if out.num_rows:
            yield out


def _dataset(tables: Iterable[pa.Table]) -> Any:
    """The tables as a Ray Data dataset (None when they hold no row), each put into the object store
    as it comes, so the caller keeps only references.

    The block metadata is computed here, in this process, as Ray's own ``from_blocks`` does:
    ``ray.data.from_arrow_refs`` runs a remote task per block for it, and on a fresh Ray that task
    first waits for a worker process to start, before the stage's actors can start theirs."""
    import ray
    import ray.data

    try:  # Ray's internals behind from_blocks (DeveloperAPI): a pinned Ray keeps them
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.from_operators import FromBlocks
        from ray.data._internal.stats import DatasetStats
        from ray.data.block import BlockMetadataWithSchema
        from ray.data.dataset import MaterializedDataset
    except ImportError:  # another Ray: the public constructor
        refs = [ray.put(t) for t in tables if t.num_rows]
        return ray.data.from_arrow_refs(refs) if refs else None
    refs, metas = [], []
    for t in tables:
        if t.num_rows:
            refs.append(ray.put(t))
            metas.append(BlockMetadataWithSchema.from_block(t))
    if not refs:
        return None
    ctx = ray.data.DataContext.get_current().copy()
    return MaterializedDataset(LogicalPlan(FromBlocks(refs, metas), ctx), ctx,
                               DatasetStats(metadata={"FromBlocks": metas}, parent=None))


def chunked(rows: Iterable[dict[str, Any]], size: int, schema: pa.Schema) -> Iterator[pa.Table]:
    """Rows (dicts) as Arrow tables of at most ``size`` rows: how a listing becomes stream input."""
    buf: list[dict[str, Any]] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= size:
            yield pa.Table.from_pylist(buf, schema=schema)
            buf = []
    if buf:
        yield pa.Table.from_pylist(buf, schema=schema)


def threads_for(actors: int, cpus_per_actor: float) -> int:
    """Intra-op threads for each actor's torch: the machine's cores shared among the actors (Ray
    sets OMP_NUM_THREADS to the logical CPU request, which undersubscribes a 1-actor pool)."""
    import os

    cores = os.cpu_count() or 1
    return max(1, math.floor(cores / max(1, actors)), math.floor(cpus_per_actor))
