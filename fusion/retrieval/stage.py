"""``fusion.retrieval``: cross-modal retrieval with a pretrained fusion encoder, both directions,
under the protocol of :mod:`fusion.retrieval.metrics`.

Inputs: ``model`` (a ``fusion.pretrain`` artifact of a multimodal recipe), ``media`` (the feature
artifact to search: its items are the media, their texts the captions; by default the items the
model held out, ``split: test``), optionally ``first_stage`` (another ``fusion.pretrain`` artifact,
e.g. a ``dual`` encoder, whose vectors rank candidates before re-ranking; default: the model's own
single-stream vectors). Models with media queries (``media_lxmert``, ``media_dual``: spoken
captions searching images) also take ``queries``, the query items' feature artifact; the queries
then play the captions' role, labelled by their transcripts.

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

import base64
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fusion.retrieval.scorer import (DIRECTIONS, Corpus, Scorer, ScoreSettings, batches, check_dims,
                                     score_worker_cls, setup)
from pipeline import Input, StageContext, StageFailed, stage


class RetrievalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["rerank", "all_pairs", "dual"] = Field(
        default="rerank", description="rerank: first-stage top k re-scored; all_pairs: every pair; "
                                      "dual: the first stage alone")
    k: int = Field(default=32, ge=1, description="candidates re-scored per query (rerank)")
    split: Literal["test", "train", "all"] = Field(
        default="test", description="which media items of the model's split (held_out_share, split_seed)")
    limit: int | None = Field(default=None, ge=1, description="only the first N media items of the split")
    max_length: int | None = Field(default=None, ge=4, description="caption tokens; None: the model's")
    batch_size: int = Field(default=256, ge=1, description="pairs per cross-encoder batch")
    encode_batch_size: int = Field(default=128, ge=1, description="items per single-stream batch")
    workers: int = Field(default=1, ge=1, description="Ray actors scoring pairs (1: in the stage's process)")
    gpus_per_worker: float = Field(default=0, ge=0)
    examples: int = Field(default=6, ge=0, description="example queries per direction in examples.json")
    thumbnails: bool = Field(default=True, description="image thumbnails in examples.json")


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


# ----------------------------------------------------------------------------------- evaluate
def evaluate(model_dir: Path, media_dir: Path, out: Path, params: RetrievalParams,
             first_stage_dir: Path | None = None, log: Any = None,
             progress: Callable[[str, int, int], None] | None = None,
             queries_dir: Path | None = None) -> dict[str, Any]:
    """Run the protocol and write the artifact files into ``out``; returns the headline metrics."""
    import logging

    import torch

    from fusion.pretrain.loop import load_pretrained
    from fusion.retrieval.metrics import KS, relevance_matrix, rerank, retrieval_metrics, top_candidates

    log = log or logging.getLogger("stele.retrieval")
    device = "cuda" if params.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    settings = ScoreSettings(split=params.split, limit=params.limit, max_length=params.max_length,
                             encode_batch_size=params.encode_batch_size, batch_size=params.batch_size)
    corpus, scorer = setup(model_dir, media_dir, settings, device, queries_dir)
    bank, caps = corpus.bank, corpus.captions
    T, M = len(caps.texts), len(bank)
    if T == 0 or M == 0:
        raise StageFailed(f"fusion.retrieval: nothing to evaluate in split {params.split!r} of "
                          f"{media_dir}: {M} media items, {T} captions ({corpus.counts})")
    if params.mode != "dual" and not scorer.cross_encoder:
        raise StageFailed(f"fusion.retrieval: the model ({type(scorer.model).__name__}, recipe "
                          f"without cross layers) has no cross-encoder: use mode 'dual'")
    relevant = relevance_matrix(caps.ids, bank.ids,
                                [(c, bank.ids[m]) for c, m in zip(caps.ids, caps.media)])
    log.info("retrieval %s (k=%d) over %d captions x %d media (split %s)", params.mode, params.k,
             T, M, params.split)

    t0 = time.perf_counter()
    if first_stage_dir is not None:
        _, _, fs_backbone, fs_model, fs_meta = load_pretrained(first_stage_dir)
        check_dims(first_stage_dir, fs_meta, bank, caps, media_dir, queries_dir)
        fs_scorer = Scorer(fs_model, fs_backbone.tokenizer,
                           params.max_length or fs_meta.get("max_length", 64), device,
                           params.encode_batch_size)
        first = fs_scorer.first_stage(caps, bank)
    else:
        first = scorer.first_stage(caps, bank)                             # (T, M)
    timing: dict[str, Any] = {"first_stage_s": time.perf_counter() - t0}

    if params.mode == "dual":
        t2m, m2t, pairs = first, first.T, 0
    else:
        t1 = time.perf_counter()
        if params.mode == "all_pairs":
            ti, mi = (a.ravel() for a in np.meshgrid(np.arange(T), np.arange(M), indexing="ij"))
        else:
            cand_t2m, cand_m2t = top_candidates(first, params.k), top_candidates(first.T, params.k)
            flat = np.concatenate([
                (np.arange(T)[:, None] * M + cand_t2m.numpy()).ravel(),
                (cand_m2t.numpy() * M + np.arange(M)[:, None]).ravel()])
            flat = np.unique(flat)                   # a pair both directions need is scored once
            ti, mi = flat // M, flat % M
        scores = _score_pairs(scorer, model_dir, media_dir, queries_dir, settings, params, device,
                              ti, mi, corpus, progress)
        dense = torch.full((T, M), float("nan"))
        dense[torch.as_tensor(ti), torch.as_tensor(mi)] = torch.as_tensor(scores)
        timing["cross_s"] = time.perf_counter() - t1
        pairs = len(ti)
        if params.mode == "all_pairs":
            t2m, m2t = dense, dense.T
        else:
            t2m = rerank(first, cand_t2m, dense.gather(1, cand_t2m))
            m2t = rerank(first.T, cand_m2t, dense.T.gather(1, cand_m2t))
    timing["total_s"] = time.perf_counter() - t0
    timing["pairs_scored"] = pairs
    timing["pairs_per_s"] = pairs / timing["cross_s"] if pairs and timing.get("cross_s") else None

    result: dict[str, Any] = {"mode": params.mode, "k": params.k if params.mode == "rerank" else None,
                              "first_stage": "first_stage input" if first_stage_dir else "model's own",
                              "split": params.split, "queries": {}, "counts": {
                                  **corpus.counts, "captions": T, "media": M,
                                  "pairs_total": T * M}, "timing": timing}
    final, first_metrics = retrieval_metrics(t2m, relevant, m2t), retrieval_metrics(first, relevant)
    ranks, first_ranks = final["ranks"], first_metrics["ranks"]
    for d in DIRECTIONS:
        result[d], result[f"first_stage_{d}"] = final[d], first_metrics[d]
    result["rsum"], result["first_stage_rsum"] = final["rsum"], first_metrics["rsum"]
    result["recall_curve"] = _recall_curve(ranks, max(T, M))

    out.mkdir(parents=True, exist_ok=True)
    _write_ranks(out / "ranks.parquet", caps, bank, t2m, m2t, ranks, first_ranks)
    _plots(result, ranks, out, params)
    examples = _examples(media_dir, caps, bank, t2m, m2t, relevant, params, log)
    (out / "examples.json").write_text(json.dumps(examples, indent=1))
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return {"mode": params.mode, "k": result["k"], "captions": T, "media": M,
            **{f"{d}_R@{k}": result[d][f"R@{k}"] for d in DIRECTIONS for k in KS},
            "rsum": result["rsum"], "first_stage_rsum": result["first_stage_rsum"],
            **{f"{d}_median_rank": result[d]["median_rank"] for d in DIRECTIONS},
            **{f"{d}_mAP@10": result[d]["mAP@10"] for d in DIRECTIONS},
            **{f"{d}_skipped_no_positive": result[d]["skipped_no_positive"] for d in DIRECTIONS},
            "pairs_scored": pairs, "eval_s": round(timing["total_s"], 3)}


def _score_pairs(scorer: Scorer, model_dir: Path, media_dir: Path, queries_dir: Path | None,
                 settings: ScoreSettings, params: RetrievalParams, device: str, ti: np.ndarray, mi: np.ndarray,
                 corpus: Corpus, progress: Callable[[str, int, int], None] | None) -> np.ndarray:
    report = (lambda done, total: progress("pairs", done, total)) if progress else None
    if params.workers == 1:
        states = scorer.states(corpus.captions, corpus.bank)
        return scorer.cross(*states, ti, mi, report)
    import os

    import ray

    worker = score_worker_cls()
    threads = max(1, (os.cpu_count() or 1) // params.workers)
    actors = [worker.options(num_cpus=1 if params.gpus_per_worker == 0 else 0,
                             num_gpus=params.gpus_per_worker).remote(
        str(model_dir), str(media_dir), str(queries_dir) if queries_dir else None,
        settings, threads, device)
        for _ in range(params.workers)]
    # Many small shards, handed out as actors free up: balanced when pair lengths differ.
    shards = batches(len(ti), params.batch_size * 8)
    out = np.empty(len(ti), dtype=np.float32)
    pending: dict[Any, slice] = {}
    queue = list(shards)
    idle = list(actors)
    done = 0
    while queue or pending:
        while queue and idle:
            s, a = queue.pop(0), idle.pop()
            pending[a.score.remote(ti[s], mi[s])] = (s, a)
        ready, _ = ray.wait(list(pending), num_returns=1)
        s, a = pending.pop(ready[0])
        out[s] = ray.get(ready[0])
        idle.append(a)
        done += s.stop - s.start
        if report:
            report(done, len(ti))
    for a in actors:
        ray.kill(a)
    return out


def _recall_curve(ranks: dict[str, np.ndarray], n: int) -> dict[str, list]:
    ks = sorted({*range(1, min(n, 10) + 1), *np.unique(np.geomspace(1, max(n, 1), 40).astype(int)).tolist()})
    curve: dict[str, list] = {"K": ks}
    for d, r in ranks.items():
        r = r[~np.isnan(r)]
        curve[d] = [float((r <= k).mean() * 100) if len(r) else None for k in ks]
    return curve


def _write_ranks(path: Path, caps: Any, bank: Any, t2m: Any, m2t: Any,
                 ranks: dict[str, np.ndarray], first_ranks: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list] = {c: [] for c in ("direction", "query_id", "rank", "first_stage_rank",
                                             "top_ids", "top_scores")}
    for d, scores, q_ids, c_ids in (("text_to_media", t2m, caps.ids, bank.ids),
                                    ("media_to_text", m2t, bank.ids, caps.ids)):
        top = scores.float().topk(min(10, scores.shape[1]), dim=1)
        for i, q in enumerate(q_ids):
            rows["direction"].append(d)
            rows["query_id"].append(q)
            rows["rank"].append(None if np.isnan(ranks[d][i]) else float(ranks[d][i]))
            rows["first_stage_rank"].append(None if np.isnan(first_ranks[d][i]) else float(first_ranks[d][i]))
            rows["top_ids"].append([c_ids[j] for j in top.indices[i].tolist()])
            rows["top_scores"].append(top.values[i].tolist())
    pq.write_table(pa.table(rows), path)


def _plots(result: dict, ranks: dict[str, np.ndarray], out: Path, params: RetrievalParams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = params.mode + (f" k={params.k}" if params.mode == "rerank" else "")
    curve = result["recall_curve"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for d in DIRECTIONS:
        ax.plot(curve["K"], curve[d], marker=".", label=f"{d.replace('_', ' ')}")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"retrieval ({label}), {result['counts']['captions']} captions x "
                 f"{result['counts']['media']} media")
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4))
    top = max(2.0, max(float(np.nanmax(r)) if np.isfinite(r).any() else 1.0 for r in ranks.values()))
    bins = np.unique(np.geomspace(1, top + 1, 30))
    for d in DIRECTIONS:
        r = ranks[d][~np.isnan(ranks[d])]
        ax.hist(r, bins=bins, alpha=0.6, label=d.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("rank of the first correct item")
    ax.set_ylabel("queries")
    ax.legend()
    ax.set_title(f"rank histogram ({label}); per-query ranks in ranks.parquet")
    fig.tight_layout()
    fig.savefig(out / "rank_hist.png", dpi=110)
    plt.close(fig)


def _examples(media_dir: Path, caps: Any, bank: Any, t2m: Any, m2t: Any, relevant: Any,
              params: RetrievalParams, log: Any, top: int = 5) -> list[dict]:
    """A few queries per direction (spread over the query list, reproducibly) with their top
    results: captions as text, images as thumbnails, audio clips by their first caption."""
    if params.examples == 0:
        return []
    media_text = {}
    for c, m in zip(caps.texts, caps.media):
        media_text.setdefault(m, c)
    thumbs = _Thumbnails(media_dir, log) if params.thumbnails else None

    def media_entry(m: int) -> dict:
        return {"id": bank.ids[m], "text": media_text.get(m),
                "thumbnail": thumbs.get(bank.ids[m]) if thumbs else None}

    def text_entry(t: int) -> dict:
        entry = {"id": caps.ids[t], "text": caps.texts[t]}
        return entry if caps.bank is None else {**entry, "kind": "audio"}

    out = []
    for d, scores, rel, q_entry, c_entry in (("text_to_media", t2m, relevant, text_entry, media_entry),
                                             ("media_to_text", m2t, relevant.T, media_entry, text_entry)):
        n = scores.shape[0]
        picks = np.unique(np.linspace(0, n - 1, min(params.examples, n)).astype(int))
        for q in picks.tolist():
            order = scores[q].float().argsort(descending=True)[:top].tolist()
            out.append({"direction": d, "query": q_entry(q),
                        "results": [{**c_entry(c), "score": float(scores[q, c]),
                                     "correct": bool(rel[q, c])} for c in order]})
    return out


class _Thumbnails:
    """64-pixel PNG data URIs of image items, read through the dataset the feature artifact was
    built from (its manifest's parameters); none for audio, or when the media is gone."""

    def __init__(self, media_dir: Path, log: Any, size: int = 64):
        import pyarrow.parquet as pq

        self.size, self.log, self.dataset, self.failed = size, log, None, 0
        manifest = json.loads((media_dir / "manifest.json").read_text())
        spec = manifest.get("params", {}).get("dataset")
        items = pq.read_table(media_dir / "items.parquet", columns=["id", "media"])
        self.ref = dict(zip(items["id"].to_pylist(), items["media"].to_pylist()))
        try:
            from pipeline.datasets import build_dataset

            ds = build_dataset(spec)
            self.dataset = ds if ds.modality == "image" else None
        except Exception as e:  # noqa: BLE001 - thumbnails are a nicety: say why, go on without
            log.warning("no thumbnails: the dataset %r cannot be opened (%s)", spec, e)

    def get(self, item_id: str) -> str | None:
        if self.dataset is None:
            return None
        try:
            from PIL import Image

            img = Image.open(io.BytesIO(self.dataset.load(self.ref[item_id])))
            img = img.convert("RGBA")
            img.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        except Exception as e:  # noqa: BLE001
            self.failed += 1
            self.log.warning("no thumbnail for %s: %s", item_id, e)
            return None


# ----------------------------------------------------------------------------------- the stage
@stage("fusion.retrieval", version="2", cpus=1,
       headline=("mode", "k", "captions", "media", "text_to_media_R@1", "media_to_text_R@1", "rsum"),
       inputs={"model": Input("fusion.pretrain", "a multimodal pretrained encoder"),
               "media": Input(("vision.features", "speech.features"), "the items to search, with "
                              "their captions"),
               "first_stage": Input("fusion.pretrain", "an encoder (e.g. dual) ranking the "
                                    "candidates before re-ranking", required=False),
               "queries": Input(("vision.features", "speech.features"), "the query items, for a "
                                "model with media queries", required=False)},
       loader=RetrievalResult.load)
def retrieval(ctx: StageContext, params: RetrievalParams) -> dict:
    """Cross-modal retrieval with a pretrained multimodal encoder: both directions, R@1/5/10, RSUM,
    median/mean rank, mAP@10; modes dual, all_pairs, rerank (k)."""
    for role in ("model", "media"):
        if role not in ctx.inputs:
            raise StageFailed(f"fusion.retrieval needs input role {role!r} (got "
                              f"{sorted(ctx.inputs) or 'none'})")
    fs, queries = ctx.inputs.get("first_stage"), ctx.inputs.get("queries")
    try:
        return evaluate(ctx.inputs["model"].path, ctx.inputs["media"].path, ctx.out, params,
                        fs.path if fs else None, ctx.log, ctx.report_progress,
                        queries.path if queries else None)
    except ValueError as e:  # the protocol's own checks (duplicate ids, no positives at all)
        raise StageFailed(f"fusion.retrieval: {e}") from None
