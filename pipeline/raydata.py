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
               batch_size: int = 32) -> Iterator[pa.Table]:
    """``fn_cls(**fn_kwargs)(batch)`` over every row of ``tables`` with ``actors`` Ray actors;
    yields the output tables as they finish (in no particular order).

    ``batch_size`` rows go to each call: that is the model's batch. ``fn_cls.__call__`` receives and
    returns a ``pyarrow.Table`` (rows it cannot process should come back flagged, not vanish: the
    caller decides how to record them).
    """
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.verbose_stats_logs = False
    refs = [ray.put(t) for t in tables if t.num_rows]
    if not refs:
        return
    ds = ray.data.from_arrow_refs(refs).map_batches(
        fn_cls, fn_constructor_kwargs=fn_kwargs or {}, batch_size=batch_size,
        batch_format="pyarrow", zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
    for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if out.num_rows:
            yield out


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
