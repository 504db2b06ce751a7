"""K-BERT: knowledge injected into the sentence as branches of a tree, kept apart by a visible matrix.

Liu et al. 2020, "K-BERT: Enabling Language Representation with Knowledge Graph" (AAAI); reference code
autoliuweijie/K-BERT (``brain/knowgraph.py``, ``uer/encoders/bert_encoder.py``).

Three parts, as in the paper:

* **Knowledge layer** (:class:`KnowledgeLayer`). For each entity mention of the text, up to ``k``
  triples (entity, relation, tail) of the KG become a *branch*: the wordpieces of the relation name then
  of the tail name, inserted right after the last wordpiece of the mention. The result is a *sentence
  tree*, flattened into one sequence. The paper's example, "Tim Cook is visiting Beijing now" with
  (Tim Cook, CEO, Apple), (Beijing, capital, China), (Beijing, is_a, City), flattens to::

      [CLS] tim cook ceo apple is visiting beijing capital china is a city now [SEP]
      soft  0   1    2   3     4  3    4       5       6       7     6  7 8   6   7

* **Embedding layer with soft positions.** A flattened tree read with ordinary positions would tell the
  model that "is" comes three places after "cook", and the knowledge would change the sentence's meaning.
  So each token gets a *soft position*: the trunk (the sentence itself, with [CLS] and [SEP]) continues
  as if no branch were there, and a branch continues from its entity's last position (``5 -> 6, 7`` for
  the "capital china" branch of "beijing"). Two branches of one entity therefore share positions, and a
  branch shares positions with the trunk tokens after its entity; the visible matrix keeps them apart.

* **Seeing layer / mask-self-attention.** Visible matrix ``M`` (L, L), ``M[i, j]`` true when token i may
  attend to token j:

  - trunk tokens see every trunk token (the sentence reads as plain BERT would read it);
  - the tokens of an entity mention (all its wordpieces) also see their own branches;
  - a branch token sees its own branch and the tokens of the mention it hangs on, nothing else.

  Attention scores get ``+0`` where visible and a very large negative number where not
  (``softmax(QK^T/sqrt(d) + M')``, M' = 0 / -inf; the reference code uses -10000). Knowledge thus
  reaches the rest of the sentence only through its entity, one layer later: the paper's answer to
  "knowledge noise" (injected facts diverting the sentence from its meaning).

Choices beyond the paper, and why:

* Wordpieces, not characters: the paper works on Chinese characters; here a mention (a character span
  from ``knowledge.link``) covers one or more wordpieces, and the branch hangs on the last one. Relation
  names have ``_`` read as a space ("is_a" -> "is a"), so they tokenise into words a vocabulary knows.
* Truncation: when the flattened tree exceeds ``max_length``, whole branches are dropped, last ones in
  sentence order first, before a single trunk token is cut; only when the trunk alone does not fit is it
  truncated (after every branch went). The reference code cuts the flattened sequence at ``max_length``,
  which can lose trunk tokens to knowledge, and leave half a triple. Knowledge is optional, the text is not.
* Segment (token type) ids: a branch takes its sentence's segment, 0 here (one text per tree). The
  reference code also feeds the same segment to the branch and its sentence; its knowledge-layer output
  marks branches with segment 1 but that output is thrown away (``tokens, pos, vm, _ = ...``). Which
  tokens are knowledge is recorded in ``trunk`` instead.
* Padding (:func:`collate_trees`): a padding token is invisible to every real token, and sees only
  itself. A row with nothing visible would be all ``-inf`` under half precision (the additive mask is
  cast to fp16 by autocast) and softmax would give NaN, which then leaks into every row of the next layer
  through ``0 * NaN``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone
from fusion.models.objectives import IGNORE, mlm_mask

# ---------------------------------------------------------------------------------------------------
# Knowledge layer: text + mentions + KG -> sentence tree
# ---------------------------------------------------------------------------------------------------


class TripleLookup:
    """Entity index -> its (relation name, tail name) pairs, the KG as the knowledge layer queries it
    (the reference code's ``lookup_table``).

    Built from plain triples ``(head_idx, relation_name, tail_name)``, so it knows no file format; a KG's
    index tables turn into it with :meth:`from_indices`. Pairs keep the order they were given in
    (duplicates dropped), and "the first ``k``" means that order: sort the triples beforehand to prefer
    some relations. ``_`` in names reads as a space (``underscores=False`` keeps it).
    """

    def __init__(self, triples: Iterable[tuple[int, str, str]], *, underscores: bool = True) -> None:
        table: dict[int, dict[tuple[str, str], None]] = defaultdict(dict)  # dict as an ordered set
        for head, relation, tail in triples:
            if underscores:
                relation, tail = _readable(relation), _readable(tail)
            table[int(head)][(relation, tail)] = None
        self._table = {h: list(pairs) for h, pairs in table.items()}

    @classmethod
    def from_indices(cls, heads: Sequence[int], relations: Sequence[int], tails: Sequence[int],
                     relation_names: Sequence[str], entity_names: Sequence[str],
                     **kw: Any) -> "TripleLookup":
        """From index columns (a KG's ``head``, ``relation``, ``tail``; lists or arrays) and the name
        of every relation and entity index."""
        return cls(((int(h), relation_names[int(r)], entity_names[int(t)])
                    for h, r, t in zip(heads, relations, tails, strict=True)), **kw)

    def get(self, entity_idx: int, k: int | None = None) -> list[tuple[str, str]]:
        """The first ``k`` (relation, tail) pairs of an entity (all when ``k`` is None)."""
        pairs = self._table.get(int(entity_idx), [])
        return pairs if k is None else pairs[:k]

    def __contains__(self, entity_idx: object) -> bool:
        return entity_idx in self._table

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        n = sum(len(p) for p in self._table.values())
        return f"TripleLookup(num_heads={len(self._table)}, num_pairs={n})"


def _readable(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


@dataclass
class SentenceTree:
    """One flattened sentence tree (L tokens); the counts say what happened to the knowledge."""

    input_ids: torch.Tensor        # (L,) long
    position_ids: torch.Tensor     # (L,) long, soft positions
    token_type_ids: torch.Tensor   # (L,) long, all 0 (one text)
    visible: torch.Tensor          # (L, L) bool, visible[i, j]: token i attends to token j
    trunk: torch.Tensor            # (L,) bool, True for the sentence ([CLS] and [SEP] included)
    special: torch.Tensor          # (L,) bool, [CLS] and [SEP]
    injected: int = 0              # branches (triples) in the tree
    dropped: int = 0               # branches that did not fit in max_length
    without_triples: int = 0       # mentions whose entity has no triple in the lookup
    unaligned: int = 0             # mentions that cover no wordpiece (e.g. a span of spaces)

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def _mention_fields(m: Any) -> tuple[int, int, int]:
    """``(start, end, entity_idx)`` from a ``knowledge.link.Mention`` or a plain 3-tuple."""
    if hasattr(m, "entity_idx"):
        return int(m.start), int(m.end), int(m.entity_idx)
    start, end, entity_idx = m
    return int(start), int(end), int(entity_idx)


class KnowledgeLayer:
    """Text + entity mentions -> :class:`SentenceTree` (the paper's knowledge layer).

    ``mentions`` are character spans into ``text`` with their entity, ``(start, end, entity_idx)`` or
    ``knowledge.link.Mention``; every wordpiece overlapping the span belongs to the mention. ``k`` caps
    the triples per mention; ``max_length`` counts [CLS] and [SEP]. The tokenizer must be a fast one
    (character offsets) with [CLS]/[SEP]-style special tokens.
    """

    def __init__(self, tokenizer: Any, lookup: TripleLookup, k: int = 2, max_length: int = 128) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("KnowledgeLayer needs a fast tokenizer (character offsets)")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("KnowledgeLayer needs a tokenizer with [CLS] and [SEP] tokens")
        if k < 0 or max_length < 2:
            raise ValueError(f"need k >= 0 and max_length >= 2, got k={k}, max_length={max_length}")
        self.tokenizer, self.lookup, self.k, self.max_length = tokenizer, lookup, k, max_length

    def __call__(self, text: str, mentions: Iterable[Any] = ()) -> SentenceTree:
        return tree_from_row(self.flatten(text, mentions))

    def flatten(self, text: str, mentions: Iterable[Any] = ()) -> dict[str, Any]:
        """The tree as plain lists (what a pretraining corpus stores; :func:`tree_from_row` builds
        the :class:`SentenceTree`): ``input_ids``, ``position_ids``, ``trunk`` (L,), ``branches``
        ``[{"start", "end", "anchors": [flat index of each of its entity's wordpieces]}, ...]`` and
        the counts."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        words, offsets = enc["input_ids"], enc["offset_mapping"]

        # Each aligned mention: its wordpieces (text positions) and its branches (token id lists).
        entities: list[list[int]] = []
        pairs_of: list[list[tuple[str, str]]] = []
        without = unaligned = 0
        for m in mentions:
            start, end, entity_idx = _mention_fields(m)
            pieces = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if not pieces:
                unaligned += 1
                continue
            if entity_idx not in self.lookup:
                without += 1
            pairs = self.lookup.get(entity_idx, self.k)
            if pairs:
                entities.append(pieces)
                pairs_of.append(pairs)
        # One branch per triple, relation then tail wordpieces (one tokenizer call for the whole text).
        texts = [f"{r} {t}" for pairs in pairs_of for r, t in pairs]
        token_lists = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        owners = [e for e, pairs in enumerate(pairs_of) for _ in pairs]       # mention number per branch
        branches = [(e, ids) for e, ids in zip(owners, token_lists) if ids]
        # Sentence order of the anchors, so truncation drops from the end of the sentence.
        branches.sort(key=lambda eb: entities[eb[0]][-1])  # stable: triple order kept within a mention

        budget = self.max_length - 2                       # room left by [CLS] and [SEP]
        if len(words) > budget:                            # trunk alone too long: all knowledge goes first
            words, kept = words[:budget], []
        else:
            room, kept = budget - len(words), []
            for e, ids in branches:                        # longest prefix that fits = drop last ones first
                if len(ids) > room:
                    break
                kept.append((e, ids))
                room -= len(ids)
        dropped = len(branches) - len(kept)

        # Flatten: trunk token at text position p has soft position p + 1 ([CLS] is 0) whatever was
        # inserted before it; a branch after anchor p takes p + 2, p + 3, ...
        at_anchor: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        for e, ids in kept:
            at_anchor[entities[e][-1]].append((e, ids))
        ids_out, pos_out, trunk_out = [self.tokenizer.cls_token_id], [0], [True]
        where: list[int] = []                              # text position -> flat index
        spans: list[tuple[int, int, int]] = []             # (mention number, flat start, flat end)
        for p, w in enumerate(words):
            where.append(len(ids_out))
            ids_out += [w]
            pos_out += [p + 1]
            trunk_out += [True]
            for e, ids in at_anchor.get(p, ()):
                spans.append((e, len(ids_out), len(ids_out) + len(ids)))
                ids_out += ids
                pos_out += range(p + 2, p + 2 + len(ids))
                trunk_out += [False] * len(ids)
        ids_out += [self.tokenizer.sep_token_id]
        pos_out += [len(words) + 1]
        trunk_out += [True]

        return {"input_ids": ids_out, "position_ids": pos_out, "trunk": trunk_out,
                "branches": [{"start": a, "end": b, "anchors": [where[p] for p in entities[e]]}
                             for e, a, b in spans],
                "injected": len(kept), "dropped": dropped, "without_triples": without,
                "unaligned": unaligned}

    def __repr__(self) -> str:
        return f"KnowledgeLayer(k={self.k}, max_length={self.max_length}, lookup={self.lookup!r})"


def tree_from_row(row: dict[str, Any]) -> SentenceTree:
    """The :class:`SentenceTree` of :meth:`KnowledgeLayer.flatten`'s row: the trunk sees the trunk;
    a branch ``[a, b)`` sees itself and its entity's wordpieces, which see it back."""
    n = len(row["input_ids"])
    trunk = torch.tensor(row["trunk"], dtype=torch.bool)                   # (L,)
    visible = trunk[:, None] & trunk[None, :]                              # (L, L) trunk sees trunk
    for br in row["branches"]:
        a, b, ent = br["start"], br["end"], torch.tensor(br["anchors"], dtype=torch.long)
        visible[a:b, a:b] = True                       # a branch sees itself ...
        visible[a:b, ent] = True                       # ... and its entity's wordpieces,
        visible[ent, a:b] = True                       # which see it back
    special = torch.zeros(n, dtype=torch.bool)
    special[[0, n - 1]] = True
    return SentenceTree(
        input_ids=torch.tensor(row["input_ids"], dtype=torch.long),
        position_ids=torch.tensor(row["position_ids"], dtype=torch.long),
        token_type_ids=torch.zeros(n, dtype=torch.long), visible=visible, trunk=trunk,
        special=special, injected=row["injected"], dropped=row["dropped"],
        without_triples=row["without_triples"], unaligned=row["unaligned"])


def collate_trees(trees: Sequence[SentenceTree], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad trees to the longest one: ``input_ids``, ``position_ids``, ``token_type_ids``,
    ``attention_mask`` (B, L); ``visible`` (B, L, L); ``trunk``, ``special`` (B, L) bool.

    Padding is invisible to every real token; a padding token sees only itself (see the module
    docstring: a row with nothing visible turns into NaN under half precision).
    """
    b, n = len(trees), max(len(t) for t in trees)
    out = {
        "input_ids": torch.full((b, n), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros(b, n, dtype=torch.long),
        "token_type_ids": torch.zeros(b, n, dtype=torch.long),
        "attention_mask": torch.zeros(b, n, dtype=torch.long),
        "visible": torch.eye(n, dtype=torch.bool).repeat(b, 1, 1),   # (B, L, L)
        "trunk": torch.zeros(b, n, dtype=torch.bool),
        "special": torch.zeros(b, n, dtype=torch.bool),
    }
    for i, t in enumerate(trees):
        m = len(t)
        for key in ("input_ids", "position_ids", "token_type_ids", "trunk", "special"):
            out[key][i, :m] = getattr(t, key)
        out["attention_mask"][i, :m] = 1
        out["visible"][i, :m, :m] = t.visible
    return out


# ---------------------------------------------------------------------------------------------------
# Model: a BERT encoder run over the sentence tree
# ---------------------------------------------------------------------------------------------------


@dataclass
class KBertConfig:
    k: int = 2                   # triples per entity (the reference code's MAX_ENTITIES)
    max_length: int = 128        # flattened tree length, [CLS] and [SEP] included
    mlm_prob: float = 0.15       # share of trunk tokens MLM predicts


@dataclass
class KBertOutput:
    hidden: torch.Tensor         # (B, L, D) last hidden states
    pooled: torch.Tensor         # (B, D) the [CLS] vector


def visible_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool -> (B, 1, L, L) additive attention bias: 0 where visible, dtype's minimum where not.

    An additive float mask is the one 4-D form that transformers 5's BERT attentions all read alike: a
    4-D ``attention_mask`` goes to the attention function untouched; ``sdpa`` hands it to
    ``torch.nn.functional.scaled_dot_product_attention``, which reads a bool mask as "may attend" and a
    float one as a bias, but ``eager`` always *adds* it to the scores, so a bool (or 0/1) mask there
    adds +1 to visible pairs and masks nothing.
    """
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible, torch.finfo(dtype).min)
    return bias[:, None]                                   # (B, 1, L, L)


class KBert(nn.Module):
    """K-BERT over a BERT-family backbone: soft positions into the embeddings, the visible matrix as
    mask-self-attention in every layer; an MLM head tied to the word embeddings.

    Pretraining objective (:meth:`loss`): MLM on trunk tokens only. The paper fine-tunes a BERT that was
    pretrained without knowledge; this loss is for continued pretraining over sentence trees.
    """

    def __init__(self, backbone: TextBackbone, config: KBertConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or KBertConfig()
        self.bert = backbone.model
        self.tokenizer = backbone.tokenizer
        bert_cfg = self.bert.config
        if bert_cfg._attn_implementation not in ("eager", "sdpa"):
            # flash attention kernels take no arbitrary (L, L) mask; the visible matrix needs one
            raise ValueError(f"K-BERT needs attn_implementation 'eager' or 'sdpa', "
                             f"got {bert_cfg._attn_implementation!r}")
        if config.max_length > bert_cfg.max_position_embeddings:
            raise ValueError(f"max_length {config.max_length} > the backbone's "
                             f"{bert_cfg.max_position_embeddings} position embeddings")
        d = self.hidden_size
        self.mlm_dense = nn.Linear(d, d)                   # BERT's prediction-head transform
        self.mlm_norm = nn.LayerNorm(d, eps=bert_cfg.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(bert_cfg.vocab_size))
        self.reset_parameters()

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.bert.config.vocab_size)

    def reset_parameters(self) -> None:
        """The MLM head only: the backbone keeps its (pretrained) weights."""
        nn.init.normal_(self.mlm_dense.weight, std=self.bert.config.initializer_range)
        nn.init.zeros_(self.mlm_dense.bias)
        self.mlm_norm.reset_parameters()
        nn.init.zeros_(self.mlm_bias)

    def knowledge_layer(self, lookup: TripleLookup) -> KnowledgeLayer:
        """A knowledge layer with this model's tokenizer, ``k`` and ``max_length``."""
        return KnowledgeLayer(self.tokenizer, lookup, k=self.config.k, max_length=self.config.max_length)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> KBertOutput:
        """``input_ids``, ``position_ids`` (soft), ``token_type_ids`` (B, L); ``visible`` (B, L, L) bool."""
        dtype = self.bert.embeddings.word_embeddings.weight.dtype
        out = self.bert(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                        attention_mask=visible_bias(visible, dtype))
        hidden = out.last_hidden_state                     # (B, L, D)
        return KBertOutput(hidden=hidden, pooled=hidden[:, 0])

    def encode(self, batch: Mapping[str, torch.Tensor]) -> KBertOutput:
        """:meth:`forward` on a :func:`collate_trees` batch."""
        return self(batch["input_ids"], batch["position_ids"], batch["visible"],
                    batch.get("token_type_ids"))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V), decoder tied to the input word embeddings (as BERT's)."""
        h = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.bert.embeddings.word_embeddings.weight, self.mlm_bias)

    def mlm_inputs(self, batch: Mapping[str, torch.Tensor],
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(corrupted input_ids, labels)`` (B, L): :func:`fusion.models.objectives.mlm_mask` restricted to
        the trunk, special tokens and padding excluded (see :meth:`loss` for why not the branches)."""
        maskable = batch["trunk"] & ~batch["special"] & batch["attention_mask"].bool()   # (B, L)
        return mlm_mask(batch["input_ids"], maskable, self.tokenizer.mask_token_id, self.vocab_size,
                        generator=generator, prob=self.config.mlm_prob)

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mlm", "total"}``: BERT's MLM (15% chosen; 80/10/10) over trunk tokens, not [CLS]/[SEP].

        Injected knowledge is never masked or predicted: a branch token is visible only to its branch and
        its entity, so predicting it is KG completion from the entity, not language modelling, and
        would train the model to memorise the KG it is given at input time anyway; masking it would also
        hide the very fact that is there to help predict the masked words of the sentence.
        """
        corrupted, labels = self.mlm_inputs(batch, generator)                           # (B, L) each
        hidden = self(corrupted, batch["position_ids"], batch["visible"],
                      batch.get("token_type_ids")).hidden  # (B, L, D)
        chosen = labels != IGNORE                          # (B, L)
        if not bool(chosen.any()):                         # tiny batch, nothing drawn: zero, graph kept
            mlm = hidden.sum() * 0.0
        else:
            logits = self.mlm_logits(hidden[chosen])                              # (N, V)
            mlm = F.cross_entropy(logits.float(), labels[chosen])                # fp32 under autocast
        return {"mlm": mlm, "total": mlm}

    def __repr__(self) -> str:
        c = self.bert.config
        return (f"KBert(hidden_size={c.hidden_size}, num_layers={c.num_hidden_layers}, "
                f"vocab_size={c.vocab_size}, k={self.config.k}, max_length={self.config.max_length})")
