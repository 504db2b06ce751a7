"""fusion.link_prediction (fusion/linkpred.py): on tiny pretrained KEPLER and KG-BERT artifacts, the
stage's metrics equal the scorer and rank functions called directly; entities without text are
counted, never scored; the KG-BERT cap stands beside every number; any other recipe is a one-line
error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fusion.linkpred import LinkPredictionParams, link_prediction
from pipeline import StageFailed
from tests.fusion import test_kepler

# test_kepler's KG behind an entity without text, so that the entities with text are not
# 0..N'-1, plus more triples to rank: the ghost (0), steve jobs (8) and the dog (9) have no description
ENTITIES = [("t:ghost", "ghost", ""), *test_kepler.ENTITIES]
TRIPLES = [(h + 1, r, t + 1, s) for h, r, t, s in
           [*test_kepler.TRIPLES, (0, 0, 1, "test"), (6, 1, 7, "test"), (2, 0, 5, "test"),
            (8, 2, 1, "test"), (0, 1, 6, "test")]] + [(0, 2, 2, "test")]
TEST = [(h, r, t) for h, r, t, s in TRIPLES if s == "test"]
NO_TEXT = {0, 8, 9}
HEADLINE = ("mrr", "mr", "hits@1", "hits@3", "hits@10")


def context(tmp: Path, name: str, inputs: dict[str, Path]):
    from pipeline.context import StageContext
    from pipeline.registry import Resources
    from pipeline.store import Artifact

    out = tmp / name
    out.mkdir()
    return StageContext(stage=name, key="k", out=out,
                        inputs={r: Artifact(r, p, {}) for r, p in inputs.items()},
                        resources=Resources(), state_uri=str(tmp / f"{name}-state"),
                        log=logging.getLogger(f"test.linkpred.{name}"))


def pretrain(tmp: Path, backbone_dir: Path, recipe: str, inputs: dict[str, Path], options: dict) -> Path:
    from fusion.pretrain.stage import PretrainParams
    from fusion.pretrain.stage import pretrain as run

    ctx = context(tmp, recipe, inputs)
    run(ctx, PretrainParams.model_validate({
        "recipe": recipe, "backbone": str(backbone_dir), "steps": 3, "batch_size": 2, "lr": 3e-3,
        "warmup_steps": 1, "checkpoint_every": 3, "max_length": 24, "precision": "fp32",
        "options": options}))
    return ctx.out


@pytest.fixture(scope="module")
def arts(ray_local, tmp_path_factory, backbone_dir) -> dict[str, Path]:
    """One KG, one tiny pretraining per recipe (KG-BERT on descriptions, so that three entities have
    no text for it either: the stage must read ``entity_text`` from the artifact, not default to
    names)."""
    tmp = tmp_path_factory.mktemp("linkpred")
    kg = test_kepler.write_kg(tmp / "kg", entities=ENTITIES, triples=TRIPLES)
    text = test_kepler.write_text(tmp / "text")
    return {"kg": kg,
            "kepler": pretrain(tmp, backbone_dir, "kepler", {"kg": kg, "text": text},
                               {"negatives": 2, "description_length": 12, "p": 2.0}),
            "kgbert": pretrain(tmp, backbone_dir, "kgbert", {"kg": kg},
                               {"negatives": 1, "entity_text": "description", "entity_length": 8})}


def run_stage(tmp: Path, arts: dict[str, Path], recipe: str, **params) -> tuple[dict, dict]:
    ctx = context(tmp, "lp", {"kg": arts["kg"], "model": arts[recipe]})
    headline = link_prediction(ctx, LinkPredictionParams(**params))
    return headline, json.loads((ctx.out / "metrics.json").read_text())


def known_and_test() -> tuple[torch.Tensor, torch.Tensor]:
    known = torch.tensor([t[:3] for t in TRIPLES])
    usable = [t for t in TEST if t[0] not in NO_TEXT and t[2] not in NO_TEXT]
    return known, torch.tensor(usable)


def assert_same_numbers(got: dict, want: dict) -> None:
    for setting in ("filtered", "raw"):
        for side in ("both", "head", "tail"):
            for k in (*HEADLINE, "count"):
                assert got[setting][side][k] == pytest.approx(want[setting][side][k]), (setting, side, k)


def test_kepler_metrics_equal_its_scorer_ranked_by_knowledge_evaluate(arts, tmp_path):
    from fusion.models.kepler import candidate_scorer, encode_entities
    from fusion.pretrain.loop import load_pretrained
    from knowledge.evaluate import rank_metrics

    headline, got = run_stage(tmp_path, arts, "kepler", batch_size=3, device="cpu")
    # directly: every entity scored over the whole graph, the ones without text at -inf (never
    # above or tied with a true triple), so this needs no re-indexing
    _, _, backbone, model, _ = load_pretrained(arts["kepler"])
    tok = backbone.tokenizer
    described = [i for i in range(len(ENTITIES)) if i not in NO_TEXT]
    vec = encode_entities(model, [tok(ENTITIES[i][2], truncation=True, max_length=12)["input_ids"]
                                  for i in described], tok.pad_token_id)
    full = torch.zeros(len(ENTITIES), vec.shape[1])
    full[described] = vec
    sc = candidate_scorer(model, full, exact=True)
    off = torch.tensor([i in NO_TEXT for i in range(len(ENTITIES))])

    def masked(fn):
        return lambda a, b: fn(a, b).masked_fill(off, float("-inf"))

    known, test = known_and_test()
    want = rank_metrics((masked(sc.tails), masked(sc.heads)), test, known, len(ENTITIES), num_relations=3)
    assert_same_numbers(got, want)
    assert got["per_relation"] == [pytest.approx({**row, "candidate_cap": None})
                                   for row in want["per_relation"]]
    ranks = pq.read_table(tmp_path / "lp" / "ranks.parquet").to_pydict()
    np.testing.assert_allclose(ranks["filtered_rank"], want["ranks"]["filtered"])
    np.testing.assert_allclose(ranks["raw_rank"], want["ranks"]["raw"])
    assert ranks["head"] == want["ranks"]["head"].tolist() and ranks["tail"] == want["ranks"]["tail"].tolist()
    # entities and test triples without text: counted, skipped
    assert got["entities_without_text"] == 3 and got["triples"] == 7
    assert got["triples_without_text"] == 3 and got["triples_ranked"] == 4
    assert got["filtered"]["both"]["count"] == 8
    assert got["protocol"]["model"] == "kepler" and got["protocol"]["candidate_cap"] is None
    assert got["protocol"]["num_candidates"] == 7 and got["num_entities"] == len(ENTITIES)
    assert headline["model"] == "kepler" and headline["mrr"] == got["filtered"]["both"]["mrr"]


def test_kgbert_metrics_equal_its_triple_scorer_ranked_with_the_cap(arts, tmp_path):
    from fusion.models.kgbert import TripleScorer, rank_candidates
    from fusion.pretrain.loop import load_pretrained

    headline, got = run_stage(tmp_path, arts, "kgbert", candidate_cap=3, seed=5, batch_size=4, device="cpu")
    _, _, backbone, model, meta = load_pretrained(arts["kgbert"])
    tok = backbone.tokenizer
    ents = [tok(e[2], add_special_tokens=False)["input_ids"][:8] for e in ENTITIES]
    rels = [tok(r, add_special_tokens=False)["input_ids"] for r in ("capital of", "founded by", "animal of")]
    score = TripleScorer(model, tok, ents, rels, meta["max_length"], batch_size=64)
    known, test = known_and_test()
    described = [i for i in range(len(ENTITIES)) if i not in NO_TEXT]
    common = dict(num_entities=len(ENTITIES), cap=3, seed=5, candidates=described, num_relations=3)
    filt = rank_candidates(score, test, known, **common)
    raw = rank_candidates(score, test, torch.zeros(0, 3, dtype=torch.long), **common)
    for side in ("both", "head", "tail"):
        for k in (*HEADLINE, "count"):
            assert got["filtered"][side][k] == pytest.approx(filt["filtered"][side][k]), (side, k)
            assert got["raw"][side][k] == pytest.approx(raw["filtered"][side][k]), (side, k)
    ranks = pq.read_table(tmp_path / "lp" / "ranks.parquet").to_pydict()
    np.testing.assert_allclose(ranks["filtered_rank"], filt["ranks"]["rank"])
    np.testing.assert_allclose(ranks["raw_rank"], raw["ranks"]["rank"])
    # the cap bit (7 entities with text) and stands beside every number
    assert max(filt["ranks"]["candidates"]) == 3 and set(raw["ranks"]["candidates"]) == {3}
    assert got["protocol"]["candidate_cap"] == 3 and got["protocol"]["model"] == "kgbert"
    assert got["protocol"]["entity_text"] == "description"
    blocks = [*got["filtered"].values(), *got["raw"].values(), *got["per_relation"], got["hits_at_k"]]
    assert blocks and all(b["candidate_cap"] == 3 for b in blocks)
    assert headline["candidate_cap"] == 3
    # read from the artifact: with names every entity would have text and no triple be skipped
    assert got["entities_without_text"] == 3 and got["triples_without_text"] == 3


def test_limit_ranks_the_first_triples_only(arts, tmp_path):
    _, got = run_stage(tmp_path, arts, "kepler", limit=2, device="cpu")
    assert got["triples"] == 2 and got["triples_ranked"] == 2 and got["filtered"]["both"]["count"] == 4


def test_another_recipe_is_a_one_line_error_naming_the_recipes_that_can(tmp_path):
    from pipeline.registry import REGISTRY

    assert REGISTRY.get("fusion.link_prediction").fn is link_prediction
    model = tmp_path / "mlm"
    model.mkdir()
    ctx = context(tmp_path, "none", {"kg": tmp_path / "kg", "model": model})
    with pytest.raises(StageFailed, match="no recipe.json"):
        link_prediction(ctx, LinkPredictionParams())
    (model / "recipe.json").write_text(json.dumps({"recipe": "mlm", "options": {}}))
    ctx = context(tmp_path, "lp", {"kg": test_kepler.write_kg(tmp_path / "kg"), "model": model})
    with pytest.raises(StageFailed) as err:
        link_prediction(ctx, LinkPredictionParams())
    msg = str(err.value)
    assert "\n" not in msg and "'mlm'" in msg and "kepler" in msg and "kgbert" in msg
