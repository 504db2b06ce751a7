"""KGE model I/O: every model (and TransE with L2-normalised entities) survives save -> load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from knowledge.models import build_model, load_model, model_spec, save_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs CUDA"))]
CASES = [("transe", {"p_norm": 1.0}), ("transe", {"p_norm": 1.0, "entity_norm": 2.0}),
         ("distmult", {}), ("complex", {}), ("rotate", {"margin": 9.0})]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}{k}" for n, k in CASES])
def test_save_load_roundtrip(tmp_path: Path, name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, 12, 3, 8, **kwargs).eval()
    save_model(tmp_path, model)
    again = load_model(tmp_path)
    assert type(again) is type(model) and model_spec(again) == model_spec(model)
    h, r, t = torch.randint(12, (20,)), torch.randint(3, (20,)), torch.randint(12, (20,))
    with torch.no_grad():
        torch.testing.assert_close(again(h, r, t), model(h, r, t), atol=0, rtol=0)
    assert not list(tmp_path.glob("*.pt"))  # JSON + safetensors only, no pickle


def test_entity_norm_changes_transe() -> None:
    torch.manual_seed(0)
    a = build_model("transe", 12, 3, 8, p_norm=1.0)
    torch.manual_seed(0)
    b = build_model("transe", 12, 3, 8, p_norm=1.0, entity_norm=2.0)
    h, r, t = torch.arange(12), torch.zeros(12, dtype=torch.long), torch.arange(12).flip(0)
    with torch.no_grad():
        assert not torch.allclose(a(h, r, t), b(h, r, t))
    with pytest.raises(ValueError, match="unknown KGE model 'transh'"):
        build_model("transh", 12, 3, 8)


def test_entity_norm_of_the_table_or_of_the_rows_is_the_same_model() -> None:
    """PyG's TransE (entities normalised inside the score): a batch gathering at least as many rows
    as the table has normalises the table first, a smaller one the gathered rows: the same scores
    and gradients either way."""
    torch.manual_seed(0)
    model = build_model("transe", 12, 3, 8, p_norm=1.0)
    g = torch.Generator().manual_seed(1)
    h, r, t = (torch.randint(n, (40,), generator=g) for n in (12, 3, 12))

    def scores_and_grad(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        s = torch.cat([model(h[i:i + batch], r[i:i + batch], t[i:i + batch]) for i in range(0, 40, batch)])
        s.square().sum().backward()
        return s.detach(), model.node_emb.weight.grad.clone()

    table_path = scores_and_grad(40)  # 2 x 40 gathered rows >= 12 entities
    rows_path = scores_and_grad(5)    # 2 x 5 < 12
    torch.testing.assert_close(table_path[0], rows_path[0])
    torch.testing.assert_close(table_path[1], rows_path[1])


def test_self_adversarial_loss_sees_gamma_minus_distance() -> None:
    """Sun et al. 2019's loss is on gamma - d: PyG's RotatE includes gamma, TransE's -d does not."""
    from knowledge.embed import kge_loss, score_shift

    assert score_shift("rotate", "self_adversarial", 9.0) == 0.0
    assert score_shift("transe", "self_adversarial", 9.0) == 9.0
    assert score_shift("transe", "margin", 9.0) == 0.0
    d_pos, d_neg = torch.tensor([2.0]), torch.tensor([[12.0, 15.0]])
    # A positive at distance 2, negatives at 12 and 15, gamma 9: well separated, so a loss near 0
    # on gamma - d; on -d the positive's score -2 alone would cost -log sigma(-2) = 2.13
    shifted = kge_loss("self_adversarial", 9.0 - d_pos, 9.0 - d_neg, 9.0, 1.0)
    raw = kge_loss("self_adversarial", -d_pos, -d_neg, 9.0, 1.0)
    assert shifted < 0.1 and raw > 1.0


def _chunk_rows(monkeypatch: pytest.MonkeyPatch, chunk_floats: int | None) -> None:
    """With ``chunk_floats``, the fused distances work in chunks of that many floats on CPU, as a
    large batch is computed (``None``: the batch as one chunk)."""
    if chunk_floats:
        monkeypatch.setattr("knowledge.models.CPU_CHUNK_FLOATS", chunk_floats)
        monkeypatch.setattr("knowledge.models.CPU_WHOLE_FLOATS", 0)


def _assert_same_scores_and_grads(model, got: Callable[[], torch.Tensor],
                                  want: Callable[[], torch.Tensor], weights: torch.Tensor) -> None:
    """``got()`` and ``want()`` give the same scores and the same gradients of ``weights . scores``
    in the TransE model's entity and relation tables."""
    tables = (model.node_emb.weight, model.rel_emb.weight)
    scores = []
    grads = []
    for fn in (got, want):
        model.zero_grad()
        scores.append(fn())
        (scores[-1] * weights).sum().backward()
        grads.append([w.grad.clone() for w in tables])
    torch.testing.assert_close(scores[0], scores[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("p", "q"), [(1.0, None), (2.0, None), (3.0, None), (1.0, 2.0), (2.0, 1.0)])
@pytest.mark.parametrize("rows", [40, 4], ids=["table-normalised", "rows-normalised"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_floats", [None, 24], ids=["one-chunk", "3-row-chunks"])
def test_transe_fused_distance_equals_autograd(p: float, q: float | None, rows: int, device: str,
                                               chunk_floats: int | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """stele's TransE (a hand-written backward for p = 1, 2) gives the scores and gradients of
    autograd over the textbook formulas: PyG's -||n_p(E[h]) + W[r] - n_p(E[t])||_p (q None), both
    when the batch normalises the whole table (12 entities, 2 x 40 rows) and when it normalises its
    rows; with projected entities (q given) -||E[h] + W[r] - E[t]||_p on the stored vectors. On
    CPU also in chunks of 3 rows (8 dims), the last one ragged, as a large batch is computed."""
    import torch.nn.functional as F

    _chunk_rows(monkeypatch, chunk_floats)
    torch.manual_seed(0)
    model = build_model("transe", 12, 3, 8, p_norm=p, entity_norm=q).to(device)
    g = torch.Generator().manual_seed(1)
    h, r, t = (torch.randint(n, (rows,), generator=g).to(device) for n in (12, 3, 12))
    weights = torch.randn(rows, generator=g).to(device)

    def reference() -> torch.Tensor:
        e, w = model.node_emb.weight, model.rel_emb.weight
        if q is None:
            return -(F.normalize(e[h], p=p, dim=-1) + w[r] - F.normalize(e[t], p=p, dim=-1)).norm(p=p, dim=-1)
        return -(e[h] + w[r] - e[t]).norm(p=p, dim=-1)

    _assert_same_scores_and_grads(model, lambda: model(h, r, t), reference, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_floats", [None, 24], ids=["one-chunk", "3-row-chunks"])
def test_rotate_fused_distance_equals_pyg(device: str, chunk_floats: int | None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """stele's RotatE (a hand-written backward) gives the scores and gradients of PyG's own
    RotatE forward on the same weights; on CPU also in chunks of 3 rows."""
    from torch_geometric.nn.kge import RotatE

    _chunk_rows(monkeypatch, chunk_floats)
    torch.manual_seed(0)
    model = build_model("rotate", 12, 3, 8, margin=9.0)
    ref = RotatE(12, 3, 8, margin=9.0)
    ref.load_state_dict(model.state_dict())
    model, ref = model.to(device), ref.to(device)
    g = torch.Generator().manual_seed(1)
    h, r, t = (torch.randint(n, (50,), generator=g).to(device) for n in (12, 3, 12))
    weights = torch.randn(50, generator=g).to(device)
    got, want = model(h, r, t), ref(h, r, t)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_projected_transe_keeps_entities_on_the_sphere() -> None:
    """TransE with ``entity_norm`` (PyKEEN's and the paper's model): entity vectors start on the
    unit q-sphere, leave it with an optimiser step and come back with ``apply_constraints``, which
    ``knowledge.embed.train_epoch`` calls after every step; the full-candidate scorer agrees."""
    from knowledge.embed import train_epoch
    from knowledge.scoring import score_tails

    torch.manual_seed(0)
    model = build_model("transe", 12, 3, 8, p_norm=1.0, entity_norm=2.0)
    norms = lambda: model.node_emb.weight.norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(norms(), torch.ones(12))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    triples = torch.tensor([[0, 0, 1], [2, 1, 3], [4, 2, 5], [6, 0, 7]])
    model(triples[:, 0], triples[:, 1], triples[:, 2]).sum().backward()
    opt.step()
    assert (norms() - 1).abs().max() > 1e-3                      # the step left the sphere
    model.apply_constraints()
    torch.testing.assert_close(norms(), torch.ones(12))
    train_epoch(model, opt, triples, torch.arange(4), batch_size=2, negatives=3, num_entities=12,
                head_prob=None, loss="margin", margin=1.0, temperature=1.0)
    torch.testing.assert_close(norms(), torch.ones(12))          # projected after every step
    with torch.no_grad():
        h, r = torch.tensor([0, 2]), torch.tensor([0, 1])
        want = torch.stack([model(h, r, torch.full((2,), e)) for e in range(12)], 1)
        torch.testing.assert_close(score_tails(model, h, r, exact=True), want)


def test_an_artifact_of_in_score_normalised_transe_loads_projected(tmp_path: Path) -> None:
    """An ``entity_norm`` TransE saved before projection existed (raw, non-unit entity vectors,
    normalised inside its score) loads with its entities projected: its scores are what its old
    forward computed."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model("transe", 12, 3, 8, p_norm=1.0, entity_norm=2.0)
    with torch.no_grad():
        model.node_emb.weight.mul_(3.0)                            # off the sphere, as old ones were
    save_model(tmp_path, model)
    again = load_model(tmp_path)
    h, r, t = torch.arange(12), torch.zeros(12, dtype=torch.long), torch.arange(12).flip(0)
    e, w = model.node_emb.weight, model.rel_emb.weight
    old_score = -(F.normalize(e[h], dim=-1) + w[r] - F.normalize(e[t], dim=-1)).norm(p=1, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(again(h, r, t), old_score)


@pytest.mark.parametrize(("p", "q"), [(1.0, None), (1.0, 2.0), (2.0, 2.0), (2.0, None)])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_floats", [None, 24], ids=["one-chunk", "3-row-chunks"])
def test_transe_scores_corruptions_as_their_triples(p: float, q: float | None, device: str,
                                                    chunk_floats: int | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``model(h, r, t, corruptions=(entities, new_head))`` (the fused per-positive distance for
    L1, the triples otherwise) gives the scores and gradients of scoring the positives followed by
    the triples the corruptions stand for, row ``B + i k + j`` for positive ``i``'s corruption ``j``,
    with the same entity on both sides of a triple, repeated entities and relations included."""
    from knowledge.embed import draw_corruptions
    from knowledge.models import corruption_triples

    _chunk_rows(monkeypatch, chunk_floats)
    torch.manual_seed(0)
    model = build_model("transe", 12, 3, 8, p_norm=p, entity_norm=q).to(device)
    g = torch.Generator().manual_seed(2)
    pos = torch.stack([torch.randint(n, (6,), generator=g) for n in (12, 3, 12)], 1).to(device)
    pos[0, 2] = pos[0, 0]                                                   # h == t
    torch.manual_seed(3)
    drawn = draw_corruptions(pos, 5, 12, torch.tensor([0.2, 0.5, 0.9], device=device))
    assert drawn[1].any() and not drawn[1].all()                           # both sides corrupted
    weights = torch.randn(6 * 6, generator=g).to(device)

    batch = torch.cat([pos, corruption_triples(pos, *drawn)])
    _assert_same_scores_and_grads(
        model, lambda: model(pos[:, 0], pos[:, 1], pos[:, 2], corruptions=drawn),
        lambda: model(batch[:, 0], batch[:, 1], batch[:, 2]), weights)


def test_corruption_triples_layout() -> None:
    from knowledge.models import corruption_triples

    pos = torch.tensor([[0, 0, 1], [2, 1, 3]])
    entities = torch.tensor([[7, 8], [9, 5]])
    new_head = torch.tensor([[True, False], [False, True]])
    assert corruption_triples(pos, entities, new_head).tolist() == [
        [7, 0, 1], [0, 0, 8], [2, 1, 9], [5, 1, 3]]
