"""Filtered link-prediction evaluation sharded by candidate partition, for entity tables kept as
partitions (:mod:`knowledge.partitioned`): the numbers of :func:`knowledge.evaluate.rank_metrics`
(same protocol: both sides, filtered against the known triples, realistic rank for ties), while each
task holds one partition's entity rows (plus the shared relations) at a time.

A rank is a sum of counts over candidates, ``#{e : s_e > s*}`` and ``#{e : s_e >= s*}`` minus the
known-true candidates' share, and a sum over all entities is the sum over the partitions of the
sums inside each. So, for the ``n`` test triples, ``q`` the query vectors of
:mod:`knowledge.scoring` (``(n, k)`` per side) and ``C_p`` partition ``p``'s candidate table
(``(n_p, k)``):

1. **queries** (one task per partition ``p``): the rows of the test triples whose known entity (the
   head for tail prediction, the tail for head prediction) lives in ``p`` -> ``q`` ``(n, k)`` per side;
2. **true scores** (per ``p``): ``S = score(q_chunk, C_p)`` ``(b, n_p)`` for every chunk of
   ``batch_size`` test triples; ``s*`` of the rows whose target lives in ``p`` is read from ``S``;
3. **counts** (per ``p``): the same ``S`` again, ``#{S > s*}``, ``#{S >= s*}``, and the same counts
   over the known-true candidates in ``p`` (the filter of the triples whose target side lies in
   ``p``: a ``1/P`` share of the known triples), subtracted. The counts of all partitions are summed.

**The filter travels by address.** Given a :class:`FilterSource` (the graph artifact's URI and a
``partitioning.parquet``), each step-3 task reads partition ``p``'s members and streams the graph's
triples itself (fsspec, one record batch at a time), keeping only its ``1/P`` share: a task's
arguments are the test triples, their query vectors and locations, never the known triples. (A
filter given as a tensor is split on the driver and shipped by value: for small graphs and tests.)

Step 2 computes each partition's score matrices with the same shapes as step 3, so the test
triple's own score is the same number in both and it counts in its own pessimistic rank as in the
unpartitioned evaluator. The per-partition count is exact integer arithmetic; the scores are the
same formulas on the same rows (:func:`knowledge.scoring.candidate_scorer`), but computed over
``n_p`` candidate columns instead of ``N``: a BLAS whose kernel for a score matrix depended on its
width could round a score differently and swap a near-tie. Scoring costs twice the unpartitioned
evaluator's (steps 2 and 3) and memory ``O(batch_size * n_p)`` per task.

Also here, beside the evaluator they use: :func:`fit_partitioned`, the ``knowledge.embed`` stage's
run for ``partitions > 1`` (bucketing, training, validation, the best epoch's partitions),
:func:`assemble_model`, :func:`bernoulli_from_buckets` and the partitioning file's readers and writer.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from .evaluate import SIDES, KnownTriples, _count_rows, assemble_metrics
from .partitioned import (ENTITY_TABLES, RELATION_TABLES, RELATIONS, PartitionedJob, Partitioning,
                          PartitionStore, build_partition_model, check_shared, model_tables, part_file,
                          read_bucket, run_tasks)
from .kg import FILES
from .partitioned_state import ensure_buckets, train_partitioned
from .models import build_model, model_spec
from .scoring import CandidateScorer, candidate_scorer

HEAD, REL, TAIL = 0, 1, 2
PARTITIONING = "partitioning.parquet"
SPEC = "model.json"   # the partitioned model's spec (knowledge.models.model_spec) beside its partitions
BEST = "best.json"    # in the best-epoch snapshot, written after its files: the epoch it holds


def _join(uri: str, name: str) -> str:
    return f"{str(uri).rstrip('/')}/{name}"


def write_partitioning(parts: Partitioning, uri: str) -> None:
    """``parts`` as Parquet at ``uri`` (a file: folder or fsspec URI), written to a temporary name and
    renamed: ``idx``, ``partition``, ``offset`` (entity ``idx`` is row ``offset`` of ``partition``)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(pa.table({"idx": pa.array(np.arange(len(parts.partition)), pa.int32()),
                                 "partition": pa.array(parts.partition, pa.int32()),
                                 "offset": pa.array(parts.offset, pa.int64())}), f)
    fs.mv(tmp, path)


def read_partitioning(uri: str) -> Partitioning:
    """The :class:`Partitioning` of a file written by :func:`write_partitioning`."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    with fs.open(path, "rb") as f:
        t = pq.read_table(f)
    idx = t["idx"].to_numpy().astype(np.int64)
    part, off = np.empty(len(idx), np.int64), np.empty(len(idx), np.int64)
    part[idx], off[idx] = t["partition"].to_numpy(), t["offset"].to_numpy()
    return Partitioning(part, off, int(part.max()) + 1 if len(part) else 0)


def read_members(uri: str, p: int) -> np.ndarray:
    """Partition ``p``'s entities (global indices, ascending: its local order) from a partitioning
    file, one record batch at a time: ``(n_p,)`` int64, never the ``(N,)`` arrays."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    out = []
    with fs.open(path, "rb") as f:
        for b in pq.ParquetFile(f).iter_batches(columns=["idx", "partition"]):
            idx, part = b["idx"].to_numpy(), b["partition"].to_numpy()
            out.append(idx[part == p].astype(np.int64))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


@dataclass(frozen=True)
class FilterSource:
    """Where a sharded evaluation task reads the filter: the graph artifact (every split of its
    ``triples.parquet``) and the partitioning file (:func:`write_partitioning`)."""

    kg_uri: str
    partitioning_uri: str


def partition_scorer(job: PartitionedJob, p: int, exact: bool = False) -> CandidateScorer:
    """The full-candidate scorer of partition ``p`` (queries over its local rows, its candidates)."""
    store = PartitionStore(job.state_uri)
    model = build_partition_model(job, [store.load(part_file(p))], store.load(RELATIONS)).eval()
    with torch.no_grad():
        return candidate_scorer(model, exact=exact)


def _score(scorer: CandidateScorer, q: Tensor) -> Tensor:
    """``(b, n_p)`` scores of ready query vectors ``q`` ``(b, k)`` against the scorer's candidates."""
    return dataclasses.replace(scorer, tail_query=lambda x, _: x).tails(q, None)


def _queries(job: PartitionedJob, p: int, test: Tensor, where: dict[str, Tensor],
             exact: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """Step 1 for partition ``p``: ``side -> (rows, q (rows, k))`` of the test triples whose known
    entity lives in ``p``."""
    scorer = partition_scorer(job, p, exact)
    out = {}
    with torch.no_grad():
        for side in SIDES:
            source = "tail" if side == "head" else "head"          # the entity the query starts from
            rows = torch.nonzero(where[f"{source}_part"] == p).flatten()
            local, rel = where[f"{source}_off"][rows], test[rows, REL]
            q = scorer.head_query(rel, local) if side == "head" else scorer.tail_query(local, rel)
            out[side] = (rows, q)
    return out


def _true_scores(job: PartitionedJob, p: int, queries: dict[str, Tensor], where: dict[str, Tensor],
                 batch_size: int, exact: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """Step 2 for partition ``p``: ``side -> (rows, s*)`` of the test triples whose target lives in ``p``."""
    scorer = partition_scorer(job, p, exact)
    out = {}
    with torch.no_grad():
        for side in SIDES:
            rows_out, vals = [], []
            for start in range(0, len(queries[side]), batch_size):
                s = _score(scorer, queries[side][start:start + batch_size])         # (b, n_p)
                tp = where[f"{side}_part"][start:start + len(s)]
                mine = torch.nonzero(tp == p).flatten()
                rows_out.append(mine + start)
                vals.append(s[mine, where[f"{side}_off"][start + mine]])
            out[side] = (torch.cat(rows_out), torch.cat(vals))
    return out


def _known_in(known: Tensor, parts: Partitioning, p: int) -> dict[str, Tensor]:
    """The filter's share of partition ``p``: for tail prediction the known triples whose tail lives
    in ``p``, that tail as its local offset; for head prediction those whose head does, alike."""
    part = torch.from_numpy(parts.partition)
    off = torch.from_numpy(parts.offset)
    tails = known[part[known[:, TAIL]] == p].clone()
    tails[:, TAIL] = off[tails[:, TAIL]]
    heads = known[part[known[:, HEAD]] == p].clone()
    heads[:, HEAD] = off[heads[:, HEAD]]
    return {"tail": tails, "head": heads}


def _known_from(source: FilterSource, p: int, num_entities: int, num_relations: int) -> dict[str, Tensor]:
    """:func:`_known_in` read by the task itself: partition ``p``'s members from the partitioning
    file, then the graph's triples one record batch at a time, keeping the rows whose tail (for tail
    prediction) or head (for head prediction) is a member, that entity as its local offset."""
    members = read_members(source.partitioning_uri, p)                             # (n_p,)
    fs, root = fsspec.core.url_to_fs(str(source.kg_uri))
    path = _join(root, FILES["triples"])
    keep: dict[str, list[np.ndarray]] = {"tail": [], "head": []}
    with fs.open(path, "rb") as f:
        for b in pq.ParquetFile(f).iter_batches(columns=["head", "relation", "tail"]):
            tr = np.stack([b[c].to_numpy().astype(np.int64) for c in ("head", "relation", "tail")], 1)
            if len(tr) and (tr[:, [HEAD, TAIL]].min() < 0 or tr[:, [HEAD, TAIL]].max() >= num_entities
                            or tr[:, REL].min() < 0 or tr[:, REL].max() >= num_relations):
                raise ValueError(f"{source.kg_uri}: {FILES['triples']} holds indices outside the "
                                 f"{num_entities} entities / {num_relations} relations")
            for side, col in (("tail", TAIL), ("head", HEAD)):
                pos = np.minimum(np.searchsorted(members, tr[:, col]), max(len(members) - 1, 0))
                hit = members[pos] == tr[:, col] if len(members) else np.zeros(len(tr), bool)
                rows = tr[hit]
                rows[:, col] = pos[hit]
                keep[side].append(rows)
    return {side: torch.from_numpy(np.concatenate(v)) if v else torch.zeros(0, 3, dtype=torch.long)
            for side, v in keep.items()}


def _counts(job: PartitionedJob, p: int, test: Tensor, queries: dict[str, Tensor],
            true: dict[str, Tensor], where: dict[str, Tensor], known: dict[str, Tensor] | FilterSource,
            batch_size: int, exact: bool) -> tuple[dict[str, list[Tensor]], int]:
    """Step 3 for partition ``p``: ``side -> [raw >, raw >=, filtered >, filtered >=]`` ``(n,)``
    counts over ``p``'s candidates, and how many distinct known triples ``p``'s filter holds
    (``known``: ``p``'s share of the filter, or where to read it)."""
    scorer = partition_scorer(job, p, exact)
    n_ent, n_rel = job.num_entities, job.num_relations
    if isinstance(known, FilterSource):
        known = _known_from(known, p, n_ent, n_rel)
    # keys h * R + r (tails) and r * N + t (heads) are global; the values are p's local offsets
    filt = {side: KnownTriples.build(known[side], n_ent, n_rel) for side in SIDES}
    out: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for side in SIDES:
            parts: list[list[Tensor]] = [[], [], [], []]
            for start in range(0, len(test), batch_size):
                batch = test[start:start + batch_size]
                s = _score(scorer, queries[side][start:start + len(batch)])        # (b, n_p)
                st = true[side][start:start + len(batch)]                           # (b,)
                raw_gt, raw_ge = _count_rows(s > st[:, None]), _count_rows(s >= st[:, None])
                rows, others = filt[side].others(side, batch)                       # local others
                sl = slice(start, start + len(batch))
                is_target = ((where[f"{side}_part"][sl][rows] == p)
                             & (others == where[f"{side}_off"][sl][rows]))
                v, v_true = s[rows, others], st[rows]
                f_gt = torch.zeros_like(raw_gt).index_add_(0, rows, ((v > v_true) & ~is_target).long())
                f_ge = torch.zeros_like(raw_ge).index_add_(0, rows, ((v >= v_true) & ~is_target).long())
                for acc, c in zip(parts, (raw_gt, raw_ge, raw_gt - f_gt, raw_ge - f_ge)):
                    acc.append(c)
            out[side] = [torch.cat(c) if c else torch.zeros(0, dtype=torch.long) for c in parts]
    return out, len(filt["tail"].by_hr.keys)


def sharded_rank_metrics(job: PartitionedJob, parts: Partitioning, test: Tensor,
                         known: Tensor | FilterSource, batch_size: int = 256, workers: int = 1,
                         cpus_per_worker: float = 1.0, ks: Sequence[int] = (1, 3, 10),
                         max_k_curve: int = 10, exact: bool = False) -> dict[str, Any]:
    """:func:`knowledge.evaluate.rank_metrics` of the partitioned model in ``job.state_uri`` on
    ``test`` ``(n, 3)`` filtered against ``known``: ``(m, 3)`` triples (global indices), or a
    :class:`FilterSource` each task reads its share from (what scales: the driver never holds the
    filter); one candidate partition per task (Ray tasks with ``workers > 1``); the same
    dictionary, ``ranks`` included."""
    check_shared(job, workers)
    # a copy: a view (test = all[:n]) would pickle its whole base storage into every task
    test = torch.as_tensor(test, dtype=torch.long).cpu().clone()
    if not isinstance(known, FilterSource):
        known = torch.as_tensor(known, dtype=torch.long).cpu()
    elif workers > 1 and any(str(u).startswith("memory://") for u in (known.kg_uri, known.partitioning_uri)):
        raise ValueError(f"{known}: a memory:// location lives in one process; Ray tasks need a shared one")
    n_ent, n_rel, n_parts = job.num_entities, job.num_relations, parts.num_partitions
    checked = [("test", test)] + ([("known", known)] if isinstance(known, Tensor) else [])
    for name, tr in checked:
        if len(tr) and (int(tr[:, [HEAD, TAIL]].min()) < 0 or int(tr[:, [HEAD, TAIL]].max()) >= n_ent):
            raise ValueError(f"{name} triples hold entity indices outside 0..{n_ent - 1}")
        if len(tr) and (int(tr[:, REL].min()) < 0 or int(tr[:, REL].max()) >= n_rel):
            raise ValueError(f"{name} triples hold relation indices outside 0..{n_rel - 1}")
    part, off = torch.from_numpy(parts.partition), torch.from_numpy(parts.offset)
    # where each test triple's head and tail live: (n,) partitions and local offsets
    where = {f"{side}_{k}": a[test[:, HEAD if side == "head" else TAIL]]
             for side in SIDES for k, a in (("part", part), ("off", off))}
    ps = list(range(n_parts))

    def each(fn: Any, args: Any) -> list:
        return run_tasks(fn, [(job, p, *args(p)) for p in ps], workers, cpus_per_worker)

    queries = {side: torch.empty(0) for side in SIDES}
    for res in each(_queries, lambda p: (test, where, exact)):
        for side, (rows, q) in res.items():
            if queries[side].numel() == 0:
                queries[side] = q.new_zeros(len(test), q.shape[1])
            queries[side][rows] = q
    true = {side: torch.zeros(len(test), dtype=queries[side].dtype) for side in SIDES}
    for res in each(_true_scores, lambda p: (queries, where, batch_size, exact)):
        for side, (rows, s) in res.items():
            true[side][rows] = s
    if any(torch.isnan(t).any() for t in true.values()):
        raise ValueError("the model scored a test triple as NaN; ranks would be meaningless")
    totals = {side: [torch.zeros(len(test), dtype=torch.long) for _ in range(4)] for side in SIDES}
    num_known = 0

    def share(p: int) -> dict[str, Tensor] | FilterSource:
        return known if isinstance(known, FilterSource) else _known_in(known, parts, p)

    for res, n_known in each(_counts, lambda p: (test, queries, true, where, share(p), batch_size, exact)):
        num_known += n_known
        for side in SIDES:
            for acc, c in zip(totals[side], res[side]):
                acc += c
    return _assemble(test, totals, n_ent, n_rel, num_known, ks, max_k_curve)


def _assemble(test: Tensor, counts: dict[str, list[Tensor]], n_ent: int, n_rel: int, num_known: int,
              ks: Sequence[int], max_k_curve: int) -> dict[str, Any]:
    """``rank_metrics``' result from the summed counts (the same arithmetic as there)."""
    ranks: dict[str, Tensor] = {}
    for setting, (gt_i, ge_i) in (("raw", (0, 1)), ("filtered", (2, 3))):
        opt = torch.cat([counts[s][gt_i] for s in SIDES]) + 1
        pes = torch.cat([counts[s][ge_i] for s in SIDES])
        ranks[f"{setting}_optimistic"], ranks[f"{setting}_pessimistic"] = opt, pes
        ranks[setting] = (opt + pes).double() / 2
    return assemble_metrics(test, ranks, n_ent, n_rel, num_known, ks, max_k_curve)


def bernoulli_from_buckets(uri: str, num_partitions: int, num_relations: int) -> torch.Tensor:
    """:func:`knowledge.embed.bernoulli_head_prob` of the bucketed triples, one partition at a time:
    the distinct heads of relation ``r`` are the sum over partitions ``i`` of the distinct heads in
    buckets ``(i, *)`` (a head lives in one partition), tails alike with buckets ``(*, j)``."""
    p = num_partitions
    count = torch.zeros(num_relations)
    heads, tails = torch.zeros(num_relations), torch.zeros(num_relations)
    for side, acc in ((0, heads), (2, tails)):
        for q in range(p):
            rows = torch.cat([read_bucket(uri, q, j) if side == 0 else read_bucket(uri, j, q)
                              for j in range(p)])
            if side == 0:
                count += torch.bincount(rows[:, 1], minlength=num_relations)
            pairs = torch.unique(rows[:, [1, side]], dim=0)
            acc += torch.bincount(pairs[:, 0], minlength=num_relations) if len(pairs) else 0
    probs = torch.full((num_relations,), 0.5)
    seen = count > 0
    tph, hpt = count[seen] / heads[seen], count[seen] / tails[seen]
    probs[seen] = tph / (tph + hpt)
    return probs



def assemble_model(job: PartitionedJob, parts: Partitioning) -> torch.nn.Module:
    """The whole model from the state (every partition's rows at their global indices): for
    artifacts and tests at a scale where one table fits."""
    store = PartitionStore(job.state_uri)
    model = build_model(job.model, job.num_entities, job.num_relations, job.dim, **job.model_kwargs)
    tables = model_tables(model, ENTITY_TABLES)
    with torch.no_grad():
        for p in range(parts.num_partitions):
            state = store.load(part_file(p))
            idx = torch.from_numpy(parts.members(p))
            for name, w in tables.items():
                w.index_copy_(0, idx, state[name])
        rel = store.load(RELATIONS)
        for name, w in model_tables(model, RELATION_TABLES).items():
            w.copy_(rel[name])
    return model.eval()


def snapshot(src_uri: str, dst_uri: str, names: Sequence[str], marker: dict[str, Any]) -> None:
    """Copy the files ``names`` of the store at ``src_uri`` into ``dst_uri`` (each to a temporary
    name, then renamed), then ``marker`` as :data:`BEST`: the best epoch's partitions, for the cost
    of one copy of the table per improvement (an epoch rewrites each partition ``2P`` times)."""
    src, dst = PartitionStore(src_uri), PartitionStore(dst_uri)
    if dst.exists(BEST):
        dst.fs.rm(dst.path(BEST))   # a snapshot half replaced is no snapshot
    for name in names:
        tmp = f"{dst.path(name)}.tmp-{uuid.uuid4().hex}"
        if src.fs is dst.fs:   # one store: its own copy (a server-side copy on object stores)
            src.fs.copy(src.path(name), tmp)
        else:
            dst.fs.pipe_file(tmp, src.fs.cat_file(src.path(name)))
        dst.fs.mv(tmp, dst.path(name))
    dst.fs.pipe_file(dst.path(BEST), json.dumps(marker).encode())


def load_partitioned(folder: str | Path) -> tuple[PartitionedJob, Partitioning]:
    """The job (model spec, sizes, ``state_uri`` = the folder) and the partitioning of a
    ``partitions/`` folder written by :meth:`PartitionedRun.save_partitions`, for the sharded
    evaluator and :func:`assemble_model`."""
    folder = Path(folder)
    spec = json.loads((folder / SPEC).read_text())
    job = PartitionedJob(model=spec["model"], dim=spec["dim"], model_kwargs=spec["kwargs"],
                         num_entities=spec["num_entities"], num_relations=spec["num_relations"],
                         state_uri=str(folder), buckets_uri="")
    return job, read_partitioning(str(folder / PARTITIONING))


@dataclass
class PartitionedRun:
    """What :func:`fit_partitioned` leaves: the history, the partitioning, where the weights are."""

    job: PartitionedJob
    history: list[dict[str, float]]
    stopped: bool
    parts: Partitioning
    weights_uri: str                        # the best epoch's snapshot, or the state (last epoch)
    best_epoch: int | None                  # the epoch weights_uri holds when it is a snapshot
    counts: np.ndarray                      # (P, P) training triples per bucket

    def assemble(self) -> torch.nn.Module:
        """The whole ``(N, d)`` model (:func:`assemble_model`): only where one table fits."""
        return assemble_model(dataclasses.replace(self.job, state_uri=self.weights_uri), self.parts)

    def save_partitions(self, folder: Path) -> None:
        """Copy the partition files and the relations (never a temporary, staged or progress file)
        into the local ``folder``, with ``partitioning.parquet`` (entity ``idx`` is row ``offset`` of
        partition ``partition``) and ``model.json`` (the model's spec, ``knowledge.models.model_spec``
        with the whole table's sizes): :func:`load_partitioned` reads them back."""
        store = PartitionStore(self.weights_uri)
        folder.mkdir(parents=True, exist_ok=True)
        for name in [part_file(p) for p in range(self.parts.num_partitions)] + [RELATIONS]:
            with store.fs.open(store.path(name), "rb") as src, open(folder / name, "wb") as dst:
                while chunk := src.read(1 << 24):   # 16 MiB at a time: a partition may be large
                    dst.write(chunk)
        write_partitioning(self.parts, str(folder / PARTITIONING))
        j = self.job
        spec = model_spec(build_model(j.model, 1, j.num_relations, j.dim, **j.model_kwargs))
        (folder / SPEC).write_text(json.dumps({**spec, "num_entities": j.num_entities}, indent=1))


def fit_partitioned(job: Any, entity_ids: Sequence[str] | pa.Array | pa.ChunkedArray, num_partitions: int,
                    root_uri: str, workers: int = 1, cpus_per_worker: float = 1.0,
                    on_row: Callable[[dict[str, float], list[dict[str, float]]], None] | None = None,
                    negative_chunk: int = 0) -> PartitionedRun:
    """The ``knowledge.embed`` stage's run for ``partitions > 1``: ``job`` is its
    :class:`knowledge.embed.EmbedJob`. Partitions the entities by their ids (an Arrow column is
    hashed a chunk at a time), writes the partitioning to ``<root_uri>/partitioning.parquet``,
    buckets the training triples under ``<root_uri>/buckets`` (once per state:
    :func:`knowledge.partitioned_state.ensure_buckets`), keeps the partitions under
    ``<root_uri>/state`` and trains (:func:`knowledge.partitioned_state.train_partitioned`, which
    resumes a killed run from the state's progress record); every ``eval_every`` epochs the filtered
    validation MRR comes from :func:`sharded_rank_metrics` (the filter: every split, read by each
    task from the graph's URI), and ``patience`` evaluations without improvement stop the run
    (counted from the history rows, so a resumed run counts alike). As at ``partitions: 1`` the
    weights are the best validation epoch's: each new best MRR copies the partitions to
    ``<root_uri>/best`` (:func:`snapshot`); without validation, the last epoch's. ``on_row(row,
    earlier_rows)`` sees each epoch's history row once it is complete (live tracking); an epoch
    redone after a kill is seen again. ``negative_chunk``: PyTorch-BigGraph's batched negatives
    (:class:`knowledge.partitioned.PartitionedJob`; 0, the default, draws per positive)."""
    from .kg import read_triples

    root = str(root_uri).rstrip("/")
    parts = Partitioning.by_hash(entity_ids, num_partitions, job.seed)
    write_partitioning(parts, f"{root}/{PARTITIONING}")
    buckets = f"{root}/buckets"
    counts = ensure_buckets(job.kg_uri, buckets, parts)
    head_prob = None
    if job.corruption == "bernoulli":
        head_prob = tuple(bernoulli_from_buckets(buckets, num_partitions, job.num_relations).tolist())
    pjob = PartitionedJob(
        model=job.model, dim=job.dim, model_kwargs=job.model_kwargs, num_entities=job.num_entities,
        num_relations=job.num_relations, state_uri=f"{root}/state", buckets_uri=buckets,
        init=job.init, loss=job.loss, margin=job.margin,
        adversarial_temperature=job.adversarial_temperature, negatives=job.negatives,
        batch_size=job.batch_size, lr=job.lr, weight_decay=job.weight_decay,
        regularization=job.regularization, regularization_p=job.regularization_p,
        head_prob=head_prob, seed=job.seed, threads=job.threads_per_worker, negative_chunk=negative_chunk)
    valid = None
    if job.eval_every and job.num_valid:
        valid = torch.from_numpy(read_triples(job.kg_uri, "valid")[0])
    known = FilterSource(job.kg_uri, f"{root}/{PARTITIONING}")
    best_uri = f"{root}/best"
    names = [part_file(p) for p in range(num_partitions)] + [RELATIONS]

    def best_of(rows: list[dict[str, float]]) -> float:
        return max((r["valid_mrr"] for r in rows if "valid_mrr" in r), default=-1.0)

    def stops(rows: list[dict[str, float]]) -> bool:
        """``patience`` evaluations in a row without a new best MRR, before the last epoch."""
        best, bad = -1.0, 0
        for r in rows:
            if "valid_mrr" in r:
                best, bad = (r["valid_mrr"], 0) if r["valid_mrr"] > best else (best, bad + 1)
        return bool(rows) and job.patience > 0 and bad >= job.patience and rows[-1]["step"] < job.epochs

    def on_epoch(epoch: int, row: dict[str, float], earlier: list[dict[str, float]]) -> bool:
        stop = False
        if valid is not None and (epoch % job.eval_every == 0 or epoch == job.epochs):
            res = sharded_rank_metrics(pjob, parts, valid, known, batch_size=job.eval_batch_size,
                                       workers=workers, cpus_per_worker=cpus_per_worker)
            row["valid_mrr"] = res["filtered"]["both"]["mrr"]
            row["valid_hits@10"] = res["filtered"]["both"]["hits@10"]
            if row["valid_mrr"] > best_of(earlier):
                # done again with the epoch's end when a kill comes before the record: same files
                snapshot(pjob.state_uri, best_uri, names, {"epoch": epoch, "valid_mrr": row["valid_mrr"]})
            stop = stops(earlier + [row])
        if on_row is not None:
            on_row(row, earlier)
        return stop

    history = train_partitioned(pjob, parts, counts, job.epochs, workers, cpus_per_worker, on_epoch)
    weights, best_epoch = pjob.state_uri, None
    marker = PartitionStore(best_uri)
    if any("valid_mrr" in r for r in history) and marker.exists(BEST):
        weights, best_epoch = best_uri, json.loads(marker.fs.cat_file(marker.path(BEST)))["epoch"]
    return PartitionedRun(pjob, history, stops(history), parts, weights, best_epoch, counts)
