"""The ``rerank`` recipe: a listwise re-ranker (:mod:`fusion.models.reranker`) for a dual encoder.

Inputs: ``media`` (the feature artifact both models train on), ``first_stage`` (a ``fusion.pretrain``
artifact of recipe ``dual`` on it: its streams start the re-ranker, its architecture is the
re-ranker's, its split the same or nested, below) and ``negatives`` (a ``fusion.retrieval`` run of
that dual encoder with ``split: train``, ``mode: dual`` and ``top`` >= ``group``: its
``ranks.parquet`` holds each training caption's best-ranked training items). A pipeline::

    dual:         {uses: fusion.pretrain, inputs: {media: feats}, with: {recipe: dual, ...}}
    dual_train:   {uses: fusion.retrieval, inputs: {model: dual, media: feats},
                   with: {mode: dual, split: train, top: 16}}
    reranker:     {uses: fusion.pretrain, inputs: {media: feats, first_stage: dual, negatives: dual_train},
                   with: {recipe: rerank, ...}}
    rerank_eval:  {uses: fusion.retrieval, inputs: {model: reranker, media: feats, first_stage: dual},
                   with: {mode: rerank, k: 16}}

**Cross-fitted negatives.** A dual encoder ranks the pairs it trained on far better than held-out
ones (it remembers them), so its training-split ranking makes groups unlike a held-out query's
candidates, and its frozen streams already separate them. The first stage may instead be a dual
encoder trained on a nested split (the same ``split_seed``, a larger ``held_out_share``: a subset of
the re-ranker's training items) and ``negatives`` its ranking with ``split: test``: the re-ranker
then trains on the training items its first stage never saw (its anchors, counted ``groups``; the
others are counted ``anchors_not_ranked``), among the candidates that first stage confuses. A first
stage that trained on an item the re-ranker holds out is refused.

One example is one *group*: a training item (the anchor), then the ``group - 1`` training items the
dual encoder ranks highest for the anchor's first caption (text -> media), interleaved by default
(``negatives_from: both``) with the items whose captions it ranks highest for the anchor item (media
-> text: the candidates the re-ranker meets in that direction), itself left out, with the regions
and captions of each; ``batch_size`` counts groups. A ranked item outside this recipe's training
items is never used (counted: ``negatives_not_train``), so no held-out item enters training through
the ranking, nor one without a caption (``negatives_without_text``), nor one sharing a caption
with the anchor (``negatives_same_caption``, compared stripped and case-folded: that caption cannot
tell them apart, e.g. one emoji in two art styles); an anchor with fewer usable
negatives than ``group - 1`` is skipped and counted (``anchors_short_of_negatives``). Each encoding
unit (a feature shard) reads its anchors' rankings, and the negatives' regions from whichever shards
hold them: a group's features are stored with it, ``group`` times the feature bytes of the corpus.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from typing import Any, ClassVar, Literal

import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator, model_validator

from pipeline import StageFailed

from fusion.compat import read_manifest
from fusion.models.backbone import TextBackbone
from fusion.pretrain.loop import recipe
from fusion.pretrain.media_recipes import (MediaOptions, MediaRecipe, _open, batch_rng, check_lxmert_config,
                                           feature_shards, featured_ids, listing, region_batch,
                                           shard_rows, train_items)
from fusion.retrieval.params import RetrievalParams

SPLIT_FIELDS = ("held_out_share", "split_seed", "split_source", "limit")


class RerankOptions(MediaOptions):
    group: int = Field(default=8, ge=2, description="items per training group: an anchor and the "
                                                    "group - 1 training items the first stage ranks "
                                                    "highest for it")
    negatives_from: Literal["text_to_media", "both"] = Field(
        default="both", description="text_to_media: the items ranked highest for the anchor's first "
                                    "caption; both: those interleaved with the items whose captions "
                                    "rank highest for the anchor item (media -> text)")
    x_layers: int = Field(default=2, ge=1, description="cross-modality layers (new)")
    listwise_weight: float = Field(default=1.0, ge=0)
    contrastive_weight: float = Field(default=1.0, ge=0, description="the streams' own InfoNCE")
    stream_lr_scale: float = Field(default=0.2, ge=0, description="lr of the loaded streams relative "
                                   "to the cross layers; 0: frozen (then contrastive_weight: 0)")

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_lxmert_config(v)   # lxmert's check, so a bad key fails before Ray starts

    @model_validator(mode="after")
    def _weights(self) -> "RerankOptions":
        self.reranker_config()   # the model's own rules, checked when the pipeline is read
        if self.group_by is not None:
            raise ValueError("group_by: the re-ranker's examples are already groups (an anchor and "
                             "its first-stage negatives)")
        return self

    def reranker_config(self) -> Any:
        from fusion.models.reranker import RerankerConfig

        return RerankerConfig(self.listwise_weight, self.contrastive_weight, self.stream_lr_scale)


def _key(value: Any) -> int:
    """A stable int64 key (equal values, equal keys) for the batch's positives."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@recipe("rerank")
class RerankRecipe(MediaRecipe):
    needs: ClassVar[tuple[str, ...]] = ("media", "first_stage", "negatives")
    Options = RerankOptions

    def resources(self, inputs: dict[str, str], options: RerankOptions) -> dict[str, Any]:
        with _open(inputs["first_stage"], "recipe.json") as f:
            first = json.load(f)
        if first.get("recipe") != "dual":
            raise StageFailed(f"fusion.pretrain rerank: first_stage {inputs['first_stage']} is recipe "
                              f"{first.get('recipe')!r}; the re-ranker starts from a 'dual' encoder")
        first_train, ours = self._nested_split(inputs["media"], first["options"], options)
        ranked = read_manifest(inputs["negatives"])
        params = ranked.get("params", {})
        top = params.get("top", RetrievalParams.model_fields["top"].default)  # a default is not recorded
        first_key = read_manifest(inputs["first_stage"]).get("key")
        # a first stage trained on fewer items may rank those it never saw ('test'): cross-fitted
        splits = ("train", "test") if first_train < ours else ("train",)
        checks = (("it is not a fusion.retrieval run", ranked.get("type") == "fusion.retrieval"),
                  (f"mode {params.get('mode')!r}, not 'dual'", params.get("mode") == "dual"),
                  (f"split {params.get('split')!r}, not {' or '.join(map(repr, splits))}",
                   params.get("split") in splits),
                  (f"top {top} < group {options.group}", top >= options.group),
                  ("it ranked another model than first_stage",
                   first_key is not None and ranked.get("inputs", {}).get("model") == first_key))
        problems = [p for p, ok in checks if not ok]
        if problems:
            raise StageFailed(f"fusion.pretrain rerank: negatives {inputs['negatives']}: "
                              f"{'; '.join(problems)} (run fusion.retrieval on the first stage with "
                              f"mode: dual, split: {' or '.join(splits)}, top >= group)")
        theirs = first["options"]
        return {**super().resources(inputs, options), "first_stage_uri": inputs["first_stage"],
                "r_layers": int(theirs["r_layers"]),
                "first_stage_config": json.dumps(theirs.get("config", {}), sort_keys=True),
                "first_stage_train_items": len(first_train)}

    @staticmethod
    def _nested_split(media: str, theirs: dict[str, Any], options: RerankOptions
                      ) -> tuple[set[str], set[str]]:
        """The first stage's and the re-ranker's training items. The first stage must not have
        trained on an item the re-ranker holds out (its scores of held-out pairs would carry what it
        learnt from them); it may have trained on fewer (a nested split, e.g. a larger
        ``held_out_share`` with the same ``split_seed``): the re-ranker then learns from groups of
        items its first stage never saw, as a held-out query's candidates are."""
        fields = {f: theirs[f] for f in SPLIT_FIELDS if f in theirs}
        items, featured = listing(media), set(featured_ids(media))
        first = set(train_items(media, MediaOptions(**fields), items, featured)[0])
        ours = set(train_items(media, options, items, featured)[0])
        if not first <= ours:
            mine = {f: getattr(options, f) for f in fields}
            raise StageFailed(f"fusion.pretrain rerank: the first stage was trained on another split "
                              f"({fields}; the re-ranker's {mine}): {len(first - ours)} of its training "
                              f"items are held out by the re-ranker; give the re-ranker the same split "
                              f"options, or the first stage a split nested in the re-ranker's (the "
                              f"same split_seed, a larger held_out_share)")
        return first, ours

    # -- encoding actors --

    def encoder(self, inputs: dict[str, str], options: RerankOptions, tokenizer: Any,
                max_length: int) -> dict[str, Any]:
        state = super().encoder(inputs, options, tokenizer, max_length)
        shard_of: dict[str, str] = {}   # which shard holds each training item's regions
        for shard in feature_shards(inputs["media"]):
            with _open(inputs["media"], shard) as f:
                for i in pq.read_table(f, columns=["id"])["id"].to_pylist():
                    if i in state["chosen"]:
                        shard_of[i] = shard
        return {**state, "shard_of": shard_of}

    def encode(self, state: dict, inputs: dict[str, str], unit: dict) -> tuple[list[dict], Counter]:
        options, counts = state["options"], Counter()
        items = list(shard_rows(inputs["media"], unit["shard"], state["chosen"], options.max_regions))
        anchors = [r for r in items if state["texts_of"].get(r["media"])]
        counts["train_items"] += len(items)
        counts["train_items_without_text"] += len(items) - len(anchors)
        ranked = self._rankings(inputs["negatives"], [r["media"] for r in anchors], options.negatives_from)
        groups = {}
        for r in anchors:
            if r["media"] not in ranked:   # cross-fitted: the first stage trained on this anchor
                counts["anchors_not_ranked"] += 1
                continue
            negs, own = [], {t.strip().casefold() for t in state["texts_of"][r["media"]]}
            for m in ranked[r["media"]]:
                if m == r["media"]:
                    continue
                if m not in state["chosen"]:
                    counts["negatives_not_train"] += 1
                    continue
                if not state["texts_of"].get(m):   # a member reads one of its captions
                    counts["negatives_without_text"] += 1
                    continue
                if own & {t.strip().casefold() for t in state["texts_of"][m]}:   # not a negative
                    counts["negatives_same_caption"] += 1
                    continue
                negs.append(m)
            if len(negs) < options.group - 1:
                counts["anchors_short_of_negatives"] += 1
                continue
            groups[r["media"]] = negs[:options.group - 1]
        regions = {r["media"]: r for r in anchors}
        wanted = {m for negs in groups.values() for m in negs} - set(regions)
        by_shard: dict[str, set[str]] = defaultdict(set)
        for m in wanted:
            by_shard[state["shard_of"][m]].add(m)
        for shard, ids in sorted(by_shard.items()):
            regions.update({r["media"]: r for r in shard_rows(inputs["media"], shard, ids,
                                                              options.max_regions)})
        rows = []
        for anchor, negs in groups.items():
            members = [regions[m] for m in (anchor, *negs)]
            caps = [state["tokenizer"](state["texts_of"][m["media"]], truncation=True,
                                       max_length=state["max_length"]) for m in members]
            rows.append({"media": [m["media"] for m in members],
                         "n_regions": [m["n_regions"] for m in members],
                         "features": [m["features"] for m in members],
                         "boxes": [m["boxes"] for m in members],
                         "captions": [c["input_ids"] for c in caps]})
        counts["groups"] += len(rows)
        return rows, counts

    @staticmethod
    def _rankings(uri: str, items: list[str], directions: str) -> dict[str, list[str]]:
        """Item id -> the items the first stage ranked best for it, in rank order: for its first
        caption (``<item>#0``, text -> media), interleaved with ``both`` with the items of the
        captions ranked best for the item itself (media -> text; a caption id is ``<item>#<k>``),
        each item once; an item the run did not rank (nor its caption) is left out."""
        if not items:
            return {}
        queries = [f"{i}#0" for i in items] + (items if directions == "both" else [])
        with _open(uri, "ranks.parquet") as f:
            table = pq.read_table(f, columns=["direction", "query_id", "top_ids"],
                                  filters=[("query_id", "in", queries)])
        t2m, m2t = {}, {}
        for d, q, top in zip(*(table[c].to_pylist() for c in ("direction", "query_id", "top_ids"))):
            if d == "text_to_media":
                t2m[q.rsplit("#", 1)[0]] = top
            elif directions == "both":
                m2t[q] = [c.rsplit("#", 1)[0] for c in top]
        out = {}
        for i in items:
            if i not in t2m and i not in m2t:
                continue
            a, b = t2m.get(i, []), m2t.get(i, [])
            merged = [x for pair in zip(a, b) for x in pair] + a[len(b):] + b[len(a):]
            out[i] = list(dict.fromkeys(merged))
        return out

    # -- training workers --

    def length(self, row: dict) -> int:
        return int(sum(row["n_regions"]))

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: RerankOptions) -> Any:
        from fusion.models.hf_weights import lxmert_backbone
        from fusion.models.reranker import ListwiseReranker

        encoder = lxmert_backbone(backbone, r_layers=resources["r_layers"], x_layers=options.x_layers,
                                  **({"text_pool": "mean"} | json.loads(resources["first_stage_config"])
                                     | options.config | {"visual_feat_dim": resources["feature_dim"],
                                                         "global_token": resources["global_token"]}))
        return ListwiseReranker(encoder, options.reranker_config())

    def initialize(self, model: Any, resources: dict[str, Any]) -> None:
        from safetensors.torch import load as load_safetensors

        uri = resources["first_stage_uri"]
        with _open(uri, "model.safetensors") as f:
            model.load_first_stage(load_safetensors(f.read()), f"{uri}/model.safetensors")

    def collate(self, backbone: TextBackbone, rows: list[dict], resources: dict[str, Any],
                options: RerankOptions, max_length: int) -> dict[str, Any]:
        from fusion.pretrain.recipes import pad

        rng = batch_rng([m for r in rows for m in r["media"]])
        members, texts = [], []
        for r in rows:
            for k, m in enumerate(r["media"]):
                caps = r["captions"][k]
                texts.append(list(caps[int(rng.integers(len(caps)))]))
                members.append({"n_regions": r["n_regions"][k], "features": r["features"][k],
                                "boxes": r["boxes"][k], "media": m})
        text = pad([{"input_ids": t} for t in texts], {"input_ids": backbone.tokenizer.pad_token_id})
        return {**text, "n_tokens": int(text["attention_mask"].sum()),
                **region_batch(members, resources["feature_dim"]), "group": options.group,
                "media_key": torch.tensor([_key(m["media"]) for m in members]),
                "text_key": torch.tensor([_key(tuple(t)) for t in texts])}
