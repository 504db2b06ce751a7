"""Partitioned training (:mod:`knowledge.partitioned`, PyTorch-BigGraph's scheme, Lerer et al.
2019): the bucket trainer (:func:`train_bucket`: explicit row gathers, dense gradients on those rows
and an in-place row-wise Adagrad update, :func:`row_adagrad_`; optionally PBG's batched negatives,
:func:`chunk_scores`) and the resumable epoch loop, which commits a progress record after every round
of buckets, so that a run killed anywhere continues from the last committed round and ends
bit-identical to a run that was never interrupted (the same partitions, relations and history,
wall-clock ``epoch_s`` aside).

**What determines a round.** Epoch ``e``'s bucket order is a function of ``(seed, e)``
(``numpy.random.default_rng([seed, e])`` drives :func:`knowledge.partitioned.inside_out_order`)
and its rounds a function of that order and the worker count (:func:`epoch_schedule`; epoch 1's
first-epoch rule starts from no trained partition, so it too is recomputed). Every random draw of a
bucket comes from a generator seeded by ``(seed, e, i, j)`` inside :func:`train_bucket`; no
generator carries state from one bucket to the next, so there is no RNG state to record. Round
``r`` of epoch ``e`` is therefore a pure function of the partition files it reads and the relations
``(R, d)`` with their accumulators ``(R,)`` it starts from.

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
from torch.func import functional_call

from .embed import kge_loss, lp_regularization, score_shift
from .models import corruption_triples
from .optim import row_adagrad_
from .partitioned import (ACC, ENTITY_TABLES, RELATION_TABLES, RELATIONS, PartitionedJob, Partitioning,
                          PartitionStore, check_shared, empty_partition_model, hash_rank, init_state,
                          inside_out_order, mean_relations, model_tables, part_file, read_bucket, rounds,
                          run_tasks, write_buckets)

PROGRESS = "progress.safetensors"
STAGING = "staging"
BUCKETS_DONE = "buckets.complete.json"
VERSION = 1


class BatchLoss(torch.nn.Module):
    """One bucket step's loss as a function of the model's tables. :func:`train_bucket` calls it
    through ``torch.func.functional_call`` with the ``U`` entity and ``V`` relation rows the batch
    looks up in place of the ``(n, d)`` and ``(R, d)`` tables, and every index renumbered into
    those rows: autograd then gives each table a dense ``(U, d)`` gradient (no sparse tensor, no
    coalesce), and the scoring functions see ``U``-row tables, as with ``build_model(sparse=True)``.

    ``forward(pos, ents, new_head)``: positives ``pos`` (B, 3); per-positive corruptions
    ``ents``, ``new_head`` (B, k) (:func:`knowledge.models.corruption_triples`), or with
    ``negative_chunk = c`` the ``C = ceil(B / c)`` chunks' shared negatives ``ents`` (C, 2k), ``k``
    heads then ``k`` tails, and ``new_head=None`` (:func:`chunk_scores`)."""

    def __init__(self, model: torch.nn.Module, job: PartitionedJob):
        super().__init__()
        self.model, self.job = model, job
        self.shift = score_shift(job.model, job.loss, job.margin)
        self.fused = getattr(model, "scores_corruptions", False)

    def forward(self, pos: torch.Tensor, ents: torch.Tensor, new_head: torch.Tensor | None) -> torch.Tensor:
        job, model, b = self.job, self.model, len(pos)
        neg = None  # (B k, 3) corrupted triples, built only where the model or the penalty needs them
        if new_head is None:
            scores, neg_scores = chunk_scores(model, pos, ents, job.negative_chunk)  # (B,), (B, 2k)
            if job.regularization:  # the triples the chunk scores stand for, for the penalty's rows
                k = ents.shape[1] // 2
                per_pos = ents.repeat_interleave(job.negative_chunk, 0)[:b]              # (B, 2k)
                heads = torch.arange(2 * k, device=pos.device).lt(k).expand(b, -1)
                neg = corruption_triples(pos, per_pos, heads)
        else:
            if not self.fused or job.regularization:
                neg = corruption_triples(pos, ents, new_head)
            if self.fused:
                s = model(pos[:, 0], pos[:, 1], pos[:, 2], corruptions=(ents, new_head))
            else:
                both = torch.cat([pos, neg])
                s = model(both[:, 0], both[:, 1], both[:, 2])
            scores, neg_scores = s[:b], s[b:].view(b, -1)
        value = kge_loss(job.loss, scores + self.shift, neg_scores + self.shift, job.margin,
                         job.adversarial_temperature)
        if job.regularization:
            value = value + job.regularization * lp_regularization(model, pos, neg, job.regularization_p)
        return value


def chunk_scores(model: torch.nn.Module, pos: torch.Tensor, ents: torch.Tensor,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch-BigGraph's batched negatives (Lerer et al. 2019; its docs, "Negative sampling": the
    positives are split into chunks, one set of entities is sampled per chunk and every positive of
    the chunk is corrupted with each of them). Positive ``i`` of ``pos`` (B, 3) is in chunk
    ``i // chunk``; chunk ``c``'s negatives are ``ents[c]`` (2k,): ``k`` heads, then ``k`` tails.
    Through the model's full-candidate form (:func:`knowledge.scoring.candidate_scorer`: a query
    per positive and side against candidate rows), a chunk's ``(chunk, k)`` scores per side are
    one batched product (DistMult, ComplEx: ``q @ C^T``) or distance (TransE, RotatE:
    ``cdist(q, C, p)``; for ``p = 2`` by the GEMM expansion, the scorer's default): no
    ``(B k, d)`` buffer of corrupted rows is gathered. Returns the positives' scores (B,) and the
    negatives' (B, 2k): column ``j < k`` is the positive with head ``ents[c, j]``, ``j >= k`` with
    tail ``ents[c, j]``."""
    from .scoring import candidate_scorer

    sc = candidate_scorer(model)
    cand = sc.candidates                                                           # (U, d')
    h, r, t = pos.unbind(1)
    b, (n_chunks, two_k) = len(pos), ents.shape
    k = two_k // 2
    mode = "donot_use_mm_for_euclid_dist" if sc.exact else "use_mm_for_euclid_dist_if_necessary"

    def score(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:                  # (.., m, d'), (.., n, d')
        if sc.kind == "dot":
            return q @ c.transpose(-1, -2)
        return sc.offset - torch.cdist(q, c, p=sc.p, compute_mode=mode)

    def side(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:                   # (B, d'), (C, k) -> (B, k)
        q = torch.nn.functional.pad(q, (0, 0, 0, n_chunks * chunk - b))             # a short last chunk
        return score(q.view(n_chunks, chunk, -1), cand[e]).reshape(-1, k)[:b]

    q_tail = sc.tail_query(h, r)                                                   # (B, d')
    c_t = cand[t]
    pos_scores = ((q_tail * c_t).sum(-1) if sc.kind == "dot"
                  else sc.offset - torch.linalg.vector_norm(q_tail - c_t, sc.p, -1))
    neg = torch.cat([side(sc.head_query(r, t), ents[:, :k]), side(q_tail, ents[:, k:])], 1)
    return pos_scores, neg


def row_step(loss: BatchLoss, acc: dict[str, torch.Tensor], pos: torch.Tensor, ents: torch.Tensor,
             new_head: torch.Tensor | None) -> float:
    """One optimiser step of ``loss.model`` on positives ``pos`` (B, 3) and their negatives
    (:class:`BatchLoss`'s ``ents``, ``new_head``), indices into the model's tables: gather the
    ``U`` distinct entity and ``V`` distinct relation rows the batch looks up (``torch.unique``,
    which also renumbers the batch into them), the loss on those rows, their dense gradients, the
    row-wise Adagrad update in place (:func:`row_adagrad_`, accumulators ``acc[table]`` (n,)) and
    the model's constraint on the ``U`` entity rows. Returns the loss."""
    model, job, b = loss.model, loss.job, len(pos)
    ent, rel = model_tables(model, ENTITY_TABLES), model_tables(model, RELATION_TABLES)
    e_rows, e_inv = torch.unique(torch.cat([pos[:, 0], pos[:, 2], ents.reshape(-1)]),
                                 return_inverse=True)                               # (U,), (2B + ...)
    r_rows, r_inv = torch.unique(pos[:, 1], return_inverse=True)                    # (V,), (B,)
    rows = {**{n: e_rows for n in ent}, **{n: r_rows for n in rel}}
    tables = {**ent, **rel}
    old = {n: w.detach().index_select(0, rows[n]) for n, w in tables.items()}       # (U | V, d)
    leaves = {f"model.{n}.weight": x.detach().requires_grad_() for n, x in old.items()}
    value = functional_call(loss, leaves, (torch.stack([e_inv[:b], r_inv, e_inv[b:2 * b]], 1),
                                           e_inv[2 * b:].view(ents.shape), new_head))
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    with torch.no_grad():
        for (n, x), grad in zip(old.items(), grads):
            if grad is not None:
                row_adagrad_(tables[n], acc[n], rows[n], x, grad, job.lr, job.weight_decay)
        constrain = getattr(model, "apply_constraints", None)
        if constrain is not None:
            constrain(e_rows)
    return float(value.detach())


def train_bucket(job: PartitionedJob, bucket: tuple[int, int], relations: dict[str, torch.Tensor],
                 epoch: int, out_folder: str = "") -> tuple[dict[str, torch.Tensor], float, int]:
    """One pass, on the CPU, over bucket ``(i, j)``'s triples holding partitions ``i`` and ``j``
    only (:mod:`knowledge.partitioned`): a model of ``n_i + n_j`` entity rows (``n_i`` when
    ``i = j``), partition ``i``'s first. A corrupted head is drawn from rows ``[0, n_i)``, a
    corrupted tail from partition ``j``'s rows. The partitions (tables and accumulators) are
    written back to the state, or with ``out_folder`` to that subfolder of it (a staged write-back
    that leaves the bucket's inputs in place). ``relations``: each relation table ``(R, d)`` and its
    accumulator ``(R,)`` under ``<table>.adagrad``. Returns the relations after the pass, the
    summed batch loss and the number of batches.

    A step (:func:`row_step`) gathers the rows its batch looks up, takes their dense gradients and
    updates them in place: the same arithmetic as a model built with ``sparse=True`` stepped by
    ``RowAdagrad`` (bit for bit for TransE and RotatE; DistMult and ComplEx look rows up through
    ``nn.Embedding``, whose dense backward may sum a row's repeated lookups in another order), without
    building, coalescing and re-reading sparse gradients."""
    torch.set_num_threads(job.threads)
    i, j = bucket
    store = PartitionStore(job.state_uri)
    parts = [i] if i == j else [i, j]
    sizes = [store.header(part_file(p))["node_emb"]["shape"][0] for p in parts]
    model = empty_partition_model(job, sum(sizes), relations)
    ent, rel = model_tables(model, ENTITY_TABLES), model_tables(model, RELATION_TABLES)
    acc = {n: torch.empty(sum(sizes)) for n in ent}                                # (n_i + n_j,)
    for idx, p in enumerate(parts):  # read into place: no loaded copy beside the model's tables
        sl = slice(sum(sizes[:idx]), sum(sizes[:idx + 1]))
        store.read_into(part_file(p), {**{n: w.detach()[sl] for n, w in ent.items()},
                                       **{n + ACC: acc[n][sl] for n in ent}})
    acc.update({n: relations[n + ACC].clone() for n in rel})                       # (R,)

    triples = read_bucket(job.buckets_uri, i, j)                                   # (n, 3) local
    tail_base = 0 if i == j else sizes[0]   # the tail partition's first row in the model
    triples[:, 2] += tail_base
    g = torch.Generator().manual_seed(hash_rank(f"{epoch}/{i}/{j}", job.seed) >> 1)
    order = torch.randperm(len(triples), generator=g)
    head_prob = torch.tensor(job.head_prob) if job.head_prob is not None else None
    loss = BatchLoss(model, job)
    k, chunk, total, batches = job.negatives, job.negative_chunk, 0.0, 0
    model.train()
    for start in range(0, len(order), job.batch_size):
        pos = triples[order[start:start + job.batch_size]]                          # (B, 3)
        b = len(pos)
        # PBG: a corrupted side draws from its own partition (heads from i, tails from j)
        if chunk:
            n_chunks = -(-b // chunk)
            ents = torch.cat([torch.randint(sizes[0], (n_chunks, k), generator=g),
                              tail_base + torch.randint(sizes[-1], (n_chunks, k), generator=g)], 1)
            new_head = None                                                         # ents: (C, 2k)
        else:
            p_head = head_prob[pos[:, 1]].unsqueeze(1) if head_prob is not None else 0.5
            new_head = torch.rand(b, k, generator=g) < p_head                       # (B, k)
            ents = torch.where(new_head, torch.randint(sizes[0], (b, k), generator=g),
                               tail_base + torch.randint(sizes[-1], (b, k), generator=g))
        total += row_step(loss, acc, pos, ents, new_head)
        batches += 1

    for idx, p in enumerate(parts):
        sl = slice(sum(sizes[:idx]), sum(sizes[:idx + 1]))
        name = f"{out_folder.rstrip('/')}/{part_file(p)}" if out_folder else part_file(p)
        store.save(name, {**{n: w.detach()[sl] for n, w in ent.items()},
                          **{n + ACC: acc[n][sl] for n in ent}})
    out = {n: w.detach().clone() for n, w in rel.items()}
    out.update({n + ACC: acc[n] for n in rel})
    return out, total, batches


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
    # negative_chunk came later: left out at its default, so a state written before it resumes
    settings = {k: v for k, v in dataclasses.asdict(job).items()
                if k not in ("state_uri", "buckets_uri", "threads") and not (k == "negative_chunk" and not v)}
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
