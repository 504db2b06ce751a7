"""Write a small offline video-text set from the emoji images: short clips in which one emoji moves, zooms
or rotates, each captioned with what moves how, so that frame order and motion decide the caption.

No public video set is reachable offline, so this one is made, and says so: it is synthetic, with eight
motions in four opposite pairs::

    moving to the left  <->  moving to the right      (the emoji crosses the frame horizontally)
    moving up           <->  moving down              (vertically)
    zooming in          <->  zooming out              (grows from small to full size, or shrinks)
    rotating clockwise  <->  rotating anticlockwise   (turns by 150-210 degrees about its centre)

The second motion of each pair is the first one's frames in reverse order: the two clips hold the same
set of frames, so a model that ignores frame order cannot tell their captions apart ("a red apple moving
to the left" vs "... to the right"), and one that reads order must. That must also hold for the frames
the feature stage samples: sampling every ``--sample-every`` th frame (2: ``emoji_video.yaml``'s 4 fps
of 8 fps clips) picks the same frames from a clip and from its reverse only when the frame count is 1
plus a multiple of it (15 frames: 0, 2, ..., 14 both ways; with 16 the reverse would give the odd
frames, and the twins would differ without any order, e.g. only the zoom-out clip would hold the
full-size frame, only the clockwise one the upright emoji), so other counts are refused. Each clip:
``--frames`` frames (15) of ``--size`` x ``--size`` pixels (64) at ``--fps`` (8), the emoji (half the
frame wide) composited onto white, MPEG-4 Part 2 in ``.mp4``. Start offsets, travel and rotation angle
are drawn from a generator seeded by ``(--seed, emoji index, pair)``, so the set is the same on every
run.

Split by emoji, never by clip: a seeded permutation of the chosen emoji puts ``--test-share`` of them
(all eight of their clips) in ``test``, ``--val-share`` in ``val`` and the rest in ``train``, so test
captions name emoji never seen in training and every motion occurs in every split.

Writes, under ``--out``: ``clips/<emoji id>_<motion>.mp4``, ``captions.csv`` (``video``, ``caption``,
``split``, ``emoji``, ``motion``: the ``video_folder`` dataset reads it as is), ``make.json`` (the
parameters and counts) and the emoji set's licence files (the images are Apache-2.0 Noto emoji; the
clips are derived from them)::

    python bench/make_emoji_videos.py $STELE_DATA/emoji --out pipelines/data/emoji_videos --emoji 64
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PAIRS = [  # (forward motion, its reverse)
    ("left", "right"),
    ("up", "down"),
    ("zoom_in", "zoom_out"),
    ("clockwise", "anticlockwise"),
]
PHRASES = {
    "left": "moving to the left", "right": "moving to the right", "up": "moving up",
    "down": "moving down", "zoom_in": "zooming in", "zoom_out": "zooming out",
    "clockwise": "rotating clockwise", "anticlockwise": "rotating anticlockwise",
}


def caption(name: str, motion: str) -> str:
    """``a red apple moving to the left``: the emoji's name in lower case with an article."""
    name = " ".join(name.lower().split())
    article = "an" if name[:1] in "aeiou" else "a"
    return f"{article} {name} {PHRASES[motion]}"


def sprite(path: Path, size: int) -> Image.Image:
    """The emoji as an RGBA image ``size`` pixels wide."""
    with Image.open(path) as im:
        return im.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)


def forward_frames(emoji: Image.Image, kind: str, n: int, size: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` RGB frames (size, size, 3) of the forward motion ``kind`` (left, up, zoom_in, clockwise)."""
    s = emoji.width
    lo, hi = s / 2, size - s / 2                      # centre positions that keep the emoji inside
    travel = rng.uniform(0.8, 1.0) * (hi - lo)        # how far it goes
    start = hi - rng.uniform(0, (hi - lo) - travel)   # where it starts (right or bottom side)
    across = size / 2 + rng.uniform(-0.1, 0.1) * size  # the other coordinate
    angle = rng.uniform(150, 210)                      # degrees turned by a rotation
    small = rng.uniform(0.3, 0.45)                     # zoom: the smallest scale
    frames = []
    for i in range(n):
        a = i / (n - 1)                                 # 0 -> 1 over the clip
        canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        im, cx, cy = emoji, size / 2, size / 2
        if kind == "left":
            cx, cy = start - a * travel, across
        elif kind == "up":
            cx, cy = across, start - a * travel
        elif kind == "zoom_in":
            k = max(2, round(s * (small + a * (1 - small))))
            im = emoji.resize((k, k), Image.Resampling.LANCZOS)
        elif kind == "clockwise":  # PIL turns anticlockwise for positive angles
            im = emoji.rotate(-a * angle, resample=Image.Resampling.BICUBIC)
        else:
            raise ValueError(kind)
        canvas.alpha_composite(im, (int(round(cx - im.width / 2)), int(round(cy - im.height / 2))))
        frames.append(np.asarray(canvas.convert("RGB")))
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import av

    # bitexact: no encoder version string in the file, the same bytes from every FFmpeg build
    with av.open(str(path), "w", format="mp4", container_options={"fflags": "+bitexact"}) as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        s.bit_rate = 400_000  # small frames: enough bits that the emoji stays recognisable
        s.codec_context.options = {"flags": "+bitexact"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def splits(ids: list[str], test_share: float, val_share: float, seed: int) -> dict[str, str]:
    """Each emoji id -> train / val / test, by a seeded permutation (whole emoji held out)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test, n_val = round(len(ids) * test_share), round(len(ids) * val_share)
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, metavar="EMOJI_DIR",
                    help="emoji folder: emoji.json + img/ (e.g. $STELE_DATA/emoji)")
    ap.add_argument("--out", type=Path, default=Path("pipelines/data/emoji_videos"))
    ap.add_argument("--emoji", type=int, default=None, help="use N emoji (a seeded choice; default all)")
    ap.add_argument("--frames", type=int, default=15, help="1 + a multiple of --sample-every")
    ap.add_argument("--sample-every", type=int, default=2,
                    help="the feature stage's sampling step in frames (its fps = --fps / this)")
    ap.add_argument("--size", type=int, default=64, help="frame width and height (even)")
    ap.add_argument("--fps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-share", type=float, default=0.2)
    ap.add_argument("--val-share", type=float, default=0.1)
    args = ap.parse_args(argv)
    if args.size % 2 or args.size < 16 or args.frames < 2 or args.sample_every < 1:
        ap.error("--size must be even and >= 16, --frames >= 2, --sample-every >= 1")
    if (args.frames - 1) % args.sample_every:
        fit = 1 + args.sample_every * ((args.frames - 1) // args.sample_every)
        ap.error(f"--frames {args.frames}: sampling every {args.sample_every} frames would pick other "
                 f"frames from a clip's reverse than from the clip (give 1 + a multiple of "
                 f"{args.sample_every}, e.g. {fit})")

    entries = json.loads((args.source / "emoji.json").read_text(encoding="utf-8"))
    usable = [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)
              and e.get("image") and (args.source / "img" / e["image"]).is_file()]
    skipped = len(entries) - len(usable)
    if args.emoji is not None and args.emoji < len(usable):
        keep = sorted(np.random.default_rng(args.seed).choice(len(usable), args.emoji, replace=False))
        usable = [usable[i] for i in keep]
    ids = [str(e.get("unified") or Path(e["image"]).stem) for e in usable]
    if len(set(ids)) != len(ids):
        sys.exit(f"{args.source / 'emoji.json'}: repeated emoji ids")
    split = splits(ids, args.test_share, args.val_share, args.seed)

    clips = args.out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (e, eid) in enumerate(zip(usable, ids)):
        im = sprite(args.source / "img" / e["image"], args.size // 2)
        for p, (fwd, rev) in enumerate(PAIRS):
            rng = np.random.default_rng([args.seed, k, p])
            frames = forward_frames(im, fwd, args.frames, args.size, rng)
            for motion, fr in ((fwd, frames), (rev, frames[::-1])):
                rel = f"clips/{eid}_{motion}.mp4"
                write_clip(args.out / rel, fr, args.fps)
                rows.append({"video": rel, "caption": caption(e["name"], motion), "split": split[eid],
                             "emoji": eid, "motion": motion})
    with open(args.out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["video", "caption", "split", "emoji", "motion"])
        w.writeheader()
        w.writerows(rows)
    for lic in ("LICENSE", "LICENSE-APACHE-2.0", "NOTICE"):
        if (args.source / lic).is_file():
            shutil.copy(args.source / lic, args.out / lic)
    by_split = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    info = {"source": str(args.source), "emoji": len(usable), "emoji_skipped_no_image": skipped,
            "clips": len(rows), "clips_by_split": by_split, "frames": args.frames,
            "sample_every": args.sample_every, "size": args.size,
            "fps": args.fps, "seed": args.seed, "test_share": args.test_share,
            "val_share": args.val_share, "motions": [m for pair in PAIRS for m in pair],
            "synthetic": "clips made by moving, zooming and rotating emoji images; not a public set"}
    (args.out / "make.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{len(rows)} clips of {len(usable)} emoji -> {args.out}: {by_split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
