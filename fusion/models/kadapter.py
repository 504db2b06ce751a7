"""K-Adapter: knowledge in plug-in adapters beside a frozen pretrained encoder.

Wang et al., "K-Adapter: Infusing Knowledge into Pre-Trained Models with Adapters", Findings of
ACL 2021 (arXiv 2002.01808); reference code microsoft/K-Adapter.

Structure (one adapter; a model may carry several, each trained on its own knowledge task)::

    h_0 .. h_L         hidden states of the frozen backbone (h_0 = embedding output, h_i = after
                       encoder layer i, counted from 1: Hugging Face's ``hidden_states`` tuple)
    x_1 = h_{l_1}                       the first adapter layer sees only the backbone
    x_j = h_{l_j} + a_{j-1}             later ones add the previous adapter layer's output
    a_j = x_j + W_up T^N(W_down x_j)    down-projection H -> A, N transformer layers at width A,
                                        up-projection A -> H, residual around the whole layer
    adapter output = a_k  (k = number of chosen layers)
    features       = [h_L ; a_k(adapter 1) ; a_k(adapter 2) ; ...]      (B, T, H * (1 + n))

Task heads read the concatenation, as in the paper. The paper taps RoBERTa-large (24 layers) at
``0, 11, 23`` with N = 2 and A = 768; its pretraining script uses ``0, 11, 22``. In this file
``layers`` are indices into ``hidden_states`` (the reference code's convention, so the paper's
setting is literally ``layers=(0, 11, 23)``: the embedding output, after layer 11 and after layer 23
of 24). Our default is first, middle and last encoder layer: ``(1, L // 2 + 1, L)``, i.e. after
layers ``(0, L // 2, L - 1)`` counted from 0 -- ``(1, 4, 6)`` for MiniLM's six layers, ``(1, 2, 2)``
for a two-layer test model, where the middle and the last coincide.

The backbone is frozen and never sees a gradient: the point of K-Adapter is that each kind of
knowledge lives in its own adapter, so adapters trained separately can be combined later without
the backbone drifting between them (no catastrophic forgetting, no retraining of the encoder).
The paper trains a *factual* adapter on relation classification (T-REx sentences aligned with
Wikidata relations: :class:`RelationClassifier`) and a *linguistic* adapter on dependency-head
prediction, then combines them for downstream tasks. No dependency parser is available offline
here, so stele's second adapter is *lexical* instead: it is trained on a WordNet task, predicting
the lexicographer file (lexname, e.g. ``noun.location``) of a word linked to a synset, which is
:class:`EntityTyper` applied with WordNet's lexnames as the type labels (``knowledge.sources.wordnet``
puts each synset's lexname in its entity's ``types``). That is lexical-semantic knowledge, not the
paper's syntax; the architecture and the protocol (frozen backbone, adapters trained apart) are kept.

Deliberate differences from the reference code, each small: the adapter's transformer layers
respect the padding mask (the reference attends over padding with an all-ones mask); the combined
model concatenates backbone and adapter outputs once (the reference's fine-tuning code passes each
``[backbone; adapter]`` pair through a dense layer first: linear maps a head over the concatenation
can learn itself); heads read the first wordpiece of each mention rather than inserted
entity-marker tokens, so the tokenizer's vocabulary need not change; the reference's optional extra
skip connections between adapter layers (``adapter_skip_layers``, 0 in its pretraining scripts) are
left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fusion.models.backbone import first_wordpieces

Span = tuple[int, int]  # character offsets [start, end) into the text


# --------------------------------------------------------------------------------------- config

@dataclass
class KAdapterConfig:
    adapters: tuple[str, ...] = ("factual", "lexical")
    layers: tuple[int, ...] | None = None  # indices into hidden_states; None: first/middle/last
    adapter_size: int = 128                # A, the width inside the adapter (see below)
    num_transformer_layers: int = 2        # N transformer layers per adapter layer (paper: 2)
    num_heads: int = 4
    intermediate_size: int | None = None   # feed-forward width; None: 4 * adapter_size
    dropout: float = 0.1
    projection_init_std: float = 2e-4      # the reference's adapter_initializer_range
    init_std: float = 0.02                 # BERT's initializer_range, for the transformer layers

    # Why 128 by default: a paper-sized adapter (3 adapter layers, each 2 transformer layers at 768
    # plus the 1024 <-> 768 projections) has about 47M parameters, about 15% of RoBERTa-large's 302M
    # encoder-layer parameters; at width 128 (4 heads of 32, feed-forward 512) an adapter beside
    # all-MiniLM-L6-v2 has 1.49M, 14% of MiniLM's 10.6M: about the same share. Copying the paper's
    # width *ratio* (768 / 1024 -> 288) would make each adapter about 6.6M, over half the encoder it
    # sits beside, no longer a light plug-in. 128 is also the reference code's default.

    def __post_init__(self) -> None:
        self.adapters = tuple(self.adapters)
        if not self.adapters or len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"adapters must be distinct names, at least one: {self.adapters}")
        if self.adapter_size % self.num_heads:
            raise ValueError(f"adapter_size {self.adapter_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.adapter_size


def default_layers(num_layers: int) -> tuple[int, ...]:
    """First, middle and last encoder layer as ``hidden_states`` indices: ``(1, L // 2 + 1, L)``."""
    return (1, num_layers // 2 + 1, num_layers)


# --------------------------------------------------------------------------------------- blocks

class AdapterLayer(nn.Module):
    """One adapter layer: ``a = x + W_up T^N(W_down x)`` with ``x = h + previous`` (or ``h``).

    The transformer layers are ``torch.nn.TransformerEncoderLayer`` in post-LN form with GELU
    (``norm_first=False``), the same computation as a BERT layer, which is what the reference
    stacks inside its adapters. torch's layer is used rather than transformers' ``BertLayer``
    because its call signature is stable across versions; ``BertLayer``'s internals (attention
    back-ends, mask formats, return types) changed between transformers 4 and 5.

    The projections start near zero (normal, std 2e-4, as in the reference), so a fresh adapter
    layer is almost the identity on its input and training moves away from that gently. With the
    up-projection exactly zero, the layer *is* the identity (the tests check this).
    """

    def __init__(self, hidden_size: int, cfg: KAdapterConfig, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.cfg = cfg
        self.down = nn.Linear(hidden_size, cfg.adapter_size)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.adapter_size, cfg.num_heads, cfg.intermediate_size,
                                       cfg.dropout, activation="gelu", layer_norm_eps=layer_norm_eps,
                                       batch_first=True, norm_first=False)
            for _ in range(cfg.num_transformer_layers))
        self.up = nn.Linear(cfg.adapter_size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.down, self.up):
            nn.init.normal_(proj.weight, std=self.cfg.projection_init_std)
            nn.init.zeros_(proj.bias)
        for m in self.encoder.modules():  # BERT's initialisation for the transformer layers
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=self.cfg.init_std)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, backbone_state: torch.Tensor, previous: torch.Tensor | None,
                padding: torch.Tensor) -> torch.Tensor:
        """``backbone_state`` (B, T, H) is ``hidden_states[l_j]``; ``previous`` the output of the
        adapter layer before (None for the first); ``padding`` (B, T) is True at padded tokens."""
        x = backbone_state if previous is None else backbone_state + previous  # (B, T, H)
        z = self.down(x)                                                         # (B, T, A)
        for layer in self.encoder:
            z = layer(z, src_key_padding_mask=padding)                           # (B, T, A)
        return x + self.up(z)                                                    # (B, T, H)


class Adapter(nn.Module):
    """One knowledge adapter: a chain of :class:`AdapterLayer`, one per chosen backbone layer."""

    def __init__(self, hidden_size: int, layers: Sequence[int], cfg: KAdapterConfig,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.layers = tuple(layers)
        self.blocks = nn.ModuleList(AdapterLayer(hidden_size, cfg, layer_norm_eps) for _ in self.layers)

    def reset_parameters(self) -> None:
        for block in self.blocks:
            block.reset_parameters()

    def forward(self, hidden_states: Sequence[torch.Tensor], padding: torch.Tensor) -> torch.Tensor:
        out = None
        for index, block in zip(self.layers, self.blocks):
            out = block(hidden_states[index], out, padding)  # (B, T, H)
        return out                                           # (B, T, H)


# ---------------------------------------------------------------------------------------- model

class KAdapter(nn.Module):
    """A frozen backbone with named adapters; ``forward`` gives ``[h_L ; adapter outputs]``.

    The backbone's parameters have ``requires_grad=False``, it runs under ``torch.no_grad()`` (its
    activations are never needed for a backward pass, which saves their memory), and it stays in
    eval mode even when this module is put in train mode: dropout in a frozen encoder only adds
    noise to the features the adapters learn from, with no weights of its own to regularise (the
    reference calls ``pretrained_model.eval()`` at every step for the same reason).

    Adapters are trained one at a time, as in the paper: ``train_only("factual")`` leaves the
    other adapters frozen (and in eval mode, like the backbone), and ``forward(..., adapters=
    ("factual",))`` computes the features of a subset, so the factual adapter can be pretrained on
    ``[h_L ; factual]`` alone and combined with the others afterwards.
    """

    def __init__(self, backbone: nn.Module, cfg: KAdapterConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or KAdapterConfig()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        config = backbone.config
        self.hidden_size = int(config.hidden_size)
        self.num_backbone_layers = int(config.num_hidden_layers)
        n = self.num_backbone_layers
        self.layers = tuple(cfg.layers) if cfg.layers is not None else default_layers(n)
        if not self.layers or not all(0 <= i <= n for i in self.layers):
            raise ValueError(f"layers {self.layers} must index hidden_states 0..{n}")
        eps = float(getattr(config, "layer_norm_eps", 1e-12))
        self.adapters = nn.ModuleDict(
            {name: Adapter(self.hidden_size, self.layers, cfg, eps) for name in cfg.adapters})
        self.trainable: set[str] = set()
        self.train_only(*cfg.adapters)  # all adapters trainable until told otherwise

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def feature_size(self, adapters: Sequence[str] | None = None) -> int:
        return self.hidden_size * (1 + len(self.adapter_subset(adapters)))

    def reset_parameters(self) -> None:
        """Re-initialise the adapters; the backbone is pretrained and left alone."""
        for adapter in self.adapters.values():
            adapter.reset_parameters()

    def train_only(self, *names: str) -> KAdapter:
        """Make the named adapters trainable and freeze the others (none named: freeze all)."""
        self.adapter_subset(names)
        self.trainable = set(names)
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in self.trainable)
        return self.train(self.training)

    def train(self, mode: bool = True) -> KAdapter:
        super().train(mode)
        self.backbone.eval()
        for name, adapter in self.adapters.items():
            if name not in self.trainable:
                adapter.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                adapters: Sequence[str] | None = None) -> torch.Tensor:
        """``(B, T)`` ids and mask -> ``(B, T, H * (1 + n))``: ``[h_L ; adapter_1 ; ...]`` in the
        order of ``adapters`` (default: all, in construction order)."""
        with torch.no_grad():
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                output_hidden_states=True)
        hidden_states = out.hidden_states  # L + 1 tensors (B, T, H); [0] is the embedding output
        padding = attention_mask == 0      # (B, T), True where torch's attention must not look
        parts = [hidden_states[-1]]
        parts += [self.adapters[name](hidden_states, padding) for name in self.adapter_subset(adapters)]
        return torch.cat(parts, dim=-1)    # (B, T, H * (1 + n))

    def adapter_subset(self, names: Sequence[str] | None) -> tuple[str, ...]:
        """``names`` checked against this model's adapters (None: all of them, in order)."""
        if names is None:
            return self.adapter_names
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise KeyError(f"unknown adapters {unknown}; this model has {list(self.adapters)}")
        return tuple(names)

    def __repr__(self) -> str:
        per_adapter = sum(p.numel() for p in next(iter(self.adapters.values())).parameters())
        return (f"{type(self).__name__}(backbone={type(self.backbone).__name__}, "
                f"hidden_size={self.hidden_size}, backbone_layers={self.num_backbone_layers}, "
                f"layers={self.layers}, adapters={list(self.adapters)}, "
                f"adapter_size={self.cfg.adapter_size}, "
                f"transformer_layers={self.cfg.num_transformer_layers}, heads={self.cfg.num_heads}, "
                f"params_per_adapter={per_adapter}, "
                f"trainable={sorted(self.trainable)})")


# ---------------------------------------------------------------------------------------- heads

def _at(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return features[torch.arange(features.shape[0], device=features.device), index]  # (B, F)


class RelationClassifier(nn.Module):
    """Relation classification, the factual adapter's task (T-REx in the paper).

    ``logits = W [f(head) ; f(tail)] + b`` where ``f`` is the K-Adapter feature at the first
    wordpiece of each entity mention. The reference applies two linear maps in a row (``dense``
    then ``out_proj``, no activation between), which is one linear map, so a single layer here.
    """

    def __init__(self, encoder: KAdapter, num_relations: int, adapters: Sequence[str] | None = None,
                 dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.adapters = encoder.adapter_subset(adapters)
        self.num_relations = num_relations
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * encoder.feature_size(self.adapters), num_relations)

    def reset_parameters(self) -> None:
        """Re-initialise the head only: the encoder's adapters may carry pretrained knowledge."""
        self.classifier.reset_parameters()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                head_index: torch.Tensor, tail_index: torch.Tensor) -> torch.Tensor:
        f = self.encoder(input_ids, attention_mask, self.adapters)           # (B, T, F)
        pair = torch.cat([_at(f, head_index), _at(f, tail_index)], dim=-1)   # (B, 2F)
        return self.classifier(self.dropout(pair))                           # (B, R)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["head_index"], batch["tail_index"])
        task = F.cross_entropy(logits, batch["labels"])
        return {"task": task, "total": task}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_relations={self.num_relations}, adapters={list(self.adapters)}, "
                f"features={self.classifier.in_features}, encoder={self.encoder!r})")


class EntityTyper(nn.Module):
    """Entity typing: the feature at the mention's first wordpiece -> a linear map over types.

    Single-label (``labels`` (B,) int, softmax cross-entropy: stele's WordNet lexname task, where a
    linked synset has one lexname) or multi-label (``labels`` (B, C) multi-hot float, sigmoid
    binary cross-entropy: Open Entity and FIGER in the paper).
    """

    def __init__(self, encoder: KAdapter, num_types: int, adapters: Sequence[str] | None = None,
                 dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.adapters = encoder.adapter_subset(adapters)
        self.num_types = num_types
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.feature_size(self.adapters), num_types)

    def reset_parameters(self) -> None:
        """Re-initialise the head only: the encoder's adapters may carry pretrained knowledge."""
        self.classifier.reset_parameters()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mention_index: torch.Tensor) -> torch.Tensor:
        f = self.encoder(input_ids, attention_mask, self.adapters)           # (B, T, F)
        return self.classifier(self.dropout(_at(f, mention_index)))          # (B, C)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["mention_index"])
        labels = batch["labels"]
        if labels.dim() == 2:  # multi-hot
            task = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        else:
            task = F.cross_entropy(logits, labels)
        return {"task": task, "total": task}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_types={self.num_types}, adapters={list(self.adapters)}, "
                f"features={self.classifier.in_features}, encoder={self.encoder!r})")


# ------------------------------------------------------------------------------- input building

@dataclass(frozen=True)
class RelationExample:
    text: str
    head: Span
    tail: Span
    label: int


@dataclass(frozen=True)
class TypingExample:
    text: str
    mention: Span
    label: int | tuple[int, ...]  # one type, or several for multi-label typing


@dataclass
class BatchReport:
    """What an input builder kept and what it dropped, by reason (dropping never raises)."""
    empty_text: int = 0   # the text is empty or only whitespace
    bad_span: int = 0     # a span outside the text, empty, or covering only whitespace
    truncated: int = 0    # a span that no wordpiece of the truncated sequence overlaps
    kept: int = 0
    kept_index: list[int] = field(default_factory=list)  # positions of the kept examples

    @property
    def total(self) -> int:
        return self.empty_text + self.bad_span + self.truncated


def _encode(texts: Sequence[str], spans: Sequence[Sequence[Span]], tokenizer: Any,
            max_length: int) -> tuple[dict[str, torch.Tensor] | None, list[list[int]], BatchReport]:
    """Tokenise the texts and find each span's first wordpiece; drop (and count) what fails."""
    report = BatchReport()
    candidates = []
    for i, (text, ss) in enumerate(zip(texts, spans)):
        if not text or not text.strip():
            report.empty_text += 1
        elif any(not (0 <= s < e <= len(text)) or not text[s:e].strip() for s, e in ss):
            report.bad_span += 1
        else:
            candidates.append(i)
    if not candidates:
        return None, [], report
    enc = tokenizer([texts[i] for i in candidates], truncation=True, max_length=max_length,
                    padding=True, return_offsets_mapping=True, return_tensors="pt")
    rows, positions = [], []
    for row, i in enumerate(candidates):
        hits = first_wordpieces(enc["offset_mapping"][row].tolist(), spans[i])
        if any(h is None for h in hits):
            report.truncated += 1
            continue
        rows.append(row)
        positions.append(hits)
        report.kept_index.append(i)
    report.kept = len(rows)
    if not rows:
        return None, [], report
    mask = enc["attention_mask"][rows]                          # (B, T)
    width = int(mask.sum(1).max())                              # dropped rows may have been longer
    batch = {"input_ids": enc["input_ids"][rows, :width], "attention_mask": mask[:, :width]}
    return batch, positions, report


def relation_batch(examples: Sequence[RelationExample], tokenizer: Any,
                   max_length: int = 128) -> tuple[dict[str, torch.Tensor] | None, BatchReport]:
    """Inputs for :class:`RelationClassifier` (fast tokenizer, character spans); ``None`` when
    every example was skipped. Keys: input_ids, attention_mask (B, T); head_index, tail_index,
    labels (B,)."""
    batch, positions, report = _encode([e.text for e in examples], [(e.head, e.tail) for e in examples],
                                       tokenizer, max_length)
    if batch is None:
        return None, report
    batch["head_index"] = torch.tensor([p[0] for p in positions])
    batch["tail_index"] = torch.tensor([p[1] for p in positions])
    batch["labels"] = torch.tensor([examples[i].label for i in report.kept_index])
    return batch, report


def typing_batch(examples: Sequence[TypingExample], tokenizer: Any, num_types: int | None = None,
                 max_length: int = 128) -> tuple[dict[str, torch.Tensor] | None, BatchReport]:
    """Inputs for :class:`EntityTyper`; labels are (B,) ints, or (B, num_types) multi-hot when
    the examples carry tuples of types (then ``num_types`` is required)."""
    batch, positions, report = _encode([e.text for e in examples], [(e.mention,) for e in examples],
                                       tokenizer, max_length)
    if batch is None:
        return None, report
    batch["mention_index"] = torch.tensor([p[0] for p in positions])
    labels = [examples[i].label for i in report.kept_index]
    if all(isinstance(y, int) for y in labels):
        batch["labels"] = torch.tensor(labels)
    else:
        if num_types is None:
            raise ValueError("multi-label typing examples need num_types")
        hot = torch.zeros(len(labels), num_types)
        for row, y in enumerate(labels):
            hot[row, list((y,) if isinstance(y, int) else y)] = 1.0
        batch["labels"] = hot                                   # (B, C)
    return batch, report
