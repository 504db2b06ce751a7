"""SpeechBERT's pretraining recipe and its spoken cloze.

- ``speechbert``: :class:`fusion.models.speechbert.SpeechBert` (Chuang et al. 2020) on the spoken
  clips of one ``speech.features`` artifact (``media`` input) and their transcripts, the same data,
  split and batches as every media recipe (:class:`fusion.pretrain.media_recipes.MediaRecipe`):
  MLM on the text, masked acoustic modelling on the audio tokens (frames pooled into fixed-length
  segments), a matching head and, unless ``options.config`` says otherwise, the in-batch InfoNCE of
  the single-stream recipes (:data:`fusion.pretrain.single_stream_recipes.DEFAULTS`), so that
  ``fusion.retrieval`` scores it like any single-stream model: ``dual`` from its own vectors,
  ``all_pairs`` / ``rerank`` from the matching head. Embeddings and layers start from the text
  backbone.

**Spoken cloze** (:func:`spoken_cloze`, :func:`evaluate_cloze`). For every transcript of the evaluated
clips and every word in it, one query: the word's wordpieces all replaced by ``[MASK]``, the model
reads the masked text with the clip, and the word counts as filled when the MLM head's argmax is
the right piece at each of its positions. The same queries are run with the clip's audio as it
is (``audio``), with every frame zeroed (``zeros``: what the model sees where masked acoustic
modelling masks, so no audio at all) and with another clip's audio (``other``: clip ``i + 1`` of the
evaluated ones, a mismatched recording). ``audio_gain = accuracy_audio - accuracy_zeros`` is the
figure that says whether the model uses the audio: a text-only model scores the same in every
mode. Words of no letter or digit, whose pieces include the unknown token, or cut by
``max_length``, are not asked, and are counted under why. Any single-stream model with an MLM head
can be asked (e.g. VisualBERT trained on speech features), not SpeechBERT only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import field_validator

from pipeline import StageFailed

from fusion.models.backbone import TextBackbone
from fusion.pretrain.loop import recipe
from fusion.pretrain.media_recipes import MediaOptions, MediaRecipe, _check_fields
from fusion.pretrain.single_stream_recipes import DEFAULTS, FIXED

AUDIO_MODES = ("audio", "zeros", "other")


class SpeechBertOptions(MediaOptions):
    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fusion.models.speechbert import SpeechBertConfig

        return _check_fields(v, SpeechBertConfig, FIXED | {"region_input", "early_fusion"})


@recipe("speechbert")
class SpeechBertRecipe(MediaRecipe):
    """SpeechBERT over the backbone and a speech feature artifact's frames (module docstring)."""

    Options = SpeechBertOptions

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: SpeechBertOptions) -> Any:
        from fusion.models.speechbert import speechbert_backbone

        return speechbert_backbone(backbone, **(DEFAULTS | options.config | {
            "visual_feat_dim": resources["feature_dim"], "global_token": resources["global_token"]}))


# ------------------------------------------------------------------------------------ spoken cloze
@dataclass
class ClozeQueries:
    """One query per asked word: ``item`` (the clip's row in the bank), ``input_ids`` (the text with
    the word's pieces masked), ``positions`` and ``targets`` (the pieces' positions and true ids),
    ``words`` (the word, for reading), and the counts of words not asked."""

    item: list[int] = field(default_factory=list)
    input_ids: list[list[int]] = field(default_factory=list)
    positions: list[list[int]] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.item)


def cloze_queries(tokenizer: Any, texts: list[str], items: list[int], max_length: int) -> ClozeQueries:
    """The cloze queries of ``texts`` (``items[i]`` the clip of text ``i``): every word of each text,
    one at a time (module docstring). Needs a fast tokenizer (its ``word_ids``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the spoken cloze needs a fast tokenizer (word_ids)")
    mask_id, unk_id = tokenizer.mask_token_id, tokenizer.unk_token_id
    cut = tokenizer(texts, truncation=True, max_length=max_length)
    full = tokenizer(texts)
    q = ClozeQueries()
    for t, (text, item) in enumerate(zip(texts, items)):
        ids, spans = cut["input_ids"][t], _pieces(cut.word_ids(t))
        whole = _pieces(full.word_ids(t))
        q.counts["texts"] += 1
        for w, pos in whole.items():
            a, b = full.word_to_chars(t, w)
            word = text[a:b]
            targets = [ids[p] for p in spans.get(w, [])]
            why = ("words_cut_by_max_length" if len(spans.get(w, [])) != len(pos)
                   else "words_without_letters" if not any(c.isalnum() for c in word)
                   else "words_unknown_to_tokenizer" if unk_id in targets else None)
            if why:
                q.counts[why] += 1
                continue
            masked = list(ids)
            for p in spans[w]:
                masked[p] = mask_id
            q.item.append(item)
            q.input_ids.append(masked)
            q.positions.append(spans[w])
            q.targets.append(targets)
            q.words.append(word)
    q.counts["queries"] = len(q)
    return q


def _pieces(word_ids: list[int | None]) -> dict[int, list[int]]:
    """Word index -> the positions of its pieces (special tokens have none)."""
    out: dict[int, list[int]] = {}
    for pos, w in enumerate(word_ids):
        if w is not None:
            out.setdefault(w, []).append(pos)
    return out


def word_hits(logits: torch.Tensor, positions: list[list[int]], targets: list[list[int]]) -> np.ndarray:
    """(N,) bool: query ``n``'s word is filled when ``argmax logits[n, p]`` is its true piece at every
    one of its positions ``p`` (``logits`` (N, L, V))."""
    best = logits.argmax(-1).cpu()                                                   # (N, L)
    return np.array([all(int(best[n, p]) == y for p, y in zip(pos, tgt))
                     for n, (pos, tgt) in enumerate(zip(positions, targets))], dtype=bool)


@torch.no_grad()
def spoken_cloze(model: Any, tokenizer: Any, bank: Any, texts: list[str], items: list[int], max_length: int,
                 batch_size: int = 64, modes: tuple[str, ...] = AUDIO_MODES,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """Cloze accuracy of ``model`` per audio mode (module docstring) over ``texts`` and the clips
    ``items`` of ``bank`` (a :class:`fusion.pairs.MediaBank`: ``batch(index)`` gives frames).
    ``model(ids, attention_mask, features, boxes, region_mask).text`` (B, L, D) and
    ``model.mlm_head`` are all it uses. Returns ``accuracy_<mode>``, ``audio_gain``, the query
    counts, and ``per_word``: each asked word's hits per mode (for reading, not a metric)."""
    unknown = sorted(set(modes) - set(AUDIO_MODES))
    if unknown:
        raise ValueError(f"unknown audio mode(s) {unknown}; known: {AUDIO_MODES}")
    if not hasattr(model, "mlm_head"):
        raise ValueError(f"{type(model).__name__} has no MLM head: the spoken cloze needs one")
    if "other" in modes and len(bank) < 2:
        modes = tuple(m for m in modes if m != "other")   # one clip has no other clip to swap in
    q = cloze_queries(tokenizer, texts, items, max_length)
    model = model.to(device).eval()
    pad = tokenizer.pad_token_id or 0
    out: dict[str, Any] = {**q.counts, "modes": list(modes)}
    hits: dict[str, np.ndarray] = {}
    for mode in modes:
        got = []
        for s in range(0, len(q), batch_size):
            rows = range(s, min(s + batch_size, len(q)))
            L = max(len(q.input_ids[r]) for r in rows)
            ids = torch.full((len(rows), L), pad, dtype=torch.long)
            attn = torch.zeros(len(rows), L, dtype=torch.long)
            for k, r in enumerate(rows):
                ids[k, :len(q.input_ids[r])] = torch.tensor(q.input_ids[r])
                attn[k, :len(q.input_ids[r])] = 1
            clips = [(q.item[r] + 1) % len(bank) if mode == "other" else q.item[r] for r in rows]
            media = {k: v.to(device) for k, v in bank.batch(clips).items()}
            if mode == "zeros":
                media["features"] = torch.zeros_like(media["features"])
            h = model(ids.to(device), attn.to(device), media["features"], media["boxes"],
                      media["region_mask"]).text                                   # (B, L, D)
            got.append(word_hits(model.mlm_head(h).float(), [q.positions[r] for r in rows],
                                 [q.targets[r] for r in rows]))
        hits[mode] = np.concatenate(got) if got else np.zeros(0, dtype=bool)
        out[f"accuracy_{mode}"] = float(hits[mode].mean()) if len(q) else None
    if len(q) and "audio" in hits and "zeros" in hits:
        out["audio_gain"] = out["accuracy_audio"] - out["accuracy_zeros"]
    out["per_word"] = [{"word": w, "item": i, **{m: bool(hits[m][n]) for m in hits}}
                       for n, (w, i) in enumerate(zip(q.words, q.item))]
    return out


def evaluate_cloze(model_dir: str | Path, features_dir: str | Path, split: str = "test",
                   limit: int | None = None, batch_size: int = 64, device: str = "cpu",
                   max_length: int | None = None) -> dict[str, Any]:
    """The spoken cloze of a ``fusion.pretrain`` artifact on a ``speech.features`` artifact's clips
    of ``split`` (the model's own held-out split, chosen as ``fusion.retrieval`` chooses it:
    :func:`fusion.retrieval.scorer.setup`), each clip with its transcripts. Returns
    :func:`spoken_cloze`'s result plus the pairs' counts (``split``, ``items``, ...)."""
    from fusion.retrieval.scorer import ScoreSettings, setup

    corpus, scorer = setup(Path(model_dir), Path(features_dir),
                           ScoreSettings(split, limit, max_length, batch_size, batch_size), device)
    from fusion.models.single_stream import SingleStream

    if not isinstance(scorer.model, SingleStream):   # one stream: its text outputs have heard the audio
        raise StageFailed(f"model {Path(model_dir).name} is a {type(scorer.model).__name__}: the spoken "
                          f"cloze needs a single-stream model with an MLM head (speechbert, visualbert, ...)")
    caps = corpus.captions
    result = spoken_cloze(scorer.model, scorer.tokenizer, corpus.bank, caps.texts, caps.media,
                          scorer.max_length, batch_size, device=scorer.device)
    return {"split": split, **corpus.counts, **result}
