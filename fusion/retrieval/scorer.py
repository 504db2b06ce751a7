"""Scoring for cross-modal retrieval: a pretrained model's scores over (query, item) pairs.

A cross-encoder's single-modality layers do not depend on the pair: captions and media are encoded
once (the model's ``text_states`` / ``media_states``) and only the fusion layers run per pair
(``score_states``), in batches of ``batch_size`` pairs, on Ray actors (:func:`score_worker_cls`,
GPUs with ``gpus_per_worker``) or in the caller's own process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import StageFailed

DIRECTIONS = ("text_to_media", "media_to_text")


# ----------------------------------------------------------------------------------- scoring
def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _gather(states: dict[str, Any], idx: Any) -> dict[str, Any]:
    """Rows ``idx`` of padded states, trimmed to the longest real sequence among them (states are
    kept padded to the corpus maximum; padding beyond it only costs time)."""
    out = {k: v[idx] for k, v in states.items()}
    n = int(out["mask"].sum(1).max()) if len(out["mask"]) else 0
    return {k: v[:, :max(n, 1)] for k, v in out.items()}


def _pad_cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-batch states along the batch, padding dim 1 to the largest."""
    import torch

    width = max(p["mask"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
        padded = []
        for p in parts:
            v = p[key]
            if v.shape[1] < width:
                v = torch.cat([v, v.new_zeros((v.shape[0], width - v.shape[1], *v.shape[2:]))], 1)
            padded.append(v)
        out[key] = torch.cat(padded)
    return out


class Scorer:
    """One model on one device: first-stage vectors, cached single-stream states, pair scores."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, device: str = "cpu",
                 encode_batch_size: int = 128, batch_size: int = 256):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.max_length = tokenizer, max_length
        self.encode_bs, self.pair_bs = encode_batch_size, batch_size
        self.cross_encoder = hasattr(model, "score_states") and getattr(model, "has_match_head", True)

    def _autocast(self):  # noqa: ANN202
        import contextlib

        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _queries(self, queries: Any, rows: slice) -> dict[str, Any]:
        """A batch of queries ``rows``: tokenised captions, or media queries' regions."""
        if queries.bank is not None:
            b = queries.bank.batch(list(range(len(queries.ids))[rows]))
            return {"query_features": b["features"].to(self.device),
                    "query_boxes": b["boxes"].to(self.device),
                    "query_mask": b["region_mask"].to(self.device)}
        enc = self.tokenizer(queries.texts[rows], truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def _media(self, bank: Any, idx: Sequence[int]) -> dict[str, Any]:
        return {k: v.to(self.device) for k, v in bank.batch(list(idx)).items()}

    def vectors(self, queries: Any, bank: Any) -> tuple[Any, Any]:
        """The first stage's vectors: queries (T, D) and media (M, D), float32 on the CPU."""
        import torch

        with torch.inference_mode(), self._autocast():
            t = torch.cat([self.model.encode_text(self._queries(queries, s)).float()
                           for s in batches(len(queries.ids), self.encode_bs)])
            m = torch.cat([self.model.encode_media(self._media(bank, range(len(bank))[s])).float()
                           for s in batches(len(bank), self.encode_bs)])
        t, m = t.cpu(), m.cpu()
        check_finite(t, queries.ids, "caption", type(self.model).__name__)
        check_finite(m, bank.ids, "media", type(self.model).__name__)
        return t, m

    def first_stage(self, queries: Any, bank: Any) -> Any:
        """(T, M) dual-encoder scores, float32 on the CPU."""
        t, m = self.vectors(queries, bank)
        return t @ m.T

    def states(self, queries: Any, bank: Any) -> tuple[dict, dict]:
        import torch

        if not self.cross_encoder:
            raise ValueError(f"{type(self.model).__name__} has no cross-encoder score (a dual "
                             f"encoder): use mode 'dual'")
        with torch.inference_mode(), self._autocast():
            t = _pad_cat([self.model.text_states(self._queries(queries, s))
                          for s in batches(len(queries.ids), self.encode_bs)])
            m = _pad_cat([self.model.media_states(self._media(bank, range(len(bank))[s]))
                          for s in batches(len(bank), self.encode_bs)])
        return t, m

    def cross(self, text_states: dict, media_states: dict, ti: np.ndarray, mi: np.ndarray,
              progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Cross-encoder scores of the pairs ``(ti[j], mi[j])``, float32."""
        import torch

        out = np.empty(len(ti), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for s in batches(len(ti), self.pair_bs):
                t = _gather(text_states, torch.as_tensor(ti[s], device=self.device))
                m = _gather(media_states, torch.as_tensor(mi[s], device=self.device))
                out[s] = self.model.score_states(t, m).float().cpu().numpy()
                if progress is not None:
                    progress(s.stop, len(ti))
        return out


def check_finite(vectors: Any, ids: Sequence[str], what: str, source: str) -> None:
    """Refuse (N, D) vectors with a NaN or infinite value: a NaN score compares False with every
    other, so ranking by it would put the query's correct item first and inflate recall."""
    import torch

    bad = ~torch.isfinite(vectors).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise StageFailed(f"fusion.retrieval: {source}: {int(bad.sum())} of {len(ids)} {what} vectors are "
                          f"not finite (the first: {ids[i]!r}); ranks from them would be meaningless. A "
                          f"diverged checkpoint? Check the model's training losses")


@dataclass
class Corpus:
    """The media of one split and their captions (see :func:`fusion.pairs.load_pairs`)."""

    bank: Any
    captions: Any
    counts: dict[str, Any]


def score_worker_cls():  # noqa: ANN202
    import ray

    @ray.remote
    class ScoreWorker:
        """One model replica: rebuilds the corpus and its states itself with ``build(device)``
        (:func:`setup` for a stele model, :func:`fusion.retrieval.hf.cross_setup` for a Hugging Face
        one: the same call as the stage's, so pair indices agree), then scores pair shards."""

        def __init__(self, build: Callable[[str], tuple[Corpus, Scorer]], threads: int,
                     device: str) -> None:
            import torch

            torch.set_num_threads(threads)
            corpus, self.scorer = build(device)
            self.states = self.scorer.states(corpus.captions, corpus.bank)

        def score(self, ti: np.ndarray, mi: np.ndarray) -> np.ndarray:
            return self.scorer.cross(*self.states, ti, mi)

    return ScoreWorker


@dataclass(frozen=True)
class ScoreSettings:
    """What :func:`setup` needs of the stage's parameters; the same in the stage and its actors."""

    split: str                 # train | val | test | all: the dataset's own split where the items
                               # carry one, else the model's hash split (fusion.pairs)
    limit: int | None          # only the first N media items
    max_length: int | None     # None: the model's pretraining max_length
    encode_batch_size: int
    batch_size: int            # pairs per cross-encoder batch
    model_options: dict[str, Any] = field(default_factory=dict)  # evaluation-time switches


def setup(model_dir: Path, media_dir: Path, settings: ScoreSettings, device: str,
           queries_dir: Path | None = None) -> tuple[Corpus, Scorer]:
    from fusion.pairs import load_media_pairs, load_pairs, split_source_for
    from fusion.pretrain.loop import load_pretrained

    rec, options, backbone, model, meta = load_pretrained(model_dir)
    apply_model_options(model, settings.model_options, meta["recipe"])
    share = getattr(options, "held_out_share", 0.0)
    seed = getattr(options, "split_seed", 0)
    max_regions = getattr(options, "max_regions", None)
    source = split_source_for(model_dir, meta, media_dir)  # never test what the model trained on
    if "query_media" in rec.needs:
        if queries_dir is None:
            raise StageFailed(f"the {meta['recipe']} model searches with media queries: give the "
                              f"query items' feature artifact (input role 'queries', --queries)")
        bank, caps, counts = load_media_pairs(queries_dir, media_dir, settings.split, share, seed,
                                              options.key, max_regions, settings.limit, source)
    else:
        bank, caps, counts = load_pairs(media_dir, settings.split, share, seed, max_regions,
                                        settings.limit, source)
    check_dims(model_dir, meta, bank, caps, media_dir, queries_dir)
    scorer = Scorer(model, backbone.tokenizer, settings.max_length or meta.get("max_length", 64),
                    device, settings.encode_batch_size, settings.batch_size)
    return Corpus(bank, caps, {**counts, "held_out_share": share, "split_seed": seed}), scorer


def apply_model_options(model: Any, options: dict[str, Any], recipe: str) -> None:
    """Set a loaded model's evaluation-time switches (``model_options``): only the attributes its
    ``eval_switches`` names (kg_dual: ``entity_input``); any other name is a clear error."""
    allowed = tuple(getattr(model, "eval_switches", ()))
    for name, value in options.items():
        if name not in allowed:
            raise StageFailed(f"model_options: {name!r} is not a switch of the {recipe} model (its "
                              f"switches: {', '.join(allowed) or 'none'})")
        setattr(model, name, value)


def check_dims(model_dir: Path, meta: dict, bank: Any, caps: Any, media_dir: Path,
                queries_dir: Path | None) -> None:
    """The features the model was trained on (``recipe.json``) against the artifacts given: their
    width, then the settings they were made with (:func:`fusion.compat.check_feature_settings`:
    backbone, weights, mode, grid, global token; sample rate and frame layout for audio). Each
    mismatch is a one-line :class:`~pipeline.StageFailed` naming both sides."""
    from fusion.compat import check_feature_settings

    res = meta.get("resources_meta", {})
    for what, want, have, path in (("media", res.get("feature_dim"), bank, media_dir),
                                   ("query", res.get("query_feature_dim"), caps.bank, queries_dir)):
        if want is not None and have is not None and len(have) and have.dim != want:
            raise StageFailed(f"mismatched feature dimensions: model {model_dir.name} was trained on "
                              f"{want}-d {what} features, artifact {path.name} has {have.dim}-d")
    for role, path in (("media", media_dir), ("query_media", queries_dir)):
        if path is not None:
            try:
                check_feature_settings(Path(model_dir), meta, role, Path(path))
            except ValueError as e:
                raise StageFailed(str(e)) from None
