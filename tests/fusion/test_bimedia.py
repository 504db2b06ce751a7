"""LXMERT over two media streams (spoken captions <-> images): the split scoring equals the full
cross encoder, the objectives switch off cleanly, media-query pairs are counted, and the
``media_lxmert`` recipe trains and retrieves through ``fusion.pretrain`` and ``fusion.retrieval``."""

from __future__ import annotations


import pytest
import torch

from fusion.models.bimedia import BiMedia, BiMediaConfig, dual_config
from fusion.pairs import load_media_pairs

from .conftest import make_query_artifact, run_pretrain

TINY = dict(query_feat_dim=12, media_feat_dim=16, hidden_size=32, num_heads=2, intermediate_size=64,
            q_layers=1, r_layers=1, x_layers=1, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    return make_query_artifact(tmp_path_factory.mktemp("queries"))


def _batch(queries, feature_artifact):
    bank, caps, _ = load_media_pairs(queries, feature_artifact)
    q = caps.bank.batch(range(6))
    return {"query_features": q["features"], "query_boxes": q["boxes"], "query_mask": q["region_mask"],
            **bank.batch(caps.media[:6])}


def test_media_queries_pair_by_base_id_and_count_the_rest(queries, feature_artifact):
    bank, caps, counts = load_media_pairs(queries, feature_artifact)
    assert len(caps.ids) == 84 and caps.bank is not None and len(caps.bank) == 84
    assert all(caps.ids[i].split("#")[0] == bank.ids[m] for i, m in enumerate(caps.media))
    assert caps.texts[0] == "the red dog"
    assert counts["queries_without_base_id"] == 1 and counts["queries_for_unknown_media"] == 1
    test_bank, test_caps, c = load_media_pairs(queries, feature_artifact, "test", 0.25, 0)
    assert {test_bank.ids[m] for m in test_caps.media} == set(test_bank.ids)   # held out together
    assert c["queries_of_other_split"] == 84 - len(test_caps.ids)


def test_split_scoring_equals_the_full_cross_encoder(queries, feature_artifact):
    torch.manual_seed(0)
    model = BiMedia(BiMediaConfig(**TINY)).eval()
    b = _batch(queries, feature_artifact)
    q = {k: b[k] for k in ("query_features", "query_boxes", "query_mask")}
    m = {k: b[k] for k in ("features", "boxes", "region_mask")}
    with torch.no_grad():
        full = model.match_score(q, m)
        split = model.score_states(model.text_states(q), model.media_states(m))
    torch.testing.assert_close(split, full)
    assert model.encode_text(q).shape == (6, 32) and torch.allclose(model.encode_text(q).norm(dim=-1),
                                                                     torch.ones(6))


def test_loss_objectives_and_the_dual_encoder(queries, feature_artifact):
    b = _batch(queries, feature_artifact)
    torch.manual_seed(0)
    full = BiMedia(BiMediaConfig(**TINY))
    losses = full.loss(b, torch.Generator().manual_seed(0))
    assert set(losses) == {"itm", "contrastive", "region_feat", "total"}
    losses["total"].backward()
    assert full.query_embedding.feat.weight.grad.abs().sum() > 0
    dual = BiMedia(dual_config(BiMediaConfig(**TINY)))
    assert len(dual.x_layers) == 0 and not dual.has_match_head
    assert set(dual.loss(b)) == {"contrastive", "total"}


@pytest.mark.slow
def test_media_lxmert_trains_and_retrieves(ray_local, tmp_path, queries, feature_artifact, backbone_dir):
    from fusion.retrieval.stage import RetrievalParams, evaluate
    config = {k: v for k, v in TINY.items() if not k.endswith("feat_dim")} | {"initializer_range": 0.2}
    metrics, out = run_pretrain(tmp_path, "model", {"media": feature_artifact, "query_media": queries}, {
        "recipe": "media_lxmert", "backbone": str(backbone_dir), "steps": 300, "batch_size": 8, "lr": 3e-3,
        "warmup_steps": 5, "checkpoint_every": 1000, "options": {"held_out_share": 0.25,
                                                                  "config": config}})
    assert metrics["loss_contrastive_last10"] < 0.5 * metrics["loss_contrastive_first"]
    assert metrics["queries"] > 0 and metrics["queries_without_base_id"] == 1
    m = evaluate(out, feature_artifact, tmp_path / "eval", RetrievalParams(mode="rerank", k=5, split="all"),
                 queries_dir=queries)
    assert m["captions"] == 84 and m["media"] == 42
    assert m["text_to_media_R@1"] > 100 * 5 / 42, m      # chance is 1/42
    from pipeline import StageFailed

    with pytest.raises(StageFailed, match="media queries"):
        evaluate(out, feature_artifact, tmp_path / "e2", RetrievalParams(mode="dual"))
