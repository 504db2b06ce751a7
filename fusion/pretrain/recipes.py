"""stele's pretraining recipes: how each fusion encoder gets its data and its objectives.

``mlm`` is the plain backbone with masked language modelling: the baseline every knowledge encoder
is compared with, on the same data, steps and backbone. ``ernie``, ``kbert`` and ``kadapter`` link
the text's mentions (entity ids from ``knowledge.link``) to the KG artifacts they need; mentions of
entities the KG or the embedding table lacks are counted in the manifest, never silently dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from knowledge.kg import read_table
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


def pad(rows: list[dict], fill: dict[str, int]) -> dict[str, torch.Tensor]:
    """Rows of equal-length lists padded to the longest row: each ``fill`` key as (B, L) long
    padded with its value, plus ``attention_mask`` (B, L) from the first key's lengths."""
    first = next(iter(fill))
    B, L = len(rows), max((len(r[first]) for r in rows), default=0)
    out = {k: torch.full((B, L), v, dtype=torch.long) for k, v in fill.items()}
    out["attention_mask"] = torch.zeros(B, L, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r[first])
        for k in fill:
            out[k][b, :n] = torch.tensor(r[k], dtype=torch.long)
        out["attention_mask"][b, :n] = 1
    return out


@recipe("mlm")
class PlainMLM(Recipe):
    needs = ("text",)

    def encode_docs(self, state: dict, docs: list[dict]) -> tuple[list[dict], Counter]:
        enc = state["tokenizer"]([d["text"] for d in docs], truncation=True,
                                 max_length=state["max_length"], return_special_tokens_mask=True)
        rows = [{"input_ids": i, "special_tokens_mask": m}
                for i, m in zip(enc["input_ids"], enc["special_tokens_mask"])]
        return rows, Counter(documents=len(docs))

    def build(self, backbone: TextBackbone, resources: dict, options: Any) -> nn.Module:
        return BackboneMLM(backbone)

    def collate(self, backbone: TextBackbone, rows: list[dict], resources: dict, options: Any,
                max_length: int) -> dict[str, Any]:
        batch = pad(rows, {"input_ids": backbone.tokenizer.pad_token_id, "special_tokens_mask": 1})
        attn = batch["attention_mask"].bool()
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "maskable": attn & ~batch.pop("special_tokens_mask").bool(),
                "n_tokens": int(attn.sum())}


# ------------------------------------------------------------------------- linking to the KG
def id_index(uri: str) -> dict[str, int]:
    """Entity id -> row index of the ``entities.parquet`` of the artifact at ``uri``."""
    t = read_table(uri, "entities", ["idx", "id"])
    return dict(zip(t["id"].to_pylist(), t["idx"].to_pylist()))


def by_index(mentions: list, index: dict[str, int], counts: Counter, kept: str, missing: str
             ) -> list[tuple[int, int, int]]:
    """``(start, end, idx)`` of the mentions whose entity id has an index; the others are
    counted under ``missing`` (never silently dropped)."""
    out = [(s, e, index[ent]) for s, e, ent in mentions if ent in index]
    counts[kept] += len(out)
    counts[missing] += len(mentions) - len(out)
    return out


# ---------------------------------------------------------------------------------------- ERNIE
class ErnieOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k_layers: int | None = Field(default=None, ge=0,
                                 description="aggregator (K-Encoder) layers; None: half the backbone's")


def _whole_table(fs: Any, root: str, uri: str, file: str) -> str:
    """``root/file``, or a one-line error when a ``knowledge.embed`` artifact trained with
    partitions and ``assemble: false`` holds only ``partitions/``."""
    path = f"{root.rstrip('/')}/{file}"
    if not fs.exists(path):
        why = (" (trained with partitions and assemble: false: run knowledge.embed with assemble: true)"
               if fs.exists(f"{root.rstrip('/')}/partitions") else "")
        raise StageFailed(f"{uri}: no {file}{why}")
    return path


def entity_table(uri: str) -> torch.Tensor:
    """The ``entity`` vectors of a ``knowledge.embed`` artifact at ``uri``."""
    import fsspec
    from safetensors.torch import load

    fs, root = fsspec.core.url_to_fs(uri)
    with fs.open(_whole_table(fs, root, uri, "embeddings.safetensors"), "rb") as f:
        return load(f.read())["entity"]


def safetensors_shape(uri: str, file: str, name: str) -> list[int]:
    """A tensor's shape from a safetensors file's header, without reading the tensor."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    with fs.open(_whole_table(fs, root, uri, file), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))[name]["shape"]


@recipe("ernie")
class ErnieRecipe(Recipe):
    """ERNIE (Zhang et al. 2019): MLM + dEA, entity vectors from a ``knowledge.embed`` artifact.

    The table travels by reference: each worker loads it once from the artifact's URI (a frozen
    buffer of the model); an entity's row is its index in the artifact's ``entities.parquet``.
    """

    needs = ("text", "entities")
    Options = ErnieOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        num, dim = safetensors_shape(inputs["entities"], "embeddings.safetensors", "entity")
        return {"entities_uri": inputs["entities"], "num_entities": num, "entity_dim": dim}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        num, _ = safetensors_shape(inputs["entities"], "embeddings.safetensors", "entity")
        return {"tokenizer": tokenizer, "max_length": max_length, "num_entities": num,
                "index": id_index(inputs["entities"])}

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        from fusion.models.ernie import encode_text

        rows, counts = [], Counter(documents=len(docs))
        for d in docs:
            ms = by_index(d["mentions"], state["index"], counts, "mentions_with_vector",
                          "mentions_without_vector")
            ex = encode_text(d["text"], ms, state["tokenizer"], state["max_length"],
                             state["num_entities"])
            counts["mentions_aligned"] += ex.counts.aligned
            counts["mentions_truncated"] += ex.counts.truncated
            counts["mentions_unaligned"] += ex.counts.unaligned
            rows.append({"input_ids": ex.input_ids, "entity_idx": ex.entity_idx,
                         "special_tokens_mask": ex.special_tokens_mask})
        return rows, counts

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        if not counts.get("mentions_with_vector"):
            raise StageFailed("ernie: no linked mention has an entity vector; are the text and the "
                              "embeddings built from the same knowledge graph?")
        return resources, counts

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.ernie import Ernie, ErnieConfig

        table = resources.get("entity_table")
        if table is None:
            table = entity_table(resources["entities_uri"])
        return Ernie(backbone, table, ErnieConfig(num_k_layers=options.k_layers))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.ernie import NO_ENTITY

        batch = pad(rows, {"input_ids": backbone.tokenizer.pad_token_id, "entity_idx": NO_ENTITY,
                           "special_tokens_mask": 1})
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}


# --------------------------------------------------------------------------------------- K-BERT
class KBertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=2, ge=0, description="triples injected per matched entity")
    splits: list[str] = Field(default=["train"], description="KG splits whose triples are injected")


@recipe("kbert")
class KBertRecipe(Recipe):
    """K-BERT (Liu et al. 2020): sentence trees with up to k triples per linked entity, MLM on the
    trunk. The encoding actors build the trees (each loads the KG's triple lookup once); the
    corpus stores them as lists and the workers rebuild the visible matrices per batch."""

    needs = ("text", "kg")
    Options = KBertOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        split = read_table(inputs["kg"], "triples", ["split"])["split"]
        return {"triples_available": int(pc.sum(pc.is_in(split, pa.array(options.splits))).as_py()
                                         or 0)}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        from fusion.models.kbert import KnowledgeLayer, TripleLookup

        ents = read_table(inputs["kg"], "entities", ["idx", "id", "name"])
        rels = read_table(inputs["kg"], "relations", ["name"])
        t = read_table(inputs["kg"], "triples")
        t = t.filter(pc.is_in(t["split"], pa.array(options.splits)))
        lookup = TripleLookup.from_indices(t["head"].to_numpy(), t["relation"].to_numpy(),
                                           t["tail"].to_numpy(), rels["name"].to_pylist(),
                                           ents["name"].to_pylist())
        return {"layer": KnowledgeLayer(tokenizer, lookup, k=options.k, max_length=max_length),
                "index": dict(zip(ents["id"].to_pylist(), ents["idx"].to_pylist()))}

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        rows, counts = [], Counter(documents=len(docs))
        for d in docs:
            ms = by_index(d["mentions"], state["index"], counts, "mentions_in_kg", "mentions_not_in_kg")
            row = state["layer"].flatten(d["text"], ms)
            for c in ("injected", "dropped", "without_triples", "unaligned"):
                counts[f"branches_{c}" if c in ("injected", "dropped") else f"mentions_{c}"] += row.pop(c)
            rows.append(row)
        return rows, counts

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.kbert import KBert, KBertConfig

        return KBert(backbone, KBertConfig(k=options.k, max_length=resources["max_length"]))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.kbert import collate_trees, tree_from_row

        trees = [tree_from_row({**r, "injected": 0, "dropped": 0, "without_triples": 0,
                                "unaligned": 0}) for r in rows]
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

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        ents = read_table(inputs["kg"], "entities", ["idx", "id", "types"])
        state: dict[str, Any] = {"options": options, "ids": ents["id"].to_pylist(),
                                 "index": dict(zip(ents["id"].to_pylist(), ents["idx"].to_pylist()))}
        if options.adapter == "factual":
            rel_names = read_table(inputs["kg"], "relations", ["name"])["name"].to_pylist()
            t = read_table(inputs["kg"], "triples", ["head", "relation", "tail"])
            facts: dict[tuple[int, int], str] = {}
            for h, r, tl in zip(*(t[c].to_pylist() for c in ("head", "relation", "tail"))):
                facts.setdefault((h, tl), rel_names[r])
            state["facts"] = facts
        else:
            state["types"] = ents["types"].to_pylist()
        return state

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        from fusion.splits import pair_key, split_of

        options = state["options"]
        ids, counts = state["ids"], Counter()
        raw: list[tuple[str, list, str, str]] = []  # (text, spans, label name, split unit)
        for d in docs:
            ms = by_index(d["mentions"], state["index"], counts, "mentions_in_kg", "mentions_not_in_kg")
            if options.adapter == "factual":
                pairs = 0
                for s1, e1, h in ms:
                    for s2, e2, t in ms:
                        if h != t and (h, t) in state["facts"] and pairs < options.max_pairs_per_doc:
                            raw.append((d["text"], [[s1, e1], [s2, e2]], state["facts"][(h, t)],
                                        pair_key(ids[h], ids[t])))
                            pairs += 1
            else:
                for s, e, i in ms:
                    if state["types"][i]:
                        raw.append((d["text"], [[s, e]], state["types"][i][0], ids[i]))
        if options.held_out_share > 0:  # fusion.finetune's test entities / pairs: never trained on
            kept = [r for r in raw
                    if split_of(r[3], options.held_out_share, options.split_seed) == "train"]
            counts["held_out_examples"] += len(raw) - len(kept)
            raw = kept
        counts.update(f"label:{label}" for _, _, label, _ in raw)
        return [{"text": t, "spans": sp, "label": lab} for t, sp, lab, _ in raw], counts

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        """The label set: labels with at least ``min_label_count`` examples in the whole corpus;
        examples of rarer labels stay in the corpus, are counted, and are not trained on."""
        labels = {k.removeprefix("label:"): v for k, v in counts.items() if k.startswith("label:")}
        counts = {k: v for k, v in counts.items() if not k.startswith("label:")}
        keep = sorted(lab for lab, c in labels.items() if c >= resources["min_label_count"])
        task = sum(labels[lab] for lab in keep)
        if not task:
            raise StageFailed(f"kadapter: no task example with a label seen at least "
                              f"{resources['min_label_count']} times; {counts}")
        return {**resources, "labels": keep}, {
            **counts, "task_examples": task, "labels": len(keep),
            "rare_label_examples": sum(labels.values()) - task}

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        return {"min_label_count": options.min_label_count}

    def keep(self, resources, options):  # noqa: ANN001, ANN201
        labels = set(resources["labels"])
        return lambda row: row["label"] in labels

    def length(self, row):  # noqa: ANN001, ANN201 - tokenised per batch: characters stand in
        return len(row["text"])

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.kadapter import EntityTyper, KAdapter, KAdapterConfig, RelationClassifier

        encoder = KAdapter(backbone.model, KAdapterConfig(
            (options.adapter,), adapter_size=options.adapter_size, num_heads=options.num_heads))
        head_cls = RelationClassifier if options.adapter == "factual" else EntityTyper
        return _TaskModel(head_cls(encoder, len(resources["labels"])))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.kadapter import (RelationExample, TypingExample, relation_batch,
                                            typing_batch)

        label = {name: k for k, name in enumerate(resources["labels"])}
        if options.adapter == "factual":
            batch, report = relation_batch(
                [RelationExample(r["text"], tuple(r["spans"][0]), tuple(r["spans"][1]),
                                 label[r["label"]]) for r in rows], backbone.tokenizer, max_length)
        else:
            batch, report = typing_batch(
                [TypingExample(r["text"], tuple(r["spans"][0]), label[r["label"]]) for r in rows],
                backbone.tokenizer, max_length=max_length)
        if batch is None:  # every example's spans were truncated away: a rare, empty step
            raise StageFailed(f"kadapter: a batch with no usable example ({report}); raise "
                              f"max_length")
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}
