"""The ``fusion.retrieval`` protocol behind the stage and ``stele eval retrieval``: score the
(query, item) pairs with a stele model or an imported one (:mod:`fusion.retrieval.external`,
:mod:`fusion.retrieval.hf`), compute the metrics (:mod:`fusion.retrieval.metrics`) and write the
artifact's files (``metrics.json``, ``ranks.parquet``, the plots, ``examples.json``)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fusion.retrieval.scorer import (DIRECTIONS, Corpus, Scorer, ScoreSettings, batches, check_dims,
                                     check_finite, score_worker_cls, setup)
from pipeline import StageFailed
from pipeline.uris import inputs_fingerprint

from fusion.retrieval.outputs import Listing, examples_of, plots, recall_curve, write_ranks
from fusion.retrieval.params import RetrievalParams, _is_cross_encoder


def evaluate(model_dir: Path | None, media_dir: Path | None, out: Path, params: RetrievalParams,
             first_stage_dir: Path | None = None, log: Any = None,
             progress: Callable[[str, int, int], None] | None = None,
             queries_dir: Path | None = None) -> dict[str, Any]:
    """Run the protocol and write the artifact files into ``out``; returns the headline metrics.
    ``model_dir`` is a ``fusion.pretrain`` artifact, or None with an external model in ``params``
    (:mod:`fusion.retrieval.external`)."""
    import logging

    import torch

    from fusion.pretrain.loop import load_pretrained
    from fusion.retrieval.metrics import Relevance, Scores, evaluate_scores

    log = log or logging.getLogger("stele.retrieval")
    kind = external_kind(params)
    if kind == "hf_cross":
        return _evaluate_hf_cross(media_dir, out, params, first_stage_dir, log, progress)
    if kind is not None:
        return _evaluate_external(media_dir, out, params, log)
    if model_dir is None or media_dir is None:
        raise StageFailed("fusion.retrieval needs a model (a fusion.pretrain artifact, or text_vectors + "
                          "media_vectors, scores or hf_model) and the media artifact")
    device = "cuda" if params.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    settings = ScoreSettings(split=params.split, limit=params.limit, max_length=params.max_length,
                             encode_batch_size=params.encode_batch_size, batch_size=params.batch_size,
                             model_options=dict(params.model_options))
    corpus, scorer = setup(model_dir, media_dir, settings, device, queries_dir)
    bank, caps = corpus.bank, corpus.captions
    T, M = len(caps.texts), len(bank)
    if T == 0 or M == 0:
        raise StageFailed(f"fusion.retrieval: nothing to evaluate in split {params.split!r} of "
                          f"{media_dir}: {M} media items, {T} captions ({corpus.counts})")
    if params.mode != "dual" and not scorer.cross_encoder:
        raise StageFailed(f"fusion.retrieval: the model ({type(scorer.model).__name__}) has no cross-encoder "
                          f"score: no cross layers, or no matching head (trained without a matching "
                          f"objective, as VL-BERT): use mode 'dual'")
    relevance = Relevance.from_ids(caps.ids, bank.ids,
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
        text_vec, media_vec = fs_scorer.vectors(caps, bank)
    else:
        text_vec, media_vec = scorer.vectors(caps, bank)                  # (T, D), (M, D)
    timing: dict[str, Any] = {"first_stage_s": time.perf_counter() - t0}

    if params.mode == "dual":   # the dual path never holds a (T, M) matrix
        final = first = evaluate_scores(Scores.dual(text_vec, media_vec), relevance, top=params.top)
        pairs = 0
    else:
        first_scores = text_vec @ media_vec.T                            # (T, M)
        build = functools.partial(setup, model_dir, media_dir, settings, queries_dir=queries_dir)
        t2m, m2t, pairs, timing["cross_s"] = _cross_scores(first_scores, params, lambda ti, mi: _score_pairs(
            scorer, build, params, device, ti, mi, corpus, progress))
        final = evaluate_scores(Scores.dense(t2m, m2t), relevance, top=params.top)
        first = evaluate_scores(Scores.dense(first_scores), relevance)
    timing["total_s"] = time.perf_counter() - t0
    timing["pairs_scored"] = pairs
    timing["pairs_per_s"] = pairs / timing["cross_s"] if pairs and timing.get("cross_s") else None
    result: dict[str, Any] = {**_mode_fields(params),
                              "first_stage": "first_stage input" if first_stage_dir else "model's own",
                              "split": params.split, "model_options": params.model_options,
                              "queries": {}, "counts": {
                                  **corpus.counts, "captions": T, "media": M,
                                  "pairs_total": T * M}, "timing": timing}
    score_rows = Scores.dual(text_vec, media_vec) if params.mode == "dual" else Scores.dense(t2m, m2t)
    return _finish(out, params, result, final, first, score_rows, relevance, Listing.of(caps, bank),
                   media_dir, log)


def _cross_scores(first: Any, params: RetrievalParams,
                  score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  shape: tuple[int, int] | None = None) -> tuple[Any, Any, int, float]:
    """Cross-encoder scores of mode ``all_pairs`` (every pair) or ``rerank`` (each query's top
    ``k`` by the ``first`` stage's (T, M) scores, both directions, a pair both need scored once),
    as each direction's dense scores: ``(text_to_media, media_to_text, pairs scored, seconds)``."""
    import torch

    from fusion.retrieval.metrics import fuse_zscore, rerank, top_candidates

    T, M = first.shape if first is not None else shape
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
    scores = score_pairs(ti, mi)
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64))
    if bad.any():  # a NaN compares False with everything: its query's correct item would rank first
        i = int(np.flatnonzero(bad)[0])
        raise StageFailed(f"fusion.retrieval: {int(bad.sum())} of {len(bad)} cross-encoder pair scores are "
                          f"not finite (the first: caption #{int(ti[i])} x media #{int(mi[i])}, "
                          f"{float(np.asarray(scores)[i])}); ranks from them would be meaningless. A "
                          f"diverged checkpoint? Check the model's training losses")
    dense = torch.full((T, M), float("nan"))
    dense[torch.as_tensor(ti), torch.as_tensor(mi)] = torch.as_tensor(scores)
    if params.mode == "all_pairs":
        t2m, m2t = dense, dense.T
    else:
        fs = torch.as_tensor(first)
        t2m_k, m2t_k = dense.gather(1, cand_t2m), dense.T.gather(1, cand_m2t)
        if params.fuse == "zscore":
            t2m_k = fuse_zscore(t2m_k, fs.gather(1, cand_t2m))
            m2t_k = fuse_zscore(m2t_k, fs.T.gather(1, cand_m2t))
        t2m = rerank(first, cand_t2m, t2m_k)
        m2t = rerank(first.T, cand_m2t, m2t_k)
    return t2m, m2t, len(ti), time.perf_counter() - t1


def _mode_fields(params: RetrievalParams) -> dict[str, Any]:
    """How the ranking was made, first in metrics.json: mode, and for re-ranking its k and fusion."""
    rerank = params.mode == "rerank"
    return {"mode": params.mode, "k": params.k if rerank else None, "fuse": params.fuse if rerank else None}


def _finish(out: Path, params: RetrievalParams, result: dict[str, Any], final: dict, first: dict,
            scores: Any, relevance: Any, listing: Listing, media_dir: Path | None,
            log: Any) -> dict[str, Any]:
    """Write metrics.json, ranks.parquet, the plots and examples.json; the headline metrics."""
    from fusion.retrieval.metrics import KS

    T, M = scores.shape
    for d in DIRECTIONS:
        result[d], result[f"first_stage_{d}"] = final[d], first[d]
    result["rsum"], result["first_stage_rsum"] = final["rsum"], first["rsum"]
    result["recall_curve"] = recall_curve(final["ranks"], max(T, M))
    out.mkdir(parents=True, exist_ok=True)
    write_ranks(out / "ranks.parquet", listing, final["results"], first["ranks"])
    plots(result, final["ranks"], out, params)
    examples = examples_of(media_dir, listing, scores, relevance, params, log)
    (out / "examples.json").write_text(json.dumps(examples, indent=1))
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return {"mode": params.mode, "k": result["k"], "fuse": result.get("fuse"), "captions": T, "media": M,
            **{f"{d}_R@{k}": result[d][f"R@{k}"] for d in DIRECTIONS for k in KS},
            "rsum": result["rsum"], "first_stage_rsum": result["first_stage_rsum"],
            **{f"{d}_median_rank": result[d]["median_rank"] for d in DIRECTIONS},
            **{f"{d}_mAP@10": result[d]["mAP@10"] for d in DIRECTIONS},
            **{f"{d}_skipped_no_positive": result[d]["skipped_no_positive"] for d in DIRECTIONS},
            "pairs_scored": result["timing"]["pairs_scored"], "eval_s": round(result["timing"]["total_s"], 3)}


def external_kind(params: RetrievalParams) -> str | None:
    """Which external model ``params`` name: ``vectors``, ``scores``, ``hf_model`` (a dual encoder),
    ``hf_cross`` (a cross-encoder, maybe with precomputed vectors as its first stage) or None."""
    if params.hf_model is not None:
        return "hf_cross" if _is_cross_encoder(params.hf_model) else "hf_model"
    if params.text_vectors is not None:
        return "vectors"
    return "scores" if params.scores is not None else None


def _external_files(params: RetrievalParams) -> list[Any]:
    from fusion.retrieval.external import model_files

    files: list[Any] = []
    for name, kind in (("text_vectors", "vectors"), ("media_vectors", "vectors"), ("scores", "scores")):
        if getattr(params, name) is not None:
            files += model_files(getattr(params, name), kind)
    return files + ([params.pairs] if params.pairs is not None else [])


def _fingerprint(params: RetrievalParams) -> Any:
    """The content of an external model's files (a local folder: every file in it), so that new
    vectors or scores under the same name re-run the stage; None for stele's own models (their
    artifacts are inputs with keys)."""
    from pipeline.uris import input_fingerprint

    if external_kind(params) is None:
        return None
    fp = {"files": inputs_fingerprint(_external_files(params))}
    if params.hf_model is not None:
        fp["hf_model"] = input_fingerprint(params.hf_model)
    return fp


def _evaluate_external(media_dir: Path | None, out: Path, params: RetrievalParams,
                       log: Any) -> dict[str, Any]:
    """The protocol for a model from elsewhere (:mod:`fusion.retrieval.external`)."""
    from fusion.pairs import own_split_items
    from fusion.retrieval import external as ext
    from fusion.retrieval.metrics import Relevance, Scores, evaluate_scores

    kind = external_kind(params)
    if media_dir is None and (params.pairs is None or kind == "hf_model"):
        why = ("hf_model reads its captions and images through the media artifact" if kind == "hf_model"
               else "the relevance comes from the media artifact's captions, or from pairs")
        raise StageFailed(f"fusion.retrieval: give input role 'media' (--media): {why}")
    if media_dir is None and params.split != "all":
        raise StageFailed(f"fusion.retrieval: split {params.split!r} is the dataset's own split: give the "
                          f"media artifact (--media) whose items carry it, or use split all")
    t0 = time.perf_counter()
    captions = ext.Captions.load(media_dir) if media_dir is not None else None
    counts: dict[str, Any] = {}
    if kind == "hf_model":
        text_ids, texts, media_ids, scores, counts = _hf_dual(media_dir, params, log)
        source = f"hf_model {Path(params.hf_model).name}"
    elif kind == "vectors":
        tv, mv = ext.load_vector_pair(params.text_vectors, params.media_vectors)
        text_ids, media_ids, tvec, mvec = tv.ids, mv.ids, tv.vectors, mv.vectors
        source = f"text_vectors {Path(tv.path).name}, media_vectors {Path(mv.path).name}"
    else:
        sm = ext.load_scores(params.scores)
        text_ids, media_ids, matrix = sm.text_ids, sm.media_ids, sm.scores
        source = f"scores {Path(sm.path).name}"
    if params.pairs is not None:
        pairs, pairs_from = ext.load_pair_file(params.pairs), f"pairs {Path(params.pairs).name}"
    else:
        pairs, pairs_from = captions.pairs(), "the media artifact's captions"
    if kind != "hf_model":
        if params.split != "all":   # the files' ids narrowed to the dataset's own split
            keep, split_counts = own_split_items(media_dir, params.split)
            ti, mi, counts = _in_split(text_ids, media_ids, pairs, keep, params.split)
            counts |= split_counts
            text_ids, media_ids = [text_ids[i] for i in ti], [media_ids[j] for j in mi]
            if kind == "vectors":
                tvec, mvec = tvec[ti], mvec[mi]
            else:
                matrix = matrix[ti][:, mi]
        scores = Scores.dual(tvec, mvec) if kind == "vectors" else Scores.dense(matrix)
    timing: dict[str, Any] = {"first_stage_s": time.perf_counter() - t0}
    try:
        relevance = Relevance.from_ids(text_ids, media_ids, pairs)
    except ValueError as e:
        raise StageFailed(f"fusion.retrieval: {source}: {e}") from None
    T, M = scores.shape
    if relevance.index.size == 0:
        raise StageFailed(f"fusion.retrieval: no (text, media) pair of {pairs_from} names a text id and a "
                          f"media id of {source} (text ids look like {text_ids[:2]}, media ids like "
                          f"{media_ids[:2]}; captions are '<item id>#<k>')")
    log.info("retrieval of %s over %d texts x %d media", source, T, M)
    final = evaluate_scores(scores, relevance, top=params.top)
    timing["total_s"] = time.perf_counter() - t0
    timing["pairs_scored"], timing["pairs_per_s"] = 0, None
    text_set, media_set = set(text_ids), set(media_ids)
    counts |= {"captions": T, "media": M, "pairs_total": T * M, "correct_pairs": int(relevance.index.size),
               "pairs_listed": len(pairs),
               "pairs_with_text_outside": sum(t not in text_set for t, _ in pairs),
               "pairs_with_media_outside": sum(m not in media_set for _, m in pairs)}
    result: dict[str, Any] = {"mode": params.mode, "k": None, "fuse": None, "first_stage": source,
                              "model": source, "relevance": pairs_from,
                              "split": params.split if kind == "hf_model" or params.split != "all"
                              else "the ids in the files",
                              "queries": {}, "counts": counts, "timing": timing}
    text_of = {c: t for c, (_, t) in captions.of.items()} if captions else {}
    media_text: dict[str, str] = {}
    for c, (item, t) in (captions.of.items() if captions else []):
        media_text.setdefault(item, t)
    listing = Listing(list(text_ids), [text_of.get(t) for t in text_ids], list(media_ids),
                      [media_text.get(m) for m in media_ids])
    if kind == "hf_model":
        listing.texts = list(texts)
    return _finish(out, params, result, final, final, scores, relevance, listing, media_dir, log)


def _in_split(text_ids: list[str], media_ids: list[str], pairs: list[tuple[str, str]], keep: set[str],
              split: str) -> tuple[list[int], list[int], dict[str, int]]:
    """Rows of precomputed files in ``split``: the media ids in ``keep``, and the texts paired
    (``pairs``) with one of them; the counts of what each side left out."""
    ti_keep = {t for t, m in pairs if m in keep}
    ti = [i for i, t in enumerate(text_ids) if t in ti_keep]
    mi = [j for j, m in enumerate(media_ids) if m in keep]
    if not ti or not mi:
        raise StageFailed(f"fusion.retrieval: split {split!r}: {len(mi)} of the files' {len(media_ids)} "
                          f"media ids and {len(ti)} of their {len(text_ids)} text ids are in it")
    return ti, mi, {f"texts_outside_{split}": len(text_ids) - len(ti),
                    f"media_outside_{split}": len(media_ids) - len(mi)}


def _hf_dual(media_dir: Path, params: RetrievalParams, log: Any) -> tuple[list, list, list, Any, dict]:
    """Caption and image vectors of a Hugging Face dual encoder over the media artifact's items
    (its split) and the raw images of the dataset it was built from."""
    import pyarrow.parquet as pq
    import torch

    from fusion.pairs import load_pairs
    from fusion.retrieval.external import FormatError
    from fusion.retrieval.hf import HFDualEncoder, open_images
    from fusion.retrieval.metrics import Scores
    from pipeline.datasets import build_dataset

    device = "cuda" if params.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    enc = HFDualEncoder(params.hf_model, device, params.max_length, params.encode_batch_size)
    bank, caps, counts = load_pairs(media_dir, params.split, 0.0, 0, 1, params.limit)
    if not len(bank) or not caps.ids:
        hint = (" (a model from elsewhere has no held-out split: use split 'all', or a dataset with its "
                "own split)" if params.split != "all" else "")
        raise StageFailed(f"fusion.retrieval: nothing to evaluate in split {params.split!r} of {media_dir}: "
                          f"{len(bank)} media items, {len(caps.ids)} captions{hint}")
    spec = json.loads((media_dir / "manifest.json").read_text()).get("params", {}).get("dataset")
    try:
        dataset = build_dataset(spec)
    except Exception as e:  # noqa: BLE001 - any dataset error: the images cannot be read
        raise FormatError(f"hf_model: the images of {media_dir.name} cannot be read: its dataset {spec!r} "
                          f"does not open ({str(e).splitlines()[0] if str(e) else e!r})") from None
    items = pq.read_table(media_dir / "items.parquet", columns=["id", "media"])
    ref = dict(zip(items["id"].to_pylist(), items["media"].to_pylist()))
    log.info("hf_model %s: %d captions, %d images", params.hf_model, len(caps.ids), len(bank))
    text = enc.encode_texts(caps.texts)
    media = torch.cat([enc.encode_images(open_images(dataset, [ref[i] for i in bank.ids[s:s + 256]]))
                       for s in range(0, len(bank), 256)])
    check_finite(text, caps.ids, "caption", f"hf_model {Path(params.hf_model).name}")
    check_finite(media, bank.ids, "media", f"hf_model {Path(params.hf_model).name}")
    # exp(logit_scale) on one side: the scores are the model's own logits_per_text
    return list(caps.ids), list(caps.texts), list(bank.ids), Scores.dual(text * enc.scale, media), counts


def _evaluate_hf_cross(media_dir: Path | None, out: Path, params: RetrievalParams,
                       first_stage_dir: Path | None, log: Any,
                       progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """A Hugging Face cross-encoder (LXMERT, VisualBERT; :class:`~fusion.retrieval.hf.HFCrossEncoder`)
    over the media artifact's region features: ``all_pairs``, or ``rerank`` of the top ``k`` of a
    first stage (precomputed ``text_vectors`` + ``media_vectors``, or the ``first_stage`` input)."""
    import torch

    from fusion.pretrain.loop import load_pretrained
    from fusion.retrieval import external as ext
    from fusion.retrieval.hf import cross_setup
    from fusion.retrieval.metrics import Relevance, Scores, evaluate_scores

    if media_dir is None:
        raise StageFailed("fusion.retrieval: give input role 'media' (--media): a cross-encoder reads its "
                          "region features")
    if params.mode == "rerank" and params.text_vectors is None and first_stage_dir is None:
        raise StageFailed("fusion.retrieval: rerank needs a first stage for the cross-encoder: "
                          "text_vectors + media_vectors, or the first_stage input (or use mode all_pairs)")
    device = "cuda" if params.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    settings = ScoreSettings(split=params.split, limit=params.limit, max_length=params.max_length,
                             encode_batch_size=params.encode_batch_size, batch_size=params.batch_size)
    build = functools.partial(cross_setup, str(params.hf_model), media_dir, settings)
    corpus, scorer = build(device)
    bank, caps, counts = corpus.bank, corpus.captions, corpus.counts
    T, M = len(caps.ids), len(bank)
    if T == 0 or M == 0:
        hint = (" (a model from elsewhere has no held-out split: use split 'all', or a dataset with its "
                "own split)" if params.split != "all" else "")
        raise StageFailed(f"fusion.retrieval: nothing to evaluate in split {params.split!r} of {media_dir}: "
                          f"{M} media items, {T} captions{hint}")
    relevance = Relevance.from_ids(caps.ids, bank.ids,
                                   [(c, bank.ids[m]) for c, m in zip(caps.ids, caps.media)])
    name = f"hf_model {Path(params.hf_model).name}"
    t0 = time.perf_counter()
    first_scores, first_label = None, "none (all pairs)"
    if params.text_vectors is not None:
        tv, mv = ext.load_vector_pair(params.text_vectors, params.media_vectors)
        rows = []
        for vec, want, what in ((tv, caps.ids, "caption"), (mv, bank.ids, "media")):
            at = {i: k for k, i in enumerate(vec.ids)}
            gone = [i for i in want if i not in at]
            if gone:
                raise StageFailed(f"fusion.retrieval: {vec.path}: ids: no vector for {len(gone)} {what} "
                                  f"id(s) of {media_dir.name}, e.g. {gone[0]!r}")
            rows.append(vec.vectors[[at[i] for i in want]])
        first_scores = rows[0] @ rows[1].T                                  # (T, M)
        first_label = f"text_vectors {Path(tv.path).name}, media_vectors {Path(mv.path).name}"
    elif first_stage_dir is not None:
        _, _, fs_backbone, fs_model, fs_meta = load_pretrained(first_stage_dir)
        fs = Scorer(fs_model, fs_backbone.tokenizer, params.max_length or fs_meta.get("max_length", 64),
                    device, params.encode_batch_size)
        text_vec, media_vec = fs.vectors(caps, bank)
        first_scores, first_label = text_vec @ media_vec.T, "first_stage input"
    timing: dict[str, Any] = {"first_stage_s": time.perf_counter() - t0}
    t2m, m2t, pairs, timing["cross_s"] = _cross_scores(
        first_scores, params, lambda ti, mi: _score_pairs(scorer, build, params, device, ti, mi, corpus,
                                                          progress), (T, M))
    final = evaluate_scores(Scores.dense(t2m, m2t), relevance, top=params.top)
    first = evaluate_scores(Scores.dense(first_scores), relevance) if first_scores is not None else final
    timing["total_s"] = time.perf_counter() - t0
    timing["pairs_scored"], timing["pairs_per_s"] = pairs, pairs / max(timing["cross_s"], 1e-9)
    result: dict[str, Any] = {**_mode_fields(params),
                              "first_stage": first_label, "model": name, "split": params.split,
                              "queries": {}, "counts": {**counts, "captions": T, "media": M,
                                                        "pairs_total": T * M}, "timing": timing}
    return _finish(out, params, result, final, first, Scores.dense(t2m, m2t), relevance,
                   Listing.of(caps, bank), media_dir, log)


def _score_pairs(scorer: Scorer, build: Callable[[str], tuple[Corpus, Scorer]], params: RetrievalParams,
                 device: str, ti: np.ndarray, mi: np.ndarray, corpus: Corpus,
                 progress: Callable[[str, int, int], None] | None) -> np.ndarray:
    """Cross-encoder scores of the pairs ``(ti[j], mi[j])``: in this process with ``scorer``
    (``workers: 1``), else on ``workers`` Ray actors that each rebuild the corpus and the model with
    ``build(device)``, the call that made ``corpus`` and ``scorer`` here."""
    report = (lambda done, total: progress("pairs", done, total)) if progress else None
    if params.workers == 1:
        states = scorer.states(corpus.captions, corpus.bank)
        return scorer.cross(*states, ti, mi, report)
    import os

    import ray

    worker = score_worker_cls()
    threads = max(1, (os.cpu_count() or 1) // params.workers)
    actors = [worker.options(num_cpus=1 if params.gpus_per_worker == 0 else 0,
                             num_gpus=params.gpus_per_worker).remote(build, threads, device)
              for _ in range(params.workers)]
    # Many small shards, handed out as actors free up: balanced when pair lengths differ.
    shards = batches(len(ti), params.batch_size * 8)
    out = np.empty(len(ti), dtype=np.float32)
    pending: dict[Any, slice] = {}
    queue = list(shards)
    idle = list(actors)
    done = 0
    try:
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
    finally:  # a failed actor must not leave the others holding their CPUs / GPUs in the cluster
        for a in actors:
            ray.kill(a)
    return out
