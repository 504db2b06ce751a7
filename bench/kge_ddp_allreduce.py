"""What DDP costs a KG embedding model per optimizer step: the all-reduce of the full gradient of
the entity and relation tables (PyG's KGE models have dense gradients), measured with the same
backend ``knowledge.embed`` uses on CPU (gloo), 2 processes on this machine.

Each step of ``knowledge.embed`` with N workers all-reduces ``(num_entities + num_relations) * dim``
float32 values; this prints the median all-reduce time for growing tables beside the measured time of
one training step (batch 256, 16 negatives, TransE, dim 128) so the two can be compared.

    python bench/kge_ddp_allreduce.py [--dim 128] [--sizes 1e3,1e4,1e5,1e6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, sizes: list[int], dim: int, reps: int, init: str, out) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    for n in sizes:
        grad = torch.randn(n, dim)
        dist.all_reduce(grad)  # warm-up
        times = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(grad)
            times.append(time.perf_counter() - t)
        if rank == 0:
            out.put((n, statistics.median(times)))
    dist.destroy_process_group()


def step_time(num_entities: int, dim: int) -> float:
    """One TransE training step of knowledge.embed's loop, single process."""
    from knowledge.embed import corrupt, kge_loss
    from knowledge.models import build_model

    torch.set_num_threads(1)
    model = build_model("transe", num_entities, 11, dim)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pos = torch.stack([torch.randint(num_entities, (256,)), torch.randint(11, (256,)),
                       torch.randint(num_entities, (256,))], dim=1)
    times = []
    for _ in range(12):
        t = time.perf_counter()
        batch = torch.cat([pos, corrupt(pos, 16, num_entities, None)])
        s = model(batch[:, 0], batch[:, 1], batch[:, 2])
        loss = kge_loss("margin", s[:256], s[256:].view(256, 16), 1.0, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    init = f"file://{tempfile.mktemp(prefix='stele-ddp-')}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, sizes, args.dim, args.reps, init, out))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get() for _ in sizes)
    for p in procs:
        p.join()
    print(f"dim {args.dim}, 2 gloo processes on {os.cpu_count()} cores, median of {args.reps}")
    print(f"{'entities':>10} {'table MB':>9} {'all-reduce s':>13} {'1-worker step s':>16} {'ratio':>6}")
    for n in sizes:
        step = step_time(n, args.dim)
        mb = n * args.dim * 4 / 1e6
        print(f"{n:>10} {mb:>9.1f} {results[n]:>13.4f} {step:>16.4f} {results[n] / step:>6.2f}")


if __name__ == "__main__":
    main()
