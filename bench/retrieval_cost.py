"""What re-ranking saves: ``fusion.retrieval`` in ``all_pairs`` vs ``rerank`` at k = 16, 32, 64, one run.

The corpus is synthetic so that it runs anywhere at the size the issue asks for (>= 1,000 media x
5,000 captions) and so that a tiny model can learn it: 1,000 media items, one per (colour, object,
place) of 10 x 20 x 5 words; each item's regions are the three words' vectors plus noise (and their
mean as a global token); five captions per item from five templates ("a red cup in the kitchen",
"in the kitchen there is a red cup", ...). A tiny LXMERT (hidden 64, 2/1/1 layers) over a
WordPiece vocabulary of those words is pretrained on all the items (``fusion.pretrain``, Ray Train,
MLM + masked regions + ITM + InfoNCE), and retrieval is evaluated on all 1,000 items and 5,000
captions with each mode, in this process, one after the other (``workers: 1``). The question here
is cost and what re-ranking loses against scoring every pair with the same model, so the corpus is
the training set: R@1 is not a generalisation figure (``fusion.retrieval``'s default split is).

Printed and written to ``--out`` (JSON): per mode, wall time of the whole evaluation (first stage,
cached single-stream states, cross-encoder pairs), pairs scored, R@1 both directions, RSUM, and the
ratio of its wall time to all-pairs. Goal (from the issue): rerank at k = 32 costs <= 1/6 of
all-pairs and loses <= 1 point of R@1.

    python bench/retrieval_cost.py                     # ~10 minutes on a 2-core machine
    python bench/retrieval_cost.py --steps 300 --media 1000 --captions-per-item 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = "red green blue yellow black white orange purple brown grey".split()
OBJECTS = ("cup chair lamp book phone clock bottle shoe hat bag ball kite drum key coin bell "
           "vase fork brush box").split()
PLACES = "kitchen garden office street beach".split()
TEMPLATES = ["a {c} {o} in the {p}", "in the {p} there is a {c} {o}", "the {o} is {c} and in the {p}",
             "{c} {o} , {p}", "a {o} that is {c} near the {p}"]
FILLER = "a in the there is and that near ,".split()


def make_corpus(out: Path, n_media: int, per_item: int, dim: int = 32, noise: float = 0.3,
                seed: int = 0) -> Path:
    """A feature artifact (``pipeline.features`` layout) of the synthetic corpus."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.features import ITEM_SCHEMA, FeatureWriter, region_schema, region_table

    rng = np.random.default_rng(seed)
    vec = {w: rng.normal(size=dim) for w in COLOURS + OBJECTS + PLACES}
    combos = [(c, o, p) for c in COLOURS for o in OBJECTS for p in PLACES][:n_media]
    out.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(out)
    items, rows = [], []
    boxes = np.array([[0, 0, 1, 1], [0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, 1, 1]], np.float32)
    for c, o, p in combos:
        item = f"{c}-{o}-{p}"
        regions = np.stack([vec[c], vec[o], vec[p]]) + noise * rng.normal(size=(3, dim))
        regions = np.concatenate([regions.mean(0, keepdims=True), regions])
        rows.append({"id": item, "features": regions, "boxes": boxes, "error": None})
        items.append({"id": item, "media": item, "meta": "{}",
                      "texts": [t.format(c=c, o=o, p=p) for t in TEMPLATES[:per_item]]})
    for i in range(0, len(rows), 512):
        writer.add(region_table(region_schema(dim), rows[i:i + 512]))
    writer.close()
    pq.write_table(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), out / "items.parquet")
    (out / "manifest.json").write_text(json.dumps({"params": {"global_token": True,
                                                              "dataset": {"type": "synthetic"}}}))
    return out


def make_backbone(out: Path) -> Path:
    """A random 2-layer BERT (hidden 64) over a WordPiece vocabulary of the corpus' words."""
    from transformers import BertTokenizer

    from fusion.models.backbone import random_backbone

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(COLOURS + OBJECTS + PLACES + FILLER))
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    bb = random_backbone(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                         max_position=64)
    bb.model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def pretrain(tmp: Path, corpus: Path, backbone: Path, steps: int,
             hard_negatives: bool = False, on_dual: bool = False) -> tuple[Path, dict]:
    from fusion.pretrain.stage import PretrainParams, pretrain as run_pretrain
    from pipeline.context import StageContext
    from pipeline.registry import Resources
    from pipeline.store import Artifact

    out = tmp / "model"
    out.mkdir()
    ctx = StageContext(stage="pretrain", key="bench", out=out,
                       inputs={"media": Artifact("corpus", corpus, {})}, resources=Resources(),
                       state_uri=str(tmp / "state"), log=logging.getLogger("bench.pretrain"))
    params = PretrainParams.model_validate({
        "recipe": "lxmert", "backbone": str(backbone), "steps": steps, "batch_size": 32,
        "lr": 2e-3, "warmup_steps": 20, "max_length": 16, "checkpoint_every": steps,
        # BERT's 0.02 init keeps a 64-wide model on the ITM plateau for long; 0.2 leaves it early
        "options": {"r_layers": 1, "x_layers": 1, "held_out_share": 0.0,
                    "config": {"initializer_range": 0.2, "dropout": 0.0, "attention_dropout": 0.0,
                               "itm_hard_negatives": hard_negatives, "itm_on_dual": on_dual}}})
    return out, run_pretrain(ctx, params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--media", type=int, default=1000)
    ap.add_argument("--captions-per-item", type=int, default=5)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--noise", type=float, default=0.3,
                    help="standard deviation of the noise on each region's word vector (unit variance): "
                    "higher makes items harder to tell apart, for the first stage and the cross-encoder")
    ap.add_argument("--ks", default="16,32,64")
    ap.add_argument("--itm-hard-negatives", action="store_true",
                    help="ITM mismatches drawn by contrastive similarity (ALBEF), not uniformly")
    ap.add_argument("--itm-on-dual", action="store_true",
                    help="match logit = ITM head + w * dual-encoder cosine (LXMERT's itm_on_dual)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024, help="pairs per cross-encoder batch")
    ap.add_argument("--out", default="retrieval_cost.json")
    args = ap.parse_args()

    import torch

    from fusion.retrieval.stage import RetrievalParams, evaluate
    from pipeline.ray_utils import init_ray, shutdown_ray

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="stele-retrieval-cost-"))
    corpus = make_corpus(tmp / "corpus", args.media, args.captions_per_item, noise=args.noise)
    backbone = make_backbone(tmp / "backbone")
    init_ray()
    t0 = time.perf_counter()
    model, train = pretrain(tmp, corpus, backbone, args.steps, args.itm_hard_negatives, args.itm_on_dual)
    shutdown_ray()
    print(f"pretrained {args.steps} steps in {time.perf_counter() - t0:.0f} s: itm loss "
          f"{train['loss_itm_first']:.3f} -> {train['loss_itm_last10']:.3f}, contrastive "
          f"{train['loss_contrastive_first']:.3f} -> {train['loss_contrastive_last10']:.3f}")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    modes = [("dual", None), ("all_pairs", None)] + [("rerank", int(k)) for k in args.ks.split(",")]
    rows = []
    for mode, k in modes:
        params = RetrievalParams(mode=mode, k=k or 32, split="all", batch_size=args.batch_size,
                                 examples=0)
        t = time.perf_counter()
        m = evaluate(model, corpus, tmp / f"eval-{mode}-{k}", params)
        wall = time.perf_counter() - t
        rows.append({"mode": mode, "k": k, "wall_s": wall, "pairs_scored": m["pairs_scored"],
                     "t2m_R@1": m["text_to_media_R@1"], "m2t_R@1": m["media_to_text_R@1"],
                     "rsum": m["rsum"], "captions": m["captions"], "media": m["media"]})
        print(f"{mode:>9} k={k or '-':>3}: {wall:7.1f} s, {m['pairs_scored']:>9,} pairs, R@1 "
              f"t->m {m['text_to_media_R@1']:.1f} m->t {m['media_to_text_R@1']:.1f}, RSUM {m['rsum']:.1f}",
              flush=True)
    full = next(r for r in rows if r["mode"] == "all_pairs")
    for r in rows:
        r["cost_vs_all_pairs"] = r["wall_s"] / full["wall_s"]
        r["t2m_R@1_minus_all_pairs"] = r["t2m_R@1"] - full["t2m_R@1"]
        r["m2t_R@1_minus_all_pairs"] = r["m2t_R@1"] - full["m2t_R@1"]
    print(f"\n{full['captions']} captions x {full['media']} media; {args.threads} threads; load "
          f"average {load:.1f} at the start")
    print(f"{'mode':>9} {'k':>4} {'wall s':>8} {'x all':>6} {'pairs':>10} {'t->m R@1':>9} "
          f"{'m->t R@1':>9} {'dR@1 t->m':>10} {'dR@1 m->t':>10}")
    for r in rows:
        print(f"{r['mode']:>9} {r['k'] or '-':>4} {r['wall_s']:8.1f} {r['cost_vs_all_pairs']:6.3f} "
              f"{r['pairs_scored']:>10,} {r['t2m_R@1']:9.1f} {r['m2t_R@1']:9.1f} "
              f"{r['t2m_R@1_minus_all_pairs']:+10.1f} {r['m2t_R@1_minus_all_pairs']:+10.1f}")
    Path(args.out).write_text(json.dumps({"rows": rows, "train": train, "load_avg": load,
                                          "threads": args.threads, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
