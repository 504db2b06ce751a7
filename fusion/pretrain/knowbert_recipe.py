"""The ``knowbert`` pretraining recipe (Peters et al. 2019): MLM + entity linking through a KAR layer.

Inputs: ``text`` (a ``knowledge.link`` artifact), ``entities`` (a ``knowledge.embed`` artifact, the
frozen table the linker scores against; it travels by reference, as ERNIE's does) and ``kg`` (the
``knowledge.ingest`` artifact, for its names and aliases).

Candidates. KnowBERT's linker chooses among each mention's candidate entities with their priors
(the paper's candidate generator, Wikipedia anchor statistics for KnowBERT-Wiki). A ``knowledge.link``
mention holds only the entity its linker chose (plus that entity's prior and the number of
candidates), not the list, so the list is rebuilt here from the KG's alias table, the linker's own
dictionary (:class:`knowledge.link.Gazetteer`, same normalisation): every entity whose name or
alias equals the mention's surface after normalisation, with the gazetteer's prior (``degree``:
``1 + degree`` in the train triples, the default of ``knowledge.link``; or ``uniform``), best
first, at most ``max_candidates``. The gold entity of the linker loss is the one ``knowledge.link``
chose. Candidates without a vector in the table are dropped and counted; a mention left with no
candidate is skipped and counted; a mention whose chosen entity is not among its candidates keeps
its candidates without a gold (counted). Nothing crashes on a mismatch between the three artifacts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline import StageFailed

from fusion.pretrain.loop import Recipe, recipe
from fusion.pretrain.recipes import entity_table, id_index, safetensors_shape


class KnowBertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers_before: int | None = Field(default=None, ge=1, description="backbone layers below the KAR; "
                                      "None: all but the top two")
    entity_heads: int = Field(default=4, ge=1, description="heads of the span attentions (divide the "
                                                           "entity dimension)")
    max_candidates: int = Field(default=30, ge=1, description="candidates per mention, best prior first")
    max_mentions: int = Field(default=64, ge=1, description="mention spans per sequence")
    prior: Literal["degree", "uniform"] = Field(
        default="degree", description="candidate prior: 1 + degree in the KG's train triples (as "
                                      "knowledge.link), or uniform")
    threshold: float | None = Field(default=None, description="linker scores below this get no weight "
                                                              "in the weighted entity embedding")
    linker_weight: float = Field(default=1.0, ge=0)


class CandidateTable:
    """Candidate entities of a surface from a KG's alias table, as rows of an entity table.

    ``gazetteer``: a :class:`knowledge.link.Gazetteer`; ``rows``: entity id -> table row (ids
    without one are not candidates). :meth:`lookup` returns ``(rows, priors)`` best first and
    counts the candidates that had no row."""

    def __init__(self, gazetteer: Any, rows: dict[str, int], max_candidates: int) -> None:
        self.gazetteer, self.rows, self.max_candidates = gazetteer, rows, max_candidates

    @classmethod
    def from_kg(cls, kg_uri: str, rows: dict[str, int], max_candidates: int, prior: str = "degree"
                ) -> CandidateTable:
        """From the ``knowledge.ingest`` artifact at ``kg_uri`` (any fsspec URI), reading only the
        columns the alias table and the degree prior need (not the descriptions): built once per
        encoding actor, never in the stage's process."""
        from knowledge.kg import TRIPLE_COLUMNS, KnowledgeGraph, read_table

        kg = KnowledgeGraph(read_table(kg_uri, "entities", ["idx", "id", "name", "aliases"]),
                            read_table(kg_uri, "relations", ["idx"]),
                            read_table(kg_uri, "triples", [*TRIPLE_COLUMNS, "split"]))
        return cls.from_graph(kg, rows, max_candidates, prior)

    @classmethod
    def from_graph(cls, kg: Any, rows: dict[str, int], max_candidates: int, prior: str = "degree"
                   ) -> CandidateTable:
        """From a loaded :class:`knowledge.kg.KnowledgeGraph` (what ``fusion.finetune`` holds)."""
        from knowledge.link import Gazetteer

        # min_length 1 and no stop list: knowledge.link already decided what is a mention; here
        # every surface it linked must find its candidates.
        return cls(Gazetteer.from_kg(kg, prior=prior, min_length=1, stopwords=None), rows, max_candidates)

    def lookup(self, surface: str, counts: Counter) -> tuple[list[int], list[float], list[str]]:
        """``(rows, priors, entity ids)`` of the surface's candidates with a vector, best prior
        first (ties: the gazetteer's order), at most ``max_candidates``."""
        found = sorted(self.gazetteer.candidates(surface), key=lambda c: -c[2])
        with_row = [(self.rows[eid], p, eid) for _, eid, p in found if eid in self.rows]
        counts["candidates_without_vector"] += len(found) - len(with_row)
        counts["candidates_over_limit"] += max(0, len(with_row) - self.max_candidates)
        kept = with_row[:self.max_candidates]
        return [r for r, _, _ in kept], [p for _, p, _ in kept], [e for _, _, e in kept]


def doc_mentions(text: str, mentions: list, table: CandidateTable, counts: Counter) -> list:
    """A ``knowledge.link`` document's mentions ``(start, end, entity_id)`` ->
    :class:`fusion.models.knowbert.SpanCandidates`, gold = the linked entity; counted:
    ``mentions``, ``mentions_without_candidates``, ``mentions_gold_not_candidate``."""
    from fusion.models.knowbert import SpanCandidates
    from fusion.models.objectives import IGNORE

    out = []
    for start, end, eid in mentions:
        counts["mentions"] += 1
        rows, priors, ids = table.lookup(text[start:end], counts)
        if not rows:
            counts["mentions_without_candidates"] += 1
            continue
        if eid in ids:
            gold = ids.index(eid)
        else:
            gold = IGNORE
            counts["mentions_gold_not_candidate"] += 1
        out.append(SpanCandidates(int(start), int(end), rows, priors, gold))
    return out


@recipe("knowbert")
class KnowBertRecipe(Recipe):
    """KnowBERT (Peters et al. 2019): see the module docstring and :mod:`fusion.models.knowbert`."""

    needs = ("text", "entities", "kg")
    Options = KnowBertOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        num, dim = safetensors_shape(inputs["entities"], "embeddings.safetensors", "entity")
        if dim % options.entity_heads:
            raise StageFailed(f"knowbert: entity_dim {dim} of {inputs['entities']} is not a multiple "
                              f"of entity_heads {options.entity_heads}")
        return {"entities_uri": inputs["entities"], "num_entities": num, "entity_dim": dim}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        table = CandidateTable.from_kg(inputs["kg"], id_index(inputs["entities"]),
                                       options.max_candidates, options.prior)
        return {"tokenizer": tokenizer, "max_length": max_length, "table": table,
                "max_mentions": options.max_mentions}

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        from fusion.models.knowbert import encode_text

        rows, counts = [], Counter(documents=len(docs))
        for d in docs:
            ms = doc_mentions(d["text"], d["mentions"], state["table"], counts)
            ex = encode_text(d["text"], ms, state["tokenizer"], state["max_length"], state["max_mentions"])
            counts.update(ex.counts)
            counts["gold_spans"] += sum(g >= 0 for g in ex.gold)
            rows.append({"input_ids": ex.input_ids, "special_tokens_mask": ex.special_tokens_mask,
                         "span_start": ex.span_start, "span_end": ex.span_end,
                         "candidates": ex.candidates, "priors": ex.priors, "gold": ex.gold})
        return rows, counts

    COUNTS = ("mentions", "mentions_without_candidates", "mentions_gold_not_candidate",
              "candidates_without_vector", "candidates_over_limit", "spans", "gold_spans",
              "spans_truncated", "spans_unaligned", "spans_over_limit")

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        counts = {**dict.fromkeys(self.COUNTS, 0), **counts}   # a zero is a finding: keep it listed
        if not counts["spans"]:
            raise StageFailed(f"knowbert: no mention has a candidate entity with a vector; are the "
                              f"text, the KG and the embeddings built from the same graph? {counts}")
        return resources, counts

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.knowbert import KnowBert, KnowBertConfig

        table = resources.get("entity_table")
        if table is None:
            table = entity_table(resources["entities_uri"])
        return KnowBert(backbone, table, KnowBertConfig(
            layers_before=options.layers_before, entity_heads=options.entity_heads,
            threshold=options.threshold, linker_weight=options.linker_weight))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.knowbert import collate

        batch = collate(rows, backbone.tokenizer.pad_token_id)
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}
