"""Multimodal pretraining recipes: LXMERT, ViLBERT and a contrastive-only dual encoder on text-media
pairs from one feature artifact (``media`` input: ``vision.features`` or ``speech.features``).

Images and their captions, or spoken clips and their transcripts, go through the same code: the
media stream reads regions with boxes, and audio frames are regions whose boxes are time spans
(:mod:`speech.features`). Each recipe trains on the ``train`` split of :mod:`fusion.pairs` (a
hash of the item id, ``held_out_share`` / ``split_seed``); ``fusion.retrieval`` evaluates the held-out
items of the same split.

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
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import StageFailed

from fusion.models.backbone import TextBackbone
from fusion.pretrain.loop import Recipe, recipe


class MediaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    held_out_share: float = Field(default=0.2, ge=0, lt=1,
                                  description="share of media items held out for evaluation")
    split_seed: int = 0
    max_regions: int | None = Field(default=None, ge=1,
                                    description="keep each item's first N regions (global token first)")
    limit: int | None = Field(default=None, ge=1, description="only the first N training items")
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


class MediaRecipe(Recipe):
    """Shared data side: pairs from the ``media`` artifact, shipped to workers through the object
    store once (flat numpy arrays: zero-copy on a node), padded per batch."""

    needs: ClassVar[tuple[str, ...]] = ("media",)
    Options: ClassVar[type[BaseModel]] = MediaOptions

    def prepare(self, inputs: dict[str, Path], options: MediaOptions, docs: list, backbone: Any,
                max_length: int) -> tuple[list, dict[str, Any], dict[str, Any]]:
        import ray

        from fusion.pairs import load_pairs

        bank, caps, counts = load_pairs(inputs["media"], "train", options.held_out_share,
                                        options.split_seed, options.max_regions, options.limit)
        by_media: dict[int, list[str]] = {}
        for t, m in zip(caps.texts, caps.media):
            by_media.setdefault(m, []).append(t)
        examples = [{"media": m, "texts": ts} for m, ts in sorted(by_media.items())]
        if not examples:
            raise StageFailed(f"fusion.pretrain: no training pair in {inputs['media']}: {counts}")
        resources = {"feature_dim": bank.dim, "global_token": _global_token(inputs["media"]),
                     "bank": ray.put(bank)}
        return examples, resources, {**counts, "train_media_with_text": len(examples)}

    def shared(self, resources: dict[str, Any]) -> Any:
        """What ``prepare`` put in the object store, fetched once per worker (the recipe object
        lives for the whole loop)."""
        if getattr(self, "_shared", None) is None:
            import ray

            self._shared = ray.get(resources["bank"])
        return self._shared

    def collate(self, backbone: TextBackbone, examples: list[dict], resources: dict[str, Any],
                options: Any, max_length: int) -> dict[str, Any]:
        bank = self.shared(resources)
        media = [e["media"] for e in examples]
        rng = np.random.default_rng(media)
        texts = [e["texts"][rng.integers(len(e["texts"]))] for e in examples]
        enc = backbone.tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                                 return_tensors="pt", return_special_tokens_mask=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "special_tokens_mask": enc["special_tokens_mask"],
                "n_tokens": int(enc["attention_mask"].sum()), **bank.batch(media)}


class LxmertOptions(MediaOptions):
    r_layers: int = Field(default=5, ge=0, description="object-relationship layers")
    x_layers: int = Field(default=5, ge=0, description="cross-modality layers")

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fusion.models.lxmert import LxmertConfig

        return _check_fields(v, LxmertConfig, {"vocab_size", "hidden_size", "num_heads",
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

    def prepare(self, inputs: dict[str, Path], options: BiMediaOptions, docs: list, backbone: Any,
                max_length: int) -> tuple[list, dict[str, Any], dict[str, Any]]:
        import ray

        from fusion.pairs import load_media_pairs

        bank, queries, counts = load_media_pairs(inputs["query_media"], inputs["media"], "train",
                                                 options.held_out_share, options.split_seed,
                                                 options.key, options.max_regions, options.limit)
        by_media: dict[int, list[int]] = {}
        for q, m in enumerate(queries.media):
            by_media.setdefault(m, []).append(q)
        examples = [{"media": m, "queries": qs} for m, qs in sorted(by_media.items())]
        if not examples:
            raise StageFailed(f"fusion.pretrain: no (query, media) pair: {counts}")
        resources = {"feature_dim": bank.dim, "query_feature_dim": queries.bank.dim,
                     "global_token": _global_token(inputs["media"]),
                     "query_global_token": _global_token(inputs["query_media"]),
                     "bank": ray.put((bank, queries.bank))}
        return examples, resources, {**counts, "train_media_with_query": len(examples)}

    def build(self, backbone: Any, resources: dict[str, Any], options: BiMediaOptions) -> Any:
        from fusion.models.bimedia import BiMedia, BiMediaConfig

        return BiMedia(BiMediaConfig(**(options.config | {
            "query_feat_dim": resources["query_feature_dim"], "media_feat_dim": resources["feature_dim"],
            "query_global_token": resources["query_global_token"],
            "media_global_token": resources["global_token"]})))

    def collate(self, backbone: Any, examples: list[dict], resources: dict[str, Any], options: Any,
                max_length: int) -> dict[str, Any]:
        bank, qbank = self.shared(resources)
        media = [e["media"] for e in examples]
        rng = np.random.default_rng(media)
        q = qbank.batch([e["queries"][rng.integers(len(e["queries"]))] for e in examples])
        return {"query_features": q["features"], "query_boxes": q["boxes"], "query_mask": q["region_mask"],
                "n_tokens": int(q["region_mask"].sum()), **bank.batch(media)}


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


def _global_token(path: Path) -> bool:
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return bool(manifest.get("params", {}).get("global_token", False))
