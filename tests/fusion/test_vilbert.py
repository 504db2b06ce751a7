"""ViLBERT (fusion/vilbert.py): co-attention placement, shapes, the 5-d locations and the IMG token,
padding masks, masking rates, training, and the MiniLM text stream against the plain backbone."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fusion.models.backbone import load_backbone, random_backbone
from fusion.models.objectives import IGNORE
from fusion.models.regions import collate, collate_media, location_features
from fusion.models.vilbert import MINILM_CONFIG, ViLBert, ViLBertConfig

from .cuda_checks import check_dropout_step_on_cuda, check_on_cuda, needs_cuda

FEAT = 16
TEXTS = ["a dog in the city", "the cat was born in paris", "red and blue art", "music in berlin now"]


# The paper's base model (reference config/bert_base_6layer_6conect.json): BERT-base text stream,
# 6 visual layers at 1024, co-attention at 1024 with 8 heads, connections before text layers 6..11,
# Faster R-CNN features (2048-d) and Visual Genome's 1600 classes + background.
PAPER_CONFIG = ViLBertConfig(
    feature_dim=2048, visual_hidden_size=1024, visual_heads=8, visual_intermediate_size=1024,
    coattention_hidden_size=1024, coattention_heads=8, visual_layers=6,
    t_biattention_id=(6, 7, 8, 9, 10, 11), v_biattention_id=(0, 1, 2, 3, 4, 5),
    num_region_classes=1601)


TINY_CONFIG = ViLBertConfig(
    feature_dim=16, visual_hidden_size=32, visual_heads=2, visual_intermediate_size=64,
    coattention_hidden_size=32, coattention_heads=2, visual_layers=1,
    t_biattention_id=(1,), v_biattention_id=(0,))


def vilbert_tiny(tokenizer, **config) -> ViLBert:
    """A random 2-layer BERT (hidden 32), one connection before text layer 1, one visual layer
    (32), 16-d features."""
    backbone = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, max_position=128)
    return ViLBert(backbone, replace(TINY_CONFIG, **config))


def se_bound(count: int, n: int, p: float, k: float = 3.0) -> bool:
    """``count / n`` within ``k`` standard errors of ``p``."""
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


def media(n_regions=(3, 5, 2, 4), dim=FEAT, seed=0):
    """FeatureSet-style items: float16 features (R, dim) and normalised boxes (R, 4)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for r in n_regions:
        xy = torch.rand(r, 2, generator=g) * 0.5
        wh = torch.rand(r, 2, generator=g) * 0.5
        items.append((torch.randn(r, dim, generator=g).half(), torch.cat([xy, xy + wh], 1)))
    return items


def batch_of(tokenizer, **kw):
    return collate(TEXTS, media(**kw), tokenizer, max_length=32)


def tiny(tokenizer, **config) -> ViLBert:
    torch.manual_seed(0)
    return vilbert_tiny(tokenizer, **config).eval()


def small_visual(cfg: ViLBertConfig, **kw) -> ViLBertConfig:
    """The same placement at test widths."""
    return replace(cfg, feature_dim=8, visual_hidden_size=16, visual_heads=2, visual_intermediate_size=32,
                   coattention_hidden_size=16, coattention_heads=2, num_region_classes=None, **kw)


# ---------------------------------------------------------------------------------------------
# co-attention placement


def run_order(model: ViLBert, tokenizer) -> list[tuple[str, int]]:
    """The layers in the order they ran, recorded by forward hooks."""
    order: list[tuple[str, int]] = []
    hooks = []
    for kind, layers in (("text", model.text_layers), ("visual", model.visual_layers),
                         ("coattention", model.coattention_layers)):
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_hook(
                lambda *_, kind=kind, i=i: order.append((kind, i))))
    b = collate(TEXTS[:2], media((3, 2), dim=model.config.feature_dim), tokenizer)
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
    for h in hooks:
        h.remove()
    return order


def check_placement(order, t_ids, v_ids, n_text, n_visual):
    """Each stream runs its layers once, in order, and co-attention k runs after exactly the first
    t_ids[k] text layers and the first v_ids[k] visual layers."""
    assert [i for k, i in order if k == "text"] == list(range(n_text))
    assert [i for k, i in order if k == "visual"] == list(range(n_visual))
    assert [i for k, i in order if k == "coattention"] == list(range(len(t_ids)))
    for k, (t, v) in enumerate(zip(t_ids, v_ids)):
        before = order[:order.index(("coattention", k))]
        assert sorted(i for kind, i in before if kind == "text") == list(range(t)), k
        assert sorted(i for kind, i in before if kind == "visual") == list(range(v)), k


def stream(order, kind):
    """One stream's view of the run: ``T3`` text layer 3, ``V0`` visual layer 0, ``C1`` co-attention 1."""
    names = {"text": "T", "visual": "V", "coattention": "C"}
    return [f"{names[k]}{i}" for k, i in order if k in (kind, "coattention")]


def test_paper_placement(tokenizer):
    """The reference's bert_base_6layer_6conect: 12 text, 6 visual, t = 6..11, v = 0..5, at 1024."""
    c = PAPER_CONFIG
    assert c.t_biattention_id == (6, 7, 8, 9, 10, 11) and c.v_biattention_id == (0, 1, 2, 3, 4, 5)
    assert (c.visual_layers, c.visual_hidden_size, c.coattention_hidden_size, c.coattention_heads,
            c.visual_heads, c.visual_intermediate_size, c.feature_dim, c.num_region_classes) == \
        (6, 1024, 1024, 8, 8, 1024, 2048, 1601)
    # the same placement at tiny widths over a random 12-layer BERT
    twelve = random_backbone(tokenizer, hidden_size=32, num_layers=12, num_heads=2, intermediate_size=64)
    model = ViLBert(twelve, small_visual(PAPER_CONFIG)).eval()
    order = run_order(model, tokenizer)
    check_placement(order, c.t_biattention_id, c.v_biattention_id, 12, 6)
    # the paper's Fig. 1: six plain text layers, then (Co-TRM, TRM) blocks in both streams
    assert stream(order, "text") == ["T0", "T1", "T2", "T3", "T4", "T5", "C0", "T6", "C1", "T7", "C2",
                                     "T8", "C3", "T9", "C4", "T10", "C5", "T11"]
    assert stream(order, "visual") == ["C0", "V0", "C1", "V1", "C2", "V2", "C3", "V3", "C4", "V4",
                                       "C5", "V5"]
    assert order == model.config.schedule()


def test_minilm_placement_and_defaults(tokenizer):
    assert MINILM_CONFIG.t_biattention_id == (3, 4, 5) and MINILM_CONFIG.v_biattention_id == (0, 1, 2)
    six = random_backbone(tokenizer, hidden_size=32, num_layers=6, num_heads=2, intermediate_size=64)
    model = ViLBert(six, small_visual(MINILM_CONFIG)).eval()
    order = run_order(model, tokenizer)
    check_placement(order, (3, 4, 5), (0, 1, 2), 6, 3)
    assert stream(order, "text") == ["T0", "T1", "T2", "C0", "T3", "C1", "T4", "C2", "T5"]
    # None placements resolve to the same pattern: the last half of the text layers
    cfg = ViLBertConfig(feature_dim=8).resolve(six)
    assert (cfg.t_biattention_id, cfg.v_biattention_id, cfg.visual_layers) == ((3, 4, 5), (0, 1, 2), 3)
    cfg = ViLBertConfig(feature_dim=8).resolve(random_backbone(tokenizer, num_layers=12))
    assert (cfg.t_biattention_id, cfg.v_biattention_id) == (PAPER_CONFIG.t_biattention_id,
                                                            PAPER_CONFIG.v_biattention_id)


def test_irregular_placement_runs_as_configured(tokenizer):
    four = random_backbone(tokenizer, num_layers=4)
    cfg = small_visual(ViLBertConfig(), t_biattention_id=(0, 2, 2), v_biattention_id=(1, 1, 3),
                       visual_layers=4)
    order = run_order(ViLBert(four, cfg).eval(), tokenizer)
    check_placement(order, (0, 2, 2), (1, 1, 3), 4, 4)


@pytest.mark.parametrize("bad, match", [
    (dict(t_biattention_id=(1,), v_biattention_id=(0, 0)), "one entry per connection"),
    (dict(t_biattention_id=(2, 1), v_biattention_id=(0, 1), visual_layers=2), "must not decrease"),
    (dict(t_biattention_id=(3,), v_biattention_id=(0,)), "0..2"),
    (dict(t_biattention_id=(1,), v_biattention_id=(2,), visual_layers=1), "0..1"),
    (dict(visual_hidden_size=30, visual_heads=4), "multiple"),
    (dict(feature_dim=None), "feature_dim"),
])
def test_config_checks(backbone, bad, match):
    with pytest.raises(ValueError, match=match):
        ViLBert(backbone, replace(ViLBertConfig(feature_dim=8), **bad))


# ---------------------------------------------------------------------------------------------
# inputs: locations, IMG token, padding


def test_location_features():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0],        # whole image
                          [0.1, 0.2, 0.5, 0.7],        # 0.4 x 0.5
                          [0.25, 0.0, 0.5, 1.0],       # an audio frame: (t0/T, 0, t1/T, 1)
                          [0.3, 0.3, 0.3, 0.6]])       # degenerate: no area
    want = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.7, 0.2],
                         [0.25, 0.0, 0.5, 1.0, 0.25], [0.3, 0.3, 0.3, 0.6, 0.0]])
    torch.testing.assert_close(location_features(boxes), want)
    assert location_features(torch.rand(2, 3, 4)).shape == (2, 3, 5)


def test_img_token_added(tokenizer):
    model = tiny(tokenizer)
    b = batch_of(tokenizer)
    emb = model.visual_embeddings
    feats, boxes, mask = emb.inputs(b["features"], b["boxes"], b["region_mask"])
    R = b["features"].shape[1]
    assert feats.shape == (4, R + 1, FEAT) and mask[:, 0].all()
    torch.testing.assert_close(mask[:, 1:], b["region_mask"].bool())
    for i, (f, _) in enumerate(media()):                       # the mean of the real regions only
        torch.testing.assert_close(feats[i, 0], f.float().mean(0))
    assert (boxes[:, 0] == torch.tensor([0.0, 0.0, 1.0, 1.0])).all()
    with torch.no_grad():
        e, _ = emb(b["features"], b["boxes"], b["region_mask"])
        want = emb.norm(emb.feature(feats[:, 0]) + emb.location(torch.tensor([0.0, 0, 1, 1, 1])))
    torch.testing.assert_close(e[:, 0], want)
    out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
    assert out.visual_hidden.shape[1] == R + 1


def test_img_token_given(tokenizer):
    """With add_img_token=False, region 0 is the IMG: no extra position, never masked."""
    model = tiny(tokenizer, add_img_token=False)
    b = batch_of(tokenizer)
    R = b["features"].shape[1]
    feats, boxes, mask = model.visual_embeddings.inputs(b["features"], b["boxes"], b["region_mask"])
    pad = ~b["region_mask"].bool()
    torch.testing.assert_close(feats, b["features"].float().masked_fill(pad[..., None], 0))
    out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
    assert out.visual_hidden.shape == (4, R, 32)
    big = {k: v.repeat(100, *[1] * (v.dim() - 1)) for k, v in b.items()}        # 400 items
    c = model.corrupt(big, torch.Generator().manual_seed(0))
    assert not c["region_chosen"][:, 0].any() and c["region_chosen"].any()


def test_padding_does_not_leak(tokenizer):
    """Changing what padded regions (and padded tokens) hold leaves every real output unchanged."""
    for add in (True, False):
        model = tiny(tokenizer, add_img_token=add)
        b = batch_of(tokenizer)
        pad = ~b["region_mask"].bool()
        assert pad.any()
        b2 = dict(b)
        b2["features"] = b["features"].masked_fill(pad[..., None], 7.0)
        b2["features"][0, -1] = float("nan")                   # item 0 has 3 of 5 regions
        b2["boxes"] = b["boxes"].masked_fill(pad[..., None], 0.9)
        b2["boxes"][0, -1, 0] = float("nan")
        tpad = ~b["attention_mask"].bool()
        b2["input_ids"] = b["input_ids"].masked_fill(tpad, tokenizer.convert_tokens_to_ids("dog"))
        with torch.no_grad():
            o1 = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
            o2 = model(b2["input_ids"], b2["attention_mask"], b2["features"], b2["boxes"], b2["region_mask"])
        real_v, real_t = o1.visual_mask, b["attention_mask"].bool()
        torch.testing.assert_close(o1.visual_hidden[real_v], o2.visual_hidden[real_v], atol=1e-5, rtol=0)
        torch.testing.assert_close(o1.text_hidden[real_t], o2.text_hidden[real_t], atol=1e-5, rtol=0)
        torch.testing.assert_close(o1.pooled_visual, o2.pooled_visual, atol=1e-5, rtol=0)
        torch.testing.assert_close(o1.pooled_text, o2.pooled_text, atol=1e-5, rtol=0)
        # and the real regions do matter (else the test above proves nothing)
        b3 = dict(b, features=b["features"].masked_fill(b["region_mask"].bool()[..., None], 1.0))
        with torch.no_grad():
            o3 = model(b3["input_ids"], b3["attention_mask"], b3["features"], b3["boxes"], b3["region_mask"])
        assert (o3.pooled_text - o1.pooled_text).abs().max() > 1e-4


def test_collate_media():
    items = media((3, 0, 2))
    m = collate_media(items)
    assert m["features"].shape == (3, 3, FEAT) and m["features"].dtype == torch.float16
    assert m["boxes"].shape == (3, 3, 4) and m["region_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0]]
    torch.testing.assert_close(m["features"][2, :2], items[2][0])
    assert collate_media([], feature_dim=FEAT)["features"].shape == (0, 0, FEAT)


# ---------------------------------------------------------------------------------------------
# shapes


def test_output_shapes(tokenizer):
    model = tiny(tokenizer, num_region_classes=5)
    b = batch_of(tokenizer)
    B, L = b["input_ids"].shape
    R = b["features"].shape[1]
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
    assert out.text_hidden.shape == (B, L, 32) and out.visual_hidden.shape == (B, R + 1, 32)
    assert out.pooled_text.shape == (B, 32) and out.pooled_visual.shape == (B, 32)
    assert out.visual_mask.shape == (B, R + 1) and out.visual_mask.dtype == torch.bool
    assert len(out.text_states) == 3 and all(s.shape == (B, L, 32) for s in out.text_states)
    assert len(out.visual_states) == 2 and all(s.shape == (B, R + 1, 32) for s in out.visual_states)
    with torch.no_grad():
        assert model.match_score(b, b).shape == (B,)
        t, v = model.encode_text(b), model.encode_media(b)
    assert t.shape == (B, 32) and v.shape == (B, 32)
    c = model.corrupt(b, torch.Generator().manual_seed(0))
    assert c["input_ids"].shape == (B, L) and c["mlm_labels"].shape == (B, L)
    assert c["features"].shape == b["features"].shape and c["region_chosen"].shape == (B, R)
    assert c["matched"].shape == (B,) and c["text_index"].shape == (B,)
    b["region_classes"] = torch.softmax(torch.randn(B, R, 5), -1)
    losses = model.loss(b, torch.Generator().manual_seed(0))
    assert set(losses) == {"mlm", "region_feature", "region_class", "align", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert "parameters=" in repr(model) and "t_biattention_id=[1]" in repr(model)


def test_retrieval_scores_agree_with_the_head(tokenizer):
    model = tiny(tokenizer)
    b = batch_of(tokenizer)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
        want = model.align((out.pooled_text * out.pooled_visual)).squeeze(-1)
        torch.testing.assert_close(model.match_score(b, b), want)
        # the dual-encoder vectors: their dot product (+ bias) is the head without co-attention
        t_states = model.text_stream(b["input_ids"], b["attention_mask"])
        v, _ = model.visual_stream(b["features"], b["boxes"], b["region_mask"])
        pt = torch.relu(model.text_pooler(t_states[-1][:, 0]))
        pv = torch.relu(model.visual_pooler(v[:, 0]))
        single = model.align(pt[:, None] * pv[None]).squeeze(-1)                 # (B, B)
        dual = model.encode_text(b) @ model.encode_media(b).T + model.align.bias
    torch.testing.assert_close(dual, single, atol=1e-6, rtol=1e-5)
    # the single-stream text vector does not depend on the media, the cross-encoder's does
    b2 = dict(b, features=torch.randn_like(b["features"].float()).half())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(b), model.encode_text({**b2}))
        assert (model.match_score(b, b2) - model.match_score(b, b)).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# masking rates


def test_word_and_region_masking_rates(tokenizer):
    model = tiny(tokenizer)
    B, L, R, word = 400, 100, 40, tokenizer.convert_tokens_to_ids("dog")
    ids = torch.full((B, L), word)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[:, 90:] = 0
    special = torch.zeros(B, L, dtype=torch.long)
    special[:, 0] = special[:, 89] = 1
    special[:, 90:] = 1
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, R, FEAT, generator=g).abs() + 0.1                   # never 0 by chance
    region_mask = (torch.arange(R) < torch.randint(5, R + 1, (B, 1), generator=g)).long()
    batch = {"input_ids": ids, "attention_mask": attn, "special_tokens_mask": special,
             "features": features, "boxes": torch.rand(B, R, 4), "region_mask": region_mask}
    c = model.corrupt(batch, torch.Generator().manual_seed(1))

    maskable = attn.bool() & ~special.bool()
    chosen = c["mlm_labels"] != IGNORE
    assert not chosen[~maskable].any() and (c["mlm_labels"][chosen] == word).all()
    n, k = int(maskable.sum()), int(chosen.sum())
    assert se_bound(k, n, 0.15)
    V = model.config.vocab_size
    assert se_bound(int((c["input_ids"][chosen] == tokenizer.mask_token_id).sum()), k, 0.8 + 0.1 / V)

    rc = c["region_chosen"]
    real = region_mask.bool()
    assert not rc[~real].any()
    nr, kr = int(real.sum()), int(rc.sum())
    assert se_bound(kr, nr, 0.15)
    zeroed = (c["features"] == 0).all(-1)
    assert not zeroed[~rc].any()                                                   # only chosen ones
    assert se_bound(int(zeroed.sum()), kr, 0.9)                                    # 90% zeroed, 10% kept
    torch.testing.assert_close(c["features"][rc & ~zeroed], features[rc & ~zeroed])


def test_half_of_the_captions_are_mismatched(tokenizer):
    model = tiny(tokenizer)
    B = 16
    ids = torch.arange(B)[:, None].expand(B, 6) + 5                               # row i "says" i
    batch = {"input_ids": ids.clone(), "attention_mask": torch.ones(B, 6, dtype=torch.long),
             "features": torch.randn(B, 3, FEAT), "boxes": torch.rand(B, 3, 4)}
    g = torch.Generator().manual_seed(0)
    mismatched = 0
    for _ in range(200):
        c = model.corrupt(batch, g)
        idx, matched = c["text_index"], c["matched"]
        assert (idx[matched] == torch.arange(B)[matched]).all()
        assert (idx[~matched] != torch.arange(B)[~matched]).all()                  # never its own
        # the tokens follow the caption: every MLM target is the swapped-in row's word
        assert ((c["mlm_labels"] == IGNORE) | (c["mlm_labels"] == idx[:, None] + 5)).all()
        mismatched += int((~matched).sum())
    assert se_bound(mismatched, 200 * B, 0.5)
    one = {k: v[:1] for k, v in batch.items()}
    assert model.corrupt(one, g)["matched"].all()                                  # nothing to swap with


def test_masked_losses_count_matched_pairs_only(tokenizer):
    """A batch where every pair is mismatched has no masked-modelling target (by default)."""
    b = batch_of(tokenizer)
    model = tiny(tokenizer, mismatch_prob=1.0)
    losses = model.loss(b, torch.Generator().manual_seed(0))
    assert float(losses["mlm"].detach()) == 0.0 and float(losses["region_feature"].detach()) == 0.0
    assert float(losses["align"].detach()) > 0
    losses["total"].backward()
    model = tiny(tokenizer, mismatch_prob=1.0, masked_loss_on_mismatched=True, region_prob=0.5)
    losses = model.loss(b, torch.Generator().manual_seed(0))
    assert float(losses["mlm"].detach()) > 0 and float(losses["region_feature"].detach()) > 0


def test_region_class_contract(tokenizer):
    b = batch_of(tokenizer)
    with pytest.raises(ValueError, match="no class head"):
        tiny(tokenizer).loss({**b, "region_classes": torch.ones(4, 5, 3) / 3})
    with pytest.raises(ValueError, match="no region_classes"):
        tiny(tokenizer, num_region_classes=3).loss(b)
    with pytest.raises(ValueError, match="feature_dim=16"):
        tiny(tokenizer).encode_media({**b, "features": torch.zeros(4, 5, 8)})


# ---------------------------------------------------------------------------------------------
# training


def mean_losses(model, batch, seeds=range(6)):
    model.eval()
    with torch.no_grad():
        ls = [model.loss(batch, torch.Generator().manual_seed(s)) for s in seeds]
    return {k: sum(float(x[k]) for x in ls) / len(ls) for k in ls[0]}


def test_training_reduces_the_loss(tokenizer):
    torch.manual_seed(0)
    model = vilbert_tiny(tokenizer, num_region_classes=4, contrastive_weight=1.0)
    b = batch_of(tokenizer)
    b["region_classes"] = torch.softmax(3 * torch.randn(4, b["features"].shape[1], 4), -1)
    before = mean_losses(model, b)
    assert set(before) == {"mlm", "region_feature", "region_class", "align", "contrastive", "total"}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        model.loss(b, g)["total"].backward()
        opt.step()
    after = mean_losses(model, b)
    assert after["total"] < before["total"], (before, after)
    assert after["mlm"] < before["mlm"], (before, after)
    assert after["region_feature"] < before["region_feature"], (before, after)


# ---------------------------------------------------------------------------------------------
# backbone reuse, MiniLM


def test_backbone_weights_kept_and_copied(backbone, tokenizer):
    model = ViLBert(backbone, ViLBertConfig(feature_dim=8))
    q = model.text_layers[1].attention.self.query.weight
    torch.testing.assert_close(q, backbone.model.encoder.layer[1].attention.self.query.weight)
    assert q is not backbone.model.encoder.layer[1].attention.self.query.weight
    assert model.mlm.word_embeddings.weight is model.embeddings.word_embeddings.weight   # tied


def test_text_stream_is_the_backbone_before_the_first_connection(backbone, tokenizer):
    model = ViLBert(backbone, ViLBertConfig(feature_dim=FEAT)).eval()            # t = (1,)
    b = batch_of(tokenizer)
    with torch.no_grad():
        want = backbone.model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     output_hidden_states=True).hidden_states
        out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
        alone = model.text_stream(b["input_ids"], b["attention_mask"])
    real = b["attention_mask"].bool()
    for i in range(2):
        torch.testing.assert_close(out.text_states[i][real], want[i][real], atol=1e-5, rtol=0)
    assert (out.text_states[2][real] - want[2][real]).abs().max() > 1e-3          # co-attention acted
    for i in range(3):
        torch.testing.assert_close(alone[i][real], want[i][real], atol=1e-5, rtol=0)


def test_minilm_variant(minilm_path):
    model = ViLBert(load_backbone(str(minilm_path)), replace(MINILM_CONFIG, feature_dim=FEAT)).eval()
    c = model.config
    assert (c.hidden_size, c.num_layers, c.visual_hidden_size, c.visual_layers) == (384, 6, 512, 3)
    assert c.t_biattention_id == (3, 4, 5) and c.v_biattention_id == (0, 1, 2)
    plain = load_backbone(str(minilm_path))
    b = collate(["Tim Cook is visiting Beijing now", "a red dog"], media((4, 2)), plain.tokenizer)
    with torch.no_grad():
        want = plain.model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  output_hidden_states=True).hidden_states
        out = model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])
        alone = model.text_stream(b["input_ids"], b["attention_mask"])
    real = b["attention_mask"].bool()
    for i in range(4):                        # embeddings and layers 0..2: before the first connection
        torch.testing.assert_close(out.text_states[i][real], want[i][real], atol=1e-5, rtol=0)
    assert (out.text_states[4][real] - want[4][real]).abs().max() > 1e-3
    for i in range(7):                        # without co-attention, the whole of MiniLM
        torch.testing.assert_close(alone[i][real], want[i][real], atol=1e-5, rtol=0)
    losses = model.loss(b, torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["total"])


# ---------------------------------------------------------------------------------------------
# GPU


@needs_cuda
def test_cuda_outputs_equal_cpu_and_bf16_trains(tokenizer):
    b = batch_of(tokenizer)
    b["region_classes"] = torch.softmax(torch.randn(len(TEXTS), b["features"].shape[1], 5), -1)

    def outputs(model, x):
        out = model(x["input_ids"], x["attention_mask"], x["features"], x["boxes"], x["region_mask"])
        return {"text_hidden": out.text_hidden, "visual_hidden": out.visual_hidden,
                "pooled_text": out.pooled_text, "pooled_visual": out.pooled_visual}

    check_on_cuda(tiny(tokenizer, num_region_classes=5), b, outputs)
    check_dropout_step_on_cuda(tiny(tokenizer, num_region_classes=5, contrastive_weight=0.5).train(), b)
