"""The knowledge recipes wired to real artifact layouts: ERNIE, K-BERT and K-Adapter pretrain through
``fusion.pretrain`` on a tiny KG, its entity vectors and linked text, and count what they leave out."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from fusion.models.backbone import random_backbone
from tests.fusion.conftest import TEXT_RUN, run_pretrain, write_linked
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph

# (id, name, type)
ENTITIES = [("t:beijing", "beijing", "city"), ("t:china", "china", "country"),
            ("t:paris", "paris", "city"), ("t:france", "france", "country"),
            ("t:berlin", "berlin", "city"), ("t:germany", "germany", "country"),
            ("t:apple", "apple", "company"), ("t:steve", "steve jobs", "person")]
RELATIONS = ["capital", "founded by"]
TRIPLES = [(0, 0, 1), (2, 0, 3), (4, 0, 5), (6, 1, 7)]  # head, relation, tail
SENTENCES = ["beijing is the capital of china", "paris is the capital of france",
             "berlin is the capital of germany", "apple was founded by steve jobs",
             "he was born in paris", "the dog and the cat are animals"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    kg_dir, emb_dir, link_dir, bb_dir = (root / n for n in ("kg", "emb", "link", "bb"))
    for d in (kg_dir, emb_dir, link_dir):
        d.mkdir()
    n = len(ENTITIES)
    KnowledgeGraph(
        pa.table({"idx": list(range(n)), "id": [e[0] for e in ENTITIES],
                  "name": [e[1] for e in ENTITIES], "aliases": [[] for _ in ENTITIES],
                  "description": [""] * n, "types": [[e[2]] for e in ENTITIES],
                  "source": ["t"] * n}, schema=ENTITY_SCHEMA),
        pa.table({"idx": [0, 1], "id": ["t:capital", "t:founded"], "name": RELATIONS,
                  "source": ["t", "t"]}, schema=RELATION_SCHEMA),
        pa.table({"head": [t[0] for t in TRIPLES], "relation": [t[1] for t in TRIPLES],
                  "tail": [t[2] for t in TRIPLES], "split": ["train"] * len(TRIPLES)},
                 schema=TRIPLE_SCHEMA)).save(kg_dir)
    # entity vectors for all but steve jobs: his mentions must be counted as lacking a vector
    save_file({"entity": torch.randn(n - 1, 12), "relation": torch.randn(2, 12)},
              str(emb_dir / "embeddings.safetensors"))
    pq.write_table(pa.table({"idx": list(range(n - 1)), "id": [e[0] for e in ENTITIES[:-1]],
                             "name": [e[1] for e in ENTITIES[:-1]]}), emb_dir / "entities.parquet")
    docs = [(f"d{i}", SENTENCES[i % len(SENTENCES)]) for i in range(24)]
    rows = []
    for doc_id, text in docs:
        for k, (eid, name, _) in enumerate(ENTITIES):
            if name in text:
                s = text.index(name)
                rows.append((doc_id, s, s + len(name), name, k, eid))
    rows.append(("d5", 4, 7, "dog", 99, "t:dog"))  # an entity the KG does not know
    write_linked(link_dir, docs, [(r[0], r[1], r[2], r[5]) for r in rows])
    bb = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    bb.model.save_pretrained(str(bb_dir))
    tokenizer.save_pretrained(str(bb_dir))
    return {"kg": kg_dir, "entities": emb_dir, "text": link_dir, "backbone": bb_dir}


def _run(tmp: Path, artifacts: dict[str, Path], roles: tuple[str, ...], **params) -> tuple[dict, list]:
    metrics, out = run_pretrain(tmp, "pt", {r: artifacts[r] for r in roles},
                                TEXT_RUN | {"backbone": str(artifacts["backbone"])} | params)
    return metrics, json.loads((out / "history.json").read_text())


def _falls(hist: list[dict], key: str, window: int = 8) -> bool:
    """The loss of the last steps is below that of the first ones (steps whose batch had nothing
    to predict report exactly 0 and are left out)."""
    vals = [h[key] for h in hist if h[key] != 0.0]
    return sum(vals[-window:]) / window < sum(vals[:window]) / window


def test_ernie_recipe_trains_mlm_and_dea(ray_local, tmp_path, artifacts):
    metrics, hist = _run(tmp_path, artifacts, ("text", "entities"), recipe="ernie",
                         options={"k_layers": 1})
    assert metrics["num_entities"] == 7 and metrics["entity_dim"] == 12
    assert metrics["mentions_without_vector"] == 4 + 1  # steve jobs in 4 documents, and the dog
    assert {"loss_mlm", "loss_dea", "loss_total"} <= set(hist[0])
    assert _falls(hist, "loss_dea") and _falls(hist, "loss_total")


def test_kbert_recipe_injects_only_known_triples(ray_local, tmp_path, artifacts):
    metrics, hist = _run(tmp_path, artifacts, ("text", "kg"), recipe="kbert", options={"k": 2})
    assert metrics["mentions_not_in_kg"] == 1 and metrics["triples_available"] == 4
    assert _falls(hist, "loss_mlm")


@pytest.mark.parametrize("adapter,labels,examples", [("factual", 2, 16), ("lexical", 4, 36)])
def test_kadapter_recipe_learns_its_task_on_a_frozen_backbone(ray_local, tmp_path, artifacts,
                                                              adapter, labels, examples):
    metrics, hist = _run(tmp_path, artifacts, ("text", "kg"), recipe="kadapter",
                         options={"adapter": adapter, "adapter_size": 16, "num_heads": 2,
                                  "min_label_count": 1})
    # factual: (3 capital + 1 founded-by sentences) x 4 copies = 16 pairs; lexical: 9 typed
    # mentions per 6 sentences (beijing, china, paris, france, berlin, germany, apple, steve jobs,
    # paris again) x 4 copies = 36, of 4 types
    assert metrics["labels"] == labels and metrics["task_examples"] == examples
    assert _falls(hist, "loss_task")


def test_a_recipe_without_its_inputs_says_which_roles(ray_local, tmp_path, artifacts):
    from pipeline import StageFailed

    with pytest.raises(StageFailed, match=r"needs input role\(s\) \['entities'\]"):
        _run(tmp_path, artifacts, ("text",), recipe="ernie")


def test_a_partitions_only_entity_artifact_is_a_one_line_error(tmp_path) -> None:  # noqa: ANN001
    """ERNIE and KnowBERT need the whole entity table: a knowledge.embed artifact trained with
    partitions and assemble: false says which setting to change, not a FileNotFoundError."""
    import pytest

    from fusion.pretrain.recipes import entity_table, safetensors_shape
    from pipeline import StageFailed

    (tmp_path / "partitions").mkdir()
    with pytest.raises(StageFailed, match=r"no embeddings.safetensors \(trained with partitions and "
                                          r"assemble: false: run knowledge.embed with assemble: true\)"):
        entity_table(str(tmp_path))
    with pytest.raises(StageFailed, match="assemble: true"):
        safetensors_shape(str(tmp_path), "embeddings.safetensors", "entity")
    (tmp_path / "partitions").rmdir()
    with pytest.raises(StageFailed, match=r"no embeddings.safetensors$"):
        entity_table(str(tmp_path))
