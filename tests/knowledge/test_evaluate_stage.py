"""``knowledge.evaluate`` on a tiny graph: the files it writes agree with ``rank_metrics``."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from knowledge.evaluate import rank_metrics
from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from knowledge.models import build_model, save_model
from knowledge.stages.evaluate import EvaluateParams, evaluate
from pipeline import StageFailed
from pipeline.context import StageContext
from pipeline.registry import REGISTRY, Resources
from pipeline.store import Artifact

N, R = 25, 3


def _kg() -> KnowledgeGraph:
    g = torch.Generator().manual_seed(0)
    trip = torch.stack([torch.randint(N, (150,), generator=g), torch.randint(R, (150,), generator=g),
                        torch.randint(N, (150,), generator=g)], 1).unique(dim=0)
    split = ["test"] * 20 + ["valid"] * 10 + ["train"] * (len(trip) - 30)
    entities = pa.table({"idx": list(range(N)), "id": [f"t:e{i}" for i in range(N)],
                         "name": [f"e{i}" for i in range(N)], "aliases": [[] for _ in range(N)],
                         "description": [""] * N, "types": [[] for _ in range(N)],
                         "source": ["t"] * N}, schema=ENTITY_SCHEMA)
    relations = pa.table({"idx": list(range(R)), "id": [f"t:r{i}" for i in range(R)],
                          "name": [f"r{i}" for i in range(R)], "source": ["t"] * R},
                         schema=RELATION_SCHEMA)
    triples = pa.table({"head": trip[:, 0].int().tolist(), "relation": trip[:, 1].int().tolist(),
                        "tail": trip[:, 2].int().tolist(), "split": split}, schema=TRIPLE_SCHEMA)
    return KnowledgeGraph(entities, relations, triples)


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, Artifact]:
    kg_dir, model_dir = tmp_path / "kg", tmp_path / "model"
    kg_dir.mkdir()
    model_dir.mkdir()
    _kg().save(kg_dir)
    torch.manual_seed(0)
    save_model(model_dir, build_model("transe", N, R, 8, p_norm=2.0))
    return {"kg": Artifact("k1", kg_dir, {}), "model": Artifact("k2", model_dir, {})}


def _ctx(out: Path, inputs: dict[str, Artifact]) -> StageContext:
    out.mkdir(exist_ok=True)
    return StageContext(stage="eval", key="k3", out=out, inputs=inputs, resources=Resources(),
                        state_uri=str(out / "state"), log=logging.getLogger("test.eval"))


def test_registered() -> None:
    st = REGISTRY.get("knowledge.evaluate")
    assert st.version == "1" and st.resources.cpus == 1 and st.params is EvaluateParams


def test_stage_writes_metrics_ranks_table_and_plot(tmp_path: Path, artifacts) -> None:
    out = tmp_path / "out"
    headline = evaluate(_ctx(out, artifacts), EvaluateParams(batch_size=7, device="cpu"))

    kg = KnowledgeGraph.load(artifacts["kg"].path)
    from knowledge.models import load_model

    ref = rank_metrics(load_model(artifacts["model"].path), kg.split_tensor("test"),
                       kg.split_tensor(), N, batch_size=20)
    metrics = json.loads((out / "metrics.json").read_text())
    assert headline == {k: ref["filtered"]["both"][k] for k in ("mrr", "mr", "hits@1", "hits@3",
                                                                 "hits@10")}
    for setting in ("filtered", "raw"):
        for side in ("both", "head", "tail"):
            assert metrics[setting][side] == pytest.approx(ref[setting][side], abs=1e-12)
    assert metrics["split"] == "test" and metrics["num_triples"] == 20
    assert len(metrics["hits_at_k"]["both"]) == 10
    assert metrics["hits_at_k"]["both"][9] == pytest.approx(metrics["filtered"]["both"]["hits@10"])

    ranks = pq.read_table(out / "ranks.parquet")
    assert ranks.column_names == ["head", "relation", "tail", "side", "filtered_rank", "raw_rank"]
    assert ranks.num_rows == 40
    assert ranks["side"].to_pylist() == ["head"] * 20 + ["tail"] * 20
    assert ranks["filtered_rank"].to_pylist() == ref["ranks"]["filtered"].tolist()
    fr, rr = ranks["filtered_rank"].to_numpy(), ranks["raw_rank"].to_numpy()
    assert (fr <= rr).all() and (fr >= 1).all()
    test = kg.split_array("test")
    assert ranks["head"].to_pylist()[:20] == test[:, 0].tolist()

    with open(out / "per_relation.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["count"]) for r in rows) == 20
    assert {r["relation_id"] for r in rows} <= {f"t:r{i}" for i in range(R)}
    assert (out / "hits_at_k.png").stat().st_size > 1000


def test_stage_rejects_missing_input_and_mismatched_model(tmp_path: Path, artifacts) -> None:
    with pytest.raises(StageFailed, match="needs inputs"):
        evaluate(_ctx(tmp_path / "o1", {"kg": artifacts["kg"]}), EvaluateParams())
    other = tmp_path / "other"
    other.mkdir()
    save_model(other, build_model("distmult", N + 1, R, 4))
    bad = {"kg": artifacts["kg"], "model": Artifact("k4", other, {})}
    with pytest.raises(StageFailed, match="entities"):
        evaluate(_ctx(tmp_path / "o2", bad), EvaluateParams(device="cpu"))
