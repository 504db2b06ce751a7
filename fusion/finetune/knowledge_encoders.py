"""Span encoders for ``fusion.finetune`` of the knowledge encoders added after the first three
(registered through the ``stele.span_encoders`` entry-point group, as a plugin's would be):

* ``kepler``, ``kgbert``: the shared text encoder's last hidden states (their knowledge is in the
  weights; the relation table and the triple heads are not used). ``libert`` fine-tunes as ``mlm``
  (:func:`fusion.finetune.encoders.span_encoder_for` finds its base recipe's).
* ``knowbert``: the layers above KnowBERT's knowledge attention and recontextualisation, which
  reads every linked mention with its candidates from the KG's alias table (the linker chooses).
* ``sensebert``: the encoder over SenseBERT's input, each word's wordpieces plus its allowed
  supersenses' embeddings (the lexicon rebuilt from the ``kg`` input, as in pretraining).
* ``sentilr``: the encoder over SentiLR's input, ``W x + E_P p + E_Q q + E_L l`` with each word's
  heuristic POS ``p`` and polarity ``q`` from the lexicon copy in the pretraining artifact and the
  sentence polarity ``l`` *unknown* (:class:`SentiLrSpanEncoder` says why). ``wklm`` fine-tunes as
  ``mlm``, as ``libert``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fusion.finetune.encoders import (BertSpanEncoder, EncoderSource, SpanEncoder, _pretrained,
                                      _recipe_options, entity_table, span_encoder)
from fusion.finetune.examples import TaskExample
from pipeline import StageFailed


class KnowBertSpanEncoder(SpanEncoder):
    """KnowBERT's top layer after its KAR, which reads every linked mention of the document with its
    candidates from the KG's alias table, as in pretraining
    (:class:`fusion.pretrain.knowbert_recipe.CandidateTable`); the linker chooses, no gold is given.
    The entity table is a buffer (frozen); the MLM head's own parts are not used and stay frozen (its
    decoder is the word-embedding matrix, which stays trainable)."""

    recipe = "knowbert"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, table: Any) -> None:
        super().__init__(model, tokenizer, max_length, model.config.hidden_size)
        self.table = table

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        from collections import Counter

        from fusion.models.knowbert import collate, encode_text
        from fusion.pretrain.knowbert_recipe import doc_mentions

        counts: Counter = Counter()
        rows = [vars(encode_text(ex.text, doc_mentions(ex.text, ex.mentions, self.table, counts),
                                 self.tokenizer, self.max_length)) for ex in examples]
        batch = collate(rows, self.tokenizer.pad_token_id)
        spans = self._tokenize(examples)  # the same tokenisation, with offsets, for the spans
        keys = ("input_ids", "attention_mask", "span_start", "span_end", "candidates", "priors")
        return {**{k: batch[k] for k in keys}, "span_index": spans["span_index"]}

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["attention_mask"], batch["span_start"],
                           batch["span_end"], batch["candidates"], batch["priors"]).hidden  # (B, L, D)

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        from collections import Counter

        from fusion.pretrain.knowbert_recipe import doc_mentions

        counts: Counter = Counter()
        for ex in {ex.doc_id: ex for ex in examples}.values():      # once per document
            doc_mentions(ex.text, ex.mentions, self.table, counts)
        return {f"knowbert_{k}": counts[k] for k in
                ("mentions", "mentions_without_candidates", "candidates_without_vector")}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(train_encoder)
        for part in (self.module.mlm.dense, self.module.mlm.norm):   # not mlm itself: its decoder
            part.requires_grad_(False)                               # is the tied word embeddings
        self.module.mlm.bias.requires_grad_(False)


class SenseBertSpanEncoder(SpanEncoder):
    """SenseBERT's encoder on its own input: wordpieces plus the allowed supersenses of each word
    (:func:`fusion.models.sensebert.piece_senses`), as it pretrained. Its heads stay frozen."""

    recipe = "sensebert"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, lexicon: Any) -> None:
        super().__init__(model, tokenizer, max_length, model.encoder.config.hidden_size)
        self.lexicon = lexicon

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        import torch

        from fusion.models.sensebert import piece_senses

        batch = self._tokenize(examples)
        enc = self.tokenizer([ex.text for ex in examples], truncation=True, max_length=self.max_length,
                             padding=True)
        batch["senses"] = torch.tensor([piece_senses(enc, b, ex.text, self.lexicon)[1]
                                        for b, ex in enumerate(examples)], dtype=torch.long)
        return batch

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["attention_mask"], batch["senses"])  # (B, L, D)

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        from collections import Counter

        from fusion.models.sensebert import piece_senses

        counts: Counter = Counter()
        for ex in {ex.doc_id: ex for ex in examples}.values():        # once per document
            enc = self.tokenizer([ex.text], truncation=True, max_length=self.max_length)
            piece_senses(enc, 0, ex.text, self.lexicon, counts)
        return {f"sensebert_{k}": v for k, v in sorted(counts.items())}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(False)
        self.module.encoder.requires_grad_(train_encoder)
        self.module.sense_embeddings.requires_grad_(train_encoder)


class SentiLrSpanEncoder(SpanEncoder):
    """SentiLR's encoder on its own input (Ke et al. 2020; :mod:`fusion.models.sentilr`)::

        v_i = W x_i + E_P p_i + E_Q q_i + E_L[unknown]         (B, L, D), then the BERT layers

    ``p`` and ``q`` come from :func:`~fusion.models.sentilr.encode_sentilr` with the recipe's own
    tagger (:func:`~fusion.models.sentilr.heuristic_pos`) and the lexicon pretraining read, the
    copy its artifact keeps (:func:`fusion.pretrain.extra_recipes.pretrained_lexicon`; its options'
    ``polarity_threshold``), so each word reads as it did in pretraining; special tokens and
    padding take the *unknown* rows, as in the recipe's collate.

    The sentence polarity ``l`` is *unknown*: in the paper it is the label of a downstream
    sentiment task, so fine-tuning never shows it; here the recipe's label is a distant one, the
    sign of the summed word valences, which ``q`` already carries; and the late-supervision rows
    of pretraining read ``l`` unknown, so the encoder knows that input. The heads (word, POS,
    polarity, sentence) and ``E_L`` stay frozen; ``E_P``, ``E_Q`` and the encoder train."""

    recipe = "sentilr"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, lexicon: Any) -> None:
        super().__init__(model, tokenizer, max_length, model.encoder.config.hidden_size)
        self.lexicon = lexicon

    def _rows(self, examples: Sequence[TaskExample]) -> list[Any]:
        from fusion.models.sentilr import encode_sentilr

        return [encode_sentilr(ex.text, self.tokenizer, self.max_length, self.lexicon) for ex in examples]

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        import torch

        from fusion.models.sentilr import POLARITY_UNKNOWN, POS_UNKNOWN

        batch = self._tokenize(examples)  # the same tokenisation, padded, with the span positions
        B, L = batch["input_ids"].shape
        pos = torch.full((B, L), POS_UNKNOWN, dtype=torch.long)                      # (B, L)
        polarity = torch.full((B, L), POLARITY_UNKNOWN, dtype=torch.long)            # (B, L)
        for b, row in enumerate(self._rows(examples)):
            n = len(row.input_ids)
            if row.input_ids != batch["input_ids"][b, :n].tolist():  # one tokenizer, one max_length
                raise RuntimeError(f"sentilr: example {examples[b].id!r} tokenised two ways")
            pos[b, :n], polarity[b, :n] = torch.tensor(row.pos), torch.tensor(row.polarity)
        return {**batch, "pos": pos, "polarity": polarity}

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["attention_mask"], batch["pos"],
                           batch["polarity"])  # sentence polarity unknown; (B, L, D)

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        from collections import Counter

        counts: Counter = Counter()
        for row in self._rows(list({ex.doc_id: ex for ex in examples}.values())):  # once per document
            counts.update(row.counts)
        known = ("positive", "negative", "neutral")                      # in the lexicon
        return {"sentilr_words_in_lexicon": sum(counts[f"words_{k}"] for k in known),
                **{f"sentilr_words_{k}": counts[f"words_{k}"] for k in (*known, "not_in_lexicon")}}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(False)
        for part in (self.module.encoder, self.module.pos_embeddings, self.module.polarity_embeddings):
            part.requires_grad_(train_encoder)


@span_encoder("knowbert")
def _knowbert(src: EncoderSource) -> SpanEncoder:
    from fusion.pretrain.knowbert_recipe import CandidateTable

    table, rows = entity_table(src.entities, src.path)
    model = _pretrained(src, {"entity_table": table})
    options = _recipe_options(src)
    candidates = CandidateTable.from_graph(src.kg, rows, options.max_candidates, options.prior)
    return KnowBertSpanEncoder(model, src.backbone.tokenizer, src.max_length, candidates)


def _num_relations(src: EncoderSource) -> dict[str, Any]:
    meta = json.loads((src.path / "recipe.json").read_text())
    return {"num_relations": meta["resources_meta"]["num_relations"]}


@span_encoder("kepler")
def _kepler(src: EncoderSource) -> SpanEncoder:
    model = _pretrained(src, _num_relations(src))
    return BertSpanEncoder(model.encoder, src.backbone.tokenizer, src.max_length, "kepler")


@span_encoder("kgbert")
def _kgbert(src: EncoderSource) -> SpanEncoder:
    model = _pretrained(src, _num_relations(src))
    return BertSpanEncoder(model.encoder, src.backbone.tokenizer, src.max_length, "kgbert")


@span_encoder("sensebert")
def _sensebert(src: EncoderSource) -> SpanEncoder:
    from fusion.models.sensebert import SenseLexicon
    from fusion.pretrain.lexical_recipes import synset_rows_of

    model = _pretrained(src, {})
    lexicon, _ = SenseLexicon.from_synsets(synset_rows_of(src.kg.entities))
    return SenseBertSpanEncoder(model, src.backbone.tokenizer, src.max_length, lexicon)


@span_encoder("sentilr")
def _sentilr(src: EncoderSource) -> SpanEncoder:
    from fusion.pretrain.extra_recipes import pretrained_lexicon

    try:   # the lexicon its pretraining read: the copy in its artifact (older ones: its options' file)
        lexicon = pretrained_lexicon(src.path, _recipe_options(src))
    except StageFailed as e:
        raise StageFailed(f"fusion.finetune: {e} (the pretraining's options: {src.options})") from None
    return SentiLrSpanEncoder(_pretrained(src, {}), src.backbone.tokenizer, src.max_length, lexicon)
