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


def test_each_direction_may_have_its_own_scores():
    g = torch.Generator().manual_seed(1)
    t2m, m2t = torch.rand(4, 3, generator=g), torch.rand(3, 4, generator=g)
    rel = relevance_matrix(TEXTS, MEDIA, PAIRS)
    both = retrieval_metrics(t2m, rel, m2t)
    assert both["text_to_media"] == retrieval_metrics(t2m, rel)["text_to_media"]
    assert both["media_to_text"] == retrieval_metrics(m2t.T, rel)["media_to_text"]
    assert both["rsum"] == sum(both[d][f"R@{k}"] for d in ("text_to_media", "media_to_text")
                               for k in (1, 5, 10))
