"""LIBERT: WordNet relation pairs and what they leave out, how documents walk through them, the
nearest-unrelated negatives against a naive search, the [CLS] w1 [SEP] w2 [SEP] layout, the joint
loss against its equations, and one tiny ``fusion.pretrain`` run on a WordNet-like KG artifact."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from fusion.models.libert import (HYPERNYM, SYNONYM, Libert, LibertConfig, doc_pair_indices,
                                  nearest_unrelated, pair_batch, relation_pairs, word_vectors)
from fusion.models.objectives import IGNORE, mlm_mask
from fusion.pretrain.lexical_recipes import LibertOptions, LibertRecipe, lexicon_pairs
from tests.fusion.test_sensebert import (SENTENCES, SYNSETS, artifacts, falls, run_recipe,  # noqa: F401
                                         write_tiny_wordnet)

# SYNSETS' single-word synonym pairs: dog-frump, chase-dog, animal-beast, animal-brute, beast-brute,
# city-metropolis, country-state, country-land, state-land, red-reddish, found-establish
N_SYNONYMS = 11
# HYPERNYMS' lemma pairs: dog x {animal, beast, brute}, cat x the same, capital x {city,
# metropolis}, president x {people}
N_HYPERNYMS = 9


def test_relation_pairs_from_synsets_and_hypernym_edges():
    synsets = [[s[1], *s[2]] if s[3] != "country" else None for s in SYNSETS]
    index = {s[0]: i for i, s in enumerate(SYNSETS)}
    from tests.fusion.test_sensebert import HYPERNYMS

    edges = [(index[f"wordnet:{h}"], index[f"wordnet:{t}"]) for h, t in HYPERNYMS]
    pairs, counts = relation_pairs(synsets, edges)
    assert counts == {"synonym_pairs": N_SYNONYMS, "hypernym_pairs": N_HYPERNYMS, "lemmas_multiword": 2}
    assert ("dog", "animal", HYPERNYM) in pairs and ("animal", "dog", HYPERNYM) not in pairs
    assert ("country", "state", SYNONYM) in pairs and pairs == sorted(pairs)
    only_hyper, c = relation_pairs(synsets, edges, synonyms=False)
    assert len(only_hyper) == N_HYPERNYMS and "synonym_pairs" not in c


def test_relation_pairs_count_what_they_leave_out():
    synsets = [["dog", "hound"], ["Dog", "canine", "domestic_dog"], None]
    pairs, counts = relation_pairs(synsets, [(0, 1), (0, 2)])
    # synonyms: dog-hound, dog-canine; hypernymy: dog-canine (again), hound-dog, hound-canine
    assert sorted(pairs) == [("dog", "canine", SYNONYM), ("dog", "hound", SYNONYM),
                             ("hound", "canine", HYPERNYM), ("hound", "dog", HYPERNYM)]
    assert counts == {"synonym_pairs": 2, "hypernym_pairs": 2, "pairs_same_word": 1,  # dog-dog
                      "pairs_duplicate": 1, "lemmas_multiword": 1, "hypernym_edges_not_synsets": 1}


def test_lexicon_pairs_reads_the_kg_artifact(tmp_path):
    kg = write_tiny_wordnet(tmp_path / "kg")
    pairs, counts = lexicon_pairs(str(kg), LibertOptions())
    assert len(pairs) == N_SYNONYMS + N_HYPERNYMS
    assert counts["entities_not_synsets"] == 1 and counts["hypernym_triples"] == 4
    none, counts = lexicon_pairs(str(kg), LibertOptions(hypernym_relations=["_hypernym"]))
    assert len(none) == N_SYNONYMS and counts["hypernym_triples"] == 0   # a WN18RR name: none here


@pytest.mark.parametrize("per_doc,num_pairs", [(4, 20), (3, 7), (5, 1000)])
def test_documents_walk_through_every_pair_evenly(per_doc, num_pairs):
    docs = 3 * num_pairs // per_doc + 1
    used = Counter(j for d in range(docs) for j in doc_pair_indices(d, per_doc, num_pairs))
    assert set(used) <= set(range(num_pairs))
    assert max(used.values()) - min(used.values()) <= 1 and len(used) == min(num_pairs, docs * per_doc)
    first = [j for d in range(num_pairs // per_doc) for j in doc_pair_indices(d, per_doc, num_pairs)]
    assert len(set(first)) == len(first)                   # no repeat before every pair was used


def test_nearest_unrelated_matches_a_naive_search():
    g = torch.Generator().manual_seed(0)
    W = 12
    v = torch.randn(W, 8, generator=g)
    related = torch.rand(W, W, generator=g) < 0.3
    related = related | related.T
    related[3] = True                                      # word 3 is related to everything
    related[:, 3] = True
    got = nearest_unrelated(v, related).tolist()
    for i in range(W):
        cands = [j for j in range(W) if j != i and not related[i, j]]
        if not cands:
            assert got[i] == -1
            continue
        cos = [float(v[i] @ v[j] / (v[i].norm() * v[j].norm())) for j in cands]
        assert got[i] == cands[max(range(len(cands)), key=cos.__getitem__)]
    assert got[3] == -1


def test_pair_batch_layout_and_negative_rate(tokenizer, backbone):
    tok = tokenizer
    ids = {w: tok(w, add_special_tokens=False)["input_ids"] for w in
           ("dog", "animal", "cat", "city", "red", "green", "dogs", "paris")}
    pairs = [(ids["dog"], ids["animal"]), (ids["cat"], ids["animal"]), (ids["city"], ids["paris"]),
             (ids["red"], ids["green"]), (ids["dogs"], ids["cat"])]
    weight = backbone.model.get_input_embeddings().weight
    b = pair_batch(pairs, weight, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    # every word has an unrelated word in this batch: two negatives per positive
    assert b["pair_labels"].tolist() == [1] * 5 + [0] * 10
    for n, (a, c) in enumerate(pairs):
        seq = [tok.cls_token_id, *a, tok.sep_token_id, *c, tok.sep_token_id]
        assert b["pair_input_ids"][n, :len(seq)].tolist() == seq
        assert b["pair_token_type_ids"][n, :len(seq)].tolist() == [0] * (2 + len(a)) + [1] * (len(c) + 1)
        assert b["pair_attention_mask"][n].sum() == len(seq)
    words = list(dict.fromkeys(tuple(w) for p in pairs for w in p))
    vecs = word_vectors(weight, words)
    related = {(tuple(a), tuple(c)) for a, c in pairs} | {(tuple(c), tuple(a)) for a, c in pairs}
    k = 5
    for a, c in pairs:
        for w, kept_left in ((a, True), (c, False)):           # (a, t_a), then (t_c, c)
            row = b["pair_input_ids"][k]
            n = int(b["pair_attention_mask"][k].sum())
            sep = row[:n].tolist().index(tok.sep_token_id)
            left, right = row[1:sep].tolist(), row[sep + 1:n - 1].tolist()
            assert (left if kept_left else right) == list(w)
            got = right if kept_left else left
            assert (tuple(w), tuple(got)) not in related and got != list(w)
            i = words.index(tuple(w))
            cos = torch.nn.functional.cosine_similarity(vecs[i:i + 1], vecs)
            best = max((j for j in range(len(words)) if j != i and (tuple(w), words[j]) not in related),
                       key=lambda j: float(cos[j]))
            assert got == list(words[best])
            k += 1
    lone = pair_batch([(ids["dog"], ids["animal"])], weight, tok.cls_token_id, tok.sep_token_id,
                      tok.pad_token_id)
    assert lone["pair_labels"].tolist() == [1]           # no unrelated word in the batch: no negative


def _rows(tokenizer, kg_dir, docs: list[str], per_doc: int = 2) -> tuple[list[dict], Counter]:
    opts = LibertOptions(pairs_per_doc=per_doc)
    rec = LibertRecipe()
    state = rec.encoder({"kg": str(kg_dir)}, opts, tokenizer, 32)
    return rec.encode_docs(state, [{"id": f"d{i}", "text": t, "mentions": []} for i, t in enumerate(docs)])


def test_loss_is_mlm_plus_relation_cross_entropy(tokenizer, backbone, tmp_path):
    kg = write_tiny_wordnet(tmp_path / "kg")
    rows, counts = _rows(tokenizer, kg, SENTENCES * 2)
    assert counts["synonym_examples"] + counts["hypernym_examples"] == 2 * len(rows)
    rec = LibertRecipe()
    batch = rec.collate(backbone, rows, {}, LibertOptions(), 32)
    model = Libert(backbone, LibertConfig(lcr_weight=0.5)).eval()
    out = model.loss(batch, torch.Generator().manual_seed(7))
    ids, labels = mlm_mask(batch["input_ids"], batch["maskable"], tokenizer.mask_token_id,
                           len(tokenizer), torch.Generator().manual_seed(7))
    hidden = backbone.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    at = labels != IGNORE
    logp = torch.log_softmax(model.mlm(hidden[at]), -1)
    mlm = -logp[torch.arange(int(at.sum())), labels[at]].mean()
    h = backbone.model(input_ids=batch["pair_input_ids"], token_type_ids=batch["pair_token_type_ids"],
                       attention_mask=batch["pair_attention_mask"]).last_hidden_state[:, 0]
    logits = model.relation.out(torch.tanh(model.relation.pool(h)))
    lcr = sum(-math.log(math.exp(z[y]) / (math.exp(z[0]) + math.exp(z[1])))
              for z, y in zip(logits.tolist(), batch["pair_labels"].tolist())) / len(logits)
    torch.testing.assert_close(out["mlm"], mlm, rtol=1e-5, atol=1e-6)
    assert out["lcr"].item() == pytest.approx(lcr, rel=1e-5)
    assert out["total"].item() == pytest.approx(mlm.item() + 0.5 * lcr, rel=1e-5)


def test_mlm_masking_rate_in_libert_batches(tokenizer, backbone, tmp_path):
    kg = write_tiny_wordnet(tmp_path / "kg")
    rows, _ = _rows(tokenizer, kg, SENTENCES * 40)
    batch = LibertRecipe().collate(backbone, rows, {}, LibertOptions(), 32)
    n = int(batch["maskable"].sum())
    _, labels = mlm_mask(batch["input_ids"], batch["maskable"], tokenizer.mask_token_id,
                         len(tokenizer), torch.Generator().manual_seed(0))
    assert abs(int((labels != IGNORE).sum()) / n - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n)
    assert not (labels != IGNORE)[~batch["maskable"]].any()
    # 2 pairs per document, 2 negatives per pair (every batch word has unrelated ones here)
    assert batch["pair_labels"].tolist().count(1) == 2 * len(rows)
    assert batch["pair_labels"].tolist().count(0) == 4 * len(rows)


def test_pairs_too_long_are_counted(tokenizer, backbone, tmp_path):
    from pipeline import StageFailed

    kg = write_tiny_wordnet(tmp_path / "kg")
    rec = LibertRecipe()
    # [CLS] w1 [SEP] w2 [SEP] needs 5 positions for two one-piece words: none fits in 4
    state = rec.encoder({"kg": str(kg)}, LibertOptions(pairs_per_doc=3), tokenizer, 4)
    rows, counts = rec.encode_docs(state, [{"id": "d", "text": "the dog", "mentions": []}])
    assert counts["pairs_too_long"] == 3 and rows[0]["pair_a"] == []
    # a batch whose documents' pairs were all too long is an MLM-only step, not a crash mid-run
    batch = rec.collate(backbone, rows, {}, LibertOptions(), 4)
    assert "pair_input_ids" not in batch and batch["n_tokens"] == int(batch["attention_mask"].sum())
    losses = Libert(backbone).loss(batch, torch.Generator().manual_seed(0))
    assert float(losses["lcr"]) == 0.0 and torch.equal(losses["total"], losses["mlm"])
    losses["total"].backward()                        # the relation head stays in the graph (DDP)
    # a corpus where no pair fits at all is refused once encoded
    with pytest.raises(StageFailed, match="no relation pair fits max_length"):
        rec.finish({"pairs_per_doc": 3}, {**counts, "relation_pairs": 20})
    state = rec.encoder({"kg": str(kg)}, LibertOptions(pairs_per_doc=3), tokenizer, 5)
    rows, counts = rec.encode_docs(state, [{"id": "d", "text": "the dog", "mentions": []}])
    assert "pairs_too_long" not in counts and len(rows[0]["pair_a"]) == 3


def test_libert_recipe_pretrains_and_counts_its_pairs(ray_local, tmp_path, artifacts):  # noqa: F811
    metrics, hist = run_recipe(tmp_path, artifacts, recipe="libert", options={"pairs_per_doc": 2})
    # 20 documents x 2 pairs walk twice through the 20 pairs
    assert metrics["relation_pairs"] == N_SYNONYMS + N_HYPERNYMS and metrics["relation_pairs_unused"] == 0
    assert metrics["synonym_examples"] == 2 * N_SYNONYMS and metrics["hypernym_examples"] == 2 * N_HYPERNYMS
    assert metrics["entities_not_synsets"] == 1 and metrics["lemmas_multiword"] == 2
    assert {"loss_mlm", "loss_lcr", "loss_total"} <= set(hist[0])
    assert falls(hist, "loss_lcr") and falls(hist, "loss_total")
    # the artifact rebuilds as fusion.finetune rebuilds it (no resources), and fine-tunes as mlm
    from fusion.finetune.encoders import SPAN_ENCODERS, span_encoder_for
    from fusion.models.backbone import artifact_backbone
    from fusion.pretrain.loop import build_pretrained

    _, opts, model = build_pretrained(tmp_path / "pt", artifact_backbone(tmp_path / "pt"), {})
    assert isinstance(model, Libert) and opts.pairs_per_doc == 2
    assert span_encoder_for("libert") is SPAN_ENCODERS.get("mlm")


@pytest.mark.skipif(not os.environ.get("STELE_DATA"), reason="needs STELE_DATA with wordnet/")
def test_real_wordnet_pairs():
    from knowledge.sources.base import Quarantine
    from knowledge.sources.wordnet import WordNetSource

    root = Path(os.environ["STELE_DATA"]) / "wordnet"
    if not (root / "data.noun").is_file():
        pytest.skip(f"{root} has no WordNet")
    src = WordNetSource(path=str(root))
    ents = list(src.entities(Quarantine("wordnet")))
    index = {e.id: i for i, e in enumerate(ents)}
    edges = [(index[t.head], index[t.tail]) for t in src.triples(Quarantine("wordnet")) if t.relation == "@"]
    pairs, counts = relation_pairs([[e.name, *e.aliases] for e in ents], edges)
    found = set(pairs)
    assert ("dog", "canine", HYPERNYM) in found and ("car", "auto", SYNONYM) in found
    assert counts["synonym_pairs"] + counts["hypernym_pairs"] == len(pairs)
