"""ERNIE: a BERT whose upper layers fuse knowledge-graph entity embeddings into the tokens.

Zhang, Han, Liu, Jiang, Sun & Liu (2019), "ERNIE: Enhanced Language Representation with Informative
Entities", ACL; reference code thunlp/ERNIE (``code/knowledge_bert/modeling.py``).

Architecture (paper section 3.2-3.3)::

    tokens -> embeddings -> T-Encoder (N plain BERT layers) -> K-Encoder (M aggregators) -> w^o
    entities (frozen TransE table, on the first wordpiece of each mention) -----------^   -> e^o

Aggregator i (paper eq. 3-5, in the form thunlp's code computes it)::

    w~ = MH-ATT(w)            token stream: the BERT layer's own attention + Add&LN   (B, L, D)
    e~ = MH-ATT(e)            entity stream: its own attention over the entities   (B, L, E)
    h  = GELU(W_t w~ + W_e e~ + b)   for a token aligned to an entity              (B, L, I)
    h  = GELU(W_t w~ + b)            for a token without one
    w' = LN(W'_t h + b'_t + w~)
    e' = LN(W'_e h + b'_e + e~)      (zero where the token has no entity)

``W_t, b`` are the BERT layer's intermediate dense and ``W'_t, b'_t`` plus the LN its output dense, so
the fusion *is* the BERT feed-forward block with one extra input ``W_e e~`` (bias-free; the one bias
``b`` is BERT's). Consequence, and the reason for the choice: on a sentence with no entities an
aggregator computes exactly its BERT layer, and the whole model computes exactly the backbone, so
pretraining starts from the backbone's function rather than from a perturbed one. Like thunlp (which
initialises everything but the entity parts from Google's BERT) the aggregators are initialised from
the backbone's layers N..N+M-1. Two small departures from thunlp, both deliberate: its ``dense_ent``
has a bias of its own (a constant added at every position, i.e. part of ``b``, zero at init there
too), and its first aggregator (the "mix" layer) feeds the entities to the fusion without an entity
attention; here every aggregator has one, as the paper describes.

Entity stream layout: thunlp keeps the entity sequence *token-aligned* (length L, zero vectors where a
token has no entity) rather than the paper's compact {e_1..e_m}; it is the same computation (entity
attention attends only to positions that hold an entity) without a gather/scatter per layer, and it
is what this file does.

Pretraining (paper section 3.4): MLM (15%, 80/10/10, tied to the word embeddings) plus the denoising
entity auto-encoder (dEA): of the aligned tokens 5% get a random other entity, 15% lose their entity,
80% keep it, and every aligned token predicts its original entity among the entities of the batch,
``p(e_j | w_i) = softmax_j( T(w^o_i) · e_j )`` with ``T`` thunlp's head (dense D->E, GELU, LN) and
``e_j`` the frozen TransE vectors. NSP is left out (RoBERTa showed it does not help).

Inputs come from :func:`encode_text` / :func:`collate`: token ids plus a per-token entity index
``entity_idx`` (B, L), -1 where no entity, built from ``knowledge.link`` mentions with a fast
tokenizer's character offsets.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone, backbone_mask, first_wordpieces, resolve_text_sizes
from fusion.models.layers import Attention, init_bert_weights, summary
from fusion.models.objectives import IGNORE, mlm_mask

NO_ENTITY = -1


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class ErnieConfig:
    """Sizes and rates. Fields left ``None`` are filled from the backbone and the entity table by
    :meth:`resolve`; a resolved config describes the model completely (checkpoint metadata)."""

    num_k_layers: int | None = None    # M aggregators; None: half the backbone's layers (ERNIE: 6 of 12)
    entity_heads: int = 4              # thunlp: 4 heads over the 100-d TransE vectors
    mlm_prob: float = 0.15             # BERT's masking rate, 80/10/10 inside it
    dea_replace: float = 0.05          # dEA: share of aligned tokens given a random other entity
    dea_mask: float = 0.15             # dEA: share of aligned tokens whose entity is removed
    dropout: float | None = None       # entity-stream dropout; None: the backbone's hidden dropout
    attention_dropout: float | None = None  # None: the backbone's attention dropout
    initializer_range: float | None = None  # None: the backbone's (BERT: 0.02)
    # filled by resolve():
    hidden_size: int | None = None         # D
    intermediate_size: int | None = None   # I, BERT's feed-forward width (= the fusion width)
    num_layers: int | None = None          # N + M, the backbone's depth
    vocab_size: int | None = None
    mask_token_id: int | None = None
    num_entities: int | None = None
    entity_dim: int | None = None          # E (TransE: 100)

    @property
    def num_t_layers(self) -> int:
        return self.num_layers - self.num_k_layers   # N

    def resolve(self, backbone: TextBackbone, entities: torch.Tensor) -> ErnieConfig:
        bc = backbone.model.config
        m = bc.num_hidden_layers // 2 if self.num_k_layers is None else self.num_k_layers
        if not 0 <= m <= bc.num_hidden_layers:
            raise ValueError(f"num_k_layers={m}: the backbone has {bc.num_hidden_layers} layers")
        if entities.dim() != 2:
            raise ValueError(f"entity table must be (num_entities, entity_dim), got {tuple(entities.shape)}")
        if entities.shape[1] % self.entity_heads:
            raise ValueError(f"entity_dim {entities.shape[1]} is not a multiple of entity_heads "
                             f"{self.entity_heads}")
        return resolve_text_sizes(
            self, backbone, ("num_entities", "entity_dim"), "the backbone/entity table", num_k_layers=m,
            dropout=bc.hidden_dropout_prob if self.dropout is None else self.dropout,
            attention_dropout=(bc.attention_probs_dropout_prob if self.attention_dropout is None
                               else self.attention_dropout),
            num_entities=int(entities.shape[0]), entity_dim=int(entities.shape[1]))


# ----------------------------------------------------------------------------------------------
# inputs: text + linked mentions -> token ids + per-token entity index


@dataclass
class MentionCounts:
    """What became of the mentions; each mention is counted exactly once, so
    ``aligned + missing + truncated + unaligned == mentions``."""

    mentions: int = 0
    aligned: int = 0      # its entity now sits on the mention's first wordpiece
    missing: int = 0      # entity index outside the table, or in the caller's ``missing`` set
    truncated: int = 0    # its first wordpiece fell beyond max_length
    unaligned: int = 0    # covers no wordpiece (whitespace, out of range) or its first wordpiece
                          # already carries an earlier mention's entity

    def __add__(self, other: MentionCounts) -> MentionCounts:
        return MentionCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class ErnieExample:
    input_ids: list[int]            # (L,)
    entity_idx: list[int]           # (L,) table row per token, NO_ENTITY (-1) where none
    special_tokens_mask: list[int]  # (L,) 1 on [CLS]/[SEP]: never MLM-masked
    counts: MentionCounts = field(default_factory=MentionCounts)


def _mention_triple(m: Any) -> tuple[int, int, int]:
    """``(start, end, entity_idx)`` from a plain tuple or a ``knowledge.link.Mention``."""
    if hasattr(m, "entity_idx"):
        return int(m.start), int(m.end), int(m.entity_idx)
    start, end, idx = m[0], m[1], m[2]
    return int(start), int(end), int(idx)


def encode_text(text: str, mentions: Iterable[Any], tokenizer: Any, max_length: int,
                num_entities: int, missing: Iterable[int] = ()) -> ErnieExample:
    """Tokenise ``text`` (truncated to ``max_length`` with special tokens) and put each mention's
    entity on the first wordpiece of the mention, as ERNIE aligns them (paper section 3.2).

    ``mentions`` are ``(start, end, entity_idx)`` character spans into ``text`` (end exclusive) or
    ``knowledge.link.Mention`` records. Mentions whose entity has no row in the table (index out of
    ``[0, num_entities)`` or listed in ``missing``, e.g. entities the KG embedding dropped) are
    skipped and counted, never an error: a linker and an embedding built at different times must
    not crash training. ``tokenizer`` must be fast (character offsets).
    """
    missing = set(missing)
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    entity_idx = [NO_ENTITY] * len(ids)
    counts = MentionCounts()
    spans, ents = [], []
    for m in mentions:
        start, end, e = _mention_triple(m)
        counts.mentions += 1
        if not 0 <= e < num_entities or e in missing:
            counts.missing += 1
        else:
            spans.append((start, end))
            ents.append(e)
    lost = []
    for span, e, i in zip(spans, ents, first_wordpieces(offsets, spans), strict=True):
        if i is None:
            lost.append(span)
        elif entity_idx[i] != NO_ENTITY:
            counts.unaligned += 1   # one wordpiece carries one entity in the fusion; first come wins
        else:
            entity_idx[i] = e
            counts.aligned += 1
    if lost:
        # Truncated away, or never on a wordpiece at all? Only the untruncated offsets can tell, and
        # they are needed only here, so the common case tokenises once. verbose=False: the full
        # sequence may exceed model_max_length, which is the point, not a mistake to warn about.
        full = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                         verbose=False)["offset_mapping"]
        for hit in first_wordpieces(full, lost):
            if hit is None:
                counts.unaligned += 1
            else:
                counts.truncated += 1
    return ErnieExample(ids, entity_idx, list(enc["special_tokens_mask"]), counts)


def collate(examples: Sequence[ErnieExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of examples to the longest one: ``input_ids``, ``attention_mask``, ``entity_idx``
    (-1 on padding) and ``special_tokens_mask`` (1 on padding too), each (B, L)."""
    B, L = len(examples), max((len(ex.input_ids) for ex in examples), default=0)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    entity_idx = torch.full((B, L), NO_ENTITY, dtype=torch.long)
    special = torch.ones(B, L, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        entity_idx[b, :n] = torch.tensor(ex.entity_idx, dtype=torch.long)
        special[b, :n] = torch.tensor(ex.special_tokens_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "entity_idx": entity_idx,
            "special_tokens_mask": special}


def encode_batch(texts: Sequence[str], mentions: Sequence[Iterable[Any]], tokenizer: Any,
                 max_length: int, num_entities: int,
                 missing: Iterable[int] = ()) -> tuple[dict[str, torch.Tensor], MentionCounts]:
    """:func:`encode_text` each text, :func:`collate` them, and sum the mention counts."""
    if len(texts) != len(mentions):
        raise ValueError(f"{len(texts)} texts but {len(mentions)} mention lists")
    missing = set(missing)
    examples = [encode_text(t, m, tokenizer, max_length, num_entities, missing)
                for t, m in zip(texts, mentions, strict=True)]
    counts = sum((ex.counts for ex in examples), MentionCounts())
    return collate(examples, tokenizer.pad_token_id), counts


# ----------------------------------------------------------------------------------------------
# dEA corruption


def dea_mask(entity_idx: torch.Tensor, num_entities: int, generator: torch.Generator | None = None,
             replace_prob: float = 0.05, mask_prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``(corrupted entity_idx, labels)`` for the denoising entity auto-encoder (paper section 3.4).

    Every aligned token (``entity_idx >= 0``) is a prediction target (label = its entity, ``IGNORE``
    elsewhere); its input is, independently, replaced by a uniformly random *other* entity with
    probability ``replace_prob``, removed (-1: the token looks unaligned) with ``mask_prob``, and
    kept otherwise. "Other" is drawn as ``r ~ U{0..n-2}``, shifted past the original, so a
    replacement never silently keeps the entity and the 5% is exact.
    """
    aligned = entity_idx >= 0
    labels = torch.where(aligned, entity_idx, torch.full_like(entity_idx, IGNORE))
    u = torch.rand(entity_idx.shape, generator=generator, device=entity_idx.device)
    to_replace = aligned & (u < replace_prob)
    if num_entities < 2:
        to_replace = torch.zeros_like(aligned)  # no other entity to draw
    to_mask = aligned & (u >= replace_prob) & (u < replace_prob + mask_prob)
    r = torch.randint(max(num_entities - 1, 1), entity_idx.shape, generator=generator,
                      device=entity_idx.device)
    other = r + (r >= entity_idx).long()
    out = torch.where(to_replace, other, entity_idx)
    out = torch.where(to_mask, torch.full_like(out, NO_ENTITY), out)
    return out, labels


# ----------------------------------------------------------------------------------------------
# blocks


class Aggregator(nn.Module):
    """One K-Encoder layer (paper eq. 3-5; see the module docstring for the equations).

    Built around a BERT layer whose modules it takes over: the token attention (``w~``), the
    intermediate dense as ``W_t, b``, and the output dense + LN as ``W'_t, b'_t, LN``. New are the
    entity attention, ``W_e`` (bias-free, so the fusion's bias stays BERT's ``b``) and the entity
    output ``W'_e, b'_e, LN_e``. With no entity in the sequence it is exactly the BERT layer.

    The entity attention is :class:`fusion.models.layers.Attention` over the token-aligned entity
    sequence (thunlp's ``self_ent``/``output_ent``), ``e~ = LN(e + W_o MHA(e))``: only positions
    holding an entity are keys, and outputs at positions without one are zeroed.
    """

    def __init__(self, bert_layer: nn.Module, cfg: ErnieConfig, eps: float) -> None:
        super().__init__()
        inner, E = cfg.intermediate_size, cfg.entity_dim   # I (fusion width) and E
        self.attention = bert_layer.attention                       # w~ = LN(MHA(w) + w), BERT's
        self.token_in = bert_layer.intermediate.dense               # W_t, b      D -> I
        self.act = bert_layer.intermediate.intermediate_act_fn      # GELU (the backbone's)
        self.token_out = bert_layer.output                          # LN(W'_t h + b'_t + w~)
        self.entity_attention = Attention(E, cfg.entity_heads, dropout=cfg.dropout,
                                          attention_dropout=cfg.attention_dropout, eps=eps)
        self.entity_in = nn.Linear(E, inner, bias=False)            # W_e         E -> I
        self.entity_out = nn.Linear(inner, E)                       # W'_e, b'_e  I -> E
        self.entity_norm = nn.LayerNorm(E, eps=eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def reset_parameters(self, std: float) -> None:
        """Re-initialise the entity parts; the token parts are the backbone's and stay."""
        for m in (self.entity_attention, self.entity_in, self.entity_out, self.entity_norm):
            init_bert_weights(m, std)

    def forward(self, w: torch.Tensor, e: torch.Tensor, token_mask: torch.Tensor | None,
                has_entity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.attention(w, token_mask)[0]                        # (B, L, D)  w~
        # A query also sees itself: a row without any entity would otherwise have no key at all
        # and SDPA would return NaN (zeroed right after anyway).
        eye = torch.eye(e.shape[1], dtype=torch.bool, device=e.device)         # (L, L)
        keys = has_entity[:, None, None, :] | eye                              # (B, 1, L, L)
        e = self.entity_attention(e, keys)                                     # (B, L, E)  e~
        e = e * has_entity[..., None].to(e.dtype)                              # 0 without entity
        # e~ is exactly 0 where there is no entity and W_e has no bias, so those tokens get
        # h = GELU(W_t w~ + b): the two cases of eq. 4 in one expression.
        h = self.act(self.token_in(w) + self.entity_in(e))          # (B, L, I)
        w_out = self.token_out(h, w)                                # (B, L, D)
        e_out = self.entity_norm(self.dropout(self.entity_out(h)) + e)   # (B, L, E)
        return w_out, e_out * has_entity[..., None].to(e_out.dtype)

    def __repr__(self) -> str:
        return (f"Aggregator(hidden_size={self.token_in.in_features}, "
                f"fusion_size={self.token_in.out_features}, entity_dim={self.entity_in.in_features}, "
                f"entity_heads={self.entity_attention.num_heads})")


class ErnieOutput(NamedTuple):
    hidden: torch.Tensor          # (B, L, D) w^o, the K-Encoder's token output
    entity_hidden: torch.Tensor   # (B, L, E) e^o, zero where no entity
    text_hidden: torch.Tensor     # (B, L, D) the T-Encoder's output (plain BERT layers 0..N-1)


# ----------------------------------------------------------------------------------------------
# the model


class Ernie(nn.Module):
    """ERNIE over a BERT-family backbone and a frozen entity-embedding table.

    ``backbone`` is copied, not shared: training ERNIE leaves the caller's model as it was (a
    baseline to compare against). ``entities`` (num_entities, entity_dim), e.g. the TransE vectors of
    a ``knowledge.embed`` artifact, becomes a non-persistent buffer: frozen (no gradient, no
    optimiser state) and kept out of checkpoints, whose config records its shape instead.
    """

    def __init__(self, backbone: TextBackbone, entities: torch.Tensor,
                 config: ErnieConfig | None = None) -> None:
        from transformers.activations import ACT2FN  # lazy, as in backbone.py

        super().__init__()
        self.config = cfg = (config or ErnieConfig()).resolve(backbone, entities)
        bert = copy.deepcopy(backbone.model)
        self.bert_config = bert.config    # the attention-mask helper needs it (sdpa vs eager)
        eps = bert.config.layer_norm_eps
        N = cfg.num_t_layers
        self.embeddings = bert.embeddings                                           # T-Encoder input
        self.t_layers = nn.ModuleList(bert.encoder.layer[:N])                       # T-Encoder
        self.k_layers = nn.ModuleList(Aggregator(layer, cfg, eps)                   # K-Encoder
                                      for layer in bert.encoder.layer[N:])
        self.register_buffer("entities", entities.detach().clone(), persistent=False)  # (V_e, E)
        act = ACT2FN[bert.config.hidden_act]
        D, E = cfg.hidden_size, cfg.entity_dim
        # MLM head as BERT's: transform, then the word-embedding matrix (tied) plus a bias.
        self.mlm_transform = nn.Sequential(nn.Linear(D, D), act, nn.LayerNorm(D, eps=eps))
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # dEA head as thunlp's BertEntPredictionHead: D -> E, GELU, LN, then dot with candidates.
        self.dea_transform = nn.Sequential(nn.Linear(D, E), act, nn.LayerNorm(E, eps=eps))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise what ERNIE adds (entity streams, fusion ``W_e``/``W'_e``, both heads);
        the embeddings and BERT layers keep the backbone's weights, as thunlp starts from BERT."""
        std = self.config.initializer_range
        for layer in self.k_layers:
            layer.reset_parameters(std)
        for head in (self.mlm_transform, self.dea_transform):
            init_bert_weights(head, std)
        nn.init.zeros_(self.mlm_bias)

    # -- encoders --

    def _token_mask(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return backbone_mask(self.bert_config, x, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                entity_idx: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> ErnieOutput:
        """``input_ids`` (B, L), ``attention_mask`` (B, L) 1 on real tokens, ``entity_idx`` (B, L)
        a row of the entity table per token or -1 (None: no entities at all)."""
        if entity_idx is None:
            entity_idx = torch.full_like(input_ids, NO_ENTITY)
        w = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)   # (B, L, D)
        mask = self._token_mask(w, attention_mask)                                 # (B, 1, L, L) | None
        for layer in self.t_layers:
            w = layer(w, mask)                                                     # (B, L, D)
        text_hidden = w
        has_entity = entity_idx >= 0                                               # (B, L)
        if attention_mask is not None:
            has_entity = has_entity & attention_mask.bool()
        e = self.entities[entity_idx.clamp_min(0)].to(w.dtype)                     # (B, L, E)
        e = e * has_entity[..., None].to(w.dtype)                                  # (B, L, E)
        for layer in self.k_layers:
            w, e = layer(w, e, mask, has_entity)                                   # (B, L, D), (B, L, E)
        return ErnieOutput(w, e, text_hidden)

    # -- pretraining --

    def corrupt(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """MLM and dEA corruption of a batch: ``(input_ids, mlm_labels, entity_idx, dea_labels)``,
        each (B, L). Special tokens and padding are never MLM targets; padding has no entity."""
        cfg = self.config
        attn = batch["attention_mask"].bool()
        special = batch.get("special_tokens_mask")
        maskable = attn if special is None else attn & ~special.bool()
        ids, mlm_labels = mlm_mask(batch["input_ids"], maskable, cfg.mask_token_id, cfg.vocab_size,
                                   generator=generator, prob=cfg.mlm_prob)
        ent = torch.where(attn, batch["entity_idx"], torch.full_like(batch["entity_idx"], NO_ENTITY))
        ent, dea_labels = dea_mask(ent, cfg.num_entities, generator=generator,
                                   replace_prob=cfg.dea_replace, mask_prob=cfg.dea_mask)
        return ids, mlm_labels, ent, dea_labels

    def loss(self, batch: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mlm", "dea", "total"}`` on one batch (from :func:`collate`); total = mlm + dea.

        dEA is a softmax over the batch's distinct original entities (thunlp's candidate set):
        ``p(e_j | w_i) = softmax_j(T(w^o_i) · e_j)``; a batch without aligned tokens gives dea = 0.
        ``generator`` (for reproducible masking) must live on the batch's device.
        """
        ids, mlm_labels, ent, dea_labels = self.corrupt(batch, generator)
        out = self(ids, batch["attention_mask"], ent, batch.get("token_type_ids"))
        h = out.hidden                                                             # (B, L, D)

        chosen = mlm_labels != IGNORE                                              # (B, L)
        # The vocabulary projection only where there is a target: 15% of the tokens, and V is big.
        z = self.mlm_transform(h[chosen])                                          # (n, D)
        logits = F.linear(z, self.embeddings.word_embeddings.weight, self.mlm_bias)  # (n, V)
        if chosen.any():
            mlm = F.cross_entropy(logits, mlm_labels[chosen])
        else:
            mlm = logits.sum() * 0.0   # keeps every parameter in the graph (DDP wants that)

        aligned = dea_labels != IGNORE                                             # (B, L)
        targets = dea_labels[aligned]                                              # (m,)
        candidates, target = torch.unique(targets, return_inverse=True)           # (C,), (m,)
        q = self.dea_transform(h[aligned])                                         # (m, E)
        scores = q @ self.entities[candidates].to(q.dtype).T                       # (m, C)
        dea = F.cross_entropy(scores, target) if targets.numel() else q.sum() * 0.0
        return {"mlm": mlm, "dea": dea, "total": mlm + dea}

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, t_layers=c.num_t_layers, k_layers=c.num_k_layers,
                       entity_dim=c.entity_dim, entity_heads=c.entity_heads, num_entities=c.num_entities,
                       vocab_size=c.vocab_size)
