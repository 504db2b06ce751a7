"""The parameters of ``fusion.retrieval`` (the stage and ``stele eval retrieval``): the protocol's
mode, split and batch sizes, and a model from elsewhere (precomputed vectors or scores, a local
Hugging Face folder) instead of a ``fusion.pretrain`` input."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from pipeline.uris import ResolvedInput


class RetrievalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["rerank", "all_pairs", "dual"] = Field(
        default="rerank", description="rerank: first-stage top k re-scored; all_pairs: every pair; "
                                      "dual: the first stage alone")
    k: int = Field(default=32, ge=1, description="candidates re-scored per query (rerank)")
    fuse: Literal["none", "zscore"] = Field(
        default="none", description="rerank: none: candidates ordered by the cross-encoder's score; "
                                    "zscore: by z(cross) + z(first stage), each standardised over the "
                                    "query's k candidates (score fusion of the two stages)")
    split: Literal["test", "val", "train", "all"] = Field(
        default="test", description="which media items: the dataset's own split where the items carry "
                                    "one (Karpathy's, a captions file's split column), else the "
                                    "model's hash split (held_out_share, split_seed: train, test)")
    limit: int | None = Field(default=None, ge=1, description="only the first N media items of the split")
    max_length: int | None = Field(default=None, ge=4, description="caption tokens; None: the model's")
    batch_size: int = Field(default=256, ge=1, description="pairs per cross-encoder batch")
    encode_batch_size: int = Field(default=128, ge=1, description="items per single-stream batch")
    workers: int = Field(default=1, ge=1, description="Ray actors scoring pairs (1: in the stage's process)")
    gpus_per_worker: float = Field(default=0, ge=0)
    examples: int = Field(default=6, ge=0, description="example queries per direction in examples.json")
    top: int = Field(default=10, ge=1, description="best candidates per query kept in ranks.parquet "
                                                   "(top_ids, top_scores): a re-ranker's hard negatives "
                                                   "come from a split: train run's")
    thumbnails: bool = Field(default=True, description="image thumbnails in examples.json")
    # Models from elsewhere (fusion.retrieval.external), instead of the ``model`` input.
    text_vectors: ResolvedInput | None = Field(
        default=None, description="precomputed text vectors (.npy + .ids.txt, .safetensors, .parquet); "
                                  "with media_vectors, instead of the model input")
    media_vectors: ResolvedInput | None = Field(default=None, description="precomputed media vectors")
    scores: ResolvedInput | None = Field(
        default=None, description="a precomputed texts x media score matrix (.npy + .text_ids.txt and "
                                  ".media_ids.txt, .safetensors, .parquet text_id/media_id/score)")
    hf_model: ResolvedInput | None = Field(
        default=None, description="a local Hugging Face folder: CLIPModel (any model with "
                                  "get_text_features/get_image_features), a dual encoder on the media "
                                  "artifact's raw images; or LxmertForPreTraining / "
                                  "VisualBertForPreTraining, a cross-encoder on its regions")
    pairs: ResolvedInput | None = Field(
        default=None, description="which text ids belong to which media ids (.parquet or .tsv: text_id, "
                                  "media_id); default: the media artifact's captions <item>#<k>")
    model_options: dict[str, Any] = Field(
        default={}, description="evaluation-time switches of a stele model, set on it once loaded (names "
                                "its eval_switches lists), e.g. kg_dual's {entity_input: false}: the "
                                "same trained model without its entity input")

    @model_validator(mode="after")
    def _external(self) -> "RetrievalParams":
        """An external model: one kind at a time (precomputed vectors may rank first for a Hugging
        Face cross-encoder); the mode it implies unless one is given; split 'all' for precomputed
        files unless one is given (they hold the ids they are evaluated on; a split narrows them to
        the dataset's own: :func:`fusion.pairs.own_split_items`)."""
        if (self.text_vectors is None) != (self.media_vectors is None):
            raise ValueError("text_vectors and media_vectors go together (the two sides of a dual encoder)")
        kinds = [k for k in ("text_vectors", "scores", "hf_model") if getattr(self, k) is not None]
        cross = _is_cross_encoder(self.hf_model)
        if len(kinds) > 1 and not (cross and kinds == ["text_vectors", "hf_model"]):
            raise ValueError(f"one external model at a time (got {' and '.join(kinds)}; precomputed vectors "
                             f"go with hf_model only as the first stage of a cross-encoder)")
        if not kinds:
            if self.pairs is not None:
                raise ValueError("pairs applies to an external model (text_vectors, scores, hf_model); "
                                 "a stele model takes its pairs from the media artifact")
            return self
        if self.model_options:
            raise ValueError("model_options switches a stele model (the model input), not an external one")
        kind = kinds[-1]
        if cross:
            implied, allowed = ("rerank" if "text_vectors" in kinds else "all_pairs"), ("rerank", "all_pairs")
        else:
            implied = "all_pairs" if kind == "scores" else "dual"
            allowed = (implied,)
        if "mode" not in self.model_fields_set:
            self.mode = implied
        elif self.mode not in allowed:
            why = "a cross-encoder has no dual vectors" if cross else "it needs a cross-encoder"
            raise ValueError(f"mode {self.mode!r}: {why}; {kind} is scored with mode "
                             f"{' or '.join(repr(a) for a in allowed)}")
        if kind != "hf_model" and "split" not in self.model_fields_set:
            self.split = "all"   # the ids the files hold; a split narrows them to the dataset's own
        return self

    @model_validator(mode="after")
    def _fuse(self) -> "RetrievalParams":
        if self.fuse != "none" and self.mode != "rerank":
            raise ValueError(f"fuse: {self.fuse} combines a re-ranker's scores with its first stage's "
                             f"(mode rerank), not mode {self.mode}")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Unused external-model fields are left out, so pipelines written before they existed keep
        # their cache keys.
        out = handler(self)
        for name in EXTERNAL_FIELDS:
            if out.get(name, 0) is None:
                del out[name]
        if not out.get("model_options", 1):   # none given: the cache keys of older pipelines hold
            del out["model_options"]
        for name, default in (("top", 10), ("fuse", "none")):
            if out.get(name) == default:
                del out[name]
        return out


EXTERNAL_FIELDS = ("text_vectors", "media_vectors", "scores", "hf_model", "pairs")


def _is_cross_encoder(hf_model: str | None) -> bool:
    """Whether a local Hugging Face folder holds a cross-encoder stele scores (LXMERT, VisualBERT)."""
    if hf_model is None:  # (no import of torch for a spec without one)
        return False
    from fusion.retrieval.hf import CROSS_TYPES, hf_model_type

    return hf_model_type(hf_model) in CROSS_TYPES
