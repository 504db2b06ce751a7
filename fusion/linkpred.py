"""``fusion.link_prediction``: link prediction with a text-based KG encoder (KEPLER or KG-BERT).

Inputs by role: ``model`` (a ``fusion.pretrain`` artifact of recipe ``kepler`` or ``kgbert``) and
``kg`` (``knowledge.ingest``: the entity texts, the split to rank, every triple for the filter).
``knowledge.evaluate`` cannot score these models (``knowledge`` imports no ``fusion``), so the
protocol is the same one, fed from here:

* **KEPLER** (Wang et al. 2021): every entity with text is encoded once from its text,
  ``e = E(text_e)[0]`` (N', D), and ranked against all of them, exactly
  (:func:`fusion.models.kepler.candidate_scorer` with the direct distance kernel)::

      score(h, r, t) = -|| e_h + r - e_t ||_p

  through :func:`knowledge.evaluate.rank_metrics`: filtered and raw, both sides, realistic ranks.
* **KG-BERT** (Yao et al. 2019): one forward pass per candidate triple,
  ``score = C w + b`` on ``[CLS] h [SEP] r [SEP] t [SEP]`` (the logit of ``s``), so the candidates
  are capped: per query, ``candidate_cap`` entities drawn (seeded) from the entities with text, less
  the filter, are scored beside the target (:func:`fusion.models.kgbert.rank_candidates`). The raw
  setting draws from every entity with text (nothing filtered). A capped rank is not comparable with
  a full one: the cap stands beside every number.

The entity text is the one the model pretrained with (``recipe.json``'s ``entity_text``), never a
parameter. Entities without that text cannot be scored: they are no candidates, test triples with
such an end are skipped, both counted in ``metrics.json``.

Writes::

    metrics.json     knowledge.evaluate's layout: filtered / raw -> both / head / tail -> MRR, MR,
                     Hits@1/3/10, count (and candidate_cap); per_relation; hits_at_k; protocol
                     (model, candidates, cap); counts of entities and triples without text
    ranks.parquet    head, relation, tail, side, filtered_rank, raw_rank (KG indices)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline import Input, StageContext, StageFailed, stage

RECIPES = ("kepler", "kgbert")
HEADLINE = ("mrr", "mr", "hits@1", "hits@3", "hits@10")


class LinkPredictionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["test", "valid"] = Field(default="test", description="triples to rank")
    limit: int | None = Field(default=None, ge=1, description="only the first N triples of the split")
    candidate_cap: int = Field(default=100, ge=1, description="KG-BERT: entities scored per query "
                               "besides the target (one forward pass each); KEPLER ranks all, exactly")
    seed: int = Field(default=0, description="KG-BERT: which candidates the cap keeps")
    batch_size: int = Field(default=64, ge=1, description="texts per forward pass (KEPLER: also test "
                                                          "triples per ranking chunk)")
    device: str = Field(default="auto", description="'auto' (CUDA when available), 'cpu', 'cuda:0'")


@stage("fusion.link_prediction", version="1", cpus=1, headline=("model", "candidate_cap", *HEADLINE),
       inputs={"model": Input("fusion.pretrain", "a kepler or kgbert pretrained encoder"),
               "kg": Input("knowledge.ingest", "entity texts, the split to rank, the filter")})
def link_prediction(ctx: StageContext, params: LinkPredictionParams) -> dict:
    """Rank each split triple's head and tail with a KEPLER (all entities, exact) or KG-BERT
    (``candidate_cap`` sampled candidates) encoder: filtered and raw MRR, MR, Hits@1/3/10, overall,
    per side and per relation."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from fusion.pretrain.knowledge_recipes import entity_texts
    from fusion.pretrain.loop import load_pretrained
    from knowledge.evaluate import resolve_device
    from knowledge.kg import KnowledgeGraph, read_table

    for role in ("kg", "model"):
        if role not in ctx.inputs:
            raise StageFailed(f"fusion.link_prediction needs inputs 'kg' and 'model', got "
                              f"{sorted(ctx.inputs) or 'none'}")
    model_dir = Path(ctx.inputs["model"].path)
    if not (model_dir / "recipe.json").is_file():
        raise StageFailed(f"{model_dir}: no recipe.json; the 'model' input is no fusion.pretrain artifact")
    recipe_name = json.loads((model_dir / "recipe.json").read_text()).get("recipe")
    if recipe_name not in RECIPES:  # checked before loading: other recipes may need other inputs
        raise StageFailed(f"{model_dir}/recipe.json: recipe {recipe_name!r} cannot score link "
                          f"prediction; fusion.link_prediction takes {' or '.join(RECIPES)}")
    kg_uri = str(ctx.inputs["kg"].path)
    kg = KnowledgeGraph.load(kg_uri)
    _, options, backbone, model, meta = load_pretrained(model_dir)
    num_rel = (model.relations.num_embeddings if recipe_name == "kepler"
               else model.relation_head.out_features)
    if num_rel != kg.num_relations:
        raise StageFailed(f"{model_dir}: the model knows {num_rel} relations, the graph "
                          f"{kg_uri} has {kg.num_relations}: not the graph it pretrained on")
    device = resolve_device(params.device)
    model.to(device)

    test = kg.split_tensor(params.split)
    if params.limit is not None:
        test = test[:params.limit]
    if len(test) == 0:
        raise StageFailed(f"{kg_uri}: split {params.split!r} holds no triple")
    names, descs, has = entity_texts(kg_uri, options.entity_text)
    usable = torch.from_numpy(has[test[:, 0].numpy()] & has[test[:, 2].numpy()])
    counts = {"entities": kg.num_entities, "entities_with_text": int(has.sum()),
              "entities_without_text": int((~has).sum()), "triples": len(test),
              "triples_ranked": int(usable.sum()), "triples_without_text": int((~usable).sum())}
    if not usable.any():
        raise StageFailed(f"{kg_uri}: no {params.split} triple has {options.entity_text} text on both "
                          f"ends ({counts})")
    test = test[usable]
    ctx.log.info("ranking %d %s triples with %s (%s)", len(test), params.split, recipe_name, counts)
    args = (model, backbone.tokenizer, options, names, descs, has, test, kg.split_tensor(),
            kg.num_relations, params)
    if recipe_name == "kepler":
        res = rank_kepler(*args, progress=ctx.progress)
    else:
        rels = read_table(kg_uri, "relations", ["id", "name"]).to_pydict()
        res = rank_kgbert(*args, max_length=meta["max_length"],
                          relations=[n or i for i, n in zip(rels["id"], rels["name"])])
    res.update(counts, split=params.split, device=str(device), num_entities=kg.num_entities)
    res["protocol"].update(backbone=meta.get("backbone"), pretrain_max_length=meta.get("max_length"))

    ranks = res.pop("ranks")
    (ctx.out / "metrics.json").write_text(json.dumps(res, indent=1))
    pq.write_table(pa.table({
        "head": pa.array(ranks["head"], pa.int64()),
        "relation": pa.array(ranks["relation"], pa.int32()),
        "tail": pa.array(ranks["tail"], pa.int64()),
        "side": pa.array(ranks["side"].tolist(), pa.string()),   # the predicted position
        "filtered_rank": pa.array(ranks["filtered"], pa.float64()),
        "raw_rank": pa.array(ranks["raw"], pa.float64()),
    }), ctx.out / "ranks.parquet")
    return {"model": recipe_name, "candidate_cap": res["protocol"]["candidate_cap"],
            **{k: res["filtered"]["both"][k] for k in HEADLINE}}


def rank_kepler(model: Any, tokenizer: Any, options: Any, names: list[str], descs: list[str],
                has: np.ndarray, test: Any, known: Any, num_relations: int,
                params: LinkPredictionParams, progress: Any = None) -> dict[str, Any]:
    """:func:`knowledge.evaluate.rank_metrics` over the N' entities with text, encoded as the
    ``kepler`` recipe tokenised them (``entity_text``, ``description_length``). Ranking runs in the
    compact index 0..N'-1 (known triples with an end without text filter no candidate and are
    dropped); the ranks come back with KG indices."""
    import torch

    from fusion.models.kepler import candidate_scorer, encode_entities
    from fusion.pretrain.knowledge_recipes import tokenize_entity
    from knowledge.evaluate import rank_metrics

    described = np.flatnonzero(has)                                            # (N',) KG indices
    compact = torch.full((len(has),), -1, dtype=torch.long)
    compact[torch.from_numpy(described)] = torch.arange(len(described))
    tokens = [tokenize_entity(tokenizer, names[e], descs[e], options.entity_text,
                              options.description_length) for e in described.tolist()]
    ent = encode_entities(model, tokens, tokenizer.pad_token_id, params.batch_size)  # (N', D)
    known = known[torch.from_numpy(has[known[:, 0].numpy()] & has[known[:, 2].numpy()])]

    def to_compact(tr: torch.Tensor) -> torch.Tensor:
        return torch.stack([compact[tr[:, 0]], tr[:, 1], compact[tr[:, 2]]], 1)

    res = rank_metrics(candidate_scorer(model, ent, exact=True), to_compact(test), to_compact(known),
                       len(described), batch_size=params.batch_size, num_relations=num_relations,
                       progress=progress)
    for end in ("head", "tail"):
        res["ranks"][end] = described[res["ranks"][end]]
    res["protocol"].update(model="kepler", scoring="-||e_h + r - e_t||_p (exact distances), "
                           f"p = {model.config.p}", entity_text=options.entity_text,
                           candidates=f"all {len(described)} entities with {options.entity_text} text",
                           candidate_cap=None, num_candidates=len(described))
    return _cap_beside_numbers(res, None)


class _Cached:
    """A triple scorer that scores each distinct triple once: the filtered and the raw pass draw
    overlapping candidates (all of them whenever the cap exceeds the pool)."""

    def __init__(self, score: Any):
        self.score, self.seen = score, {}

    def __call__(self, triples: Any) -> Any:
        import torch

        rows = [tuple(t) for t in triples.tolist()]
        new = list(dict.fromkeys(t for t in rows if t not in self.seen))
        if new:
            self.seen.update(zip(new, self.score(torch.tensor(new)).tolist()))
        return torch.tensor([self.seen[t] for t in rows], dtype=torch.float64)


def rank_kgbert(model: Any, tokenizer: Any, options: Any, names: list[str], descs: list[str],
                has: np.ndarray, test: Any, known: Any, num_relations: int,
                params: LinkPredictionParams, max_length: int, relations: list[str]) -> dict[str, Any]:
    """:func:`fusion.models.kgbert.rank_candidates` twice (filtered against ``known``, raw against
    nothing) over the entities with text, capped at ``candidate_cap``, texts tokenised as the
    ``kgbert`` recipe does (``entity_text``, ``entity_length``; ``relations``: each relation's name,
    else its id), triples cut to the pretraining ``max_length``; assembled in
    :func:`knowledge.evaluate.rank_metrics`' layout."""
    import torch

    from fusion.models.kgbert import TripleScorer, rank_candidates
    from knowledge.evaluate import assemble_metrics

    texts = {"name": names, "description": descs,
             "name_description": [f"{n}, {d}" for n, d in zip(names, descs)]}[options.entity_text]
    ent_tokens = [tokenizer(texts[e], add_special_tokens=False)["input_ids"][:options.entity_length]
                  if has[e] else [] for e in range(len(has))]
    rel_tokens = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in relations]
    score = _Cached(TripleScorer(model, tokenizer, ent_tokens, rel_tokens, max_length, params.batch_size))
    described, cap = np.flatnonzero(has), params.candidate_cap
    common = dict(num_entities=len(has), cap=cap, seed=params.seed, candidates=described,
                  num_relations=num_relations)
    filt = rank_candidates(score, test, known, **common)
    raw = rank_candidates(score, test, torch.zeros(0, 3, dtype=torch.long), **common)
    ranks = {"filtered": torch.from_numpy(filt["ranks"]["rank"]),
             "raw": torch.from_numpy(raw["ranks"]["rank"])}
    # rank_candidates ranks every head prediction, then every tail one: assemble_metrics' order
    res = assemble_metrics(test, ranks, len(has), num_relations, len(torch.unique(known, dim=0)),
                           (1, 3, 10), 10)
    scored = np.concatenate([filt["ranks"]["candidates"], raw["ranks"]["candidates"]])
    res["protocol"].update(
        model="kgbert", scoring="logit of s on [CLS] h [SEP] r [SEP] t [SEP] (one forward pass per "
        "candidate)", entity_text=options.entity_text, candidate_cap=cap, num_candidates=len(described),
        candidates=f"per query, at most {cap} entities with {options.entity_text} text drawn (seed "
        f"{params.seed}) besides the target, after the filter (raw: without it)",
        candidates_scored_mean=float(scored.mean()) if len(scored) else 0.0,
        triples_scored=len(score.seen))
    return _cap_beside_numbers(res, cap)


def _cap_beside_numbers(res: dict[str, Any], cap: int | None) -> dict[str, Any]:
    """``candidate_cap`` in every block of numbers (None: all candidates), so a capped figure
    copied out of the file keeps its cap."""
    for setting in ("filtered", "raw"):
        for block in res[setting].values():
            block["candidate_cap"] = cap
    for row in res["per_relation"]:
        row["candidate_cap"] = cap
    res["hits_at_k"]["candidate_cap"] = cap
    return res
