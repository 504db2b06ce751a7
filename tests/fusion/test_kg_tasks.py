"""``fusion.finetune``'s tasks built from the KG alone (``fusion.finetune.kg_tasks``): triple
classification's corrupted twins are never facts and keep the relation's positions, the lexical
split shares no word between training and test, supersense targets are found as written or
inflected, what cannot be used is counted, and the stage fine-tunes on each with no text input."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from fusion.finetune.kg_tasks import (LEFT_OUT, _word_pair, find_lemma, lexical_examples, link_examples,
                                      supersense_examples, triple_examples, word_pair_facts)
from fusion.finetune.stage import FinetuneParams, _leak_warnings, finetune
from fusion.finetune.tasks import LEFT_OUT as TASK_LEFT_OUT
from fusion.finetune.tasks import prepare_task
from fusion.models.backbone import random_backbone
from fusion.models.sensebert import DETACH
from fusion.splits import pair_key, split_of
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from pipeline.context import StageContext
from pipeline.registry import Resources
from pipeline.store import Artifact

# A WordNet-like KG: "<kind> <word>" synsets whose lexname is their kind's, each with two usage
# examples in its gloss (the kind's first wordpiece decides the supersense, so held-out lemmas are
# learnable), an alias "<word> <kind>", a hypernym to its kind's synset and a part relation.
KINDS = {"city": "noun.location", "river": "noun.object", "animal": "noun.animal"}
WORDS = ["red", "green", "blue", "music", "art", "science", "paris", "london", "berlin", "china",
         "england", "france"]
MAX_LENGTH = 32


def _kg() -> KnowledgeGraph:
    ents = [(f"wn:{k}.n.01", k, [], f"a {k}", [t]) for k, t in KINDS.items()]
    for k, t in KINDS.items():
        for w in WORDS:
            ents.append((f"wn:{k}_{w}.n.01", f"{k}_{w}", [f"{w} {k}"],
                         f'a {k} of {w}; "the {k} {w} was in the city"; "we have a {k} {w}"', [t]))
    ents += [("wn:cats.n.01", "cat", [], 'an animal; "two cats and a dog"', ["noun.animal"]),
             ("wn:none.n.01", "nothing", [], 'a word; "this has no lemma"', ["noun.Tops"]),
             ("c:france", "France", [], "a country", ["country"]),          # not a synset
             ("wn:unnamed.n.01", "", [], "", ["noun.Tops"])]
    index = {e[0]: i for i, e in enumerate(ents)}
    rels = ["_hypernym", "_has_part"]
    triples = [(f"wn:{k}_{w}.n.01", "_hypernym", f"wn:{k}.n.01") for k in KINDS for w in WORDS]
    triples += [(f"wn:city_{w}.n.01", "_has_part", f"wn:river_{w}.n.01") for w in WORDS]
    triples += [("wn:city.n.01", "_hypernym", "wn:city.n.01"),                  # a self loop
                ("wn:unnamed.n.01", "_hypernym", "wn:city.n.01"),               # a nameless head
                ("wn:city_red.n.01", "_has_part", "wn:river_red.n.01")]         # listed twice
    n = len(ents)
    return KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [e[0] for e in ents], "name": [e[1] for e in ents],
                  "aliases": [e[2] for e in ents], "description": [e[3] for e in ents],
                  "types": [e[4] for e in ents], "source": ["t"] * n}, schema=ENTITY_SCHEMA),
        pa.table({"idx": [0, 1], "id": rels, "name": rels, "source": ["t", "t"]}, schema=RELATION_SCHEMA),
        pa.table({"head": [index[h] for h, _, _ in triples],
                  "relation": [rels.index(r) for _, r, _ in triples],
                  "tail": [index[t] for _, _, t in triples], "split": ["train"] * len(triples)},
                 schema=TRIPLE_SCHEMA))


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return _kg()


def _facts(kg: KnowledgeGraph) -> set[tuple[str, str, str]]:
    ids, rels = kg.entities["id"].to_pylist(), kg.relations["name"].to_pylist()
    return {(ids[h], rels[r], ids[t]) for h, r, t in zip(*(kg.triples[c].to_pylist()
                                                          for c in ("head", "relation", "tail")))}


# ----------------------------------------------------------------------- triple classification
def test_each_fact_has_a_corrupted_twin_that_is_no_fact_in_the_same_position(kg):
    examples, left, info = triple_examples(kg, test_share=0.3)
    facts = _facts(kg)
    true = [ex for ex in examples if ex.label == "true"]
    false = [ex for ex in examples if ex.label == "false"]
    assert info["triples"] == len(facts)                          # the duplicate counted once
    assert left["triples_self_loop"] == 1 and left["triples_entity_without_name"] == 1
    assert len(true) == len(facts) - 2
    # every true triple has its twin or is counted short of one: a hypernym's tails are the 3 kind
    # synsets, so a corrupted tail has 2 candidates, which may both sit on the other side of the split
    assert len(false) + left["negatives_without_candidate"] == len(true)
    assert 0 < left["negatives_without_candidate"] < len(true) / 4
    twins = {ex.id.split(":false:")[0]: ex for ex in false}
    true_texts = {ex.text for ex in true}
    for ex in true:
        h, rel, t = ex.id.removesuffix(":true").split("|")
        twin = twins.get(f"{h}|{rel}|{t}")   # the relation's id, here its name
        if twin is None:
            continue
        assert twin.key == ex.key                                   # its true triple's unit
        nh, nt = twin.entities
        assert split_of(pair_key(nh, nt), 0.3) == split_of(ex.key, 0.3)   # and on its side
        assert (nh, rel, nt) not in facts and (nh == h) != (nt == t)   # one end replaced
        assert twin.text not in true_texts                          # no fact reads the same
        position = {x[2] if nh == h else x[0] for x in facts if x[1] == rel}
        assert (nt if nh == h else nh) in position                  # seen there in that relation
        for text_ex, (a, b) in ((ex, (h, t)), (twin, (nh, nt))):
            (s1, e1), (s2, e2) = text_ex.spans
            assert text_ex.mentions == ((s1, e1, a), (s2, e2, b))
            assert rel.lstrip("_").replace("_", " ") in text_ex.text[e1:s2]


def test_a_relation_with_one_entity_in_a_position_cannot_be_corrupted_there():
    ents = [("a", "alpha"), ("b", "beta"), ("c", "gamma")]
    kg = KnowledgeGraph(
        pa.table({"idx": [0, 1, 2], "id": [e[0] for e in ents], "name": [e[1] for e in ents],
                  "aliases": [[]] * 3, "description": [""] * 3, "types": [[]] * 3,
                  "source": ["t"] * 3}, schema=ENTITY_SCHEMA),
        pa.table({"idx": [0], "id": ["r"], "name": ["r"], "source": ["t"]}, schema=RELATION_SCHEMA),
        pa.table({"head": [0, 1], "relation": [0, 0], "tail": [2, 2], "split": ["train"] * 2},
                 schema=TRIPLE_SCHEMA))
    examples, left, _ = triple_examples(kg, test_share=0.5)
    # tails: only "c"; heads: "a" and "b", and a -> c, b -> c are both facts: no twin either way
    assert [ex.label for ex in examples] == ["true", "true"]
    assert left["negatives_without_candidate"] == 2


# ------------------------------------------------------------------------------ lexical relation
def test_lexical_pairs_labels_counts_and_random_twins(kg):
    examples, left, info = lexical_examples(kg, test_share=0.3)
    # 36 synonym pairs (a word synset's name and alias), 36 hypernym and 12 part pairs; the self
    # loop is one word, the part fact listed twice a duplicate, the nameless synset has no word
    assert info["word_pairs"] == 36 + 36 + 12
    assert (left["pairs_same_word"], left["pairs_duplicate"], left["pairs_entity_without_name"]) == (1, 1, 1)
    kept = Counter(ex.label for ex in examples if ex.label != "random")
    assert sum(kept.values()) + left["pairs_across_split"] == info["word_pairs"]
    assert set(kept) == {"synonym", "hypernym", "has part"} and left["pairs_across_split"] > 0
    pairs = [tuple(ex.text.split(", ")) for ex in examples]
    related = {p for p, ex in zip(pairs, examples) if ex.label != "random"}
    assert ("city red", "red city") in related or split_of("city red", 0.3) != split_of("red city", 0.3)
    # naively: every lemma of a synset with every lemma of the same or a linked synset
    lemmas = [[w.replace("_", " ").lower() for w in [n, *al] if w]
              for n, al in zip(kg.entities["name"].to_pylist(), kg.entities["aliases"].to_pylist())]
    linked = {(i, i) for i in range(len(lemmas))} | {
        (h, t) for h, t in zip(kg.triples["head"].to_pylist(), kg.triples["tail"].to_pylist())}
    linked |= {(t, h) for h, t in linked}
    naive = {(x, y) for i, j in linked for x in lemmas[i] for y in lemmas[j]}
    randoms = 0
    for (a, b), ex in zip(pairs, examples):
        assert ex.spans == ((0, len(a)), (len(a) + 2, len(a) + 2 + len(b))) and ex.mentions == ()
        assert ex.side == split_of(a, 0.3) == split_of(b, 0.3)      # both words on its side
        if ex.label == "random":
            randoms += 1
            assert (a, b) not in naive and (b, a) not in related
    assert randoms > 0


def test_about_one_pair_in_four_gets_a_random_twin():
    """2,000 synonym pairs: the random twins are Binomial(2000, 1/4): 500 +- 19.4 (3 sd: 442-558)."""
    n = 2000
    kg = KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [f"wn:{i}" for i in range(n)],
                  "name": [f"w{i}" for i in range(n)], "aliases": [[f"v{i}"] for i in range(n)],
                  "description": [""] * n, "types": [["noun.Tops"]] * n, "source": ["t"] * n},
                 schema=ENTITY_SCHEMA),
        pa.table({"idx": [0], "id": ["r"], "name": ["r"], "source": ["t"]}, schema=RELATION_SCHEMA),
        pa.table({"head": [], "relation": [], "tail": [], "split": []}, schema=TRIPLE_SCHEMA))
    examples, left, _ = lexical_examples(kg, test_share=0.5)
    kept = sum(ex.label == "synonym" for ex in examples)
    assert kept + left["pairs_across_split"] == n
    random_twins = sum(ex.label == "random" for ex in examples)
    assert abs(random_twins + left["random_without_candidate"] - kept / 4) < 3 * (kept * 3 / 16) ** 0.5


def test_the_lexical_split_shares_no_word_between_training_and_test(kg, tokenizer):
    data = prepare_task([], kg, "lexical_relation", tokenizer, MAX_LENGTH, test_share=0.3,
                        min_label_count=1)
    words = {s: {w for ex in exs for w in ex.text.split(", ")} for s, exs in (("train", data.train),
                                                                              ("test", data.test))}
    assert data.train and data.test and not words["train"] & words["test"]
    assert set(data.left_out) == set(TASK_LEFT_OUT["lexical_relation"])


# ------------------------------------------------------------------------------------ supersense
@pytest.mark.parametrize("sentence, lemmas, pos, found", [
    ("The hot dog was cold", ["dog", "hot dog"], "noun", (4, 11, "hot dog")),  # the longest first
    ("two cats and a dog", ["cat"], "noun", (4, 8, "cat")),                    # morphy: cats -> cat
    ("she was walking home", ["walk"], "verb", (8, 15, "walk")),               # walking -> walk
    ("she was walking home", ["walk"], "noun", None),                          # not a noun's rule
    ("a well-known dog", ["well"], "adv", None),                               # in a hyphenated word
    ("the well-cats", ["cat"], "noun", None),
    ("a vitamin", ["a", "vitamin a"], "noun", None),                           # not the article
    ("nothing here", ["dog"], "noun", None),
])
def test_find_lemma(sentence, lemmas, pos, found):
    assert find_lemma(sentence, lemmas, DETACH[pos]) == found
    if found:
        assert sentence[found[0]:found[1]].lower().startswith(found[2][:3])


def test_supersense_examples_from_usage_examples(kg, tokenizer):
    examples, left, info = supersense_examples(kg)
    assert info["synsets"] == 3 + 36 + 3                     # lexnames only: not the country
    assert info["synsets_without_examples"] == 3 + 1         # the kinds and the nameless synset
    assert left["examples_lemma_not_found"] == 1             # "this has no lemma"
    assert info["usage_examples"] == len(examples) + 1 == 36 * 2 + 1 + 1
    for ex in examples:
        assert ex.mentions == () and ex.entities == ()       # the sense is what is asked
        (s, e), = ex.spans
        assert ex.text[s:e].lower().startswith(ex.key[:3])
        assert ex.label == (KINDS.get(ex.key.split()[0]) or "noun.animal")
    data = prepare_task([], kg, "supersense", tokenizer, MAX_LENGTH, test_share=0.3, min_label_count=1)
    assert not {ex.key for ex in data.train} & {ex.key for ex in data.test}   # lemmas on one side


# ------------------------------------------------------------------ the lexical tasks' knowledge
def test_the_lexical_tasks_sampled_examples_carry_the_linker_s_mentions(kg, tokenizer):
    lemmas = {eid: {w.replace("_", " ").lower() for w in [n, *al] if w}
              for eid, n, al in zip(kg.entities["id"].to_pylist(), kg.entities["name"].to_pylist(),
                                    kg.entities["aliases"].to_pylist())}
    for task, spans in (("lexical_relation", 2), ("supersense", 1)):
        data = prepare_task([], kg, task, tokenizer, MAX_LENGTH, test_share=0.3, min_label_count=1)
        examples = data.train + data.test
        assert all(ex.entities == () for ex in examples)             # the task still names no entity
        for ex in examples:
            for s, e, eid in ex.mentions:                            # each a name or alias of its entity
                assert ex.text[s:e].lower() in lemmas[eid], (ex.text, eid)
        info = data.info
        assert info["link_mentions"] == sum(len(ex.mentions) for ex in examples) > 0
        assert info["link_spans_linked"] + info["link_spans_without_entity"] == spans * len(examples)
        assert info["link_spans_linked"] == sum(span in {m[:2] for m in ex.mentions}
                                                for ex in examples for span in ex.spans)
        if task == "lexical_relation":  # aliases ("red city") are names; "city_red" is not, "city" is
            assert info["link_spans_linked"] > 0
        else:                           # "cats" is no name ("cat" is), "two cats and a dog" links nothing
            (cats,) = [ex for ex in examples if ex.key == "cat"]
            assert cats.mentions == () and info["link_spans_without_entity"] >= 1


def test_link_examples_counts_a_word_the_linker_does_not_find(kg):
    info = Counter()
    (ex,) = link_examples(kg, [_word_pair("red city", "two cats", "x", "train")], info)
    assert ex.mentions == ((0, 8, "wn:city_red.n.01"),)
    assert (info["link_mentions"], info["link_spans_linked"], info["link_spans_without_entity"]) == (1, 1, 1)


def test_k_bert_hides_every_triple_between_synsets_of_a_word_pair(kg):
    ids = kg.entities["id"].to_pylist()
    pairs = [("city red", "city"), ("red city", "river red"), ("city red", "animal"), ("nothing", "x")]
    hidden = word_pair_facts(kg, [_word_pair(a, b, "x", "train") for a, b in pairs])
    # naively: every triple whose one end has the first word as a lemma and the other the second
    lemmas = [{w.replace("_", " ").lower() for w in [n, *al] if w}
              for n, al in zip(kg.entities["name"].to_pylist(), kg.entities["aliases"].to_pylist())]
    naive = {frozenset((h, t)) for h, t in zip(kg.triples["head"].to_pylist(), kg.triples["tail"].to_pylist())
             for a, b in pairs if (a in lemmas[h] and b in lemmas[t]) or (b in lemmas[h] and a in lemmas[t])}
    assert hidden == naive
    assert {frozenset(ids[i] for i in p) for p in hidden} == {
        frozenset({"wn:city_red.n.01", "wn:city.n.01"}), frozenset({"wn:city_red.n.01", "wn:river_red.n.01"})}


def test_a_kg_task_is_reused_only_for_the_same_kg_settings_and_tokenizer(kg, tokenizer, monkeypatch):
    from transformers import BertTokenizer

    from fusion.finetune import tasks

    builds = []
    build = tasks.build_examples
    monkeypatch.setattr(tasks, "build_examples", lambda *a, **k: builds.append(1) or build(*a, **k))
    monkeypatch.setattr(tasks, "_LAST_KG_TASK", {})

    def prepare(task="lexical_relation", tok=tokenizer, max_length=MAX_LENGTH, kg_key="kg@1",
                test_share=0.3, split_seed=0):
        return prepare_task([], kg, task, tok, max_length, test_share=test_share, split_seed=split_seed,
                            kg_key=kg_key, min_label_count=2)

    first = prepare()
    assert first.info["link_mentions"] > 0
    assert len(builds) == 1 and prepare() == first and len(builds) == 1    # reused, counts not added twice
    other = BertTokenizer(vocab={w: i for i, w in enumerate(tokenizer.get_vocab())}, do_lower_case=False)
    for n, kw in enumerate([{"kg_key": "kg@2"}, {"max_length": 16}, {"task": "supersense"},
                            {"tok": other}, {"test_share": 0.5}, {"split_seed": 1}, {"kg_key": None},
                            {"kg_key": None}], start=2):
        prepare(**kw)
        assert len(builds) == n, kw                                          # built again
    assert prepare(kg_key="kg@1") == first


# ------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer, kg) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kg_tasks")
    (root / "kg").mkdir()
    kg.save(root / "kg")
    bb = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    bb.model.save_pretrained(str(root / "bb"))
    tokenizer.save_pretrained(str(root / "bb"))
    return {"kg": root / "kg", "backbone": root / "bb"}


def _ctx(tmp: Path, inputs: dict[str, Path], name: str) -> StageContext:
    (tmp / name).mkdir()
    return StageContext(stage=name, key="k", out=tmp / name,
                        inputs={r: Artifact(r, p, {}) for r, p in inputs.items()},
                        resources=Resources(), state_uri=str(tmp / f"state-{name}"),
                        log=logging.getLogger("test.kg_tasks"))


@pytest.mark.parametrize("task", ["triple_classification", "lexical_relation", "supersense"])
def test_the_stage_fine_tunes_on_a_kg_task_without_text(tmp_path, artifacts, task):
    ctx = _ctx(tmp_path, {"kg": artifacts["kg"]}, task)
    metrics = finetune(ctx, FinetuneParams(task=task, backbone=str(artifacts["backbone"]), epochs=12,
                                           lr=2e-3, head_lr=1e-2, warmup_share=0.05, test_share=0.3,
                                           max_length=MAX_LENGTH, min_label_count=1))
    report = json.loads((ctx.out / "metrics.json").read_text())
    assert metrics["test_examples"] == report["test"]["examples"] > 0
    assert {f"left_out_{r}" for r in LEFT_OUT[task]} <= set(metrics)
    if task == "supersense":   # the kind's wordpiece decides the label: learnable for held-out lemmas
        assert metrics["num_labels"] == 3 and metrics["test_accuracy"] > 0.7, metrics
    if task == "triple_classification":
        assert metrics["num_labels"] == 2
    else:                                           # the lexical tasks' texts were linked
        assert report["info"]["link_mentions"] > 0


def test_a_document_task_still_needs_its_text(tmp_path, artifacts):
    from pipeline import StageFailed

    with pytest.raises(StageFailed, match="needs input role 'text'"):
        finetune(_ctx(tmp_path, {"kg": artifacts["kg"]}, "typing"),
                 FinetuneParams(task="entity_typing", backbone=str(artifacts["backbone"])))


@pytest.mark.parametrize("recipe, task, held, flagged", [
    ("kepler", "triple_classification", 0.0, True),
    ("kepler", "triple_classification", 0.3, False),     # it held out our test pairs
    ("kgbert", "lexical_relation", 0.3, True),           # split by word: no held-out pair covers it
    ("libert", "lexical_relation", 0.0, True),
    ("libert", "supersense", 0.0, False),
    ("kadapter:factual", "triple_classification", 0.0, True),    # the same KG's relations
    ("kadapter:factual", "triple_classification", 0.3, False),
    ("kadapter:factual", "lexical_relation", 0.3, True),
    ("kadapter:factual", "supersense", 0.0, False),
    ("kadapter:lexical", "supersense", 0.3, True),               # lexnames, split by lemma
    ("kadapter:lexical", "triple_classification", 0.0, False),
])
def test_pretrainings_that_saw_a_kg_task_s_labels_are_flagged(tmp_path, artifacts, recipe, task, held,
                                                             flagged):
    ctx = _ctx(tmp_path, {"kg": artifacts["kg"]}, "leak")
    ctx.inputs["encoder"] = Artifact("enc", tmp_path, {"inputs": {"kg": "kg"}})   # the kg's key is "kg"
    recipe, _, adapter = recipe.partition(":")
    meta = {"options": {"held_out_share": held, "split_seed": 0, "adapter": adapter or "factual"}}
    warned = _leak_warnings(ctx, recipe, meta, FinetuneParams(task=task, test_share=0.3))
    assert bool(warned) == flagged, warned
