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
* **A bucket** ``(i, j)`` (:func:`knowledge.partitioned_state.train_bucket`) loads partitions ``i``
  and ``j`` only, trains one pass over its triples in seeded random order (batches of ``B``
  positives, the loss and regulariser of :mod:`knowledge.embed`) with row-wise Adagrad
  (:class:`knowledge.optim.RowAdagrad`'s update, PBG's optimiser; accumulators carried in the
  state), and writes both partitions back. **Negatives** are sampled, as PBG's, from the partition
  of the corrupted side: a corrupted head uniformly from partition ``i``, a corrupted tail from
  ``j``. By default every positive draws its own ``k`` (the side by a fair coin or the Bernoulli
  probability of :func:`knowledge.embed.bernoulli_head_prob`), as :mod:`knowledge.embed` does.
  With ``negative_chunk = c`` they are PBG's batched negatives instead (an option, off by
  default): the batch is cut into chunks of ``c`` positives, each chunk draws ``k`` heads and
  ``k`` tails once, and each of its positives is scored against all ``2 k``, as PBG corrupts both
  sides with ``num_uniform_negs`` each (PBG also adds the chunk's own entities as negatives, not
  done here). A step then gathers, normalises and updates about ``2 B + 2 k B / c`` entity rows
  instead of ``B (2 + k)`` and scores a chunk with one batched product or ``cdist``; the price is
  that a chunk's positives share their negatives.
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
import json
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

from .embed import init_embeddings
from .kg import FILES
from .models import build_model

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
        """Write ``tensors`` as one safetensors file (the format's header, then each tensor's bytes
        in order, streamed from the tensor's own memory: safetensors' ``save`` builds the whole file
        as bytes first, two extra copies of a partition at once)."""
        # wider dtypes first, as safetensors' own writer: every tensor starts aligned to its size
        flat = {k: v.detach().cpu().contiguous()
                for k, v in sorted(tensors.items(), key=lambda kv: -kv[1].element_size())}
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        at = 0
        for k, v in flat.items():
            n = v.numel() * v.element_size()
            header[k] = {"dtype": SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape),
                         "data_offsets": [at, at + n]}
            at += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the format pads its header with spaces to 8 bytes
        final = self.path(name)
        if "/" in name:  # a subfolder (staged write-backs): local folders need it made first
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(len(head).to_bytes(8, "little") + head)
                for v in flat.values():
                    f.write(_raw_bytes(v))
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self.fs.cat_file(self._existing(name)))

    def header(self, name: str) -> dict[str, Any]:
        """The file's safetensors header: ``{tensor: {"dtype", "shape", "data_offsets"}}``."""
        with self.fs.open(self._existing(name), "rb") as f:
            return json.loads(f.read(int.from_bytes(f.read(8), "little")))

    def read_into(self, name: str, out: dict[str, torch.Tensor]) -> None:
        """Read the tensors ``out`` names from ``name`` straight into ``out``'s tensors
        (contiguous CPU tensors of the stored dtype and shape, views into a larger table for
        instance): ``load`` holds the file's bytes and a copy of every tensor on the way."""
        with self.fs.open(self._existing(name), "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            for k, dst in out.items():
                if not dst.is_contiguous():  # its flat view would be a copy, filled in vain
                    raise ValueError(f"read_into fills contiguous tensors only ({k})")
                info = header.get(k)
                want = {"dtype": SAFETENSORS_DTYPES[dst.dtype], "shape": list(dst.shape)}
                if info is None or {"dtype": info["dtype"], "shape": info["shape"]} != want:
                    raise ValueError(f"{self.uri}/{name}: {k} is {info and (info['dtype'], info['shape'])}, "
                                     f"expected {(want['dtype'], want['shape'])}")
                f.seek(8 + size + info["data_offsets"][0])
                view, done = memoryview(_raw_bytes(dst)), 0
                while done < len(view):
                    got = f.readinto(view[done:])
                    if not got:
                        raise ValueError(f"{self.uri}/{name}: {k} is cut short (a truncated file)")
                    done += got

    def _existing(self, name: str) -> str:
        path = self.path(name)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{self.uri}: no {name} (the partitioned state is incomplete)")
        return path


#: torch dtype -> safetensors' name for it
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                      torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a flat uint8 array (shared, not copied)."""
    return t.reshape(-1).view(torch.uint8).numpy()


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
    negative_chunk: int = 0          # > 0: positives per chunk sharing its negatives (PBG); 0: own k each

    def __post_init__(self) -> None:
        if self.negative_chunk < 0:
            raise ValueError(f"negative_chunk must be >= 0 (0: each positive draws its own negatives), "
                             f"got {self.negative_chunk}")
        if self.negative_chunk and self.head_prob is not None:
            raise ValueError("negative_chunk corrupts both sides of every positive (PyTorch-BigGraph's "
                             "batched negatives); Bernoulli corruption picks one side per negative: "
                             "use one or the other")


def model_tables(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    return {n: getattr(model, n).weight for n in names if hasattr(model, n)}


def build_partition_model(job: PartitionedJob, entity_states: Sequence[dict[str, torch.Tensor]],
                          relations: dict[str, torch.Tensor], sparse: bool = False) -> torch.nn.Module:
    """A model whose entity rows are the given partitions' rows one after the other
    (``sum n_p`` rows), with the shared relation tables."""
    model = empty_partition_model(job, sum(len(s["node_emb"]) for s in entity_states), relations, sparse)
    with torch.no_grad():
        for name, w in model_tables(model, ENTITY_TABLES).items():
            start = 0
            for s in entity_states:  # into place, no concatenated temporary of the bucket's rows
                w[start:start + len(s[name])].copy_(s[name])
                start += len(s[name])
    return model


def empty_partition_model(job: PartitionedJob, n: int, relations: dict[str, torch.Tensor],
                          sparse: bool = False) -> torch.nn.Module:
    """A model of ``n`` entity rows left uninitialised (``torch.empty``, for the caller to fill)
    and the shared relation tables. Built with one entity row whose tables are then replaced:
    building it with ``n`` rows would draw a random initialisation of them only to overwrite it."""
    model = build_model(job.model, 1, job.num_relations, job.dim, **job.model_kwargs,
                        **({"sparse": True} if sparse else {}))
    for name in ENTITY_TABLES:
        if hasattr(model, name):
            emb = getattr(model, name)
            emb.weight = torch.nn.Parameter(torch.empty(n, emb.weight.shape[1]))           # (n, d)
            emb.num_embeddings = n
    model.num_nodes = n
    with torch.no_grad():
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
