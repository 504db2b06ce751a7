"""Pretraining recipes whose knowledge is a lexicon: SenseBERT and LIBERT, both from WordNet.

Both read a ``knowledge.ingest`` artifact of WordNet (role ``kg``; ``knowledge.sources.wordnet``
gives each synset's lemmas as the entity's ``name`` and ``aliases`` and its lexname as its
``types``; hypernymy is the relation named ``hypernym``, or ``_hypernym`` with ``relations:
wn18rr``) and the documents of a ``knowledge.link`` artifact (role ``text``; the mentions are not
used: both models read words, not entities). A KG merged from several sources works: entities
without a WordNet lexname are counted and left out of the lexicon.

``sensebert`` (:mod:`fusion.models.sensebert`): whole-word MLM plus supersense prediction of the
masked words. ``libert`` (:mod:`fusion.models.libert`): MLM plus lexical relation classification
of WordNet word pairs. What each leaves out (words without a supersense, lemmas that are not one
word, pairs cut by the cap) is counted in the manifest.

The lexicon (SenseBERT's lemma -> supersenses, LIBERT's word pairs) grows with the KG, so it is
built once per encoding actor, never in the stage's process (whose ``resources()`` only checks the
KG's columns) nor in the training config; its counts come back with unit 0's rows and
``finish()`` fails a run with no usable lexicon (see :mod:`fusion.pretrain.knowledge_recipes`).
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from knowledge.kg import read_table
from pipeline import StageFailed

from fusion.pretrain.knowledge_recipes import kg_count, kg_counts_once, kg_rows
from fusion.pretrain.loop import Recipe, recipe
from fusion.pretrain.recipes import PlainMLM, pad

SYNSET_COLUMNS = ("name", "aliases", "types")


def synset_rows(kg_uri: str) -> list[tuple[list[str], list[str]]]:
    """``(lemmas, types)`` of every entity of the KG artifact at ``kg_uri`` (name first)."""
    return synset_rows_of(read_table(kg_uri, "entities", ["name", "aliases", "types"]))


def synset_rows_of(t: pa.Table) -> list[tuple[list[str], list[str]]]:
    """:func:`synset_rows` of an entities table already read (fine-tuning holds the KG): the same
    lexicon in pretraining and fine-tuning."""
    return [([n, *(a or [])], ty or []) for n, a, ty in
            zip(t["name"].to_pylist(), t["aliases"].to_pylist(), t["types"].to_pylist())]


# ------------------------------------------------------------------------------------ SenseBERT
class SenseBertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sense_input: bool = Field(default=True, description="add the allowed supersenses' embeddings "
                                                        "to each word's input embedding")
    mask_prob: float = Field(default=0.15, gt=0, lt=1, description="share of words masked")
    regularizer_weight: float = Field(default=1.0, ge=0, description="weight of the term that "
                                      "spreads mass over a word's allowed supersenses")


@recipe("sensebert")
class SenseBertRecipe(Recipe):
    """SenseBERT (Levine et al. 2020): MLM + masked-word supersense prediction, WordNet lexnames
    as the supersenses. Each encoding actor builds the lemma -> supersenses lexicon once from the
    KG artifact; rows carry each word's allowed set, so the workers need no lexicon."""

    needs = ("text", "kg")
    Options = SenseBertOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        from fusion.models.sensebert import SUPERSENSES

        kg_rows(inputs["kg"], "entities", SYNSET_COLUMNS)
        return {"num_supersenses": len(SUPERSENSES)}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        from fusion.models.sensebert import SenseLexicon

        lexicon, counts = SenseLexicon.from_synsets(synset_rows(inputs["kg"]))
        return {"tokenizer": tokenizer, "max_length": max_length, "lexicon": lexicon,
                "kg_counts": dict(counts)}

    def encode(self, state, inputs, unit):  # noqa: ANN001, ANN201
        rows, counts = super().encode(state, inputs, unit)
        return rows, kg_counts_once(unit, state["kg_counts"], counts)

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        from fusion.models.sensebert import encode_senses

        rows, counts = [], Counter(documents=len(docs))
        for d in docs:
            ex = encode_senses(d["text"], state["tokenizer"], state["max_length"], state["lexicon"])
            counts.update(ex.counts)
            rows.append({"input_ids": ex.input_ids, "special_tokens_mask": ex.special_tokens_mask,
                         "word_start": ex.word_start, "senses": ex.senses})
        return rows, counts

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        if not kg_count("sensebert", counts, "lexicon_lemmas"):
            raise StageFailed(f"sensebert: no entity of the kg input has a WordNet lexname among its "
                              f"types ({counts}); is it a knowledge.ingest artifact of the wordnet "
                              f"source?")
        if not counts.get("words_with_supersense"):
            raise StageFailed(f"sensebert: no word of the text has a WordNet supersense ({counts}); "
                              f"is the kg input WordNet, and is the text English?")
        return resources, counts

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.sensebert import SUPERSENSES, SenseBert, SenseBertConfig

        # fusion.finetune rebuilds models with only the resources it knows (none for this recipe)
        return SenseBert(backbone, SenseBertConfig(
            num_supersenses=resources.get("num_supersenses", len(SUPERSENSES)),
            sense_input=options.sense_input,
            mask_prob=options.mask_prob, regularizer_weight=options.regularizer_weight))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        batch = pad(rows, {"input_ids": backbone.tokenizer.pad_token_id, "special_tokens_mask": 1,
                           "word_start": 0, "senses": 0})
        batch["maskable"] = batch["attention_mask"].bool() & ~batch.pop("special_tokens_mask").bool()
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}


# --------------------------------------------------------------------------------------- LIBERT
class LibertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs_per_doc: int = Field(default=4, ge=1, description="relation pairs each document carries "
                               "(each yields two nearest-unrelated negatives in its batch)")
    synonyms: bool = Field(default=True, description="synonym pairs (lemmas of one synset)")
    hypernym_relations: list[str] = Field(
        default=["hypernym", "_hypernym"], description="KG relation names whose triples give "
        "(hyponym, hypernym) pairs: wordnet's pointer name, or its WN18RR name; [] for none")
    lcr_weight: float = Field(default=1.0, ge=0, description="weight of the relation task's loss")
    mask_prob: float = Field(default=0.15, gt=0, lt=1)
    pair_seed: int = Field(default=0, description="seed of the order documents walk through the pairs")


def lexicon_pairs(kg_uri: str, options: LibertOptions) -> tuple[list[tuple[str, str, int]], Counter]:
    """LIBERT's positive pairs from the KG artifact at ``kg_uri`` (:func:`relation_pairs`):
    WordNet synsets are the entities with a lexname among their types."""
    import pyarrow.compute as pc

    from fusion.models.libert import relation_pairs
    from fusion.models.sensebert import SENSE_INDEX

    rows = synset_rows(kg_uri)
    synsets = [lemmas if any(t in SENSE_INDEX for t in types) else None for lemmas, types in rows]
    counts = Counter(entities_not_synsets=sum(s is None for s in synsets))
    rels = read_table(kg_uri, "relations", ["idx", "name"])
    wanted = [i for i, n in zip(rels["idx"].to_pylist(), rels["name"].to_pylist())
              if n in options.hypernym_relations]
    t = read_table(kg_uri, "triples", ["head", "relation", "tail"])
    t = t.filter(pc.is_in(t["relation"], pa.array(wanted, pa.int32())))
    edges = list(zip(t["head"].to_pylist(), t["tail"].to_pylist()))
    counts["hypernym_triples"] = len(edges)
    pairs, c = relation_pairs(synsets, edges, synonyms=options.synonyms)
    return pairs, counts + c


@recipe("libert")
class LibertRecipe(PlainMLM):
    """LIBERT (Lauscher et al. 2020): MLM + lexical relation classification of WordNet word pairs
    (synonyms, hyponym-hypernym), two nearest-unrelated negatives per pair drawn in its batch.

    Each encoding actor builds the pair list once and gives the document with global index g the
    pairs at positions ``g * pairs_per_doc ...`` of a seeded permutation of it
    (:func:`fusion.models.libert.doc_pair_indices`), tokenised; the workers build the negatives and
    the ``[CLS] w1 [SEP] w2 [SEP]`` sequences per batch (:func:`fusion.models.libert.pair_batch`).

    A :class:`~fusion.pretrain.recipes.PlainMLM` by descent because its encoder *is* a plain BERT
    (``model.encoder``, no extra input): ``fusion.finetune`` fine-tunes it as it does ``mlm``."""

    needs = ("text", "kg")
    Options = LibertOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        kg_rows(inputs["kg"], "entities", SYNSET_COLUMNS)
        kg_rows(inputs["kg"], "relations", ["idx", "name"])
        kg_rows(inputs["kg"], "triples", ["head", "relation", "tail"])
        return {"pairs_per_doc": options.pairs_per_doc}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        import numpy as np

        pairs, counts = lexicon_pairs(inputs["kg"], options)
        order = np.random.default_rng(options.pair_seed).permutation(len(pairs))
        return {"tokenizer": tokenizer, "max_length": max_length, "options": options,
                "pairs": [pairs[i] for i in order], "pieces": {},
                "kg_counts": {"relation_pairs": len(pairs), **counts}}

    def encode(self, state, inputs, unit):  # noqa: ANN001, ANN201
        from fusion.pretrain.corpus import read_linked_docs

        if not state["pairs"]:  # nothing to walk through: finish() says so, from the counts
            return [], kg_counts_once(unit, state["kg_counts"], Counter())
        # The document's global index picks its pairs: the unit's first document's, plus one each.
        rows, counts = self._encode(state, read_linked_docs(inputs["text"], unit), unit["doc_start"])
        return rows, kg_counts_once(unit, state["kg_counts"], counts)

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        return self._encode(state, docs, 0)

    def _encode(self, state: dict, docs: list[dict], first: int) -> tuple[list[dict], Counter]:
        from fusion.models.libert import doc_pair_indices

        tok, max_length, k = state["tokenizer"], state["max_length"], state["options"].pairs_per_doc
        pieces, pairs = state["pieces"], state["pairs"]

        def ids(word: str) -> list[int]:
            if word not in pieces:
                pieces[word] = tok(word, add_special_tokens=False)["input_ids"]
            return pieces[word]

        enc = tok([d["text"] for d in docs], truncation=True, max_length=max_length,
                  return_special_tokens_mask=True)
        rows, counts = [], Counter(documents=len(docs))
        for i, (input_ids, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
            a_ids, b_ids = [], []
            for j in doc_pair_indices(first + i, k, len(pairs)):
                a, b, rel = pairs[j]
                if 3 + len(ids(a)) + len(ids(b)) > max_length:
                    counts["pairs_too_long"] += 1
                    continue
                a_ids.append(ids(a))
                b_ids.append(ids(b))
                counts["synonym_examples" if rel == 0 else "hypernym_examples"] += 1
            rows.append({"input_ids": input_ids, "special_tokens_mask": special, "pair_a": a_ids,
                         "pair_b": b_ids})
        return rows, counts

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        if not kg_count("libert", counts, "relation_pairs"):
            raise StageFailed(f"libert: no synonym or hypernym word pair in the kg input ({counts}); "
                              f"is it a knowledge.ingest artifact of the wordnet source, and do "
                              f"the options' hypernym_relations name its relations?")
        examples = counts.get("synonym_examples", 0) + counts.get("hypernym_examples", 0)
        if not examples:
            raise StageFailed(f"libert: no relation pair fits max_length ({counts})")
        # Documents walk through the pair list in order: beyond documents * pairs_per_doc, unused.
        used = counts.get("documents", 0) * resources["pairs_per_doc"]
        return resources, {**counts, "relation_pairs_unused": max(0, counts["relation_pairs"] - used)}

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.libert import Libert, LibertConfig

        return Libert(backbone, LibertConfig(lcr_weight=options.lcr_weight, mask_prob=options.mask_prob))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.libert import pair_batch

        tok = backbone.tokenizer
        batch = pad(rows, {"input_ids": tok.pad_token_id, "special_tokens_mask": 1})
        batch["maskable"] = batch["attention_mask"].bool() & ~batch.pop("special_tokens_mask").bool()
        pairs = [(a, b) for r in rows for a, b in zip(r["pair_a"], r["pair_b"])]
        if pairs:
            # Negatives are the nearest words under the embeddings being trained (module docstring).
            weight = backbone.model.get_input_embeddings().weight
            batch.update(pair_batch(pairs, weight, tok.cls_token_id, tok.sep_token_id,
                                    tok.pad_token_id))
        # else: these documents' pairs were all too long: an MLM-only step (lcr 0), not a crash
        n = int(batch["attention_mask"].sum())
        if pairs:
            n += int(batch["pair_attention_mask"].sum())
        return {**batch, "n_tokens": n}
