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
- **order**: of the queries whose right clip or its reversed partner is among the results the stage
  kept (its ``top``, 10 by default), the share where the right one ranks above the partner (one
  that is kept ranks above one that is not): 50% is a model blind to frame order, 100% one that
  reads it. Also per motion pair (the features need not show every motion equally: a pooled CNN
  vector hardly changes when an emoji moves sideways).

It reads a ``bench/seeds.py --json`` file (the run of each seed) and prints the tables, mean ± std
over the seeds::

    python bench/video_breakdown.py --store /tmp/vidstore --runs /tmp/vid.json

``--probe STAGE`` (a ``vision.video_features`` stage of those runs, repeatable) adds what the
features themselves carry: per motion pair, an L2-regularised logistic regression on a clip's frame
vectors laid end to end in time order, trained on the pair's training clips to tell the first motion
from its reverse and scored on the held-out clips (chance 50%; on shuffled frames it should stay
there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAIRS = {"left": "right", "up": "down", "zoom_in": "zoom_out", "clockwise": "anticlockwise"}
REVERSED = PAIRS | {v: k for k, v in PAIRS.items()}
PAIR_OF = {m: p for p, q in PAIRS.items() for m in (p, q)}   # motion -> its pair's first motion
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
    """The four shares (%) for each direction of one evaluation's ``ranks.parquet`` rows, and the
    order share per motion pair (``{d}_order_{first motion}``), with the queries counted (``_n``)."""
    partner_of = {clip: next((c for c, (e2, m2) in meta.items() if e2 == e and m2 == REVERSED[m]), None)
                  for clip, (e, m) in meta.items()}
    out: dict[str, float] = {}
    for d in DIRS:
        rows = [r for r in ranks if r["direction"] == d]
        emoji = motion = reverse = 0
        above, both = Counter(), Counter()
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
            if truth in top or partner in top:
                both[PAIR_OF[m]] += 1
                above[PAIR_OF[m]] += truth in top and (partner not in top or
                                                       top.index(truth) < top.index(partner))
        out[f"{d}_emoji"] = 100 * emoji / len(rows)
        out[f"{d}_motion_given_emoji"] = 100 * motion / emoji if emoji else float("nan")
        out[f"{d}_reversed_given_emoji"] = 100 * reverse / emoji if emoji else float("nan")
        for key, a, b in (("order", sum(above.values()), sum(both.values())),
                          *((f"order_{p}", above[p], both[p]) for p in PAIRS)):
            out[f"{d}_{key}"] = 100 * a / b if b else float("nan")
            out[f"{d}_{key}_n"] = b
    return out


def stage_breakdown(store_uri: str, run_id: str, stage: str) -> dict[str, float] | None:
    """The breakdown of ``stage`` in run ``run_id``: its ranks and its media input's clips, read
    through the store's filesystem (a remote store's artifacts are not copied whole)."""
    import pyarrow.parquet as pq

    from seeds import stage_ref

    found = stage_ref(store_uri, run_id, stage)
    if found is None:
        return None
    store, ref = found
    media_key = store.manifest(ref.key)["inputs"]["media"]
    with store.fs.open(f"{store.artifact_path(media_key)}/items.parquet", "rb") as f:
        meta = clip_meta(f)
    with store.fs.open(f"{store.artifact_path(ref.key)}/ranks.parquet", "rb") as f:
        return breakdown(pq.read_table(f).to_pylist(), meta)


def direction_probe(store_uri: str, run_id: str, stage: str, l2: float = 1e-2) -> dict[str, float]:
    """Held-out accuracy (%) per motion pair of a logistic regression telling a pair's first motion
    from its reverse, on the time-ordered frames (global token left out) of the ``stage``'s clips."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from fusion.pairs import MediaBank
    from pipeline.runs import find_stage
    from pipeline.store import ArtifactStore

    store = ArtifactStore(store_uri)
    path = store.open(find_stage(store, stage, run=run_id).key).path
    items = pq.read_table(path / "items.parquet", columns=["id", "meta"]).to_pylist()
    meta = {r["id"]: json.loads(r["meta"]) for r in items}
    bank = MediaBank.load(path, [r["id"] for r in items])
    global_token = bool(store.manifest(find_stage(store, stage, run=run_id).key)["params"]
                        .get("global_token", True))
    out = {}
    for first, second in PAIRS.items():
        xs, ys, test = [], [], []
        for i, clip in enumerate(bank.ids):
            if meta[clip]["motion"] in (first, second) and meta[clip]["split"] in ("train", "test"):
                frames = bank.features[bank.offsets[i] + global_token:bank.offsets[i + 1]]
                xs.append(frames.astype(np.float32).reshape(-1))
                ys.append(float(meta[clip]["motion"] == first))
                test.append(meta[clip]["split"] == "test")
        x, y, test = torch.from_numpy(np.stack(xs)), torch.tensor(ys), torch.tensor(test)
        mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
        x = (x - mu) / sd
        w = torch.zeros(x.shape[1] + 1, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            opt.zero_grad()
            logits = x[~test] @ w[:-1] + w[-1]
            value = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[~test]) \
                + l2 * w[:-1].square().sum()
            value.backward()
            return value

        opt.step(loss)
        with torch.no_grad():
            pred = (x[test] @ w[:-1] + w[-1]) > 0
        out[first] = 100 * float((pred == y[test].bool()).float().mean())
    return out


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]  # a seed without such queries has none to count
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--runs", required=True, help="bench/seeds.py's --json output")
    ap.add_argument("--probe", action="append", default=[], metavar="STAGE",
                    help="a vision.video_features stage whose frames to probe for each motion's direction")
    args = ap.parse_args()
    sweep = json.loads(Path(args.runs).read_text())
    cols = ("emoji", "motion_given_emoji", "reversed_given_emoji", "order")
    print("| stage | direction | right emoji at 1 | right motion, of those | reversed motion, of those "
          "| right clip above its reversed twin (queries with either in the top) |")
    print("|---|---|---|---|---|---|")
    per_stage = {stage: [b for run in sweep["runs"].values()
                         if (b := stage_breakdown(args.store, run, stage)) is not None]
                 for stage in sweep["stages"]}
    for stage, per_seed in per_stage.items():
        for d in DIRS:
            cells = [mean_std([b[f"{d}_{c}"] for b in per_seed]) for c in cols]
            counted = "/".join(str(b[f"{d}_order_n"]) for b in per_seed)
            print(f"| `{stage}` | {d.replace('_', ' ')} | {' | '.join(cells)} ({counted}) |")
    print("\nright clip above its reversed twin, per motion pair (queries counted per seed):\n")
    print("| stage | direction | " + " | ".join(f"{p} / {q}" for p, q in PAIRS.items()) + " |")
    print("|---|---|" + "---|" * len(PAIRS))
    for stage, per_seed in per_stage.items():
        for d in DIRS:
            cells = [f"{mean_std([b[f'{d}_order_{p}'] for b in per_seed])} "
                     f"({'/'.join(str(b[f'{d}_order_{p}_n']) for b in per_seed)})" for p in PAIRS]
            print(f"| `{stage}` | {d.replace('_', ' ')} | {' | '.join(cells)} |")
    for stage in args.probe:   # the features do not depend on the seed: the first run's
        acc = direction_probe(args.store, next(iter(sweep["runs"].values())), stage)
        print(f"\ndirection probe on `{stage}` (held-out accuracy, %): "
              + ", ".join(f"{p} / {q} {acc[p]:.1f}" for p, q in PAIRS.items()))


if __name__ == "__main__":
    main()
