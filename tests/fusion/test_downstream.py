"""``fusion.finetune``: the metrics equal hand-computed values, the held-out split never shares an entity
(typing) or an entity pair (relations) with training, unusable input is counted exactly, and the stage
learns a small synthetic task above chance with the plain backbone and with a pretrain artifact of
every recipe."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from fusion.models.backbone import random_backbone
from tests.fusion.conftest import write_linked
from tests.pipeline.test_train import read_scalars
from fusion.finetune.tasks import LEFT_OUT, prepare_task
from fusion.splits import pair_key, split_of
from fusion.finetune.encoders import SPAN_ENCODERS, span_encoder_for
from fusion.finetune.stage import FinetuneParams, finetune
from fusion.pretrain.stage import PretrainParams, pretrain
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from knowledge.stages.link import DOC_SCHEMA, MENTION_SCHEMA
from pipeline import StageFailed
from pipeline.context import StageContext
from pipeline.registry import Resources
from pipeline.store import Artifact

# A task the tiny models can learn from few examples: an entity "<kind> <word>" has the type of its
# kind (its first wordpiece), so held-out entities share their type's first wordpiece with training
# ones; a relation is fixed by the kinds of its head and tail.
KINDS = {"city": "place", "river": "water", "animal": "creature"}
WORDS = ["red", "green", "blue", "music", "art", "science", "paris", "london"]
RELATIONS = {("river", "city"): "flows through", ("animal", "river"): "lives in",
             ("city", "animal"): "has"}
FILLER = ["the", "we", "have", "in", "and", "at", "with", "from", "this", "now"]
ENTITIES = ([(f"t:{k}_{w}", f"{k} {w}", [t]) for k, t in KINDS.items() for w in WORDS]
            + [("t:steve", "steve jobs", []), ("t:cat", "cat", ["rare"])])
NO_VECTOR = "t:animal_art"        # left out of the embedding table: ERNIE must count, not crash
MAX_LENGTH = 48
N_DOCS = 60


def _synthetic_docs() -> tuple[list[tuple[str, str]], list[tuple[str, int, int, str]], set]:
    """Documents (id, text), mentions (doc, start, end, entity id) and KG facts (head, rel, tail)."""
    rng = random.Random(0)
    docs, mentions, facts = [], [], set()
    for i in range(N_DOCS):
        chosen = {k: f"t:{k}_{rng.choice(WORDS)}" for k in KINDS}
        order = list(KINDS)
        rng.shuffle(order)
        text = ""
        for k in order:
            text += " ".join(rng.sample(FILLER, 2)) + " "
            name = chosen[k].split(":")[1].replace("_", " ")
            mentions.append((f"d{i}", len(text), len(text) + len(name), chosen[k]))
            text += name + " "
        docs.append((f"d{i}", text + rng.choice(FILLER)))
        facts |= {(chosen[h], rel, chosen[t]) for (h, t), rel in RELATIONS.items()}
    return docs, mentions, facts


# What the extra documents below leave out, by reason (entity typing, min_label_count=2).
EXPECTED_LEFT_OUT_TYPING = {
    "documents_empty": 1, "mentions_in_empty_documents": 1, "mentions_not_in_kg": 1,
    "mentions_bad_span": 2, "mentions_without_type": 1, "mentions_duplicate": 1,
    "examples_rare_label": 1, "examples_span_beyond_max_length": 1,
    "examples_span_without_wordpiece": 1,
}


def _extra_docs() -> tuple[list[tuple[str, str]], list[tuple[str, int, int, str]]]:
    """One document per kind of unusable input."""
    long_text = " ".join(["the"] * 80) + " city red"
    docs = [("x_empty", ""), ("x_plain", "the cat and the dog"),
            ("x_bad", "we have city red"), ("x_nokg", "we have a dog"),
            ("x_notype", "steve jobs was born"), ("x_rare", "the cat"),
            ("x_long", long_text), ("x_zw", "we \u200b have city blue")]
    mentions = [("x_empty", 0, 3, "t:city_red"),
                ("x_bad", 8, 16, "t:city_red"), ("x_bad", 8, 16, "t:city_red"),   # a duplicate
                ("x_bad", 10, 40, "t:city_red"), ("x_bad", 2, 3, "t:city_red"),   # out of text, blank
                ("x_nokg", 10, 13, "t:dog"), ("x_notype", 0, 10, "t:steve"), ("x_rare", 4, 7, "t:cat"),
                ("x_long", len(long_text) - 8, len(long_text), "t:city_red"),
                ("x_zw", 3, 4, "t:city_blue"), ("x_zw", 10, 19, "t:city_blue")]
    return docs, mentions


def _docs_as_records(docs, mentions) -> list[dict]:
    out = {d: {"id": d, "text": t, "mentions": []} for d, t in docs}
    for d, s, e, ent in mentions:
        out[d]["mentions"].append((s, e, ent))
    return list(out.values())


def _kg(facts) -> KnowledgeGraph:
    n = len(ENTITIES)
    index = {e[0]: i for i, e in enumerate(ENTITIES)}
    rel_names = sorted(set(RELATIONS.values()))
    facts = sorted(facts) + [("t:steve", "has", "t:cat")]
    return KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [e[0] for e in ENTITIES],
                  "name": [e[1] for e in ENTITIES],
                  "aliases": [[] for _ in ENTITIES], "description": [""] * n,
                  "types": [e[2] for e in ENTITIES], "source": ["t"] * n}, schema=ENTITY_SCHEMA),
        pa.table({"idx": list(range(len(rel_names))), "id": [f"t:{r}" for r in rel_names],
                  "name": rel_names, "source": ["t"] * len(rel_names)}, schema=RELATION_SCHEMA),
        pa.table({"head": [index[h] for h, _, _ in facts],
                  "relation": [rel_names.index(r) for _, r, _ in facts],
                  "tail": [index[t] for _, _, t in facts], "split": ["train"] * len(facts)},
                 schema=TRIPLE_SCHEMA))


@pytest.fixture(scope="module")
def data():
    docs, mentions, facts = _synthetic_docs()
    xdocs, xmentions = _extra_docs()
    return {"docs": docs + xdocs, "mentions": mentions + xmentions, "kg": _kg(facts)}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer, data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("downstream")
    kg_dir, emb_dir, link_dir, bb_dir = (root / n for n in ("kg", "emb", "link", "bb"))
    for d in (kg_dir, emb_dir, link_dir):
        d.mkdir()
    data["kg"].save(kg_dir)
    with_vec = [e for e in ENTITIES if e[0] != NO_VECTOR]
    save_file({"entity": torch.randn(len(with_vec), 12, generator=torch.Generator().manual_seed(0)),
               "relation": torch.randn(3, 12)}, str(emb_dir / "embeddings.safetensors"))
    pq.write_table(pa.table({"idx": list(range(len(with_vec))), "id": [e[0] for e in with_vec],
                             "name": [e[1] for e in with_vec]}), emb_dir / "entities.parquet")
    write_linked(link_dir, data["docs"], [(m[0], m[1], m[2], m[3]) for m in data["mentions"]])
    bb = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    bb.model.save_pretrained(str(bb_dir))
    tokenizer.save_pretrained(str(bb_dir))
    return {"kg": kg_dir, "entities": emb_dir, "text": link_dir, "backbone": bb_dir}


def _ctx(tmp: Path, inputs: dict[str, Path], name: str = "out",
         manifests: dict[str, dict] | None = None) -> StageContext:
    out = tmp / name
    out.mkdir()
    manifests = manifests or {}
    return StageContext(stage=name, key="k", out=out,
                        inputs={r: Artifact(r, p, manifests.get(r, {})) for r, p in inputs.items()},
                        resources=Resources(), state_uri=str(tmp / f"state-{name}"),
                        log=logging.getLogger("test.downstream"))


PRETRAIN_OPTIONS = {"mlm": {}, "ernie": {"k_layers": 1}, "kbert": {"k": 2},
                    "kadapter": {"adapter": "factual", "adapter_size": 16, "num_heads": 2,
                                 "min_label_count": 1}}


@pytest.fixture(scope="module")
def pretrained(ray_local, tmp_path_factory, artifacts) -> dict[str, Path]:
    """A tiny fusion.pretrain artifact of every recipe (a few steps: the point is the format)."""
    out = {}
    for recipe, options in PRETRAIN_OPTIONS.items():
        tmp = tmp_path_factory.mktemp(f"pretrain-{recipe}")
        needs = {"mlm": ("text",), "ernie": ("text", "entities")}.get(recipe, ("text", "kg"))
        ctx = _ctx(tmp, {r: artifacts[r] for r in needs})
        pretrain(ctx, PretrainParams.model_validate({
            "recipe": recipe, "options": options, "backbone": str(artifacts["backbone"]),
            "steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 3,
            "max_length": MAX_LENGTH}))
        out[recipe] = ctx.out
    return out


FAST = {"epochs": 12, "batch_size": 16, "lr": 2e-3, "head_lr": 1e-2, "warmup_share": 0.05,
        "test_share": 0.3, "max_length": MAX_LENGTH}


def _finetune(tmp: Path, inputs: dict[str, Path], manifests: dict[str, dict] | None = None,
              **params) -> tuple[dict, Path]:
    ctx = _ctx(tmp, inputs, f"ft{len(list(tmp.iterdir()))}", manifests)
    metrics = finetune(ctx, FinetuneParams.model_validate({**FAST, **params}))
    return metrics, ctx.out


# ---------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("task", ["entity_typing", "relation_classification"])
def test_the_split_never_shares_an_entity_or_a_pair(task, data, tokenizer):
    records = _docs_as_records(data["docs"], data["mentions"])
    d = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3)
    assert d.train and d.test
    if task == "entity_typing":
        train_units = {ex.entities[0] for ex in d.train}
        test_units = {ex.entities[0] for ex in d.test}
    else:
        train_units = {frozenset(ex.entities) for ex in d.train}
        test_units = {frozenset(ex.entities) for ex in d.test}
        assert {ex.key for ex in d.train} == {pair_key(*ex.entities) for ex in d.train}
    assert train_units.isdisjoint(test_units)
    assert {ex.key for ex in d.train}.isdisjoint({ex.key for ex in d.test})
    # deterministic, and another split seed gives another split
    again = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3)
    assert [ex.id for ex in again.test] == [ex.id for ex in d.test]
    other = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3, split_seed=1)
    assert {ex.id for ex in other.test} != {ex.id for ex in d.test}


def test_split_share_and_pair_key():
    keys = [f"e{i}" for i in range(4000)]
    share = sum(split_of(k, 0.2) == "test" for k in keys) / len(keys)
    assert 0.18 < share < 0.22
    assert pair_key("b", "a") == pair_key("a", "b")


def test_left_out_counts_by_reason(data, tokenizer):
    records = _docs_as_records(data["docs"], data["mentions"])
    d = prepare_task(records, data["kg"], "entity_typing", tokenizer, MAX_LENGTH, test_share=0.3)
    assert {k: v for k, v in d.left_out.items() if v} == EXPECTED_LEFT_OUT_TYPING
    assert d.info["documents"] == N_DOCS + 8 and d.info["documents_without_mentions"] == 1
    # every synthetic mention is an example, plus "city red" in x_bad and "city blue" in x_zw
    assert len(d.train) + len(d.test) == 3 * N_DOCS + 2
    assert d.labels == ["creature", "place", "water"]

    r = prepare_task(records, data["kg"], "relation_classification", tokenizer, MAX_LENGTH,
                     test_share=0.3)
    assert {k: v for k, v in r.left_out.items() if v} == {
        "documents_empty": 1, "mentions_in_empty_documents": 1, "mentions_not_in_kg": 1,
        "mentions_bad_span": 2, "mentions_duplicate": 1}
    assert len(r.train) + len(r.test) == 3 * N_DOCS   # one fact per ordered pair of kinds
    assert r.labels == sorted(set(RELATIONS.values()))
    # max_pairs_per_doc caps the pairs of a document, and says how many it cut
    capped = prepare_task(records, data["kg"], "relation_classification", tokenizer, MAX_LENGTH,
                          max_pairs_per_doc=2)
    assert capped.left_out["pairs_over_max_per_doc"] == N_DOCS


def test_caps_sample_each_split_the_same_way_and_report_what_was_available(data, tokenizer):
    records = _docs_as_records(data["docs"], data["mentions"])
    for task in ("entity_typing", "relation_classification"):
        full = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3)
        capped = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3,
                              max_train=40, max_test=9)
        assert (len(capped.train), len(capped.test)) == (40, 9)
        assert capped.available == {"train": len(full.train), "test": len(full.test)}
        assert full.available == capped.available and not full.unsampled
        # a sample of each split, in its order; the rest is kept aside, not counted as left out
        assert [ex.id for ex in capped.train] == [ex.id for ex in full.train if ex in capped.train]
        assert [ex.id for ex in capped.test] == [ex.id for ex in full.test if ex in capped.test]
        assert ({ex.id for ex in capped.train + capped.test + capped.unsampled}
                == {ex.id for ex in full.train + full.test})
        assert capped.left_out == full.left_out
        assert {ex.key for ex in capped.train}.isdisjoint({ex.key for ex in capped.test})
        # the split seed fixes the sample (nothing else does); a larger cap extends a smaller one
        again = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3,
                             max_train=40, max_test=9)
        assert [ex.id for ex in again.test] == [ex.id for ex in capped.test]
        larger = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3,
                              max_train=40, max_test=15)
        assert {ex.id for ex in capped.test} < {ex.id for ex in larger.test}
        # a cap above the split's size changes nothing
        roomy = prepare_task(records, data["kg"], task, tokenizer, MAX_LENGTH, test_share=0.3,
                             max_train=10_000, max_test=10_000)
        assert [ex.id for ex in roomy.test] == [ex.id for ex in full.test] and not roomy.unsampled


def test_the_label_vocabulary_is_the_sampled_training_set_s(data, tokenizer):
    records = _docs_as_records(data["docs"], data["mentions"])
    full = prepare_task(records, data["kg"], "entity_typing", tokenizer, MAX_LENGTH, test_share=0.3)
    d = prepare_task(records, data["kg"], "entity_typing", tokenizer, MAX_LENGTH, test_share=0.3,
                     max_train=1)
    label = d.train[0].label
    assert len(d.train) == 1 and d.labels == [label]
    # the test examples of the labels the model never saw are left out, and counted as such
    other = sum(ex.label != label for ex in full.test)
    assert 0 < other < len(full.test)
    assert [ex.id for ex in d.test] == [ex.id for ex in full.test if ex.label == label]
    assert d.left_out["test_examples_label_not_in_train"] == other
    assert d.available == {"train": len(full.train), "test": len(full.test) - other}


def test_a_test_label_unseen_in_training_is_left_out(data, tokenizer):
    records = _docs_as_records(data["docs"], data["mentions"])
    d = prepare_task(records, data["kg"], "entity_typing", tokenizer, MAX_LENGTH,
                     min_label_count=1, test_share=0.3)
    rare_side = split_of("t:cat", 0.3)
    assert ("rare" in d.labels) == (rare_side == "train")
    assert d.left_out["test_examples_label_not_in_train"] == int(rare_side == "test")


# ---------------------------------------------------------------------------------- the stage
def test_every_recipe_has_a_span_encoder():
    from fusion.pretrain.loop import RECIPES
    from fusion.pretrain.recipes import PlainMLM

    builtin = {n for n, c in RECIPES.all().items() if c.__module__ == "fusion.pretrain.recipes"}
    assert builtin == set(PRETRAIN_OPTIONS) and builtin <= set(SPAN_ENCODERS.all())
    text = {n for n, c in RECIPES.all().items() if c.__module__ in (
        "fusion.pretrain.knowledge_recipes", "fusion.pretrain.lexical_recipes",
        "fusion.pretrain.knowbert_recipe", "fusion.pretrain.extra_recipes")}
    assert text == {"kepler", "kgbert", "sensebert", "libert", "knowbert", "wklm", "sentilr"}
    own = {n: span_encoder_for(n) for n in text}
    assert {n for n, b in own.items() if b is SPAN_ENCODERS.get("mlm")} == {"libert", "wklm"}  # as their base
    assert {b.__module__ for n, b in own.items() if n not in ("libert", "wklm")} == {
        "fusion.finetune.knowledge_encoders"}
    assert "plain" in SPAN_ENCODERS.all()

    class Derived(PlainMLM):   # a plugin's variant of a built-in recipe fine-tunes like its base
        name = "mlm_variant"

    RECIPES.types["mlm_variant"] = Derived
    try:
        assert span_encoder_for("mlm_variant") is SPAN_ENCODERS.get("mlm")
    finally:
        del RECIPES.types["mlm_variant"]
    with pytest.raises(StageFailed, match="unknown pretraining recipe"):
        span_encoder_for("no_such_recipe")


@pytest.mark.parametrize("task", ["entity_typing", "relation_classification"])
def test_plain_backbone_learns_above_chance_and_writes_its_results(tmp_path, artifacts, task):
    inputs = {r: artifacts[r] for r in ("text", "kg")}
    metrics, out = _finetune(tmp_path, inputs, task=task, backbone=str(artifacts["backbone"]))
    assert metrics["encoder"] == "plain" and metrics["num_labels"] == 3
    assert metrics["test_accuracy"] > 0.7, metrics        # chance: about 1/3
    assert metrics["test_micro_f1"] == pytest.approx(metrics["test_accuracy"])
    report = json.loads((out / "metrics.json").read_text())
    assert report["test"]["accuracy"] == metrics["test_accuracy"]
    assert sum(report["label_counts"]["test"].values()) == metrics["test_examples"]
    assert sum(v["support"] for v in report["per_label"].values()) == metrics["test_examples"]
    preds = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(preds) == metrics["test_examples"]
    assert sum(p["gold"] == p["predicted"] for p in preds) / len(preds) == pytest.approx(
        metrics["test_accuracy"])
    history = json.loads((out / "history.json").read_text())
    assert len(history) == metrics["steps"]
    assert (out / "finetune.png").stat().st_size > 0
    # streamed to TensorBoard while it trained (under the state), copied into the artifact
    assert read_scalars(out / "tb")["loss"] == pytest.approx({h["step"]: h["loss"] for h in history})
    assert {f"left_out_{r}" for r in LEFT_OUT[task]} <= set(metrics)   # zeros reported too
    if task == "entity_typing":
        for reason, n in EXPECTED_LEFT_OUT_TYPING.items():
            assert metrics[f"left_out_{reason}"] == n, reason


def test_same_seed_same_predictions_other_seed_other_run(tmp_path, artifacts):
    inputs = {r: artifacts[r] for r in ("text", "kg")}
    common = {"backbone": str(artifacts["backbone"]), "epochs": 2}
    a, out_a = _finetune(tmp_path, inputs, **common)
    b, out_b = _finetune(tmp_path, inputs, **common)
    c, _ = _finetune(tmp_path, inputs, seed=1, **common)
    preds_a, preds_b = (pq.read_table(o / "predictions.parquet") for o in (out_a, out_b))
    assert preds_a.equals(preds_b)
    assert a["loss_last10"] == b["loss_last10"] != c["loss_last10"]
    assert a["test_examples"] == c["test_examples"]          # the split does not follow the seed


@pytest.mark.parametrize("recipe", list(PRETRAIN_OPTIONS))
def test_each_pretrained_encoder_fine_tunes_above_chance(tmp_path, artifacts, pretrained, recipe):
    inputs = {"encoder": pretrained[recipe], "text": artifacts["text"], "kg": artifacts["kg"]}
    if recipe == "ernie":
        inputs["entities"] = artifacts["entities"]
    metrics, _ = _finetune(tmp_path, inputs)
    assert metrics["encoder"] == recipe
    assert metrics["test_accuracy"] > 0.7, metrics
    for reason, n in EXPECTED_LEFT_OUT_TYPING.items():  # the same examples for every encoder
        assert metrics[f"left_out_{reason}"] == n, reason
    if recipe == "ernie":
        records = _docs_as_records(*_synthetic_docs()[:2])
        spans = sum(ent == NO_VECTOR for d in records for _, _, ent in d["mentions"])
        assert metrics["ernie_spans_without_vector"] == spans > 0
    if recipe == "kbert":
        assert metrics["kbert_triples_injected"] > 0
    if recipe == "kadapter":  # the backbone stays frozen: only the adapter and the head train
        from safetensors import safe_open

        with safe_open(str(pretrained[recipe] / "model.safetensors"), framework="pt") as f:
            adapter = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                          if k.startswith("head.encoder.adapters."))
        assert metrics["trainable_params"] == adapter + (32 + 32) * 3 + 3


def test_kbert_hides_the_facts_a_relation_example_asks_about(tmp_path, artifacts, pretrained, data):
    inputs = {"encoder": pretrained["kbert"], "text": artifacts["text"], "kg": artifacts["kg"]}
    metrics, _ = _finetune(tmp_path, inputs, task="relation_classification", epochs=1)
    # every synthetic fact links a task pair; the one extra fact (steve jobs has cat) does not
    assert metrics["kbert_triples_hidden_task_facts"] == data["kg"].triples.num_rows - 1
    assert metrics["kbert_triples_injected"] == 0


def test_kbert_hides_every_fact_triple_classification_asks_about(tmp_path, artifacts, pretrained, data):
    """Every KG triple is a true example (and its corrupted twin's pair is hidden as well): K-BERT
    injects none, or the input would hold the answer."""
    inputs = {"encoder": pretrained["kbert"], "kg": artifacts["kg"]}
    metrics, _ = _finetune(tmp_path, inputs, task="triple_classification", epochs=1, min_label_count=1)
    assert metrics["kbert_triples_hidden_task_facts"] == data["kg"].triples.num_rows
    assert metrics["kbert_triples_injected"] == 0


@pytest.mark.parametrize("recipe", ["kbert", "ernie"])
def test_entity_readers_get_a_word_pair_s_linked_words(tmp_path, artifacts, pretrained, recipe, tokenizer):
    """The lexical task's words are linked in the fine-tuning KG (a WordNet-like one, not the
    pretraining's): K-BERT injects the linked synsets' triples except those between synsets of a
    pair's two words; ERNIE, whose table holds none of these entities, keeps every example and
    counts the mentions it has no vector for."""
    from fusion.finetune.kg_tasks import word_pair_facts
    from tests.fusion.test_kg_tasks import _kg

    kg = _kg()
    (tmp_path / "wordnet").mkdir()
    kg.save(tmp_path / "wordnet")
    inputs = {"encoder": pretrained[recipe], "kg": tmp_path / "wordnet"}
    metrics, out = _finetune(tmp_path, inputs, task="lexical_relation", epochs=1, min_label_count=1)
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert info["link_mentions"] > 0
    if recipe == "ernie":
        assert metrics["ernie_mentions_without_vector"] == info["link_mentions"]
        assert metrics["ernie_mentions_with_vector"] == 0
    else:
        d = prepare_task([], kg, "lexical_relation", tokenizer, MAX_LENGTH, test_share=FAST["test_share"],
                         min_label_count=1)
        asked = word_pair_facts(kg, d.train + d.test + d.unsampled)
        pairs = [frozenset(p) for p in zip(kg.triples["head"].to_pylist(), kg.triples["tail"].to_pylist())]
        assert metrics["kbert_triples_hidden_task_facts"] == sum(p in asked for p in pairs) > 0
        assert metrics["kbert_triples_injected"] > 0        # the pairs across the split are not asked


def test_capped_run_reports_used_and_available_examples(tmp_path, artifacts):
    inputs = {r: artifacts[r] for r in ("text", "kg")}
    common = {"backbone": str(artifacts["backbone"]), "epochs": 1}
    full, _ = _finetune(tmp_path, inputs, **common)
    capped, out = _finetune(tmp_path, inputs, max_train_examples=30, max_test_examples=12, **common)
    assert (capped["train_examples"], capped["test_examples"]) == (30, 12)
    assert capped["train_examples_available"] == full["train_examples"] == full["train_examples_available"]
    assert capped["test_examples_available"] == full["test_examples"] == full["test_examples_available"]
    assert capped["steps"] == 2                      # one pass over 30 examples in batches of 16
    assert pq.read_table(out / "predictions.parquet").num_rows == 12
    report = json.loads((out / "metrics.json").read_text())
    assert report["params"]["max_test_examples"] == 12 and report["test"]["examples"] == 12


def test_kbert_hides_the_facts_of_sampled_out_pairs_too(tmp_path, artifacts, pretrained, data):
    inputs = {"encoder": pretrained["kbert"], "text": artifacts["text"], "kg": artifacts["kg"]}
    metrics, _ = _finetune(tmp_path, inputs, task="relation_classification", epochs=1,
                           max_train_examples=3, max_test_examples=3)
    assert metrics["kbert_triples_hidden_task_facts"] == data["kg"].triples.num_rows - 1


def test_a_linear_probe_trains_the_head_only(tmp_path, artifacts):
    inputs = {r: artifacts[r] for r in ("text", "kg")}
    metrics, _ = _finetune(tmp_path, inputs, backbone=str(artifacts["backbone"]), epochs=1,
                           train_encoder=False)
    assert metrics["trainable_params"] == 32 * 3 + 3


def test_an_adapter_pretrained_on_the_same_task_and_text_is_flagged(tmp_path, artifacts, pretrained):
    inputs = {"encoder": pretrained["kadapter"], "text": artifacts["text"], "kg": artifacts["kg"]}
    same_text = {"encoder": {"inputs": {"text": "text", "kg": "kg"}}}  # the text input's key is "text"
    metrics, out = _finetune(tmp_path, inputs, same_text, task="relation_classification", epochs=1)
    assert "factual adapter was pretrained on this task" in metrics["warnings"][0]
    assert json.loads((out / "metrics.json").read_text())["warnings"] == metrics["warnings"]
    typing, _ = _finetune(tmp_path, inputs, same_text, task="entity_typing", epochs=1)
    assert "warnings" not in typing  # the factual adapter never saw types


@pytest.mark.parametrize("recipe", ["kepler", "kgbert"])
def test_kepler_and_kgbert_trained_on_a_test_pair_s_triples_are_flagged(tmp_path, artifacts, recipe):
    """Relation labels are KG triples: flagged unless the pretraining held out at least the test pairs
    (the same split_seed, held_out_share >= test_share), or read another KG."""
    from fusion.finetune.stage import _leak_warnings

    def warned(task="relation_classification", kg="kg", held=0.0, seed=0, test_share=0.3) -> list[str]:
        ctx = _ctx(tmp_path, {r: artifacts[r] for r in ("text", "kg")}, f"c{len(list(tmp_path.iterdir()))}")
        ctx.inputs["encoder"] = Artifact("enc", tmp_path, {"inputs": {"kg": kg}})   # the kg's key is "kg"
        meta = {"options": {"held_out_share": held, "split_seed": seed}}
        return _leak_warnings(ctx, recipe, meta, FinetuneParams(task=task, test_share=test_share))

    assert f"{recipe} was pretrained on this KG's triples" in warned()[0]
    assert len(warned(held=0.3, seed=1)) == len(warned(held=0.2)) == 1      # another split: flagged
    assert warned(held=0.3) == warned(held=0.5) == []                       # its test side holds ours
    assert warned(task="entity_typing") == warned(kg="another kg") == []


def test_ernie_reads_a_table_saved_in_the_pretrain_artifact(tmp_path, artifacts, pretrained):
    """The proposed pretrain format: ``entity_table.safetensors`` + ``entity_ids.json`` (compact)."""
    import shutil

    from safetensors.torch import load_file

    enc = tmp_path / "ernie-with-table"
    shutil.copytree(pretrained["ernie"], enc)
    table = load_file(str(artifacts["entities"] / "embeddings.safetensors"))["entity"]
    ids = pq.read_table(artifacts["entities"] / "entities.parquet")["id"].to_pylist()
    used = [i for i, e in enumerate(ids) if e.startswith("t:city")]   # a compact table
    save_file({"entity": table[used].contiguous()}, str(enc / "entity_table.safetensors"))
    (enc / "entity_ids.json").write_text(json.dumps([ids[i] for i in used]))
    metrics, _ = _finetune(tmp_path, {"encoder": enc, "text": artifacts["text"], "kg": artifacts["kg"]},
                           epochs=1)
    records = _docs_as_records(*_synthetic_docs()[:2])
    spans = sum(not ent.startswith("t:city") for d in records for _, _, ent in d["mentions"])
    assert metrics["ernie_spans_without_vector"] == spans


def test_ernie_uses_the_vectors_its_pretraining_saved_or_says_what_it_needs(tmp_path, artifacts,
                                                                            pretrained):
    import shutil

    inputs = {"encoder": pretrained["ernie"], "text": artifacts["text"], "kg": artifacts["kg"]}
    metrics, _ = _finetune(tmp_path, inputs, epochs=1)  # no `entities` input: the saved table
    assert metrics["test_examples"] > 0
    bare = tmp_path / "ernie-without-table"
    shutil.copytree(pretrained["ernie"], bare)
    (bare / "entity_table.safetensors").unlink()
    with pytest.raises(StageFailed, match="entities"):
        _finetune(tmp_path, {**inputs, "encoder": bare}, epochs=1)


def test_text_without_linked_entities_fails_with_the_counts(tmp_path, artifacts, tokenizer):
    link = tmp_path / "link"
    link.mkdir()
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["the cat", ""], "n_mentions": [0, 0]},
                            schema=DOC_SCHEMA), link / "docs.parquet")
    pq.write_table(MENTION_SCHEMA.empty_table(), link / "mentions.parquet")
    with pytest.raises(StageFailed, match="documents_empty"):
        _finetune(tmp_path, {"text": link, "kg": artifacts["kg"]}, backbone=str(artifacts["backbone"]))


def test_finetune_logs_every_step_and_its_results_to_mlflow(tmp_path, artifacts):
    """``stele run --mlflow``: fine-tuning opens one MLflow run with its parameters, logs every
    step's loss (equal to its history) while it trains, and at commit its metrics and files."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import StageTracking, mlflow_target

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = FinetuneParams.model_validate({**FAST, "task": "entity_typing",
                                            "backbone": str(artifacts["backbone"])})
    ctx = _ctx(tmp_path, {r: artifacts[r] for r in ("text", "kg")}, "ftm")
    ctx.tracking = StageTracking(mlflow_target(uri, "finetuned"), "ftm", ctx.key, "fusion.finetune",
                                 params.model_dump(mode="json"))
    metrics = finetune(ctx, params)
    ctx.tracking.finish(metrics, ctx.out)
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("finetuned").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stele.type"] == "fusion.finetune"
    assert run.data.params["task"] == "entity_typing"
    history = json.loads((ctx.out / "history.json").read_text())
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == pytest.approx({h["step"]: h["loss"] for h in history})
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert "metrics.json" in {f.path for f in client.list_artifacts(run.info.run_id)}
