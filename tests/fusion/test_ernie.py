"""ERNIE (fusion/ernie.py): the aggregator against its equations written out naively, equivalence
with the backbone where ERNIE should be the backbone, corruption rates, input building, training."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.models.backbone import load_backbone, random_backbone
from fusion.models.ernie import NO_ENTITY, Ernie, ErnieConfig, MentionCounts, collate, dea_mask, encode_batch, encode_text
from fusion.models.objectives import IGNORE

NUM_ENTITIES, ENTITY_DIM = 30, 16
TEXTS = ["Tim Cook is visiting Beijing now", "Steve Jobs founded Apple in California",
         "Paris is the capital of France", "the dog and the cat"]
# (start, end, entity_idx) character spans, as knowledge.link writes them
MENTIONS = [[(0, 8, 3), (21, 28, 7)], [(0, 10, 4), (19, 24, 5)], [(0, 5, 9), (24, 30, 11)], []]


def table(n: int = NUM_ENTITIES, dim: int = ENTITY_DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)  # TransE-like


def make_ernie(backbone, num_k_layers: int = 1, entities: torch.Tensor | None = None) -> Ernie:
    return Ernie(backbone, table() if entities is None else entities,
                 ErnieConfig(num_k_layers=num_k_layers)).eval()


def ernie_tiny(entities: torch.Tensor, tokenizer, **config) -> Ernie:
    """A random 2-layer BERT, hidden 32: 1 T-layer + 1 aggregator."""
    backbone = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, max_position=128)
    return Ernie(backbone, entities, ErnieConfig(**config))


def se_bound(count: int, n: int, p: float, k: float = 3.0) -> bool:
    """``count / n`` within ``k`` standard errors of ``p``."""
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------------------
# the aggregator against the paper's equations


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # BERT's exact GELU


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def naive_mha(x, Wq, bq, Wk, bk, Wv, bv, heads, keys_ok):
    """One sequence, plain matmuls: softmax(q k^T / sqrt(d)) v per head over the allowed keys."""
    L, d = x.shape
    dh = d // heads
    q, k, v = x @ Wq.T + bq, x @ Wk.T + bk, x @ Wv.T + bv
    out = torch.zeros(L, d, dtype=x.dtype)
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        scores = q[:, s] @ k[:, s].T / math.sqrt(dh)
        scores[:, ~keys_ok] = float("-inf")
        out[:, s] = torch.softmax(scores, -1) @ v[:, s]
    return out


def test_aggregator_matches_naive_equations(backbone):
    torch.manual_seed(0)
    model = make_ernie(backbone).double()
    agg = model.k_layers[0]
    B, L, D, E = 2, 6, 32, ENTITY_DIM
    w = torch.randn(B, L, D, dtype=torch.double)
    e_idx = torch.tensor([[NO_ENTITY, 3, NO_ENTITY, 8, 8, NO_ENTITY],       # a repeated entity too
                          [NO_ENTITY] * L])                                 # a row without entities
    attn = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])                       # padding in row 1
    has = (e_idx >= 0) & attn.bool()
    e = model.entities.double()[e_idx.clamp_min(0)] * has[..., None]
    w_out, e_out = agg(w, e, model._token_mask(w, attn), has)

    # token attention: BERT's, w~ = LN(W_o MHA(w) + b_o + w)
    sa, so = agg.attention.self, agg.attention.output
    # entity attention: its own, over the positions that hold an entity
    ea = agg.entity_attention
    Wq, Wk, Wv = ea.qkv.weight.split(E)
    bq, bk, bv = ea.qkv.bias.split(E)
    W_t, b = agg.token_in.weight, agg.token_in.bias
    W_e = agg.entity_in.weight
    Wp_t, bp_t, ln_t = agg.token_out.dense.weight, agg.token_out.dense.bias, agg.token_out.LayerNorm
    Wp_e, bp_e, ln_e = agg.entity_out.weight, agg.entity_out.bias, agg.entity_norm
    for bi in range(B):
        a = naive_mha(w[bi], sa.query.weight, sa.query.bias, sa.key.weight, sa.key.bias,
                      sa.value.weight, sa.value.bias, sa.num_attention_heads, attn[bi].bool())
        wt = layer_norm(a @ so.dense.weight.T + so.dense.bias + w[bi], so.LayerNorm)
        ae = naive_mha(e[bi], Wq, bq, Wk, bk, Wv, bv, ea.num_heads, has[bi])
        et = layer_norm(ae @ ea.out.weight.T + ea.out.bias + e[bi], ea.norm)
        for i in range(L):
            if has[bi, i]:
                h = gelu(W_t @ wt[i] + W_e @ et[i] + b)
                e_want = layer_norm(Wp_e @ h + bp_e + et[i], ln_e)
            else:
                h = gelu(W_t @ wt[i] + b)
                e_want = torch.zeros(E, dtype=torch.double)
            w_want = layer_norm(Wp_t @ h + bp_t + wt[i], ln_t)
            torch.testing.assert_close(w_out[bi, i], w_want, atol=1e-5, rtol=0)
            torch.testing.assert_close(e_out[bi, i], e_want, atol=1e-5, rtol=0)
    assert e_out[1].abs().max() == 0 and not torch.isnan(w_out).any()


# ---------------------------------------------------------------------------------------------
# where ERNIE must be exactly its backbone


def tokens(tokenizer):
    batch, _ = encode_batch(TEXTS, MENTIONS, tokenizer, 32, NUM_ENTITIES)
    return batch


def bert_out(backbone, batch, **kw):
    with torch.no_grad():
        return backbone.model.eval()(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"], **kw)


def test_without_entities_the_model_is_the_backbone(backbone, tokenizer):
    """Aggregators take over BERT's FFN as their fusion (W_e bias-free): no entity -> BERT exactly."""
    batch = tokens(tokenizer)
    model = make_ernie(backbone)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], None)
    want = bert_out(backbone, batch).last_hidden_state
    torch.testing.assert_close(out.hidden, want, atol=1e-5, rtol=0)
    assert out.entity_hidden.abs().max() == 0


def test_t_encoder_is_the_backbones_first_layers(backbone, tokenizer):
    """With entities, the T-Encoder output is still BERT's hidden state after layer N; with M = 0
    there is no K-Encoder and the whole model is BERT."""
    batch = tokens(tokenizer)
    assert (batch["entity_idx"] >= 0).sum() == 6
    want = bert_out(backbone, batch, output_hidden_states=True).hidden_states
    model = make_ernie(backbone, num_k_layers=1)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["entity_idx"])
    torch.testing.assert_close(out.text_hidden, want[1], atol=1e-5, rtol=0)
    # and the entities do change the K-Encoder's output (else the tests above prove nothing)
    assert (out.hidden - want[2]).abs().max() > 1e-3
    model0 = make_ernie(backbone, num_k_layers=0)
    with torch.no_grad():
        out0 = model0(batch["input_ids"], batch["attention_mask"], batch["entity_idx"])
    torch.testing.assert_close(out0.hidden, want[2], atol=1e-5, rtol=0)


def test_aggregator_token_stream_is_the_bert_layer_when_entity_term_is_zero(backbone, tokenizer):
    """What is true of this design: the aggregator equals its BERT layer when (a) no token has an
    entity, or (b) W_e = 0 with entities present (the entity stream then still updates e)."""
    batch = tokens(tokenizer)
    model = make_ernie(backbone, num_k_layers=1)
    agg, bert_layer = model.k_layers[0], backbone.model.eval().encoder.layer[1]
    torch.manual_seed(1)
    w = torch.randn(*batch["input_ids"].shape, 32)
    mask = model._token_mask(w, batch["attention_mask"])
    has = (batch["entity_idx"] >= 0) & batch["attention_mask"].bool()
    e = model.entities[batch["entity_idx"].clamp_min(0)] * has[..., None]
    with torch.no_grad():
        want = bert_layer(w, mask)
        got_none, _ = agg(w, torch.zeros_like(e), mask, torch.zeros_like(has))
        assert (agg(w, e, mask, has)[0] - want).abs().max() > 1e-3
        agg.entity_in.weight.zero_()
        got_we0, e_out = agg(w, e, mask, has)
    torch.testing.assert_close(got_none, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_we0, want, atol=1e-5, rtol=0)
    assert e_out[has].abs().min() >= 0 and e_out[has].norm(dim=-1).min() > 0.1


# ---------------------------------------------------------------------------------------------
# corruption rates


def test_dea_mask_rates():
    n_aligned, n_entities = 20_000, 50
    g = torch.Generator().manual_seed(0)
    orig = torch.randint(n_entities, (n_aligned,), generator=g)
    ent = torch.cat([orig, torch.full((5_000,), NO_ENTITY)]).view(100, 250)
    out, labels = dea_mask(ent, n_entities, generator=g)
    aligned = ent >= 0
    assert torch.equal(labels[aligned], ent[aligned]) and (labels[~aligned] == IGNORE).all()
    assert (out[~aligned] == NO_ENTITY).all()                   # unaligned tokens stay unaligned
    a, o = ent[aligned], out[aligned]
    replaced, masked, kept = ((o >= 0) & (o != a)), (o == NO_ENTITY), (o == a)
    assert int(replaced.sum() + masked.sum() + kept.sum()) == n_aligned
    assert se_bound(int(replaced.sum()), n_aligned, 0.05)
    assert se_bound(int(masked.sum()), n_aligned, 0.15)
    assert se_bound(int(kept.sum()), n_aligned, 0.80)
    assert o[replaced].max() < n_entities
    # replacements are uniform over the *other* entities: every entity is drawn about equally often
    counts = torch.bincount(o[replaced], minlength=n_entities).float()
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()


def test_mlm_and_dea_rates_as_the_model_applies_them(backbone, tokenizer):
    model = make_ernie(backbone)
    B, L, word = 400, 100, tokenizer.convert_tokens_to_ids("dog")
    V, mask_id = model.config.vocab_size, tokenizer.mask_token_id
    ids = torch.full((B, L), word)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[:, 90:] = 0                                            # padding
    special = torch.zeros(B, L, dtype=torch.long)
    special[:, 0] = special[:, 89] = 1                          # [CLS], [SEP]
    special[:, 90:] = 1
    ent = torch.full((B, L), NO_ENTITY)
    ent[:, 1:95:2] = 3                                          # some on padding: must vanish
    batch = {"input_ids": ids, "attention_mask": attn, "special_tokens_mask": special, "entity_idx": ent}
    new_ids, mlm_labels, new_ent, dea_labels = model.corrupt(batch, torch.Generator().manual_seed(0))

    maskable = attn.bool() & ~special.bool()
    chosen = mlm_labels != IGNORE
    assert not chosen[~maskable].any() and (mlm_labels[chosen] == word).all()
    assert torch.equal(new_ids[~chosen], ids[~chosen])
    n, c = int(maskable.sum()), int(chosen.sum())
    assert se_bound(c, n, 0.15)
    got = new_ids[chosen]
    # a random token can itself be [MASK] or the original word: 1/V each
    assert se_bound(int((got == mask_id).sum()), c, 0.8 + 0.1 / V)
    assert se_bound(int((got == word).sum()), c, 0.1 + 0.1 / V)
    assert se_bound(int(((got != mask_id) & (got != word)).sum()), c, 0.1 * (V - 2) / V)

    on_pad = ent.ne(NO_ENTITY) & ~attn.bool()
    assert (new_ent[on_pad] == NO_ENTITY).all() and (dea_labels[on_pad] == IGNORE).all()
    aligned = dea_labels != IGNORE
    na = int(aligned.sum())
    assert se_bound(int((new_ent[aligned] == NO_ENTITY).sum()), na, 0.15)
    assert se_bound(int(((new_ent != 3) & (new_ent >= 0))[aligned].sum()), na, 0.05)


# ---------------------------------------------------------------------------------------------
# input building


def toks(tokenizer, ex):
    return tokenizer.convert_ids_to_tokens(ex.input_ids)


def test_mentions_align_to_first_wordpieces(tokenizer):
    text = "Tim Cook is visiting Beijing now"
    ex = encode_text(text, [(0, 8, 3), (21, 28, 7)], tokenizer, 32, NUM_ENTITIES)
    t = toks(tokenizer, ex)
    assert t == ["[CLS]", "tim", "cook", "is", "visiting", "beijing", "now", "[SEP]"]
    assert ex.entity_idx == [-1, 3, -1, -1, -1, 7, -1, -1]          # "cook" gets nothing: first only
    assert ex.special_tokens_mask == [1, 0, 0, 0, 0, 0, 0, 1]
    assert ex.counts == MentionCounts(mentions=2, aligned=2)
    # a mention inside a word split into wordpieces goes to its first piece
    ex = encode_text("Apples of China", [(0, 6, 2)], tokenizer, 32, NUM_ENTITIES)
    assert toks(tokenizer, ex)[1:3] == ["apple", "##s"] and ex.entity_idx[1:3] == [2, -1]


def test_knowledge_link_mentions_are_accepted(tokenizer):
    from knowledge.link import Mention

    text = "Tim Cook is visiting Beijing now"
    ms = [Mention(0, 8, "Tim Cook", 3, "Q1", 1.0, 1), Mention(21, 28, "Beijing", 7, "Q2", 1.0, 1)]
    assert encode_text(text, ms, tokenizer, 32, NUM_ENTITIES).entity_idx == [-1, 3, -1, -1, -1, 7, -1, -1]


def test_missing_entities_are_counted_and_skipped(tokenizer):
    text = "Tim Cook is visiting Beijing now"
    ex = encode_text(text, [(0, 8, 3), (21, 28, NUM_ENTITIES), (12, 20, -2)], tokenizer, 32,
                     NUM_ENTITIES)
    assert ex.entity_idx == [-1, 3, -1, -1, -1, -1, -1, -1]
    assert ex.counts == MentionCounts(mentions=3, aligned=1, missing=2)
    ex = encode_text(text, [(0, 8, 3), (21, 28, 7)], tokenizer, 32, NUM_ENTITIES, missing={3})
    assert ex.entity_idx == [-1, -1, -1, -1, -1, 7, -1, -1]
    assert ex.counts == MentionCounts(mentions=2, aligned=1, missing=1)


def test_no_mentions_and_empty_text(tokenizer):
    ex = encode_text("the dog and the cat", [], tokenizer, 32, NUM_ENTITIES)
    assert len(ex.input_ids) == 7 and ex.entity_idx == [-1] * 7 and ex.counts == MentionCounts()
    ex = encode_text("", [], tokenizer, 32, NUM_ENTITIES)
    assert toks(tokenizer, ex) == ["[CLS]", "[SEP]"] and ex.entity_idx == [-1, -1]
    ex = encode_text("", [(0, 3, 1)], tokenizer, 32, NUM_ENTITIES)       # a stale span: no crash
    assert ex.entity_idx == [-1, -1] and ex.counts == MentionCounts(mentions=1, unaligned=1)
    # two mentions on one first wordpiece: the first wins, the other is counted
    ex = encode_text("Tim Cook", [(0, 8, 3), (0, 3, 4)], tokenizer, 32, NUM_ENTITIES)
    assert ex.entity_idx == [-1, 3, -1, -1] and ex.counts == MentionCounts(mentions=2, aligned=1, unaligned=1)


def test_truncation_counts_the_cut_mentions(tokenizer):
    unit = "tim cook is visiting beijing now "                       # 6 wordpieces
    text = unit * 20
    mentions = [(i * len(unit) + 21, i * len(unit) + 28, i) for i in range(20)]  # every "beijing"
    ex = encode_text(text, mentions, tokenizer, 16, NUM_ENTITIES)  # 14 wordpieces fit
    assert len(ex.input_ids) == 16 and toks(tokenizer, ex)[-1] == "[SEP]"
    assert [i for i, e in enumerate(ex.entity_idx) if e >= 0] == [5, 11]
    assert ex.counts == MentionCounts(mentions=20, aligned=2, truncated=18)


def test_collate_pads(tokenizer):
    batch, counts = encode_batch(TEXTS + [""], MENTIONS + [[]], tokenizer, 32, NUM_ENTITIES)
    B, L = batch["input_ids"].shape
    assert B == 5 and all(v.shape == (B, L) for v in batch.values())
    assert counts == MentionCounts(mentions=6, aligned=6)
    pad = batch["attention_mask"] == 0
    assert pad[4, 2:].all() and (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert (batch["entity_idx"][pad] == NO_ENTITY).all() and (batch["special_tokens_mask"][pad] == 1).all()
    assert collate([], 0)["input_ids"].shape == (0, 0)


# ---------------------------------------------------------------------------------------------
# training


def mean_loss(model, batch, seeds=range(8)):
    model.eval()
    with torch.no_grad():
        ls = [model.loss(batch, torch.Generator().manual_seed(s)) for s in seeds]
    return {k: sum(float(x[k]) for x in ls) / len(ls) for k in ("mlm", "dea", "total")}


def test_training_reduces_loss_and_leaves_entities_frozen(tokenizer):
    torch.manual_seed(0)
    entities = table().requires_grad_(True)                   # even a grad-tracking table stays put
    model = ernie_tiny(entities, tokenizer)
    assert "entities" not in dict(model.named_parameters()) and "entities" not in model.state_dict()
    batch = tokens(tokenizer)
    before = mean_loss(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        model.loss(batch, g)["total"].backward()
        opt.step()
    after = mean_loss(model, batch)
    assert after["total"] < before["total"] and after["dea"] < before["dea"], (before, after)
    assert entities.grad is None and not model.entities.requires_grad
    torch.testing.assert_close(model.entities, entities.detach(), atol=0, rtol=0)


def test_dea_is_zero_without_aligned_tokens(tokenizer):
    model = ernie_tiny(table(), tokenizer)
    batch, _ = encode_batch(["the dog and the cat"], [[]], tokenizer, 32, NUM_ENTITIES)
    losses = model.loss(batch, torch.Generator().manual_seed(0))
    assert float(losses["dea"].detach()) == 0.0 and torch.isfinite(losses["total"])
    losses["total"].backward()                                 # still differentiable


# ---------------------------------------------------------------------------------------------
# config, repr


def test_config_defaults_split_and_checks(tokenizer):
    four = random_backbone(tokenizer, num_layers=4)
    model = Ernie(four, table())
    assert (model.config.num_t_layers, model.config.num_k_layers) == (2, 2)
    assert model.config.entity_dim == ENTITY_DIM and model.config.num_entities == NUM_ENTITIES
    r = repr(model)
    assert "t_layers=2" in r and "k_layers=2" in r and f"entity_dim={ENTITY_DIM}" in r
    with pytest.raises(ValueError, match="entity_heads"):
        Ernie(four, table(dim=10))
    with pytest.raises(ValueError, match="num_k_layers"):
        Ernie(four, table(), ErnieConfig(num_k_layers=5))


def test_reset_parameters_keeps_backbone_weights(backbone):
    model = make_ernie(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_parameters()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("entity" in k or "transform" in k) for k in changed), changed
    q = model.k_layers[0].attention.self.query.weight
    torch.testing.assert_close(q, backbone.model.encoder.layer[1].attention.self.query.weight)


def test_minilm_variant(minilm_path):
    entities = table(n=20, dim=100)
    bb = load_backbone(str(minilm_path))
    model = Ernie(bb, entities).eval()        # the default split: half the layers are aggregators
    assert (model.config.num_t_layers, model.config.num_k_layers) == (3, 3)
    assert model.config.hidden_size == 384
    tok = bb.tokenizer
    batch, counts = encode_batch(["Tim Cook is visiting Beijing now"], [[(0, 8, 3), (21, 28, 7)]],
                                 tok, 64, 20)
    assert counts.aligned == 2
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["entity_idx"])
        losses = model.loss(batch, torch.Generator().manual_seed(0))
    assert out.hidden.shape == (1, L, 384) and out.text_hidden.shape == (1, L, 384)
    assert out.entity_hidden.shape == (1, L, 100)
    has = batch["entity_idx"] >= 0
    assert out.entity_hidden[~has].abs().max() == 0 and out.entity_hidden[has].norm(dim=-1).min() > 0
    assert torch.isfinite(out.hidden).all() and all(torch.isfinite(v) for v in losses.values())
