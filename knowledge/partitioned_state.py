"""Resumable partitioned training (:mod:`knowledge.partitioned`, PyTorch-BigGraph's scheme, Lerer
et al. 2019): the epoch loop, which commits a progress record after every round of buckets, so that
a run killed anywhere continues from the last committed round and ends bit-identical to a run that
was never interrupted (the same partitions, relations and history, wall-clock ``epoch_s`` aside).

**What determines a round.** Epoch ``e``'s bucket order is a function of ``(seed, e)``
(``numpy.random.default_rng([seed, e])`` drives :func:`knowledge.partitioned.inside_out_order`)
and its rounds a function of that order and the worker count (:func:`epoch_schedule`; epoch 1's
first-epoch rule starts from no trained partition, so it too is recomputed). Every random draw of a
bucket comes from a generator seeded by ``(seed, e, i, j)`` inside
:func:`knowledge.partitioned.train_bucket`; no generator carries state from one bucket to the next,
so there is no RNG state to record. Round ``r`` of epoch ``e`` is therefore a pure function of the
partition files it reads and the relations ``(R, d)`` with their accumulators ``(R,)`` it starts from.

**The progress record** (``progress.safetensors`` in the state: the relations as tensors, the rest
as JSON in the safetensors metadata; written to a temporary name and renamed, so it is replaced
whole) holds the epoch in progress, the number of its rounds committed, the epoch's loss sum and
batch count so far, the history of the finished epochs, whether the run stopped early, and a
fingerprint of the settings that determine the result (settings, partitioning, workers: another
run's state is refused, never mixed in).

**Staged write-back, why replay is exact.** A round's buckets write their partitions not over the
files they read but into ``staging/e<epoch>-r<round>/``. After the round the record is committed
(naming that folder and its files), and only then are the staged files renamed over the partition
files. So the partition files under their own names are always exactly the state the record
describes, or the state after it once promoted:

* killed while training or writing a round's staged files, or after they are all written but before
  the record (the write-back / record gap): the partition files and relations are the round's
  inputs, untouched; the resumed run drops the staged files and replays the round from the same
  inputs with the same generators, which gives the same numbers;
* killed while promoting: the record names the staged files; the resumed run renames those still
  there (a file already renamed is gone from the folder, and renaming it again would rename the
  same bytes), which completes the promotion, and goes on with the next round;
* killed after an epoch's last round, before its history row is in the record: the epoch's end
  (relations file, ``on_epoch``, which only reads the committed state) is done again.

The bucket files are written once per state (:func:`ensure_buckets`): a completion marker, written
last, says a complete set exists for this partitioning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import torch

from .partitioned import (RELATIONS, PartitionedJob, Partitioning, PartitionStore, check_shared,
                          init_state, inside_out_order, mean_relations, part_file, rounds, run_tasks,
                          train_bucket, write_buckets)

PROGRESS = "progress.safetensors"
STAGING = "staging"
BUCKETS_DONE = "buckets.complete.json"
VERSION = 1


def partitioning_fingerprint(parts: Partitioning) -> str:
    """blake2b of the partition and offset arrays: two runs with equal fingerprints bucket alike."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(parts.partition, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(parts.offset, dtype=np.int64).tobytes())
    return h.hexdigest()


def run_fingerprint(job: PartitionedJob, parts: Partitioning, workers: int) -> str:
    """What the result depends on: the job's settings (not its locations), the partitioning and the
    worker count (which decides the rounds). The thread count is left out so that a run may resume
    on another machine; bit-identity across a resume then holds where torch's CPU kernels give the
    same sums for both thread counts (the tests resume with the same count)."""
    settings = {k: v for k, v in dataclasses.asdict(job).items()
                if k not in ("state_uri", "buckets_uri", "threads")}
    key = json.dumps({"job": settings, "parts": partitioning_fingerprint(parts), "workers": workers},
                     sort_keys=True, default=list)
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def ensure_buckets(kg_uri: str, out_uri: str, parts: Partitioning, split: str = "train") -> np.ndarray:
    """:func:`knowledge.partitioned.write_buckets` unless ``out_uri`` already holds a complete set
    for this partitioning and split: the marker ``buckets.complete.json`` (the partitioning's
    fingerprint, the split and the ``(P, P)`` counts) is written after every bucket file is in place,
    so a set cut short by a kill has none and is written again. Returns the counts."""
    fs, root = fsspec.core.url_to_fs(str(out_uri))
    marker = f"{root.rstrip('/')}/{BUCKETS_DONE}"
    want = {"partitioning": partitioning_fingerprint(parts), "split": split}
    if fs.exists(marker):
        got = json.loads(fs.cat_file(marker))
        if all(got.get(k) == v for k, v in want.items()):
            return np.asarray(got["counts"], dtype=np.int64)
    counts = write_buckets(kg_uri, out_uri, parts, split)
    tmp = f"{marker}.tmp-{want['partitioning']}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps({**want, "counts": counts.tolist()}).encode())
    fs.mv(tmp, marker)
    return counts


def epoch_schedule(job: PartitionedJob, parts: Partitioning, counts: np.ndarray, epoch: int,
                   workers: int) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """Epoch ``epoch``'s non-empty buckets in order and their rounds: a function of ``(seed, epoch)``,
    the counts and the workers only (epoch 1 with the first-epoch rule)."""
    rng = np.random.default_rng([job.seed, epoch])
    order = [b for b in inside_out_order(parts.num_partitions, rng) if counts[b] > 0]
    return order, rounds(order, workers, set() if epoch == 1 else None)


def _metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (its header: an 8-byte little-endian length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def load_progress(store: PartitionStore, fingerprint: str
                  ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """The committed record and relations, or ``(None, None)`` for a state without one."""
    from safetensors.torch import load

    if not store.exists(PROGRESS):
        return None, None
    data = store.fs.cat_file(store.path(PROGRESS))
    meta = _metadata(data)
    if "progress" not in meta:
        raise ValueError(f"{store.uri}: {PROGRESS} holds no progress record (not written by "
                         "knowledge.partitioned_state); remove the state to start over")
    record = json.loads(meta["progress"])
    if record.get("version") != VERSION or record.get("fingerprint") != fingerprint:
        raise ValueError(f"{store.uri}: {PROGRESS} belongs to another run (other settings, partitioning "
                         "or workers); remove the state to start over")
    return record, load(data)


def promote(store: PartitionStore, record: dict[str, Any]) -> None:
    """Rename the record's staged partition files over the partition files (those still staged: one
    renamed before a kill is gone from the folder), then drop every staging folder."""
    for name in record["promote"]:
        src = store.path(f"{record['staging']}/{name}")
        if store.fs.exists(src):
            store.fs.mv(src, store.path(name))
    if store.exists(STAGING):
        store.fs.rm(store.path(STAGING), recursive=True)


def commit(store: PartitionStore, record: dict[str, Any], relations: dict[str, torch.Tensor]) -> None:
    """The record (the commit point), then the promotion it names."""
    store.save(PROGRESS, relations, metadata={"progress": json.dumps(record)})
    promote(store, record)


def train_partitioned(job: PartitionedJob, parts: Partitioning, counts: np.ndarray, epochs: int,
                      workers: int = 1, cpus_per_worker: float = 1.0,
                      on_epoch: Callable[[int, dict[str, float], list[dict[str, float]]], bool] | None = None
                      ) -> list[dict[str, float]]:
    """Train ``epochs`` epochs over the buckets (``counts`` (P, P): triples per bucket; empty
    buckets are skipped) from the state's progress record, or from :func:`init_state` when it has
    none (see the module docstring). ``on_epoch(epoch, row, earlier_rows)`` may add to the epoch's
    history row and returns True to stop; it must depend on the committed state and the rows only.
    Returns the history: ``step``, ``loss`` (mean batch loss of the epoch), ``buckets``, ``rounds``,
    ``epoch_s``. A state whose run finished (or stopped) returns its history without training."""
    check_shared(job, workers)
    store = PartitionStore(job.state_uri)
    fingerprint = run_fingerprint(job, parts, workers)
    record, relations = load_progress(store, fingerprint)
    if record is None:
        relations = init_state(job, parts.sizes.tolist())
        record = {"version": VERSION, "fingerprint": fingerprint, "epoch": 1, "round": 0, "total": 0.0,
                  "batches": 0, "elapsed": 0.0, "history": [], "stopped": False, "staging": "",
                  "promote": []}
        commit(store, record, relations)
    else:
        promote(store, record)
    assert relations is not None
    while not record["stopped"] and record["epoch"] <= epochs:
        epoch = record["epoch"]
        t0 = time.perf_counter() - record["elapsed"]
        order, schedule = epoch_schedule(job, parts, counts, epoch, workers)
        for r in range(record["round"], len(schedule)):
            folder = f"{STAGING}/e{epoch:06d}-r{r:06d}"
            results = run_tasks(train_bucket, [(job, b, relations, epoch, folder) for b in schedule[r]],
                                workers, cpus_per_worker)
            relations = mean_relations([res[0] for res in results])
            record = {**record, "round": r + 1, "total": record["total"] + sum(res[1] for res in results),
                      "batches": record["batches"] + sum(res[2] for res in results),
                      "elapsed": time.perf_counter() - t0, "staging": folder,
                      "promote": [part_file(p) for b in schedule[r] for p in sorted(set(b))]}
            commit(store, record, relations)
        store.save(RELATIONS, relations)
        row = {"step": epoch, "loss": record["total"] / max(record["batches"], 1), "buckets": len(order),
               "rounds": len(schedule), "epoch_s": time.perf_counter() - t0}
        stop = bool(on_epoch(epoch, row, list(record["history"]))) if on_epoch is not None else False
        record = {**record, "epoch": epoch + 1, "round": 0, "total": 0.0, "batches": 0, "elapsed": 0.0,
                  "history": record["history"] + [row], "stopped": stop, "staging": "", "promote": []}
        commit(store, record, relations)
    return record["history"]
