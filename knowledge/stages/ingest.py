"""``knowledge.ingest``: one or more knowledge sources -> one KnowledgeGraph artifact."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny

from pipeline import StageContext, stage
from pipeline.uris import InputURI

from ..ingest import build_graph, plot_stats
from ..kg import KnowledgeGraph
from ..sources.base import KnowledgeSource, build_source


def _build_source(v: Any) -> Any:
    """One ``sources:`` entry -> its source, validated by the source type's own model. Runs per
    entry, so that a mistake points at the entry (``sources[1]``, ``sources[1].header``) and its
    line: an unknown or missing type is a ``ValueError`` with a did-you-mean, and the source's own
    validation errors keep their field, under the entry's."""
    return build_source(v) if isinstance(v, dict) else v


_Source = Annotated[SerializeAsAny[KnowledgeSource], BeforeValidator(_build_source)]


class SplitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["auto", "source", "random"] = Field(
        default="auto", description="auto: the sources' own splits if any has them, else random")
    valid: float = Field(default=0.1, ge=0, lt=1)
    test: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[_Source] = Field(
        min_length=1, description="[{type: pykeen, dataset: nations}, ...]; types: `stele sources`")
    split: SplitParams = SplitParams()
    align: Literal["none", "names"] = Field(
        default="none", description="merge same-named entities of different sources")
    align_file: InputURI | None = Field(default=None,
                                        description="TSV of id<TAB>canonical_id to merge")
    duplicates: Literal["drop", "raise"] = Field(
        default="drop", description="duplicate triples: drop (counted in the manifest) or raise")
    on_error: Literal["raise", "skip"] = "raise"


def _fingerprint(params: IngestParams) -> list[Any]:
    return [s.fingerprint() for s in params.sources]


@stage("knowledge.ingest", version="3", fingerprint=_fingerprint,
       headline=("entities", "relations", "triples", "quarantined", "components"), inputs={},
       loader=KnowledgeGraph.load)
def ingest(ctx: StageContext, params: IngestParams) -> dict:
    """Merge knowledge sources into one KnowledgeGraph (entities, relations, split triples)."""
    graph, report = build_graph(
        list(params.sources), split_mode=params.split.mode, valid=params.split.valid,
        test=params.split.test, seed=params.split.seed, align_mode=params.align,
        mapping_file=params.align_file, duplicates=params.duplicates, on_error=params.on_error)
    graph.save(ctx.out)
    (ctx.out / "stats.json").write_text(json.dumps(report.stats, indent=1))
    (ctx.out / "quarantine.json").write_text(json.dumps(
        {"sources": report.quarantine, "duplicates": report.duplicates}, indent=1))
    plot_stats(report.stats, ctx.out / "stats.png")
    ctx.log.info("%r", graph)
    s = report.stats
    return {"entities": s["entities"], "relations": s["relations"], "triples": s["triples"],
            **{f"{k}_triples": v for k, v in s["splits"].items()},
            "components": s["components"]["count"],
            "largest_component_share": round(s["components"]["largest_share"], 4),
            "quarantined": sum(v["count"] for v in report.quarantine.values()),
            "duplicates": report.duplicates["count"]}
