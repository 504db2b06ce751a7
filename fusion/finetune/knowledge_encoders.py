"""Span encoders for ``fusion.finetune`` of the knowledge encoders added after the first three
(registered through the ``stele.span_encoders`` entry-point group, as a plugin's would be):

* ``kepler``, ``kgbert``: the shared text encoder's last hidden states (their knowledge is in the
  weights; the relation table and the triple heads are not used). ``libert`` fine-tunes as ``mlm``
  (:func:`fusion.finetune.encoders.span_encoder_for` finds its base recipe's).
* ``knowbert``: the layers above KnowBERT's knowledge attention and recontextualisation, which
  reads every linked mention with its candidates from the KG's alias table (the linker chooses).
* ``sensebert``: the encoder over SenseBERT's input, each word's wordpieces plus its allowed
  supersenses' embeddings (the lexicon rebuilt from the ``kg`` input, as in pretraining).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fusion.finetune.encoders import (BertSpanEncoder, EncoderSource, SpanEncoder, _pretrained,
                                      _recipe_options, entity_table, span_encoder)
from fusion.finetune.tasks import TaskExample


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

    model = _pretrained(src, {})
    e = src.kg.entities
    lexicon, _ = SenseLexicon.from_synsets(([n, *(a or [])], t or []) for n, a, t in zip(
        e["name"].to_pylist(), e["aliases"].to_pylist(), e["types"].to_pylist()))
    return SenseBertSpanEncoder(model, src.backbone.tokenizer, src.max_length, lexicon)
