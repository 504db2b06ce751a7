"""Knowledge-grounded retrieval: the ``kg_dual`` recipe (:mod:`fusion.models.kg_dual`).

Inputs: ``media`` (a ``vision.features`` / ``speech.features`` artifact: regions and captions, as for
``dual``), ``kg`` (a ``knowledge.ingest`` artifact: entity names and aliases to link the captions
with) and ``entities`` (a ``knowledge.embed`` artifact over the same graph: the entity table, loaded
by reference in each worker and again wherever the model is rebuilt, as ERNIE's).

Captions are linked to the graph with :class:`knowledge.link.Gazetteer`, ``knowledge.link``'s own
matcher and rules (leftmost-longest, word boundaries, stopwords, degree prior), by
:class:`CaptionLinker`. It links the caption *as the model sees it*: the tokenised caption decoded
back to text. ``fusion.retrieval`` hands a dual encoder token ids only, so training and evaluation
link exactly the same string, and linking needs no text file (``knowledge.link`` reads one; the
captions live in the feature artifact). An uncased vocabulary drops accents in decoding, so every
name also enters the gazetteer with its accents stripped. Of a caption's mentions the longest one
names the caption's entity (ties: the higher prior, then the first); ``entity_types`` keeps only
entities of those types (``[country]`` for flags <-> countries). A caption with no mention, or
whose entity has no vector, reads the model's learned "no entity" vector: counted in the manifest
(``captions_linked``, ``captions_without_mention``, ``captions_entity_without_vector``,
``captions_several_mentions``), never dropped.

Everything else is ``dual``'s: the same split, caption draws, text and media encoders and InfoNCE,
so ``kg_dual`` and ``dual`` with the same seed and steps differ by the entity input alone. The same
trained model evaluates without its entity input when its ``entity_input`` is switched off.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from pydantic import Field

from knowledge.kg import read_table
from knowledge.link import ENGLISH_STOPWORDS, Gazetteer
from pipeline import StageFailed

from fusion.models.backbone import TextBackbone
from fusion.models.kg_dual import NO_ENTITY
from fusion.pretrain.loop import recipe
from fusion.pretrain.media_recipes import DualOptions, DualRecipe, batch_rng
from fusion.pretrain.recipes import entity_table, id_index, safetensors_shape


class KgDualOptions(DualOptions):
    entity_dropout: float = Field(default=0.0, ge=0, lt=1,
                                  description="P(a linked caption reads the no-entity vector) in training")
    entity_types: list[str] | None = Field(default=None, description="link only entities of these "
                                           "types (e.g. [country]); None: every entity")
    min_length: int = Field(default=3, ge=1, description="shortest surface linked (normalised chars)")
    extra_stopwords: list[str] = Field(default=[], description="more surfaces never linked")


def strip_accents(s: str) -> str:
    """``s`` without combining marks (NFKD), as an uncased BERT tokenizer decodes it."""
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def caption_gazetteer(kg_uri: str, entity_types: list[str] | None, min_length: int = 3,
                      extra_stopwords: list[str] = ()) -> Gazetteer:
    """The gazetteer of the KG at ``kg_uri`` (``knowledge.link``'s defaults: degree prior from the
    train triples, English stopwords), every name and alias also without accents; only entities
    of ``entity_types`` when given."""
    ents = read_table(kg_uri, "entities", ["idx", "id", "name", "aliases", "types"])
    triples = read_table(kg_uri, "triples", ["head", "tail", "split"])
    train = triples.filter(pc.equal(triples["split"], "train"))
    n = ents.num_rows
    degree = (np.bincount(train["head"].to_numpy(), minlength=n)[:n]
              + np.bincount(train["tail"].to_numpy(), minlength=n)[:n])
    wanted = None if entity_types is None else set(entity_types)
    entries = []
    for idx, eid, name, aliases, types in zip(*(ents[c].to_pylist() for c in ("idx", "id", "name", "aliases",
                                                                             "types"))):
        if wanted is not None and not wanted & set(types or ()):
            continue
        names = [x for x in [name, *(aliases or [])] if x]
        extra = [strip_accents(x) for x in names if strip_accents(x) != x]
        entries.append((idx, eid, name, [*(aliases or []), *extra]))
    if not entries:
        raise StageFailed(f"kg_dual: no entity of the KG at {kg_uri} has a type in {entity_types}")
    return Gazetteer(entries, degree=degree, min_length=min_length,
                     stopwords=set(ENGLISH_STOPWORDS) | set(extra_stopwords))


class CaptionLinker:
    """Caption token ids -> the entity table's row of the caption's entity (:data:`NO_ENTITY` for
    none): decode, link with ``gazetteer``, keep the longest mention (then the higher prior, then
    the first), look its entity id up in ``rows`` (the ``knowledge.embed`` artifact's index)."""

    def __init__(self, gazetteer: Gazetteer, rows: dict[str, int], tokenizer: Any) -> None:
        self.gazetteer, self.rows, self.tokenizer = gazetteer, rows, tokenizer

    def link(self, ids: list[int]) -> tuple[int, str]:
        """``(row, outcome)``; outcome: ``linked``, ``without_mention`` or ``entity_without_vector``
        (with ``+several`` when the caption had more than one mention)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        mentions = self.gazetteer.link(text)
        if not mentions:
            return NO_ENTITY, "without_mention"
        best = max(enumerate(mentions), key=lambda km: (km[1].end - km[1].start, km[1].score, -km[0]))[1]
        several = "+several" if len(mentions) > 1 else ""
        row = self.rows.get(best.entity_id)
        return (NO_ENTITY, "entity_without_vector" + several) if row is None else (row, "linked" + several)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids (padding is a special token, skipped) -> (B,) long entity rows."""
        rows = [self.link(r)[0] for r in input_ids.tolist()]
        return torch.tensor(rows, dtype=torch.long, device=input_ids.device)


def count_outcome(counts: Counter, outcome: str) -> None:
    """A caption's linking outcome into the manifest's counts."""
    base, several = outcome.split("+")[0], outcome.endswith("+several")
    counts[f"captions_{base}"] += 1
    counts["captions_several_mentions"] += several


def caption_linker(resources: dict[str, Any], options: KgDualOptions, tokenizer: Any) -> CaptionLinker:
    """The linker of a run's KG and entity table (both by URI, from ``resources``)."""
    gaz = caption_gazetteer(resources["kg_uri"], options.entity_types, options.min_length,
                            options.extra_stopwords)
    return CaptionLinker(gaz, id_index(resources["entity_vectors_uri"]), tokenizer)


@recipe("kg_dual")
class KgDualRecipe(DualRecipe):
    """``dual`` plus the caption's linked KG entity on the text side (module docstring)."""

    needs = ("media", "kg", "entities")
    Options = KgDualOptions

    def resources(self, inputs: dict[str, str], options: KgDualOptions) -> dict[str, Any]:
        num, dim = safetensors_shape(inputs["entities"], "embeddings.safetensors", "entity")
        # URIs (strings) stay in recipe.json's resources_meta: fusion.retrieval rebuilds the model,
        # its table and its linker from the same artifacts.
        return {**super().resources(inputs, options), "kg_uri": inputs["kg"],
                "entity_vectors_uri": inputs["entities"], "num_entities": num, "entity_dim": dim}

    def finish(self, resources: dict[str, Any], counts: dict[str, int]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        resources, counts = super().finish(resources, counts)
        if not counts.get("captions_linked"):
            raise StageFailed(f"kg_dual: no caption links to an entity with a vector ({counts}); are "
                              f"the kg and entities inputs the same graph, and do the captions name "
                              f"its entities?")
        return resources, counts

    def encoder(self, inputs: dict[str, str], options: KgDualOptions, tokenizer: Any,
                max_length: int) -> dict[str, Any]:
        state = super().encoder(inputs, options, tokenizer, max_length)
        linker = caption_linker({"kg_uri": inputs["kg"], "entity_vectors_uri": inputs["entities"]},
                                options, tokenizer)
        return state | {"linker": linker}

    def encoded_row(self, state: dict, row: dict, enc: Any, counts: Counter) -> dict:
        """``dual``'s row plus each caption's entity row (``caption_entity``), linked from the
        tokenised caption as evaluation will link it."""
        entity = []
        for ids in enc["input_ids"]:
            idx, outcome = state["linker"].link(ids)
            count_outcome(counts, outcome)
            entity.append(idx)
        return {**super().encoded_row(state, row, enc, counts), "caption_entity": entity}

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: KgDualOptions) -> Any:
        from fusion.models.kg_dual import KgDual, KgDualConfig

        dual = super().build(backbone, resources, options)
        table = entity_table(resources["entity_vectors_uri"])
        return KgDual(dual, table, KgDualConfig(entity_dim=int(table.shape[1]),
                                                entity_dropout=options.entity_dropout),
                      linker=caption_linker(resources, options, backbone.tokenizer))

    def collate(self, backbone: TextBackbone, rows: list[dict], resources: dict[str, Any],
                options: Any, max_length: int) -> dict[str, Any]:
        # the same caption draw as dual's (same generator, same order), then its entity
        batch = super().collate(backbone, rows, resources, options, max_length)
        rng = batch_rng([r["media"] for r in rows])
        picks = [int(rng.integers(len(r["captions"]))) for r in rows]
        batch["entity_idx"] = torch.tensor([r["caption_entity"][k] for r, k in zip(rows, picks)],
                                           dtype=torch.long)
        return batch
