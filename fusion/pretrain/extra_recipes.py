"""Pretraining recipes for WKLM (entity replacement detection) and SentiLR (sentiment-aware LA-MLM).

``wklm`` (:mod:`fusion.models.wklm`) reads the documents of a ``knowledge.link`` artifact (role
``text``) and a ``knowledge.ingest`` artifact (role ``kg``: each entity's ``name`` and ``types``).
The encoding actors replace about half the linked mentions by same-type entities' names, so the
corpus holds the changed text; mentions it cannot use (not in the KG, no type, no other same-type
entity, overlapping, truncated) are counted in the manifest.

``sentilr`` (:mod:`fusion.models.sentilr`) reads only the text: word polarity from the VADER
lexicon of the ``vaderSentiment`` package (or a file in its format, ``lexicon_path``: a path or any
fsspec URI, fingerprinted into the stage's key by :meth:`SentiLrRecipe.fingerprint`), sentence
polarity by distant supervision from it, part of speech by a heuristic; words not in the lexicon
are neutral and counted. The lexicon it read is copied into the artifact (``LEXICON_FILE``, by
:meth:`SentiLrRecipe.save_files`), and fine-tuning reads that copy (:func:`pretrained_lexicon`):
the lexicon file need not stay where it was, nor be reachable from the fine-tuning node.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from knowledge.kg import read_table
from pipeline import StageFailed
from pipeline.uris import ResolvedInput

from fusion.pretrain.knowledge_recipes import kg_count, kg_counts_once, kg_rows
from fusion.pretrain.loop import Recipe, recipe
from fusion.pretrain.recipes import PlainMLM, pad


# ------------------------------------------------------------------------------------------ WKLM
class WklmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replace_prob: float = Field(default=0.5, gt=0, lt=1, description="share of usable mentions "
                                "replaced by another entity of the same type")
    mask_prob: float = Field(default=0.05, gt=0, lt=1, description="MLM rate (outside mentions)")
    replacement_weight: float = Field(default=1.0, ge=0, description="weight of the replacement loss")
    replacement_seed: int = Field(default=0, description="seed of the replacements (with the doc id)")


def replacement_index(kg_uri: str) -> Any:
    from fusion.models.wklm import ReplacementIndex

    t = read_table(kg_uri, "entities", ["id", "name", "types"])
    return ReplacementIndex(t["id"].to_pylist(), t["name"].to_pylist(), t["types"].to_pylist())


@recipe("wklm")
class WklmRecipe(PlainMLM):
    """WKLM (Xiong et al. 2020): MLM at 5% outside mentions + detection of mentions replaced by a
    same-type entity's name. A :class:`~fusion.pretrain.recipes.PlainMLM` by descent because its
    encoder is a plain BERT (``model.encoder``, no extra input): ``fusion.finetune`` and the export
    treat it as they treat ``mlm``."""

    needs = ("text", "kg")
    Options = WklmOptions

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        kg_rows(inputs["kg"], "entities", ["id", "name", "types"])
        return {}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        index = replacement_index(inputs["kg"])
        counts = {"entities": len(index.names), "entities_without_type":
                  sum(t is None for t in index.type_of), "entity_types": len(index.by_type),
                  "entity_types_replaceable": sum(n >= 2 for n in index.names_per_type.values())}
        return {"tokenizer": tokenizer, "max_length": max_length, "options": options,
                "index": index, "kg_counts": counts}

    def encode(self, state, inputs, unit):  # noqa: ANN001, ANN201
        rows, counts = super().encode(state, inputs, unit)
        return rows, kg_counts_once(unit, state["kg_counts"], counts)

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        from fusion.models.wklm import doc_rng, encode_wklm, replace_mentions

        opt = state["options"]
        rows, counts = [], Counter(documents=len(docs))
        for d in docs:
            rng = doc_rng(opt.replacement_seed, d["id"])
            text, spans = replace_mentions(d["text"], d["mentions"], state["index"], rng,
                                           opt.replace_prob, counts)
            ex = encode_wklm(text, spans, state["tokenizer"], state["max_length"])
            counts.update(ex.counts)
            rows.append({"text": ex.text, "input_ids": ex.input_ids,
                         "special_tokens_mask": ex.special_tokens_mask, "in_mention": ex.in_mention,
                         "mention_start": ex.mention_start, "mention_end": ex.mention_end,
                         "mention_original": ex.mention_original})
        return rows, counts

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        if not kg_count("wklm", counts, "entity_types_replaceable"):
            raise StageFailed(f"wklm: no entity type of the kg input has two entities with different "
                              f"names ({counts}); replacement needs same-type alternatives")
        if not counts.get("mentions_labelled"):
            raise StageFailed(f"wklm: no mention could take part in replacement detection ({counts}); "
                              f"are the text and the kg from the same knowledge graph, with types?")
        return resources, counts

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.wklm import Wklm, WklmConfig

        return Wklm(backbone, WklmConfig(mask_prob=options.mask_prob,
                                         replacement_weight=options.replacement_weight))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        batch = pad(rows, {"input_ids": backbone.tokenizer.pad_token_id, "special_tokens_mask": 1,
                           "in_mention": 0})
        batch["maskable"] = batch["attention_mask"].bool() & ~batch.pop("special_tokens_mask").bool()
        flat = [(b, s, e, y) for b, r in enumerate(rows)
                for s, e, y in zip(r["mention_start"], r["mention_end"], r["mention_original"])]
        cols = list(zip(*flat)) if flat else [(), (), (), ()]
        for k, c in zip(("mention_batch", "mention_start", "mention_end", "mention_original"), cols):
            batch[k] = torch.tensor(c, dtype=torch.long)
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}


# --------------------------------------------------------------------------------------- SentiLR
class SentiLrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A local path is made absolute (an encoding actor has another working directory); a URI is
    # kept as written; either is fingerprinted into the stage's key.
    lexicon_path: ResolvedInput | None = Field(
        default=None, description="a lexicon file in VADER's format (token<TAB>valence...), a path or "
                                  "a URI (s3://...); None: vaderSentiment's vader_lexicon.txt")
    polarity_threshold: float = Field(default=0.0, ge=0, description="valences within it are neutral")
    sentence_margin: float = Field(default=0.0, ge=0, description="summed valences within it: a "
                                   "neutral sentence")
    mask_prob: float = Field(default=0.15, gt=0, lt=1, description="masking rate of other words")
    sentiment_mask_prob: float = Field(default=0.3, gt=0, lt=1, description="masking rate of "
                                       "words with a polarity")
    early_fusion_share: float = Field(default=0.5, ge=0, le=1, description="rows given their "
                                      "sentence label (the others predict it)")
    pos_weight: float = Field(default=1.0, ge=0)
    polarity_weight: float = Field(default=1.0, ge=0)
    sentence_weight: float = Field(default=1.0, ge=0)


LEXICON_FILE = "sentilr_lexicon.txt"  # the lexicon pretraining read, kept in its artifact


def lexicon_source(options: SentiLrOptions) -> str:
    """Where the lexicon ``options`` name is: ``lexicon_path``, else the ``vader_lexicon.txt`` of
    the installed ``vaderSentiment`` package (MIT; the ``sentiment`` extra)."""
    import importlib.util

    if options.lexicon_path is not None:
        return options.lexicon_path
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise StageFailed("sentilr: cannot load the polarity lexicon: the VADER lexicon needs the "
                          "vaderSentiment package (pip install 'stele[sentiment]')")
    return str(Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt")


def read_lexicon(uri: str | Path, threshold: float = 0.0) -> Any:
    """A :class:`fusion.models.sentilr.PolarityLexicon` from a VADER-format file at a path or any
    fsspec URI (``token<TAB>mean valence<TAB>...`` per line, as
    :meth:`~fusion.models.sentilr.PolarityLexicon.from_file` reads a local one). A malformed line
    is an error naming the file and line."""
    from fusion.models.sentilr import PolarityLexicon
    from pipeline.uris import open_input

    with open_input(str(uri), "rb") as f:
        return PolarityLexicon.from_lines((raw.decode("utf-8") for raw in f), str(uri), threshold)


def load_lexicon(options: SentiLrOptions, source: str | Path | None = None) -> Any:
    """The lexicon ``options`` name (or the file ``source``), errors as one :class:`StageFailed`."""
    try:
        return read_lexicon(source or lexicon_source(options), options.polarity_threshold)
    except (ImportError, OSError, ValueError, UnicodeDecodeError) as e:
        raise StageFailed(f"sentilr: cannot load the polarity lexicon: {e}") from None


def pretrained_lexicon(artifact: Path, options: SentiLrOptions) -> Any:
    """The lexicon a ``fusion.pretrain`` artifact of ``sentilr`` was trained with: the copy it keeps
    (``LEXICON_FILE``); an artifact written before the copy was kept reads its options' file."""
    kept = Path(artifact) / LEXICON_FILE
    return load_lexicon(options, kept if kept.is_file() else None)


@recipe("sentilr")
class SentiLrRecipe(Recipe):
    """SentiLR / SentiLARE (Ke et al. 2020): label-aware MLM with POS and word-polarity input
    embeddings and a sentence polarity task. Each encoding actor loads the lexicon once (by URI);
    rows carry each word's POS and polarity and the row's sentence label, so the workers need no
    lexicon, and the stage's process only checks that the file exists."""

    needs = ("text",)
    Options = SentiLrOptions

    def fingerprint(self, options: SentiLrOptions) -> str:
        """The lexicon file's state for the stage's key (:func:`pipeline.uris.input_fingerprint`:
        content locally, size and ETag or checksum on a URI): an edited lexicon re-runs."""
        from pipeline.uris import input_fingerprint

        try:
            return input_fingerprint(lexicon_source(options))
        except StageFailed as e:  # vaderSentiment missing: the run itself says so
            return str(e)

    def resources(self, inputs, options):  # noqa: ANN001, ANN201
        from pipeline.uris import input_path

        source = lexicon_source(options)
        if not input_path(source).is_file():
            raise StageFailed(f"sentilr: cannot load the polarity lexicon: {source}: no such file")
        return {}

    def encoder(self, inputs, options, tokenizer, max_length):  # noqa: ANN001, ANN201
        lexicon = load_lexicon(options)
        return {"tokenizer": tokenizer, "max_length": max_length, "options": options,
                "lexicon": lexicon, "kg_counts": {"lexicon_entries": len(lexicon)}}

    def encode(self, state, inputs, unit):  # noqa: ANN001, ANN201
        rows, counts = super().encode(state, inputs, unit)
        return rows, kg_counts_once(unit, state["kg_counts"], counts)

    def save_files(self, resources: dict[str, Any], options: SentiLrOptions, out: Path) -> None:
        """Copy the lexicon into the artifact (``LEXICON_FILE``), byte for byte, streamed."""
        import shutil

        from pipeline.uris import open_input

        with open_input(lexicon_source(options), "rb") as src, open(Path(out) / LEXICON_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst)

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        from fusion.models.sentilr import encode_sentilr

        rows, counts = [], Counter(documents=len(docs))
        for d in docs:
            ex = encode_sentilr(d["text"], state["tokenizer"], state["max_length"], state["lexicon"],
                                state["options"].sentence_margin)
            counts.update(ex.counts)
            rows.append({"input_ids": ex.input_ids, "special_tokens_mask": ex.special_tokens_mask,
                         "word_start": ex.word_start, "pos": ex.pos, "polarity": ex.polarity,
                         "sentence_label": ex.sentence_label})
        return rows, counts

    def finish(self, resources, counts):  # noqa: ANN001, ANN201
        if not counts.get("words_positive", 0) + counts.get("words_negative", 0):
            raise StageFailed(f"sentilr: no word of the text has a polarity in the lexicon ({counts}); "
                              f"is the text English?")
        return resources, counts

    def build(self, backbone, resources, options):  # noqa: ANN001, ANN201
        from fusion.models.sentilr import SentiLr, SentiLrConfig

        return SentiLr(backbone, SentiLrConfig(
            mask_prob=options.mask_prob, sentiment_mask_prob=options.sentiment_mask_prob,
            early_fusion_share=options.early_fusion_share, pos_weight=options.pos_weight,
            polarity_weight=options.polarity_weight, sentence_weight=options.sentence_weight))

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001, ANN201
        from fusion.models.sentilr import POLARITY_UNKNOWN, POS_UNKNOWN

        batch = pad(rows, {"input_ids": backbone.tokenizer.pad_token_id, "special_tokens_mask": 1,
                           "word_start": 0, "pos": POS_UNKNOWN, "polarity": POLARITY_UNKNOWN})
        batch["maskable"] = batch["attention_mask"].bool() & ~batch.pop("special_tokens_mask").bool()
        batch["sentence_label"] = torch.tensor([r["sentence_label"] for r in rows], dtype=torch.long)
        return {**batch, "n_tokens": int(batch["attention_mask"].sum())}
