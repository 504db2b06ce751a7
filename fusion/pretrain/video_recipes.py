"""Video-text pretraining recipes: VideoBERT and CBT on the clips and captions of one feature
artifact (``media`` input), the same data, split and batches as the image recipes
(:class:`fusion.pretrain.media_recipes.MediaRecipe`).

A video is a feature artifact item whose regions are its frames in time order, each box the frame's
time span ``(t0/T, 0, t1/T, 1)``, optionally a global mean-frame token first (as ``speech.features``
writes audio); both models leave that token out.

- ``videobert``: :class:`fusion.models.videobert.VideoBert` (Sun et al. 2019). Before training, the
  stage fits the hierarchical k-means codebook (``kmeans_depth`` levels of ``kmeans_branching``
  centroids) on a bounded, seeded sample of the *training* frames (:func:`sample_frames`: at most
  ``kmeans_sample`` frames, shards and their row groups visited in a seeded order, each shard a
  share of what is still missing, never the whole corpus at once). The codebook travels to the
  workers in the resources (a safetensors blob, kept out of ``recipe.json``), lives in the model's
  buffers and so in ``model.safetensors``: evaluation tokenises with the very same tree. The
  manifest records the vocabulary size (``visual_words``) and the frames fitted on
  (``kmeans_frames``). Objectives: text MLM, masked visual-word prediction, linguistic-visual
  alignment.
- ``cbt``: :class:`fusion.models.cbt.CBT` (Sun et al. 2019, contrastive bidirectional transformer):
  the backbone as the text BERT, a visual transformer over the continuous frames (masked frames by
  NCE against the batch's frames) and a cross-modal transformer (NCE over the batch's pairs).

Both start their text side from the backbone and, unless ``options.config`` says otherwise, add the
in-batch InfoNCE of their single-modality passes (``contrastive_weight`` 1; in neither paper, as for
the image recipes), so that the model's own dual-encoder vectors are a trained first stage for
``fusion.retrieval``'s ``rerank``; the cross-encoder score is VideoBERT's alignment logit or CBT's
``log MI`` of the pair (``all_pairs``, ``rerank``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pipeline import StageFailed

from fusion.models.backbone import TextBackbone
from fusion.pretrain.loop import recipe
from fusion.pretrain.media_recipes import (MediaOptions, MediaRecipe, _check_fields, _open, feature_shards,
                                           train_items)

# set by the recipe: from the backbone, the features or the options
FIXED = {"vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers", "visual_feat_dim",
         "global_token"}
DEFAULTS = {"contrastive_weight": 1.0}


def _available(pf: pq.ParquetFile, keep: set[str], global_token: bool, max_regions: int | None) -> int:
    """How many frames the items ``keep`` of one shard hold (its small columns only)."""
    t = pf.read(columns=["id", "n_regions"])
    return sum(max(0, (n if max_regions is None else min(n, max_regions)) - global_token)
               for i, n in zip(t["id"].to_pylist(), t["n_regions"].to_pylist()) if i in keep)


def sample_frames(uri: str, keep: set[str], cap: int, seed: int, global_token: bool,
                  max_regions: int | None, batch_rows: int = 256) -> tuple[np.ndarray, Counter]:
    """Up to ``cap`` frames (n, F) float32 of the items ``keep`` of a feature artifact, and counts.

    A seeded sample with bounded reads. Each shard's quota is an equal share of ``cap``, a shard with
    fewer training frames giving all it has and the others sharing the rest (counted from the ids
    and region counts alone); shards are visited in an order drawn from ``seed``, and the row groups
    of each in an order drawn from it too. Frames are cut to ``max_regions`` regions, a global token
    left out. Rows are read in record batches of ``batch_rows`` items: memory holds the sample and
    one batch, never a shard, and a shard is read only until it gave its quota."""
    from pipeline.features import tensor_spec

    shards = feature_shards(uri)
    if not shards:
        raise StageFailed(f"fusion.pretrain: {uri} has no feature shards")
    available = {}
    for k, shard in enumerate(shards):
        with _open(uri, shard) as f:
            available[k] = _available(pq.ParquetFile(f), keep, global_token, max_regions)
    quota, left = {}, cap                 # water-filling: the smallest shards first
    for done, k in enumerate(sorted(available, key=lambda k: (available[k], k))):
        quota[k] = min(available[k], -(-left // (len(shards) - done)))
        left -= quota[k]
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    counts: Counter = Counter()
    for k in rng.permutation(len(shards)):
        taken = 0
        if not quota[k]:
            continue
        with _open(uri, shards[k]) as f:
            pf = pq.ParquetFile(f)
            dtype, dim = tensor_spec(pf.schema_arrow.field("features"), f"{uri}/{shards[k]}: ")
            batches = (rb for g in rng.permutation(pf.num_row_groups)
                       for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[int(g)],
                                                 columns=["id", "n_regions", "features"]))
            rows = (row for rb in batches
                    for row in zip(*(rb.column(c).to_pylist() for c in ("id", "n_regions", "features"))))
            for i, n, blob in rows:      # lazily: no row is read past the shard's quota
                if i not in keep or not n:
                    continue
                n = n if max_regions is None else min(n, max_regions)
                x = np.frombuffer(blob, dtype.newbyteorder("<"), count=n * dim).reshape(n, dim)
                x = (x[1:] if global_token else x)[:quota[k] - taken]
                if len(x):
                    parts.append(x.astype(np.float32))
                    taken += len(x)
                    counts["kmeans_items"] += 1
                if taken >= quota[k]:
                    break
        counts["kmeans_shards"] += bool(taken)
    if not parts:
        raise StageFailed(f"fusion.pretrain: no training frames in {uri} to fit the visual words on")
    return np.concatenate(parts), counts


class VideoBertOptions(MediaOptions):
    kmeans_depth: int = Field(default=2, ge=1, description="levels of the hierarchical k-means (paper: 4)")
    kmeans_branching: int = Field(default=8, ge=2, description="centroids per node (paper: 12); "
                                                               "branching ** depth visual words")
    kmeans_sample: int = Field(default=20000, ge=1, description="at most this many training frames "
                                                                "fit the codebook")
    kmeans_iterations: int = Field(default=20, ge=1, description="Lloyd iterations per node at most")
    kmeans_seed: int = 0

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fusion.models.videobert import VideoBertConfig

        return _check_fields(v, VideoBertConfig, FIXED | {"kmeans_depth", "kmeans_branching"})


@recipe("videobert")
class VideoBertRecipe(MediaRecipe):
    """:class:`fusion.models.videobert.VideoBert` over the backbone, its codebook fitted here."""

    Options = VideoBertOptions

    def resources(self, inputs: dict[str, str], options: VideoBertOptions) -> dict[str, Any]:
        import torch
        from safetensors.torch import save

        from fusion.models.videobert import fit_hierarchical_kmeans

        out = super().resources(inputs, options)
        chosen, _ = train_items(inputs["media"], options)
        x, counts = sample_frames(inputs["media"], set(chosen), options.kmeans_sample, options.kmeans_seed,
                                  out["global_token"], options.max_regions)
        levels = fit_hierarchical_kmeans(torch.from_numpy(x), options.kmeans_depth, options.kmeans_branching,
                                         options.kmeans_iterations, options.kmeans_seed)
        blob = save({f"level_{k}": c.contiguous() for k, c in enumerate(levels)})
        # bytes: travels with the job, stays out of recipe.json (model.safetensors keeps the codebook)
        return out | {"codebook": blob, "visual_words": options.kmeans_branching ** options.kmeans_depth,
                      "kmeans_frames": len(x), **counts}

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: VideoBertOptions) -> Any:
        from safetensors.torch import load

        from fusion.models.videobert import videobert_backbone

        model = videobert_backbone(backbone, **(DEFAULTS | options.config | {
            "visual_feat_dim": resources["feature_dim"], "global_token": resources["global_token"],
            "kmeans_depth": options.kmeans_depth, "kmeans_branching": options.kmeans_branching}))
        if "codebook" in resources:   # training; a trained model's comes with its weights
            levels = load(resources["codebook"])
            model.set_codebook([levels[f"level_{k}"] for k in range(options.kmeans_depth)])
        return model


class CBTOptions(MediaOptions):
    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fusion.models.cbt import CBTConfig

        return _check_fields(v, CBTConfig, FIXED)


@recipe("cbt")
class CBTRecipe(MediaRecipe):
    """:class:`fusion.models.cbt.CBT` with the backbone as its text BERT."""

    Options = CBTOptions

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: CBTOptions) -> Any:
        from fusion.models.cbt import cbt_backbone

        return cbt_backbone(backbone, **(DEFAULTS | {"text_pool": "mean"} | options.config | {
            "visual_feat_dim": resources["feature_dim"], "global_token": resources["global_token"]}))
