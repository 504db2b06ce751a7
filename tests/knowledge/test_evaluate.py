"""Full-candidate scorers and the filtered, two-sided, realistic-rank evaluation.

The scorers are checked against PyG's own ``forward`` candidate by candidate; the ranking against a
hand-computed example, a naive per-triple Python reference (raw and filtered), and PyKEEN's
``RankBasedEvaluator`` fed the very same score matrices (filtered realistic/optimistic/pessimistic).
"""

from __future__ import annotations

import math

import pytest
import torch

from knowledge.evaluate import KnownTriples, rank_metrics
from knowledge.models import build_model
from knowledge.scoring import candidate_scorer, score_heads, score_tails

N, R, DIM = 30, 4, 16
MODELS = [("transe", {"p_norm": 1.0}), ("transe", {"p_norm": 2.0}),
          ("transe", {"p_norm": 1.0, "entity_norm": 2.0}), ("distmult", {}),
          ("complex", {}), ("rotate", {"margin": 3.0})]


def _model(name: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, N, R, DIM, **kwargs).eval()
    # Move every weight off its initialisation (PyG's TransE init normalises relations; RotatE's
    # margin and a non-unit entity norm must also show up in the scores).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(("name", "kwargs"), MODELS, ids=[f"{n}{k}" for n, k in MODELS])
def test_scorers_equal_forward_for_every_candidate(name: str, kwargs: dict, exact: bool) -> None:
    model = _model(name, kwargs)
    g = torch.Generator().manual_seed(1)
    b = 40  # > 25 rows: torch.cdist's GEMM path is taken when exact=False
    h, r, t = (torch.randint(N, (b,), generator=g), torch.randint(R, (b,), generator=g),
               torch.randint(N, (b,), generator=g))
    cand = torch.arange(N)
    with torch.no_grad():
        tails = score_tails(model, h, r, exact=exact)                          # (b, N)
        heads = score_heads(model, r, t, exact=exact)
        ref_t = model(h.repeat_interleave(N), r.repeat_interleave(N), cand.repeat(b)).view(b, N)
        ref_h = model(cand.repeat(b), r.repeat_interleave(N), t.repeat_interleave(N)).view(b, N)
    assert tails.shape == heads.shape == (b, N)
    torch.testing.assert_close(tails, ref_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(heads, ref_h, atol=1e-5, rtol=0)
    # the scores vary across candidates (a scorer returning a constant would pass nothing above)
    assert ref_t.std() > 0.05


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(TypeError, match="no full-candidate scorer"):
        candidate_scorer(torch.nn.Linear(2, 2))


# --- a hand-computed example with ties -----------------------------------------------------------
# 3 entities, 1 relation. Known: (0,0,1) (0,0,2) (1,0,2). Test: (0,0,1) and (1,0,2).
TAIL_SCORES = torch.tensor([[0.5, 0.5, 0.9],   # (0, 0, ?)
                            [0.0, 0.0, 0.0],   # (1, 0, ?)
                            [0.0, 0.0, 0.0]])
HEAD_SCORES = torch.tensor([[0.0, 0.0, 0.0],
                            [0.2, 0.2, 0.2],   # (?, 0, 1)
                            [0.7, 0.3, 0.3]])  # (?, 0, 2)


def test_hand_computed_ranks_with_ties() -> None:
    known = torch.tensor([[0, 0, 1], [0, 0, 2], [1, 0, 2]])
    test = torch.tensor([[0, 0, 1], [1, 0, 2]])
    out = rank_metrics((lambda h, r: TAIL_SCORES[h], lambda r, t: HEAD_SCORES[t]), test, known, 3,
                       batch_size=1)
    rk = out["ranks"]
    # order: head predictions of both triples, then tail predictions
    # head (?,0,1), true 0: all tied, nothing filtered -> opt 1, pes 3 -> 2
    # head (?,0,2), true 1 (0.3): entity 0 (0.7) better; raw opt 2, pes 3 -> 2.5;
    #   filtered: (0,0,2) is known -> removed -> opt 1, pes 2 -> 1.5
    # tail (0,0,?), true 1 (0.5): entity 2 (0.9) better, entity 0 tied: raw 2, 3 -> 2.5;
    #   filtered: (0,0,2) known -> opt 1, pes 2 -> 1.5
    # tail (1,0,?), true 2: all tied, nothing else known -> 1, 3 -> 2
    assert rk["side"].tolist() == ["head", "head", "tail", "tail"]
    assert rk["raw"].tolist() == [2.0, 2.5, 2.5, 2.0]
    assert rk["filtered"].tolist() == [2.0, 1.5, 1.5, 2.0]
    assert rk["filtered_optimistic"].tolist() == [1, 1, 1, 1]
    assert rk["filtered_pessimistic"].tolist() == [3, 2, 2, 3]
    f, raw = out["filtered"], out["raw"]
    assert f["both"]["mrr"] == pytest.approx((1 / 2 + 1 / 1.5) / 2, abs=1e-12)
    assert f["both"]["mr"] == pytest.approx(1.75, abs=1e-12)
    assert f["both"]["hits@1"] == 0.0 and f["both"]["hits@3"] == 1.0
    assert f["head"]["mr"] == pytest.approx(1.75) and f["tail"]["mr"] == pytest.approx(1.75)
    assert raw["both"]["mrr"] == pytest.approx((1 / 2 + 1 / 2.5) / 2, abs=1e-12)
    assert raw["both"]["mr"] == pytest.approx(2.25, abs=1e-12)
    assert out["per_relation"] == [{"relation": 0, "count": 2, "mrr": pytest.approx(f["both"]["mrr"]),
                                    "hits@10": 1.0}]
    assert out["hits_at_k"]["both"][:3] == [0.0, 1.0, 1.0]


# --- random KG with tied scores ------------------------------------------------------------------
def _random_kg(seed: int = 0, n_triples: int = 220):
    g = torch.Generator().manual_seed(seed)
    trip = torch.stack([torch.randint(N, (n_triples,), generator=g),
                        torch.randint(R, (n_triples,), generator=g),
                        torch.randint(N, (n_triples,), generator=g)], 1).unique(dim=0)
    trip = trip[torch.randperm(len(trip), generator=g)]
    test = trip[:50]
    return test, trip  # known = train + valid + test = everything


def _tied_tables(decimals: int = 1):
    """Dense score tables of a random DistMult, rounded so that many candidates tie."""
    model = _model("distmult", {}, seed=3)
    hh, rr = torch.meshgrid(torch.arange(N), torch.arange(R), indexing="ij")
    with torch.no_grad():
        tail_tab = score_tails(model, hh.flatten(), rr.flatten()).view(N, R, N)   # [h, r, e]
        head_tab = score_heads(model, rr.flatten(), hh.flatten()).view(N, R, N)   # [t, r, e]
    scale = 10.0 ** decimals
    tail_tab, head_tab = (tail_tab * scale).round() / scale, (head_tab * scale).round() / scale
    return (lambda h, r: tail_tab[h, r]), (lambda r, t: head_tab[t, r])


def _naive(tails, heads, test, known):
    """Per-triple Python reference: ranks by direct counting over explicit candidate lists."""
    known_set = {tuple(x) for x in known.tolist()}
    out = {"raw": {"head": [], "tail": []}, "filtered": {"head": [], "tail": []}}
    for h, r, t in test.tolist():
        for side in ("head", "tail"):
            s = (heads(torch.tensor([r]), torch.tensor([t])) if side == "head"
                 else tails(torch.tensor([h]), torch.tensor([r])))[0].tolist()
            true_e = h if side == "head" else t
            for setting in ("raw", "filtered"):
                cands = [e for e in range(N) if e == true_e or setting == "raw"
                         or ((e, r, t) if side == "head" else (h, r, e)) not in known_set]
                better = sum(s[e] > s[true_e] for e in cands)
                not_worse = sum(s[e] >= s[true_e] for e in cands)
                out[setting][side].append((1 + better + not_worse) / 2)
    return out


def _metrics(ranks: list[float]) -> dict[str, float]:
    return {"mrr": sum(1 / x for x in ranks) / len(ranks), "mr": sum(ranks) / len(ranks),
            **{f"hits@{k}": sum(x <= k for x in ranks) / len(ranks) for k in (1, 3, 10)}}


def test_matches_naive_reference_raw_and_filtered() -> None:
    test, known = _random_kg()
    tails, heads = _tied_tables()
    out = rank_metrics((tails, heads), test, known, N, batch_size=7)
    ref = _naive(tails, heads, test, known)
    n = len(test)
    for setting in ("raw", "filtered"):
        assert out["ranks"][setting][:n].tolist() == ref[setting]["head"]
        assert out["ranks"][setting][n:].tolist() == ref[setting]["tail"]
        for side, ranks in (("head", ref[setting]["head"]), ("tail", ref[setting]["tail"]),
                            ("both", ref[setting]["head"] + ref[setting]["tail"])):
            got = out[setting][side]
            for k, v in _metrics(ranks).items():
                assert got[k] == pytest.approx(v, abs=1e-12), (setting, side, k)
    # the example is not degenerate: filtering and ties both change some ranks
    assert (out["ranks"]["filtered"] < out["ranks"]["raw"]).any()
    assert (out["ranks"]["filtered_optimistic"] != out["ranks"]["filtered_pessimistic"]).any()


def test_batch_size_and_duplicate_known_triples_do_not_change_ranks() -> None:
    test, known = _random_kg(seed=5)
    scorers = _tied_tables()
    a = rank_metrics(scorers, test, known, N, batch_size=len(test))
    b = rank_metrics(scorers, test, torch.cat([known, known[:60]]), N, batch_size=3)
    for key in ("filtered", "raw", "filtered_optimistic", "raw_pessimistic"):
        assert a["ranks"][key].tolist() == b["ranks"][key].tolist()


def test_filter_lookup_is_csr_of_known_triples() -> None:
    known = torch.tensor([[0, 1, 2], [0, 1, 4], [0, 1, 2], [3, 1, 2], [0, 0, 4]])
    f = KnownTriples.build(known, num_entities=5, num_relations=2)
    rows, ents = f.others("tail", torch.tensor([[0, 1, 9], [3, 1, 9], [4, 1, 9]]))
    assert list(zip(rows.tolist(), ents.tolist())) == [(0, 2), (0, 4), (1, 2)]
    rows, ents = f.others("head", torch.tensor([[9, 1, 2], [9, 0, 4]]))
    assert list(zip(rows.tolist(), ents.tolist())) == [(0, 0), (0, 3), (1, 0)]


def test_model_path_equals_scorer_path() -> None:
    test, known = _random_kg(seed=2)
    model = _model("rotate", {"margin": 3.0})
    a = rank_metrics(model, test, known, N, batch_size=16)
    b = rank_metrics(candidate_scorer(model), test, known, N, batch_size=50)
    assert a["ranks"]["filtered"].tolist() == b["ranks"]["filtered"].tolist()
    assert 0 < a["filtered"]["both"]["mrr"] <= 1 and not math.isnan(a["raw"]["tail"]["mr"])


def test_out_of_range_indices_are_an_error() -> None:
    test, known = _random_kg()
    scorers = _tied_tables()
    with pytest.raises(ValueError, match="relation indices"):
        rank_metrics(scorers, test, known, N, num_relations=R - 1)
    with pytest.raises(ValueError, match="entity indices"):
        rank_metrics(scorers, test, known, N - 1)


def test_nan_scores_are_an_error() -> None:
    test, known = _random_kg()
    nan = lambda *_: torch.full((len(_[0]), N), float("nan"))  # noqa: E731
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics((nan, nan), test, known, N)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    test, known = _random_kg(seed=4)
    model = _model("transe", {"p_norm": 2.0})
    cpu = rank_metrics(model, test, known, N, device="cpu")
    gpu = rank_metrics(model, test, known, N, device="cuda")
    for setting in ("filtered", "raw"):
        for side in ("both", "head", "tail"):
            for k, v in cpu[setting][side].items():
                assert gpu[setting][side][k] == pytest.approx(v, abs=1e-6)


# --- PyKEEN ---------------------------------------------------------------------------------------
class _ScoreModel(torch.nn.Module):
    """The least of a pykeen ``Model`` that ``Evaluator.evaluate`` calls: ``predict`` returns our
    score matrices, so PyKEEN's own filtering (NaN-ing other positives) and ranking run on them."""

    def __init__(self, tails, heads):
        super().__init__()
        self.tails, self.heads = tails, heads
        self.num_entities, self.num_relations = N, R

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def predict(self, hrt_batch, target, slice_size=None, mode=None):
        h, r, t = hrt_batch.unbind(1)
        # clone: pykeen writes NaNs into the returned matrix
        return (self.tails(h, r) if target == "tail" else self.heads(r, t)).clone()


@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_filtered_metrics_equal_pykeen(decimals: int) -> None:
    pytest.importorskip("pykeen")
    from pykeen.evaluation import RankBasedEvaluator

    test, known = _random_kg(seed=decimals)
    tails, heads = _tied_tables(decimals)
    # known = train + valid + test; pykeen adds the evaluation triples to the filter itself
    res = RankBasedEvaluator(filtered=True).evaluate(
        _ScoreModel(tails, heads), test, batch_size=8, additional_filter_triples=[known],
        use_tqdm=False)
    out = rank_metrics((tails, heads), test, known, N, batch_size=11)
    names = {"mrr": "inverse_harmonic_mean_rank", "mr": "arithmetic_mean_rank",
             "hits@1": "hits_at_1", "hits@3": "hits_at_3", "hits@10": "hits_at_10"}
    n = len(test)
    for side in ("both", "head", "tail"):
        for ours, theirs in names.items():
            expected = res.get_metric(f"{side}.realistic.{theirs}")
            assert out["filtered"][side][ours] == pytest.approx(expected, abs=1e-6), (side, ours)
        sel = slice(None) if side == "both" else (slice(0, n) if side == "head" else slice(n, None))
        for kind in ("optimistic", "pessimistic"):
            expected = res.get_metric(f"{side}.{kind}.arithmetic_mean_rank")
            got = out["ranks"][f"filtered_{kind}"][sel].mean()
            assert got == pytest.approx(expected, abs=1e-6), (side, kind)
    # ties make the three rank types differ, so the comparison above distinguishes them
    if decimals == 0:
        assert (res.get_metric("both.optimistic.arithmetic_mean_rank")
                < res.get_metric("both.realistic.arithmetic_mean_rank")
                < res.get_metric("both.pessimistic.arithmetic_mean_rank"))
