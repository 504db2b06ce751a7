"""The KGE training loop itself (knowledge/embed.py), without Ray: corruption and one epoch, on the
CPU and, where there is one, on a GPU (the device Ray Train's ``prepare_model`` puts the model on);
then the ``knowledge.embed`` stage through Ray Train: what it ships to the workers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from knowledge.embed import corrupt, train_epoch
from knowledge.evaluate import rank_metrics
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from knowledge.models import build_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs CUDA"))]


def test_corrupt_replaces_exactly_one_side_with_the_bernoulli_share() -> None:
    torch.manual_seed(0)
    pos = torch.tensor([[0, 0, 1], [2, 1, 3]])
    neg = corrupt(pos, 2000, 50, torch.tensor([0.9, 0.1]))
    assert neg.shape == (4000, 3) and (neg[:, 1] == pos[:, 1].repeat_interleave(2000)).all()
    src = pos.repeat_interleave(2000, dim=0)
    head_changed = neg[:, 0] != src[:, 0]
    tail_changed = neg[:, 2] != src[:, 2]
    assert not (head_changed & tail_changed).any()
    # relation 0 corrupts the head 90% of the time, relation 1 10% (a random entity can equal the
    # original one, 1 in 50, so the observed share is a little lower)
    assert 0.85 < head_changed[:2000].float().mean() < 0.91
    assert 0.07 < head_changed[2000:].float().mean() < 0.12


@pytest.mark.parametrize("device", DEVICES)
def test_train_epoch_learns_a_planted_graph(device: str) -> None:
    """Two relations, i -> i+1 and i -> i+2 along a chain of 30 entities (a chain: a translation
    cannot close a ring): after 40 epochs TransE ranks the true entities well above chance
    (a random model's filtered MRR is ~0.14; seeds 0-2 reached 0.46-0.59 at 30 epochs), wherever
    it trains."""
    n = 30
    i = torch.arange(n - 2)
    triples = torch.cat([torch.stack([i, torch.zeros_like(i), i + 1], 1),
                         torch.stack([i, torch.ones_like(i), i + 2], 1)]).to(device)
    torch.manual_seed(0)
    model = build_model("transe", n, 2, 16, p_norm=1.0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = [train_epoch(model, opt, triples, torch.randperm(len(triples), device=device),
                          batch_size=16, negatives=8, num_entities=n, head_prob=None,
                          loss="margin", margin=1.0, temperature=1.0)
              for _ in range(40)]
    assert losses[-1] < 0.4 * losses[0], losses
    assert all(p.device.type == device for p in model.parameters())
    model.eval()
    mrr = rank_metrics(model, triples, triples, n)["filtered"]["both"]["mrr"]
    assert mrr > 0.35, mrr


@pytest.mark.parametrize("name", ["complex", "distmult"])
def test_lp_regularization_is_pykeens_lp_regularizer(name: str) -> None:
    """``lp_regularization`` is the term PyKEEN's ``LpRegularizer(p=2, normalize=True)`` adds for
    the rows a batch looks up (ComplEx: its complex vectors; one update per lookup of h, r and t,
    positives and negatives apart), value and gradients; 4 positives look up fewer rows than the
    12-entity table (norms of the rows), their 32 negatives more (norms of the table, indexed)."""
    from pykeen.regularizers import LpRegularizer

    from knowledge.embed import lp_regularization

    torch.manual_seed(0)
    model = build_model(name, 12, 3, 8)
    pos = torch.stack([torch.randint(12, (4,)), torch.randint(3, (4,)), torch.randint(12, (4,))], 1)
    neg = corrupt(pos, 8, 12, None)
    got = lp_regularization(model, pos, neg)
    got.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def rows(prefix: str, idx: torch.Tensor) -> torch.Tensor:
        re = getattr(model, prefix).weight[idx]
        return torch.complex(re, getattr(model, prefix + "_im").weight[idx]) if name == "complex" else re

    reg = LpRegularizer(weight=1.0, p=2.0, normalize=True)
    want = sum(reg(rows(prefix, batch[:, col]))
               for batch in (pos, neg) for prefix, col in (("node_emb", 0), ("rel_emb", 1), ("node_emb", 2)))
    want.backward()
    torch.testing.assert_close(got, want)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_train_epoch_with_regularization_shrinks_the_embeddings() -> None:
    """The same seeded epochs with and without the regulariser: with it the entity embeddings end up
    with a smaller norm."""
    triples = torch.stack([torch.arange(20), torch.zeros(20, dtype=torch.long), (torch.arange(20) + 1) % 20], 1)

    def run(weight: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = build_model("complex", 20, 1, 8)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(10):
            loss = train_epoch(model, opt, triples, torch.randperm(20), batch_size=10, negatives=4,
                               num_entities=20, head_prob=None, loss="bce", margin=1.0,
                               temperature=1.0, regularization=weight)
        return loss, float(model.node_emb.weight.norm())

    plain, regularised = run(0.0), run(1.0)
    assert regularised[1] < 0.9 * plain[1], (plain, regularised)


def test_init_embeddings_normal_matches_trouillon_and_pykeen() -> None:
    """``init: normal``: every real number of every table ~ N(0, 1), ComplEx's real and imaginary
    parts alike (Trouillon et al.'s ``randn`` for both; PyKEEN's ``normal_`` on the real view of its
    complex tables, checked against PyKEEN itself when installed); DistMult's tables N(0, 1);
    projected TransE stays on its sphere; ``default`` keeps the PyG model's own weights."""
    from knowledge.embed import init_embeddings

    torch.manual_seed(0)
    model = build_model("complex", 500, 40, 64)
    before = model.node_emb.weight.detach().clone()
    init_embeddings(model, "default")
    assert torch.equal(before, model.node_emb.weight)
    init_embeddings(model, "normal")
    for table in (model.node_emb, model.node_emb_im, model.rel_emb, model.rel_emb_im):
        assert abs(table.weight.std().item() - 1.0) < 0.05
        assert abs(table.weight.mean().item()) < 0.05
    try:
        from pykeen.models import ComplEx
        from pykeen.triples import TriplesFactory
    except ImportError:
        pass
    else:  # the same distribution as PyKEEN's ComplEx draws (each part's std; 500 x 64 samples)
        tf = TriplesFactory.from_labeled_triples(np.array(
            [[f"e{i}", f"r{i % 40}", f"e{(i * 7 + 1) % 500}"] for i in range(2000)]))
        x = ComplEx(triples_factory=tf, embedding_dim=64, random_seed=0) \
            .entity_representations[0](indices=None).detach()
        assert abs(x.real.std().item() - model.node_emb.weight.std().item()) < 0.05
        assert abs(x.imag.std().item() - model.node_emb_im.weight.std().item()) < 0.05
    distmult = build_model("distmult", 500, 40, 64)
    init_embeddings(distmult, "normal")
    assert abs(distmult.node_emb.weight.std().item() - 1.0) < 0.05
    transe = build_model("transe", 50, 4, 16, entity_norm=2.0)
    init_embeddings(transe, "normal")
    torch.testing.assert_close(transe.node_emb.weight.norm(dim=-1), torch.ones(50))
    with pytest.raises(ValueError, match="unknown initialisation 'glorot'"):
        init_embeddings(transe, "glorot")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["margin", "self_adversarial"])
def test_train_epoch_scores_corruptions_from_parts_as_from_triples(loss: str, device: str) -> None:
    """TransE gets the drawn corruptions (``scores_corruptions``); with that switched off it gets
    the triples they stand for. The same seeded epochs (Bernoulli corruption, the regulariser on
    in the last) give the same losses and weights both ways."""
    g = torch.Generator().manual_seed(0)
    triples = torch.stack([torch.randint(15, (40,), generator=g), torch.randint(3, (40,), generator=g),
                           torch.randint(15, (40,), generator=g)], 1).to(device)

    def run(fused: bool) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("transe", 15, 3, 8, p_norm=1.0, entity_norm=2.0).to(device)
        model.scores_corruptions = fused
        # SGD: Adam would blow the rounding of gradients that cancel (an entity on both sides of
        # a triple) up to whole steps
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = [train_epoch(model, opt, triples, torch.randperm(40, device=device), batch_size=16,
                              negatives=5, num_entities=15,
                              head_prob=torch.tensor([0.2, 0.5, 0.9], device=device), loss=loss,
                              margin=2.0, temperature=1.0, shift=2.0 if loss != "margin" else 0.0,
                              regularization=0.1 if epoch == 2 else 0.0)
                  for epoch in range(3)]
        return losses, model.node_emb.weight.detach().cpu()

    (parts_losses, parts_w), (triple_losses, triple_w) = run(True), run(False)
    np.testing.assert_allclose(parts_losses, triple_losses, rtol=1e-5)
    torch.testing.assert_close(parts_w, triple_w, rtol=1e-4, atol=1e-5)


def _random_kg(n: int, r: int, m: int, seed: int = 0) -> KnowledgeGraph:
    """``n`` entities, ``r`` relations, ``m`` random triples (a tenth valid, a tenth test)."""
    g = torch.Generator().manual_seed(seed)
    trip = torch.stack([torch.randint(n, (m,), generator=g), torch.randint(r, (m,), generator=g),
                        torch.randint(n, (m,), generator=g)], 1)
    split = ["valid" if i % 10 == 0 else "test" if i % 10 == 1 else "train" for i in range(m)]
    return kg_of(trip, n, r, split)


def kg_of(trip: torch.Tensor, n: int, r: int, split: list[str] | None = None) -> KnowledgeGraph:
    """A KG of ``n`` entities ``t:e<i>``, ``r`` relations ``t:r<j>`` and the (m, 3) ``trip`` of
    ``split`` (default: all train)."""
    entities = pa.table({"idx": list(range(n)), "id": [f"t:e{i}" for i in range(n)],
                         "name": [f"e{i}" for i in range(n)], "aliases": [[] for _ in range(n)],
                         "description": [""] * n, "types": [[] for _ in range(n)],
                         "source": ["t"] * n}, schema=ENTITY_SCHEMA)
    relations = pa.table({"idx": list(range(r)), "id": [f"t:r{i}" for i in range(r)],
                          "name": [f"r{i}" for i in range(r)], "source": ["t"] * r},
                         schema=RELATION_SCHEMA)
    triples = pa.table({"head": trip[:, 0].int().tolist(), "relation": trip[:, 1].int().tolist(),
                        "tail": trip[:, 2].int().tolist(), "split": split or ["train"] * len(trip)},
                       schema=TRIPLE_SCHEMA)
    return KnowledgeGraph(entities, relations, triples)


def _embed_ctx(tmp: Path, name: str, kg: KnowledgeGraph, file_uri: bool = False):  # noqa: ANN202
    """The stage's context with ``kg`` as its input artifact, located by a ``file://`` URI when
    ``file_uri`` (as a remote store's artifacts are, by ``s3://`` ones), else by its folder."""
    from pipeline.context import StageContext
    from pipeline.registry import Resources
    from pipeline.store import Artifact

    kg_dir, out = tmp / name / "kg", tmp / name / "out"
    kg_dir.mkdir(parents=True)
    out.mkdir()
    kg.save(kg_dir)
    art = Artifact("k" + name, kg_dir, {}, f"file://{kg_dir}" if file_uri else "")
    return StageContext(stage="emb", key="e" + name, out=out, inputs={"kg": art},
                        resources=Resources(), state_uri=str(tmp / name / "state"),
                        log=logging.getLogger("test.embed"))


def test_stage_refuses_fewer_training_triples_than_workers(tmp_path: Path) -> None:
    """Counted from the triples' split column, before any worker starts."""
    from knowledge.stages.embed import EmbedParams, embed
    from pipeline import StageFailed

    kg = _random_kg(5, 1, 3)  # one train, one valid, one test triple
    with pytest.raises(StageFailed, match="1 training triples cannot feed 2 workers"):
        embed(_embed_ctx(tmp_path, "few", kg), EmbedParams(scaling={"num_workers": 2}))


def test_stage_job_does_not_grow_with_the_graph(tmp_path: Path, ray_local: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The job shipped inside every worker's config holds the graph's URI and counts, never its
    triples: a graph ten times larger (entities, relations and triples) gives a job of the same
    size, give or take the digits of its counts, reported as ``job_bytes``. The workers read the
    graph from an fsspec URI (``file://``) and train on it: one row per entity and relation."""
    import knowledge.stages.embed as stage_module
    from safetensors.torch import load_file

    shipped: dict[str, int] = {}
    real_fit = stage_module.fit

    def spy(loop, job, *args, **kwargs):  # noqa: ANN001, ANN202
        result = real_fit(loop, job, *args, **kwargs)
        shipped[str(job.num_entities)] = result.job_bytes
        return result

    monkeypatch.setattr(stage_module, "fit", spy)
    params = stage_module.EmbedParams(model="transe", dim=4, epochs=1, eval_every=1,
                                      corruption="bernoulli", batch_size=512)
    metrics = {}
    for name, (n, r, m) in {"small": (30, 4, 200), "large": (300, 40, 2000)}.items():
        ctx = _embed_ctx(tmp_path, name, _random_kg(n, r, m), file_uri=True)
        metrics[name] = stage_module.embed(ctx, params)
        emb = load_file(str(ctx.out / "embeddings.safetensors"))
        assert emb["entity"].shape == (n, 4) and emb["relation"].shape == (r, 4)
        assert metrics[name]["best_valid_mrr"] is not None
    # a job that carried the triples (8 bytes per index) would grow by tens of kilobytes here
    assert abs(shipped["300"] - shipped["30"]) < 100, shipped
    assert shipped["300"] < 2000, shipped
    assert metrics["small"]["job_bytes"] == shipped["30"]
    assert metrics["large"]["job_bytes"] == shipped["300"]
