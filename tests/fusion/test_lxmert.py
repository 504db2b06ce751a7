"""LXMERT: numerical equivalence with transformers' independent implementation, masks, objectives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from fusion.models.hf_weights import config_from_hf, from_hf, load_hf_lxmert_state
from fusion.models.layers import Attention, key_mask
from fusion.models.hf_weights import lxmert_backbone
from fusion.models.lxmert import Lxmert, LxmertConfig
from fusion.models.objectives import IGNORE, hard_negative_pairs, info_nce, itm_pairs
from fusion.models.regions import collate_regions

from .cuda_checks import check_dropout_step_on_cuda, check_on_cuda, needs_cuda

ATOL = 1e-5
HF_SIZES = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=2,
                x_layers=2, r_layers=2, visual_feat_dim=16, num_object_labels=7, num_attr_labels=5,
                num_qa_labels=3)


def lxmert_tiny(tokenizer=None, **config) -> Lxmert:
    """Hidden 32, 2 heads, 2/2/2 layers, 16-d features; vocabulary and [MASK] from ``tokenizer``
    when given."""
    sizes = dict(vocab_size=100, hidden_size=32, num_heads=2, intermediate_size=64, l_layers=2,
                 r_layers=2, x_layers=2, visual_feat_dim=16, max_position=128, mask_token_id=4)
    if tokenizer is not None:
        sizes |= dict(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return Lxmert(LxmertConfig(**(sizes | config)))


def inputs(B: int = 3, L: int = 7, R: int = 5, feat: int = 16, vocab: int = 100, seed: int = 0) -> dict:
    """A batch with padded text (items 1, 2) and padded regions (item 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    ids[:, 0] = 2                                   # [CLS]
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 4:] = 0
    attn[2, L - 1:] = 0
    ids[attn == 0] = 0
    region_mask = torch.ones(B, R, dtype=torch.long)
    region_mask[0, 3:] = 0
    return {"input_ids": ids, "attention_mask": attn,
            "features": torch.randn(B, R, feat, generator=g).relu().half(),
            "boxes": torch.rand(B, R, 2, 2, generator=g).sort(2).values.reshape(B, R, 4),
            "region_mask": region_mask}


def run(model: Lxmert, b: dict):
    return model(b["input_ids"], b["attention_mask"], b["features"], b["boxes"], b["region_mask"])


def hf_run(hf, b: dict):
    return hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              visual_feats=b["features"].float(),
              visual_pos=b["boxes"], visual_attention_mask=b["region_mask"])


# ------------------------------------------------------------------------------ equivalence


@torch.no_grad()
def test_equals_transformers_lxmert_model():
    torch.manual_seed(0)
    hf = transformers.LxmertModel(transformers.LxmertConfig(**HF_SIZES)).eval()
    model = from_hf(hf).eval()
    b = inputs()
    want, got = hf_run(hf, b), run(model, b)
    errors = {name: (getattr(want, name) - getattr(got, name)).abs().max().item()
              for name in ("language_output", "vision_output", "pooled_output")}
    assert max(errors.values()) < ATOL, errors
    # one shared cross-attention per layer in both (as many parameters as the reference's XLayer)
    assert (sum(p.numel() for p in model.x_layers[0].parameters())
            == sum(p.numel() for p in hf.encoder.x_layers[0].parameters()))


@torch.no_grad()
def test_equals_transformers_pretraining_heads():
    """LxmertForPreTraining: the MLM logits, the region feature regression and the match score
    (the reference's 2-way logit difference) come out the same."""
    torch.manual_seed(1)
    hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(**HF_SIZES)).eval()
    model = from_hf(hf).eval()
    b = inputs(seed=3)
    want = hf_run(hf, b)
    out = run(model, b)
    assert (want.prediction_logits - model.mlm_head(out.language_output)).abs().max() < ATOL
    diff = want.cross_relationship_score[:, 1] - want.cross_relationship_score[:, 0]
    assert (diff - model.itm(out.pooled_output).squeeze(-1)).abs().max() < ATOL
    assert (diff - model.match_score(b, b)).abs().max() < ATOL
    hf_feat = hf.obj_predict_head(hf_run(hf.lxmert, b).vision_output)["feat"]
    mine = model.region_feat(model.region_transform(out.vision_output))
    assert (hf_feat - mine).abs().max() < ATOL
    # the tied decoder is the word-embedding table in both
    assert model.mlm_head.word_embeddings.weight is model.embeddings.word.weight


def test_key_map_covers_every_reference_parameter():
    torch.manual_seed(0)
    hf = transformers.LxmertModel(transformers.LxmertConfig(**HF_SIZES))
    state = load_hf_lxmert_state(hf)
    # every reference tensor lands somewhere (query/key/value three-to-one)
    n_ref = sum(p.numel() for p in hf.parameters())
    assert sum(v.numel() for v in state.values()) == n_ref
    model = Lxmert(config_from_hf(hf.config))
    assert model.num_parameters(encoder_only=True) == n_ref
    # a reference with more layers than the model: the extra layer's keys are left over, not dropped
    bigger = transformers.LxmertModel(transformers.LxmertConfig(**{**HF_SIZES, "l_layers": 3}))
    _, unexpected = model.load_state_dict(load_hf_lxmert_state(bigger), strict=False)
    assert unexpected and all(k.startswith("l_layers.2.") for k in unexpected)


# ------------------------------------------------------------------------------ shapes and masks


def test_shapes_and_dual_encoder():
    model = lxmert_tiny(contrastive_dim=8).eval()
    b = inputs(B=4, L=6, R=9)
    out = run(model, b)
    assert out.language_output.shape == (4, 6, 32)
    assert out.vision_output.shape == (4, 9, 32)
    assert out.pooled_output.shape == (4, 32)
    assert out.text_single.shape == (4, 6, 32) and out.media_single.shape == (4, 9, 32)
    t = model.encode_text(b)
    m = model.encode_media(b)
    assert t.shape == m.shape == (4, 8)
    assert torch.allclose(t.norm(dim=-1), torch.ones(4)) and torch.allclose(m.norm(dim=-1), torch.ones(4))
    assert model.match_score(b, b).shape == (4,)
    assert "l_layers=2" in repr(model) and "parameters=" in repr(model)


@torch.no_grad()
def test_padding_changes_nothing():
    """Padded regions (item 0) and padded words (items 1, 2) are invisible to every real position."""
    model = lxmert_tiny().eval()
    b = inputs()
    out = run(model, b)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["features"][0, 3:] = 100.0
    b2["boxes"][0, 3:] = 0.5
    b2["input_ids"][1, 4:] = 17
    out2 = run(model, b2)
    real_t, real_r = b["attention_mask"].bool(), b["region_mask"].bool()
    assert torch.allclose(out.language_output[real_t], out2.language_output[real_t], atol=1e-6)
    assert torch.allclose(out.vision_output[real_r], out2.vision_output[real_r], atol=1e-6)
    assert torch.allclose(out.pooled_output, out2.pooled_output, atol=1e-6)
    assert torch.allclose(model.encode_media(b),
                          model.encode_media(b2), atol=1e-6)
    assert torch.allclose(model.encode_text(b),
                          model.encode_text(b2), atol=1e-6)


@torch.no_grad()
def test_item_without_regions_is_finite():
    model = lxmert_tiny().eval()
    b = inputs()
    b["region_mask"][1] = 0
    out = run(model, b)
    assert all(torch.isfinite(t).all() for t in out)


@torch.no_grad()
def test_attention_to_a_context_is_one_direction_of_both_ways():
    """``layers.Attention`` with a context (queries from x, keys and values from y) computes one
    half of LXMERT's shared cross-attention; the query/key/value layout with the same weights
    (ViLBERT's) computes the same, as cross- and as self-attention."""
    torch.manual_seed(0)
    att = Attention(32, 2).eval()
    x, y = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    xm, ym = torch.ones(3, 5, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)
    xm[1, 3:] = 0
    ym[0, 4:] = 0
    x_to_y, y_to_x = att.both_ways(x, key_mask(xm), y, key_mask(ym))
    torch.testing.assert_close(att(x, key_mask(ym), context=y), x_to_y, atol=1e-6, rtol=0)
    torch.testing.assert_close(att(y, key_mask(xm), context=x), y_to_x, atol=1e-6, rtol=0)
    split = Attention(32, 2, fused=False).eval()
    for name, w, b in zip(("query", "key", "value"), att.qkv.weight.chunk(3), att.qkv.bias.chunk(3)):
        getattr(split, name).weight.copy_(w)
        getattr(split, name).bias.copy_(b)
    split.out.load_state_dict(att.out.state_dict())
    split.norm.load_state_dict(att.norm.state_dict())
    torch.testing.assert_close(split(x, key_mask(ym), context=y), x_to_y, atol=1e-6, rtol=0)
    torch.testing.assert_close(split(x, key_mask(xm)), att(x, key_mask(xm)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="fused"):
        Attention(32, 2, context_dim=16)


def test_collate_regions():
    items = [(torch.randn(n, 16).numpy(), torch.rand(n, 4).numpy()) for n in (3, 5)]
    b = collate_regions(items)
    assert b["features"].shape == (2, 5, 16) and b["features"].dtype == torch.float16
    assert b["region_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert collate_regions(items, max_regions=4)["features"].shape == (2, 4, 16)


# ------------------------------------------------------------------------------ objectives


def big_batch(B: int = 64, L: int = 24, R: int = 36) -> dict:
    b = inputs(B=B, L=L, R=R, seed=5)
    g = torch.Generator().manual_seed(6)
    lengths = torch.randint(6, L + 1, (B,), generator=g)
    b["attention_mask"] = (torch.arange(L)[None] < lengths[:, None]).long()
    b["special_tokens_mask"] = torch.zeros(B, L, dtype=torch.long)
    b["special_tokens_mask"][:, 0] = 1
    b["special_tokens_mask"][torch.arange(B), lengths - 1] = 1
    n_reg = torch.randint(10, R + 1, (B,), generator=g)
    b["region_mask"] = (torch.arange(R)[None] < n_reg[:, None]).long()
    b["features"] = b["features"] + 0.5  # no all-zero row by chance: zero means masked below
    return b


def test_masking_rates():
    model = lxmert_tiny()
    b = big_batch()
    c = model.corrupt(b, torch.Generator().manual_seed(0))
    maskable = b["attention_mask"].bool() & ~b["special_tokens_mask"].bool()
    chosen_w = c.mlm_labels != IGNORE
    assert not (chosen_w & ~maskable).any()
    n = int(maskable.sum())
    rate = chosen_w.sum().item() / n
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n), rate
    real = b["region_mask"].bool()
    assert not (c.masked_regions & ~real).any()
    m = int(real.sum())
    r_rate = c.masked_regions.sum().item() / m
    assert abs(r_rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / m), r_rate
    assert (c.features[c.masked_regions] == 0).all()
    assert torch.equal(c.features[~c.masked_regions], b["features"][~c.masked_regions])
    # a global token is never masked
    model_g = lxmert_tiny(global_token=True)
    assert not model_g.corrupt(b, torch.Generator().manual_seed(0)).masked_regions[:, 0].any()


def test_itm_mismatch_rate():
    g = torch.Generator().manual_seed(0)
    idx, matched = zip(*(itm_pairs(16, g) for _ in range(200)))
    idx, matched = torch.stack(idx), torch.stack(matched)          # (200, 16)
    own = torch.arange(16)
    assert torch.equal(matched, idx == own)                        # mismatched = another item's text
    rate = 1 - matched.float().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / idx.numel()), rate
    i1, m1 = itm_pairs(1, g)
    assert i1.tolist() == [0] and m1.tolist() == [True]


def test_hard_negatives_follow_the_contrastive_similarity():
    # 4 items; media 0's most similar other text is 1 (cosine 0.8), then 2 (0.0), 3 (-1.0)
    t = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    m = t.clone()
    matched = torch.tensor([False, True, True, True])
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([hard_negative_pairs(t, m, matched, 5.0, g) for _ in range(2000)])
    assert (drawn[:, 1:] == torch.arange(1, 4)).all()             # matched items keep their text
    assert (drawn[:, 0] != 0).all()                                # a mismatch is never the own text
    share = torch.bincount(drawn[:, 0], minlength=4).float() / len(drawn)
    expected = torch.softmax(torch.tensor([0.8, 0.0, -1.0]) * 5.0, 0)   # over texts 1, 2, 3
    assert torch.allclose(share[1:], expected, atol=0.03), share
    # in the loss: with hard negatives on, ITM still trains and mismatches are other items' texts
    model = lxmert_tiny(itm_hard_negatives=True, contrastive_weight=0.0)  # draws without InfoNCE too
    losses = model.loss(big_batch(B=8, L=10, R=12), torch.Generator().manual_seed(1))
    assert set(losses) == {"mlm", "region_feat", "itm", "total"} and torch.isfinite(losses["itm"])


def test_info_nce_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    m = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    scale = 7.5
    tl, ml = t.tolist(), m.tolist()
    s = [[scale * sum(tl[i][k] * ml[j][k] for k in range(5)) for j in range(4)] for i in range(4)]
    t2m = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(4))) for i in range(4)) / 4
    m2t = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(4))) for j in range(4)) / 4
    assert info_nce(t, m, scale).item() == pytest.approx((t2m + m2t) / 2, abs=1e-5)


def test_loss_terms_and_region_labels():
    model = lxmert_tiny(num_region_labels=7)
    b = big_batch(B=8, L=10, R=12)
    g = torch.Generator().manual_seed(0)
    out = model.loss(b, g)
    assert set(out) == {"mlm", "region_feat", "itm", "contrastive", "total"}
    assert all(torch.isfinite(v) for v in out.values())
    b["region_labels"] = torch.randint(0, 7, (8, 12))
    out = model.loss(b, g)
    assert "region_label" in out
    total = sum(out[k] for k in ("mlm", "region_feat", "region_label", "itm", "contrastive"))
    assert torch.allclose(out["total"], total)
    b["region_labels"] = torch.softmax(torch.randn(8, 12, 7), -1)   # class distributions: KL
    assert torch.isfinite(model.loss(b, g)["region_label"])
    off = lxmert_tiny(itm_weight=0, contrastive_weight=0).loss(big_batch(B=8, L=10, R=12), g)
    assert set(off) == {"mlm", "region_feat", "total"}
    with pytest.raises(ValueError, match="num_region_labels"):
        lxmert_tiny().loss(b, g)


def test_optimisation_reduces_loss():
    torch.manual_seed(0)
    model = lxmert_tiny(dropout=0.0, attention_dropout=0.0, contrastive_on_clean=True)
    b = big_batch(B=8, L=10, R=12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model.loss(b, torch.Generator().manual_seed(0))   # the same corruption every step
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        losses.append(out["total"].item())
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------------------ variants


def test_backbone_language_stream_is_the_backbone(backbone, tokenizer):
    """Cross layers bypassed, the language stream computes exactly the backbone's hidden states."""
    model = lxmert_backbone(backbone, r_layers=1, x_layers=1, visual_feat_dim=16).eval()
    enc = tokenizer(["tim cook is visiting beijing now", "apple ceo"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = backbone.model.eval()(input_ids=enc["input_ids"],
                                     attention_mask=enc["attention_mask"]).last_hidden_state
        got = model.text_stream(enc["input_ids"], enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert (want[real] - got[real]).abs().max() < ATOL
    assert model.config.l_layers == backbone.num_layers
    assert model.config.mask_token_id == tokenizer.mask_token_id
    assert model.mlm_head.word_embeddings.weight is model.embeddings.word.weight
    # the caller's backbone is not shared: training LXMERT leaves it as it was
    theirs = backbone.model.embeddings.word_embeddings.weight
    assert model.embeddings.word.weight.data_ptr() != theirs.data_ptr()
    with pytest.raises(ValueError, match="backbone"):
        lxmert_backbone(backbone, hidden_size=64)


def test_minilm_language_stream(minilm_path):
    from fusion.models.backbone import load_backbone, mean_pool

    bb = load_backbone(str(minilm_path))
    model = lxmert_backbone(bb, r_layers=1, x_layers=1, visual_feat_dim=1280, text_pool="mean").eval()
    enc = bb.tokenizer(["a cat on a red sofa", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = bb.model(**enc).last_hidden_state
        got = model.text_stream(enc["input_ids"], enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert (want[real] - got[real]).abs().max() < 1e-4
    mask = enc["attention_mask"]
    assert torch.allclose(mean_pool(want, mask), mean_pool(got, mask), atol=1e-4)
    assert model.config.text_pool == "mean" and model.config.visual_feat_dim == 1280


def test_paper_size():
    """The config's defaults are the paper's model: as large as the reference's."""
    with torch.device("meta"):   # sizes only: no memory, no init time
        paper = Lxmert(LxmertConfig())
        ref = transformers.LxmertModel(transformers.LxmertConfig())
        grid = Lxmert(LxmertConfig(visual_feat_dim=1280))
    n = paper.num_parameters(encoder_only=True)
    assert n == sum(p.numel() for p in ref.parameters())
    assert 200e6 < n < 215e6
    assert (paper.config.l_layers, paper.config.r_layers, paper.config.x_layers) == (9, 5, 5)
    assert grid.visual_embedding.feat.in_features == 1280


# ------------------------------------------------------------------------------ GPU


@needs_cuda
def test_cuda_outputs_equal_cpu_and_bf16_trains():
    torch.manual_seed(0)
    b = big_batch(B=8, L=10, R=12)
    check_on_cuda(lxmert_tiny(), b, lambda m, x: run(m, x)._asdict())
    check_dropout_step_on_cuda(lxmert_tiny(itm_hard_negatives=True), b)


def test_itm_on_dual_starts_from_the_dual_encoder_ranking():
    """With ``itm_on_dual`` the match logit is the ITM head plus w * the dual-encoder cosine
    (w = 1 / temperature at init): with a zero head it ranks exactly as the dual encoder, the
    pairwise and the cached-states paths agree, and the ITM loss trains w and the head but never
    the dual-encoder vectors (the cosine is detached)."""
    torch.manual_seed(0)
    model = lxmert_tiny(itm_on_dual=True).eval()
    assert model.itm_dual.item() == pytest.approx(1 / 0.07)
    b = big_batch(B=6, L=10, R=12)
    text = {k: b[k] for k in ("input_ids", "attention_mask")}
    media = {k: b[k] for k in ("features", "boxes", "region_mask")}
    with torch.no_grad():
        model.itm.weight.zero_()
        dual = model.encode_text(text) @ model.encode_media(media).T                # (6, 6)
        pairwise = model.match_score(text, media)                                   # the diagonal
        cached = model.score_states(model.text_states(text), model.media_states(media))
    torch.testing.assert_close(pairwise, model.itm_dual * dual.diagonal() + model.itm.bias, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, pairwise, atol=1e-5, rtol=0)

    model = lxmert_tiny(itm_on_dual=True, mlm_weight=0, region_feat_weight=0, contrastive_weight=0)
    model.loss(big_batch(B=8, L=10, R=12), torch.Generator().manual_seed(0))["total"].backward()
    assert model.itm_dual.grad is not None and model.itm_dual.grad != 0
    assert model.itm.weight.grad is not None
    assert model.text_proj.weight.grad is None and model.media_proj.weight.grad is None
    assert "itm_dual" not in {n for n, _ in lxmert_tiny().named_parameters()}  # off: the paper's model
