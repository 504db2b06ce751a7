"""``fusion.retrieval``: cross-modal retrieval with a pretrained fusion encoder, both directions,
under the protocol of :mod:`fusion.retrieval.metrics`.

Inputs: ``model`` (a ``fusion.pretrain`` artifact of a multimodal recipe), ``media`` (the feature
artifact to search: its items are the media, their texts the captions; ``split: test`` by default:
the dataset's own test split where its items carry one (Karpathy, COCO, a captions file's ``split``
column), else the items the model's hash split held out; ``counts.split_source`` says which),
optionally ``first_stage`` (another ``fusion.pretrain`` artifact,
e.g. a ``dual`` encoder, whose vectors rank candidates before re-ranking; default: the model's own
single-stream vectors). Models with media queries (``media_lxmert``, ``media_dual``: spoken
captions searching images) also take ``queries``, the query items' feature artifact; the queries
then play the captions' role, labelled by their transcripts.

Models from elsewhere (:mod:`fusion.retrieval.external`), named by parameters instead of the
``model`` input: precomputed ``text_vectors`` + ``media_vectors`` (mode ``dual``) or a ``scores``
matrix (mode ``all_pairs``), evaluated on the ids their files hold, the relevance from the ``media``
artifact's captions or a ``pairs`` file; ``hf_model``, a local Hugging Face folder: a dual encoder
such as ``CLIPModel`` on the media artifact's raw images (mode ``dual``), or ``LxmertForPreTraining``
/ ``VisualBertForPreTraining`` as a cross-encoder on its regions (``all_pairs``, or ``rerank`` after
precomputed vectors or the ``first_stage`` input). Their files are part of the cache key by content.

Modes (the mode and ``k`` are written beside every number):

- ``dual``: the first stage alone, ``encode_text(t) · encode_media(m)`` for all pairs (one matmul);
- ``all_pairs``: the cross-encoder's score for every (caption, media) pair: exact, quadratic;
- ``rerank``: each query's top ``k`` by the first stage re-scored by the cross-encoder, the rest
  kept below in first-stage order (:func:`fusion.retrieval.metrics.rerank`); pairs both directions
  need are scored once. With ``k`` >= the candidate count it equals ``all_pairs``.

Pairs are scored by :mod:`fusion.retrieval.scorer`, on ``workers`` Ray actors or in the stage's
own process (``workers: 1``).

Writes ``metrics.json`` (both directions: R@1/5/10, RSUM, median/mean rank, mAP@10, the first
stage's numbers, recall@K curves, counts, timings), ``ranks.parquet`` (per query: rank of the first
correct item, first-stage rank, top-10 ids and scores), ``recall_at_k.png`` and ``rank_hist.png``
(their numbers are in metrics.json and ranks.parquet), and ``examples.json`` (a few queries per
direction with their top results; image thumbnails as data URIs) for the run report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.retrieval.params import EXTERNAL_FIELDS, RetrievalParams  # noqa: F401 - re-exported
from fusion.retrieval.protocol import _fingerprint, evaluate, external_kind
from pipeline import Input, StageContext, StageFailed, stage



@dataclass
class RetrievalResult:
    """A retrieval evaluation read back from its folder (a ``fusion.retrieval`` artifact, or what
    ``stele eval retrieval`` wrote): ``metrics`` is ``metrics.json`` (both directions' recall@K,
    ranks and mAP@10, the first stage's numbers, counts, timings), ``headline`` the flat metrics the
    run summary shows, ``ranks`` the ``ranks.parquet`` table (per query: the rank of the first
    correct item, its first-stage rank, the top 10 ids and scores)."""

    path: Path
    metrics: dict[str, Any]
    headline: dict[str, Any]
    ranks: Any  # pyarrow.Table

    @classmethod
    def load(cls, path: str | Path, headline: dict[str, Any] | None = None) -> "RetrievalResult":
        import pyarrow.parquet as pq

        path = Path(path)
        if headline is None:  # an artifact: its manifest keeps them
            manifest = path / "manifest.json"
            headline = json.loads(manifest.read_text()).get("metrics", {}) if manifest.exists() else {}
        return cls(path, json.loads((path / "metrics.json").read_text()), headline,
                   pq.read_table(path / "ranks.parquet"))


# ----------------------------------------------------------------------------------- the stage
@stage("fusion.retrieval", version="3", cpus=1, fingerprint=_fingerprint,
       headline=("mode", "k", "captions", "media", "text_to_media_R@1", "media_to_text_R@1", "rsum"),
       inputs={"model": Input("fusion.pretrain", "a multimodal pretrained encoder (or a parameter "
                              "naming a model from elsewhere: text_vectors, scores, hf_model)",
                              required=False),
               "media": Input(("vision.features", "speech.features", "vision.video_features"),
                              "the items to search, with their captions", required=False),
               "first_stage": Input("fusion.pretrain", "an encoder (e.g. dual) ranking the "
                                    "candidates before re-ranking", required=False),
               "queries": Input(("vision.features", "speech.features", "vision.video_features"),
                                "the query items, for a model with media queries", required=False)},
       loader=RetrievalResult.load)
def retrieval(ctx: StageContext, params: RetrievalParams) -> dict:
    """Cross-modal retrieval with a pretrained multimodal encoder, or a model from elsewhere
    (precomputed vectors or scores, a local Hugging Face dual encoder): both directions, R@1/5/10,
    RSUM, median/mean rank, mAP@10; modes dual, all_pairs, rerank (k)."""
    kind = external_kind(params)
    reads_media = kind in ("hf_model", "hf_cross")
    needed = ("model", "media") if kind is None else ("media",) if params.pairs is None or reads_media else ()
    for role in needed:
        if role not in ctx.inputs:
            what = "" if kind is None else f" (with {kind}{'' if reads_media else ', or pairs'})"
            raise StageFailed(f"fusion.retrieval needs input role {role!r}{what} (got "
                              f"{sorted(ctx.inputs) or 'none'})")
    if kind is not None and "model" in ctx.inputs:
        raise StageFailed(f"fusion.retrieval: input 'model' and {kind} both name the model: give one")
    model, media = ctx.inputs.get("model"), ctx.inputs.get("media")
    fs, queries = ctx.inputs.get("first_stage"), ctx.inputs.get("queries")
    try:
        return evaluate(model.path if model else None, media.path if media else None, ctx.out, params,
                        fs.path if fs else None, ctx.log, ctx.report_progress,
                        queries.path if queries else None)
    except ValueError as e:  # the protocol's own checks (duplicate ids, no positives at all)
        raise StageFailed(f"fusion.retrieval: {e}") from None
