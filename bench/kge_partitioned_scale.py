"""Partitioned KG-embedding training at the scale it exists for (issue 23): a generated graph of N
entities and M triples is written as a ``knowledge.ingest`` artifact on disk in chunks (never held as
Python objects), then the ``knowledge.embed`` stage trains ONE epoch with ``partitions: P`` and
``assemble: false`` (partitions spilled to the state folder on disk, no ``(N, d)`` table anywhere),
and the script reports the wall time of each phase, the training epoch's edges per second per core,
and the peak memory of the whole process tree (this process, and Ray's processes and workers when
``--workers`` > 1), sampled every 0.2 s, against the issue's goal of at most 6 GB.

    python bench/kge_partitioned_scale.py                       # the issue's size: 20M / 40M, dim 128
    python bench/kge_partitioned_scale.py --entities 200000 --triples 400000 --partitions 4

``--compare OLD.py`` measures the bucket trainer instead of the stage: one epoch of
``knowledge.partitioned_state.train_partitioned`` (one worker, in this process) with the
``train_bucket`` of an older copy of the module that held it (for example
``git show <rev>:knowledge/partitioned.py > /tmp/old.py``), then with this tree's, then (with
``--negative-chunk C``) this tree's with PyTorch-BigGraph's batched negatives, on the same graph and
buckets, each from its own initial state, ``--repeats`` times in turn after one untimed bucket each;
it prints each run's CPU seconds (getrusage of this process: the edges per CPU-second are those of
the stage's figure, whose span is the same call) and the ratios to the first variant::

    python bench/kge_partitioned_scale.py --entities 200000 --triples 400000 --partitions 4 \
        --compare /tmp/old.py --negative-chunk 50

Disk: the graph (about 12 bytes per triple, compressed), the buckets (the same), the state (the
table: 4 x N x (dim + 1) bytes, printed at the start) and the artifact's copy of it
(as much again): put ``--root`` on a disk with room. Peak memory is the sum of the processes'
resident sets (shared pages count once per process, so the sum bounds the real use from above); the
stage process's own peak from ``getrusage`` is printed beside it (it also catches spikes between
samples). The graph is uniform random (heads, relations, tails drawn independently): it measures
the system, not what the embeddings learn. Nothing here is compared in a table of its own: the
PyTorch-BigGraph figure printed at the end is its published one, for scale, with its source.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_BYTES = 6 * 10**9  # the "peak memory <= 6 GB"
CHUNK = 1 << 22         # rows per written chunk: the generator's memory is one chunk's

# PyTorch-BigGraph's own published throughput, quoted with its source; the README gives it per
# machine and does not state the machine's cores, so no per-core figure is derived from it.
PBG_REFERENCE = [
    (">1 million edges/sec/machine with 100 negatives per edge (batched negative sampling)",
     "facebookresearch/PyTorch-BigGraph README.md, section Overview (commit 6fccd3f, 2024-03-02), "
     "https://github.com/facebookresearch/PyTorch-BigGraph"),
    ("its Wikidata embeddings (78M entities): dim 200, batch_size 10000, 500 batch + 500 uniform "
     "negatives, 4 epochs, 1 partition (the settings, no time given)",
     "PyTorch-BigGraph docs/source/pretrained_embeddings.rst (same commit)"),
]


class TreeMemory:
    """Peak of the summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.me, self.every, self.peak, self.peak_procs = psutil.Process(), every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        total, n = 0, 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if total > self.peak:
            self.peak, self.peak_procs = total, n
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time of the processes of the tree alive now (a wall-clock rate on a
        busy machine counts the time others ran; this counts only the tree's own)."""
        import psutil

        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                c = p.cpu_times()
                total += c.user + c.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def reset(self) -> None:
        self.peak = self.peak_procs = 0

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def write_graph(folder: Path, n: int, m: int, relations: int, seed: int) -> None:
    """A ``knowledge.ingest`` artifact (knowledge/kg.py's three tables) of ``n`` entities
    (ids ``gen:e<i>``), ``relations`` relations and ``m`` uniform random training triples, each
    table written ``CHUNK`` rows at a time from Arrow / numpy arrays."""
    from knowledge.kg import ENTITY_SCHEMA, FILES, RELATION_SCHEMA, TRIPLE_SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(folder / FILES["entities"], ENTITY_SCHEMA) as w:
        for lo in range(0, n, CHUNK):
            idx = pa.array(np.arange(lo, min(lo + CHUNK, n), dtype=np.int32))
            ids = pc.binary_join_element_wise("gen:e", pc.cast(idx, pa.string()), "")
            k = len(idx)
            w.write_table(pa.table([idx, ids, ids, pa.nulls(k, pa.list_(pa.string())),
                                    pa.nulls(k, pa.string()), pa.nulls(k, pa.list_(pa.string())),
                                    pa.repeat(pa.scalar("gen"), k)], schema=ENTITY_SCHEMA))
    ridx = pa.array(np.arange(relations, dtype=np.int32))
    rids = pc.binary_join_element_wise("gen:r", pc.cast(ridx, pa.string()), "")
    pq.write_table(pa.table([ridx, rids, rids, pa.repeat(pa.scalar("gen"), relations)],
                            schema=RELATION_SCHEMA), folder / FILES["relations"])
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(folder / FILES["triples"], TRIPLE_SCHEMA) as w:
        for lo in range(0, m, CHUNK):
            k = min(CHUNK, m - lo)
            cols = [pa.array(rng.integers(0, hi, k, dtype=np.int32)) for hi in (n, relations, n)]
            w.write_table(pa.table([*cols, pa.repeat(pa.scalar("train"), k)], schema=TRIPLE_SCHEMA))


def train_one_epoch(root: Path, args: argparse.Namespace, mem: TreeMemory) -> dict:
    """The ``knowledge.embed`` stage, ``partitions: P``, ``assemble: false``, one epoch, no
    validation, its state (partitions and buckets) in ``root/state``; ``epoch_cpu_s``: the process
    tree's CPU time inside the training loop (the stage's call of ``train_partitioned``)."""
    import knowledge.partitioned_eval as loop
    from knowledge.stages.embed import EmbedParams, embed

    real, cpu = loop.train_partitioned, {}

    def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        start = mem.cpu_seconds()
        try:
            return real(*a, **kw)
        finally:
            cpu["epoch"] = mem.cpu_seconds() - start

    loop.train_partitioned = timed
    from pipeline.context import StageContext
    from pipeline.registry import Resources
    from pipeline.store import Artifact

    out = root / "artifact"
    out.mkdir()
    ctx = StageContext(stage="embed", key="bench", out=out, resources=Resources(),
                       inputs={"kg": Artifact("kg", root / "kg", {})}, state_uri=str(root / "state"),
                       log=logging.getLogger("bench.kge_partitioned_scale"))
    params = EmbedParams(model=args.model, dim=args.dim, epochs=1, eval_every=0,
                         optimizer="rowwise_adagrad", lr=0.1, partitions=args.partitions,
                         assemble=False, batch_size=args.batch_size, negatives=args.negatives,
                         negative_chunk=args.negative_chunk,
                         scaling={"num_workers": args.workers, "cpus_per_worker": args.threads})
    try:
        metrics = embed(ctx, params)
    finally:
        loop.train_partitioned = real
    metrics["history"] = json.loads((out / "history.json").read_text())
    metrics["epoch_cpu_s"] = cpu["epoch"]
    return metrics


def _load_module(path: str, name: str):  # noqa: ANN202
    """The module at ``path`` under the name ``knowledge.<name>`` (its relative imports resolve
    against this tree's ``knowledge``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"knowledge.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compare_bucket_trainers(root: Path, args: argparse.Namespace) -> None:
    """``--compare``: see the module docstring. The job is the one ``knowledge.embed`` builds from
    this script's settings (row-wise Adagrad, lr 0.1, the model's default loss and margin)."""
    import dataclasses

    import knowledge.partitioned_state as state
    from knowledge.embed import DEFAULT_LOSS
    from knowledge.kg import FILES
    from knowledge.partitioned import PartitionedJob, Partitioning, init_state
    from knowledge.stages.embed import DEFAULT_MARGIN

    ids = pq.read_table(root / "kg" / FILES["entities"], columns=["id"])["id"]
    parts = Partitioning.by_hash(ids, args.partitions, args.seed)
    counts = state.ensure_buckets(str(root / "kg"), str(root / "buckets"), parts)
    margin = DEFAULT_MARGIN[args.model]
    kwargs = {"transe": {"p_norm": 1.0, "margin": margin}, "rotate": {"margin": margin}}.get(args.model, {})
    job = PartitionedJob(model=args.model, dim=args.dim, model_kwargs=kwargs, num_entities=args.entities,
                         num_relations=args.relations, state_uri="", buckets_uri=str(root / "buckets"),
                         loss=DEFAULT_LOSS[args.model], margin=margin, negatives=args.negatives,
                         batch_size=args.batch_size, lr=0.1, seed=args.seed, threads=args.threads)
    old = _load_module(args.compare, "_bench_baseline_trainer")
    variants = [(f"baseline: train_bucket of {args.compare}", old.train_bucket, job),
                ("this tree: train_bucket", state.train_bucket, job)]
    if args.negative_chunk:
        variants.append((f"this tree: negative_chunk {args.negative_chunk} ({args.negatives} heads + "
                         f"{args.negatives} tails per chunk)", state.train_bucket,
                         dataclasses.replace(job, negative_chunk=args.negative_chunk)))
    real, cpu = state.train_bucket, {v[0]: [] for v in variants}
    steps = int(sum(-(-int(c) // args.batch_size) for c in counts.flatten()))  # per epoch
    # untimed: one bucket per variant first, so that no variant pays the first calls' costs (lazy
    # imports, first use of a kernel) for the others
    for k, (_, fn, j) in enumerate(variants):
        j = dataclasses.replace(j, state_uri=str(root / f"warm-{k}"))
        fn(j, (0, 0), init_state(j, parts.sizes.tolist()), 1)
        shutil.rmtree(root / f"warm-{k}", ignore_errors=True)
    try:
        for rep in range(args.repeats):
            for k, (name, fn, j) in enumerate(variants):
                state.train_bucket = fn
                j = dataclasses.replace(j, state_uri=str(root / f"state-{rep}-{k}"))
                before = resource.getrusage(resource.RUSAGE_SELF)
                t = time.perf_counter()
                hist = state.train_partitioned(j, parts, counts, epochs=1)
                after = resource.getrusage(resource.RUSAGE_SELF)
                used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                cpu[name].append(used)
                print(f"run {rep + 1}, {name}: CPU {used:.2f} s (wall {time.perf_counter() - t:.2f} s), "
                      f"{args.triples / used:,.0f} edges per CPU-second, {1e3 * used / steps:.1f} ms "
                      f"per step (CPU, bucket loads and writes included), mean batch loss "
                      f"{hist[0]['loss']:.6f}, load average {os.getloadavg()[0]:.1f}", flush=True)
                shutil.rmtree(root / f"state-{rep}-{k}", ignore_errors=True)
    finally:
        state.train_bucket = real
    base = float(np.mean(cpu[variants[0][0]]))
    print(f"mean over {args.repeats} run(s) each, {args.triples:,} triples, {args.partitions} partitions, "
          f"{args.model} dim {args.dim}, batch {args.batch_size}, {args.negatives} negatives, "
          f"{args.threads} thread(s):")
    for name, _, _ in variants:
        mean = float(np.mean(cpu[name]))
        print(f"  {name}: {args.triples / mean:,.0f} edges per CPU-second, {base / mean:.2f}x the baseline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=20_000_000)
    ap.add_argument("--triples", type=int, default=40_000_000)
    ap.add_argument("--partitions", type=int, default=32,
                    help="P: a bucket holds 2 of P partitions (2/P of the table; its loaded copy, "
                         "model and write-back make the peak a few times that)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--relations", type=int, default=100)
    ap.add_argument("--model", default="transe", choices=["transe", "distmult", "complex", "rotate"])
    ap.add_argument("--batch-size", type=int, default=1000, help="positives per step (PBG's default)")
    ap.add_argument("--negatives", type=int, default=16, help="corruptions per positive")
    ap.add_argument("--workers", type=int, default=1, help="buckets trained at once (> 1: Ray tasks)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--root", default=None, help="working folder (default: a new one under the "
                    "system's temporary folder); removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", default=None, metavar="OLD.py", help="time the bucket trainer of this "
                    "older copy of its module against this tree's (see the module docstring)")
    ap.add_argument("--negative-chunk", type=int, default=0, help="PyTorch-BigGraph's batched negatives, "
                    "chunks of this many positives (the stage's negative_chunk); with --compare: also "
                    "this tree's trainer with them")
    ap.add_argument("--repeats", type=int, default=2, help="with --compare: runs of each variant")
    args = ap.parse_args()
    if args.compare and args.workers != 1:
        ap.error("--compare times the bucket trainer in this process: one worker")
    if args.repeats != 2 and not args.compare:
        ap.error("--repeats goes with --compare")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # write_buckets keeps the P^2 bucket files open at once: more than a default soft limit of
    # 1024 descriptors at P = 32, so the soft limit is raised towards the hard one
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.partitions ** 2 + 512
    if soft != resource.RLIM_INFINITY and soft < want:
        top = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        if top < want:
            print(f"warning: {top} open files allowed, {args.partitions ** 2} bucket files to write",
                  flush=True)
    root = Path(args.root or tempfile.mkdtemp(prefix="kge-partitioned-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    cores = args.workers * args.threads
    table = 4 * args.entities * (args.dim * (2 if args.model in ("complex", "rotate") else 1) + 1)
    print(f"graph: {args.entities:,} entities, {args.relations} relations, {args.triples:,} triples; "
          f"{args.model} dim {args.dim}; {args.partitions} partitions ({args.partitions ** 2} buckets); "
          f"{args.workers} worker(s) x {args.threads} thread(s); batch {args.batch_size}, "
          f"{args.negatives} negatives; table + row-wise Adagrad state {table / 1e9:.2f} GB; "
          f"root {root}", flush=True)
    try:
        if args.compare:
            write_graph(root / "kg", args.entities, args.triples, args.relations, args.seed)
            compare_bucket_trainers(root, args)
            return
        with TreeMemory() as mem:
            t = time.perf_counter()
            write_graph(root / "kg", args.entities, args.triples, args.relations, args.seed)
            gen_s, gen_peak = time.perf_counter() - t, mem.peak
            mem.reset()
            if args.workers > 1:
                from pipeline.ray_utils import init_ray

                init_ray(num_cpus=cores)
            t, cpu = time.perf_counter(), mem.cpu_seconds()
            metrics = train_one_epoch(root, args, mem)
            stage_s, stage_cpu = time.perf_counter() - t, mem.cpu_seconds() - cpu
        peak, procs = mem.peak, mem.peak_procs
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        epoch_s = metrics["history"][0]["epoch_s"]
        rate = args.triples / epoch_s
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"generate graph:   {gen_s:8.1f} s   (peak RSS {gen_peak / 1e9:.2f} GB)")
        print(f"knowledge.embed:  {stage_s:8.1f} s   (CPU {stage_cpu:.1f} s over the process tree)")
        print(f"  training epoch: {epoch_s:8.1f} s   {metrics['buckets']} buckets, "
              f"mean batch loss {metrics['final_loss']:.6f}")
        print(f"  the rest:       {stage_s - epoch_s:8.1f} s   (hashing ids, buckets, initial partitions, "
              f"copying partitions/ into the artifact)")
        print(f"  edges/s:        {rate:12,.0f}   per core: {rate / cores:,.0f} ({cores} core(s), "
              f"wall clock of the epoch)")
        print(f"  edges per CPU-second of the epoch: {args.triples / metrics['epoch_cpu_s']:,.0f} "
              f"(CPU {metrics['epoch_cpu_s']:.1f} s: the tree's own time, whatever else runs)")
        print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s) "
              f"(a busy machine slows the wall-clock figures)")
        print(f"peak RSS, process tree during the stage: {peak / 1e9:.2f} GB over {procs} process(es); "
              f"this process's own peak (getrusage, whole run): {own / 1e9:.2f} GB")
        verdict = "meets" if max(peak, own) <= GOAL_BYTES else "MISSES"
        print(f"goal: peak <= {GOAL_BYTES / 1e9:.0f} GB -> {verdict} it "
              f"({max(peak, own) / 1e9:.2f} GB, the larger of the two)")
        print(f"disk used under root: {disk / 1e9:.2f} GB")
        print("PyTorch-BigGraph, published (for scale; other hardware, other settings):")
        for figure, source in PBG_REFERENCE:
            print(f"  - {figure}\n    source: {source}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
