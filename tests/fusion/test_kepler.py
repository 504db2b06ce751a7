"""KEPLER (fusion/models/kepler.py, the ``kepler`` recipe): the KE loss against its equation written
out naively, entity vectors as the encoder's first token, negative sampling rates, the batch layout,
missing descriptions counted, link prediction through knowledge.evaluate, one fusion.pretrain run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from fusion.models.kepler import (Kepler, KeplerConfig, candidate_scorer, description_batch, draw_negatives,
                                  encode_entities, ke_batch, ke_loss)
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from tests.fusion.conftest import run_pretrain, write_linked

# (id, name, description); steve jobs and the dog have none
ENTITIES = [("t:beijing", "beijing", "the capital city of china"),
            ("t:china", "china", "a country in asia"),
            ("t:paris", "paris", "the capital city of france"),
            ("t:france", "france", "a country with paris"),
            ("t:berlin", "berlin", "the capital city of germany"),
            ("t:germany", "germany", "a country with berlin"),
            ("t:apple", "apple", "a company founded by steve jobs"),
            ("t:steve", "steve jobs", ""),
            ("t:dog", "dog", "  ")]
RELATIONS = ["capital of", "founded by", "animal of"]
TRIPLES = [(0, 0, 1, "train"), (2, 0, 3, "train"), (4, 0, 5, "train"), (6, 1, 7, "train"),
           (8, 2, 1, "train"), (2, 0, 3, "valid"), (4, 0, 5, "test")]
SENTENCES = ["beijing is the capital of china", "paris is the capital of france",
             "berlin is the capital of germany", "apple was founded by steve jobs"]


def write_kg(out: Path, entities=ENTITIES, relations=RELATIONS, triples=TRIPLES) -> Path:
    """A ``knowledge.ingest`` artifact in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(entities)
    KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [e[0] for e in entities], "name": [e[1] for e in entities],
                  "aliases": [[] for _ in entities], "description": [e[2] for e in entities],
                  "types": [[] for _ in entities], "source": ["t"] * n}, schema=ENTITY_SCHEMA),
        pa.table({"idx": list(range(len(relations))), "id": [f"t:r{i}" for i in range(len(relations))],
                  "name": relations, "source": ["t"] * len(relations)}, schema=RELATION_SCHEMA),
        pa.table({"head": [t[0] for t in triples], "relation": [t[1] for t in triples],
                  "tail": [t[2] for t in triples], "split": [t[3] for t in triples]},
                 schema=TRIPLE_SCHEMA)).save(out)
    return out


def write_text(out: Path, docs: int = 16) -> Path:
    texts = [(f"d{i}", SENTENCES[i % len(SENTENCES)]) for i in range(docs)]
    return write_linked(out, texts, [])


def se_bound(count: int, n: int, p: float, k: float = 4.0) -> bool:
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


def make(backbone, **config) -> Kepler:
    return Kepler(backbone, KeplerConfig(num_relations=len(RELATIONS), **config)).eval()


def toy_batch(tokenizer, n: int = 2) -> dict[str, torch.Tensor]:
    """Two MLM texts and three triples over four entities, ``n`` corruptions each."""
    enc = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt", return_special_tokens_mask=True)
    descs = [tokenizer(ENTITIES[i][2])["input_ids"] for i in range(4)]
    ids, mask = description_batch(descs, tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(0)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "maskable": enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool(),
            "entity_input_ids": ids, "entity_attention_mask": mask,
            "ke_head": torch.tensor([0, 2, 1]), "ke_relation": torch.tensor([0, 1, 2]),
            "ke_tail": torch.tensor([1, 3, 0]), "ke_negative": torch.randint(4, (3, n), generator=g),
            "ke_negative_is_head": torch.rand(3, n, generator=g) < 0.5}


# ---------------------------------------------------------------------------------------------
# the model against its equations


def test_entity_vector_is_the_encoders_first_token_of_the_description(backbone, tokenizer):
    model = make(backbone)
    ids = tokenizer(ENTITIES[0][2], return_tensors="pt")["input_ids"]
    alone = backbone.model(input_ids=ids).last_hidden_state[0, 0]
    # padded beside a longer description: the padding must not change it
    padded, mask = description_batch([ids[0].tolist(), tokenizer(ENTITIES[6][2])["input_ids"]],
                                     tokenizer.pad_token_id)
    torch.testing.assert_close(model.entity_vectors(padded, mask)[0], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_ke_loss_matches_the_papers_equation_written_out(backbone, tokenizer, p):
    torch.manual_seed(0)
    model = make(backbone, p=p, gamma=3.0).double()
    batch = toy_batch(tokenizer, n=3)
    got = model.loss(batch, torch.Generator().manual_seed(1))["ke"]
    ent = model.entity_vectors(batch["entity_input_ids"], batch["entity_attention_mask"]).tolist()
    rel = model.relations.weight.tolist()

    def d(h, r, t):  # ||h + r - t||_p, element by element
        return sum(abs(a + b - c) ** p for a, b, c in zip(h, r, t)) ** (1 / p)

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    total = 0.0
    for i in range(3):
        h, r, t = batch["ke_head"][i].item(), batch["ke_relation"][i].item(), batch["ke_tail"][i].item()
        term = -log_sigmoid(3.0 - d(ent[h], rel[r], ent[t]))
        negs = batch["ke_negative"][i].tolist()
        flips = batch["ke_negative_is_head"][i].tolist()
        for e, flip in zip(negs, flips):
            hh, tt = (e, t) if flip else (h, e)
            term -= log_sigmoid(d(ent[hh], rel[r], ent[tt]) - 3.0) / len(negs)
        total += term
    assert got.item() == pytest.approx(total / 3, rel=1e-9)


def test_ke_loss_function_against_logs_of_sigmoids():
    pos, neg = torch.tensor([0.5, 6.0]), torch.tensor([[1.0, 9.0], [2.0, 3.0]])
    def log_s(x):
        return torch.log(torch.sigmoid(x))

    want = ((-log_s(4 - pos[0]) - (log_s(neg[0, 0] - 4) + log_s(neg[0, 1] - 4)) / 2)
            + (-log_s(4 - pos[1]) - (log_s(neg[1, 0] - 4) + log_s(neg[1, 1] - 4)) / 2)) / 2
    torch.testing.assert_close(ke_loss(pos, neg, 4.0), want)


def test_total_is_mlm_plus_weighted_ke_and_a_batch_without_triples_gives_zero_ke(backbone, tokenizer):
    model = make(backbone, ke_weight=0.5)
    batch = toy_batch(tokenizer)
    out = model.loss(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["total"], out["mlm"] + 0.5 * out["ke"])
    empty = {**batch, **ke_batch([], tokenizer.pad_token_id)}
    out = model.loss(empty, torch.Generator().manual_seed(0))
    assert out["ke"].item() == 0.0 and out["ke"].requires_grad


def test_training_on_triples_separates_positives_from_corruptions(backbone, tokenizer):
    torch.manual_seed(0)
    model = Kepler(backbone, KeplerConfig(num_relations=len(RELATIONS))).train()
    batch = toy_batch(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        ke = model.loss(batch, torch.Generator().manual_seed(0))["ke"]
        first = ke.item() if first is None else first
        opt.zero_grad()
        ke.backward()
        opt.step()
    assert ke.item() < 0.5 * first


# ---------------------------------------------------------------------------------------------
# negative sampling and the batch layout


def test_negatives_replace_head_or_tail_half_the_time_with_any_other_described_entity():
    described = [0, 1, 2, 3, 4, 5, 6]  # 7 described entities
    position = {e: i for i, e in enumerate(described)}
    rng = np.random.default_rng(0)
    heads = n = 0
    drawn = {"head": [], "tail": []}
    for _ in range(3000):
        ents, flips = draw_negatives(2, 5, described, position, 3, rng)
        assert len(ents) == len(flips) == 3  # exactly n per positive
        for e, f in zip(ents, flips):
            drawn["head" if f else "tail"].append(e)
            heads += f
            n += 1
    assert se_bound(heads, n, 0.5)
    assert 2 not in drawn["head"] and 5 not in drawn["tail"]  # never the entity it replaces
    for side, replaced in (("head", 2), ("tail", 5)):
        counts = np.bincount(drawn[side], minlength=7)
        others = [e for e in described if e != replaced]
        assert all(se_bound(int(counts[e]), len(drawn[side]), 1 / 6) for e in others)


def test_head_prob_sets_the_share_of_head_corruptions():
    rng = np.random.default_rng(1)
    flips = [f for _ in range(2000) for f in draw_negatives(0, 1, [0, 1, 2], {0: 0, 1: 1, 2: 2}, 2, rng,
                                                           head_prob=0.2)[1]]
    assert se_bound(sum(flips), len(flips), 0.2)


def test_ke_batch_encodes_each_entity_once_and_keeps_every_triple(tokenizer):
    rows = [{"ke_entities": [10, 11, 12], "ke_entity_tokens": [[2, 7, 3], [2, 8, 3], [2, 9, 9, 3]],
             "ke_triples": [[0, 1, 1]], "ke_negatives": [[2]], "ke_negative_is_head": [[True]]},
            {"ke_entities": [11, 13, 10], "ke_entity_tokens": [[2, 8, 3], [2, 6, 3], [2, 7, 3]],
             "ke_triples": [[0, 0, 1], [2, 1, 0]], "ke_negatives": [[2], [1]],
             "ke_negative_is_head": [[False], [True]]}]
    b = ke_batch(rows, tokenizer.pad_token_id)
    assert b["entity_input_ids"].shape == (4, 4)  # 10, 11, 12, 13 once each
    kg = [10, 11, 12, 13]
    triples = [(kg[h], r, kg[t]) for h, r, t in zip(b["ke_head"].tolist(), b["ke_relation"].tolist(),
                                                     b["ke_tail"].tolist())]
    assert triples == [(10, 1, 11), (11, 0, 13), (10, 1, 11)]
    assert [kg[e] for e in b["ke_negative"][:, 0].tolist()] == [12, 10, 13]
    assert b["ke_negative_is_head"][:, 0].tolist() == [True, False, True]
    assert b["entity_attention_mask"].sum(1).tolist() == [3, 3, 4, 3]


def test_recipe_rows_pair_documents_with_described_triples_and_count_the_rest(tmp_path, tokenizer):
    from fusion.pretrain.knowledge_recipes import KeplerOptions, KeplerRecipe

    kg = write_kg(tmp_path / "kg")
    inputs = {"kg": str(kg), "text": str(write_text(tmp_path / "text", docs=6))}
    rec, opt = KeplerRecipe(), KeplerOptions(negatives=2, triples_per_doc=2)
    assert rec.resources(inputs, opt) == {"num_relations": 3}  # the footers only
    state = rec.encoder(inputs, opt, tokenizer, 32)
    rows, counts = rec.encode(state, inputs, {"unit": 0, "doc_start": 0, "doc_end": 6,
                                             "mention_start": 0, "mention_end": 0})
    # train triples 0-4: apple-founded-steve (no description) and dog-animal-china (blank) left out;
    # the KG's counts come with unit 0 only, so the corpus's sum holds them once
    assert counts["ke_triples"] == 3 and counts["ke_triples_without_text"] == 2
    assert counts["entities_with_text"] == 7 and counts["ke_triples_held_out"] == 0
    assert counts["ke_positives"] == 12 and counts["ke_negatives_head"] + counts["ke_negatives_tail"] == 24
    _, later = rec.encode(state, inputs, {"unit": 1, "doc_start": 0, "doc_end": 6,
                                          "mention_start": 0, "mention_end": 0})
    assert "ke_triples" not in later and later["ke_positives"] == 12
    seen = []
    for g, row in enumerate(rows):
        ents = row["ke_entities"]
        assert 7 not in ents and 8 not in ents  # nothing without a description, negatives included
        for e, tok in zip(ents, row["ke_entity_tokens"]):
            assert tok == tokenizer(ENTITIES[e][2], truncation=True, max_length=64)["input_ids"]
        seen += [(ents[h], r, ents[t]) for h, r, t in row["ke_triples"]]
    # 6 documents x 2 triples cycle through the 3 usable triples of the permutation: 4 times each
    assert sorted(set(seen)) == [(0, 0, 1), (2, 0, 3), (4, 0, 5)]
    assert all(seen.count(t) == 4 for t in set(seen)) and seen[:3] == seen[3:6]
    again, _ = rec.encode(rec.encoder(inputs, opt, tokenizer, 32), inputs,
                          {"unit": 0, "doc_start": 0, "doc_end": 6, "mention_start": 0, "mention_end": 0})
    assert again == rows  # seeded: a re-encoded corpus is the same


def test_held_out_entities_appear_in_no_triple_and_no_corruption(tmp_path, tokenizer):
    from fusion.pretrain.knowledge_recipes import KeplerOptions, KeplerRecipe
    from fusion.splits import split_of

    kg = write_kg(tmp_path / "kg")
    inputs = {"kg": str(kg), "text": str(write_text(tmp_path / "text", docs=40))}
    opt = KeplerOptions(negatives=3, held_out_entities=0.3, split_seed=4)
    held = {i for i, (eid, _, desc) in enumerate(ENTITIES)
            if desc.strip() and split_of(eid, 0.3, 4) == "test"}
    assert held and len(held) < 6  # the seed leaves something on both sides
    usable = [t for t in TRIPLES[:5] if ENTITIES[t[0]][2].strip() and ENTITIES[t[2]][2].strip()]
    kept = [t for t in usable if t[0] not in held and t[2] not in held]
    rec = KeplerRecipe()
    rows, res = rec.encode(rec.encoder(inputs, opt, tokenizer, 32), inputs,
                           {"unit": 0, "doc_start": 0, "doc_end": 40, "mention_start": 0, "mention_end": 0})
    assert res["entities_held_out"] == len(held) and res["ke_triples"] == len(kept) > 0
    assert res["ke_triples_held_out"] == len(usable) - len(kept)
    named = {e for row in rows for e in row["ke_entities"]}
    assert not named & held and named <= {0, 1, 2, 3, 4, 5, 6}


def test_held_out_pairs_leave_their_triples_out(tmp_path, tokenizer):
    from fusion.pretrain.knowledge_recipes import KeplerOptions, KeplerRecipe
    from fusion.splits import pair_key, split_of

    kg = write_kg(tmp_path / "kg")
    inputs = {"kg": str(kg), "text": str(write_text(tmp_path / "text", docs=12))}
    opt = KeplerOptions(held_out_share=0.5, split_seed=0)
    usable = [(h, r, t) for h, r, t, s in TRIPLES if s == "train" and h not in (7, 8) and t not in (7, 8)]
    held = [tr for tr in usable if split_of(pair_key(ENTITIES[tr[0]][0], ENTITIES[tr[2]][0]), 0.5) == "test"]
    assert 0 < len(held) < len(usable)  # the seed splits the three usable triples
    rec = KeplerRecipe()
    rows, res = rec.encode(rec.encoder(inputs, opt, tokenizer, 32), inputs,
                           {"unit": 0, "doc_start": 0, "doc_end": 12, "mention_start": 0, "mention_end": 0})
    assert res["ke_triples_held_out_pairs"] == len(held) and res["ke_triples"] == len(usable) - len(held)
    seen = {(r["ke_entities"][h], rel, r["ke_entities"][t]) for r in rows for h, rel, t in r["ke_triples"]}
    assert seen == set(usable) - set(held)


def test_a_kg_without_descriptions_is_a_clear_error(tmp_path, tokenizer):
    """Found by the encoding actors, counted, and failed in finish() from the summed counts."""
    from fusion.pretrain.knowledge_recipes import KeplerOptions, KeplerRecipe
    from pipeline import StageFailed

    kg = write_kg(tmp_path / "kg", entities=[(i, n, "") for i, n, _ in ENTITIES])
    inputs, rec = {"kg": str(kg), "text": str(write_text(tmp_path / "text", docs=4))}, KeplerRecipe()
    res = rec.resources(inputs, KeplerOptions())
    rows, counts = rec.encode(rec.encoder(inputs, KeplerOptions(), tokenizer, 32), inputs,
                              {"unit": 0, "doc_start": 0, "doc_end": 4, "mention_start": 0, "mention_end": 0})
    assert rows == [] and counts["ke_triples"] == 0 and counts["entities_without_text"] == len(ENTITIES)
    with pytest.raises(StageFailed, match="no triple of the KE splits has text"):
        rec.finish(res, dict(counts))
    # a table without a column the recipe reads: named by the stage's process, before any actor
    import pyarrow.parquet as pq

    bad = write_kg(tmp_path / "bad")
    pq.write_table(pq.read_table(bad / "entities.parquet").drop_columns(["description"]),
                   bad / "entities.parquet")
    with pytest.raises(StageFailed, match=r"entities.parquet: no column\(s\) \['description'\]"):
        rec.resources({"kg": str(bad)}, KeplerOptions())


# ---------------------------------------------------------------------------------------------
# link prediction


def test_link_prediction_scores_entities_from_their_descriptions_with_the_filtered_protocol(
        backbone, tokenizer):
    from knowledge.evaluate import rank_metrics

    torch.manual_seed(0)
    model = make(backbone, p=2.0)
    descs = [tokenizer(e[2] or e[1])["input_ids"] for e in ENTITIES]
    ent = encode_entities(model, descs, tokenizer.pad_token_id, batch_size=4)
    # batched encoding equals encoding one by one
    one = torch.cat([encode_entities(model, [d], tokenizer.pad_token_id) for d in descs])
    torch.testing.assert_close(ent, one, rtol=1e-5, atol=1e-5)
    test = torch.tensor([[0, 0, 1], [8, 2, 1]])  # the dog is in no training triple: inductive
    known = torch.tensor([[0, 0, 1], [8, 2, 1], [2, 0, 1]])
    out = rank_metrics(candidate_scorer(model, ent), test, known, len(ENTITIES), num_relations=3)
    rel = model.relations.weight.detach()
    want = []
    for side in ("head", "tail"):
        for h, r, t in test.tolist():
            def score(a, b):
                return -torch.linalg.vector_norm(ent[a] + rel[r] - ent[b]).item()
            true = score(h, t)
            filt = {x for x, y, z in known.tolist() if y == r and ((side == "tail" and x == h and z != t)
                                                                   or (side == "head" and z == t and x != h))}
            cands = [e for e in range(len(ENTITIES)) if e not in filt]
            s = [score(e, t) if side == "head" else score(h, e) for e in cands]
            want.append((1 + sum(v > true for v in s) + sum(v >= true for v in s)) / 2)
    np.testing.assert_allclose(out["ranks"]["filtered"], want)


# ---------------------------------------------------------------------------------------------
# through the stage


def test_kepler_recipe_pretrains_through_the_stage(ray_local, tmp_path, tokenizer, backbone_dir):
    arts = {"kg": write_kg(tmp_path / "kg"), "text": write_text(tmp_path / "text")}
    metrics, out = run_pretrain(tmp_path, "pt", arts, {
        "recipe": "kepler", "backbone": str(backbone_dir), "steps": 24, "batch_size": 4, "lr": 3e-3,
        "warmup_steps": 2, "checkpoint_every": 24, "max_length": 16, "precision": "fp32",
        "options": {"negatives": 2, "description_length": 12}})
    hist = json.loads((out / "history.json").read_text())
    assert metrics["ke_triples"] == 3 and metrics["ke_triples_without_text"] == 2
    assert metrics["ke_positives"] == 16 and metrics["num_relations"] == 3
    assert {"loss_mlm", "loss_ke", "loss_total"} <= set(hist[0])
    ke = [h["loss_ke"] for h in hist]
    assert sum(ke[-6:]) / 6 < sum(ke[:6]) / 6
    meta = json.loads((out / "recipe.json").read_text())
    assert meta["resources_meta"]["num_relations"] == 3  # enough to rebuild the model
    from fusion.pretrain.loop import load_pretrained

    _, _, _, model, _ = load_pretrained(out)
    assert isinstance(model, Kepler) and model.relations.weight.shape == (3, 32)
    # fine-tuning reads the shared text encoder
    from fusion.finetune.encoders import EncoderSource, span_encoder_for
    from fusion.models.backbone import artifact_backbone

    enc = span_encoder_for("kepler")(EncoderSource("kepler", out, meta["options"], artifact_backbone(out),
                                                   16, 16, None, None))
    ids = torch.tensor([[2, 7, 9, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    enc.module.eval()                      # (fine-tuning sets the mode; dropout off to compare)
    with torch.no_grad():
        torch.testing.assert_close(enc.token_features(batch),
                                   model.encoder(**batch).last_hidden_state)
