"""Multimodal pretraining recipes: LXMERT, ViLBERT and a contrastive-only dual encoder on text-media
pairs from one feature artifact (``media`` input: ``vision.features`` or ``speech.features``).

Images and their captions, or spoken clips and their transcripts, go through the same code: the
media stream reads regions with boxes, and audio frames are regions whose boxes are time spans
(:mod:`speech.features`). Each recipe trains on the ``train`` split of :mod:`fusion.pairs`: the
dataset's own where the items carry one (Karpathy's, a captions file's ``split`` column), else a
hash of the item id (``held_out_share`` / ``split_seed``); ``fusion.retrieval`` evaluates the
held-out items of the same split.

- ``lxmert``: :func:`fusion.models.hf_weights.lxmert_backbone`: the backbone's layers as the language encoder,
  ``r_layers`` object-relationship and ``x_layers`` cross-modality layers; MLM, masked-region
  feature regression, image-text matching and InfoNCE.
- ``vilbert``: :class:`fusion.models.vilbert.ViLBert` with the MiniLM placement (connections before the
  upper half of the text layers); MLM, masked-region regression, alignment.
- ``dual``: the baseline. LXMERT's two single-modality encoders with no cross layers, trained with
  InfoNCE only: a CLIP-style dual encoder on exactly the same features and text backbone, whose
  dot product is its retrieval score.
- ``media_lxmert`` / ``media_dual``: media queries instead of text (spoken captions <-> images):
  LXMERT's cross encoder over two media streams (:mod:`fusion.models.bimedia`) and its dual encoder;
  inputs ``query_media`` (the spoken captions' features) and ``media`` (the images').

``options.config`` overrides the model's config fields (``LxmertConfig`` / ``ViLBertConfig``),
checked when the pipeline is loaded. One example is one media item; each batch gives each item
one of its captions, drawn by a generator seeded from the batch's contents (a resumed run draws
the same). One item per batch at most keeps an item's other captions from posing as negatives for
matching and InfoNCE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import StageFailed

from fusion.models.backbone import TextBackbone
from fusion.pretrain.groups import check_group_field, group_of
from fusion.pretrain.loop import Recipe, recipe
from fusion.splits import MediaSplit


class MediaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    held_out_share: float = Field(default=0.2, ge=0, lt=1,
                                  description="share of media items held out for evaluation (hash "
                                              "split)")
    split_seed: int = 0
    split_source: Literal["dataset", "hash"] = Field(
        default="dataset", description="dataset: the items' own split where they carry one (only "
                                       "its train items train), else the hash split; hash: always "
                                       "the hash split")
    max_regions: int | None = Field(default=None, ge=1,
                                    description="keep each item's first N regions (global token first)")
    limit: int | None = Field(default=None, ge=1, description="only the first N training items")
    group_by: str | None = Field(
        default=None, description="a meta field of the items: batches hold whole groups of items "
                                  "with equal values (e.g. a video set's clips of one emoji, which "
                                  "differ only by motion), so contrastive losses meet each item "
                                  "beside its closest negatives; replaces length bucketing")
    config: dict[str, Any] = Field(default={}, description="model config overrides")


def _check_fields(config: dict[str, Any], cls: type, fixed: set[str]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names - fixed)}")
    taken = sorted(set(config) & fixed)
    if taken:
        raise ValueError(f"{taken} are set by the recipe (from the backbone or the features)")
    return config


# -------------------------------------------------------------------- reading feature artifacts
def _open(uri: str, name: str) -> Any:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    return fs.open(f"{root.rstrip('/')}/{name}", "rb")


def feature_shards(uri: str) -> list[str]:
    """The feature shards of a feature artifact (names relative to it), in name order."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    return sorted(f"features/{p.rsplit('/', 1)[-1]}"
                  for p in fs.glob(f"{root.rstrip('/')}/features/part-*.parquet"))


def shard_rows(uri: str, shard: str, keep: Any, max_regions: int | None) -> Iterator[dict]:
    """``{"media", "n_regions", "features", "boxes"}`` of a shard's items in ``keep``, in the
    shard's order, each item's regions as the artifact's raw blobs (float16 / float32 rows), cut
    to ``max_regions``. Only the ids are read whole: the blobs come from the row groups that hold
    a kept item, so picking a few items (a re-ranker's negatives) does not read the shard."""
    from pipeline.features import tensor_spec

    with _open(uri, shard) as f:
        pf = pq.ParquetFile(f)
        ids = pf.read(columns=["id"])["id"].to_pylist()
        hits = [k for k, i in enumerate(ids) if i in keep]
        if not hits:
            return
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = np.cumsum([0, *sizes[:-1]])
        group_of = (np.searchsorted(starts, hits, side="right") - 1).tolist()
        groups = sorted(set(group_of))
        table = pf.read_row_groups(groups, columns=["id", "n_regions", "features", "boxes"])
    # a hit's row in ``table``: its row within its group, after the groups read before it
    before = dict(zip(groups, np.cumsum([0, *(sizes[g] for g in groups[:-1])]).tolist()))
    rows = [before[g] + k - int(starts[g]) for k, g in zip(hits, group_of)]
    table = table.take(pa.array(rows, pa.int64()))
    f_dtype, dim = tensor_spec(table.schema.field("features"), f"{uri}/{shard}: ")
    for i, n, feats, boxes in zip(*(table[c].to_pylist() for c in ("id", "n_regions", "features",
                                                                    "boxes"))):
        n = n if max_regions is None else min(n, max_regions)
        yield {"media": i, "n_regions": n, "features": feats[:n * dim * f_dtype.itemsize],
               "boxes": boxes[:n * 16]}


def listing(uri: str) -> pa.Table:
    with _open(uri, "items.parquet") as f:
        return pq.read_table(f, columns=["id", "texts", "meta"])


def featured_ids(uri: str) -> list[str]:
    """The ids of the items with features, without decoding any."""
    out: list[str] = []
    for shard in feature_shards(uri):
        with _open(uri, shard) as f:
            out += pq.read_table(f, columns=["id"])["id"].to_pylist()
    return out


def media_split(uri: str, options: MediaOptions, items: pa.Table | None = None) -> MediaSplit:
    """The :class:`fusion.splits.MediaSplit` of a feature artifact's items under the recipe's
    options: the dataset's own split where the items carry one (``split_source: dataset``), else
    the hash split (``held_out_share``, ``split_seed``)."""
    items = listing(uri) if items is None else items
    return MediaSplit.of_listing(items["id"].to_pylist(), items["meta"].to_pylist(),
                                 options.held_out_share, options.split_seed, options.split_source)


def train_items(uri: str, options: MediaOptions, items: pa.Table | None = None,
                featured: set[str] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """The training items in the listing's order (featured, in the ``train`` split of
    :func:`media_split`, the first ``limit``) and every listed item's texts. Under the dataset's own
    split only its ``train`` items train (Karpathy's ``restval`` too unless the dataset kept it
    apart with ``restval: keep``): a ``val`` or ``test`` item never does. ``items`` (the
    :func:`listing`) and ``featured`` (:func:`featured_ids`) are read here unless given, so a
    caller comparing two splits reads them once."""
    items = listing(uri) if items is None else items
    texts_of = dict(zip(items["id"].to_pylist(), items["texts"].to_pylist()))
    splits = media_split(uri, options, items)
    featured = set(featured_ids(uri)) if featured is None else featured
    chosen = [i for i in texts_of if i in featured and splits.contains(i, "train")]
    return chosen[:options.limit] if options.limit is not None else chosen, texts_of


def region_batch(rows: list[dict], dim: int) -> dict[str, torch.Tensor]:
    """Rows' regions padded to the largest count: ``features`` (B, R, dim) float16, ``boxes``
    (B, R, 4) float32, ``region_mask`` (B, R) bool."""
    B, R = len(rows), max((r["n_regions"] for r in rows), default=0)
    features = torch.zeros(B, R, dim, dtype=torch.float16)
    boxes = torch.zeros(B, R, 4, dtype=torch.float32)
    mask = torch.zeros(B, R, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = r["n_regions"]
        features[b, :n] = torch.from_numpy(np.frombuffer(r["features"], "<f2").reshape(n, dim).copy())
        boxes[b, :n] = torch.from_numpy(np.frombuffer(r["boxes"], "<f4").reshape(n, 4).copy())
        mask[b, :n] = True
    return {"features": features, "boxes": boxes, "region_mask": mask}


def batch_rng(ids: list[str]) -> np.random.Generator:
    """A generator seeded by a batch's item ids: a resumed run draws the same captions."""
    return np.random.default_rng([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(),
                                                 "little") for i in ids])


def _dim(uri: str) -> int:
    from pipeline.features import tensor_spec

    shards = feature_shards(uri)
    if not shards:
        raise StageFailed(f"fusion.pretrain: {uri} has no feature shards")
    with _open(uri, shards[0]) as f:
        return tensor_spec(pq.read_schema(f).field("features"))[1]


def _counts(uri: str) -> dict[str, int]:
    """Listed and featured items, from the Parquet footers alone."""
    with _open(uri, "items.parquet") as f:
        listed = pq.ParquetFile(f).metadata.num_rows
    featured = 0
    for shard in feature_shards(uri):
        with _open(uri, shard) as f:
            featured += pq.ParquetFile(f).metadata.num_rows
    return {"items_listed": listed, "items_with_features": featured,
            "items_without_features": listed - featured}


class MediaRecipe(Recipe):
    """Shared data side: one unit per feature shard of the ``media`` input; a corpus row is one
    training item with its regions (the artifact's blobs) and its captions, tokenised; each batch
    gives each item one caption and pads the regions."""

    needs: ClassVar[tuple[str, ...]] = ("media",)
    Options: ClassVar[type[BaseModel]] = MediaOptions

    def resources(self, inputs: dict[str, str], options: MediaOptions) -> dict[str, Any]:
        splits = media_split(inputs["media"], options)
        if splits.source == "dataset" and "train" not in splits.names():
            have = ", ".join(f"{k or '(none)'} ({v} items)" for k, v in splits.names().items())
            raise StageFailed(f"fusion.pretrain: the items of {inputs['media']} carry their "
                              f"dataset's own split and none is in 'train' ({have}); a val or test "
                              f"item never trains: give training items, or set options.split_source: "
                              f"hash to split these by hash instead")
        if options.group_by:
            with _open(inputs["media"], "items.parquet") as f:
                check_group_field(pq.ParquetFile(f), options.group_by, inputs["media"])
        return {"feature_dim": _dim(inputs["media"]), "global_token": _global_token(inputs["media"]),
                "split_source": splits.label, **_counts(inputs["media"])}

    def finish(self, resources: dict[str, Any], counts: dict[str, int]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        # which split chose the training items, beside their counts in the manifest
        return resources, {**counts, "split_source": resources["split_source"]}

    def units(self, inputs: dict[str, str], options: MediaOptions, limit: int | None) -> list[dict]:
        return [{"unit": k, "shard": s} for k, s in enumerate(feature_shards(inputs["media"]))]

    def encoder(self, inputs: dict[str, str], options: MediaOptions, tokenizer: Any,
                max_length: int) -> dict[str, Any]:
        chosen, texts_of = train_items(inputs["media"], options)
        groups = None
        if options.group_by:
            with _open(inputs["media"], "items.parquet") as f:
                groups = group_of(pq.ParquetFile(f), options.group_by)
        return {"tokenizer": tokenizer, "max_length": max_length, "options": options,
                "chosen": set(chosen), "texts_of": texts_of, "group_of": groups}

    def group_fields(self, state: dict, media: str, counts: Counter) -> dict[str, str]:
        """``{"group": ...}`` of a training item under ``group_by`` (nothing without it): its meta
        value, or, where the item lacks the field, a group of its own (counted)."""
        if state["group_of"] is None:
            return {}
        value = state["group_of"].get(media)
        if value is None:
            counts["items_without_group_by_field"] += 1
            return {"group": f"item {media}"}
        return {"group": value}

    def group(self, options: MediaOptions) -> Any:
        return operator.itemgetter("group") if options.group_by else None

    def encode(self, state: dict, inputs: dict[str, str], unit: dict) -> tuple[list[dict], Counter]:
        rows, counts = [], Counter()
        for row in shard_rows(inputs["media"], unit["shard"], state["chosen"],
                              state["options"].max_regions):
            texts = state["texts_of"].get(row["media"]) or []
            counts["train_items"] += 1
            counts["train_texts"] += len(texts)
            if not texts:
                counts["train_items_without_text"] += 1
                continue
            enc = state["tokenizer"](texts, truncation=True, max_length=state["max_length"],
                                     return_special_tokens_mask=True)
            rows.append(self.encoded_row(state, row, enc, counts))
        counts["train_media_with_text"] += len(rows)
        return rows, counts

    def encoded_row(self, state: dict, row: dict, enc: Any, counts: Counter) -> dict:
        """The corpus row of one item: its regions and its tokenised captions (a recipe that reads
        more of each caption adds columns here)."""
        return {**row, "captions": enc["input_ids"], "caption_special": enc["special_tokens_mask"],
                **self.group_fields(state, row["media"], counts)}

    def length(self, row: dict) -> int:
        return int(row["n_regions"])

    def collate(self, backbone: TextBackbone, rows: list[dict], resources: dict[str, Any],
                options: Any, max_length: int) -> dict[str, Any]:
        from fusion.pretrain.recipes import pad

        rng = batch_rng([r["media"] for r in rows])
        picks = [int(rng.integers(len(r["captions"]))) for r in rows]
        text = pad([{"input_ids": r["captions"][k], "special_tokens_mask": r["caption_special"][k]}
                    for r, k in zip(rows, picks)],
                   {"input_ids": backbone.tokenizer.pad_token_id, "special_tokens_mask": 1})
        return {**text, "n_tokens": int(text["attention_mask"].sum()),
                **region_batch(rows, resources["feature_dim"])}


class LxmertOptions(MediaOptions):
    r_layers: int = Field(default=5, ge=0, description="object-relationship layers")
    x_layers: int = Field(default=5, ge=0, description="cross-modality layers")

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_lxmert_config(v)


def check_lxmert_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` overrides of an LXMERT-based recipe: LxmertConfig fields other than those the
    recipe sets itself (sizes from the backbone, layers from the options, the features')."""
    from fusion.models.lxmert import LxmertConfig

    return _check_fields(config, LxmertConfig, {"vocab_size", "hidden_size", "num_heads",
                                                "intermediate_size", "l_layers", "r_layers",
                                                "x_layers", "visual_feat_dim", "global_token"})


@recipe("lxmert")
class LxmertRecipe(MediaRecipe):
    Options = LxmertOptions

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: LxmertOptions) -> Any:
        from fusion.models.hf_weights import lxmert_backbone

        return lxmert_backbone(backbone, r_layers=options.r_layers, x_layers=options.x_layers,
                               **({"text_pool": "mean"} | options.config
                                  | {"visual_feat_dim": resources["feature_dim"],
                                     "global_token": resources["global_token"]}))


class DualOptions(LxmertOptions):
    x_layers: int = Field(default=0, ge=0, le=0, description="none: a dual encoder")


@recipe("dual")
class DualRecipe(LxmertRecipe):
    """LXMERT's text and media encoders without cross layers, InfoNCE only."""

    Options = DualOptions

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: DualOptions) -> Any:
        only_contrastive = {"mlm_weight": 0.0, "region_feat_weight": 0.0, "region_label_weight": 0.0,
                            "itm_weight": 0.0, "contrastive_weight": 1.0}
        return super().build(backbone, resources,
                             options.model_copy(update={"config": options.config | only_contrastive}))


class ViLBertOptions(MediaOptions):
    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fusion.models.vilbert import ViLBertConfig

        return _check_fields(v, ViLBertConfig, {"feature_dim", "add_img_token", "hidden_size",
                                                "intermediate_size", "num_layers", "vocab_size"})


@recipe("vilbert")
class ViLBertRecipe(MediaRecipe):
    Options = ViLBertOptions

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: ViLBertOptions) -> Any:
        from fusion.models.vilbert import MINILM_CONFIG, ViLBert

        # MiniLM's pattern (connections before the upper half of the text layers, one visual layer
        # after each); a given global token is the IMG token, else the model adds one.
        placement = {"t_biattention_id": None, "v_biattention_id": None, "visual_layers": None}
        config = dataclasses.replace(MINILM_CONFIG, **(placement | options.config | {
            "feature_dim": resources["feature_dim"], "add_img_token": not resources["global_token"]}))
        return ViLBert(backbone, config)


# ------------------------------------------------------------------ media queries (speech <-> image)
class BiMediaOptions(MediaOptions):
    key: str = Field(default="base_id", description="query items' meta field naming their media item")

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fusion.models.bimedia import BiMediaConfig

        return _check_fields(v, BiMediaConfig, {"query_feat_dim", "media_feat_dim",
                                                "query_global_token", "media_global_token"})


@recipe("media_lxmert")
class BiMediaRecipe(MediaRecipe):
    """LXMERT's cross encoder over two media streams (:mod:`fusion.models.bimedia`): ``query_media`` items
    (spoken captions) paired with the ``media`` item their ``meta[key]`` names (the image). The text
    backbone is not used (the stage still records it)."""

    needs = ("media", "query_media")
    Options = BiMediaOptions

    def resources(self, inputs: dict[str, str], options: BiMediaOptions) -> dict[str, Any]:
        """Besides the media side's, the queries' counts: each query item is a training query
        (its ``meta[key]`` names a featured training item), or counted under why it is not."""
        out = super().resources(inputs, options)
        out |= {"query_feature_dim": _dim(inputs["query_media"]),
                "query_global_token": _global_token(inputs["query_media"])}
        items = listing(inputs["query_media"])
        featured, media = set(featured_ids(inputs["query_media"])), set(featured_ids(inputs["media"]))
        splits = media_split(inputs["media"], options)  # the media item's split decides
        counts = Counter()
        for qid, meta in zip(items["id"].to_pylist(), items["meta"].to_pylist()):
            target = json.loads(meta or "{}").get(options.key)
            counts["queries" if qid in featured and target in media and
                   splits.contains(target, "train")
                   else "queries_without_features" if qid not in featured
                   else f"queries_without_{options.key}" if target is None
                   else "queries_for_unknown_media" if target not in media
                   else "queries_of_other_split"] += 1
        return out | {"query_items_listed": items.num_rows, **counts}

    def encoder(self, inputs: dict[str, str], options: BiMediaOptions, tokenizer: Any,
                max_length: int) -> dict[str, Any]:
        """The media side's, plus every training query's regions by target item (read once per
        actor, in the query listing's order)."""
        state = super().encoder(inputs, options, tokenizer, max_length)
        items = listing(inputs["query_media"])
        target = {q: json.loads(m or "{}").get(options.key)
                  for q, m in zip(items["id"].to_pylist(), items["meta"].to_pylist())}
        wanted = {q for q, t in target.items() if t in state["chosen"]}
        regions = {r["media"]: r for s in feature_shards(inputs["query_media"])
                   for r in shard_rows(inputs["query_media"], s, wanted, options.max_regions)}
        by_target: dict[str, list[dict]] = {}
        for q in target:  # listing order
            if q in regions:
                r = regions[q]
                by_target.setdefault(target[q], []).append(
                    {"n_regions": r["n_regions"], "features": r["features"], "boxes": r["boxes"]})
        return state | {"queries": by_target}

    def encode(self, state: dict, inputs: dict[str, str], unit: dict) -> tuple[list[dict], Counter]:
        rows, counts = [], Counter()
        for row in shard_rows(inputs["media"], unit["shard"], state["chosen"],
                              state["options"].max_regions):
            counts["train_items"] += 1
            queries = state["queries"].get(row["media"])
            if not queries:
                counts["media_without_query"] += 1
                continue
            rows.append({**row, "queries": queries, **self.group_fields(state, row["media"], counts)})
        counts["train_media_with_query"] += len(rows)
        return rows, counts

    def build(self, backbone: Any, resources: dict[str, Any], options: BiMediaOptions) -> Any:
        from fusion.models.bimedia import BiMedia, BiMediaConfig

        return BiMedia(BiMediaConfig(**(options.config | {
            "query_feat_dim": resources["query_feature_dim"], "media_feat_dim": resources["feature_dim"],
            "query_global_token": resources["query_global_token"],
            "media_global_token": resources["global_token"]})))

    def collate(self, backbone: Any, rows: list[dict], resources: dict[str, Any], options: Any,
                max_length: int) -> dict[str, Any]:
        rng = batch_rng([r["media"] for r in rows])
        q = region_batch([r["queries"][int(rng.integers(len(r["queries"])))] for r in rows],
                         resources["query_feature_dim"])
        return {"query_features": q["features"], "query_boxes": q["boxes"],
                "query_mask": q["region_mask"], "n_tokens": int(q["region_mask"].sum()),
                **region_batch(rows, resources["feature_dim"])}


class BiMediaDualOptions(BiMediaOptions):
    @field_validator("config")
    @classmethod
    def _no_cross(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("x_layers"):
            raise ValueError("media_dual has no cross layers (x_layers must be 0)")
        return v


@recipe("media_dual")
class BiMediaDualRecipe(BiMediaRecipe):
    """The contrastive-only dual encoder of :class:`BiMediaRecipe`'s streams."""

    Options = BiMediaDualOptions

    def build(self, backbone: Any, resources: dict[str, Any], options: BiMediaOptions) -> Any:
        from fusion.models.bimedia import BiMedia, dual_config

        return BiMedia(dual_config(super().build(backbone, resources, options).config))


def _global_token(uri: str) -> bool:
    with _open(uri, "manifest.json") as f:
        manifest = json.load(f)
    return bool(manifest.get("params", {}).get("global_token", False))
