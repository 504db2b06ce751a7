"""Pretraining recipes for the encoders that learn from KG triples as text: KEPLER and KG-BERT.

``kepler`` (Wang et al. 2021) pairs the linked text's documents (MLM) with KG triples whose ends are
encoded from their descriptions (the knowledge-embedding loss); ``kgbert`` (Yao et al. 2019) reads
triples as sentences and learns triple classification and relation prediction. Both read the
``knowledge.ingest`` artifact by URI in their encoding actors; triples they cannot use (an entity
without a description, a corruption that is a known triple) are counted in the manifest.

Scale (the recipes of :mod:`fusion.pretrain.lexical_recipes` and :mod:`fusion.pretrain.extra_recipes`
alike): ``resources()`` runs in the stage's process and only checks the KG's Parquet footers (the
columns it needs, the row counts: :func:`kg_rows`); whatever grows with the KG (entity texts, the
triple pool, a lexicon) is built once per encoding actor in ``encoder()``, read by URI. Counts about
the KG as a whole come back with unit 0's rows only (:func:`kg_counts_once`), so the corpus's summed
counts hold them exactly once, and ``finish()`` turns "nothing usable" into the stage's error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from knowledge.kg import read_table, read_triples
from pipeline import StageFailed

from fusion.pretrain.corpus import read_linked_docs
from fusion.pretrain.loop import Recipe, recipe
from fusion.pretrain.recipes import pad

EntityText = Literal["description", "name_description", "name"]


def kg_rows(kg_uri: str, name: str, columns: Sequence[str] = ()) -> int:
    """Rows of table ``name`` (``entities``, ``relations``, ``triples``) of a ``knowledge.ingest``
    artifact, from its Parquet footer (no row is read), after checking that it has ``columns``."""
    import pyarrow.parquet as pq

    from knowledge.kg import FILES, _open

    try:
        with _open(kg_uri, name) as f:
            meta = pq.ParquetFile(f).metadata
    except (OSError, ValueError) as e:
        raise StageFailed(f"{kg_uri}/{FILES[name]}: cannot read it ({e}); is the kg input a "
                          f"knowledge.ingest artifact?") from None
    missing = sorted(set(columns) - set(meta.schema.to_arrow_schema().names))
    if missing:
        raise StageFailed(f"{kg_uri}/{FILES[name]}: no column(s) {missing}; is the kg input a "
                          f"knowledge.ingest artifact?")
    return meta.num_rows


def kg_counts_once(unit: Mapping[str, Any], counts: Mapping[str, int], more: Counter) -> Counter:
    """``more`` plus, for unit 0 only, the counts about the KG as a whole that every encoding actor
    computed (the corpus sums its units' counts: the KG's are in it once). ``update`` keeps zeros,
    which the manifest lists: a zero is a finding."""
    if unit.get("unit") == 0:
        more.update(counts)
    return more


def kg_count(recipe_name: str, counts: Mapping[str, int], key: str) -> int:
    """``counts[key]``, a count that :func:`kg_counts_once` puts into every corpus; its absence means
    a corpus encoded before the KG's counts came with unit 0 (a run resumed across an upgrade)."""
    if key not in counts:
        raise StageFailed(f"{recipe_name}: the encoded corpus has no {key!r} count: it was encoded by "
                          f"an older stele; delete the stage's state folder (its corpus/) to re-encode")
    return counts[key]


def entity_texts(kg_uri: str, mode: EntityText) -> tuple[list[str], list[str], np.ndarray]:
    """``(names, descriptions, has_text (N,) bool)`` of the entities of a ``knowledge.ingest``
    artifact: whether the text ``mode`` asks for exists (``name``: a non-empty name; otherwise a
    non-empty description)."""
    t = read_table(kg_uri, "entities", ["idx", "name", "description"])
    if t.num_rows and t["idx"].to_pylist() != list(range(t.num_rows)):
        raise StageFailed(f"{kg_uri}/entities.parquet: idx is not 0..{t.num_rows - 1} in order")
    names = [n or "" for n in t["name"].to_pylist()]
    descs = [d or "" for d in t["description"].to_pylist()]
    col = t["name"] if mode == "name" else t["description"]
    has = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), False)
    return names, descs, has.to_numpy(zero_copy_only=False)


def tokenize_entity(tokenizer: Any, name: str, description: str, mode: EntityText, max_length: int
                    ) -> list[int]:
    """An entity's text as token ids with the tokenizer's special tokens: its description, its
    name, or ``[CLS] name [SEP] description [SEP]`` (a text pair)."""
    if mode == "name_description":
        return tokenizer(name, description, truncation=True, max_length=max_length)["input_ids"]
    return tokenizer(name if mode == "name" else description, truncation=True,
                     max_length=max_length)["input_ids"]


def usable_triples(kg_uri: str, splits: list[str], has_text: np.ndarray
                   ) -> tuple[np.ndarray, int]:
    """``(triples (n, 3) of ``splits`` whose head and tail both have text, how many did not)``."""
    parts = read_triples(kg_uri, *splits)
    tr = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    ok = has_text[tr[:, 0]] & has_text[tr[:, 2]] if len(tr) else np.zeros(0, bool)
    return tr[ok], int((~ok).sum())


def held_out_pairs(kg_uri: str, triples: np.ndarray, share: float, seed: int) -> np.ndarray:
    """(n,) bool: whether each triple's unordered entity pair is in the test split that
    ``fusion.finetune`` holds out with ``test_share=share`` and ``split_seed=seed``, whose relation
    labels a triple would give away (K-Adapter's ``held_out_share`` alike)."""
    from fusion.splits import pair_key, split_of

    if share <= 0 or not len(triples):
        return np.zeros(len(triples), bool)
    ids = read_table(kg_uri, "entities", ["id"])["id"].to_pylist()
    return np.array([split_of(pair_key(ids[h], ids[t]), share, seed) == "test"
                     for h, t in triples[:, [0, 2]].tolist()], dtype=bool)


HELD_OUT_SHARE = Field(default=0.0, ge=0, lt=1, description="leave out the triples whose entity "
                       "pair fusion.finetune holds out with test_share equal to this and the same "
                       "split_seed, so relation classification's test labels are never trained on")


# --------------------------------------------------------------------------------------- KEPLER
class KeplerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(default=4.0, gt=0, description="margin of the KE loss")
    p: float = Field(default=1.0, ge=1, description="norm of the TransE distance")
    negatives: int = Field(default=1, ge=1, description="corruptions per positive triple")
    triples_per_doc: int = Field(default=1, ge=1, description="triples paired with each document")
    description_length: int = Field(default=64, ge=4, description="wordpieces per entity text")
    entity_text: EntityText = Field(
        default="description", description="description (the paper), name_description (the text "
                                           "pair [CLS] name [SEP] description [SEP]), name")
    ke_weight: float = Field(default=1.0, ge=0)
    splits: list[str] = Field(default=["train"], description="KG splits the KE loss trains on")
    held_out_entities: float = Field(
        default=0.0, ge=0, lt=1, description="inductive setting: this share of the entities (by "
        "fusion.splits.split_of of their id with split_seed) never appears in a KE triple or as a "
        "corruption, so link prediction on them scores entities unseen in training")
    held_out_share: float = HELD_OUT_SHARE
    split_seed: int = 0
    seed: int = Field(default=0, description="pairing of triples with documents, negatives")


def kepler_pool(kg_uri: str, options: KeplerOptions) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(usable triples (n, 3), entities a corruption may be (KG indices), counts)``: triples of
    ``splits`` with text on both ends and no held-out end; corruptions among the entities with
    text that are not held out."""
    from fusion.splits import split_of

    _, _, has = entity_texts(kg_uri, options.entity_text)
    pool, missing = usable_triples(kg_uri, options.splits, has)
    allowed = has.copy()
    if options.held_out_entities > 0:
        ids = read_table(kg_uri, "entities", ["id"])["id"].to_pylist()
        held = np.array([split_of(i, options.held_out_entities, options.split_seed) == "test" for i in ids])
        allowed &= ~held
    ok = allowed[pool[:, 0]] & allowed[pool[:, 2]] if len(pool) else np.zeros(0, bool)
    pair = held_out_pairs(kg_uri, pool, options.held_out_share, options.split_seed) & ok
    ok &= ~pair
    counts = {"ke_triples": int(ok.sum()), "ke_triples_without_text": missing,
              "ke_triples_held_out": int((~ok).sum()) - int(pair.sum()),
              "ke_triples_held_out_pairs": int(pair.sum()), "entities_with_text": int(has.sum()),
              "entities_without_text": int((~has).sum()),
              "entities_held_out": int((has & ~allowed).sum())}
    return pool[ok], np.flatnonzero(allowed), counts


@recipe("kepler")
class KeplerRecipe(Recipe):
    """KEPLER (Wang et al. 2021): MLM on the linked text and the knowledge-embedding loss on the
    KG's triples, one encoder (:mod:`fusion.models.kepler`).

    Each corpus row is one document for MLM plus ``triples_per_doc`` triples: document ``g`` (its
    position in the text artifact) gets triples ``g k .. g k + k - 1`` of a seeded permutation of
    the usable triples, cycling, so an epoch over the documents is ``D k / T`` passes over the
    triples. Each triple carries ``negatives`` corruptions drawn when the corpus is encoded (as
    KEPLER's preprocessing fixes them), and the tokenised text of every entity it names. Triples
    with an end that has no text are left out and counted (``ke_triples_without_text``).

    Inductive setting (``held_out_entities``): a hashed share of the entities takes no part in
    the KE loss (their triples are counted as ``ke_triples_held_out``, they are never drawn as
    corruptions), so :func:`fusion.models.kepler.candidate_scorer` ranks them from text alone;
    which entities those are is :func:`fusion.splits.split_of` of their ids, the same anywhere.
    The MLM text is not filtered: it is text, not the KG's facts. ``held_out_share`` leaves out
    the triples of the entity pairs ``fusion.finetune`` tests relation classification on
    (``ke_triples_held_out_pairs``).
    """

    needs = ("text", "kg")
    Options = KeplerOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        kg_rows(inputs["kg"], "entities", ["idx", "id", "name", "description"])
        kg_rows(inputs["kg"], "triples", ["head", "relation", "tail", "split"])
        return {"num_relations": kg_rows(inputs["kg"], "relations", ["idx"])}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        names, descs, _ = entity_texts(inputs["kg"], options.entity_text)
        pool, corruptible, counts = kepler_pool(inputs["kg"], options)
        pool = pool[np.random.default_rng([options.seed, 0]).permutation(len(pool))]
        return {"tokenizer": tokenizer, "max_length": max_length, "options": options,
                "names": names, "descs": descs, "pool": pool, "described": corruptible.tolist(),
                "position": {int(e): i for i, e in enumerate(corruptible)}, "tokens": {},
                "kg_counts": counts}

    def encode(self, state, inputs, unit):  # noqa: ANN001, ANN201
        if not len(state["pool"]) or len(state["described"]) < 2:  # finish() says why, from the counts
            return [], kg_counts_once(unit, state["kg_counts"], Counter())
        rows, counts = self.encode_docs(state, read_linked_docs(inputs["text"], unit),
                                        first=unit["doc_start"])
        return rows, kg_counts_once(unit, state["kg_counts"], counts)

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        if not kg_count("kepler", counts, "ke_triples"):
            raise StageFailed(f"kepler: no triple of the KE splits has text on both ends and no "
                              f"held-out end ({counts}); does the KG source give descriptions "
                              f"(WordNet glosses, Wikidata, RDF comments), and does entity_text "
                              f"name text it has?")
        if counts.get("entities_with_text", 0) - counts.get("entities_held_out", 0) < 2:
            raise StageFailed(f"kepler: fewer than two entities can corrupt a triple ({counts})")
        return resources, counts

    def encode_docs(self, state, docs, first: int = 0):  # noqa: ANN001, ANN201
        from fusion.models.kepler import draw_negatives

        opt, tok, pool = state["options"], state["tokenizer"], state["pool"]
        enc = tok([d["text"] for d in docs], truncation=True, max_length=state["max_length"],
                  return_special_tokens_mask=True)
        rows, counts = [], Counter(documents=len(docs))
        for i, (ids, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
            g = first + i
            ents: dict[int, int] = {}  # KG index -> place in this row's entity list
            triples, negs, flips = [], [], []
            for j in range(opt.triples_per_doc):
                h, r, t = (int(x) for x in pool[(g * opt.triples_per_doc + j) % len(pool)])
                rng = np.random.default_rng([opt.seed, g, j])
                neg, flip = draw_negatives(h, t, state["described"], state["position"], opt.negatives,
                                           rng)
                for e in (h, t, *neg):
                    ents.setdefault(e, len(ents))
                triples.append([ents[h], r, ents[t]])
                negs.append([ents[e] for e in neg])
                flips.append(flip)
                counts["ke_positives"] += 1
                counts["ke_negatives_head"] += sum(flip)
                counts["ke_negatives_tail"] += len(flip) - sum(flip)
            rows.append({"input_ids": ids, "special_tokens_mask": special,
                         "ke_entities": list(ents), "ke_entity_tokens": [self._tokens(state, e)
                                                                         for e in ents],
                         "ke_triples": triples, "ke_negatives": negs, "ke_negative_is_head": flips})
        return rows, counts

    @staticmethod
    def _tokens(state: dict, e: int) -> list[int]:
        cache = state["tokens"]
        if e not in cache:
            opt = state["options"]
            cache[e] = tokenize_entity(state["tokenizer"], state["names"][e], state["descs"][e],
                                       opt.entity_text, opt.description_length)
        return cache[e]

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.kepler import Kepler, KeplerConfig

        return Kepler(backbone, KeplerConfig(num_relations=resources["num_relations"],
                                             gamma=options.gamma, p=options.p,
                                             ke_weight=options.ke_weight))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.kepler import ke_batch

        pad_id = backbone.tokenizer.pad_token_id
        batch = pad(rows, {"input_ids": pad_id, "special_tokens_mask": 1})
        attn = batch["attention_mask"].bool()
        ke = ke_batch(rows, pad_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "maskable": attn & ~batch["special_tokens_mask"].bool(), **ke,
                "n_tokens": int(attn.sum()) + int(ke["entity_attention_mask"].sum())}


# -------------------------------------------------------------------------------------- KG-BERT
UNIT_TRIPLES = 4096  # positive triples per encoding unit


class KgBertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entity_text: EntityText = Field(default="name", description="name (WN11/FB13 in the paper), "
                                    "description, or name_description (\"name, description\")")
    entity_length: int = Field(default=32, ge=1, description="wordpieces kept per entity text")
    negatives: int = Field(default=1, ge=0, description="corruptions per positive (kg-bert: 1)")
    triple_weight: float = Field(default=1.0, ge=0, description="triple classification loss weight")
    relation_weight: float = Field(default=1.0, ge=0, description="relation prediction loss weight")
    splits: list[str] = Field(default=["train"], description="KG splits trained on (and whose "
                              "triples a corruption must not be)")
    held_out_share: float = HELD_OUT_SHARE
    split_seed: int = 0
    seed: int = Field(default=0, description="negative sampling")


@recipe("kgbert")
class KgBertRecipe(Recipe):
    """KG-BERT (Yao et al. 2019): triples as text, triple classification against corruptions and
    relation prediction (:mod:`fusion.models.kgbert`); needs only the KG.

    Each corpus row is one positive triple of ``splits`` with its ``negatives`` corruptions (drawn
    when the corpus is encoded, among the entities that have text, redrawn while a corruption is a
    known triple of ``splits``) and its ``[CLS] h [SEP] t [SEP]`` pair. Counted: triples with an
    end without text (left out), corruptions still known after the redraws (left out), triples of
    the entity pairs ``held_out_share`` holds out for ``fusion.finetune`` (left out; they are still
    known triples no corruption may be). ``limit_docs`` caps the positive triples.
    """

    needs = ("kg",)
    Options = KgBertOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        kg_rows(inputs["kg"], "entities", ["idx", "id", "name", "description"])
        return {"num_relations": kg_rows(inputs["kg"], "relations", ["idx", "id", "name"])}

    def units(self, inputs, options, limit):  # noqa: ANN001, ANN201
        from knowledge.kg import split_counts

        counts = split_counts(inputs["kg"])
        n = sum(counts.get(s, 0) for s in options.splits)
        n = n if limit is None else min(n, limit)
        if not n:
            raise StageFailed(f"kgbert: the KG has no triple in splits {options.splits} ({counts})")
        return [{"unit": i, "start": a, "stop": min(a + UNIT_TRIPLES, n)}
                for i, a in enumerate(range(0, n, UNIT_TRIPLES))]

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        names, descs, has = entity_texts(inputs["kg"], options.entity_text)
        parts = read_triples(inputs["kg"], *options.splits)
        triples = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
        rels = read_table(inputs["kg"], "relations", ["id", "name"])
        texts = {"name": names, "description": descs,
                 "name_description": [f"{n}, {d}" for n, d in zip(names, descs)]}[options.entity_text]
        held = held_out_pairs(inputs["kg"], triples, options.held_out_share, options.split_seed)
        return {"tokenizer": tokenizer, "max_length": max_length, "options": options, "held": held,
                "texts": texts, "has": has, "pool": np.flatnonzero(has), "triples": triples,
                "known": set(map(tuple, triples.tolist())), "tokens": {},
                "kg_counts": {"entities_with_text": int(has.sum()),
                              "entities_without_text": int((~has).sum())},
                "relations": [tokenizer(n or i, add_special_tokens=False)["input_ids"]
                              for i, n in zip(rels["id"].to_pylist(), rels["name"].to_pylist())]}

    def encode(self, state, inputs, unit):  # noqa: ANN001, ANN201
        from fusion.models.kgbert import corrupt, pair_input, triple_input

        opt, tok, L = state["options"], state["tokenizer"], state["max_length"]
        cls_id, sep_id, has = tok.cls_token_id, tok.sep_token_id, state["has"]
        rows, counts = [], kg_counts_once(unit, state["kg_counts"], Counter())
        if len(state["pool"]) < 2:  # no corruption can be drawn: finish() says so, from the counts
            return rows, counts
        for i in range(unit["start"], unit["stop"]):
            h, r, t = (int(x) for x in state["triples"][i])
            if not (has[h] and has[t]):
                counts["triples_without_text"] += 1
                continue
            if state["held"][i]:
                counts["triples_held_out_pairs"] += 1
                continue
            rng = np.random.default_rng([opt.seed, i])
            seqs, labels = [triple_input(self._tokens(state, h), state["relations"][r],
                                         self._tokens(state, t), cls_id, sep_id, L)], [1]
            for _ in range(opt.negatives):
                neg = corrupt(h, r, t, state["pool"], state["known"], rng)
                if neg is None:
                    counts["negatives_known_left_out"] += 1
                    continue
                seqs.append(triple_input(self._tokens(state, neg[0]), state["relations"][r],
                                         self._tokens(state, neg[2]), cls_id, sep_id, L))
                labels.append(0)
                counts["negatives_head" if neg[0] != h else "negatives_tail"] += 1
            pair = pair_input(self._tokens(state, h), self._tokens(state, t), cls_id, sep_id, L)
            counts["positives"] += 1
            rows.append({"triple_ids": [s[0] for s in seqs], "triple_types": [s[1] for s in seqs],
                         "labels": labels, "pair_ids": pair[0], "pair_types": pair[1], "relation": r})
        return rows, counts

    @staticmethod
    def _tokens(state: dict, e: int) -> list[int]:
        cache = state["tokens"]
        if e not in cache:
            ids = state["tokenizer"](state["texts"][e], add_special_tokens=False)["input_ids"]
            cache[e] = ids[:state["options"].entity_length]
        return cache[e]

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        if kg_count("kgbert", counts, "entities_with_text") < 2:
            raise StageFailed(f"kgbert: fewer than two entities have text, so no triple can be "
                              f"corrupted ({counts}); does entity_text name text the KG has?")
        return resources, counts

    def length(self, row):  # noqa: ANN001, ANN201
        return sum(len(s) for s in row["triple_ids"])

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.kgbert import KgBert, KgBertConfig

        return KgBert(backbone, KgBertConfig(num_relations=resources["num_relations"],
                                             triple_weight=options.triple_weight,
                                             relation_weight=options.relation_weight))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        import torch

        from fusion.models.kgbert import pad_sequences

        pad_id = backbone.tokenizer.pad_token_id
        triples = [(s, t) for r in rows for s, t in zip(r["triple_ids"], r["triple_types"])]
        batch = {**pad_sequences(triples, pad_id, "triple"),
                 **pad_sequences([(r["pair_ids"], r["pair_types"]) for r in rows], pad_id, "pair"),
                 "label": torch.tensor([y for r in rows for y in r["labels"]], dtype=torch.float),
                 "relation": torch.tensor([r["relation"] for r in rows], dtype=torch.long)}
        return {**batch, "n_tokens": int(batch["triple_attention_mask"].sum()
                                         + batch["pair_attention_mask"].sum())}
