"""Span encoders for ``fusion.finetune``: one per ``fusion.pretrain`` recipe.

Registered in :data:`SPAN_ENCODERS`, keyed by the recipe; ``plain`` is a backbone with no pretrain
artifact. Each returns, per example, the vector at the *first wordpiece* of each requested span
(ERNIE aligns entities there too):

* ``plain``/``mlm``: the backbone's last hidden states.
* ``ernie``: :class:`fusion.models.ernie.Ernie`'s K-Encoder output ``w^o``, with every linked mention
  of the document (the span's own entity included: that is ERNIE's point) aligned as entity input.
  The entity table (frozen TransE vectors) comes from the ``entities`` input; only vectors are read,
  so the full table and the pretraining recipe's compact table give the same model. Entities without
  an embedding keep their example: they only lose their vector, and that is counted.
* ``kbert``: :class:`fusion.models.kbert.KBert` over the document's sentence tree, with up to ``k``
  triples per linked mention (the pretraining options' ``k`` and ``splits``). The span's first
  wordpiece is located on the tree's trunk. For relation and triple classification, the triples
  that connect any task pair are not injected (``hide_task_facts``), for word pairs those between
  any synsets of the two words: injecting "beijing capital china" would hand the model the label.
* ``kadapter``: the K-Adapter features ``[h_L ; adapter]`` (Wang et al. 2021). The backbone stays
  frozen as in the paper; the adapter and the head are fine-tuned.
* ``kepler``, ``kgbert``, ``knowbert``, ``sensebert``, ``sentilr``:
  :mod:`fusion.finetune.knowledge_encoders`; ``libert`` and ``wklm`` fine-tune as ``mlm``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion.finetune.examples import Span, TaskExample
from pipeline import StageFailed
from pipeline.registry import Registry

# -------------------------------------------------------------------------------- span encoders
# Plain classes around torch modules (not nn.Module subclasses), so that importing this module, as
# ``stele stages`` does for every stage type, does not import torch.

def _gather(features: Any, index: Any) -> Any:
    """(B, L, F) features at (B, S) positions -> (B, S, F)."""
    import torch

    rows = torch.arange(features.shape[0], device=features.device)[:, None]   # (B, 1)
    return features[rows, index]                                                # (B, S, F)


def _span_positions(offsets: Sequence[Sequence[tuple[int, int]]], spans: Sequence[Sequence[Span]]
                    ) -> list[list[int]]:
    from fusion.models.backbone import first_wordpieces

    out = []
    for off, ss in zip(offsets, spans, strict=True):
        hits = first_wordpieces(off, ss)
        if any(h is None for h in hits):  # fit_length filtered these out: reaching here is a bug
            raise RuntimeError(f"span(s) {ss} have no wordpiece after truncation; the examples "
                               f"must go through fit_length with this tokenizer and max_length")
        out.append(hits)
    return out


class SpanEncoder:
    """Texts with their linked mentions -> one vector per requested span (its first wordpiece).

    ``module`` holds every weight (a torch module); ``collate`` builds a batch on the CPU (it holds
    ``span_index`` (B, S)); calling the encoder on a batch gives (B, S, feature_size).
    ``coverage`` counts, once over the examples, what the encoder could not use (entities without a
    vector, mentions without triples); ``set_trainable`` decides what fine-tuning updates.
    """

    recipe = ""

    def __init__(self, module: Any, tokenizer: Any, max_length: int, feature_size: int) -> None:
        self.module, self.tokenizer = module, tokenizer
        self.max_length, self.feature_size = max_length, int(feature_size)

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        return self._tokenize(examples)

    def token_features(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> Any:
        return _gather(self.token_features(batch), batch["span_index"])          # (B, S, F)

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        return {}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(train_encoder)

    def parameters(self) -> list[Any]:
        """The parameters fine-tuning updates."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def _tokenize(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        import torch

        enc = self.tokenizer([ex.text for ex in examples], truncation=True, max_length=self.max_length,
                             padding=True, return_offsets_mapping=True, return_tensors="pt")
        pos = _span_positions(enc["offset_mapping"].tolist(), [ex.spans for ex in examples])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "span_index": torch.tensor(pos, dtype=torch.long)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(recipe={self.recipe!r}, feature_size={self.feature_size}, "
                f"max_length={self.max_length}, module={type(self.module).__name__})")


class BertSpanEncoder(SpanEncoder):
    """The plain backbone (or the MLM-pretrained one): its last hidden states."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, recipe: str) -> None:
        super().__init__(model, tokenizer, max_length, model.config.hidden_size)
        self.recipe = recipe

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).last_hidden_state  # (B, L, D)


class ErnieSpanEncoder(SpanEncoder):
    """ERNIE's K-Encoder token output ``w^o``, every linked mention of the document aligned as entity
    input on its first wordpiece (:func:`fusion.models.ernie.encode_text`); ``rows``: entity id -> table
    row. The table is a buffer (frozen); the MLM and dEA heads are not used and stay frozen."""

    recipe = "ernie"
    HEADS = ("mlm_transform", "dea_transform", "mlm_bias")

    def __init__(self, model: Any, tokenizer: Any, max_length: int, rows: dict[str, int]) -> None:
        super().__init__(model, tokenizer, max_length, model.config.hidden_size)
        self.rows = rows

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        from fusion.models.ernie import collate, encode_text

        n = self.module.config.num_entities
        encoded = [encode_text(ex.text, [(s, e, self.rows[ent]) for s, e, ent in ex.mentions
                                         if ent in self.rows], self.tokenizer, self.max_length, n)
                   for ex in examples]
        batch = collate(encoded, self.tokenizer.pad_token_id)
        spans = self._tokenize(examples)  # the same tokenisation, with offsets, for the spans
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "entity_idx": batch["entity_idx"], "span_index": spans["span_index"]}

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["attention_mask"], batch["entity_idx"]).hidden

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        docs = {ex.doc_id: ex.mentions for ex in examples}
        ms = [m for mentions in docs.values() for m in mentions]
        missing = sum(m[2] not in self.rows for m in ms)
        return {"ernie_mentions_with_vector": len(ms) - missing,
                "ernie_mentions_without_vector": missing,
                "ernie_spans_without_vector": sum(ent not in self.rows for ex in examples
                                                  for ent in ex.entities)}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(train_encoder)
        for name in self.HEADS:
            getattr(self.module, name).requires_grad_(False)


class KBertSpanEncoder(SpanEncoder):
    """K-BERT over the document's sentence tree; a span's vector sits at its first wordpiece on the
    trunk (the trunk reads [CLS], the text's wordpieces, [SEP], whatever branches lie between). The
    MLM head is not used and stays frozen."""

    recipe = "kbert"

    def __init__(self, model: Any, layer: Any, kg_index: dict[str, int]) -> None:
        super().__init__(model, layer.tokenizer, layer.max_length, model.hidden_size)
        self.layer, self.kg_index = layer, kg_index

    def _trees(self, examples: Sequence[TaskExample]) -> list[Any]:
        return [self.layer(ex.text, [(s, e, self.kg_index[ent]) for s, e, ent in ex.mentions])
                for ex in examples]

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        import torch

        from fusion.models.kbert import collate_trees

        trees = self._trees(examples)
        words = self.tokenizer([ex.text for ex in examples], add_special_tokens=False,
                               return_offsets_mapping=True, verbose=False)["offset_mapping"]
        positions = []
        for ex, tree, off in zip(examples, trees, words, strict=True):
            trunk = tree.trunk.nonzero().flatten().tolist()   # flat index of [CLS], words..., [SEP]
            kept = off[:len(trunk) - 2]                       # the words the tree kept
            positions.append([trunk[p + 1] for p in _span_positions([kept], [ex.spans])[0]])
        batch = collate_trees(trees, self.tokenizer.pad_token_id)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "token_type_ids": batch["token_type_ids"], "visible": batch["visible"],
                "span_index": torch.tensor(positions, dtype=torch.long)}

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["position_ids"], batch["visible"],
                           batch["token_type_ids"]).hidden                         # (B, L, D)

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        trees = self._trees(list({ex.doc_id: ex for ex in examples}.values()))   # once per document
        return {"kbert_triples_injected": sum(t.injected for t in trees),
                "kbert_triples_dropped_for_length": sum(t.dropped for t in trees),
                "kbert_mentions_without_triples": sum(t.without_triples for t in trees)}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(False)
        self.module.bert.requires_grad_(train_encoder)


class KAdapterSpanEncoder(SpanEncoder):
    """K-Adapter features ``[h_L ; adapter outputs]``; the backbone is frozen whatever is asked (the
    paper's protocol), ``train_encoder`` decides whether the adapters are fine-tuned."""

    recipe = "kadapter"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, adapters: Sequence[str]) -> None:
        super().__init__(model, tokenizer, max_length, model.feature_size(adapters))
        self.adapters = tuple(adapters)

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["attention_mask"], self.adapters)  # (B, L, F)

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.train_only(*(self.adapters if train_encoder else ()))


@dataclass
class EncoderSource:
    """What a span-encoder builder gets: where the weights are, and the KG side of the inputs."""

    recipe: str                    # "plain" or a fusion.pretrain recipe
    path: Path | None              # the fusion.pretrain artifact (None: plain)
    options: dict[str, Any]        # the recipe's options (recipe.json)
    backbone: Any                  # TextBackbone: weights for plain, architecture + tokenizer otherwise
    max_length: int                # fine-tuning max_length
    pretrain_max_length: int | None
    kg: Any                        # KnowledgeGraph
    entities: Path | None          # knowledge.embed artifact, for ERNIE
    hidden_pairs: frozenset = frozenset()  # unordered KG index pairs K-BERT must not inject
    counts: dict[str, int] = field(default_factory=dict)  # what the builder hid or left out


# Builders ``(EncoderSource) -> SpanEncoder`` by recipe name; plugins register theirs with
# ``@span_encoder`` in a module of the ``stele.span_encoders`` entry-point group.
SPAN_ENCODERS: Registry[Callable[[EncoderSource], SpanEncoder]] = Registry(
    group="stele.span_encoders", kind="span encoder", qualname=lambda fn: f"{fn.__module__}.{fn.__qualname__}")


def span_encoder(name: str) -> Callable:
    """Register a span-encoder builder ``(EncoderSource) -> SpanEncoder`` under a recipe name."""
    def deco(fn: Callable[[EncoderSource], SpanEncoder]) -> Callable[[EncoderSource], SpanEncoder]:
        return SPAN_ENCODERS.register(name, fn)
    return deco


def span_encoder_for(recipe: str) -> Callable[[EncoderSource], SpanEncoder]:
    """The builder registered for ``recipe``, or for the nearest recipe class it derives from (a
    plugin recipe that subclasses ``PlainMLM`` fine-tunes as ``mlm``)."""
    builders = SPAN_ENCODERS.all()
    if recipe in builders:
        return builders[recipe]
    from fusion.pretrain.loop import RECIPES

    try:
        cls = RECIPES.get(recipe)
    except KeyError as e:
        raise StageFailed(f"fusion.finetune: {e.args[0]}") from None
    for base in cls.__mro__:
        if getattr(base, "name", None) in builders:
            return builders[base.name]
    raise StageFailed(f"fusion.finetune: no span encoder for recipe {recipe!r}; known: "
                      f"{', '.join(builders)} (register one with @span_encoder)")


def _recipe_options(src: EncoderSource) -> Any:
    from fusion.pretrain.loop import RECIPES

    return RECIPES.get(src.recipe).Options.model_validate(src.options)


def _pretrained(src: EncoderSource, resources: dict[str, Any]) -> Any:
    """The recipe's pretraining model, as every consumer of a pretrain artifact rebuilds it."""
    from fusion.pretrain.loop import build_pretrained

    try:
        return build_pretrained(src.path, src.backbone, resources)[2]
    except StageFailed as e:
        raise StageFailed(f"fusion.finetune: {e}") from None


@span_encoder("plain")
def _plain(src: EncoderSource) -> SpanEncoder:
    return BertSpanEncoder(src.backbone.model, src.backbone.tokenizer, src.max_length, "plain")


@span_encoder("mlm")
def _mlm(src: EncoderSource) -> SpanEncoder:
    model = _pretrained(src, {})
    return BertSpanEncoder(model.encoder, src.backbone.tokenizer, src.max_length, "mlm")


def entity_table(entities: Path | None, encoder: Path | None) -> tuple[Any, dict[str, int]]:
    """ERNIE's entity vectors and their rows by entity id: the ``knowledge.embed`` artifact's whole
    table, or else the table a pretrain artifact saved (``entity_table.safetensors`` + its
    ``entity_ids.json``: the table it pretrained with)."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    if entities is not None:
        from knowledge.stages.embed import not_assembled

        if (why := not_assembled(entities)) is not None:
            raise StageFailed(f"fusion.finetune: {why}")
        table = load_file(str(entities / "embeddings.safetensors"))["entity"]
        ents = pq.read_table(entities / "entities.parquet", columns=["idx", "id"])
        return table, dict(zip(ents["id"].to_pylist(), ents["idx"].to_pylist()))
    if encoder is not None and (encoder / "entity_table.safetensors").is_file():
        table = load_file(str(encoder / "entity_table.safetensors"))["entity"]
        ids = json.loads((encoder / "entity_ids.json").read_text())
        return table, {e: i for i, e in enumerate(ids)}
    raise StageFailed("fusion.finetune: an ERNIE encoder needs its entity vectors: give the "
                      "knowledge.embed artifact its pretraining used as input role 'entities'")


@span_encoder("ernie")
def _ernie(src: EncoderSource) -> SpanEncoder:
    table, rows = entity_table(src.entities, src.path)
    model = _pretrained(src, {"entity_table": table})
    return ErnieSpanEncoder(model, src.backbone.tokenizer, src.max_length, rows)


@span_encoder("kbert")
def _kbert(src: EncoderSource) -> SpanEncoder:
    from fusion.models.kbert import KnowledgeLayer, TripleLookup

    opts = _recipe_options(src)
    model = _pretrained(src, {"max_length": src.pretrain_max_length or src.max_length})
    t = src.kg.triples
    splits = set(opts.splits)
    heads, rels, tails, hidden = [], [], [], 0
    for h, r, tl, s in zip(*(t[c].to_pylist() for c in ("head", "relation", "tail", "split"))):
        if s not in splits:
            continue
        if frozenset((h, tl)) in src.hidden_pairs:
            hidden += 1
            continue
        heads.append(h)
        rels.append(r)
        tails.append(tl)
    src.counts["kbert_triples_hidden_task_facts"] = hidden
    lookup = TripleLookup.from_indices(heads, rels, tails, src.kg.relations["name"].to_pylist(),
                                       src.kg.entities["name"].to_pylist())
    layer = KnowledgeLayer(src.backbone.tokenizer, lookup, k=opts.k, max_length=src.max_length)
    index = dict(zip(src.kg.entities["id"].to_pylist(), src.kg.entities["idx"].to_pylist()))
    return KBertSpanEncoder(model, layer, index)


@span_encoder("kadapter")
def _kadapter(src: EncoderSource) -> SpanEncoder:
    from safetensors import safe_open

    with safe_open(str(src.path / "model.safetensors"), framework="pt") as f:
        num_labels = f.get_slice("head.classifier.weight").get_shape()[0]
    model = _pretrained(src, {"labels": [""] * num_labels})  # its task head is dropped below
    adapters = (_recipe_options(src).adapter,)
    return KAdapterSpanEncoder(model.head.encoder, src.backbone.tokenizer, src.max_length, adapters)


def load_plain(name: str) -> Any:
    from fusion.models.backbone import load_backbone

    try:
        return load_backbone(name)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise StageFailed(f"fusion.finetune: backbone {name!r}: {e}") from None
