"""Cross-modal retrieval metrics and the re-ranking protocol, for any scores.

The protocol: both directions, text -> media and media -> text;
a query with several correct items (an image with five captions) counts a hit at K if *any* correct
item is in its top K (CLIP_benchmark's definition; torchmetrics' ``RetrievalHitRate``); R@1/5/10,
RSUM (the six recalls summed), median and mean rank of the first correct item, and mAP@10 over all
correct items: AP@10 = (sum of precision@i over the correct items at positions i <= 10) /
min(#correct, 10). (torchmetrics' ``RetrievalMAP(top_k=10)`` divides by the number of correct items
*retrieved* in the top 10 instead; the two agree for a query with one correct item.)

Ties: a model that gives many candidates the same score must not look good for it, so ranks are
*realistic*: the expected rank of the first correct item when ties are broken uniformly at random,
``1 + (#wrong items scored higher) + (#wrong items tied) / (#correct items tied + 1)`` (the same
convention as the KG evaluator). mAP@10 orders tied items pessimistically (wrong ones first): the
j-th correct item (best first) sits at position ``j + #(wrong items scored >= it)``.

Memory: each direction is evaluated in blocks of query rows (:func:`evaluate_scores`), so nothing
of size queries x candidates is ever held beyond one block, and relevance is kept as index lists
(:class:`Relevance`), not a dense matrix. A dual encoder's scores are never materialised at all
(:meth:`Scores.dual`: each block is ``query_vectors[block] @ candidate_vectors.T``), so evaluating
25,000 captions x 5,000 images needs the vectors plus one block.

Re-ranking: cross-encoders score one pair at a time, so all-pairs scoring is quadratic. The practical
protocol ranks every candidate with a dual encoder and re-scores only the top ``k`` with the
cross-encoder (:func:`top_candidates`, then :func:`rerank`); ``k`` and the first stage must be
reported with every number, and with ``k`` = all candidates it equals all-pairs scoring exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

KS = (1, 5, 10)
AP_AT = 10
# Elements of one block of scores (float32): 16 MiB, plus a few same-sized bool temporaries.
BLOCK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------- relevance
@dataclass(frozen=True)
class Relevance:
    """Which candidates are correct for each query, as index lists (CSR): query ``i``'s correct
    candidates are ``index[offsets[i]:offsets[i + 1]]``. Memory grows with the correct pairs, not
    with queries x candidates. ``offsets`` (Q + 1,) int64, ``index`` (nnz,) int64."""

    offsets: np.ndarray
    index: np.ndarray
    n_candidates: int

    @property
    def n_queries(self) -> int:
        return len(self.offsets) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_queries, self.n_candidates

    @classmethod
    def from_index_pairs(cls, queries: np.ndarray, candidates: np.ndarray, n_queries: int,
                         n_candidates: int) -> Relevance:
        """From parallel arrays of (query index, candidate index); duplicates count once."""
        q = np.asarray(queries, dtype=np.int64)
        c = np.asarray(candidates, dtype=np.int64)
        if len(q):
            flat = np.unique(q * n_candidates + c)
            q, c = flat // n_candidates, flat % n_candidates
        offsets = np.zeros(n_queries + 1, dtype=np.int64)
        np.cumsum(np.bincount(q, minlength=n_queries), out=offsets[1:])
        return cls(offsets, c, n_candidates)

    @classmethod
    def from_ids(cls, query_ids: Sequence[str], candidate_ids: Sequence[str],
                 pairs: Sequence[tuple[str, str]]) -> Relevance:
        """``pairs`` of (query id, candidate id) that are correct; pairs naming an id outside the
        two lists are ignored. Duplicate ids on either side would make "which item is correct"
        ambiguous, so they are an error."""
        qi, ci = _index(query_ids, "query"), _index(candidate_ids, "candidate")
        kept = [(qi[q], ci[c]) for q, c in pairs if q in qi and c in ci]
        q, c = (np.array(x, dtype=np.int64) for x in zip(*kept)) if kept else (np.zeros(0, np.int64),) * 2
        return cls.from_index_pairs(q, c, len(query_ids), len(candidate_ids))

    @classmethod
    def from_dense(cls, relevant: torch.Tensor) -> Relevance:
        q, c = torch.as_tensor(relevant).bool().nonzero(as_tuple=True)
        return cls.from_index_pairs(q.numpy(), c.numpy(), *relevant.shape)

    @property
    def T(self) -> Relevance:  # noqa: N802 - as torch's .T
        """The other direction: candidates as queries."""
        counts = np.diff(self.offsets)
        q = np.repeat(np.arange(self.n_queries, dtype=np.int64), counts)
        return Relevance.from_index_pairs(self.index, q, self.n_candidates, self.n_queries)

    def counts(self) -> np.ndarray:
        """(Q,) correct candidates per query."""
        return np.diff(self.offsets)

    def padded(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``rows``' correct candidates padded to the longest list: indices (B, R) int64 (0
        where padded) and their mask (B, R) bool."""
        start, stop = rows.start or 0, min(rows.stop, self.n_queries)
        counts = np.diff(self.offsets[start:stop + 1])
        width = max(int(counts.max(initial=0)), 1)
        idx = np.zeros((len(counts), width), dtype=np.int64)
        mask = np.arange(width)[None, :] < counts[:, None]
        idx[mask] = self.index[self.offsets[start]:self.offsets[stop]]
        return torch.from_numpy(idx), torch.from_numpy(mask)

    def dense(self, rows: slice | None = None) -> torch.Tensor:
        """(B, C) bool of ``rows`` (default all): for small sets and tests only."""
        rows = rows or slice(0, self.n_queries)
        idx, mask = self.padded(rows)
        out = torch.zeros(idx.shape[0], self.n_candidates, dtype=torch.bool)
        out[torch.arange(idx.shape[0])[:, None].expand_as(idx)[mask], idx[mask]] = True
        return out


def _index(ids: Sequence[str], name: str) -> dict[str, int]:
    out = {x: i for i, x in enumerate(ids)}
    if len(out) != len(ids):
        seen: set[str] = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        raise ValueError(f"duplicate {name} id {dup!r}: ids must be unique")
    return out


def relevance_matrix(query_ids: Sequence[str], candidate_ids: Sequence[str],
                     pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """(Q, C) bool: ``pairs`` of (query id, candidate id) that are correct (dense
    :meth:`Relevance.from_ids`). Duplicate ids on either side are an error."""
    return Relevance.from_ids(query_ids, candidate_ids, pairs).dense()


# ----------------------------------------------------------------------------------- scores
def _no_nan(*tensors: torch.Tensor) -> None:
    """Checked where scores come in (given, or computed block by block): a NaN compares False with
    everything, so its query's correct item would rank first and the query would look solved."""
    if any(bool(t.isnan().any()) for t in tensors):
        raise ValueError("scores hold NaN: ranks from them would put the correct items first")


@dataclass
class Scores:
    """Both directions' scores, served a block of query rows at a time: ``text_to_media`` rows are
    texts (T, M), ``media_to_text`` rows are media (M, T). Built from dense matrices
    (:meth:`dense`) or from a dual encoder's vectors (:meth:`dual`: never materialised)."""

    shape: tuple[int, int]                                   # (T, M)
    # direction -> rows(index, out): the scores of those query rows; ``out`` a float32 buffer of
    # their shape that a computed block may be written into (the dual encoder's), or None
    _rows: dict[str, Callable[[torch.Tensor | slice, torch.Tensor | None], torch.Tensor]]

    @classmethod
    def dense(cls, text_to_media: torch.Tensor, media_to_text: torch.Tensor | None = None) -> Scores:
        """(T, M) scores, and (M, T) for the other direction (default: the transpose; re-ranking
        gives each direction its own)."""
        _no_nan(*(x for x in (text_to_media, media_to_text) if x is not None))   # the transpose: once
        m2t = text_to_media.T if media_to_text is None else media_to_text
        if tuple(m2t.shape) != tuple(text_to_media.shape[::-1]):
            raise ValueError(f"media_to_text {tuple(m2t.shape)} is not the transpose of text_to_media "
                             f"{tuple(text_to_media.shape)}")
        return cls(tuple(text_to_media.shape), {"text_to_media": lambda r, out=None: text_to_media[r].float(),
                                                "media_to_text": lambda r, out=None: m2t[r].float()})

    @classmethod
    def dual(cls, text: torch.Tensor, media: torch.Tensor) -> Scores:
        """A dual encoder's ``text`` (T, D) and ``media`` (M, D) vectors: score = dot product."""
        if text.shape[1] != media.shape[1]:
            raise ValueError(f"text vectors are {text.shape[1]}-d, media vectors {media.shape[1]}-d")
        if not all(bool(v.isfinite().all()) for v in (text, media)):
            raise ValueError("vectors hold NaN or inf: scores from them would put correct items first")
        t, m = text.float().contiguous(), media.float().contiguous()

        def product(q: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
            # finite vectors can still give NaN (products overflowing to +inf and -inf in one sum):
            # each computed block is checked, at a cost far below the product's
            block = torch.matmul(q, c.T, out=out) if out is not None else q @ c.T
            _no_nan(block)
            return block

        return cls((len(t), len(m)), {"text_to_media": lambda r, out=None: product(t[r], m, out),
                                      "media_to_text": lambda r, out=None: product(m[r], t, out)})

    def rows(self, direction: str, rows: torch.Tensor | slice, out: torch.Tensor | None = None
             ) -> torch.Tensor:
        """(B, candidates) float32 scores of queries ``rows`` in ``direction`` (computed into
        ``out`` where they are computed and ``out`` is given: one buffer reused block after block
        keeps the memory flat)."""
        return self._rows[direction](rows, out)

    def n_queries(self, direction: str) -> int:
        return self.shape[0] if direction == "text_to_media" else self.shape[1]


# ----------------------------------------------------------------------------------- one block
def block_ranks(scores: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor,
                k: int = AP_AT) -> tuple[torch.Tensor, torch.Tensor]:
    """Realistic rank of the first correct item and pessimistic AP@k of a block of queries.

    ``scores`` (B, N), ``correct`` (B, R) indices of each query's correct candidates, ``mask``
    (B, R) which of them are real. Returns ranks (B,) and AP (B,), NaN for a query without a
    correct candidate. Only comparisons against each query's best few correct scores are made
    (one pass over the block for the rank, one per correct item that can be in the top ``k``),
    never a sort of the candidates."""
    s = scores.float()
    neg_inf = torch.finfo(s.dtype).min
    cs = torch.where(mask, s.gather(1, correct), torch.full(correct.shape, neg_inf))  # (B, R)
    cs, order = cs.sort(1, descending=True)                      # the best correct item first
    cmask = mask.gather(1, order)
    n_correct = cmask.sum(1)                                     # (B,)
    best = cs[:, :1]                                             # (B, 1)
    higher = (s > best).sum(1)               # no correct item scores above the best one
    at_least = (s >= best).sum(1)
    tied_right = (cmask & (cs == best)).sum(1)
    tied_wrong = at_least - higher - tied_right
    rank = 1 + higher.float() + tied_wrong.float() / (tied_right.float() + 1)
    rank = torch.where(n_correct > 0, rank, torch.full_like(rank, float("nan")))

    # Pessimistic order: the j-th correct item (0-based, best first; tied correct items in any
    # order, all hits alike) sits at 1 + j + #(wrong items scored >= it), with j + 1 hits so far.
    ap = torch.zeros(len(s))
    for j in range(min(k, cs.shape[1])):
        x = cs[:, j:j + 1]
        ge_all = at_least if j == 0 else (s >= x).sum(1)
        ge_right = (cmask & (cs >= x)).sum(1)
        pos = 1 + j + ge_all - ge_right                          # (B,)
        hit = cmask[:, j] & (pos <= k)
        if not bool(hit.any()):              # positions only grow with j: nothing more to add
            break
        ap += torch.where(hit, (j + 1) / pos.float(), torch.zeros(()))
    ap = ap / n_correct.clamp(min=1, max=k).float()
    return rank, torch.where(n_correct > 0, ap, torch.full_like(ap, float("nan")))


def _check(scores: torch.Tensor, relevant: torch.Tensor) -> None:
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevant.shape)} differ")


def first_hit_ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Realistic rank (1-based, float) of each query's best correct candidate; NaN for a query
    with no correct candidate. ``scores`` and ``relevant`` are (Q, C)."""
    _check(scores, relevant)
    rel = Relevance.from_dense(relevant)
    return block_ranks(scores, *rel.padded(slice(0, rel.n_queries)))[0]


def average_precision_at(scores: torch.Tensor, relevant: torch.Tensor, k: int = AP_AT) -> torch.Tensor:
    """AP@k per query: mean of precision@i over the correct items in the top k, divided by
    min(#correct, k); ties ordered pessimistically. NaN for a query with no correct candidate."""
    _check(scores, relevant)
    rel = Relevance.from_dense(relevant)
    return block_ranks(scores, *rel.padded(slice(0, rel.n_queries)), k=k)[1]


# ----------------------------------------------------------------------------------- directions
@dataclass
class DirectionResult:
    """One direction evaluated: ``metrics`` (see :func:`summarise`), per-query ``ranks`` and ``ap``
    (NaN without a correct candidate), and each query's ``top`` candidates (indices, scores), (Q,
    top) each, best first."""

    metrics: dict[str, float]
    ranks: np.ndarray
    ap: np.ndarray
    top_indices: np.ndarray
    top_scores: np.ndarray


def summarise(ranks: np.ndarray, ap: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K, median/mean rank, mAP@10 (in %) over the queries that have a correct candidate; the
    others are skipped and counted (``skipped_no_positive``), never silently averaged in."""
    ranks_t, ap_t = torch.as_tensor(ranks), torch.as_tensor(ap)
    ok = ~torch.isnan(ranks_t)
    r = ranks_t[ok]
    out: dict[str, float] = {"queries": int(ok.sum()), "skipped_no_positive": int((~ok).sum())}
    if r.numel() == 0:
        raise ValueError("no query has a correct candidate in the candidate set")
    for k in ks:
        out[f"R@{k}"] = float((r <= k).float().mean() * 100)
    out["median_rank"] = float(r.median())
    out["mean_rank"] = float(r.mean())
    out["mAP@10"] = float(ap_t[ok].mean() * 100)
    return out


def evaluate_direction(rows: Callable[..., torch.Tensor], relevance: Relevance,
                       ks: Sequence[int] = KS, top: int = 0,
                       block_elements: int = BLOCK_ELEMENTS) -> DirectionResult:
    """One direction, a block of query rows at a time: ``rows(slice, out)`` gives that block's
    (B, C) scores (written into the (B, C) float32 buffer ``out`` if it computes them),
    ``relevance`` (Q, C) which candidates are correct; ``top`` > 0 also keeps each query's best
    ``top`` candidates."""
    Q, C = relevance.shape
    step = max(1, block_elements // max(C, 1))
    ranks, ap = np.empty(Q, np.float32), np.empty(Q, np.float32)
    n_top = min(top, C)
    top_i, top_s = np.empty((Q, n_top), np.int64), np.empty((Q, n_top), np.float32)
    buffer = torch.empty(min(step, Q), C)
    for start in range(0, Q, step):
        b = slice(start, min(start + step, Q))
        s = rows(b, buffer[:b.stop - b.start])                        # (B, C)
        if tuple(s.shape) != (b.stop - b.start, C):
            raise ValueError(f"a block of scores is {tuple(s.shape)}, expected {(b.stop - b.start, C)}")
        r, a = block_ranks(s, *relevance.padded(b))
        ranks[b], ap[b] = r.numpy(), a.numpy()
        if n_top:
            t = s.topk(n_top, dim=1)
            top_i[b], top_s[b] = t.indices.numpy(), t.values.numpy()
    return DirectionResult(summarise(ranks, ap, ks), ranks, ap, top_i, top_s)


def direction_metrics(scores: torch.Tensor, relevant: torch.Tensor,
                      ks: Sequence[int] = KS) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one direction from dense (Q, C) ``scores`` and ``relevant``, and the per-query
    ranks. Queries without any correct candidate are skipped and counted
    (``skipped_no_positive``), never silently averaged in."""
    _check(scores, relevant)
    res = evaluate_direction(lambda r, out=None: scores[r], Relevance.from_dense(relevant), ks)
    return res.metrics, res.ranks


def evaluate_scores(scores: Scores, relevance: Relevance, ks: Sequence[int] = KS, top: int = 0,
                    block_elements: int = BLOCK_ELEMENTS) -> dict:
    """Both directions of one evaluation: ``relevance`` is text -> media (T, M). Returns
    ``{"text_to_media": metrics, "media_to_text": metrics, "rsum": R@1/5/10 of both summed,
    "ranks": {direction: (Q,) ranks}, "results": {direction: DirectionResult}}``."""
    if scores.shape != relevance.shape:
        raise ValueError(f"scores {scores.shape} and relevance {relevance.shape} differ")
    res = {d: evaluate_direction(lambda r, out=None, d=d: scores.rows(d, r, out),
                                 relevance if d == "text_to_media" else relevance.T, ks, top, block_elements)
           for d in ("text_to_media", "media_to_text")}
    rsum = sum(d.metrics[f"R@{k}"] for d in res.values() for k in KS if f"R@{k}" in d.metrics)
    return {**{d: r.metrics for d, r in res.items()}, "rsum": rsum,
            "ranks": {d: r.ranks for d, r in res.items()}, "results": res}


def retrieval_metrics(text_to_media: torch.Tensor, relevant: torch.Tensor,
                      media_to_text: torch.Tensor | None = None, ks: Sequence[int] = KS) -> dict:
    """Both directions of one evaluation: ``text_to_media`` (T, M) scores (text rows, media columns)
    with its (T, M) relevance, and ``media_to_text`` (M, T), by default the transpose (re-ranking
    gives each direction its own scores). RSUM sums R@1/5/10 of both directions."""
    _check(text_to_media, relevant)
    out = evaluate_scores(Scores.dense(text_to_media, media_to_text), Relevance.from_dense(relevant), ks)
    out.pop("results")
    return out


def dual_retrieval_metrics(text: torch.Tensor, media: torch.Tensor, relevance: Relevance,
                           ks: Sequence[int] = KS, top: int = 0,
                           block_elements: int = BLOCK_ELEMENTS) -> dict:
    """:func:`evaluate_scores` of a dual encoder's ``text`` (T, D) and ``media`` (M, D) vectors:
    memory for the vectors plus one block, whatever T x M."""
    return evaluate_scores(Scores.dual(text, media), relevance, ks, top, block_elements)


# ----------------------------------------------------------------------------------- re-ranking
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


def fuse_zscore(cross: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Score fusion of two stages over each query's k candidates, ``cross`` and ``first`` (Q, k):
    ``z(cross) + z(first)``, each standardised per row (``z(x) = (x - mean) / std``, a row of equal
    scores contributing zeros), so neither stage's scale decides alone."""
    def z(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        std = x.std(1, keepdim=True, unbiased=False)
        return torch.where(std > 0, (x - x.mean(1, keepdim=True)) / std.clamp_min(1e-12), torch.zeros_like(x))

    return z(cross) + z(first)

