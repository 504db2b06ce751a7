"""Steady-state throughput of the 1-actor feature stages against the plain PyTorch loop, in
alternated rounds, at 1 and 2 torch threads on each side.

``features_throughput.py`` times each side once, end to end; on a small, shared machine that mixes
two things: the actor's fixed start-up (a process that imports torch, timm and builds its model)
and the noise of the machine (the plain clip loop's rate moved by more than a third within one
session: BENCHMARKS.md). This script measures the throughput alone, and as pairs: each round runs the plain loop
and then the stage on the same items, with the same number of torch threads, and the ratio of
the pair is taken; the table gives the median of the rounds and their range.

* ``plain``   ``plain_images`` / ``plain_clips`` of ``features_throughput`` (read, decode,
  transform, forward; nothing written), ``torch.set_num_threads(threads)``, its rate from the end
  of its first batch (the model built, the first batch's allocations done), as the stage's. Each
  in a fresh process, as each actor is one: a loop's speed depends on what its process ran
  before (log-mel after the image model in one process was slower than before it: glibc keeps the
  freed buffers of the other workload; figures in BENCHMARKS.md, "Figures moved out of docstrings").
* ``stage``   ``vision.features`` / ``speech.features`` in this process on an embedded Ray, one
  actor with ``threads: <threads>``, shards written; its ``steady_per_s`` (the rate after its
  first batch came back: listing, Ray Data's start and the actor's imports and model excluded).

    STELE_DATA=/path/to/data python bench/features_steady.py [--images 320] [--clips 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from features_throughput import (WEIGHTS, idle_ray, make_clips, make_images, plain_clips,
                                 plain_images, run_stage, stage_spec)


def plain_child(kind: str, listing: Path, threads: int, tune: bool) -> None:
    """The plain loop's steady rate in this (fresh) process, with ``threads`` torch threads (and
    the actors' glibc malloc settings when ``tune``)."""
    import torch

    if tune:
        from pipeline.ray_utils import tune_malloc

        tune_malloc()
    torch.set_num_threads(threads)
    rate = (plain_images(listing, WEIGHTS, 32, after_first=True) if kind == "images"
            else plain_clips(listing, 64, after_first=True))
    print(json.dumps({"rate": rate}))


def plain(kind: str, listing: Path, threads: int, tune: bool) -> float:
    out = subprocess.run([sys.executable, __file__, "--plain-child", kind, str(listing),
                          str(threads)] + (["--tune-plain"] if tune else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rate"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--clips", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="torch threads per side, comma-separated")
    ap.add_argument("--tune-plain", action="store_true",
                    help="plain loops with the stage actors' glibc malloc settings (tune_malloc)")
    ap.add_argument("--plain-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        kind, listing, threads = args.plain_child
        plain_child(kind, Path(listing), int(threads), args.tune_plain)
        return
    if args.images < 8 * 32 or args.clips < 8 * 64:
        # A steady rate is measured from the first batch back to the last: with a few batches,
        # Ray Data returns them together and the rate means nothing.
        ap.error("steady rates need at least 8 batches: --images >= 256, --clips >= 512")
    logging.basicConfig(level=logging.WARNING)

    from pipeline.ray_utils import init_ray, shutdown_ray

    threads = [int(t) for t in args.threads.split(",")]
    pairs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captions = make_images(tmp / "img", args.images)
        transcripts = make_clips(tmp / "wav", args.clips)
        kinds = {"images": (captions, *stage_spec("images", captions, 32)),
                 "clips": (transcripts, *stage_spec("clips", transcripts, 64))}
        init_ray()
        for kind, (_, fn, params_cls, params) in kinds.items():  # untimed: Ray Data's first use
            run_stage(fn, params_cls, {**params, "actors": 1, "limit": 64}, tmp / f"warm-{kind}")
        for r in range(args.rounds):
            for th in threads if r % 2 == 0 else threads[::-1]:
                for kind, (listing, fn, params_cls, params) in kinds.items():
                    idle_ray()
                    rate = plain(kind, listing, th, args.tune_plain)
                    m, _ = run_stage(fn, params_cls, {**params, "actors": 1, "threads": th},
                                     tmp / f"{kind}-{r}-{th}")
                    pairs.setdefault((kind, th), []).append((rate, m["steady_per_s"]))
                    print(f"round {r + 1}, {th} thread(s), {kind}: plain {rate:.1f}/s, stage "
                          f"steady {m['steady_per_s']:.1f}/s ({m['steady_per_s'] / rate:.2f}x)",
                          flush=True)
        shutdown_ray()

    print(f"\n{args.images} images (tf_efficientnet_lite0 grid, batch 32), {args.clips} clips "
          f"(log-mel, batch 64); {args.rounds} rounds; plain loops "
          f"{'with' if args.tune_plain else 'without'} tune_malloc; medians, ratio range in "
          "brackets")
    print(f"{'what':7} {'threads':>7} {'plain/s':>9} {'stage/s':>9} {'ratio':>6}  range")
    for (kind, th), ps in pairs.items():
        ratios = [s / p for p, s in ps]
        print(f"{kind:7} {th:7d} {median(p for p, _ in ps):9.1f} {median(s for _, s in ps):9.1f} "
              f"{median(ratios):6.2f}  [{min(ratios):.2f}, {max(ratios):.2f}]")


if __name__ == "__main__":
    main()
