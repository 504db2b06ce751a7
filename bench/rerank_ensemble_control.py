"""The control for a fused re-ranker (``fusion.retrieval`` ``fuse: zscore``): is its gain the
cross-encoder's, or what fusing the first stage with *any* second model gives? This re-ranks a dual
encoder's top k by ``z(other dual) + z(dual)`` over each query's k candidates, the same fusion and
candidates as ``fuse: zscore``, with a second dual encoder (another seed) in the re-ranker's place,
on the first stage's held-out items (the second model must not have trained on one: the same
split or a nested one), both directions; prints R@1/5/10 beside the first stage's.

    python bench/rerank_ensemble_control.py --store /tmp/emoji-rerank --first dual_s1 --second dual_s2

``--first`` / ``--second``: stage names (the store's latest run), key prefixes or artifact folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def control(store_path: str, first_ref: str, second_ref: str, media_ref: str, k: int = 16) -> dict[str, dict]:
    """``{"first stage", "second model alone", "its top k by z(second) + z(first)"}`` -> the
    metrics of :func:`fusion.retrieval.metrics.evaluate_scores` (plus ``queries``) on the first
    stage's held-out items. ``*_ref``: stage names (the store's latest run), key prefixes or
    artifact folders."""
    from fusion.retrieval.metrics import (Relevance, Scores, evaluate_scores, fuse_zscore, rerank,
                                          top_candidates)
    from fusion.retrieval.scorer import ScoreSettings, setup
    from pipeline.runs import resolve_artifact
    from pipeline.store import ArtifactStore

    store = ArtifactStore(store_path)

    def folder(ref: str) -> Path:
        return Path(ref) if Path(ref).is_dir() else store.open(resolve_artifact(store, ref)[0]).path

    media = folder(media_ref)
    settings = ScoreSettings("test", None, None, 128, 256)
    corpus, first = setup(folder(first_ref), media, settings, "cpu")
    other_corpus, second = setup(folder(second_ref), media, settings, "cpu")
    if not set(corpus.bank.ids) <= set(other_corpus.bank.ids):
        raise SystemExit("the second model trained on items the first holds out: train it on the same "
                         "split, or a nested one (same split_seed, larger held_out_share)")
    caps, bank = corpus.captions, corpus.bank
    relevance = Relevance.from_ids(caps.ids, bank.ids,
                                   [(c, bank.ids[m]) for c, m in zip(caps.ids, caps.media)])
    s1, s2 = first.first_stage(caps, bank), second.first_stage(caps, bank)           # (T, M) each
    rows = {}
    for name, t2m, m2t in (("first stage", s1, s1.T), ("second model alone", s2, s2.T)):
        rows[name] = evaluate_scores(Scores.dense(t2m, m2t), relevance)
    fused = []
    for a, b in ((s1, s2), (s1.T, s2.T)):
        cand = top_candidates(a, k)
        fused.append(rerank(a, cand, fuse_zscore(b.gather(1, cand), a.gather(1, cand))))
    rows[f"its top {k} by z(second) + z(first)"] = evaluate_scores(Scores.dense(*fused), relevance)
    return {name: {**m, "queries": (len(caps.ids), len(bank.ids))} for name, m in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--first", required=True, help="the first stage (a dual encoder)")
    ap.add_argument("--second", required=True, help="the model fused with it (another dual encoder)")
    ap.add_argument("--media", default="emoji_images", help="the feature artifact")
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    rows = control(args.store, args.first, args.second, args.media, args.k)
    captions, media = next(iter(rows.values()))["queries"]
    print(f"{captions} captions x {media} media (held out); R@1/5/10 in %, "
          f"text -> media | media -> text")
    for name, m in rows.items():
        t, v = m["text_to_media"], m["media_to_text"]
        print(f"{name:45s} " + " ".join(f"{t[f'R@{k}']:5.1f}" for k in (1, 5, 10)) + " | "
              + " ".join(f"{v[f'R@{k}']:5.1f}" for k in (1, 5, 10)) + f"   RSUM {m['rsum']:.1f}")


if __name__ == "__main__":
    main()
