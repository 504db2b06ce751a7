"""``knowledge.evaluate``: filtered two-sided link-prediction evaluation of a KG embedding artifact.

The protocol (Bordes et al. 2013 filtered setting, both sides, realistic ranks as in PyKEEN /
Berrendorf et al. 2020) is :func:`knowledge.evaluate.rank_metrics`; this stage feeds it the split and
the filter (every triple of the graph: train + valid + test) and writes what it found.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline import Input, StageContext, StageFailed, stage

HEADLINE = ("mrr", "mr", "hits@1", "hits@3", "hits@10")


class EvaluateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "valid", "test"] = Field(default="test", description="triples to rank")
    batch_size: int = Field(default=256, ge=1, description="test triples per chunk; peak memory ~ "
                                                           "batch_size x num_entities scores")
    device: str = Field(default="auto", description="'auto' (CUDA when available), 'cpu', 'cuda:0'")


@stage("knowledge.evaluate", version="1", cpus=1, headline=("mrr", "hits@1", "hits@10", "mr"),
       inputs={"kg": Input("knowledge.ingest", "the graph whose split triples are ranked"),
               "model": Input("knowledge.embed", "the trained embeddings to evaluate")})
def evaluate(ctx: StageContext, params: EvaluateParams) -> dict:
    """Rank every split triple's head and tail among all entities (filtered and raw, realistic ties):
    MRR, MR, Hits@1/3/10 overall, per side and per relation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..evaluate import rank_metrics, resolve_device
    from ..kg import KnowledgeGraph
    from ..models import load_model

    for role in ("kg", "model"):
        if role not in ctx.inputs:
            raise StageFailed(f"knowledge.evaluate needs inputs 'kg' and 'model', got "
                              f"{sorted(ctx.inputs) or 'none'}")
    kg = KnowledgeGraph.load(ctx.inputs["kg"].path)
    device = resolve_device(params.device)
    model = load_model(ctx.inputs["model"].path, device=str(device))
    if (model.num_nodes, model.num_relations) != (kg.num_entities, kg.num_relations):
        raise StageFailed(f"model has {model.num_nodes} entities / {model.num_relations} relations, "
                          f"the graph {kg.num_entities} / {kg.num_relations}")
    triples = kg.split_tensor(params.split)
    if len(triples) == 0:
        raise StageFailed(f"split {params.split!r} of the graph is empty")
    ctx.log.info("ranking %d %s triples against %d entities on %s", len(triples), params.split,
                 kg.num_entities, device)
    res = rank_metrics(model, triples, kg.split_tensor(), kg.num_entities,
                       batch_size=params.batch_size, device=device,
                       num_relations=kg.num_relations, progress=ctx.progress)

    ranks = res.pop("ranks")
    res["split"], res["device"] = params.split, str(device)
    (ctx.out / "metrics.json").write_text(json.dumps(res, indent=1))
    pq.write_table(pa.table({
        "head": pa.array(ranks["head"], pa.int32()),
        "relation": pa.array(ranks["relation"], pa.int32()),
        "tail": pa.array(ranks["tail"], pa.int32()),
        "side": pa.array(ranks["side"].tolist(), pa.string()),   # the predicted position
        "filtered_rank": pa.array(ranks["filtered"], pa.float64()),
        "raw_rank": pa.array(ranks["raw"], pa.float64()),
    }), ctx.out / "ranks.parquet")
    _write_per_relation(res["per_relation"], kg.relation_ids(), ctx.out / "per_relation.csv")
    _plot_hits(res["hits_at_k"], ctx.out / "hits_at_k.png", params.split)
    return {k: res["filtered"]["both"][k] for k in HEADLINE}


def _write_per_relation(rows: list[dict[str, Any]], relation_ids: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["relation", "relation_id", "count", "filtered_mrr", "filtered_hits@10"])
        for row in rows:
            w.writerow([row["relation"], relation_ids[row["relation"]], row["count"],
                         f"{row['mrr']:.6f}", f"{row['hits@10']:.6f}"])


def _plot_hits(curve: dict[str, list], path: Path, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for side, style in (("both", "o-"), ("head", "s--"), ("tail", "^--")):
        ax.plot(curve["k"], curve[side], style, label=side)
    ax.set_xlabel("k")
    ax.set_ylabel("filtered Hits@k")
    ax.set_xticks(curve["k"])
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{split}: filtered Hits@k (numbers in metrics.json)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
