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

Step 2 computes each partition's score matrices with the same shapes as step 3, so the test
triple's own score is the same number in both and it counts in its own pessimistic rank as in the
unpartitioned evaluator. The per-partition count is exact integer arithmetic; the scores are the
same formulas on the same rows (:func:`knowledge.scoring.candidate_scorer`), but computed over
``n_p`` candidate columns instead of ``N``: a BLAS whose kernel for a score matrix depended on its
width could round a score differently and swap a near-tie. Scoring costs twice the unpartitioned
evaluator's (steps 2 and 3) and memory ``O(batch_size * n_p)`` per task.

Also here, beside the evaluator they use: :func:`fit_partitioned`, the ``knowledge.embed`` stage's
run for ``partitions > 1`` (bucketing, training, validation, assembly), :func:`assemble_model` and
:func:`bernoulli_from_buckets`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .evaluate import SIDES, KnownTriples, _count_rows, assemble_metrics
from .partitioned import (ENTITY_TABLES, RELATION_TABLES, RELATIONS, PartitionedJob, Partitioning,
                          PartitionStore, build_partition_model, check_shared, model_tables, part_file,
                          read_bucket, run_tasks)
from .partitioned_state import ensure_buckets, train_partitioned
from .models import build_model
from .scoring import CandidateScorer, candidate_scorer

HEAD, REL, TAIL = 0, 1, 2


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


def _counts(job: PartitionedJob, p: int, test: Tensor, queries: dict[str, Tensor],
            true: dict[str, Tensor], where: dict[str, Tensor], known: dict[str, Tensor],
            batch_size: int, exact: bool) -> tuple[dict[str, list[Tensor]], int]:
    """Step 3 for partition ``p``: ``side -> [raw >, raw >=, filtered >, filtered >=]`` ``(n,)``
    counts over ``p``'s candidates, and how many distinct known triples ``p``'s filter holds."""
    scorer = partition_scorer(job, p, exact)
    n_ent, n_rel = job.num_entities, job.num_relations
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


def sharded_rank_metrics(job: PartitionedJob, parts: Partitioning, test: Tensor, known: Tensor,
                         batch_size: int = 256, workers: int = 1, cpus_per_worker: float = 1.0,
                         ks: Sequence[int] = (1, 3, 10), max_k_curve: int = 10,
                         exact: bool = False) -> dict[str, Any]:
    """:func:`knowledge.evaluate.rank_metrics` of the partitioned model in ``job.state_uri`` on
    ``test`` ``(n, 3)`` filtered against ``known`` ``(m, 3)`` (global indices), one candidate
    partition per task (Ray tasks with ``workers > 1``); the same dictionary, ``ranks`` included."""
    check_shared(job, workers)
    test = torch.as_tensor(test, dtype=torch.long).cpu()
    known = torch.as_tensor(known, dtype=torch.long).cpu()
    n_ent, n_rel, n_parts = job.num_entities, job.num_relations, parts.num_partitions
    for name, tr in (("test", test), ("known", known)):
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
    for res, n_known in each(_counts, lambda p: (test, queries, true, where, _known_in(known, parts, p),
                                                 batch_size, exact)):
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


@dataclass
class PartitionedRun:
    """What :func:`fit_partitioned` leaves: the assembled model, the history, the partitioning."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    stopped: bool
    parts: Partitioning
    state_uri: str
    counts: np.ndarray                      # (P, P) training triples per bucket

    def save_partitions(self, folder: Path) -> None:
        """Copy the partition files and the relations (never a temporary, staged or progress file)
        into the local ``folder``, with ``partitioning.parquet``: entity ``idx`` is row ``offset`` of
        partition ``partition``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        store = PartitionStore(self.state_uri)
        folder.mkdir(parents=True, exist_ok=True)
        for name in [part_file(p) for p in range(self.parts.num_partitions)] + [RELATIONS]:
            (folder / name).write_bytes(store.fs.cat_file(store.path(name)))
        pq.write_table(pa.table({"idx": pa.array(np.arange(len(self.parts.partition)), pa.int32()),
                                 "partition": pa.array(self.parts.partition, pa.int32()),
                                 "offset": pa.array(self.parts.offset, pa.int64())}),
                       folder / "partitioning.parquet")


def fit_partitioned(job: Any, entity_ids: Sequence[str], num_partitions: int, root_uri: str,
                    workers: int = 1, cpus_per_worker: float = 1.0) -> PartitionedRun:
    """The ``knowledge.embed`` stage's run for ``partitions > 1``: ``job`` is its
    :class:`knowledge.embed.EmbedJob`. Partitions the entities by their ids, buckets the training
    triples under ``<root_uri>/buckets`` (once per state: :func:`knowledge.partitioned_state.ensure_buckets`),
    keeps the partitions under ``<root_uri>/state`` and trains
    (:func:`knowledge.partitioned_state.train_partitioned`, which resumes a killed run from the
    state's progress record); every ``eval_every`` epochs the filtered validation MRR comes from
    :func:`sharded_rank_metrics` (the filter: every split), and ``patience`` evaluations without
    improvement stop the run (counted from the history rows, so a resumed run counts alike). The
    weights are the last epoch's (PBG keeps no best checkpoint either; choosing one would copy
    every partition)."""
    from .kg import read_triples

    root = str(root_uri).rstrip("/")
    parts = Partitioning.by_hash(entity_ids, num_partitions, job.seed)
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
        head_prob=head_prob, seed=job.seed, threads=job.threads_per_worker)
    valid = known = None
    if job.eval_every and job.num_valid:
        valid, known = (torch.from_numpy(a) for a in read_triples(job.kg_uri, "valid", None))

    def stops(rows: list[dict[str, float]]) -> bool:
        """``patience`` evaluations in a row without a new best MRR, before the last epoch."""
        best, bad = -1.0, 0
        for r in rows:
            if "valid_mrr" in r:
                best, bad = (r["valid_mrr"], 0) if r["valid_mrr"] > best else (best, bad + 1)
        return bool(rows) and job.patience > 0 and bad >= job.patience and rows[-1]["step"] < job.epochs

    def on_epoch(epoch: int, row: dict[str, float], earlier: list[dict[str, float]]) -> bool:
        if valid is None or not (epoch % job.eval_every == 0 or epoch == job.epochs):
            return False
        res = sharded_rank_metrics(pjob, parts, valid, known, batch_size=job.eval_batch_size,
                                   workers=workers, cpus_per_worker=cpus_per_worker)
        row["valid_mrr"] = res["filtered"]["both"]["mrr"]
        row["valid_hits@10"] = res["filtered"]["both"]["hits@10"]
        return stops(earlier + [row])

    history = train_partitioned(pjob, parts, counts, job.epochs, workers, cpus_per_worker, on_epoch)
    return PartitionedRun(assemble_model(pjob, parts), history, stops(history), parts, pjob.state_uri,
                          counts)
