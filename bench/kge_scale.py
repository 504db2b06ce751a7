"""Step time of ``knowledge.embed``'s training step against the number of entities, for dense Adam and
for the sparse row updates (issue 23): ``sparse_adam`` and ``rowwise_adagrad``.

One process, a fixed batch (256 positives, 16 negatives each, TransE L1, dim 64, uniform corruption,
margin loss), the table growing from 10k to 10M entities. Each step is one call of
``knowledge.embed.train_epoch`` on one batch, the loop the stage runs: corruption, forward, backward,
the optimiser's step (and TransE's projection with ``--entity-norm``). Dense Adam's step reads and
writes every row of the table, its gradient and its two moments, so it grows with the table; the
sparse optimisers read and write only the ``U <= 256 * 18`` rows a batch looks up, so their step should
stay flat (the issue's goal: within 2x from 10k to 10M entities). Prints the median of ``--steps``
steps after ``--warmup`` ones, per size and optimiser, then the ratios.

``--exchange`` also measures what two workers exchange per step (gloo, 2 processes on this machine,
as ``knowledge.embed`` on CPU): the dense all-reduce of the entity table's gradient against the
sparse all-reduce DDP runs for a row-sparse one (the ``U`` rows of a batch: every rank all-gathers
every rank's indices and rows), the median of ``--steps`` of each.

A configuration whose tables (parameters, gradient and optimiser state, about 6 tables for dense Adam,
3 for sparse Adam, 1 for row-wise Adagrad) would not fit in 70% of the memory available when it starts
is skipped and says so (10M x 64 float32 is 2.56 GB per table).

    python bench/kge_scale.py [--sizes 1e4,1e5,1e6,1e7] [--dim 64] [--steps 15] [--threads 1] [--exchange]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knowledge.embed import SPARSE_OPTIMIZERS, make_optimizer, train_epoch  # noqa: E402
from knowledge.models import build_model  # noqa: E402

OPTIMIZERS = ("adam", "sparse_adam", "rowwise_adagrad")
# tables of the entity table's size a step holds: parameters, gradient (dense only), optimiser state,
# and dense Adam's temporary denominator
TABLES = {"adam": 6, "sparse_adam": 3, "rowwise_adagrad": 1.1}


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def step_times(model: torch.nn.Module, optimizer_name: str, triples: torch.Tensor, args) -> list[float]:  # noqa: ANN001
    """Seconds per step of ``train_epoch`` on one batch at a time, warm-up steps first."""
    for emb in model.modules():  # the same tables, with row-sparse gradients or not
        if isinstance(emb, torch.nn.Embedding):
            emb.sparse = optimizer_name in SPARSE_OPTIMIZERS
    opt = make_optimizer(optimizer_name, model.parameters(), lr=0.01)
    n = model.node_emb.weight.shape[0]
    times = []
    for i in range(args.warmup + args.steps):
        order = torch.arange(i * args.batch, (i + 1) * args.batch)
        t = time.perf_counter()
        train_epoch(model, opt, triples, order, batch_size=args.batch, negatives=args.negatives,
                    num_entities=n, head_prob=None, loss="margin", margin=1.0, temperature=1.0)
        times.append(time.perf_counter() - t)
    del opt
    model.zero_grad(set_to_none=True)
    gc.collect()
    return times[args.warmup:]


def exchange_worker(rank: int, init: str, sizes: list[int], dim: int, rows: int, steps: int,
                    dense_max: int, out) -> None:  # noqa: ANN001
    """Median seconds of one all-reduce of an ``(n, dim)`` gradient, dense and row-sparse (``rows``
    distinct random rows per rank, as a batch gives), between 2 gloo processes."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    for n in sizes:
        for kind in ("dense", "sparse"):
            if kind == "dense" and n > dense_max:
                continue
            times = []
            for i in range(steps + 2):
                if kind == "dense":
                    grad = torch.randn(n, dim, generator=g)
                else:
                    idx = torch.unique(torch.randint(n, (rows,), generator=g))
                    grad = torch.sparse_coo_tensor(idx.unsqueeze(0), torch.randn(len(idx), dim, generator=g),
                                                   (n, dim), check_invariants=False).coalesce()
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(grad)
                times.append(time.perf_counter() - t)
                del grad
            if rank == 0:
                out.put((n, kind, statistics.median(times[2:])))
    dist.barrier()
    dist.destroy_process_group()


def exchange(sizes: list[int], dim: int, rows: int, steps: int, dense_max: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    init = f"file://{tempfile.mktemp(prefix='stele-kge-scale-')}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=exchange_worker, args=(r, init, sizes, dim, rows, steps, dense_max, out))
             for r in range(2)]
    for p in procs:
        p.start()
    expected = sum(2 if n <= dense_max else 1 for n in sizes)
    res = {}
    for _ in range(expected):
        n, kind, t = out.get()
        res[n, kind] = t
    for p in procs:
        p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--relations", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=16)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--entity-norm", type=float, default=None,
                    help="TransE with entities projected on this sphere (2: the paper's model)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--dense-max", type=float, default=1e7,
                    help="largest table dense Adam is timed on (10M: ~15 GB with its state)")
    ap.add_argument("--exchange", action="store_true",
                    help="also time the 2-worker gloo all-reduce, dense vs row-sparse")
    ap.add_argument("--exchange-dense-max", type=float, default=1e6,
                    help="largest table whose dense all-reduce is timed (2 processes hold it twice)")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    optimizers = args.optimizers.split(",")
    torch.set_num_threads(args.threads)
    # as in a training worker (TrainSession): freed step buffers stay mapped instead of being
    # page-faulted in afresh at every step
    from pipeline.ray_utils import tune_malloc

    tuned = tune_malloc()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s); "
          f"malloc tuned as in workers: {tuned}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    projected = f", entities projected (L{args.entity_norm:g})" if args.entity_norm else ""
    print(f"TransE L1 dim {args.dim}{projected}, "
          f"{args.relations} relations, batch {args.batch} x (1 + {args.negatives}) triples; "
          f"median of {args.steps} steps after {args.warmup} warm-up steps")
    results: dict[tuple[int, str], float | None] = {}
    notes: list[str] = []
    for n in sizes:
        table = n * args.dim * 4
        kwargs = {"p_norm": 1.0, **({"entity_norm": args.entity_norm} if args.entity_norm else {})}
        torch.manual_seed(0)
        model = build_model("transe", n, args.relations, args.dim, **kwargs)
        g = torch.Generator().manual_seed(1)
        m = (args.warmup + args.steps) * args.batch
        triples = torch.stack([torch.randint(n, (m,), generator=g),
                               torch.randint(args.relations, (m,), generator=g),
                               torch.randint(n, (m,), generator=g)], 1)
        for name in optimizers:
            need, avail = TABLES[name] * table, mem_available()
            if name not in SPARSE_OPTIMIZERS and n > args.dense_max:
                results[n, name] = None
                notes.append(f"{name} at {n:,} entities skipped: above --dense-max")
                continue
            if need > 0.7 * avail:
                results[n, name] = None
                notes.append(f"{name} at {n:,} entities skipped: needs ~{need / 1e9:.1f} GB, "
                             f"{avail / 1e9:.1f} GB available")
                continue
            t = step_times(model, name, triples, args)
            results[n, name] = statistics.median(t)
            print(f"  {n:>11,} {name:<16} median {results[n, name]:.4f} s "
                  f"(min {min(t):.4f}, max {max(t):.4f}); peak RSS so far {peak_rss_gb():.1f} GB", flush=True)
        del model
        gc.collect()

    def cell(v: float | None) -> str:
        return "skipped" if v is None else f"{v:.4f}"

    print()
    head = ["entities", "table MB"] + [f"{o} s" for o in optimizers] + \
           [f"adam / {o}" for o in optimizers if o != "adam" and "adam" in optimizers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for n in sizes:
        row = [f"{n:,}", f"{n * args.dim * 4 / 1e6:,.1f}"] + [cell(results[n, o]) for o in optimizers]
        for o in optimizers:
            if o != "adam" and "adam" in optimizers:
                a, b = results[n, "adam"], results[n, o]
                row.append("" if a is None or b is None else f"{a / b:.1f}x")
        print("| " + " | ".join(row) + " |")
    print()
    lo = sizes[0]
    for o in optimizers:
        done = [n for n in sizes if results[n, o] is not None]
        if len(done) > 1:
            hi = done[-1]
            print(f"{o}: step at {hi:,} / step at {lo:,} entities = "
                  f"{results[hi, o] / results[lo, o]:.2f}x")
    for note in notes:
        print(note)
    if args.exchange:
        rows = args.batch * (2 + args.negatives)  # lookups per batch; distinct ones fewer
        dense_max = int(args.exchange_dense_max)
        ex = exchange(sizes, args.dim, rows, args.steps, dense_max)
        print(f"\n2 workers (gloo, 2 processes): all-reduce of the entity gradient per step, median of "
              f"{args.steps}; sparse = the distinct rows of {rows:,} random lookups per rank")
        print("| entities | dense all-reduce s | sparse all-reduce s | dense / sparse |")
        print("|---|---|---|---|")
        for n in sizes:
            d, sp = ex.get((n, "dense")), ex[n, "sparse"]
            print(f"| {n:,} | {'skipped' if d is None else f'{d:.4f}'} | {sp:.4f} | "
                  f"{'' if d is None else f'{d / sp:.1f}x'} |")
    print(f"load average at end {os.getloadavg()[0]:.2f}; peak RSS {peak_rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
