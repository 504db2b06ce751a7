"""Link-prediction evaluation: the standard filtered, two-sided, rank-based protocol, vectorised.

Protocol (what every number here means):

* **Both sides.** Each test triple ``(h, r, t)`` is ranked twice: tail prediction ``(h, r, ?)`` against
  every entity as the tail, and head prediction ``(?, r, t)`` against every entity as the head
  (Bordes et al. 2013). "both" aggregates the ``2 n`` rankings.
* **Filtered setting** (Bordes et al. 2013). For tail prediction, candidates ``e != t`` with
  ``(h, r, e)`` in the known triples (train + valid + test) are removed before ranking, since ranking a
  true triple above the test triple is no error; the test triple itself stays. Heads alike. **Raw**
  keeps every candidate.
* **Realistic rank for ties** (Berrendorf et al. 2020, "Interpretable and Fair Comparison of Link
  Prediction or Entity Alignment Methods"; PyKEEN's default). With ``s`` the scores of the remaining
  candidates (the test triple included) and ``s*`` the test triple's score::

      optimistic  = 1 + #{e : s_e >  s*}
      pessimistic =     #{e : s_e >= s*}          (counts the test triple itself)
      realistic   = (optimistic + pessimistic) / 2

  i.e. the expected rank under a uniformly random order of the tied candidates. Reporting the optimistic
  rank instead rewards constant scores (every candidate tied -> rank 1).
* **Metrics** over the ranks ``rank_i`` (realistic): ``MRR = mean(1 / rank_i)``,
  ``MR = mean(rank_i)``, ``Hits@k = mean(rank_i <= k)``.

Implementation: test triples go in chunks of ``batch_size``; a chunk's ``(b, N)`` score matrix comes
from :mod:`knowledge.scoring` (never ``(b, N, d)``), so memory is ``O(batch_size * num_entities)``.
Raw counts are two comparisons against the true score. The filter is two CSR tables built once (the
known triples by ``(h, r)`` key, values tails, and by ``(r, t)`` key, values heads): a chunk finds
its keys with ``searchsorted``, gathers the scores of the other true candidates in one index
operation and subtracts their contribution. No Python loop over triples; CPU and CUDA alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .scoring import CandidateScorer, candidate_scorer

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[..., Iterator[Any]]
SIDES = ("head", "tail")
HEAD, REL, TAIL = 0, 1, 2


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _Csr:
    """Known triples grouped by a key: ``values[start[k]:start[k+1]]`` are the entities completing
    the key, stored flat as sorted ``keys`` (one per triple) so groups are found by ``searchsorted``."""

    keys: Tensor    # (m,) int64, sorted
    values: Tensor  # (m,) int64

    @classmethod
    def build(cls, keys: Tensor, values: Tensor) -> "_Csr":
        # Lexicographic sort by (key, value) with two stable sorts, then drop duplicate triples:
        # a duplicate would subtract the same filtered candidate twice.
        order = torch.sort(values, stable=True).indices
        keys, values = keys[order], values[order]
        order = torch.sort(keys, stable=True).indices
        keys, values = keys[order], values[order]
        keep = torch.ones_like(keys, dtype=torch.bool)
        keep[1:] = (keys[1:] != keys[:-1]) | (values[1:] != values[:-1])
        return cls(keys[keep], values[keep])

    def lookup(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """For query keys ``(b,)``: ``(rows, entities)``, one pair per known triple matching a key."""
        lo = torch.searchsorted(self.keys, query, side="left")
        hi = torch.searchsorted(self.keys, query, side="right")
        counts = hi - lo                                                  # (b,)
        rows = torch.repeat_interleave(torch.arange(len(query), device=query.device), counts)
        # position inside each group: global index minus the group's first output index
        first_out = torch.cumsum(counts, 0) - counts
        within = torch.arange(len(rows), device=query.device) - first_out[rows]
        return rows, self.values[lo[rows] + within]


@dataclass
class KnownTriples:
    """The filter of the filtered setting: known triples by ``(h, r) -> tails`` and ``(r, t) -> heads``."""

    by_hr: _Csr  # key h * R + r, values t
    by_rt: _Csr  # key r * N + t, values h
    num_entities: int
    num_relations: int

    @classmethod
    def build(cls, known: Tensor, num_entities: int, num_relations: int,
              device: torch.device | str = "cpu") -> "KnownTriples":
        known = known.to(device=device, dtype=torch.long)
        h, r, t = known[:, HEAD], known[:, REL], known[:, TAIL]
        return cls(_Csr.build(h * num_relations + r, t), _Csr.build(r * num_entities + t, h),
                   num_entities, num_relations)

    def others(self, side: str, batch: Tensor) -> tuple[Tensor, Tensor]:
        """``(rows, entities)``: the known candidates of each query of ``batch`` on ``side``."""
        h, r, t = batch[:, HEAD], batch[:, REL], batch[:, TAIL]
        if side == "tail":
            return self.by_hr.lookup(h * self.num_relations + r)
        return self.by_rt.lookup(r * self.num_entities + t)


def _scorers(model_or_scorers: Any, device: torch.device | None, exact: bool
             ) -> tuple[ScoreFn, ScoreFn, torch.device]:
    """The two score functions and the device they run on."""
    if isinstance(model_or_scorers, CandidateScorer):
        return (model_or_scorers.tails, model_or_scorers.heads,
                device or model_or_scorers.candidates.device)
    if isinstance(model_or_scorers, Sequence) and len(model_or_scorers) == 2:
        return model_or_scorers[0], model_or_scorers[1], device or torch.device("cpu")
    model = getattr(model_or_scorers, "module", model_or_scorers)  # DistributedDataParallel
    if device is not None:
        model = model.to(device)
    else:  # stay where the model is (a training loop evaluating its own model)
        device = next(model.parameters()).device
    # train/eval mode is left alone: none of the four models has dropout or batch norm
    scorer = candidate_scorer(model, exact=exact)
    return scorer.tails, scorer.heads, device


def _count_rows(mask: Tensor) -> Tensor:
    """``mask.sum(1)`` of a ``(b, N)`` bool mask as int64. Summing bools casts them to int64
    first (8 bytes written per candidate); read as uint8 into an int32 accumulator the mask is
    read once, and those int64 copies were a large share of a large evaluation's profile
    (BENCHMARKS.md, "Link-prediction evaluation at scale")."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def _counts(scores: Tensor, target: Tensor, rows: Tensor, others: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw and filtered ``#{s > s*}`` and ``#{s >= s*}`` for one side of one chunk."""
    true = scores.gather(1, target[:, None])                               # (b, 1)
    if torch.isnan(true).any():
        raise ValueError("the model scored a test triple as NaN; ranks would be meaningless")
    raw_gt = _count_rows(scores > true)                                    # (b,)
    raw_ge = _count_rows(scores >= true)
    # Other known-true candidates (the test entity itself stays): remove their contribution.
    s = scores[rows, others]                                               # (f,)
    s_true = true[rows, 0]
    other = others != target[rows]
    f_gt = torch.zeros_like(raw_gt).index_add_(0, rows, ((s > s_true) & other).long())
    f_ge = torch.zeros_like(raw_ge).index_add_(0, rows, ((s >= s_true) & other).long())
    return raw_gt, raw_ge, raw_gt - f_gt, raw_ge - f_ge


def summarize(ranks: Tensor, ks: Iterable[int] = (1, 3, 10)) -> dict[str, float]:
    """MRR, MR and Hits@k of (realistic, possibly fractional) ranks."""
    ranks = ranks.double()
    if ranks.numel() == 0:
        return {"mrr": float("nan"), "mr": float("nan"), **{f"hits@{k}": float("nan") for k in ks},
                "count": 0}
    out = {"mrr": (1.0 / ranks).mean().item(), "mr": ranks.mean().item()}
    out.update({f"hits@{k}": (ranks <= k).double().mean().item() for k in ks})
    out["count"] = int(ranks.numel())
    return out


def _per_relation(rel: Tensor, ranks: Tensor, num_relations: int, k: int = 10) -> list[dict[str, Any]]:
    """Filtered MRR and Hits@k per relation, both sides pooled (``count``: test triples)."""
    n = torch.bincount(rel, minlength=num_relations).double()
    rr = torch.bincount(rel, weights=1.0 / ranks, minlength=num_relations)
    hits = torch.bincount(rel, weights=(ranks <= k).double(), minlength=num_relations)
    present = torch.nonzero(n > 0).flatten().tolist()
    return [{"relation": r, "count": int(n[r].item()) // 2, "mrr": (rr[r] / n[r]).item(),
             f"hits@{k}": (hits[r] / n[r]).item()} for r in present]


def rank_metrics(model_or_scorers: Any, test: Tensor, known: Tensor, num_entities: int,
                 batch_size: int = 256, device: str | torch.device | None = None,
                 num_relations: int | None = None, ks: Sequence[int] = (1, 3, 10),
                 max_k_curve: int = 10, exact: bool = False,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate link prediction on ``test`` with the standard protocol (see the module docstring).

    :param model_or_scorers: a PyG KGE model (moved to ``device`` when one is given; scored through
        :func:`knowledge.scoring.candidate_scorer`), a :class:`~knowledge.scoring.CandidateScorer`, or a
        pair ``(score_tails(h, r) -> (b, N), score_heads(r, t) -> (b, N))``; higher is better.
    :param test: ``(n, 3)`` (head, relation, tail) triples to rank.
    :param known: ``(m, 3)`` every true triple to filter (train + valid + test); duplicates are fine.
    :param device: where scores are computed; ``"auto"``: CUDA when available; None: the model's
        device (CPU for plain score functions).
    :param batch_size: test triples per chunk; peak memory ~ ``batch_size * num_entities`` scores.
    :param progress: ``progress(iterable, total=, desc=)`` wrapper, e.g. ``StageContext.progress``.
    :returns: JSON-able ``filtered`` / ``raw`` -> ``both`` / ``head`` / ``tail`` -> ``{mrr, mr,
        hits@k, count}``; ``per_relation`` (filtered); ``hits_at_k`` (filtered, k = 1..max_k_curve);
        and ``ranks``: numpy arrays, one entry per ranking (all head predictions, then all tail
        predictions): ``head``, ``relation``, ``tail``, ``side``, ``filtered``, ``raw`` (realistic) and
        ``filtered_optimistic``, ``filtered_pessimistic``, ``raw_optimistic``, ``raw_pessimistic``.
    """
    device = None if device is None else resolve_device(device)
    # The test triples may come on a GPU (a training loop's validation split): chunks go to
    # ``device`` one at a time and the ranks come back to the host, so keep the index on the host.
    test = torch.as_tensor(test, dtype=torch.long).cpu()
    known = torch.as_tensor(known, dtype=torch.long)
    if num_relations is None:
        num_relations = int(max(test[:, REL].max().item() if len(test) else -1,
                                known[:, REL].max().item() if len(known) else -1)) + 1
    for name, tr in (("test", test), ("known", known)):
        if len(tr) and (int(tr[:, [HEAD, TAIL]].min()) < 0
                        or int(tr[:, [HEAD, TAIL]].max()) >= num_entities):
            raise ValueError(f"{name} triples hold entity indices outside 0..{num_entities - 1}")
        # the filter keys h * R + r and r * N + t are only unique for in-range indices
        if len(tr) and (int(tr[:, REL].min()) < 0 or int(tr[:, REL].max()) >= num_relations):
            raise ValueError(f"{name} triples hold relation indices outside "
                             f"0..{num_relations - 1}")
    with torch.no_grad():
        score_tails, score_heads, device = _scorers(model_or_scorers, device, exact)
    filt = KnownTriples.build(known, num_entities, num_relations, device)
    progress = progress or (lambda it, **kw: iter(it))

    # counts[side] = [raw_gt, raw_ge, filt_gt, filt_ge], each a list of per-chunk (b,) tensors
    counts: dict[str, list[list[Tensor]]] = {s: [[], [], [], []] for s in SIDES}
    chunks = test.split(batch_size)
    with torch.no_grad():
        for batch in progress(chunks, total=len(chunks), desc="rank test triples"):
            batch = batch.to(device)
            h, r, t = batch[:, HEAD], batch[:, REL], batch[:, TAIL]
            for side in SIDES:
                scores = score_heads(r, t) if side == "head" else score_tails(h, r)  # (b, N)
                if scores.shape != (len(batch), num_entities):
                    raise ValueError(f"{side} scorer returned {tuple(scores.shape)}, expected "
                                     f"{(len(batch), num_entities)}")
                rows, others = filt.others(side, batch)
                target = h if side == "head" else t
                for acc, c in zip(counts[side], _counts(scores, target, rows, others)):
                    acc.append(c.cpu())
                del scores

    def cat(side: str, i: int) -> Tensor:
        parts = counts[side][i]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    ranks: dict[str, Tensor] = {}
    for setting, (gt_i, ge_i) in (("raw", (0, 1)), ("filtered", (2, 3))):
        opt = torch.cat([cat(s, gt_i) for s in SIDES]) + 1
        pes = torch.cat([cat(s, ge_i) for s in SIDES])
        ranks[f"{setting}_optimistic"], ranks[f"{setting}_pessimistic"] = opt, pes
        # float64: realistic ranks are half-integers, beyond float32's exact range past 2**23
        ranks[setting] = (opt + pes).double() / 2
    return assemble_metrics(test, ranks, num_entities, num_relations, len(filt.by_hr.keys), ks,
                            max_k_curve)


def assemble_metrics(test: Tensor, ranks: dict[str, Tensor], num_entities: int, num_relations: int,
                     num_known: int, ks: Sequence[int], max_k_curve: int) -> dict[str, Any]:
    """:func:`rank_metrics`' result from the ranks of ``test``'s (n, 3) triples, head side first
    then tail (``ranks``: ``raw`` / ``filtered`` realistic ranks (2n,) and their ``_optimistic`` /
    ``_pessimistic`` parts); shared with the sharded evaluator
    (:mod:`knowledge.partitioned_eval`), which sums the same counts over candidate partitions."""
    n = len(test)
    is_head = torch.arange(2 * n) < n
    out: dict[str, Any] = {
        "protocol": {"sides": "both (head and tail prediction)",
                     "filtered": "Bordes et al. 2013 filtered setting against the known triples",
                     "rank": "realistic = (optimistic + pessimistic) / 2 (Berrendorf et al. 2020)"},
        "num_triples": n, "num_entities": num_entities, "num_relations": num_relations,
        "num_known": num_known,
    }
    for setting in ("filtered", "raw"):
        rk = ranks[setting]
        out[setting] = {"both": summarize(rk, ks), "head": summarize(rk[is_head], ks),
                        "tail": summarize(rk[~is_head], ks)}
    rel2 = test[:, REL].repeat(2)
    out["per_relation"] = _per_relation(rel2, ranks["filtered"], num_relations)
    frk = ranks["filtered"]
    k_range = list(range(1, max_k_curve + 1))
    out["hits_at_k"] = {"k": k_range, **{
        name: [(sel <= k).double().mean().item() if sel.numel() else float("nan") for k in k_range]
        for name, sel in (("both", frk), ("head", frk[is_head]), ("tail", frk[~is_head]))}}
    out["ranks"] = {"head": test[:, HEAD].repeat(2).numpy(), "relation": rel2.numpy(),
                    "tail": test[:, TAIL].repeat(2).numpy(), "side": np.repeat(np.array(SIDES), n),
                    **{k: v.numpy() for k, v in ranks.items()}}
    return out
