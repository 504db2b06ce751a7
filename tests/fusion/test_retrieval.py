"""Retrieval metrics against hand-computed rankings; re-ranking with k = all equals all pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.retrieval.metrics import (average_precision_at, first_hit_ranks, relevance_matrix, rerank,
                                     retrieval_metrics, top_candidates)

# 4 captions (rows) x 3 images (columns); image a has captions t0 and t1, b has t2, c has t3.
TEXTS, MEDIA = ["t0", "t1", "t2", "t3"], ["a", "b", "c"]
PAIRS = [("t0", "a"), ("t1", "a"), ("t2", "b"), ("t3", "c")]
SCORES = torch.tensor([[0.9, 0.1, 0.3],    # t0: a first            -> rank 1
                       [0.2, 0.8, 0.5],    # t1: b, c, then a       -> rank 3
                       [0.4, 0.4, 0.1],    # t2: a and b tied       -> 1 + 1/2 = 1.5
                       [0.7, 0.6, 0.5]])   # t3: a, b, then c       -> rank 3


def test_text_to_media_by_hand():
    rel = relevance_matrix(TEXTS, MEDIA, PAIRS)
    ranks = first_hit_ranks(SCORES, rel)
    assert ranks.tolist() == [1.0, 3.0, 1.5, 3.0]
    m = retrieval_metrics(SCORES, rel)
    t2m = m["text_to_media"]
    assert t2m["R@1"] == 25.0 and t2m["R@5"] == 100.0 and t2m["median_rank"] == 1.5
    assert t2m["mean_rank"] == pytest.approx((1 + 3 + 1.5 + 3) / 4)


def test_media_to_text_counts_any_of_several_captions():
    rel = relevance_matrix(TEXTS, MEDIA, PAIRS)
    m2t = retrieval_metrics(SCORES, rel)["media_to_text"]
    # a: scores over t0..t3 = .9 .2 .4 .7 -> t0 (correct) first: rank 1
    # b: .1 .8 .4 .6 -> t1 (wrong) .8, t3 (wrong) .6, t2 .4: rank 3
    # c: .3 .5 .1 .5 -> t1 .5 and t3 .5 tied (t3 correct, t1 wrong): 1 + 1/2 = 1.5
    ranks = retrieval_metrics(SCORES, rel)["ranks"]["media_to_text"]
    assert ranks.tolist() == [1.0, 3.0, 1.5]
    assert m2t["R@1"] == pytest.approx(100 / 3)
    # AP@10 of a: order t0 .9, t3 .7, t2 .4, t1 .2; its captions t0 and t1 are hits at positions
    # 1 and 4 -> (1/1 + 2/4) / 2 = 0.75
    ap = average_precision_at(SCORES.T, rel.T, 10)
    assert ap[0].item() == pytest.approx(0.75)


def test_all_ties_get_the_expected_random_rank_not_the_best():
    rel = torch.tensor([[False, True, False, False]])
    assert first_hit_ranks(torch.zeros(1, 4), rel).item() == 2.5  # 1 + 3 wrong / 2
    # pessimistic mAP on ties: the correct item comes after the three wrong ones
    assert average_precision_at(torch.zeros(1, 4), rel, 10).item() == pytest.approx(1 / 4)


def test_a_query_without_a_correct_candidate_is_skipped_and_counted():
    rel = relevance_matrix(TEXTS + ["t4"], MEDIA, PAIRS)  # t4 describes no image in the set
    scores = torch.cat([SCORES, torch.rand(1, 3)])
    t2m = retrieval_metrics(scores, rel)["text_to_media"]
    assert t2m["queries"] == 4 and t2m["skipped_no_positive"] == 1
    assert t2m["R@1"] == 25.0
    with pytest.raises(ValueError, match="no query has a correct candidate"):
        retrieval_metrics(torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.bool))


def test_duplicate_ids_and_mismatched_shapes_are_errors():
    with pytest.raises(ValueError, match="duplicate candidate id 'a'"):
        relevance_matrix(TEXTS, ["a", "a"], PAIRS)
    with pytest.raises(ValueError, match="differ"):
        first_hit_ranks(torch.rand(2, 3), torch.zeros(3, 2, dtype=torch.bool))


def test_rerank_with_k_all_equals_all_pairs_and_small_k_only_reorders_the_top():
    g = torch.Generator().manual_seed(0)
    first = torch.rand(6, 9, generator=g)
    cross_all = torch.rand(6, 9, generator=g)
    rel = torch.zeros(6, 9, dtype=torch.bool)
    rel[torch.arange(6), torch.randint(9, (6,), generator=g)] = True
    every = top_candidates(first, 20)
    assert every.shape == (6, 9)                               # k is capped at the candidates
    full = rerank(first, every, cross_all.gather(1, every))
    np.testing.assert_array_equal(torch.argsort(full, 1, descending=True),
                                  torch.argsort(cross_all, 1, descending=True))
    assert first_hit_ranks(full, rel).tolist() == first_hit_ranks(cross_all, rel).tolist()
    top = top_candidates(first, 3)
    assert top.shape == (6, 3)
    top3 = rerank(first, top, cross_all.gather(1, top))
    order = torch.argsort(top3, 1, descending=True)
    first_order = torch.argsort(first, 1, descending=True)
    for q in range(6):
        assert set(order[q, :3].tolist()) == set(first_order[q, :3].tolist())  # same top 3
        assert order[q, 3:].tolist() == first_order[q, 3:].tolist()             # rest untouched
        # the re-scored three are in the cross-encoder's order
        assert cross_all[q, order[q, :3]].tolist() == sorted(cross_all[q, top[q]].tolist(), reverse=True)


@pytest.mark.parametrize("fuse", ["none", "zscore"])
def test_a_non_finite_cross_encoder_score_fails_the_evaluation(fuse):
    """A NaN compares False with every score, so its query's correct item would rank first (and
    ``fuse: zscore`` would zero the whole row): the protocol stops and names a pair instead."""
    from fusion.retrieval.params import RetrievalParams
    from fusion.retrieval.protocol import _cross_scores
    from pipeline import StageFailed

    first = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    params = RetrievalParams(mode="rerank", k=2, fuse=fuse)

    def score_pairs(ti, mi):
        out = (ti * 10 + mi).astype(np.float32)
        out[len(out) // 2] = np.nan
        return out

    with pytest.raises(StageFailed, match=r"1 of \d+ cross-encoder pair scores are not finite"):
        _cross_scores(first, params, score_pairs)
    t2m, m2t, pairs, _ = _cross_scores(first, params, lambda ti, mi: (ti * 10 + mi).astype(np.float32))
    assert pairs > 0 and torch.isfinite(t2m).all() and torch.isfinite(m2t).all()


def test_non_finite_vectors_or_scores_are_refused_not_ranked():
    """A dual encoder's NaN vector made every query of it rank its correct item first (R@1 100 from
    an all-NaN model): the vectors are refused naming the first bad id, and scores refuse NaN where
    they come in (``Scores.dense``; ``Scores.dual``'s vectors, and each block it computes, since
    finite vectors can overflow to a NaN score), whichever path they came by."""
    from fusion.retrieval.metrics import Relevance, Scores, evaluate_scores
    from fusion.retrieval.scorer import check_finite
    from pipeline import StageFailed

    vec = torch.randn(3, 4)
    check_finite(vec, ["a", "b", "c"], "media", "Dual")
    vec[1, 2], vec[2, 0] = float("nan"), float("inf")
    with pytest.raises(StageFailed, match=r"Dual: 2 of 3 media vectors are not finite \(the first: 'b'\)"):
        check_finite(vec, ["a", "b", "c"], "media", "Dual")
    relevance = Relevance.from_ids(TEXTS, MEDIA, PAIRS)
    assert evaluate_scores(Scores.dense(SCORES), relevance)   # finite: ranked
    bad = SCORES.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="scores hold NaN"):
        evaluate_scores(Scores.dense(bad), relevance)
    for bad_value in (float("nan"), float("inf")):   # inf x 0 is NaN
        with pytest.raises(ValueError, match="vectors hold NaN or inf"):
            evaluate_scores(Scores.dual(torch.full((4, 2), bad_value), torch.ones(3, 2)), relevance)
    # finite vectors whose products overflow to +inf and -inf in one sum: a NaN score, refused
    text, media = torch.randn(4, 2), torch.randn(3, 2)
    text[0], media[0] = torch.tensor([1e20, 1e20]), torch.tensor([1e20, -1e20])
    with pytest.raises(ValueError, match="scores hold NaN"):
        evaluate_scores(Scores.dual(text, media), relevance)


def test_each_direction_may_have_its_own_scores():
    g = torch.Generator().manual_seed(1)
    t2m, m2t = torch.rand(4, 3, generator=g), torch.rand(3, 4, generator=g)
    rel = relevance_matrix(TEXTS, MEDIA, PAIRS)
    both = retrieval_metrics(t2m, rel, m2t)
    assert both["text_to_media"] == retrieval_metrics(t2m, rel)["text_to_media"]
    assert both["media_to_text"] == retrieval_metrics(m2t.T, rel)["media_to_text"]
    assert both["rsum"] == sum(both[d][f"R@{k}"] for d in ("text_to_media", "media_to_text")
                               for k in (1, 5, 10))


# ------------------------------------------------------------------- blocks, sparse relevance, parity
def _old_first_hit_ranks(scores, relevant):
    """The dense implementation the blocked one replaced (kept here as the reference)."""
    scores = scores.float()
    neg_inf = torch.finfo(scores.dtype).min
    best = torch.where(relevant, scores, torch.full_like(scores, neg_inf)).max(1).values
    wrong = ~relevant
    higher = (wrong & (scores > best[:, None])).sum(1).float()
    tied_wrong = (wrong & (scores == best[:, None])).sum(1).float()
    tied_right = (relevant & (scores == best[:, None])).sum(1).float()
    rank = 1 + higher + tied_wrong / (tied_right + 1)
    return torch.where(relevant.any(1), rank, torch.full_like(rank, float("nan")))


def _old_average_precision_at(scores, relevant, k=10):
    order = torch.argsort(scores.double() - relevant.double() * 1e-12, dim=1, descending=True,
                          stable=True)[:, :k]
    hits = torch.gather(relevant, 1, order).float()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    n_rel = relevant.sum(1).clamp(max=k).float()
    ap = (precision * hits).sum(1) / n_rel.clamp(min=1)
    return torch.where(n_rel > 0, ap, torch.full_like(ap, float("nan")))


def _random_case(T=300, M=60, per=5, seed=0, ties=False):
    """T captions of M images (``per`` each where T = M * per, a few captions of nothing), random
    scores; ``ties``: scores rounded to one decimal, so ties are everywhere."""
    g = torch.Generator().manual_seed(seed)
    text, media = torch.randn(T, 8, generator=g), torch.randn(M, 8, generator=g)
    scores = text @ media.T
    if ties:
        scores = (scores * 2).round() / 2
    rel = torch.zeros(T, M, dtype=torch.bool)
    owner = torch.arange(T) // per
    keep = owner < M
    rel[torch.arange(T)[keep], owner[keep]] = True
    rel[0, 1] = True                                   # a caption of two images
    return text, media, scores, rel


@pytest.mark.parametrize("ties", [False, True])
def test_blocked_dense_and_dual_paths_equal_the_old_dense_functions(ties):
    from fusion.retrieval.metrics import Relevance, dual_retrieval_metrics

    text, media, scores, rel = _random_case(T=310, ties=ties)
    for s, r in ((scores, rel), (scores.T, rel.T)):
        torch.testing.assert_close(first_hit_ranks(s, r), _old_first_hit_ranks(s, r), equal_nan=True,
                                   rtol=0, atol=0)
        torch.testing.assert_close(average_precision_at(s, r), _old_average_precision_at(s, r),
                                   equal_nan=True, rtol=1e-6, atol=1e-7)
    dense = retrieval_metrics(scores, rel)
    assert dense["text_to_media"]["skipped_no_positive"] == 10   # captions 300..309 describe nothing
    if not ties:  # a dual encoder's scores, a few rows per block, never a (T, M) matrix
        dual = dual_retrieval_metrics(text, media, Relevance.from_dense(rel), top=10, block_elements=1000)
        for d in ("text_to_media", "media_to_text"):
            assert dual[d] == pytest.approx(dense[d], rel=1e-6), d
            np.testing.assert_array_equal(dual["ranks"][d], dense["ranks"][d])
        top = dual["results"]["text_to_media"].top_indices
        np.testing.assert_array_equal(top, scores.topk(10, dim=1).indices.numpy())


def test_relevance_lists_round_trip_and_transpose():
    from fusion.retrieval.metrics import Relevance

    _, _, _, rel = _random_case(T=40, M=9)
    r = Relevance.from_dense(rel)
    assert torch.equal(r.dense(), rel) and torch.equal(r.T.dense(), rel.T)
    assert r.counts().tolist() == rel.sum(1).tolist()
    assert torch.equal(Relevance.from_ids(TEXTS, MEDIA, PAIRS + PAIRS[:1] + [("t9", "a")]).dense(),
                       relevance_matrix(TEXTS, MEDIA, PAIRS))


def test_recall_and_map_agree_with_torchmetrics_on_tie_free_data():
    """R@K is "any correct item in the top K" (CLIP_benchmark; torchmetrics' RetrievalHitRate), and
    with one correct item per query also torchmetrics' RetrievalRecall. mAP@10 divides by
    min(#correct, 10); torchmetrics' RetrievalMAP(top_k=10) by the correct items retrieved in the
    top 10, so ours = theirs x retrieved / min(#correct, 10), per query (and the same number for
    one correct item per query)."""
    tm = pytest.importorskip("torchmetrics")
    from torchmetrics.functional.retrieval import retrieval_average_precision, retrieval_recall

    _, _, scores, rel = _random_case(T=250, M=50, seed=3)       # every caption has its image
    assert not any(len(torch.unique(row)) < len(row) for row in scores)      # tie-free
    assert not any(len(torch.unique(col)) < len(col) for col in scores.T)
    ours = retrieval_metrics(scores, rel)

    def positive(x):  # the same order, all > 0 (torchmetrics may drop scores <= 0), exact in float64
        return x.double() - x.min() + 1

    for d, s, r in (("text_to_media", scores, rel), ("media_to_text", scores.T, rel.T)):
        Q, C = s.shape
        p = positive(s)
        indexes = torch.arange(Q)[:, None].expand(Q, C).reshape(-1)
        for k in (1, 5, 10):
            hit = tm.retrieval.RetrievalHitRate(top_k=k)(p.reshape(-1), r.reshape(-1), indexes=indexes)
            assert ours[d][f"R@{k}"] == pytest.approx(float(hit) * 100, abs=1e-4), (d, k)
        their_ap = torch.stack([retrieval_average_precision(p[q], r[q], top_k=10) for q in range(Q)])
        retrieved = torch.stack([retrieval_recall(p[q], r[q], top_k=10) for q in range(Q)]) * r.sum(1)
        rescaled = (their_ap * retrieved / r.sum(1).clamp(max=10)).float()
        torch.testing.assert_close(average_precision_at(s, r), rescaled, rtol=1e-5, atol=1e-6)
        assert ours[d]["mAP@10"] == pytest.approx(float(rescaled.mean()) * 100, abs=1e-3)
    # one correct item per query: torchmetrics' RetrievalMAP itself
    single = rel.clone()
    single[0, 1] = False
    Q, C = scores.shape
    indexes = torch.arange(Q)[:, None].expand(Q, C).reshape(-1)
    their = tm.retrieval.RetrievalMAP(top_k=10)(positive(scores).reshape(-1), single.reshape(-1),
                                                indexes=indexes)
    one = retrieval_metrics(scores, single)["text_to_media"]
    assert one["mAP@10"] == pytest.approx(float(their) * 100, abs=1e-4)
    for k in (1, 5, 10):   # and recall is the hit rate
        rec = tm.retrieval.RetrievalRecall(top_k=k)(positive(scores).reshape(-1), single.reshape(-1),
                                                    indexes=indexes)
        assert one[f"R@{k}"] == pytest.approx(float(rec) * 100, abs=1e-4)
