"""Write the demo's emoji slice (pipelines/data/emoji/) from the full emoji set.

Deterministic: within each category (in the order of first appearance in emoji.json, items in
``sort_order``), every 6th item starting with the first, so every category is represented and the
slice is about 1/6 of the set. Copies LICENSE and NOTICE; the Apache-2.0 text the Noto images need
is written as LICENSE-APACHE-2.0 from the system copy (/usr/share/common-licenses/Apache-2.0,
Debian's base-files) unless --apache-license names another copy.

    python pipelines/data/make_emoji_slice.py /work/shared/data/emoji   # or $STELE_DATA/emoji
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "emoji"
EVERY = 6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="the full emoji folder (emoji.json, img/, LICENSE, NOTICE)")
    ap.add_argument("--every", type=int, default=EVERY)
    ap.add_argument("--apache-license", type=Path,
                    default=Path("/usr/share/common-licenses/Apache-2.0"))
    args = ap.parse_args()
    for need in ("emoji.json", "img", "LICENSE", "NOTICE"):
        if not (args.src / need).exists():
            sys.exit(f"error: {args.src / need} not found (expected the full emoji folder)")
    if not args.apache_license.is_file():
        sys.exit(f"error: {args.apache_license} not found (pass --apache-license PATH)")
    items = json.loads((args.src / "emoji.json").read_text())
    by_cat: dict[str, list[dict]] = {}
    for it in sorted(items, key=lambda x: x["sort_order"]):
        by_cat.setdefault(it["category"], []).append(it)
    chosen = [it for cat in by_cat.values() for it in cat[::args.every]]
    chosen.sort(key=lambda x: x["sort_order"])
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "img").mkdir(parents=True)
    for it in chosen:
        shutil.copyfile(args.src / "img" / it["image"], OUT / "img" / it["image"])
    (OUT / "emoji.json").write_text(json.dumps(chosen, indent=1, ensure_ascii=False) + "\n")
    shutil.copyfile(args.src / "LICENSE", OUT / "LICENSE")
    shutil.copyfile(args.src / "NOTICE", OUT / "NOTICE")
    shutil.copyfile(args.apache_license, OUT / "LICENSE-APACHE-2.0")
    counts = {cat: len(v[::args.every]) for cat, v in by_cat.items()}
    print(f"{len(chosen)} of {len(items)} emoji -> {OUT}: {counts}")


if __name__ == "__main__":
    main()
