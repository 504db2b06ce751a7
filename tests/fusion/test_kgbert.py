"""KG-BERT (fusion/models/kgbert.py, the ``kgbert`` recipe): the input layout, both losses against
their equations written out, corruption rates and the known-triple filter, entities without text
counted, filtered ranking against a hand-computed case and against knowledge.evaluate, one
fusion.pretrain run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fusion.models.kgbert import (KgBert, KgBertConfig, TripleScorer, corrupt, pad_sequences, pair_input,
                                  rank_candidates, triple_input, truncate_longest)
from tests.fusion.conftest import run_pretrain
from tests.fusion.test_kepler import ENTITIES, RELATIONS, TRIPLES, se_bound, write_kg

CLS, SEP = 2, 3


def make(backbone, **config) -> KgBert:
    return KgBert(backbone, KgBertConfig(num_relations=len(RELATIONS), **config)).eval()


def words(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# inputs


def test_triple_and_pair_inputs_are_laid_out_as_in_the_paper():
    ids, types = triple_input([10, 11], [20], [30, 31, 32], CLS, SEP, 64)
    assert ids == [CLS, 10, 11, SEP, 20, SEP, 30, 31, 32, SEP]
    assert types == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]  # head and tail segment A, relation B
    ids, types = pair_input([10, 11], [30], CLS, SEP, 64)
    assert ids == [CLS, 10, 11, SEP, 30, SEP] and types == [0, 0, 0, 0, 1, 1]


def test_truncation_takes_from_the_longest_part_first():
    assert truncate_longest([[1] * 5, [2] * 2, [3] * 4], 8) == [[1] * 3, [2] * 2, [3] * 3]
    ids, types = triple_input(list(range(10, 20)), [20], list(range(30, 33)), CLS, SEP, 12)
    # 8 wordpieces besides [CLS] and 3 [SEP]s: 14 -> 8 takes 6 from the head, 10 -> 4
    assert ids == [CLS, 10, 11, 12, 13, SEP, 20, SEP, 30, 31, 32, SEP] and len(types) == 12
    with pytest.raises(ValueError, match="no room"):
        triple_input([1], [2], [3], CLS, SEP, 5)


# ---------------------------------------------------------------------------------------------
# the losses


def toy_batch(tokenizer) -> dict[str, torch.Tensor]:
    w = lambda s: words(tokenizer, s)  # noqa: E731
    triples = [triple_input(w("beijing"), w("capital of"), w("china"), CLS, SEP, 32),
               triple_input(w("paris"), w("capital of"), w("germany"), CLS, SEP, 32),
               triple_input(w("apple"), w("founded by"), w("steve jobs"), CLS, SEP, 32)]
    pairs = [pair_input(w("beijing"), w("china"), CLS, SEP, 32),
             pair_input(w("apple"), w("steve"), CLS, SEP, 32)]
    return {**pad_sequences(triples, tokenizer.pad_token_id, "triple"),
            **pad_sequences(pairs, tokenizer.pad_token_id, "pair"),
            "label": torch.tensor([1.0, 0.0, 1.0]), "relation": torch.tensor([0, 1])}


def test_losses_match_the_papers_equations_written_out(backbone, tokenizer):
    torch.manual_seed(0)
    model = make(backbone, relation_weight=0.5).double()
    batch = toy_batch(tokenizer)
    out = model.loss(batch)
    C = backbone.model(input_ids=batch["triple_input_ids"], attention_mask=batch["triple_attention_mask"],
                       token_type_ids=batch["triple_token_type_ids"]).last_hidden_state[:, 0].tolist()
    w, b = model.triple_head.weight[0].tolist(), model.triple_head.bias.item()
    bce = 0.0
    for c, y in zip(C, batch["label"].tolist()):
        s = 1 / (1 + math.exp(-(sum(a * v for a, v in zip(c, w)) + b)))
        bce -= y * math.log(s) + (1 - y) * math.log(1 - s)
    assert out["triple"].item() == pytest.approx(bce / 3, rel=1e-9)
    P = backbone.model(input_ids=batch["pair_input_ids"], attention_mask=batch["pair_attention_mask"],
                       token_type_ids=batch["pair_token_type_ids"]).last_hidden_state[:, 0].tolist()
    W, B = model.relation_head.weight.tolist(), model.relation_head.bias.tolist()
    ce = 0.0
    for c, r in zip(P, batch["relation"].tolist()):
        z = [sum(a * v for a, v in zip(c, row)) + bias for row, bias in zip(W, B)]
        ce -= z[r] - math.log(sum(math.exp(v) for v in z))
    assert out["relation"].item() == pytest.approx(ce / 2, rel=1e-9)
    assert out["total"].item() == pytest.approx(bce / 3 + 0.5 * ce / 2, rel=1e-9)


def test_a_task_with_weight_zero_is_skipped_but_stays_in_the_graph(backbone, tokenizer):
    out = make(backbone, relation_weight=0.0).loss(toy_batch(tokenizer))
    assert out["relation"].item() == 0.0 and out["relation"].requires_grad
    torch.testing.assert_close(out["total"], out["triple"])


def test_triple_classification_learns_to_tell_positives_from_corruptions(backbone, tokenizer):
    torch.manual_seed(0)
    model = KgBert(backbone, KgBertConfig(num_relations=len(RELATIONS), relation_weight=0.0)).train()
    batch = toy_batch(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model.loss(batch)["triple"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    s = model.triple_logits(batch["triple_input_ids"], batch["triple_attention_mask"],
                            batch["triple_token_type_ids"])
    assert s[0] > s[1] and s[2] > s[1]
    # the link-prediction scorer scores the same sequences as the model does
    ents = [words(tokenizer, n) for n in ("beijing", "china", "paris", "germany", "apple", "steve jobs")]
    rels = [words(tokenizer, r) for r in RELATIONS]
    scorer = TripleScorer(model, tokenizer, ents, rels, 32, batch_size=2)
    torch.testing.assert_close(scorer(torch.tensor([[0, 0, 1], [2, 0, 3], [4, 1, 5]])), s.detach())


# ---------------------------------------------------------------------------------------------
# negatives


def test_corruptions_replace_head_or_tail_half_the_time_and_are_never_known():
    known = {(0, 0, 1), (0, 0, 2), (3, 0, 1)}
    rng = np.random.default_rng(0)
    heads = kept = 0
    n = 6000
    for _ in range(n):
        neg = corrupt(0, 0, 1, list(range(6)), known, rng)
        if neg is None:
            continue
        h, r, t = neg
        assert (h, r, t) not in known and r == 0 and (h == 0) != (t == 1)
        heads += h != 0
        kept += 1
    # a draw fails when known (or the positive): a head draw for 0 and 3, a tail draw for 1 and 2,
    # 1/3 either way, so the sides stay even and five failures in a row happen (1/3)^5 of the time
    assert se_bound(heads, kept, 0.5)
    assert se_bound(n - kept, n, (1 / 3) ** 5)
    assert corrupt(0, 0, 1, [0, 1], {(0, 0, 1), (1, 0, 1), (0, 0, 0)}, rng) is None  # all known


# ---------------------------------------------------------------------------------------------
# the recipe's rows


def test_recipe_rows_count_entities_without_text_and_known_corruptions(tmp_path, tokenizer):
    from fusion.pretrain.knowledge_recipes import KgBertOptions, KgBertRecipe

    kg = write_kg(tmp_path / "kg")
    inputs = {"kg": str(kg)}
    rec, opt = KgBertRecipe(), KgBertOptions(entity_text="description", negatives=3)
    units = rec.units(inputs, opt, None)
    assert units == [{"unit": 0, "start": 0, "stop": 5}]  # the 5 train triples
    state = rec.encoder(inputs, opt, tokenizer, 32)
    rows, counts = rec.encode(state, inputs, units[0])
    # apple-founded-steve (steve: no description) and dog-animal-china (blank) are left out
    assert counts["triples_without_text"] == 2 and counts["positives"] == len(rows) == 3
    assert (counts["negatives_head"] + counts["negatives_tail"] + counts.get("negatives_known_left_out", 0)
            == 3 * 3)
    for row in rows:
        assert row["labels"][0] == 1 and set(row["labels"][1:]) <= {0}
        assert len(row["triple_ids"]) == len(row["labels"]) == len(row["triple_types"])
    first = rows[0]
    d = lambda i: words(tokenizer, ENTITIES[i][2])  # noqa: E731
    assert first["triple_ids"][0] == [CLS, *d(0), SEP, *words(tokenizer, "capital of"), SEP, *d(1), SEP]
    assert first["pair_ids"] == [CLS, *d(0), SEP, *d(1), SEP] and first["relation"] == 0
    # the KG's counts come with unit 0 (the corpus sums them once); the stage's process reads footers
    assert counts["entities_without_text"] == 2 and counts["entities_with_text"] == 7
    assert rec.resources(inputs, opt) == {"num_relations": 3}
    rec.finish({}, dict(counts))


def test_fewer_than_two_entities_with_text_fail_in_finish(tmp_path, tokenizer):
    from fusion.pretrain.knowledge_recipes import KgBertOptions, KgBertRecipe
    from pipeline import StageFailed

    ents = [(i, n, d if k == 0 else "") for k, (i, n, d) in enumerate(ENTITIES)]
    inputs = {"kg": str(write_kg(tmp_path / "kg", entities=ents))}
    rec, opt = KgBertRecipe(), KgBertOptions(entity_text="description")
    rows, counts = rec.encode(rec.encoder(inputs, opt, tokenizer, 32), inputs,
                              rec.units(inputs, opt, None)[0])
    assert rows == [] and counts["entities_with_text"] == 1
    with pytest.raises(StageFailed, match="fewer than two entities have text"):
        rec.finish({}, dict(counts))


def test_recipe_leaves_out_the_pairs_finetuning_holds_out(tmp_path, tokenizer):
    from fusion.pretrain.knowledge_recipes import KgBertOptions, KgBertRecipe
    from fusion.splits import pair_key, split_of

    inputs = {"kg": str(write_kg(tmp_path / "kg"))}
    rec, opt = KgBertRecipe(), KgBertOptions(held_out_share=0.5, split_seed=0)
    train = [(h, r, t) for h, r, t, s in TRIPLES if s == "train"]
    held = {tr for tr in train if split_of(pair_key(ENTITIES[tr[0]][0], ENTITIES[tr[2]][0]), 0.5) == "test"}
    assert 0 < len(held) < len(train)
    state = rec.encoder(inputs, opt, tokenizer, 32)
    rows, counts = rec.encode(state, inputs, rec.units(inputs, opt, None)[0])
    assert counts["triples_held_out_pairs"] == len(held) and counts["positives"] == len(train) - len(held)
    assert sorted(r["relation"] for r in rows) == sorted(r for h, r, t in train if (h, r, t) not in held)


# ---------------------------------------------------------------------------------------------
# link prediction


SCORES = {(0, 0, 1): 3.0,                                           # the test triple
          (0, 0, 0): 5.0, (0, 0, 2): 9.0, (0, 0, 3): 3.0,           # tails of (0, 0, ?)
          (1, 0, 1): 1.0, (2, 0, 1): 4.0, (3, 0, 1): 0.0}           # heads of (?, 0, 1)


def table_score(triples: torch.Tensor) -> torch.Tensor:
    return torch.tensor([SCORES[tuple(t)] for t in triples.tolist()])


def test_filtered_ranking_on_a_hand_computed_case():
    test, known = [[0, 0, 1]], [[0, 0, 1], [0, 0, 2]]
    out = rank_candidates(table_score, test, known, num_entities=4, cap=None)
    # head: candidates 0 (target, 3), 1 (1), 2 (4), 3 (0): one above -> rank 2
    # tail: 2 (9) is the known (0, 0, 2) and filtered; 0 (5) above, 3 (3) tied:
    #       optimistic 2, pessimistic 3 -> realistic 2.5 (raw it would be 3.5)
    np.testing.assert_array_equal(out["ranks"]["rank"], [2.0, 2.5])
    assert out["filtered"]["both"]["mrr"] == pytest.approx((1 / 2 + 1 / 2.5) / 2)
    assert out["filtered"]["tail"]["hits@1"] == 0.0 and out["filtered"]["both"]["hits@3"] == 1.0
    assert all(block["candidate_cap"] is None for block in out["filtered"].values())
    capped = rank_candidates(table_score, test, known, num_entities=4, cap=1, seed=3)
    assert all(block["candidate_cap"] == 1 for block in capped["filtered"].values())
    assert capped["protocol"]["candidate_cap"] == 1
    np.testing.assert_array_equal(capped["ranks"]["candidates"], [1, 1])
    # head: the one drawn of {1, 2, 3} gives 1.0 or 2.0; tail: of {0, 3}, 2.0 or 1.5
    assert capped["ranks"]["rank"][0] in (1.0, 2.0) and capped["ranks"]["rank"][1] in (2.0, 1.5)


def test_uncapped_ranking_equals_knowledge_evaluate():
    from knowledge.evaluate import rank_metrics

    g = torch.Generator().manual_seed(0)
    N, R = 7, 2
    S = torch.randint(0, 4, (N, R, N), generator=g).double()  # small integers: many ties
    test = torch.tensor([[0, 0, 1], [2, 1, 3], [4, 0, 0], [6, 1, 6]])
    known = torch.cat([test, torch.tensor([[0, 0, 2], [5, 1, 3], [4, 0, 6], [1, 0, 0]])])
    mine = rank_candidates(lambda tr: S[tr[:, 0], tr[:, 1], tr[:, 2]], test, known, N, cap=None)
    ref = rank_metrics((lambda h, r: S[h, r, :], lambda r, t: S[:, r, t].T), test, known, N,
                       num_relations=R)
    np.testing.assert_allclose(mine["ranks"]["rank"], ref["ranks"]["filtered"])
    for k in ("mrr", "mr", "hits@1", "hits@3", "hits@10"):
        assert mine["filtered"]["both"][k] == pytest.approx(ref["filtered"]["both"][k])


def test_a_candidate_cap_scores_that_many_filtered_candidates_besides_the_target():
    seen = []

    def score(triples):
        seen.append(triples.clone())
        return torch.zeros(len(triples))

    known = [[0, 0, 1], [0, 0, 2], [0, 0, 3]]
    out = rank_candidates(score, [[0, 0, 1]], known, num_entities=50, cap=10, sides=("tail",))
    tails = seen[0][:, 2].tolist()
    assert len(tails) == 11 and tails[0] == 1 and len(set(tails)) == 11
    assert 2 not in tails and 3 not in tails  # filtered before the draw, so the cap counts real candidates
    assert out["ranks"]["rank"][0] == 6.0  # 11 tied: (1 + 11) / 2


# ---------------------------------------------------------------------------------------------
# through the stage


def test_kgbert_recipe_pretrains_through_the_stage(ray_local, tmp_path, backbone_dir):
    from fusion.pretrain.loop import load_pretrained
    metrics, out = run_pretrain(tmp_path, "pt", {"kg": write_kg(tmp_path / "kg")}, {
        "recipe": "kgbert", "backbone": str(backbone_dir), "steps": 24, "batch_size": 4, "lr": 3e-3,
        "warmup_steps": 2, "checkpoint_every": 24, "max_length": 24, "precision": "fp32",
        "options": {"negatives": 2}})
    hist = json.loads((out / "history.json").read_text())
    assert metrics["positives"] == 5 and metrics["num_relations"] == 3  # names: every entity has one
    drawn = metrics["negatives_head"] + metrics["negatives_tail"]
    assert drawn + metrics.get("negatives_known_left_out", 0) == 10
    assert {"loss_triple", "loss_relation", "loss_total"} <= set(hist[0])
    total = [h["loss_total"] for h in hist]
    assert sum(total[-6:]) / 6 < sum(total[:6]) / 6
    _, _, _, model, _ = load_pretrained(out)
    assert isinstance(model, KgBert) and model.relation_head.out_features == 3
    # fine-tuning reads the shared text encoder
    import torch

    from fusion.finetune.encoders import EncoderSource, span_encoder_for
    from fusion.models.backbone import artifact_backbone

    meta = json.loads((out / "recipe.json").read_text())
    enc = span_encoder_for("kgbert")(EncoderSource("kgbert", out, meta["options"], artifact_backbone(out),
                                                   24, 24, None, None))
    ids = torch.tensor([[2, 7, 9, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    enc.module.eval()                      # (fine-tuning sets the mode; dropout off to compare)
    with torch.no_grad():
        torch.testing.assert_close(enc.token_features(batch), model.encoder(**batch).last_hidden_state)
