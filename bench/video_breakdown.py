"""Where the text <-> video rankings of the moving-emoji set go wrong: the emoji, the kind of motion,
or its direction in time.

Each clip of ``bench/make_emoji_videos.py`` is an emoji and a motion, and the motions come in pairs
whose second clip is the first one's frames reversed (left / right, up / down, zoom in / out,
clockwise / anticlockwise). A top-1 result can therefore be wrong in three ways, and this script
counts them per ``fusion.retrieval`` stage and direction, from its ``ranks.parquet`` and the clips'
``meta`` (``emoji``, ``motion``) in the featured items:

- **emoji**: the top-1 clip (text -> video) or caption's clip (video -> text) shows the query's emoji;
- **motion | emoji**: of those, the share with the right motion (chance 1/8);
- **reversed | emoji**: of those, the share that is the reversed partner (the same frames in the other
  order);
- **order**: of the queries whose right clip and its reversed partner are both among the results the
  stage kept (its ``top``, 10 by default), the share where the right one ranks above: 50% is a model
  blind to frame order, 100% one that reads it.

It reads a ``bench/seeds.py --json`` file (the run of each seed) and prints one table, mean ± std over
the seeds::

    python bench/video_breakdown.py --store /tmp/vidstore --runs /tmp/vid.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REVERSED = {"left": "right", "up": "down", "zoom_in": "zoom_out", "clockwise": "anticlockwise"}
REVERSED |= {v: k for k, v in REVERSED.items()}
DIRS = ("text_to_media", "media_to_text")


def clip_meta(items) -> dict[str, tuple[str, str]]:
    """clip id -> (emoji, motion) from a feature artifact's ``items.parquet`` (a path or open file)."""
    import pyarrow.parquet as pq

    out = {}
    for row in pq.read_table(items, columns=["id", "meta"]).to_pylist():
        meta = json.loads(row["meta"] or "{}")
        out[row["id"]] = (meta["emoji"], meta["motion"])
    return out


def clip_of(item_or_caption: str) -> str:
    """The clip id of a clip id or of a caption id (``<clip id>#<k>``)."""
    return item_or_caption.rsplit("#", 1)[0] if "#" in item_or_caption else item_or_caption


def breakdown(ranks: list[dict], meta: dict[str, tuple[str, str]]) -> dict[str, float]:
    """The four shares (%) for each direction of one evaluation's ``ranks.parquet`` rows."""
    partner_of = {clip: next((c for c, (e2, m2) in meta.items() if e2 == e and m2 == REVERSED[m]), None)
                  for clip, (e, m) in meta.items()}
    out: dict[str, float] = {}
    for d in DIRS:
        rows = [r for r in ranks if r["direction"] == d]
        emoji = motion = reverse = 0
        above = both = 0
        for r in rows:
            truth = clip_of(r["query_id"])
            top = [clip_of(i) for i in r["top_ids"]]
            e, m = meta[truth]
            e1, m1 = meta[top[0]]
            if e1 == e:
                emoji += 1
                motion += m1 == m
                reverse += m1 == REVERSED[m]
            partner = partner_of[truth]
            if truth in top and partner in top:
                both += 1
                above += top.index(truth) < top.index(partner)
        out[f"{d}_emoji"] = 100 * emoji / len(rows)
        out[f"{d}_motion_given_emoji"] = 100 * motion / emoji if emoji else float("nan")
        out[f"{d}_reversed_given_emoji"] = 100 * reverse / emoji if emoji else float("nan")
        out[f"{d}_order"] = 100 * above / both if both else float("nan")
        out[f"{d}_order_n"] = both
    return out


def stage_breakdown(store_uri: str, run_id: str, stage: str) -> dict[str, float] | None:
    """The breakdown of ``stage`` in run ``run_id``: its ranks and its media input's clips, read
    through the store's filesystem (a remote store's artifacts are not copied whole)."""
    import pyarrow.parquet as pq

    from pipeline.errors import StoreError
    from pipeline.runs import find_stage
    from pipeline.store import ArtifactStore

    store = ArtifactStore(store_uri)
    try:
        ref = find_stage(store, stage, run=run_id)
    except StoreError as e:
        print(f"warning: run {run_id}: {e}", flush=True)
        return None
    media_key = store.manifest(ref.key)["inputs"]["media"]
    with store.fs.open(f"{store.artifact_path(media_key)}/items.parquet", "rb") as f:
        meta = clip_meta(f)
    with store.fs.open(f"{store.artifact_path(ref.key)}/ranks.parquet", "rb") as f:
        return breakdown(pq.read_table(f).to_pylist(), meta)


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]  # a seed without such queries has none to count
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--runs", required=True, help="bench/seeds.py's --json output")
    args = ap.parse_args()
    sweep = json.loads(Path(args.runs).read_text())
    cols = ("emoji", "motion_given_emoji", "reversed_given_emoji", "order")
    print("| stage | direction | right emoji at 1 | right motion, of those | reversed motion, of those "
          "| right clip above its reversed twin (queries with both in the top) |")
    print("|---|---|---|---|---|---|")
    for stage in sweep["stages"]:
        per_seed = [b for run in sweep["runs"].values()
                    if (b := stage_breakdown(args.store, run, stage)) is not None]
        if not per_seed:
            continue
        for d in DIRS:
            cells = [mean_std([b[f"{d}_{c}"] for b in per_seed]) for c in cols]
            pairs = "/".join(str(b[f"{d}_order_n"]) for b in per_seed)
            print(f"| `{stage}` | {d.replace('_', ' ')} | {' | '.join(cells)} ({pairs}) |")


if __name__ == "__main__":
    main()
