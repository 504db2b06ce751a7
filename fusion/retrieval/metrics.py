"""Cross-modal retrieval metrics and the re-ranking protocol, for any scores.

The protocol: both directions, text -> media and media -> text;
a query with several correct items (an image with five captions) counts a hit at K if *any* correct
item is in its top K; R@1/5/10, RSUM (the six recalls summed), median and mean rank of the first
correct item, and mAP@10 over all correct items.

Ties: a model that gives many candidates the same score must not look good for it, so ranks are
*realistic*: the expected rank of the first correct item when ties are broken uniformly at random,
``1 + (#wrong items scored higher) + (#wrong items tied) / (#correct items tied + 1)`` (the same
convention as the KG evaluator). mAP@10 orders tied items pessimistically (wrong ones first).

Re-ranking: cross-encoders score one pair at a time, so all-pairs scoring is quadratic. The practical
protocol ranks every candidate with a dual encoder and re-scores only the top ``k`` with the
cross-encoder (:func:`top_candidates`, then :func:`rerank`); ``k`` and the first stage must be
reported with every number, and with ``k`` = all candidates it equals all-pairs scoring exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

KS = (1, 5, 10)


def relevance_matrix(query_ids: Sequence[str], candidate_ids: Sequence[str],
                     pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """(Q, C) bool: ``pairs`` of (query id, candidate id) that are correct. Duplicate ids on either
    side would make "which item is correct" ambiguous, so they are an error."""
    for name, ids in (("query", query_ids), ("candidate", candidate_ids)):
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if list(ids).count(i) > 1)
            raise ValueError(f"duplicate {name} id {dup!r}: ids must be unique")
    qi = {q: i for i, q in enumerate(query_ids)}
    ci = {c: i for i, c in enumerate(candidate_ids)}
    rel = torch.zeros(len(query_ids), len(candidate_ids), dtype=torch.bool)
    for q, c in pairs:
        if q in qi and c in ci:
            rel[qi[q], ci[c]] = True
    return rel


def first_hit_ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Realistic rank (1-based, float) of each query's best correct candidate; NaN for a query
    with no correct candidate. ``scores`` and ``relevant`` are (Q, C)."""
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevant.shape)} differ")
    scores = scores.float()
    neg_inf = torch.finfo(scores.dtype).min
    best = torch.where(relevant, scores, torch.full_like(scores, neg_inf)).max(1).values  # (Q,)
    wrong = ~relevant
    higher = (wrong & (scores > best[:, None])).sum(1).float()
    tied_wrong = (wrong & (scores == best[:, None])).sum(1).float()
    tied_right = (relevant & (scores == best[:, None])).sum(1).float()
    rank = 1 + higher + tied_wrong / (tied_right + 1)
    return torch.where(relevant.any(1), rank, torch.full_like(rank, float("nan")))


def average_precision_at(scores: torch.Tensor, relevant: torch.Tensor, k: int = 10) -> torch.Tensor:
    """AP@k per query: mean of precision@i over the correct items in the top k, divided by
    min(#correct, k); ties ordered pessimistically. NaN for a query with no correct candidate."""
    # Pessimistic ties: among equal scores, wrong items first (a tiny penalty on correct ones).
    order = torch.argsort(scores.double() - relevant.double() * 1e-12, dim=1, descending=True,
                          stable=True)[:, :k]                            # (Q, k)
    hits = torch.gather(relevant, 1, order).float()                      # (Q, k)
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    n_rel = relevant.sum(1).clamp(max=k).float()
    ap = (precision * hits).sum(1) / n_rel.clamp(min=1)
    return torch.where(n_rel > 0, ap, torch.full_like(ap, float("nan")))


def direction_metrics(scores: torch.Tensor, relevant: torch.Tensor,
                      ks: Sequence[int] = KS) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one direction and the per-query ranks. Queries without any correct candidate
    are skipped and counted (``skipped_no_positive``), never silently averaged in."""
    ranks = first_hit_ranks(scores, relevant)
    ok = ~torch.isnan(ranks)
    r = ranks[ok]
    out: dict[str, float] = {"queries": int(ok.sum()), "skipped_no_positive": int((~ok).sum())}
    if r.numel() == 0:
        raise ValueError("no query has a correct candidate in the candidate set")
    for k in ks:
        out[f"R@{k}"] = float((r <= k).float().mean() * 100)
    out["median_rank"] = float(r.median())
    out["mean_rank"] = float(r.mean())
    ap = average_precision_at(scores, relevant, 10)[ok]
    out["mAP@10"] = float(ap.mean() * 100)
    return out, ranks.numpy()


def retrieval_metrics(text_to_media: torch.Tensor, relevant: torch.Tensor,
                      media_to_text: torch.Tensor | None = None, ks: Sequence[int] = KS) -> dict:
    """Both directions of one evaluation: ``text_to_media`` (T, M) scores (text rows, media columns)
    with its (T, M) relevance, and ``media_to_text`` (M, T), by default the transpose (re-ranking
    gives each direction its own scores). RSUM sums R@1/5/10 of both directions."""
    m2t_scores = text_to_media.T if media_to_text is None else media_to_text
    t2m, t2m_ranks = direction_metrics(text_to_media, relevant, ks)
    m2t, m2t_ranks = direction_metrics(m2t_scores, relevant.T, ks)
    rsum = sum(d[f"R@{k}"] for d in (t2m, m2t) for k in KS if f"R@{k}" in d)
    return {"text_to_media": t2m, "media_to_text": m2t, "rsum": rsum,
            "ranks": {"text_to_media": t2m_ranks, "media_to_text": m2t_ranks}}


def top_candidates(first_stage: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, min(k, C)) indices of each query's top ``k`` candidates by the first-stage scores: the
    pairs a cross-encoder re-scores."""
    return first_stage.topk(min(k, first_stage.shape[1]), dim=1).indices


def rerank(first_stage: torch.Tensor, candidates: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Scores whose ranking is: each query's ``candidates`` (Q, k) re-ordered by their ``cross``
    scores (Q, k), then the other candidates in ``first_stage`` (Q, C) order. With the candidates
    of :func:`top_candidates` and ``k`` >= C the ranking is exactly the cross-encoder's on all
    pairs."""
    cross = cross.float()
    # Everything re-scored ranks above everything that was not: shift the first stage below the
    # smallest cross score of its row.
    fs = first_stage.float()
    below = fs - fs.max(1, keepdim=True).values + cross.min(1, keepdim=True).values - 1.0
    out = below.clone()
    out.scatter_(1, candidates, cross)
    return out
