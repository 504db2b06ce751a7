"""WKLM: weakly supervised entity replacement detection beside masked language modelling.

Xiong, Du, Wang & Stoyanov (2020), "Pretrained Encyclopedia: Weakly Supervised Knowledge-Pretrained
Language Model", ICLR (arXiv 1912.09637).

The text's linked mentions are the weak supervision: each mention ``e`` of an entity with a type is,
with probability ``replace_prob`` (the paper: 0.5), replaced *in the text* by the name of another
entity of the same type drawn uniformly from the KG, so the corrupted sentence stays fluent and only
knowledge tells it apart. The model reads the (partly replaced) text and a binary classifier at each
mention's boundaries says whether the mention is the original one::

    h_e   = [ H[b, s_e] ; H[b, t_e] ]                 start and end wordpiece of the mention (2D,)
    P(e)  = sigmoid( w^T h_e + c )                     w (2D,), c scalar: "the mention is original"
    L_rep = -1/|E| sum_e [ y_e log P(e) + (1 - y_e) log(1 - P(e)) ]   y_e = 1 original, 0 replaced
    L     = L_MLM + lambda * L_rep                     (paper: lambda = 1)

The boundary vectors are *concatenated* (not pooled), so the classifier sees where the span begins
and ends; ``s_e = t_e`` for a one-piece mention. MLM runs beside it at a reduced rate (the paper
masks 5% of the tokens instead of BERT's 15%, 80/10/10) and never inside a mention: a masked
mention would hide the very evidence the replacement task is about.

Types and names come from the KG (``knowledge.kg``): an entity's type is the *first* of its
``types`` (the paper uses Wikidata's "instance of"); the replacement is another entity of that type
whose name differs (case-insensitively) from the mention's entity's name, since an identical
surface labelled "replaced" could never be detected. Mentions whose entity is not in the KG, has no
type, or has no other same-type entity with another name take no part in the task (no label, no
coin flipped, so the replaced share among labelled mentions stays ``replace_prob``); they are
counted, and MLM still never masks them. Overlapping mentions keep the first one (counted).

Replacement happens when the corpus is encoded (the tokens change), drawn from a generator seeded by
the replacement seed and the document id, so a corpus is the same whichever actor encodes which
document. Left out: the paper's rule that keeps adjacent mentions from being replaced together.

Row layout (:func:`encode_wklm`): ``text`` (after replacement), ``input_ids``,
``special_tokens_mask``, ``in_mention`` (1 on every piece of any mention), and per labelled mention
``mention_start``, ``mention_end`` (wordpiece indices, inclusive) and ``mention_original``
(1 original, 0 replaced).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from fusion.models.heads import MLMHead
from fusion.models.layers import summary
from fusion.models.objectives import mlm_mask


# ----------------------------------------------------------------------------------- replacement
class ReplacementIndex:
    """Entity id -> (name, type) and type -> entities, from a KG's entity columns. :meth:`draw`
    gives another entity of the same type with another name, or None where there is none."""

    def __init__(self, ids: Sequence[str], names: Sequence[str], types: Sequence[Sequence[str] | None]):
        self.index = {e: i for i, e in enumerate(ids)}
        self.names = list(names)
        self.type_of = [(t[0] if t else None) for t in types]
        by_type: dict[str, list[int]] = {}
        for i, t in enumerate(self.type_of):
            if t is not None:
                by_type.setdefault(t, []).append(i)
        self.by_type = {t: np.asarray(v) for t, v in by_type.items()}
        # a type whose entities all share one name can never give a detectable replacement
        self.names_per_type = {t: len({self.names[i].lower() for i in v}) for t, v in by_type.items()}

    def draw(self, entity: int, rng: np.random.Generator) -> int | None:
        """A uniformly drawn entity of ``entity``'s type whose name differs from its name."""
        t = self.type_of[entity]
        if t is None or self.names_per_type[t] < 2:
            return None
        pool, own = self.by_type[t], self.names[entity].lower()
        for _ in range(16):  # rejection: cheap while few same-type entities share the name
            j = int(pool[rng.integers(len(pool))])
            if self.names[j].lower() != own:
                return j
        others = [int(j) for j in pool if self.names[j].lower() != own]
        return others[int(rng.integers(len(others)))]


def doc_rng(seed: int, doc_id: str) -> np.random.Generator:
    """A generator that depends on the seed and the document only (not on who encodes it)."""
    h = int.from_bytes(hashlib.blake2b(str(doc_id).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, h])


class Span(NamedTuple):
    start: int           # characters in the new text
    end: int
    original: int | None  # 1 original, 0 replaced, None: no label (no same-type entity, ...)


def replace_mentions(text: str, mentions: Sequence[tuple[int, int, str]], index: ReplacementIndex,
                     rng: np.random.Generator, prob: float = 0.5, counts: Counter | None = None
                     ) -> tuple[str, list[Span]]:
    """``(new text, spans)``: each usable mention (module docstring) is replaced with probability
    ``prob`` by a same-type entity's name; spans are the mentions' character ranges in the new
    text. ``counts`` gets ``mentions_not_in_kg``, ``mentions_without_type``,
    ``mentions_no_same_type_entity``, ``mentions_overlapping``, ``mentions_replaced`` and
    ``mentions_original``."""
    counts = Counter() if counts is None else counts
    pieces, spans, at, shift = [], [], 0, 0
    for s, e, ent in sorted(mentions, key=lambda m: (m[0], m[1])):
        if s < at or not 0 <= s < e <= len(text):
            counts["mentions_overlapping" if s < at else "mentions_bad_offsets"] += 1
            continue
        pieces.append(text[at:s])
        i = index.index.get(ent)
        label: int | None = None
        surface = text[s:e]
        if i is None:
            counts["mentions_not_in_kg"] += 1
        elif index.type_of[i] is None:
            counts["mentions_without_type"] += 1
        elif (j := index.draw(i, rng)) is None:
            counts["mentions_no_same_type_entity"] += 1
        elif rng.random() < prob:
            surface, label = index.names[j], 0
            counts["mentions_replaced"] += 1
        else:
            label = 1
            counts["mentions_original"] += 1
        start = s + shift
        spans.append(Span(start, start + len(surface), label))
        shift += len(surface) - (e - s)
        pieces.append(surface)
        at = e
    pieces.append(text[at:])
    return "".join(pieces), spans


class WklmExample(NamedTuple):
    text: str
    input_ids: list[int]
    special_tokens_mask: list[int]
    in_mention: list[int]
    mention_start: list[int]
    mention_end: list[int]
    mention_original: list[int]
    counts: Counter


def encode_wklm(text: str, spans: Sequence[Span], tokenizer: Any, max_length: int) -> WklmExample:
    """The (already replaced) text and its mention spans -> a WKLM row (module docstring). A
    labelled mention truncated away, or cut by truncation (its end boundary would be the last kept
    piece, not its own), or covering no wordpiece is counted (``mentions_truncated``,
    ``mentions_unaligned``) and left out of the task."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True,
                    return_offsets_mapping=True)
    special, offsets = enc["special_tokens_mask"], enc["offset_mapping"]
    real = [k for k in range(len(offsets)) if not special[k] and offsets[k][1] > offsets[k][0]]
    in_mention = [0] * len(offsets)
    starts, ends, labels, counts = [], [], [], Counter()
    for sp in spans:
        pieces = [k for k in real if offsets[k][1] > sp.start and offsets[k][0] < sp.end]
        for k in pieces:
            in_mention[k] = 1
        if sp.original is None:
            continue
        covered = offsets[real[-1]][1] if real else 0      # the text's last character kept
        cut = bool(text[covered:].strip())                  # truncation dropped some of the text
        if not pieces or (cut and sp.end > covered):        # gone, or only its first pieces kept:
            truncated = not real or sp.start >= covered or bool(pieces)   # its end vector would lie
            counts["mentions_truncated" if truncated else "mentions_unaligned"] += 1
            continue
        starts.append(pieces[0])
        ends.append(pieces[-1])
        labels.append(sp.original)
        counts["mentions_labelled"] += 1
    return WklmExample(text, list(enc["input_ids"]), list(special), in_mention, starts, ends,
                       labels, counts)


# ----------------------------------------------------------------------------------- the model
@dataclass
class WklmConfig:
    mask_prob: float = 0.05         # MLM rate outside mentions (the paper lowers BERT's 0.15)
    replacement_weight: float = 1.0  # lambda
    initializer_range: float | None = None  # None: the backbone's


class Wklm(nn.Module):
    """A BERT-family backbone with an MLM head and WKLM's replacement classifier.

    ``loss(batch, generator)`` takes ``input_ids``, ``attention_mask``, ``maskable``,
    ``in_mention`` (B, L) and the flat mention tensors ``mention_batch``, ``mention_start``,
    ``mention_end``, ``mention_original`` (N,) from the recipe's collate; returns
    ``{"mlm", "replacement", "total"}`` (``replacement = 0`` for a batch without labelled
    mentions)."""

    def __init__(self, backbone: Any, config: WklmConfig | None = None):
        super().__init__()
        self.config = cfg = config or WklmConfig()
        bc = backbone.model.config
        self.std = bc.initializer_range if cfg.initializer_range is None else cfg.initializer_range
        self.encoder = backbone.model
        self.mask_token_id, self.vocab_size = backbone.tokenizer.mask_token_id, bc.vocab_size
        if self.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; MLM needs one")
        self.mlm = MLMHead(self.encoder.get_input_embeddings(), bc.hidden_size, bc.layer_norm_eps)
        self.replacement = nn.Linear(2 * bc.hidden_size, 1)   # w, c on [h_start ; h_end]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new parts only (the backbone keeps its weights): BERT's initialisation."""
        for lin in (self.mlm.dense, self.replacement):
            nn.init.normal_(lin.weight, std=self.std)
            nn.init.zeros_(lin.bias)
        self.mlm.norm.reset_parameters()
        nn.init.zeros_(self.mlm.bias)

    def replacement_logits(self, hidden: torch.Tensor, batch_idx: torch.Tensor, start: torch.Tensor,
                           end: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B, L, D) and mentions (N,) -> logits (N,) of "original"."""
        h = torch.cat([hidden[batch_idx, start], hidden[batch_idx, end]], dim=-1)    # (N, 2D)
        return self.replacement(h).squeeze(-1)                                       # (N,)

    def mask(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(corrupted ids, MLM labels)`` (B, L): 80/10/10 MLM at ``mask_prob`` over the maskable
        tokens outside every mention."""
        maskable = batch["maskable"].bool() & ~batch["in_mention"].bool()            # (B, L)
        return mlm_mask(batch["input_ids"], maskable, self.mask_token_id, self.vocab_size,
                        generator, prob=self.config.mask_prob)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        ids, labels = self.mask(batch, generator)
        hidden = self.encoder(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        mlm = self.mlm.loss(hidden, labels)
        if len(batch["mention_batch"]):
            logits = self.replacement_logits(hidden, batch["mention_batch"], batch["mention_start"],
                                             batch["mention_end"])
            rep = nn.functional.binary_cross_entropy_with_logits(
                logits.float(), batch["mention_original"].float())
        else:
            rep = self.replacement(hidden[:, 0].repeat(1, 2)).sum() * 0.0  # graph whole for DDP
        return {"mlm": mlm, "replacement": rep, "total": mlm + self.config.replacement_weight * rep}

    def __repr__(self) -> str:
        return summary(self, hidden_size=self.encoder.config.hidden_size,
                       mask_prob=self.config.mask_prob,
                       replacement_weight=self.config.replacement_weight)
