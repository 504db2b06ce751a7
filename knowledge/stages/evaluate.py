"""``knowledge.evaluate``: filtered two-sided link-prediction evaluation of a KG embedding artifact.

The protocol (Bordes et al. 2013 filtered setting, both sides, realistic ranks as in PyKEEN /
Berrendorf et al. 2020) is :func:`knowledge.evaluate.rank_metrics`; this stage feeds it the split and
the filter (every triple of the graph: train + valid + test) and writes what it found.

A ``knowledge.embed`` artifact trained with ``partitions`` and ``assemble: false`` has no whole model:
it is ranked from its ``partitions/`` by :func:`knowledge.partitioned_eval.sharded_rank_metrics`, one
candidate partition at a time in this process, each reading its share of the filter from the graph's
URI; the numbers are ``rank_metrics``' exactly. Such a run holds the split's triples, the
partitioning's ``(N,)`` arrays and one partition, never the whole table or the filter.
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
    from .embed import not_assembled

    if not_assembled(Path(ctx.inputs["model"].path)):
        res, relation_ids = _evaluate_partitions(ctx, params)
        device = "cpu"
    else:
        kg = KnowledgeGraph.load(ctx.inputs["kg"].path)
        device = resolve_device(params.device)
        model = load_model(ctx.inputs["model"].path, device=str(device))
        _check_sizes((model.num_nodes, model.num_relations), (kg.num_entities, kg.num_relations))
        triples = kg.split_tensor(params.split)
        if len(triples) == 0:
            raise StageFailed(f"split {params.split!r} of the graph is empty")
        ctx.log.info("ranking %d %s triples against %d entities on %s", len(triples), params.split,
                     kg.num_entities, device)
        res = rank_metrics(model, triples, kg.split_tensor(), kg.num_entities,
                           batch_size=params.batch_size, device=device,
                           num_relations=kg.num_relations, progress=ctx.progress)
        relation_ids = kg.relation_ids()

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
    _write_per_relation(res["per_relation"], relation_ids, ctx.out / "per_relation.csv")
    _plot_hits(res["hits_at_k"], ctx.out / "hits_at_k.png", params.split)
    return {k: res["filtered"]["both"][k] for k in HEADLINE}


def _check_sizes(model: tuple[int, int], graph: tuple[int, int]) -> None:
    if model != graph:
        raise StageFailed(f"model has {model[0]} entities / {model[1]} relations, "
                          f"the graph {graph[0]} / {graph[1]}")


def _evaluate_partitions(ctx: StageContext, params: EvaluateParams) -> tuple[dict[str, Any], list[str]]:
    """``rank_metrics``' result for a partitions-only artifact (the module docstring), and the
    relation ids; the graph is read by column and by split, never whole."""
    import torch

    from ..kg import read_table, read_triples
    from ..partitioned_eval import PARTITIONING, FilterSource, load_partitioned, sharded_rank_metrics

    kg_uri = ctx.inputs["kg"].uri
    folder = Path(ctx.inputs["model"].path) / "partitions"
    job, parts = load_partitioned(folder)
    relation_ids = read_table(kg_uri, "relations", ["id"])["id"].to_pylist()
    num_entities = read_table(kg_uri, "entities", ["idx"]).num_rows
    _check_sizes((job.num_entities, job.num_relations), (num_entities, len(relation_ids)))
    triples = torch.from_numpy(read_triples(kg_uri, params.split)[0])
    if len(triples) == 0:
        raise StageFailed(f"split {params.split!r} of the graph is empty")
    ctx.log.info("ranking %d %s triples against %d entities in %d partitions (sharded, cpu)",
                 len(triples), params.split, num_entities, parts.num_partitions)
    res = sharded_rank_metrics(job, parts, triples, FilterSource(kg_uri, str(folder / PARTITIONING)),
                               batch_size=params.batch_size)
    res["evaluator"] = f"sharded over {parts.num_partitions} partitions (knowledge.partitioned_eval)"
    return res, relation_ids


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
