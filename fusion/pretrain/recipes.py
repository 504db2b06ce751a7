"""stele's pretraining recipes: how each fusion encoder gets its data and its objectives.

``mlm`` is the plain backbone with masked language modelling: the baseline every knowledge encoder
is compared with, on the same data, steps and backbone. ``ernie``, ``kbert`` and ``kadapter`` link
the text's mentions (entity ids from ``knowledge.link``) to the KG artifacts they need; mentions of
entities the KG or the embedding table lacks are counted in the manifest, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline import StageFailed

from fusion.models.backbone import TextBackbone
from fusion.models.heads import MLMHead
from fusion.models.objectives import mlm_mask
from fusion.pretrain.loop import Recipe, recipe


class BackboneMLM(nn.Module):
    """The backbone alone, trained with MLM (15%, 80/10/10)."""

    def __init__(self, backbone: TextBackbone):
        super().__init__()
        self.encoder = backbone.model
        cfg = backbone.model.config
        self.mlm = MLMHead(self.encoder.get_input_embeddings(), cfg.hidden_size, cfg.layer_norm_eps)
        self.mask_token_id = backbone.tokenizer.mask_token_id
        self.vocab_size = cfg.vocab_size

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        ids, labels = mlm_mask(batch["input_ids"], batch["maskable"], self.mask_token_id,
                               self.vocab_size, generator)
        hidden = self.encoder(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        mlm = self.mlm.loss(hidden, labels)
        return {"mlm": mlm, "total": mlm}


def encode_texts(backbone: TextBackbone, texts: list[str], max_length: int) -> dict[str, Any]:
    """Padded token ids, attention mask and the MLM-maskable positions (not special, not padding)."""
    enc = backbone.tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                             return_tensors="pt", return_special_tokens_mask=True)
    attn = enc["attention_mask"].bool()
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "maskable": attn & ~enc["special_tokens_mask"].bool(), "n_tokens": int(attn.sum())}


@recipe("mlm")
class PlainMLM(Recipe):
    needs = ("text",)

    def build(self, backbone: TextBackbone, resources: dict, options: Any) -> nn.Module:
        return BackboneMLM(backbone)

    def collate(self, backbone: TextBackbone, examples: list[dict], resources: dict, options: Any,
                max_length: int) -> dict[str, Any]:
        return encode_texts(backbone, [e["text"] for e in examples], max_length)


# ------------------------------------------------------------------------- linking to the KG
def _mentions_by_index(docs: list[dict], index: dict[str, int]) -> tuple[list[dict], int, int]:
    """Documents with mentions as ``(start, end, idx)`` where the entity id has an index; returns
    them and the counts of mentions kept and left out (no such entity)."""
    out, kept, missing = [], 0, 0
    for d in docs:
        ms = []
        for s, e, ent in d["mentions"]:
            if ent in index:
                ms.append((s, e, index[ent]))
            else:
                missing += 1
        kept += len(ms)
        out.append({**d, "mentions": ms})
    return out, kept, missing


def _kg_index(kg_path) -> tuple[Any, dict[str, int]]:  # noqa: ANN001
    from knowledge.kg import KnowledgeGraph

    kg = KnowledgeGraph.load(kg_path)
    return kg, dict(zip(kg.entities["id"].to_pylist(), kg.entities["idx"].to_pylist()))


# ---------------------------------------------------------------------------------------- ERNIE
class ErnieOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k_layers: int | None = Field(default=None, ge=0,
                                 description="aggregator (K-Encoder) layers; None: half the backbone's")


@recipe("ernie")
class ErnieRecipe(Recipe):
    """ERNIE (Zhang et al. 2019): MLM + dEA, entity vectors from a ``knowledge.embed`` artifact.

    Only the vectors of entities the text mentions are shipped to the workers (a compact table):
    dEA predicts among the batch's entities, so no other vector is ever read.
    """

    needs = ("text", "entities")
    Options = ErnieOptions

    def prepare(self, inputs, options, docs, backbone, max_length):  # noqa: ANN001, ANN201
        from safetensors.torch import load_file

        table = load_file(str(inputs["entities"] / "embeddings.safetensors"))["entity"]
        ents = pq.read_table(inputs["entities"] / "entities.parquet", columns=["idx", "id"])
        index = dict(zip(ents["id"].to_pylist(), ents["idx"].to_pylist()))
        docs, kept, missing = _mentions_by_index(docs, index)
        used = sorted({m[2] for d in docs for m in d["mentions"]})
        if not used:
            raise StageFailed("ernie: no linked mention has an entity vector; are the text and the "
                              "embeddings built from the same knowledge graph?")
        compact = {old: new for new, old in enumerate(used)}
        docs = [{**d, "mentions": [(s, e, compact[i]) for s, e, i in d["mentions"]]} for d in docs]
        id_of = {i: e for e, i in index.items()}
        return docs, {"entity_table": table[used].contiguous(),
                      "entity_ids": [id_of[i] for i in used]}, {
            "mentions_with_vector": kept, "mentions_without_vector": missing,
            "entities_used": len(used), "entity_dim": int(table.shape[1])}

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.ernie import Ernie, ErnieConfig

        return Ernie(backbone, resources["entity_table"], ErnieConfig(num_k_layers=options.k_layers))

    def collate(self, backbone, examples, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.ernie import encode_batch

        batch, _ = encode_batch([e["text"] for e in examples], [e["mentions"] for e in examples],
                                backbone.tokenizer, max_length, len(resources["entity_table"]))
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}


# --------------------------------------------------------------------------------------- K-BERT
class KBertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=2, ge=0, description="triples injected per matched entity")
    splits: list[str] = Field(default=["train"], description="KG splits whose triples are injected")


@recipe("kbert")
class KBertRecipe(Recipe):
    """K-BERT (Liu et al. 2020): sentence trees with up to k triples per linked entity, MLM on the
    trunk. Only triples whose head the text mentions are shipped to the workers."""

    needs = ("text", "kg")
    Options = KBertOptions

    def prepare(self, inputs, options, docs, backbone, max_length):  # noqa: ANN001, ANN201
        import pyarrow.compute as pc

        kg, index = _kg_index(inputs["kg"])
        docs, kept, missing = _mentions_by_index(docs, index)
        heads = sorted({m[2] for d in docs for m in d["mentions"]})
        t = kg.triples.filter(pc.is_in(kg.triples["split"], pa.array(options.splits)))
        t = t.filter(pc.is_in(t["head"], pa.array(heads, pa.int32() if heads else pa.int64())))
        names = kg.entities["name"].to_pylist()
        resources = {"heads": t["head"].to_pylist(), "relations": t["relation"].to_pylist(),
                     "tails": t["tail"].to_pylist(), "relation_names": kg.relations["name"].to_pylist(),
                     "entity_names": names, "max_length": max_length}
        return docs, resources, {"mentions_in_kg": kept, "mentions_not_in_kg": missing,
                                 "triples_available": t.num_rows}

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.kbert import KBert, KBertConfig

        self._layer = None
        return KBert(backbone, KBertConfig(k=options.k, max_length=resources["max_length"]))

    def collate(self, backbone, examples, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.kbert import KnowledgeLayer, TripleLookup, collate_trees

        if getattr(self, "_layer", None) is None or self._layer.max_length != max_length:
            lookup = TripleLookup.from_indices(resources["heads"], resources["relations"],
                                               resources["tails"], resources["relation_names"],
                                               resources["entity_names"])
            self._layer = KnowledgeLayer(backbone.tokenizer, lookup, k=options.k, max_length=max_length)
        trees = [self._layer(e["text"], e["mentions"]) for e in examples]
        batch = collate_trees(trees, backbone.tokenizer.pad_token_id)
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}


# ------------------------------------------------------------------------------------ K-Adapter
class KAdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: Literal["factual", "lexical"] = Field(
        default="factual", description="factual: relation classification of linked entity pairs "
                                       "sharing a KG relation; lexical: the linked entity's type "
                                       "(WordNet lexname)")
    adapter_size: int = Field(default=128, ge=8)
    num_heads: int = Field(default=4, ge=1)
    max_pairs_per_doc: int = Field(default=8, ge=1)
    min_label_count: int = Field(default=2, ge=1, description="rarer labels are left out")
    held_out_share: float = Field(
        default=0.0, ge=0, lt=1, description="leave out the entities (lexical) / entity pairs "
        "(factual) that fusion.finetune holds out with test_share equal to this and the same "
        "split_seed, so the adapter never trains on their labels")
    split_seed: int = 0


class _TaskModel(nn.Module):
    """A K-Adapter task head with the loop's ``loss(batch, generator)`` signature."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        return self.head.loss(batch)


@recipe("kadapter")
class KAdapterRecipe(Recipe):
    """K-Adapter (Wang et al. 2021): a frozen backbone, one adapter trained per run on its task.

    ``factual``: distant supervision, as the paper's factual adapter is trained on relation
    classification: every sentence where two linked entities are a KG triple's head and tail is an
    example labelled with that relation. ``lexical``: the paper's linguistic adapter learns
    dependency heads, but no parser is available offline, so this one predicts a linked entity's
    type (a WordNet lexname such as ``noun.animal``; ``countryinfo`` types such as ``country``).
    """

    needs = ("text", "kg")
    Options = KAdapterOptions

    def prepare(self, inputs, options, docs, backbone, max_length):  # noqa: ANN001, ANN201
        from collections import Counter

        from fusion.splits import pair_key, split_of
        from fusion.models.kadapter import RelationExample, TypingExample

        kg, index = _kg_index(inputs["kg"])
        docs, kept, missing = _mentions_by_index(docs, index)
        ids = kg.entities["id"].to_pylist()
        raw: list[tuple[str, tuple, str, str]] = []  # (text, spans, label name, split unit)
        if options.adapter == "factual":
            rel_names = kg.relations["name"].to_pylist()
            facts: dict[tuple[int, int], str] = {}
            for h, r, t in zip(*(kg.triples[c].to_pylist() for c in ("head", "relation", "tail"))):
                facts.setdefault((h, t), rel_names[r])
            for d in docs:
                pairs = 0
                for s1, e1, h in d["mentions"]:
                    for s2, e2, t in d["mentions"]:
                        if h != t and (h, t) in facts and pairs < options.max_pairs_per_doc:
                            raw.append((d["text"], ((s1, e1), (s2, e2)), facts[(h, t)],
                                        pair_key(ids[h], ids[t])))
                            pairs += 1
        else:
            types = kg.entities["types"].to_pylist()
            for d in docs:
                for s, e, i in d["mentions"]:
                    if types[i]:
                        raw.append((d["text"], ((s, e),), types[i][0], ids[i]))
        found = len(raw)
        if options.held_out_share > 0:  # fusion.finetune's test entities / pairs: never trained on
            raw = [r for r in raw
                   if split_of(r[3], options.held_out_share, options.split_seed) == "train"]
        held_out = found - len(raw)
        counts = Counter(label for _, _, label, _ in raw)
        labels = sorted(label for label, c in counts.items() if c >= options.min_label_count)
        label_idx = {label: k for k, label in enumerate(labels)}
        if options.adapter == "factual":
            examples = [RelationExample(text, spans[0], spans[1], label_idx[lab])
                        for text, spans, lab, _ in raw if lab in label_idx]
        else:
            examples = [TypingExample(text, spans[0], label_idx[lab])
                        for text, spans, lab, _ in raw if lab in label_idx]
        return examples, {"labels": labels}, {
            "mentions_in_kg": kept, "mentions_not_in_kg": missing, "task_examples": len(examples),
            "labels": len(labels), "rare_label_examples": len(raw) - len(examples),
            "held_out_examples": held_out}

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.kadapter import EntityTyper, KAdapter, KAdapterConfig, RelationClassifier

        encoder = KAdapter(backbone.model, KAdapterConfig(
            (options.adapter,), adapter_size=options.adapter_size, num_heads=options.num_heads))
        head_cls = RelationClassifier if options.adapter == "factual" else EntityTyper
        return _TaskModel(head_cls(encoder, len(resources["labels"])))

    def collate(self, backbone, examples, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.kadapter import relation_batch, typing_batch

        if options.adapter == "factual":
            batch, report = relation_batch(examples, backbone.tokenizer, max_length)
        else:
            batch, report = typing_batch(examples, backbone.tokenizer, max_length=max_length)
        if batch is None:  # every example's spans were truncated away: a rare, empty step
            raise StageFailed(f"kadapter: a batch with no usable example ({report}); raise "
                              f"max_length")
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}
