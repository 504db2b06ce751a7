"""KnowBERT (Peters et al. 2019): the KAR layer against a naive loop over its equations, span pooling,
the linker loss, the model being its backbone where there is no mention, masking, inputs, candidates
from the KG's alias table, and one tiny pretraining run through ``fusion.pretrain``."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fusion.models.backbone import random_backbone
from fusion.models.knowbert import (KnowBert, KnowBertConfig, SpanCandidates, collate, encode_text,
                                    linker_loss, span_pool)
from fusion.models.objectives import IGNORE
from fusion.pretrain.knowbert_recipe import CandidateTable, doc_mentions
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from tests.fusion.conftest import run_pretrain, write_linked

E = 8
TEXTS = ["tim cook is visiting beijing now", "apple ceo steve jobs was born in paris france",
         "the dog and the cat"]
# (start, end, candidate rows, priors, gold position)
MENTIONS = [[(0, 8, [0, 1, 2], [0.5, 0.3, 0.2], 0), (21, 28, [3], [1.0], 0)],
            [(0, 5, [4, 5], [0.6, 0.4], 1), (10, 20, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], IGNORE),
             (33, 38, [6], [1.0], 0), (39, 45, [7, 0], [0.9, 0.1], 0)],
            []]


def table(seed: int = 0) -> torch.Tensor:
    return torch.randn(9, E, generator=torch.Generator().manual_seed(seed))


def make(backbone, **cfg) -> KnowBert:
    torch.manual_seed(1)
    return KnowBert(backbone, table(), KnowBertConfig(**{"entity_heads": 2, **cfg}))


def batch_of(tokenizer, texts=TEXTS, mentions=MENTIONS) -> dict[str, torch.Tensor]:
    rows = [vars(encode_text(t, [SpanCandidates(*m) for m in ms], tokenizer, 32))
            for t, ms in zip(texts, mentions, strict=True)]
    return collate(rows, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------- naive equations
def ln(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def naive_kar(kar, h, batch, entities, threshold):
    """The module docstring's equations, one sequence, one span, one wordpiece at a time."""
    out = h.clone()
    E_ = kar.down.out_features
    heads = kar.word_to_span.num_heads
    d = E_ // heads
    Wq, Wk, Wv = kar.word_to_span.qkv.weight.split(E_)
    bq, bk, bv = kar.word_to_span.qkv.bias.split(E_)
    for b in range(h.shape[0]):
        spans = [(int(a), int(e), c, p) for a, e, c, p in zip(batch["span_start"][b], batch["span_end"][b],
                                                            batch["candidates"][b], batch["priors"][b])
                 if a >= 0]
        if not spans:
            continue                                                   # no span: H' = H
        hp = h[b] @ kar.down.weight.T + kar.down.bias                   # (L, E)
        S = []
        for a, e, _, _ in spans:
            logit = torch.stack([kar.span_logit.weight[0] @ hp[k] + kar.span_logit.bias[0]
                                 for k in range(a, e)])
            w = torch.exp(logit - logit.max())
            w = w / w.sum()
            S.append(ln(sum(w[j] * hp[a + j] for j in range(e - a)), kar.span_norm))
        Se = kar.span_encoder(torch.stack(S)[None])[0]                  # a standard layer, no padding
        enhanced = []
        for m, (_, _, cands, priors) in enumerate(spans):
            psi, es = [], []
            for c, p in zip(cands.tolist(), priors.tolist()):
                if c < 0:
                    continue
                e_k = ln(entities[c], kar.entity_norm)
                dot = e_k @ Se[m] / math.sqrt(E_)
                x = torch.stack([dot, dot.new_tensor(p)])
                z = torch.relu(kar.linker[0].weight @ x + kar.linker[0].bias)
                psi.append(kar.linker[2].weight[0] @ z + kar.linker[2].bias[0])
                es.append(e_k)
            keep = [k for k, s in enumerate(psi) if threshold is None or s >= threshold]
            e_tilde = torch.zeros(E_, dtype=h.dtype)
            if keep:
                z = torch.stack([psi[k] for k in keep])
                alpha = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
                e_tilde = sum(alpha[j] * es[k] for j, k in enumerate(keep))
            enhanced.append(ln(Se[m] + e_tilde, kar.enhanced_norm))
        Sp = torch.stack(enhanced)                                      # (M, E)
        for i in range(h.shape[1]):
            heads_out = []
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                q = Wq[sl] @ hp[i] + bq[sl]
                k = Sp @ Wk[sl].T + bk[sl]                               # (M, d)
                v = Sp @ Wv[sl].T + bv[sl]
                att = torch.softmax(k @ q / math.sqrt(d), 0)
                heads_out.append(att @ v)
            a = ln(hp[i] + kar.word_to_span.out(torch.cat(heads_out)), kar.word_to_span.norm)
            hp2 = kar.ffn(a[None])[0]                                   # a standard FFN block
            out[b, i] = h[b, i] + kar.up.weight @ hp2 + kar.up.bias
    return out


@pytest.mark.parametrize("use_threshold", [False, True])
def test_kar_matches_naive_equations(backbone, tokenizer, use_threshold):
    model = make(backbone).double().eval()
    batch = batch_of(tokenizer)
    h = torch.randn(*batch["input_ids"].shape, 32, dtype=torch.double)
    kar, ents = model.kar, model.entities
    args = (h, batch["attention_mask"], batch["span_start"], batch["span_end"], batch["candidates"],
            batch["priors"], ents)
    threshold = None
    if use_threshold:   # about the median valid score: some candidates fall below, some spans lose all
        with torch.no_grad():
            psi = kar(*args).scores
        ranked = psi[torch.isfinite(psi)].sort().values
        mid = len(ranked) // 2         # halfway between two scores: a score on the threshold would make
        threshold = float(ranked[mid - 1:mid + 1].mean())   # the kept set hinge on rounding
        assert ranked[mid - 1] < threshold < ranked[mid]
        kar.threshold = threshold
    with torch.no_grad():
        got = kar(*args)
        want = naive_kar(kar, h, batch, ents, threshold)
    torch.testing.assert_close(got.hidden, want, rtol=1e-9, atol=1e-9)
    valid = batch["candidates"] >= 0
    assert torch.isinf(got.scores[~valid]).all() and torch.isfinite(got.scores[valid]).all()
    sums = got.weights.sum(-1)[batch["span_start"] >= 0]
    if use_threshold:
        assert ((sums - 1).abs() < 1e-9).any() and (sums == 0).any()   # a span with no entity left
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (got.hidden[2] == h[2]).all()                                # the sequence without spans


def test_up_projection_starts_as_the_inverse_of_down(backbone):
    kar = make(backbone).double().kar
    x = torch.randn(5, E, dtype=torch.double)
    torch.testing.assert_close(kar.down(kar.up(x)), x)


# ------------------------------------------------------------------------------ span pooling
def test_span_pool_is_attention_inside_the_span_only():
    hp = torch.randn(2, 6, 4)
    logits = torch.randn(2, 6)
    start = torch.tensor([[1, 0, -1], [2, 5, 3]])
    end = torch.tensor([[4, 1, -1], [3, 6, 3]])                           # [3, 3) covers nothing
    got = span_pool(hp, logits, start, end)
    w = torch.softmax(logits[0, 1:4], 0)
    torch.testing.assert_close(got[0, 0], (w[:, None] * hp[0, 1:4]).sum(0))
    torch.testing.assert_close(got[0, 1], hp[0, 0])                     # one wordpiece: itself
    torch.testing.assert_close(got[1, 1], hp[1, 5])
    assert (got[0, 2] == 0).all() and (got[1, 2] == 0).all()            # padding / empty span
    logits[0, 2] = 50.0                                                 # one dominating piece
    torch.testing.assert_close(span_pool(hp, logits, start, end)[0, 0], hp[0, 2])


# -------------------------------------------------------------------------------- linker loss
def test_linker_loss_is_cross_entropy_over_valid_candidates():
    scores = torch.tensor([[[2.0, 0.5, -math.inf], [1.0, -math.inf, -math.inf]],
                           [[0.1, 0.2, 0.3], [-math.inf] * 3]], requires_grad=True)
    gold = torch.tensor([[1, 0], [IGNORE, IGNORE]])
    loss = linker_loss(scores, gold)
    want = (-(0.5 - math.log(math.exp(2.0) + math.exp(0.5))) + 0.0) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[1] == 0).all()
    none = linker_loss(scores, torch.full_like(gold, IGNORE))
    assert none.item() == 0 and none.requires_grad


def test_linker_loss_trains_the_linker(backbone, tokenizer):
    model = make(backbone)
    model.eval()   # no dropout: the same batch, a falling loss
    batch = batch_of(tokenizer)
    opt = torch.optim.Adam(model.kar.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(batch["input_ids"], batch["attention_mask"], batch["span_start"], batch["span_end"],
                    batch["candidates"], batch["priors"])
        loss = linker_loss(out.kar.scores, batch["gold"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.entities.grad is None                                  # the table stays frozen


# -------------------------------------------------------------- where KnowBERT is its backbone
def bert_out(backbone, batch):
    with torch.no_grad():
        return backbone.model.eval()(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state


def test_without_mentions_the_model_is_the_backbone(backbone, tokenizer):
    model = make(backbone).eval()
    batch = batch_of(tokenizer)
    want = bert_out(backbone, batch)
    with torch.no_grad():
        none = model(batch["input_ids"], batch["attention_mask"]).hidden
        empty = batch_of(tokenizer, mentions=[[], [], []])
        assert empty["span_start"].shape == (3, 0)
        zero = model(empty["input_ids"], empty["attention_mask"], empty["span_start"], empty["span_end"],
                     empty["candidates"], empty["priors"]).hidden
        mixed = model(batch["input_ids"], batch["attention_mask"], batch["span_start"], batch["span_end"],
                      batch["candidates"], batch["priors"]).hidden
    torch.testing.assert_close(none, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(zero, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2], want[2], atol=1e-5, rtol=0)    # the text with no mention
    assert (mixed[:2] - want[:2]).abs().max() > 1e-3                    # the others are changed


# ------------------------------------------------------------------------------------ masking
def test_masking_rate_and_never_special_tokens(backbone, tokenizer):
    model = make(backbone, mlm_prob=0.15)
    B, L = 64, 40
    ids = torch.randint(10, 70, (B, L))
    special = torch.zeros(B, L, dtype=torch.long)
    special[:, 0] = special[:, -1] = 1
    attn = torch.ones(B, L, dtype=torch.long)
    attn[:, 30:] = 0
    special[:, 30:] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "special_tokens_mask": special}
    out, labels = model.corrupt(batch, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    maskable = attn.bool() & ~special.bool()
    assert not (chosen & ~maskable).any()
    rate = chosen.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.02                                      # 1792 maskable tokens
    masked = (out == tokenizer.mask_token_id) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.06
    assert (labels[chosen] == ids[chosen]).all() and (out[~chosen] == ids[~chosen]).all()


# ------------------------------------------------------------------------------------- inputs
def test_encode_text_maps_characters_to_wordpieces_and_counts(tokenizer):
    text = "tim cook is visiting beijing now apple ceo"
    ms = [SpanCandidates(0, 8, [0], [1.0]), SpanCandidates(21, 28, [1], [1.0]),
          SpanCandidates(8, 9, [2], [1.0]), SpanCandidates(39, 42, [3], [1.0])]
    ex = encode_text(text, ms, tokenizer, max_length=8)                 # [CLS] + 6 pieces + [SEP]
    toks = tokenizer.convert_ids_to_tokens(ex.input_ids)
    assert [toks[a:b] for a, b in zip(ex.span_start, ex.span_end)] == [["tim", "cook"], ["beijing"]]
    assert ex.counts == {"spans": 2, "spans_truncated": 1, "spans_unaligned": 1, "spans_over_limit": 0}
    limited = encode_text(text, ms[:2], tokenizer, max_length=32, max_mentions=1)
    assert limited.counts["spans_over_limit"] == 1 and limited.span_start == [1]


# ------------------------------------------------------------------------ candidates (the KG)
# (id, name, aliases, type)
ENTITIES = [("t:beijing", "beijing", [], "city"), ("t:china", "china", [], "country"),
            ("t:paris", "paris", [], "city"), ("t:france", "france", [], "country"),
            ("t:berlin", "berlin", [], "city"), ("t:germany", "germany", [], "country"),
            ("t:apple", "apple", [], "company"), ("t:steve", "steve jobs", [], "person"),
            ("t:paris_tx", "paris texas", ["paris"], "city"),
            ("t:apple_fruit", "apple fruit", ["apple"], "food")]
RELATIONS = ["capital", "founded by"]
TRIPLES = [(0, 0, 1), (2, 0, 3), (4, 0, 5), (6, 1, 7)]  # head, relation, tail
SENTENCES = ["beijing is the capital of china", "paris is the capital of france",
             "berlin is the capital of germany", "apple was founded by steve jobs",
             "he was born in paris", "the dog and the cat are animals"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """tests/fusion/test_recipes.py's ERNIE setup, with two ambiguous aliases ("paris", "apple")
    so the linker has a choice to learn, and an entity without a vector (steve jobs)."""
    root = tmp_path_factory.mktemp("artifacts")
    kg_dir, emb_dir, link_dir, bb_dir = (root / n for n in ("kg", "emb", "link", "bb"))
    for d in (kg_dir, emb_dir, link_dir):
        d.mkdir()
    n = len(ENTITIES)
    KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [e[0] for e in ENTITIES],
                  "name": [e[1] for e in ENTITIES], "aliases": [e[2] for e in ENTITIES],
                  "description": [""] * n, "types": [[e[3]] for e in ENTITIES],
                  "source": ["t"] * n}, schema=ENTITY_SCHEMA),
        pa.table({"idx": [0, 1], "id": ["t:capital", "t:founded"], "name": RELATIONS,
                  "source": ["t", "t"]}, schema=RELATION_SCHEMA),
        pa.table({"head": [t[0] for t in TRIPLES], "relation": [t[1] for t in TRIPLES],
                  "tail": [t[2] for t in TRIPLES], "split": ["train"] * len(TRIPLES)},
                 schema=TRIPLE_SCHEMA)).save(kg_dir)
    with_vector = [e for e in ENTITIES if e[0] != "t:steve"]   # steve jobs: no vector
    save_file({"entity": torch.randn(len(with_vector), 12), "relation": torch.randn(2, 12)},
              str(emb_dir / "embeddings.safetensors"))
    pq.write_table(pa.table({"idx": list(range(len(with_vector))), "id": [e[0] for e in with_vector],
                             "name": [e[1] for e in with_vector]}), emb_dir / "entities.parquet")
    docs = [(f"d{i}", SENTENCES[i % len(SENTENCES)]) for i in range(24)]
    rows = []
    for doc_id, text in docs:
        for eid, name, _, _ in ENTITIES[:8]:
            if name in text:
                s = text.index(name)
                rows.append((doc_id, s, s + len(name), eid))
    rows.append(("d5", 4, 7, "t:dog"))  # an entity the KG does not know
    write_linked(link_dir, docs, rows)
    bb = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    bb.model.save_pretrained(str(bb_dir))
    tokenizer.save_pretrained(str(bb_dir))
    return {"kg": kg_dir, "entities": emb_dir, "text": link_dir, "backbone": bb_dir}


def test_candidates_come_from_the_alias_table(artifacts):
    from fusion.pretrain.recipes import id_index

    rows = id_index(str(artifacts["entities"]))
    table_ = CandidateTable.from_kg(str(artifacts["kg"]), rows, max_candidates=5)
    counts: Counter = Counter()
    r, p, ids = table_.lookup("Paris", counts)
    assert ids == ["t:paris", "t:paris_tx"] and r == [rows["t:paris"], rows["t:paris_tx"]]
    assert p[0] > p[1] and sum(p) == pytest.approx(1.0)               # degree prior: paris has a triple
    assert table_.lookup("steve jobs", counts)[0] == []                 # its only candidate has no vector
    assert counts["candidates_without_vector"] == 1
    one = CandidateTable.from_kg(str(artifacts["kg"]), rows, max_candidates=1)
    assert one.lookup("paris", counts)[2] == ["t:paris"] and counts["candidates_over_limit"] == 1
    text = "paris and steve jobs and the dog and apple"
    ms = doc_mentions(text, [(0, 5, "t:paris_tx"), (10, 20, "t:steve"), (29, 32, "t:dog"),
                             (37, 42, "t:berlin")], table_, counts)
    assert [(m.start, m.gold) for m in ms] == [(0, 1), (37, IGNORE)]
    assert counts["mentions_without_candidates"] == 2 and counts["mentions_gold_not_candidate"] == 1


# ------------------------------------------------------------------------ end to end (the stage)
def test_knowbert_recipe_trains_mlm_and_the_linker(ray_local, tmp_path, artifacts):
    metrics, out = run_pretrain(tmp_path, "pt", {r: artifacts[r] for r in ("text", "entities", "kg")}, {
        "backbone": str(artifacts["backbone"]), "steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
        "checkpoint_every": 30, "max_length": 32, "recipe": "knowbert",
        "options": {"layers_before": 1, "entity_heads": 2}})
    hist = json.loads((out / "history.json").read_text())
    assert metrics["num_entities"] == 9 and metrics["entity_dim"] == 12
    # steve jobs (4 documents: his one candidate has no vector) and the dog (not in the KG)
    assert metrics["mentions_without_candidates"] == 4 + 1
    assert metrics["candidates_without_vector"] == 4
    assert metrics["mentions_gold_not_candidate"] == 0
    assert {"loss_mlm", "loss_linker", "loss_total"} <= set(hist[0])
    lk = [h["loss_linker"] for h in hist]
    assert sum(lk[-8:]) / 8 < sum(lk[:8]) / 8                           # "paris", "apple": a choice
    assert all(math.isfinite(h["loss_total"]) for h in hist)

    # fine-tuning: the span encoder reads the document's mentions with their alias candidates;
    # a document without mentions gets the fine-tuned backbone's features exactly
    from fusion.finetune.encoders import EncoderSource, span_encoder_for
    from fusion.finetune.tasks import TaskExample
    from fusion.models.backbone import artifact_backbone
    from knowledge.kg import KnowledgeGraph

    meta = json.loads((out / "recipe.json").read_text())
    src = EncoderSource("knowbert", out, meta["options"], artifact_backbone(out), 32, 32,
                        KnowledgeGraph.load(artifacts["kg"]), artifacts["entities"])
    enc = span_encoder_for("knowbert")(src)
    enc.module.eval()
    plain = TaskExample("a", "a", "the dog is red", (), ((4, 7),), ("x",), "x", "y")
    linked = TaskExample("b", "b", "paris is a city", ((0, 5, "t:paris"),), ((0, 5),), ("t:paris",),
                         "t:paris", "y")
    batch = enc.collate([plain, linked])
    assert batch["span_start"].shape[0] == 2 and (batch["span_start"][0] < 0).all()
    with torch.no_grad():
        got = enc.token_features(batch)
        bert = enc.module.encoder(input_ids=batch["input_ids"][:1],
                                  attention_mask=batch["attention_mask"][:1]).last_hidden_state
    torch.testing.assert_close(got[:1], bert, atol=1e-5, rtol=0)
    assert enc(batch).shape == (2, 1, enc.feature_size)
    assert enc.coverage([plain, linked])["knowbert_mentions"] == 1


def test_loss_under_bf16_autocast_is_finite_everywhere(backbone, tokenizer):
    """The loop trains under bf16 autocast: the masked softmaxes (padding spans, spans without a
    kept candidate) must give finite values and gradients there too."""
    model = make(backbone, threshold=0.0)
    batch = batch_of(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(batch, torch.Generator().manual_seed(0))
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values()) and losses["linker"] > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.kar.linker[0].weight.grad.abs().sum() > 0 and model.kar.up.weight.grad.abs().sum() > 0
