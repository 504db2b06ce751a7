"""Partitioned training of KG embeddings: PyTorch-BigGraph's scheme (Lerer et al. 2019,
"PyTorch-BigGraph: A Large-scale Graph Embedding System", SysML; facebookresearch/PyTorch-BigGraph),
for entity tables that do not fit one worker.

* **Entity partitions.** The ``N`` entities are split into ``P`` partitions of sizes ``floor(N/P)``
  or ``ceil(N/P)``: entities sorted by a seeded hash of their id, ``blake2b(f"{seed}\\x1f{id}")``
  read as a 64-bit integer (the hash of ``fusion.splits.hash_rank``, copied: ``knowledge`` never
  imports ``fusion``), and cut into ``P`` equal runs. The hash, not Python's salted ``hash``, decides,
  so every process and machine computes the same partitions (PBG shuffles the entities once and cuts
  the permutation, which it stores; here the permutation is a function of the ids). Inside a
  partition an entity's local offset is its rank by global index (:class:`Partitioning`).
* **Buckets.** Training triple ``(h, r, t)`` goes to bucket ``(part(h), part(t))``: ``P x P``
  Parquet files of local offsets (``head`` into partition ``i``, ``tail`` into ``j``) under a
  folder or any fsspec URI, written in one streaming pass over the graph (:func:`write_buckets`).
* **State.** Each partition's entity tables (``node_emb``; ComplEx and RotatE also ``node_emb_im``),
  ``(n_p, d)``, and their row-wise Adagrad accumulators, ``(n_p,)``, are one safetensors file under
  the state URI; relations (tables and accumulators) another (:class:`PartitionStore`). A write
  goes to a temporary name first and is renamed into place, so a killed run never leaves a
  half-written partition under the name a reader opens.
* **A bucket** ``(i, j)`` (:func:`train_bucket`) loads partitions ``i`` and ``j`` only, trains one
  pass over its triples in seeded random order (batches of ``B`` positives, ``k`` negatives each,
  the loss and regulariser of :mod:`knowledge.embed`) with row-wise Adagrad
  (:class:`knowledge.embed.RowAdagrad`, PBG's optimiser; accumulators carried in the state), and
  writes both partitions back. **Negatives** are sampled, as PBG's, from the partition of the
  corrupted side: a corrupted head uniformly from partition ``i``, a corrupted tail from ``j`` (the
  side by a fair coin or the Bernoulli probability of :func:`knowledge.embed.bernoulli_head_prob`).
  PBG also reuses each chunk's negatives across its positives and adds in-batch negatives; here
  every positive draws its own ``k``, as :mod:`knowledge.embed` does.
* **An epoch** visits every non-empty bucket once, in PBG's ``inside_out`` order
  (:func:`inside_out_order`): layer ``l = 0..P-1`` holds the buckets whose larger partition is
  ``l``, shuffled within the layer by a seeded generator. Buckets run in **rounds** of disjoint
  buckets (no two share a partition, so no partition is held twice), at most one per worker
  (:func:`rounds`); in the first epoch every bucket after the first must touch a partition trained
  before (PBG's rule, so that new partitions are trained against embeddings already in the common
  space).
* **Relations** are small (``R x d``) and shared. With one worker there is one copy, updated by
  each bucket in turn. With ``W > 1`` workers each bucket of a round starts from the same copy and
  the copy after the round is the mean of the round's results (tables and accumulators alike):
  synchronous averaging, not PBG's asynchronous parameter server, so a run's result does not
  depend on timing. The buckets of a round run as Ray tasks; one worker runs them in this process.

``P = 1`` is the same algorithm on one bucket; the ``knowledge.embed`` stage runs its usual Ray
Train loop for ``partitions: 1`` and this one for more. The epoch loop, which records its progress
after every round so that a killed run resumes exactly, is
:func:`knowledge.partitioned_state.train_partitioned`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .embed import RowAdagrad, init_embeddings, kge_loss, lp_regularization, score_shift
from .kg import FILES
from .models import build_model, corruption_triples

ENTITY_TABLES = ("node_emb", "node_emb_im")
RELATION_TABLES = ("rel_emb", "rel_emb_im")
ACC = ".adagrad"               # suffix of a table's row-wise Adagrad accumulator in a state file
RELATIONS = "relations.safetensors"
BUCKET_SCHEMA = pa.schema([("head", pa.int32()), ("relation", pa.int32()), ("tail", pa.int32())])
#: models whose PyG initialisation of the entity tables is Xavier-uniform (bound depends on N)
XAVIER_ENTITIES = ("distmult", "complex", "rotate")


def part_file(p: int) -> str:
    return f"part-{p:05d}.safetensors"


def bucket_file(i: int, j: int) -> str:
    return f"bucket-{i:05d}-{j:05d}.parquet"


def hash_rank(key: str, seed: int = 0) -> int:
    """``blake2b(f"{seed}\\x1f{key}")`` as a 64-bit integer (``fusion.splits.hash_rank``'s formula)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_ranks(keys: Sequence[str] | pa.Array | pa.ChunkedArray, seed: int = 0,
               chunk: int = 1 << 18) -> np.ndarray:
    """:func:`hash_rank` of every key, ``(N,)`` uint64, ``chunk`` keys at a time: an Arrow array
    (a table's ``id`` column) becomes Python strings one chunk at a time, never all at once."""
    out = np.empty(len(keys), dtype=np.uint64)
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        part = part.to_pylist() if isinstance(part, (pa.Array, pa.ChunkedArray)) else part
        digests = b"".join(hashlib.blake2b(f"{seed}\x1f{k}".encode(), digest_size=8).digest()
                           for k in part)
        out[start:start + len(part)] = np.frombuffer(digests, dtype=">u8")
    return out


@dataclass(frozen=True)
class Partitioning:
    """Entity ``e`` lives in partition ``partition[e]`` at row ``offset[e]`` ((N,) arrays each)."""

    partition: np.ndarray  # (N,) int64
    offset: np.ndarray     # (N,) int64
    num_partitions: int

    @classmethod
    def by_hash(cls, keys: Sequence[str] | pa.Array | pa.ChunkedArray, num_partitions: int,
                seed: int = 0) -> "Partitioning":
        """Entities (one ``keys[e]`` per index ``e``: their ids, a sequence or an Arrow array)
        sorted by :func:`hash_rank` and cut into ``num_partitions`` runs whose sizes differ by at
        most one."""
        n, p = len(keys), num_partitions
        if p < 1 or p > max(n, 1):
            raise ValueError(f"{p} partitions for {n} entities: need 1 <= partitions <= entities")
        order = np.argsort(hash_ranks(keys, seed), kind="stable")      # entity indices in hash order
        part = np.empty(n, dtype=np.int64)
        part[order] = np.arange(n, dtype=np.int64) * p // n
        del order
        # local offset: rank by global index within the partition (stable sort keeps index order)
        by_part = np.argsort(part, kind="stable")
        sizes = np.bincount(part, minlength=p)
        offset = np.empty(n, dtype=np.int64)
        offset[by_part] = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return cls(part, offset, p)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.partition, minlength=self.num_partitions)

    def members(self, p: int) -> np.ndarray:
        """Global indices of partition ``p``'s entities, in local order."""
        return np.flatnonzero(self.partition == p)


class PartitionStore:
    """safetensors files under a folder or fsspec URI (``memory://``, ``s3://``, ...), each written
    whole to ``<name>.tmp-<random>`` and renamed to ``<name>``: a reader opens ``<name>`` only, so a
    write killed half-way leaves the previous complete file (or none), never a truncated one.
    (Object stores make a renamed object visible whole as well: their rename is copy + delete.)"""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def save(self, name: str, tensors: dict[str, torch.Tensor],
             metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        final = self.path(name)
        if "/" in name:  # a subfolder (staged write-backs): local folders need it made first
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        path = self.path(name)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{self.uri}: no {name} (the partitioned state is incomplete)")
        return load(self.fs.cat_file(path))


def write_buckets(kg_uri: str, out_uri: str, parts: Partitioning, split: str = "train") -> np.ndarray:
    """Stream the ``split`` triples of the graph at ``kg_uri`` into ``P x P`` bucket files under
    ``out_uri`` (:func:`bucket_file`; an empty bucket gets an empty file), each written to a
    temporary name and renamed. Returns the ``(P, P)`` triple counts. One pass, one record batch of
    the graph at a time; the ``P^2`` writers are open together (PBG's partition counts, up to a few
    dozen, keep that to a few thousand files; the process's open-file limit must allow them)."""
    p = parts.num_partitions
    fs, root = fsspec.core.url_to_fs(str(out_uri))
    fs.makedirs(root, exist_ok=True)
    kfs, kroot = fsspec.core.url_to_fs(str(kg_uri))
    tag = uuid.uuid4().hex
    writers: dict[int, tuple[Any, Any]] = {}
    counts = np.zeros(p * p, dtype=np.int64)

    def writer(b: int) -> Any:
        if b not in writers:
            try:
                f = fs.open(f"{root}/{bucket_file(b // p, b % p)}.tmp-{tag}", "wb")
            except OSError as e:
                if e.errno == errno.EMFILE:
                    raise ValueError(f"{p} partitions write {p * p} bucket files at once, more than this "
                                     f"process may open ({len(writers)} open): raise its open-file limit "
                                     "(ulimit -n) or use fewer partitions") from e
                raise
            writers[b] = (f, pq.ParquetWriter(f, BUCKET_SCHEMA))
        return writers[b][1]

    try:
        # large record batches: each is cut into P^2 pieces, one row group per bucket file each
        rows_per_batch = min(1 << 22, max(1 << 16, 2048 * p * p))
        with kfs.open(f"{kroot.rstrip('/')}/{FILES['triples']}", "rb") as src:
            for batch in pq.ParquetFile(src).iter_batches(batch_size=rows_per_batch,
                                                          columns=["head", "relation", "tail", "split"]):
                batch = batch.filter(pc.equal(batch["split"], split))
                if not batch.num_rows:
                    continue
                h, r, t = (batch[c].to_numpy().astype(np.int64) for c in ("head", "relation", "tail"))
                if min(h.min(), t.min()) < 0 or max(h.max(), t.max()) >= len(parts.partition):
                    raise ValueError(f"{kg_uri}: {FILES['triples']} holds entity indices outside "
                                     f"0..{len(parts.partition) - 1} (the partitioned entities)")
                b = parts.partition[h] * p + parts.partition[t]
                order = np.argsort(b, kind="stable")
                bs, starts = np.unique(b[order], return_index=True)
                for k, (bucket, lo) in enumerate(zip(bs, starts)):
                    rows = order[lo: starts[k + 1] if k + 1 < len(starts) else len(order)]
                    writer(int(bucket)).write_table(pa.table(
                        [pa.array(parts.offset[h[rows]], pa.int32()), pa.array(r[rows], pa.int32()),
                         pa.array(parts.offset[t[rows]], pa.int32())], schema=BUCKET_SCHEMA))
                    counts[bucket] += len(rows)
        for b in range(p * p):
            writer(b)  # every bucket has a file, empty or not
        for f, w in writers.values():
            w.close()
            f.close()
        for b in range(p * p):
            final = f"{root}/{bucket_file(b // p, b % p)}"
            fs.mv(f"{final}.tmp-{tag}", final)
    finally:
        for f, w in writers.values():  # closed already on success; on an error, before the rm
            for close in (w.close, f.close):
                with contextlib.suppress(Exception):
                    close()
        for b in range(p * p):
            tmp = f"{root}/{bucket_file(b // p, b % p)}.tmp-{tag}"
            if fs.exists(tmp):
                fs.rm(tmp)
    return counts.reshape(p, p)


def read_bucket(uri: str, i: int, j: int) -> torch.Tensor:
    """``(n, 3)`` int64 (head offset in ``i``, relation, tail offset in ``j``) of bucket ``(i, j)``."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    # read whole, then parsed from memory: pq.read_table's dataset machinery on a file object costs
    # more than a small bucket's training
    data = fs.cat_file(f"{root.rstrip('/')}/{bucket_file(i, j)}")
    t = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    if not t.num_rows:
        return torch.zeros(0, 3, dtype=torch.long)
    return torch.from_numpy(np.stack([t[c].to_numpy().astype(np.int64) for c in BUCKET_SCHEMA.names], 1))


@dataclass(frozen=True)
class PartitionedJob:
    """What a bucket trainer needs: settings and locations, no data."""

    model: str                       # transe | distmult | complex | rotate
    dim: int
    model_kwargs: dict[str, Any]
    num_entities: int
    num_relations: int
    state_uri: str                   # partition and relation files (PartitionStore)
    buckets_uri: str                 # bucket files (write_buckets)
    init: str = "default"
    loss: str = "margin"
    margin: float = 1.0
    adversarial_temperature: float = 1.0
    negatives: int = 16
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 0.0
    regularization: float = 0.0
    regularization_p: float = 2.0
    head_prob: tuple[float, ...] | None = None   # Bernoulli corruption per relation; None: 1/2
    seed: int = 0
    threads: int = 1


def model_tables(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    return {n: getattr(model, n).weight for n in names if hasattr(model, n)}


def build_partition_model(job: PartitionedJob, entity_states: Sequence[dict[str, torch.Tensor]],
                          relations: dict[str, torch.Tensor], sparse: bool = False) -> torch.nn.Module:
    """A model whose entity rows are the given partitions' rows one after the other
    (``sum n_p`` rows), with the shared relation tables."""
    n = sum(len(s["node_emb"]) for s in entity_states)
    model = build_model(job.model, n, job.num_relations, job.dim, **job.model_kwargs,
                        **({"sparse": True} if sparse else {}))
    with torch.no_grad():
        for name, w in model_tables(model, ENTITY_TABLES).items():
            start = 0
            for s in entity_states:  # into place, no concatenated temporary of the bucket's rows
                w[start:start + len(s[name])].copy_(s[name])
                start += len(s[name])
        for name, w in model_tables(model, RELATION_TABLES).items():
            w.copy_(relations[name])
    return model


def init_state(job: PartitionedJob, sizes: Sequence[int]) -> dict[str, torch.Tensor]:
    """Write every partition's initial tables (zero accumulators) to the state; returns the initial
    relations. Partition ``p`` is drawn from a generator seeded by ``(seed, p)`` with the model's own
    initialisation (:func:`knowledge.embed.init_embeddings`); PyG's Xavier-uniform entity tables
    (DistMult, ComplEx, RotatE) are rescaled from the partition's bound ``sqrt(6 / (n_p + d))`` to
    the whole table's, ``sqrt(6 / (N + d))``, so every number has the distribution it has at P = 1."""
    store = PartitionStore(job.state_uri)
    for p, n_p in enumerate(sizes):
        torch.manual_seed(job.seed * 1_000_003 + p + 1)
        model = build_model(job.model, int(n_p), job.num_relations, job.dim, **job.model_kwargs)
        init_embeddings(model, job.init)
        state: dict[str, torch.Tensor] = {}
        for name, w in model_tables(model, ENTITY_TABLES).items():
            w = w.detach()
            if job.init == "default" and job.model in XAVIER_ENTITIES:
                w = w * math.sqrt((n_p + job.dim) / (job.num_entities + job.dim))
            state[name], state[name + ACC] = w, w.new_zeros(len(w))
        store.save(part_file(p), state)
    torch.manual_seed(job.seed)
    model = build_model(job.model, 1, job.num_relations, job.dim, **job.model_kwargs)
    init_embeddings(model, job.init)
    relations = {}
    for name, w in model_tables(model, RELATION_TABLES).items():
        relations[name], relations[name + ACC] = w.detach().clone(), w.new_zeros(len(w))
    store.save(RELATIONS, relations)
    return relations


def train_bucket(job: PartitionedJob, bucket: tuple[int, int], relations: dict[str, torch.Tensor],
                 epoch: int, out_folder: str = "") -> tuple[dict[str, torch.Tensor], float, int]:
    """One pass, on the CPU, over bucket ``(i, j)``'s triples holding partitions ``i`` and ``j``
    only (see the module docstring): a model of ``n_i + n_j`` entity rows (``n_i`` when ``i = j``),
    partition ``i``'s first. A corrupted head is drawn from rows ``[0, n_i)``, a corrupted tail
    from partition ``j``'s rows. The partitions (tables and accumulators) are written back to the
    state, or with ``out_folder`` to that subfolder of it (a staged write-back that leaves the
    bucket's inputs in place, :mod:`knowledge.partitioned_state`). ``relations``: each relation
    table ``(R, d)`` and its accumulator ``(R,)`` under ``<table>.adagrad``. Returns the relations
    after the pass, the summed batch loss and the number of batches."""
    torch.set_num_threads(job.threads)
    i, j = bucket
    store = PartitionStore(job.state_uri)
    parts = [i] if i == j else [i, j]
    states = [store.load(part_file(p)) for p in parts]
    sizes = [len(s["node_emb"]) for s in states]
    model = build_partition_model(job, states, relations, sparse=True)
    opt = RowAdagrad(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    for name, w in model_tables(model, ENTITY_TABLES).items():
        opt.state[w]["sum"] = torch.cat([s[name + ACC] for s in states])          # (n_i + n_j,)
    for name, w in model_tables(model, RELATION_TABLES).items():
        opt.state[w]["sum"] = relations[name + ACC].clone()                        # (R,)
    del states  # the model holds the rows now: at scale the loaded copy would double the bucket's peak

    triples = read_bucket(job.buckets_uri, i, j)                                   # (n, 3) local
    tail_base = 0 if i == j else sizes[0]   # the tail partition's first row in the model
    triples[:, 2] += tail_base
    g = torch.Generator().manual_seed(hash_rank(f"{epoch}/{i}/{j}", job.seed) >> 1)
    order = torch.randperm(len(triples), generator=g)
    head_prob = torch.tensor(job.head_prob) if job.head_prob is not None else None
    shift = score_shift(job.model, job.loss, job.margin)
    constrain = getattr(model, "apply_constraints", None)
    fused = getattr(model, "scores_corruptions", False)
    params = [q for q in model.parameters() if q.requires_grad]
    k, total, batches = job.negatives, 0.0, 0
    model.train()
    for start in range(0, len(order), job.batch_size):
        pos = triples[order[start:start + job.batch_size]]                          # (B, 3)
        b = len(pos)
        p_head = head_prob[pos[:, 1]].unsqueeze(1) if head_prob is not None else 0.5
        new_head = torch.rand(b, k, generator=g) < p_head                           # (B, k)
        # PBG: a corrupted side draws from its own partition (heads from i, tails from j)
        ents = torch.where(new_head, torch.randint(sizes[0], (b, k), generator=g),
                           tail_base + torch.randint(sizes[-1], (b, k), generator=g))
        drawn = (ents, new_head)
        neg = None if fused and not job.regularization else corruption_triples(pos, *drawn)
        if fused:
            scores = model(pos[:, 0], pos[:, 1], pos[:, 2], corruptions=drawn)
        else:
            both = torch.cat([pos, neg])
            scores = model(both[:, 0], both[:, 1], both[:, 2])
        scores = scores + shift
        value = kge_loss(job.loss, scores[:b], scores[b:].view(b, k), job.margin,
                         job.adversarial_temperature)
        if job.regularization:
            value = value + job.regularization * lp_regularization(model, pos, neg, job.regularization_p)
        opt.zero_grad(set_to_none=True)
        value.backward()
        for q in params:  # coalesced once: the constraint needs the distinct rows that moved
            if q.grad is not None and q.grad.is_sparse:
                q.grad = q.grad.coalesce()
        opt.step()
        if constrain is not None and model.node_emb.weight.grad is not None:
            constrain(model.node_emb.weight.grad._indices()[0])
        total += float(value.detach())
        batches += 1

    ent = model_tables(model, ENTITY_TABLES)
    for idx, p in enumerate(parts):
        rows = slice(sum(sizes[:idx]), sum(sizes[:idx + 1]))
        name = f"{out_folder.rstrip('/')}/{part_file(p)}" if out_folder else part_file(p)
        store.save(name, {**{n: w.detach()[rows] for n, w in ent.items()},
                                  **{n + ACC: opt.state[w]["sum"][rows] for n, w in ent.items()}})
    rel = model_tables(model, RELATION_TABLES)
    out = {n: w.detach().clone() for n, w in rel.items()}
    out.update({n + ACC: opt.state[w]["sum"].clone() for n, w in rel.items()})
    return out, total, batches


def inside_out_order(num_partitions: int, generator: np.random.Generator) -> list[tuple[int, int]]:
    """PBG's ``inside_out`` bucket order: layer ``l`` = the buckets ``(i, j)`` with ``max(i, j) = l``,
    layers in increasing ``l``, each shuffled."""
    out: list[tuple[int, int]] = []
    for layer in range(num_partitions):
        cells = [(layer, j) for j in range(layer + 1)] + [(i, layer) for i in range(layer)]
        out.extend(cells[c] for c in generator.permutation(len(cells)))
    return out


def rounds(order: Sequence[tuple[int, int]], workers: int,
           trained: set[int] | None = None) -> list[list[tuple[int, int]]]:
    """Greedy rounds over ``order``: each round takes, in order, up to ``workers`` buckets that share
    no partition. With ``trained`` (the first epoch: the partitions trained so far, updated in
    place) a bucket waits until one of its partitions has been trained in an earlier round, except
    the very first bucket."""
    left, out = list(order), []
    while left:
        busy: set[int] = set()
        rnd: list[tuple[int, int]] = []
        # nothing trained yet: the first bucket alone, the others will be trained against it
        cap = 1 if trained is not None and not trained else workers
        for b in left:
            ps = {b[0], b[1]}
            if len(rnd) == cap:
                break
            if ps & busy or (trained is not None and trained and not ps & trained):
                continue
            rnd.append(b)
            busy |= ps
        rnd = rnd or [left[0]]
        left = [b for b in left if b not in rnd]
        if trained is not None:
            trained |= {p for b in rnd for p in b}
        out.append(rnd)
    return out


def check_shared(job: PartitionedJob, workers: int) -> None:
    """Ray tasks run in other processes: a ``memory://`` state or bucket folder (one per process)
    would be empty there."""
    if workers > 1:
        for uri in (job.state_uri, job.buckets_uri):
            if str(uri).startswith("memory://"):
                raise ValueError(f"{uri}: a memory:// location lives in one process; with {workers} "
                                 "workers (Ray tasks) the partitions need a shared one (a folder, s3://)")


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple], workers: int, cpus: float = 1.0) -> list:
    """``[fn(*c) for c in calls]``: in this process with one worker, else as Ray tasks, ``workers``
    at a time, results in the order of ``calls``."""
    if workers <= 1 or len(calls) <= 1:
        return [fn(*c) for c in calls]
    import ray

    remote = ray.remote(num_cpus=cpus)(fn)
    out: list = []
    for start in range(0, len(calls), workers):
        out.extend(ray.get([remote.remote(*c) for c in calls[start:start + workers]]))
    return out


def mean_relations(results: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The relations after a round of parallel buckets: the mean of each table and accumulator."""
    return {n: torch.stack([r[n] for r in results]).mean(0) for n in results[0]}
