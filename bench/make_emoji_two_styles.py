"""The emoji set with a second art style for the training emoji: twice the training pairs, the same
held-out emoji.

Writes an ``image_folder`` dataset (``captions.csv`` and the images under ``noto/`` and ``<style>/``)
in which every emoji of ``emoji.json`` keeps its image and name, and each *training* emoji also
appears drawn in the second style (e.g. Twemoji: ``npm pack emoji-datasource-twitter@16.0.0``, whose
64 px files have the same names) with the same caption. The split is written into the ``split``
column, so the fusion stages use it instead of their hash split: it *is* their hash split of the
plain emoji set (:func:`fusion.splits.split_of` of the emoji's ``unified`` id, the emoji dataset's
item id, with ``--held-out-share`` and ``--split-seed``, the recipes' defaults 0.2 and 0), so the
held-out emoji are exactly those of ``pipelines/emoji_rerank.yaml`` and its figures compare. A
held-out emoji's second-style image is left out (it would be a training pair of a held-out caption);
an emoji the second style lacks trains in one style only (both counted)::

    python bench/make_emoji_two_styles.py /path/to/data/emoji /tmp/twe/package/img/twitter/64 \\
        --style twitter --out /tmp/emoji2
    stele run pipelines/emoji_rerank.yaml --store /tmp/rr2 \\
        --set 'emoji_images.dataset={type: image_folder, captions: /tmp/emoji2/captions.csv}'
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vision.datasets  # noqa: E402,F401 - registers the emoji dataset
from fusion.splits import split_of  # noqa: E402
from pipeline.datasets import build_dataset  # noqa: E402
from pipeline.quarantine import Quarantine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("emoji", type=Path, help="folder with emoji.json and img/ (the shared emoji set)")
    ap.add_argument("second", type=Path, help="folder of the second style's images, same file names")
    ap.add_argument("--style", default="twitter", help="the second style's folder name in --out")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--held-out-share", type=float, default=0.2)
    ap.add_argument("--split-seed", type=int, default=0)
    args = ap.parse_args()
    if args.style == "noto":
        ap.error("--style: 'noto' is the first style's folder")
    # listed as the pipelines list it (item id, name, what is quarantined), so the split agrees
    emoji = build_dataset({"type": "emoji", "path": str(args.emoji), "on_error": "skip"})
    q = Quarantine(emoji.type, emoji.on_error)
    for sub in ("noto", args.style):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    rows = []
    for item in emoji.items(q):
        split, name = split_of(item.id, args.held_out_share, args.split_seed), item.texts[0]
        shutil.copyfile(args.emoji / "img" / item.media, args.out / "noto" / item.media)
        rows.append({"image": f"noto/{item.media}", "caption": name, "split": split, "emoji": item.id,
                     "style": "noto"})
        counts[f"{split} emoji"] += 1
        other = args.second / item.media
        if split != "train":
            counts[f"held-out emoji's {args.style} image left out"] += int(other.is_file())
        elif not other.is_file():
            counts[f"training emoji without a {args.style} image (one style only)"] += 1
        else:
            shutil.copyfile(other, args.out / args.style / item.media)
            rows.append({"image": f"{args.style}/{item.media}", "caption": name, "split": "train",
                         "emoji": item.id, "style": args.style})
            counts["training emoji in both styles"] += 1
    if q.count:
        counts["emoji entries quarantined by the emoji dataset (left out)"] = q.count
    # a temporary name first: a killed run leaves no captions file that looks complete
    tmp = args.out / "captions.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split", "emoji", "style"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(args.out / "captions.csv")
    print(f"{args.out / 'captions.csv'}: {len(rows)} images")
    for k, v in sorted(counts.items()):
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
